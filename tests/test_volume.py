"""The accumulated-sums objective, seeding from a half-set's own map, the held-out stopping
rule, and the volume fit end to end (train/volume.py, train/seeding.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryosplat.backproject import direct_maps, insert_particles, invert
from cryosplat.evaluate import fsc
from cryosplat.fourier import rfft_radius_3d
from cryosplat.fourier_slice import PaddedGrid
from cryosplat.io import assign_half_sets, read_particles, read_volume
from cryosplat.simulate import SimulationConfig, simulate_dataset
from cryosplat.train import TrainConfig
from cryosplat.train.seeding import own_support, seed_mixture
from cryosplat.train.volume import (
    AccumulatedObjective,
    fit_gold_standard_volume,
    make_fits,
    split_held_out,
)


def _data(tmp_path_factory, name, **kw):
    d = tmp_path_factory.mktemp(name)
    sim = simulate_dataset(None, d, SimulationConfig(**kw))
    truth, _ = read_volume(sim["ground_truth"])
    return read_particles(sim["particles"]), torch.from_numpy(truth)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """600 particles at SNR 10: the objective's minimum must sit on the truth."""
    return _data(tmp_path_factory, "clean", n_particles=600, box_size=32, pixel_size_A=3.0,
                 snr=10.0, seed=3)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """600 particles at SNR 0.05: where a prior must beat direct inversion."""
    return _data(tmp_path_factory, "noisy", n_particles=600, box_size=32, pixel_size_A=3.0,
                 snr=0.05, seed=4)


def _shift(volume: torch.Tensor, shift_vox: tuple[float, float, float]) -> torch.Tensor:
    """``volume`` `(D, D, D)` [z, y, x] moved by ``shift_vox`` (x, y, z) voxels (Fourier)."""
    d = volume.shape[0]
    k = torch.fft.fftfreq(d, dtype=torch.float64)
    kx = torch.fft.rfftfreq(d, dtype=torch.float64)
    sx, sy, sz = shift_vox
    phase = torch.exp(-2j * math.pi * (sz * k[:, None, None] + sy * k[None, :, None]
                                       + sx * kx[None, None, :]))
    return torch.fft.irfftn(torch.fft.rfftn(volume.double()) * phase, s=volume.shape).float()


def test_the_objective_is_least_at_the_truth_not_half_a_voxel_off(clean):
    """A half-voxel error in where the model's voxels land on the padded grid, a transposed
    axis or a conjugated phase would move the minimum off the truth along some axis."""
    p, truth = clean
    obj = AccumulatedObjective(insert_particles(p, np.arange(len(p))))
    losses = {}
    for axis in range(3):
        for s in (-1.0, -0.5, 0.0, 0.5, 1.0):
            v = [0.0, 0.0, 0.0]
            v[axis] = s
            losses[axis, s] = float(obj(obj.transform(_shift(truth, tuple(v)))))
    for axis in range(3):
        row = [losses[axis, s] for s in (-1.0, -0.5, 0.0, 0.5, 1.0)]
        assert int(np.argmin(row)) == 2, (axis, row)
        gain = row[1] - row[2]
        assert gain > 0 and abs(row[3] - row[1]) < 0.2 * gain, (axis, row)  # symmetric


def test_the_objectives_best_scale_of_the_truth_is_the_unregularised_direct_maps(clean):
    """The objective is the quadratic that direct inversion solves voxel by voxel: its
    least-squares scale of the truth equals the unregularised direct map's regression on the
    truth, and both are the simulation's (1)."""
    p, truth = clean
    ins = insert_particles(p, np.arange(len(p)))
    obj = AccumulatedObjective(ins)
    t = obj.transform(truth)
    cross = ((obj.numerator.real * t.real + obj.numerator.imag * t.imag) * obj.hermitian).sum()
    power = (obj.denominator * t.abs() ** 2 * obj.hermitian).sum()
    scale = float(cross / power)
    direct = invert(ins, 1e-3 * float(ins.denominator.mean()))
    inside = rfft_radius_3d(32) < 0.45  # what slices reach (the truth has more beyond)
    fd, ft = torch.fft.rfftn(direct)[inside], torch.fft.rfftn(truth)[inside]
    regression = float((fd * ft.conj()).real.sum() / (ft.abs() ** 2).sum())
    assert scale == pytest.approx(regression, abs=0.03), (scale, regression)
    assert scale == pytest.approx(1.0, abs=0.03)


