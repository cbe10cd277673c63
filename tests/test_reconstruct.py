"""Gaussian reconstruction: a tiny end-to-end run and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryosplat.evaluate import fsc, resolution_A
from cryosplat.io import assign_half_sets, read_particles, read_volume
from cryosplat.simulate import SimulationConfig, simulate_dataset
from cryosplat.train import TrainConfig, load_checkpoint, total_steps, train_gold_standard


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    cfg = SimulationConfig(n_particles=400, box_size=32, pixel_size_A=3.0, snr=1.0, seed=2)
    sim = simulate_dataset(None, d, cfg)
    truth, _ = read_volume(sim["ground_truth"])
    return read_particles(sim["particles"]), torch.from_numpy(truth)


@pytest.mark.parametrize("loss", ["real", "fourier"])
def test_tiny_reconstruction_beats_a_random_mixture(tiny, loss):
    p, truth = tiny
    cfg = TrainConfig(n_gaussians=150, epochs=4, eval_every=1000, checkpoint_every=1000, seed=1,
                      loss=loss, densify=False)
    half = assign_half_sets(p, 0)
    trainers, history, trace = train_gold_standard(p, half, cfg, torch.device("cpu"))
    from cryosplat.gaussians import GaussianMixture

    rand = GaussianMixture.random(150, 0.3 * 96, 6.0, generator=torch.Generator().manual_seed(9))
    res_random = resolution_A(fsc(rand.voxelise(32, 3.0).detach(), truth), 32, 3.0, 0.5)
    full = (trainers[0].volume() + trainers[1].volume()) / 2
    res = resolution_A(fsc(full, truth), 32, 3.0, 0.5)
    assert res_random > 30.0
    assert res < 0.6 * res_random, (res, res_random)
    assert trace[-1][1] < trace[0][1] and trace[-1][2] < trace[0][2]  # both losses fell


class Interrupt(Exception):
    pass


def interrupt_and_resume(p, half, cfg, ckpt, after_steps: int):
    """Train until ``after_steps`` steps have run, interrupt, then resume from the checkpoint.
    Returns (the checkpoint's state, the resumed trainers, their loss trace)."""
    steps = []

    def stop(n, losses):
        steps.append(1)
        if len(steps) == after_steps:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_gold_standard(p, half, cfg, torch.device("cpu"), checkpoint_path=ckpt, progress=stop)
    state = load_checkpoint(ckpt)
    resumed, _, trace = train_gold_standard(p, half, cfg, torch.device("cpu"), checkpoint_path=ckpt,
                                            resume=state)
    return state, resumed, trace


def test_dark_particles_are_refused_with_a_hint(tiny):
    from dataclasses import replace

    from cryosplat.errors import InputError

    p, _ = tiny
    cfg = TrainConfig(n_gaussians=50, epochs=1, eval_every=1000, checkpoint_every=1000,
                      densify=False)
    with pytest.raises(InputError, match="--invert"):
        train_gold_standard(replace(p, invert=True), assign_half_sets(p, 0), cfg,
                            torch.device("cpu"))


def test_resume_continues_to_the_same_mixture(tiny, tmp_path):
    p, _ = tiny
    cfg = TrainConfig(n_gaussians=60, epochs=2, eval_every=1000, checkpoint_every=4, seed=3,
                      loss="fourier", densify=False)  # its running noise spectrum must be restored too
    half = assign_half_sets(p, 0)
    ref, _, _ = train_gold_standard(p, half, cfg, torch.device("cpu"))
    state, resumed, trace = interrupt_and_resume(p, half, cfg, tmp_path / "checkpoint.pt", 6)
    assert state["halves"][0]["step"] == 4  # the last checkpoint before the interruption
    assert trace[0][0] == 1 and len(trace) == ref[0].step
    for a, b in zip(ref, resumed):
        assert a.step == b.step
        for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
            assert torch.allclose(x, y, atol=1e-5), name


def test_a_half_set_never_sees_the_other_half_sets_particles(tmp_path):
    """Adding fresh noise to every image of half-set 2 leaves mixture 1 exactly as it was: no
    image, calibration, noise spectrum or densify choice of one half reaches the other."""
    import mrcfile

    sim_cfg = SimulationConfig(n_particles=200, box_size=32, pixel_size_A=3.0, snr=1.0, seed=5)
    sim = simulate_dataset(None, tmp_path / "sim", sim_cfg)
    cfg = TrainConfig(n_gaussians=40, epochs=2, eval_every=1000, checkpoint_every=1000, seed=6,
                      loss="fourier", densify=True, densify_every=3)

    def train() -> tuple[list, object]:
        p = read_particles(sim["particles"])
        trainers, _, _ = train_gold_standard(p, assign_half_sets(p, 0), cfg, torch.device("cpu"))
        return [t.model.state_dict() for t in trainers], p

    before, p = train()
    half = assign_half_sets(p, 0)
    src = p.images
    for i in np.nonzero(half == 2)[0]:  # every image of half-set 2 gets as much noise again
        with mrcfile.open(src.files[src.file_index[i]], mode="r+") as m:
            image = m.data[src.slice_index[i]]
            image += np.random.default_rng(int(i)).normal(scale=image.std(), size=image.shape)
    after, _ = train()
    for name, x in before[0].items():
        assert torch.equal(x, after[0][name]), name  # half 1: bit for bit the same
    m2, m2_noise = before[1]["means_A"], after[1]["means_A"]
    assert m2.shape != m2_noise.shape or not torch.allclose(m2, m2_noise)  # half 2 did change


def test_stop_when_ends_the_run_at_that_evaluation_and_checkpoints_it(tiny, tmp_path):
    p, truth = tiny
    cfg = TrainConfig(n_gaussians=40, epochs=2, eval_every=3, checkpoint_every=1000, seed=4,
                      densify=False)
    half = assign_half_sets(p, 0)
    seen = []

    def stop_when(row):
        seen.append(row["step"])
        return row["step"] >= 6

    ckpt = tmp_path / "checkpoint.pt"
    trainers, history, trace = train_gold_standard(p, half, cfg, torch.device("cpu"), truth=truth,
                                                   checkpoint_path=ckpt, stop_when=stop_when)
    assert seen == [3, 6]  # asked after each evaluation, and not after the stop
    assert [h["step"] for h in history] == [3, 6]  # no extra evaluation after the stop
    assert [t.step for t in trainers] == [6, 6] and len(trace) == 6
    assert load_checkpoint(ckpt)["halves"][0]["step"] == 6  # the stopped state is saved
    assert total_steps(half, cfg) > 6  # the run was meant to go on


def test_cli_reconstruct_writes_every_output_and_resumes(tmp_path):
    import json
    import subprocess
    import sys

    import mrcfile

    def run(*args):
        return subprocess.run([sys.executable, "-m", "cryosplat", *map(str, args)],
                              capture_output=True, text=True)

    r = run("simulate", "--out", tmp_path / "sim", "--particles", 160, "--box", 24,
            "--pixel-size", 4.0, "--snr", 1.0)
    assert r.returncode == 0, r.stderr
    args = ["reconstruct", tmp_path / "sim" / "particles.star", "--out", tmp_path / "rec",
            "--objective", "images", "--gaussians", 40, "--epochs", 2, "--checkpoint-every", 2, "--device", "cpu",
            "--truth", tmp_path / "sim" / "ground_truth.mrc", "--particle-diameter", 70]
    r = run(*args)
    assert r.returncode == 0, r.stderr
    rec = tmp_path / "rec"
    for f in ("map.mrc", "half_map_1.mrc", "half_map_2.mrc", "fsc.csv", "fsc.png", "loss.png",
              "montage.png", "config.json", "log.txt", "summary.json", "report.html",
              "checkpoint.pt", "gaussians_half_1.ply", "gaussians_half_2.pdb",
              "gaussians_half_1.pt"):
        assert (rec / f).stat().st_size > 0, f
    with mrcfile.open(rec / "map.mrc") as m:
        assert m.data.shape == (24, 24, 24) and m.voxel_size.x == pytest.approx(4.0)
        assert np.isfinite(m.data).all()
    s = json.loads((rec / "summary.json").read_text())
    assert s["steps"] == 4 and "map vs truth" in s["resolutions_A"]
    assert json.loads((rec / "config.json").read_text())["train"]["support_radius_A"] == 35
    # cross-validation against the half-sets' direct maps, made first and kept
    assert s["cross_validated_resolution_A"] >= 2 * 4.0
    assert (rec / "backprojection" / "half_map_2.mrc").stat().st_size > 0
    assert "cross-validated" in (rec / "fsc.csv").read_text().splitlines()[0]
    assert "data:image/png;base64" in (rec / "report.html").read_text()
    state = torch.load(rec / "gaussians_half_1.pt", weights_only=True)
    assert state["means_A"].shape == (40, 3)
    # an existing folder is never overwritten without --force
    r = run(*args)
    assert r.returncode == 2 and "--force" in r.stderr
    # resume of a finished run re-writes the outputs from the last checkpoint, same mixture
    before = mrcfile.read(rec / "map.mrc").copy()
    r = run("reconstruct", "--resume", rec)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(mrcfile.read(rec / "map.mrc"), before, atol=1e-6)


def test_densify_and_prune_keep_training_and_resume(tiny, tmp_path):
    p, truth = tiny
    cfg = TrainConfig(n_gaussians=80, epochs=3, eval_every=1000, checkpoint_every=5, seed=4,
                      densify=True, densify_every=3, densify_until=0.8, densify_fraction=0.2,
                      max_gaussians=150)
    half = assign_half_sets(p, 0)
    ref, _, trace = train_gold_standard(p, half, cfg, torch.device("cpu"))
    for t in ref:
        assert 80 < len(t.model) <= 150  # grew, within the cap
        assert torch.isfinite(t.volume()).all()
    assert trace[-1][1] < trace[0][1]
    # a densified run resumes to the same mixture
    _, resumed, _ = interrupt_and_resume(p, half, cfg, tmp_path / "c.pt", 7)
    for a, b in zip(ref, resumed):
        assert len(a.model) == len(b.model)
        assert torch.allclose(a.model.means_A, b.model.means_A, atol=1e-4)


def test_support_sphere_replaces_gaussians_that_leave_it(tiny):
    """``support_radius_A``: a Gaussian whose centre leaves the sphere is removed and an
    in-support one split, so a fixed count holds and every centre ends inside; mass moved
    outside by hand is taken back within one round."""
    from cryosplat.train import HalfSetTrainer

    p, _ = tiny
    half = assign_half_sets(p, 0)
    radius = 20.0  # Å; the box is 96 Å wide, the random start fills a 28.8 Å ball without it
    cfg = TrainConfig(n_gaussians=60, epochs=2, eval_every=1000, checkpoint_every=1000,
                      seed=3, support_radius_A=radius, densify_every=2, densify=False)
    t = HalfSetTrainer(p, np.nonzero(half == 1)[0], cfg, 1, 20, torch.device("cpu"))
    assert t.model.means_A.norm(dim=-1).max() <= radius  # starts inside the support
    for _ in range(4):
        t.train_step()
    with torch.no_grad():  # throw five Gaussians far out, as floaters
        t.model.means_A[:5] = torch.tensor([40.0, 0.0, 0.0])
    r = t.model.means_A.detach().norm(dim=-1)
    outside = int((r > radius).sum())  # the five, and any split child drawn past the edge
    assert outside >= 5
    inside_before = t.model.means_A.detach()[r <= radius].clone()
    split, removed = t.densify_and_prune()
    assert (split, removed) == (outside, outside)
    assert len(t.model) == 60
    r = t.model.means_A.detach().norm(dim=-1)
    assert r.max() <= radius + 4 * t.model.scales_A.max()  # children are drawn near parents
    assert (r > 39).sum() == 0
    # the survivors that were not split are kept as they were, first and in order
    kept = t.model.means_A.detach()[:60 - 2 * split]
    assert all(torch.isclose(inside_before, k).all(-1).any() for k in kept)
    # without a support, nothing is removed and a fixed count skips the round
    free = TrainConfig(n_gaussians=60, epochs=2, seed=3, densify=False)
    u = HalfSetTrainer(p, np.nonzero(half == 1)[0], free, 1, 20, torch.device("cpu"))
    with torch.no_grad():
        u.model.means_A[:5] = torch.tensor([40.0, 0.0, 0.0])
    assert u.densify_and_prune() == (0, 0) and len(u.model) == 60
