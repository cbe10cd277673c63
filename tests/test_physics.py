"""Simulator, direct Fourier inversion and FSC on small boxes."""

from __future__ import annotations

import json
import subprocess
import sys

import mrcfile
import numpy as np
import pytest
import torch

from cryosplat import geometry
from cryosplat.backproject import backproject
from cryosplat.evaluate import (
    auto_mask,
    fsc,
    fsc_curves,
    phase_randomised_correction,
    resolution_A,
    spherical_mask,
)
from cryosplat.fourier import shell_voxel_counts
from cryosplat.gaussians import voxelise, voxelise_dense
from cryosplat.io import read_particles
from cryosplat.simulate import (
    SimulationConfig,
    atomic_potential_gaussians,
    builtin_structure,
    simulate_dataset,
    structure_to_map,
)


def test_windowed_voxeliser_equals_dense_and_conserves_mass():
    g = torch.Generator().manual_seed(0)
    m = 20
    means = (torch.rand(m, 3, generator=g, dtype=torch.float64) - 0.5) * 20
    a = torch.randn(m, 3, 3, generator=g, dtype=torch.float64) * 0.6
    cov = a @ a.transpose(-1, -2) + 1.5 * torch.eye(3, dtype=torch.float64)
    amp = torch.rand(m, generator=g, dtype=torch.float64) + 0.5
    for d in (31, 32):
        w = voxelise(means, cov, amp, d, 1.2, n_sigma=5.0)
        ref = voxelise_dense(means, cov, amp, d, 1.2)
        assert (w - ref).abs().max() < 1e-5 * ref.abs().max()
        assert float(w.sum() * 1.2**3) == pytest.approx(float(amp.sum()), rel=1e-3)


def test_atomic_potential_is_centred_and_has_the_elements_mass():
    means, var, amp, centre = atomic_potential_gaussians(builtin_structure())
    assert means.shape[0] == 3341 * 5
    np.testing.assert_allclose(means.mean(0).numpy(), 0, atol=1e-9)
    assert (var > 0).all()
    # carbon's c4322 a_i sum to f_e(0) = 2.5088 Å; 4AKE's 3341 atoms weigh a few thousand
    assert 2000 < float(amp.sum()) < 10000