def test_own_support_holds_the_molecule_and_the_seeds_lie_in_it(clean):
    p, truth = clean
    half = assign_half_sets(p, 0)
    ins = insert_particles(p, np.nonzero(half == 1)[0])
    s = own_support(ins, 3.0)
    mask = s.mask.float()
    molecule = truth > 0.05 * truth.max()
    assert float(mask[molecule].mean()) > 0.95  # the molecule's voxels are in the support
    assert 0.01 < float(mask.mean()) < 0.5  # the molecule, not the box
    g = seed_mixture(s, 3.0, 0.3, 1.0, 10_000, torch.Generator().manual_seed(0))
    assert len(g) == max(100, round(0.3 * int(s.mask.sum())))
    idx = torch.round(g.means_A.detach() / 3.0).long() + 16  # xyz voxel of each centre
    assert s.mask[idx[:, 2], idx[:, 1], idx[:, 0]].all()
    mass = float((s.own_map.clamp_min(0) * s.mask).sum()) * 27.0
    assert float(g.amplitudes.detach().sum()) == pytest.approx(mass, rel=1e-4)


def test_held_out_particles_are_a_seeded_share_of_the_half_set():
    idx = np.arange(100, 300)
    train, held = split_held_out(idx, 0.05, seed=2, half=1)
    assert len(held) == 10 and len(train) == 190
    assert set(train) | set(held) == set(idx) and not set(train) & set(held)
    assert np.array_equal(held, split_held_out(idx, 0.05, seed=2, half=1)[1])
    assert not np.array_equal(held, split_held_out(idx, 0.05, seed=2, half=2)[1])
    assert len(split_held_out(idx, 0.0, seed=2, half=1)[1]) == 0


def test_the_stopping_rule_cuts_the_rate_then_stops_and_keeps_the_best(clean):
    p, _ = clean
    cfg = TrainConfig(patience=3, lr_cuts=2, lr_cut_factor=0.5, stop_tolerance=0.01)
    ins = insert_particles(p, np.arange(40))
    fit = make_fits([(ins, None), (ins, None)], cfg, 3.0, torch.device("cpu"))[0]
    first = {k: v.clone() for k, v in fit.model.state_dict().items()}
    fit._watch(10.0)  # the best: the current parameters are kept
    with torch.no_grad():
        fit.model.means_A += 1.0
    for value in (10.0, 10.5, 11.0):  # no gain for `patience` steps
        fit._watch(value)
    assert fit.cuts == 1 and fit.lr_factor == 0.5 and not fit.done
    assert torch.equal(fit.model.means_A, first["means_A"])  # back to the best
    for value in (9.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0):  # gains, then 2 x patience flat
        fit._watch(value)
    assert fit.done and fit.cuts == 2 and "converged" in fit.stop_reason
    assert fit.best == 8.0 and "kept step" in fit.stop_reason


def test_volume_fit_beats_direct_inversion_at_low_snr_and_keeps_halves_apart(noisy, tmp_path):
    """Seeded in its own map and stopped on its own held-out particles, each half-set's
    mixture ends nearer the truth than direct inversion of the same particles; and half-set
    1's fit does not change when half-set 2's sums do."""
    p, truth = noisy
    cfg = TrainConfig(max_steps=60, eval_every=1000, checkpoint_every=1000, seed=1)
    half = assign_half_sets(p, 0)
    sets = [split_held_out(np.nonzero(half == h)[0], cfg.holdout_fraction, cfg.seed, h)
            for h in (1, 2)]
    ins = [(insert_particles(p, tr), insert_particles(p, ho)) for tr, ho in sets]
    fits = make_fits(ins, cfg, 3.0, torch.device("cpu"), out=tmp_path)
    assert (tmp_path / "support_half_2.mrc").is_file()
    history, trace = fit_gold_standard_volume(fits, cfg, truth=truth, log=lambda m: None)
    full = [insert_particles(p, np.nonzero(half == h)[0]) for h in (1, 2)]
    direct = direct_maps(*full).map
    gauss = (fits[0].volume() + fits[1].volume()) / 2
    f_gauss, f_direct = fsc(gauss, truth)[1:16], fsc(direct, truth)[1:16]
    assert float(f_gauss.mean()) > float(f_direct.mean()) + 0.05, (f_gauss, f_direct)
    assert all(f.done for f in fits) and history[-1]["step"] == max(f.step for f in fits)
    # half 1 again, with half 2's sums replaced: bit for bit the same mixture
    ins[1][0].numerator.mul_(0.5)
    again = make_fits(ins, cfg, 3.0, torch.device("cpu"))
    fit_gold_standard_volume(again, cfg, log=lambda m: None)
    for name, x in fits[0].model.state_dict().items():
        assert torch.equal(x, again[0].model.state_dict()[name]), name


