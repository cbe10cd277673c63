"""``cryosplat abinitio``: the global search's grid, score and recovery of known poses
(refine/global_search.py), the hand flip, the tempered posterior, and the command end to end
on a simulation whose poses it never reads (abinitio/)."""

from __future__ import annotations

import json
import math

import pytest
import starfile
import torch
from conftest import make_truth, random_images, run_cli, write_stack
from typer.testing import CliRunner

from cryosplat import geometry
from cryosplat.abinitio.config import AbinitioConfig
from cryosplat.cli import app
from cryosplat.ctf import CTFParams, transfer_rfft
from cryosplat.errors import InputError
from cryosplat.fourier_slice import PaddedGrid, as_sampled
from cryosplat.gaussians import GaussianMixture
from cryosplat.io import read_particles
from cryosplat.refine.global_search import (
    global_search,
    local_search,
    origin_grid,
    profiled_scores,
    so3_grid,
    so3_grid_size,
    tempered_weights,
)
from cryosplat.refine.search import alignment_points
from cryosplat.refine.working import Searcher, WorkingSet
from cryosplat.simulate import SimulationConfig, simulate_dataset
from cryosplat.summary import AbinitioSummary


def _angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Every rotation angle between rows of ``a`` `(n, 3, 3)` and ``b`` `(m, 3, 3)`, °."""
    tr = torch.einsum("aij,bij->ab", a.double(), b.double())
    return torch.rad2deg(torch.acos(((tr - 1) / 2).clamp(-1, 1)))


def test_so3_grid_covers_the_rotations_evenly():
    step = 20.0
    grid = so3_grid(so3_grid_size(step), dtype=torch.float64)
    assert torch.allclose(grid @ grid.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(
        len(grid), 3, 3), atol=1e-12) and bool((torch.linalg.det(grid) > 0).all())
    # Haar-uniform rotations average to the zero matrix; 3551 random ones would to about 0.01
    assert grid.mean(0).abs().max() < 0.01
    probes = geometry.random_rotations(3000, torch.Generator().manual_seed(0))
    nearest = _angles(probes, grid).min(1).values
    # measured: median 8.3°, max 13.4° for a 20° grid; a grid twice as sparse would miss these
    assert float(nearest.max()) < 0.75 * step and float(nearest.median()) < 0.5 * step


def test_origin_grid_is_a_disc_centre_first():
    o = origin_grid(3.0, 1.5)
    assert torch.equal(o[0], torch.zeros(2)) and len(o) == 13  # 0; 4 at 1.5, 4 at 2.12, 4 at 3 Å
    assert float(o.norm(dim=-1).max()) <= 3.0 + 1e-6


def test_profiled_score_is_the_likelihood_maximised_over_contrast():
    g = torch.Generator().manual_seed(1)
    b, s, r, k = 3, 4, 5, 7
    slices = torch.randn(r, k, dtype=torch.complex128, generator=g)
    data = torch.randn(b, s, k, dtype=torch.complex128, generator=g)
    pw = torch.rand(b, k, dtype=torch.float64, generator=g) + 0.1
    score, contrast = profiled_scores(slices, data, pw)
    alphas = torch.linspace(0, 5, 50001, dtype=torch.float64)
    for i, j, m in ((0, 0, 0), (1, 2, 3), (2, 3, 4)):
        x = float((slices[m].conj() * data[i, j]).real.sum())
        p = float((pw[i] * slices[m].abs() ** 2).sum())
        brute = (alphas * x - alphas**2 * p / 2).max()  # the log-likelihood up to a constant
        assert float(score[i, j, m]) == pytest.approx(float(brute), abs=1e-6)
        assert float(contrast[i, j, m]) == pytest.approx(max(x, 0) / p, rel=1e-9)


def _molecule() -> GaussianMixture:
    """An asymmetric test molecule: 12 Gaussians in a 30 Å ball."""
    return GaussianMixture.random(12, 15.0, 3.0, generator=torch.Generator().manual_seed(3),
                                  dtype=torch.float64)


def _rendered_particles(d: int, pix: float, n: int):
    """``n`` CTF-modulated particles rendered by the real-space splatting renderer (not
    through the Fourier slice), shifted by -origin, as the particles are read: (truth
    rotations, origins Å, rfft2 `(n, d, d//2+1)`, CTF parameters, their transfer, the
    mixture's sampled transform)."""
    mol = _molecule()
    truth = geometry.random_rotations(n, torch.Generator().manual_seed(4))
    origins = torch.tensor([[1.3, -2.1], [0.0, 0.0], [-3.0, 1.0], [2.2, 2.2], [-0.7, 0.4],
                            [3.1, -0.9]], dtype=torch.float64)
    image = torch.fft.irfft2(mol.render_rfft(truth, d, pix), s=(d, d))  # centre at pixel D//2
    f = torch.fft.rfft2(torch.fft.ifftshift(image, dim=(-2, -1)))  # as the particles are read
    f = geometry.translate_rfft(f, -origins, pix, d)
    ctf = CTFParams(**{k: torch.full((n,), v, dtype=torch.float64) for k, v in dict(
        defocus_u_A=15000.0, defocus_v_A=14000.0, defocus_angle_deg=30.0, voltage_kV=300.0,
        cs_mm=2.7, amplitude_contrast=0.1, phase_shift_deg=0.0, bfactor_A2=0.0,
        scale=1.0).items()})
    c = transfer_rfft(ctf, d, pix)
    images = (f * c).to(torch.complex64).detach()
    with torch.no_grad():
        vol = mol.voxelise(d, pix, n_sigma=4.0).float()
    sampled = as_sampled(PaddedGrid(d, 2 * d).transform(vol, -1))
    return truth, origins, images, ctf, c, sampled


def test_global_search_finds_poses_of_images_made_by_the_renderer():
    """Rendered particles (:func:`_rendered_particles`) are found by the global search to
    within the local search's last step, in rotation and origin."""
    d, pix, n = 32, 2.0, 6
    truth, origins, images, _, c, sampled = _rendered_particles(d, pix, n)
    pts = alignment_points(d, d // 2 - 2)
    data = images.reshape(n, -1)[:, pts.flat]
    cp = c.reshape(n, -1)[:, pts.flat].float()
    grid = so3_grid(so3_grid_size(15.0))
    hits = global_search(sampled, grid, origin_grid(4.0, 2.0), data, cp, pts, pts.weight, pix, 4)
    hits = local_search(sampled, hits, data, cp, pts, pts.weight, pix, 15.0, 2.0, 4, 4.0)
    err = geometry.rotation_angle_deg(hits.rotations[:, 0].double(), truth)
    assert float(err.max()) < 2.0, err  # the last local step is 15/16 = 0.94°
    shift = (hits.origins_A[:, 0].double() - origins).norm(dim=-1)
    assert float(shift.max()) < 0.5, shift
    # one contrast for all (rendered alike; its value is in the model's units: the voxelised
    # map is per Å³, a projection per Å², so here it is the pixel size, 2)
    c0 = hits.contrast[:, 0]
    assert float((c0 / c0.mean() - 1).abs().max()) < 0.02, c0


def test_grid_scored_coarser_than_the_local_search_still_finds_the_poses():
    """``Searcher.search`` with ``grid_shell`` of the default diameter (70% of the 64 Å box:
    a 15° step spans 5.9 Å at its radius, 11 shells), the local search within 14 (4.6 Å),
    finds the poses as the full-limit search does, and the scores it returns are the full
    limit's (scored again)."""
    d, pix, n = 32, 2.0, 6
    truth, origins, images, ctf, c, sampled = _rendered_particles(d, pix, n)
    power = torch.ones(d // 2 + 1)
    ws = WorkingSet(images, ctf.to(None, torch.float32), pix, d, power)
    searcher = Searcher(ws, 15.0, 4.0, 4, torch.device("cpu"))
    idx = torch.arange(n)
    shell = d // 2 - 2
    grid_shell = searcher.grid_shell(0.7 * d * pix)
    assert grid_shell == round(d * pix / math.radians(15.0) / (0.35 * d * pix)) == 11
    hits = searcher.search(sampled, idx, shell, 4, grid_shell)
    err = geometry.rotation_angle_deg(hits.rotations[:, 0].double(), truth)
    assert float(err.max()) < 2.0, err
    assert float((hits.origins_A[:, 0].double() - origins).norm(dim=-1).max()) < 0.5
    pts, weight = searcher.points(shell)
    data = images.reshape(n, -1)[:, pts.flat]
    cp = c.reshape(n, -1)[:, pts.flat].float()
    again = local_search(sampled, hits, data, cp, pts, weight, pix, 1e-6, 1e-6, 1, 4.0)
    # a search of steps 1e-6 from the hits at the full limit moves nothing and scores the same
    assert torch.allclose(again.score[:, 0], hits.score[:, 0], rtol=1e-4)


def test_tempered_weights_spread_as_asked():
    score = torch.tensor([[100.0, 90.0, 80.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    w = tempered_weights(score, 3.0)
    assert torch.allclose(w.sum(1), torch.ones(2))
    entropy = (-(w * w.clamp_min(1e-30).log()).sum(1)).exp()  # candidates spread over
    assert float(entropy[0]) == pytest.approx(3.0, rel=1e-3)  # heated to spread over 3
    assert torch.allclose(w[1], torch.full((4,), 0.25))  # already spread: T = 1
    sharp = tempered_weights(score, 1.0)  # the exact posterior at T = 1
    assert torch.allclose(sharp[0], torch.softmax(score[0], 0))


def test_mirrored_map_and_poses_give_the_same_projections():
    """--flip-hand: the mirror image at F A F projects as the original at A (the renderer);
    and it is a different map (a pose of the original cannot make it)."""
    mol = _molecule()
    a = geometry.random_rotations(5, torch.Generator().manual_seed(7))
    mirror = mol.mirrored()
    assert torch.allclose(mirror.render_rfft(geometry.mirrored_rotations(a), 32, 2.0),
                          mol.render_rfft(a, 32, 2.0), atol=1e-8)
    assert not torch.allclose(mirror.render_rfft(a, 32, 2.0), mol.render_rfft(a, 32, 2.0),
                              atol=1e-3)
    assert torch.allclose(mirror.means_A[:, 2], -mol.means_A[:, 2])


def _aligned_errors(truth: torch.Tensor, est: torch.Tensor) -> torch.Tensor:
    """Angles between the estimated and true poses after the best global rotation (and hand):
    ``est = truth Q`` for one Q."""
    best = None
    for cand in (est, geometry.mirrored_rotations(est)):
        u, _, vh = torch.linalg.svd((truth.transpose(1, 2) @ cand).sum(0))
        q = u @ torch.diag(torch.tensor([1.0, 1.0, float(torch.det(u @ vh))],
                                        dtype=torch.float64)) @ vh
        err = geometry.rotation_angle_deg(truth @ q, cand)
        if best is None or err.median() < best.median():
            best = err
    assert best is not None
    return best


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    d = tmp_path_factory.mktemp("abinitio")
    return simulate_dataset(None, d, SimulationConfig(n_particles=800, box_size=48,
                                                      pixel_size_A=2.4, snr=0.2, seed=11))


def test_abinitio_finds_the_poses_it_never_read(sim, tmp_path):
    out = tmp_path / "ab"
    r = CliRunner().invoke(app, ["abinitio", str(sim["particles"]), "--out", str(out),
                                 "--iterations", "30", "--batch", "200", "--final-resolution",
                                 "14", "--gaussians", "400", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "poses in the input file were ignored" in r.output and "hand is undetermined" in r.output
    s = AbinitioSummary.read(out / "summary.json")
    assert s.poses_in_file_ignored and len(s.history) == 30 and s.search_rate > 0
    for name in ("initial_model.mrc", "gaussians.ply", "particles.star", "report.html",
                 "orientations.png", "abinitio.png", "map_views.png"):
        assert (out / name).is_file(), name
    est = read_particles(out / "particles.star")
    assert est.read_images([0]).shape == (1, 48, 48)  # the stack is found from the new folder
    truth = read_particles(sim["particles"])
    err = _aligned_errors(truth.rotations, est.rotations)
    # a pose at random would be 126° off in the median; 14 Å on a 40 Å-wide molecule: ~ 10°
    assert float(err.median()) < 10.0, float(err.median())
    halves = starfile.read(out / "particles.star")["particles"]["rlnRandomSubset"]
    assert set(halves) == {1, 2}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["abinitio"]["iterations"] == 30

    # --resume after the last minibatch: the checkpoint holds it, nothing is searched again
    r2 = CliRunner().invoke(app, ["abinitio", "--resume", str(out)])
    assert r2.exit_code == 0, r2.output
    again = read_particles(out / "particles.star")
    assert float(_aligned_errors(truth.rotations, again.rotations).median()) < 10.0


@pytest.mark.parametrize("options, message", [
    (["--final-resolution", "3"], "Nyquist"),
    (["--final-resolution", "20"], "fewer than 8 shells"),
    (["--sym", "X7"], "X7"),
    (["--final-resolution", "40", "--initial-resolution", "30"], "coarser"),
    (["--iterations", "0"], "--iterations 0"),
])
def test_abinitio_refuses_what_cannot_work(sim, tmp_path, capsys, options, message):
    out = tmp_path / "a"
    assert run_cli("abinitio", sim["particles"], "--out", out, *options) != 0
    assert message in capsys.readouterr().err and not out.exists()


def test_abinitio_refuses_particles_without_ctf(tmp_path, capsys):
    t = make_truth(4, 16)
    stack = write_stack(tmp_path / "p.mrcs", random_images(t))
    assert run_cli("abinitio", stack, "--out", tmp_path / "o", "--pixel-size", "2") != 0
    assert "CTF" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("field", ["iterations", "batch_size", "candidates", "n_gaussians"])
def test_abinitio_config_refuses_non_positive_settings(field):
    with pytest.raises(InputError, match="expected a positive value"):
        AbinitioConfig(**{field: 0})