def test_noiseless_backprojection_recovers_the_map(tmp_path):
    cfg = SimulationConfig(n_particles=1500, box_size=32, pixel_size_A=3.0, snr=1e8,
                           max_shift_A=4.0, astigmatism_um=0.1, seed=3)
    sim = simulate_dataset(None, tmp_path, cfg)
    p = read_particles(sim["particles"])
    truth = torch.from_numpy(mrcfile.read(sim["ground_truth"]).copy())
    b = backproject(p, p.half_set.numpy())
    curve = fsc(b.map, truth).numpy()
    shells = np.arange(len(curve))
    assert curve[shells <= 0.8 * (cfg.box_size // 2)].min() > 0.9


def test_shifts_and_astigmatism_round_trip(tmp_path):
    """The same resolution with and without shifts and astigmatism: conventions agree."""
    res = []
    for shift, astig in ((0.0, 0.0), (6.0, 0.3)):
        cfg = SimulationConfig(n_particles=1200, box_size=32, pixel_size_A=3.0, snr=0.5,
                               max_shift_A=shift, astigmatism_um=astig, seed=5)
        sim = simulate_dataset(None, tmp_path / f"s{shift}", cfg)
        p = read_particles(sim["particles"])
        truth = torch.from_numpy(mrcfile.read(sim["ground_truth"]).copy())
        b = backproject(p, p.half_set.numpy())
        res.append(resolution_A(fsc(b.map, truth), 32, 3.0))
    assert abs(1 / res[0] - 1 / res[1]) <= 2 / (32 * 3.0)  # within two Fourier shells
    # a wrong shift sign would ruin it: flip the origins and the map degrades
    p.shifts_A = -p.shifts_A
    bad = backproject(p, p.half_set.numpy())
    assert resolution_A(fsc(bad.map, truth), 32, 3.0) > res[1] + 3.0


def test_fsc_of_a_map_with_itself_is_one_and_with_noise_about_zero():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(32, 32, 32, generator=g)
    b = torch.randn(32, 32, 32, generator=g)
    assert torch.allclose(fsc(a, a)[1:], torch.ones(16), atol=1e-5)
    r = torch.arange(2, 17, dtype=torch.float32)
    # independent noise: |FSC| within 4 standard errors, 1/sqrt(voxels in the shell ~ 4 pi r^2)
    assert (fsc(a, b)[2:].abs() < 4 / torch.sqrt(4 * torch.pi * r**2)).all()


@pytest.mark.parametrize("box", [17, 32])
def test_fsc_equals_torch_fourier_shell_correlation(box):
    """The one-pass FSC gives the library's curve (its shell weights, its last shell, its
    shell 0) on correlated maps of odd and even boxes."""
    from torch_fourier_shell_correlation import fsc as library_fsc

    g = torch.Generator().manual_seed(box)
    a = torch.randn(box, box, box, generator=g, dtype=torch.float64)
    b = a + 2 * torch.randn(box, box, box, generator=g, dtype=torch.float64)
    ours = fsc(a, b).double()
    theirs = library_fsc(a, b).real
    assert ours.shape == theirs.shape == (box // 2 + 1,)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert 0.2 < float(ours[1:].mean()) < 0.6  # correlated: the check is not of zeros


def test_resolution_interpolates_the_crossing():
    curve = np.array([1.0, 0.9, 0.5, 0.1, 0.0])  # crosses 0.143 between shells 2 and 3
    f = (2 + (0.5 - 0.143) / 0.4) / (8 * 2.0)
    assert resolution_A(curve, 8, 2.0) == pytest.approx(1 / f)
    assert resolution_A(np.ones(5), 8, 2.0) == 4.0  # never below: Nyquist


def test_simulation_is_deterministic(tmp_path):
    cfg = SimulationConfig(n_particles=40, box_size=32, pixel_size_A=3.0, seed=9, batch_size=16)
    a = simulate_dataset(None, tmp_path / "a", cfg)
    b = simulate_dataset(None, tmp_path / "b", cfg)
    assert np.array_equal(mrcfile.read(a["stack"]), mrcfile.read(b["stack"]))


def test_cli_simulate_backproject_fsc(tmp_path):
    def run(*args):
        r = subprocess.run([sys.executable, "-m", "cryosplat", *map(str, args)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout

    run("simulate", "--out", tmp_path / "sim", "--particles", 300, "--box", 32,
        "--pixel-size", 3.0, "--snr", 1.0)
    run("backproject", tmp_path / "sim" / "particles.star", "--out", tmp_path / "bp",
        "--truth", tmp_path / "sim" / "ground_truth.mrc")
    for f in ("map.mrc", "half_map_1.mrc", "half_map_2.mrc", "fsc.csv", "fsc.png"):
        assert (tmp_path / "bp" / f).stat().st_size > 0
    s = json.loads(run("fsc", tmp_path / "bp" / "map.mrc", "--truth",
                       tmp_path / "sim" / "ground_truth.mrc", "--json"))
    assert 6.0 <= s["resolution_A"]["unmasked"]["0.143"] < 30.0
    assert set(s["fsc"]) == {"unmasked", "spherical mask", "auto-mask", "corrected"}
    summary = json.loads((tmp_path / "bp" / "summary.json").read_text())
    assert summary["resolutions_A"]["map vs truth"]["0.143"] == pytest.approx(
        s["resolution_A"]["unmasked"]["0.143"], rel=1e-4)
    with mrcfile.open(tmp_path / "bp" / "map.mrc") as m:
        assert m.voxel_size.x == pytest.approx(3.0)


@pytest.fixture(scope="module")
def small_truth():
    """The built-in model's potential on a 32³ grid of 3 Å voxels."""
    return structure_to_map(builtin_structure(), 32, 3.0)[0].double()


def test_spherical_mask_is_one_inside_zero_at_the_faces_and_radial():
    m = spherical_mask(32, 2.0)
    assert m[16, 16, 16] == 1 and m[0].max() == 0 and m[:, :, 0].max() == 0
    c = geometry.grid_1d_A(32, 2.0)
    r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    assert (m[r <= 0.8 * 32] == 1).all() and (m[r >= 0.9 * 32] == 0).all()
    edge = (r > 0.8 * 32) & (r < 0.9 * 32)
    assert ((m[edge] > 0) & (m[edge] < 1)).any()


def test_auto_mask_covers_the_density_and_leaves_the_faces(small_truth):
    m = auto_mask(small_truth, 3.0)
    assert (m[small_truth > 0.1 * small_truth.max()] > 0.999).all()
    assert m[[0, -1]].max() == 0 and m[:, [0, -1]].max() == 0 and m[..., [0, -1]].max() == 0
    assert 0.02 < float(m.mean()) < 0.5


def test_phase_randomisation_removes_the_masks_correlation(small_truth):
    """Two maps share only a signal below 0.15 cycles/voxel; beyond it their FSC is truly 0.
    A hard mask correlates the noise beyond it; the corrected curve does not."""
    d = 32
    f = torch.fft.rfftn(small_truth)
    k = torch.sqrt(sum(x**2 for x in torch.meshgrid(torch.fft.fftfreq(d), torch.fft.fftfreq(d),
                                                     torch.fft.rfftfreq(d), indexing="ij")))
    low = torch.fft.irfftn(torch.where(k > 0.15, 0, f), s=small_truth.shape).double()
    g = torch.Generator().manual_seed(0)
    a, b = (low + 0.3 * low.std() * torch.randn(low.shape, generator=g, dtype=torch.float64)
            for _ in range(2))
    mask = auto_mask(small_truth, 3.0, extend_A=0.0, soft_edge_A=0.0).double()
    c = fsc_curves(a, b, 3.0, mask=mask)
    # RELION's rule: the masked curve up to two shells past the first shell where the unmasked
    # FSC falls below 0.8 (shell 6 here), the correction from there on, 0 where the randomised
    # maps correlate more than the maps
    start = int(np.nonzero(c["unmasked"][1:] < 0.8)[0][0]) + 1 + 2
    assert start == 8
    beyond = slice(start, None)
    assert np.abs(c["unmasked"][beyond]).mean() < 0.05
    assert c["mask"][beyond].mean() > 0.3  # the mask's own correlation
    assert np.abs(c["corrected"][beyond]).mean() < 0.1
    np.testing.assert_allclose(c["corrected"][:start], c["mask"][:start])
    assert (c["corrected"][beyond] >= 0).all() and (c["corrected"][beyond] == 0).any()
    # nothing to correct when the unmasked FSC never falls below 0.8
    same = phase_randomised_correction(a, a, mask, fsc(a, a), fsc(a * mask, a * mask))
    assert torch.allclose(same, fsc(a * mask, a * mask))


def test_invert_negates_the_reconstruction(tmp_path):
    cfg = SimulationConfig(n_particles=400, box_size=32, pixel_size_A=3.0, snr=10.0, seed=5)
    sim = simulate_dataset(None, tmp_path, cfg)
    truth = torch.from_numpy(mrcfile.read(sim["ground_truth"]).copy())
    cc = {}
    for inv in (False, True):
        p = read_particles(sim["particles"], invert=inv)
        m = backproject(p, p.half_set.numpy()).map
        cc[inv] = float(torch.corrcoef(torch.stack([m.flatten(), truth.flatten()]))[0, 1])
    assert cc[False] > 0.8 and cc[True] < -0.8


def test_fsc_cli_with_a_mask_and_a_bad_mask(tmp_path, small_truth):
    from cryosplat.io import write_volume

    g = torch.Generator().manual_seed(3)
    a = small_truth + 0.1 * small_truth.std() * torch.randn(small_truth.shape, generator=g,
                                                            dtype=torch.float64)
    write_volume(tmp_path / "a.mrc", a, 3.0)
    write_volume(tmp_path / "t.mrc", small_truth, 3.0)
    write_volume(tmp_path / "m.mrc", spherical_mask(32, 3.0), 3.0)
    write_volume(tmp_path / "bad.mrc", 2 * spherical_mask(32, 3.0), 3.0)
    write_volume(tmp_path / "small.mrc", spherical_mask(24, 3.0), 3.0)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "cryosplat", *map(str, args)],
                              capture_output=True, text=True)

    r = run("fsc", tmp_path / "a.mrc", "--truth", tmp_path / "t.mrc", "--mask", tmp_path / "m.mrc",
            "--json", "--out", tmp_path / "f")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert set(s["fsc"]) == {"unmasked", "spherical mask", "mask", "corrected"}
    # a user mask equal to the spherical one gives the spherical curve
    np.testing.assert_allclose(s["fsc"]["mask"], s["fsc"]["spherical mask"], atol=1e-6)
    assert (tmp_path / "f" / "fsc.png").stat().st_size > 0
    r = run("fsc", tmp_path / "a.mrc", "--truth", tmp_path / "t.mrc", "--mask", tmp_path / "bad.mrc")
    assert r.returncode == 2 and "bad.mrc" in r.stderr and "expected [0, 1]" in r.stderr
    assert "Traceback" not in r.stderr
    r = run("fsc", tmp_path / "a.mrc", tmp_path / "small.mrc")
    assert r.returncode == 2 and "small.mrc" in r.stderr and "expected 32 voxels" in r.stderr


def _band_limited(d: int, seed: int, falloff: float) -> torch.Tensor:
    """A random map whose amplitude falls as exp(-falloff |k|) (k in cycles/voxel)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.fft.fftfreq(d, dtype=torch.float64)
    kz, ky, kx = torch.meshgrid(k, k, torch.fft.rfftfreq(d, dtype=torch.float64), indexing="ij")
    r = torch.sqrt(kz**2 + ky**2 + kx**2)
    spec = torch.complex(torch.randn(r.shape, generator=g, dtype=torch.float64),
                         torch.randn(r.shape, generator=g, dtype=torch.float64))
    return torch.fft.irfftn(spec * torch.exp(-falloff * r), s=(d, d, d))


def test_cross_validated_fsc_sees_shared_bias_that_the_half_map_fsc_counts_as_signal():
    # Two "models" share a systematic error s; the "references" are the truth plus
    # independent noise (a direct reconstruction of each half). The half-map FSC of the
    # models counts s as signal; the cross-validated estimate must follow the FSC of their
    # average against the truth. Everything fills the box, so no mask (a mask of ones).
    from cryosplat.evaluate import cross_validated_fsc, cross_validated_resolution

    d, pix = 48, 1.0
    t = _band_limited(d, 0, 8.0)
    s = 0.9 * _band_limited(d, 1, 2.0) * t.std() / _band_limited(d, 1, 2.0).std()
    noise = [t.std() * torch.randn(d, d, d, generator=torch.Generator().manual_seed(i),
                                   dtype=torch.float64) for i in (2, 3, 4, 5)]
    m1, m2 = t + s + 0.1 * noise[0], t + s + 0.1 * noise[1]
    b1, b2 = t + 2 * noise[2], t + 2 * noise[3]
    cv = cross_validated_fsc(m1, m2, b1, b2, pix, mask=torch.ones(d, d, d))
    true = fsc((m1 + m2) / 2, t).double().numpy()
    est = cv["estimate"]
    defined = np.isfinite(est)
    assert defined[:12].all() and not defined.all()  # the references run out of signal
    err = np.abs(est - true)[1:][defined[1:]]
    strong = cv["references"][1:][defined[1:]] > 0.2  # statistical error grows near the floor
    assert err[strong].max() < 0.05 and err.max() < 0.12
    half_map = fsc(m1, m2).double().numpy()
    # the bias makes the models agree with each other far better than with the truth
    last = int(np.nonzero(defined)[0].max())
    assert (half_map[last - 3: last + 1] > true[last - 3: last + 1] + 0.2).all()
    # no overfitting of noise here: FSC work and FSC free agree
    np.testing.assert_allclose(cv["work"], cv["free"], atol=0.05)
    r, limit = cross_validated_resolution(est, d, pix)
    r_true = resolution_A(true, d, pix, 0.5)
    if limit:
        assert r >= r_true - 1e-6  # a limit is never better than the truth
    else:
        assert abs(d * pix / r - d * pix / r_true) < 1  # within one shell
    assert resolution_A(half_map, d, pix, 0.5) < r_true  # while the half-map FSC overestimates


def test_cross_validated_fsc_of_a_compact_molecule_follows_its_fsc_against_the_truth():
    # A molecule-like object in solvent: the masked, shell-summed estimate must follow the
    # FSC of the models' average against the truth as far as it is defined, and reach
    # further than the references' own unmasked FSC says there is signal.
    from cryosplat.evaluate import cross_validated_fsc

    d, pix = 48, 1.5
    blob = spherical_mask(d, pix, 14.0, soft_edge_A=4.0).double()
    t = _band_limited(d, 6, 3.0) * blob
    s = 0.8 * _band_limited(d, 7, 1.0) * blob * t.std() / (_band_limited(d, 7, 1.0) * blob).std()
    noise = [torch.randn(d, d, d, generator=torch.Generator().manual_seed(i),
                         dtype=torch.float64) * t.std() for i in (8, 9, 10, 11)]
    m1, m2 = t + s + 0.2 * noise[0] * blob, t + s + 0.2 * noise[1] * blob
    b1, b2 = t + 8 * noise[2], t + 8 * noise[3]  # noisy everywhere, solvent too
    cv = cross_validated_fsc(m1, m2, b1, b2, pix)
    true = fsc((m1 + m2) / 2, t).double().numpy()
    est = cv["estimate"]
    defined = np.nonzero(np.isfinite(est))[0]
    unmasked = fsc(b1, b2).double().numpy()
    reach_unmasked = int(np.nonzero(unmasked[1:] < 3 / np.sqrt(shell_voxel_counts(d)[1:]))[0][0])
    assert defined.max() > reach_unmasked + 10
    np.testing.assert_allclose(est[defined], true[defined], atol=0.08)
    half_map = fsc(m1, m2).double().numpy()
    assert (half_map[10: defined.max() + 1] > true[10: defined.max() + 1] + 0.1).all()


def test_cross_validated_resolution_is_a_limit_when_the_references_run_out():
    from cryosplat.evaluate import cross_validated_resolution

    est = np.full(17, np.nan)
    est[:9] = 0.9
    r, limit = cross_validated_resolution(est, 32, 2.0)
    assert limit and r == pytest.approx(32 * 2.0 / 8)
    est[:9] = np.linspace(1, 0.2, 9)
    r, limit = cross_validated_resolution(est, 32, 2.0)
    assert not limit and r == pytest.approx(resolution_A(est[:9], 32, 2.0, 0.5))


def test_auto_mask_equals_the_whole_box_distance_transform():
    """auto_mask computes the distance transform on the mask's bounding box grown by its
    reach only; the result equals scipy's transform of the whole box."""
    from scipy import ndimage

    from cryosplat.fourier import rfft_radius_3d

    g = torch.Generator().manual_seed(3)
    d, pix = 40, 1.5
    c = geometry.grid_1d_A(d, pix, dtype=torch.float64)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.exp(-((x - 6) ** 2 + (y + 3) ** 2 + (z - 10) ** 2) / 30) \
        + 0.7 * torch.exp(-((x + 8) ** 2 + y**2 + (z + 5) ** 2) / 15) \
        + 0.01 * torch.randn(d, d, d, generator=g, dtype=torch.float64)
    mask = auto_mask(vol, pix)
    low = torch.fft.irfftn(torch.fft.rfftn(vol) * torch.exp(
        -0.5 * (rfft_radius_3d(d) / pix * 15.0) ** 2), s=vol.shape)
    binary = (low > 0.1 * float(low.max())).numpy()
    dist = torch.from_numpy(ndimage.distance_transform_edt(~binary) * pix) - 3.0
    t = (dist / 6.0).clamp(0, 1)
    expected = (0.5 * (1 + torch.cos(torch.pi * t))).float()
    assert 0 < float(mask.sum()) < 0.5 * d**3  # a mask around the blobs, not the box
    torch.testing.assert_close(mask, expected, atol=1e-6, rtol=0)