def test_cli_volume_run_writes_its_outputs_says_why_it_stopped_and_resumes(tmp_path):
    import json

    import mrcfile
    from test_reliability import cli as run

    r = run("simulate", "--out", tmp_path / "sim", "--particles", 200, "--box", 24,
            "--pixel-size", 4.0, "--snr", 0.5)
    assert r.returncode == 0, r.stderr
    rec = tmp_path / "rec"
    r = run("reconstruct", tmp_path / "sim" / "particles.star", "--out", rec, "--max-steps", 12,
            "--checkpoint-every", 5, "--truth", tmp_path / "sim" / "ground_truth.mrc")
    assert r.returncode == 0, r.stderr
    for f in ("map.mrc", "support_half_1.mrc", "support_half_2.mrc", "checkpoint.pt",
              "gaussians_half_2.ply", "report.html", "backprojection/half_map_1.mrc"):
        assert (rec / f).stat().st_size > 0, f
    s = json.loads((rec / "summary.json").read_text())
    assert s["objective"] == "volume" and len(s["stopped"]) == 2
    assert all(("max-steps 12" in w or "converged" in w) and "kept step" in w
               for w in s["stopped"])
    log = (rec / "log.txt").read_text()
    assert "own support" in log and "held out" in log
    # post-processed by default: shells 10-12 (9.6 to 8 Å) carry the B-factor fit
    assert s["postprocess"]["bfactor_A2"] == s["postprocess"]["bfactor_A2"]  # a number
    assert (rec / "postprocess" / "postprocess.mrc").stat().st_size > 0
    assert "post-processed" in r.stdout and "<h2>Post-processing</h2>" in (
        rec / "report.html").read_text()
    before = mrcfile.read(rec / "map.mrc").copy()
    r = run("reconstruct", "--resume", rec)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(mrcfile.read(rec / "map.mrc"), before, atol=1e-6)


@pytest.mark.parametrize("where", ["training", "output"])
def test_nan_in_a_volume_fit_stops_the_run_naming_the_stage(tmp_path, capsys, monkeypatch,
                                                            where):
    from test_bad_input import run_cli

    import cryosplat.train.volume as vol

    sim = simulate_dataset(None, tmp_path / "sim", SimulationConfig(
        n_particles=120, box_size=24, pixel_size_A=4.0, snr=1.0, seed=2))
    if where == "training":
        real = vol.HalfSetVolumeFit._voxelise
        monkeypatch.setattr(vol.HalfSetVolumeFit, "_voxelise",
                            lambda self: real(self) * (float("nan") if self.step >= 2 else 1.0))
    else:
        monkeypatch.setattr(vol.HalfSetVolumeFit, "volume",
                            lambda self: torch.full((self.d,) * 3, float("nan")))
    out = tmp_path / "run"
    code = run_cli("reconstruct", sim["particles"], "--out", out, "--max-steps", 4,
                   "--no-validate", "--device", "cpu")
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"error: {where} stage:" in err
    assert not (out / "map.mrc").exists()


@pytest.mark.parametrize("box", [15, 16])
@pytest.mark.parametrize("gridding", [1, -1])
def test_the_axis_by_axis_padded_transform_is_the_padded_rfftn(box, gridding):
    """The model's transform equals the plain route: the gridding function (sinc² of the
    padded box, to the power +1 for the objective, -1 for slice extraction), zero-pad with
    voxel D//2 at the padded origin, rfftn of the whole padded box, fftshift along z and y."""
    p = 2 * box
    grid = PaddedGrid(box, p)
    vol = torch.randn(box, box, box, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    k = (torch.arange(box) - box // 2) % p
    s = torch.sinc(torch.fft.fftfreq(p, dtype=torch.float64)[k]) ** (2 * gridding)
    pad = torch.zeros(p, p, p, dtype=torch.float64)
    pad[k[:, None, None], k[None, :, None], k[None, None, :]] = (
        vol * s[:, None, None] * s[None, :, None] * s[None, None, :])
    expected = torch.fft.fftshift(torch.fft.rfftn(pad), dim=(0, 1))
    torch.testing.assert_close(grid.transform(vol, gridding), expected, rtol=1e-9, atol=1e-9)


def test_a_random_start_is_calibrated_on_its_own_sums_and_then_fits(clean):
    p, _ = clean
    cfg = TrainConfig(init="random", n_gaussians=60, holdout_fraction=0.0)
    ins = insert_particles(p, np.arange(200))
    fit = make_fits([(ins, None), (ins, None)], cfg, 3.0, torch.device("cpu"))[0]
    with torch.no_grad():  # calibrated: scaling the amplitudes either way only raises the loss
        base = float(fit.objective(fit.objective.transform(fit._voxelise())))
        for factor in (0.8, 1.25):
            fit.model.scale_amplitudes(factor)
            assert float(fit.objective(fit.objective.transform(fit._voxelise()))) > base
            fit.model.scale_amplitudes(1 / factor)
    losses = [fit.train_step()[0] for _ in range(15)]
    assert losses[-1] < losses[0]
