"""Higher-order optics (docs/conventions.md, "Higher-order optics"): RELION's Zernike
polynomials and index order, beam tilt, even aberrations, anisotropic magnification and
CTF-premultiplied images, against published formulas, against relion_project, and end to end
through direct inversion."""

import math
import shutil
import subprocess
from dataclasses import replace

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryosplat import geometry
from cryosplat.backproject import backproject
from cryosplat.ctf import (
    CTFParams,
    ctf_rfft,
    electron_wavelength_A,
    even_index_to_mn,
    odd_index_to_mn,
    odd_phase_rfft,
    transfer_rfft,
    zernike,
)
from cryosplat.errors import InputError
from cryosplat.evaluate import fsc
from cryosplat.fourier import fourier_resample, rfft_frequencies_2d
from cryosplat.gaussians import GaussianMixture, model_images, render_rfft
from cryosplat.io import read_particles, write_particles
from cryosplat.simulate import (
    SimulationConfig,
    draw_parameters,
    forward_images,
    project,
    simulate_dataset,
)

RELION_PROJECT = shutil.which("relion_project")


def one_ctf(n=1, **optics) -> CTFParams:
    full = lambda v: torch.full((n,), float(v), dtype=torch.float64)  # noqa: E731
    return CTFParams(full(15000), full(14000), full(30), full(300), full(2.7), full(0.1),
                     full(0), full(0), full(1), **optics)


def test_zernike_polynomials_and_index_order_are_relions():
    """RELION's Zernike terms are the classical unnormalised ones of rho = |k| (1/Å, no unit
    disc): checked against their closed forms in x, y. Index orders are those RELION's
    ``Zernike::oddIndexToMN`` / ``evenIndexToMN`` give."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 50, generator=g, dtype=torch.float64) * 0.3
    r2 = x**2 + y**2
    closed = {(0, 0): torch.ones_like(x), (1, 1): x, (-1, 1): y, (-2, 2): 2 * x * y,
              (0, 2): 2 * r2 - 1, (2, 2): x**2 - y**2, (-3, 3): 3 * x**2 * y - y**3,
              (-1, 3): (3 * r2 - 2) * y, (1, 3): (3 * r2 - 2) * x, (3, 3): x**3 - 3 * x * y**2,
              (-4, 4): 4 * x**3 * y - 4 * x * y**3, (-2, 4): (4 * r2 - 3) * 2 * x * y,
              (0, 4): 6 * r2**2 - 6 * r2 + 1, (2, 4): (4 * r2 - 3) * (x**2 - y**2),
              (4, 4): x**4 - 6 * x**2 * y**2 + y**4}
    for (m, n), expected in closed.items():
        torch.testing.assert_close(zernike(m, n, x, y), expected, msg=f"Z(m={m}, n={n})")
    assert [odd_index_to_mn(i) for i in range(6)] == [(-1, 1), (1, 1), (-3, 3), (-1, 3),
                                                      (1, 3), (3, 3)]
    assert [even_index_to_mn(i) for i in range(9)] == [(0, 0), (-2, 2), (0, 2), (2, 2), (-4, 4),
                                                       (-2, 4), (0, 4), (2, 4), (4, 4)]


def test_beam_tilt_is_relions_coma_in_odd_zernike_terms():
    """RELION 3.1+ turns beam tilt into odd Zernike terms (TiltHelper::insertTilt):
    coefficients 1 and 0 gain 2 Z3x and 2 Z3y, coefficients 4 and 3 gain Z3x and Z3y, with
    Z3 = -Cs 20000 lambda² pi tilt / 3 (Cs in mm, tilt in mrad). The phase of a tilt must
    equal the phase of those coefficients, and (RELION 3.0's applyBeamTilt, up to its sign)
    be 2 pi 1e-3 Cs lambda² |k|² k.tilt in magnitude."""
    tx, ty, cs = 0.8, -0.35, 2.7
    lam = float(electron_wavelength_A(torch.tensor(300.0)))
    z3x, z3y = (-cs * 20000 * lam**2 * math.pi * t / 3 for t in (tx, ty))
    odd = torch.tensor([[2 * z3y, 2 * z3x, 0.0, z3y, z3x, 0.0]], dtype=torch.float64)
    from_tilt = odd_phase_rfft(one_ctf(beam_tilt_mrad=torch.tensor([[tx, ty]], dtype=torch.float64)), 64, 1.1)
    from_zernike = odd_phase_rfft(one_ctf(odd_zernike=odd), 64, 1.1)
    torch.testing.assert_close(from_tilt, from_zernike, rtol=1e-6, atol=1e-9)
    k = rfft_frequencies_2d(64, 1.1, dtype=torch.float64)
    ky, kx = k[..., 0], k[..., 1]
    coma = 2 * math.pi * 1e-3 * cs * 1e7 * lam**2 * (kx**2 + ky**2) * (kx * tx + ky * ty)
    torch.testing.assert_close(from_tilt[0], -coma, rtol=1e-6, atol=1e-9)
    assert float(from_tilt.abs().max()) > 1.0  # large enough at Nyquist for the test to bite


def test_transfer_is_ctf_times_the_odd_phase_and_squared_when_premultiplied():
    odd = torch.tensor([[0.0, 0.0, 40.0, 0.0, 0.0, 25.0]], dtype=torch.float64)
    c = ctf_rfft(one_ctf(), 48, 1.5)
    h = transfer_rfft(one_ctf(odd_zernike=odd), 48, 1.5)
    phase = odd_phase_rfft(one_ctf(odd_zernike=odd), 48, 1.5)
    torch.testing.assert_close(h, c * torch.exp(1j * phase))
    pre = transfer_rfft(one_ctf(premultiplied=torch.ones(1, dtype=torch.float64)), 48, 1.5)
    torch.testing.assert_close(pre, c * c)


def gaussian_ft(kx, ky, mean, cov):
    """Analytic transform of a normalised 2D Gaussian (mean, cov in Å) at k (1/Å), with the
    rfft's convention exp(-2 pi i k.x) for an image whose pixel D//2 is the origin."""
    quad = cov[0, 0] * kx**2 + 2 * cov[0, 1] * kx * ky + cov[1, 1] * ky**2
    return torch.exp(-2 * math.pi**2 * quad - 2j * math.pi * (kx * mean[0] + ky * mean[1]))


def test_magnified_projections_are_the_ideal_projection_at_m_k():
    """RELION's anisotropic magnification: the image's transform at k is the ideal
    projection's at M k (ObservationModel::applyAnisoMag, the projector's inverse). Checked
    for the Gaussian renderer and for the Fourier-slice projection of a voxelised Gaussian
    against the analytic transform of the ideal projection at M k; the transposed matrix
    (a common slip) is far off."""
    d, pix = 64, 1.0
    mag = torch.tensor([[1.04, 0.03], [-0.05, 0.97]], dtype=torch.float64)
    rot = geometry.euler_relion_to_matrix(torch.tensor([[30.0, 70.0, -40.0]], dtype=torch.float64))
    mu = torch.tensor([[6.0, -4.0, 3.0]], dtype=torch.float64)
    cov = torch.diag(torch.tensor([9.0, 4.0, 6.0], dtype=torch.float64))[None]
    m2 = (rot[0] @ mu[0])[:2]
    c2 = (rot[0] @ cov[0] @ rot[0].T)[:2, :2]
    k = rfft_frequencies_2d(d, pix, dtype=torch.float64)
    ky, kx = k[..., 0], k[..., 1]

    def ideal_at(m):  # the ideal projection's transform at m k, normalised to 1 at k = 0
        qx, qy = m[0, 0] * kx + m[0, 1] * ky, m[1, 0] * kx + m[1, 1] * ky
        return gaussian_ft(qx, qy, m2, c2)

    def errors(image_rfft):  # against M and against M^T, relative, in the band
        f = image_rfft * torch.exp(2j * math.pi * (kx + ky) * (d // 2) * pix)  # origin: D//2
        f = f / f[0, 0]
        band = (kx**2 + ky**2).sqrt() < 0.35 / pix
        return [float((f - ideal_at(m))[band].abs().max()) for m in (mag, mag.T)]

    matrices = geometry.image_matrices(rot, mag[None])
    err, err_t = errors(render_rfft(mu, cov, torch.ones(1, dtype=torch.float64), matrices, d,
                                    pix, backend="patch")[0])
    assert err < 2e-3 and err_t > 50 * err, (err, err_t)

    grid = (torch.arange(d, dtype=torch.float64) - d // 2) * pix
    zz, yy, xx = torch.meshgrid(grid, grid, grid, indexing="ij")
    r = torch.stack([xx, yy, zz], -1) - mu[0]
    vol = torch.exp(-0.5 * torch.einsum("...i,ij,...j->...", r, torch.linalg.inv(cov[0]), r))
    err, err_t = errors(torch.fft.rfft2(project(vol, matrices).double())[0])
    assert err < 0.03 and err_t > 5 * err, (err, err_t)


@pytest.mark.skipif(not RELION_PROJECT, reason="RELION (relion_project) not installed")
def test_ctf_with_magnification_and_even_zernike_matches_relion_project(tmp_path):
    """relion_project (RELION 3.1) applies the optics group's magnification and even Zernike
    terms to its CTF (not to the projection, and no odd terms: measured). Its CTF is the
    ratio of its projections made with and without --ctf; ours must match it, and must not
    match with the magnification transposed or the even terms' sign flipped."""
    mag, even = (1.03, 0.04, -0.05, 0.98), (0, 0, 0, 0, 60.0, 0, 0, 0, 35.0)
    sim = simulate_dataset(None, tmp_path / "s", SimulationConfig(
        n_particles=6, box_size=64, pixel_size_A=1.5, snr=1e9, seed=2, mag_matrix=mag,
        even_zernike=even))
    for name, ctf in (("with", ["--ctf"]), ("without", [])):
        r = subprocess.run(["relion_project", "--i", sim["ground_truth"], "--ang",
                            sim["particles"], "--o", str(tmp_path / name), *ctf],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    a = torch.fft.rfft2(torch.from_numpy(mrcfile.read(tmp_path / "with.mrcs").astype(np.float64)))
    b = torch.fft.rfft2(torch.from_numpy(mrcfile.read(tmp_path / "without.mrcs").astype(np.float64)))
    k = rfft_frequencies_2d(64, 1.5, dtype=torch.float64)
    ok = (b.abs() > 0.05 * b.abs().amax(dim=(-2, -1), keepdim=True)) & \
        ((k**2).sum(-1).sqrt() < 0.8 / 3.0)
    relion_ctf = (a / b).real
    p = read_particles(sim["particles"])

    def error(ctf):
        return float((ctf_rfft(ctf, 64, 1.5) - relion_ctf)[ok].abs().mean())

    ours = error(p.ctf)
    assert ours < 0.02, ours
    assert error(replace(p.ctf, mag_matrix=p.ctf.mag_matrix.transpose(1, 2))) > 4 * ours
    assert error(replace(p.ctf, even_zernike=-p.ctf.even_zernike)) > 4 * ours
    assert error(replace(p.ctf, mag_matrix=None, even_zernike=None)) > 4 * ours


ABERRATIONS = dict(beam_tilt_mrad=(1.2, -0.8), odd_zernike=(0.0, 0.0, 150.0, 0.0, 0.0, 100.0),
                   even_zernike=(0.0, 0.0, 0.0, 0.0, 400.0, 0.0, 0.0, 0.0, 300.0),
                   mag_matrix=(1.015, 0.006, -0.004, 0.99))


@pytest.fixture(scope="module")
def clean_reference(tmp_path_factory):
    """An aberration-free dataset's minimum FSC against the truth (to 0.8 Nyquist) and
    the truth."""
    sim = simulate_dataset(None, tmp_path_factory.mktemp("clean"), SimulationConfig(**E2E))
    truth = torch.from_numpy(mrcfile.read(sim["ground_truth"]).copy())
    return min_fsc(read_particles(sim["particles"]), truth), truth


E2E = dict(n_particles=1500, box_size=48, pixel_size_A=1.5, snr=1e8, max_shift_A=2.0, seed=4)


def min_fsc(p, truth) -> float:
    """The minimum FSC to 0.8 Nyquist of ``p``'s direct map against ``truth``."""
    curve = fsc(backproject(p, p.half_set.numpy()).map, truth)
    return float(curve[1:int(0.8 * (p.box_size // 2)) + 1].min())


@pytest.mark.parametrize("which", ["all", *ABERRATIONS])
def test_direct_inversion_models_the_aberrations_end_to_end(tmp_path, clean_reference, which):
    """Particles simulated with beam tilt, odd and even Zernike terms and anisotropic
    magnification (each alone, and all together) reconstruct to the truth as well as
    aberration-free particles do when the optics are modelled (minimum FSC to 0.8 Nyquist
    within 0.005), and measurably worse when they are ignored (at least 0.05 lower)."""
    reference, truth = clean_reference
    optics = ABERRATIONS if which == "all" else {which: ABERRATIONS[which]}
    sim = simulate_dataset(None, tmp_path, SimulationConfig(**E2E, **optics))
    p = read_particles(sim["particles"])
    plain = replace(p.ctf, beam_tilt_mrad=None, odd_zernike=None, even_zernike=None,
                    mag_matrix=None)
    modelled, ignored = min_fsc(p, truth), min_fsc(replace(p, ctf=plain), truth)
    assert modelled > reference - 0.005, (modelled, reference)
    assert ignored < modelled - 0.05, (ignored, modelled)


def test_premultiplied_particles_reconstruct_like_plain_ones(tmp_path):
    """CTF-premultiplied images (rlnCtfDataAreCtfPremultiplied 1: the simulator multiplies by
    CTF² then) reconstruct like plain ones: direct inversion takes them without another CTF.
    Read as plain images, they do not."""
    base = dict(n_particles=1200, box_size=40, pixel_size_A=2.0, snr=1e8, seed=5)
    plain = simulate_dataset(None, tmp_path / "plain", SimulationConfig(**base))
    pre = simulate_dataset(None, tmp_path / "pre", SimulationConfig(**base, premultiplied=True))
    assert "rlnCtfDataAreCtfPremultiplied" in starfile.read(pre["particles"])["optics"]
    truth = torch.from_numpy(mrcfile.read(plain["ground_truth"]).copy())

    def mean_fsc(p):
        return float(fsc(backproject(p, p.half_set.numpy()).map, truth)[1:16].mean())

    p = read_particles(pre["particles"])
    assert bool((p.ctf.premultiplied == 1).all())
    reference, modelled = mean_fsc(read_particles(plain["particles"])), mean_fsc(p)
    ignored = mean_fsc(replace(p, ctf=replace(p.ctf, premultiplied=None)))
    assert modelled > reference - 0.01 and ignored < modelled - 0.1, (reference, modelled, ignored)


def merged_two_groups(tmp_path, a: dict, b: dict):
    """One RELION 3.1 STAR holding the particles of simulations ``a`` (group 1) and ``b``
    (group 2), each with its own pixel size and box."""
    ta, tb = starfile.read(a["particles"]), starfile.read(b["particles"])
    optics = starfile.read(a["particles"])["optics"]
    optics = optics.loc[[0, 0]].reset_index(drop=True)
    for col in ("rlnImagePixelSize", "rlnImageSize"):
        optics.loc[1, col] = tb["optics"].loc[0, col]
    optics["rlnOpticsGroup"] = [1, 2]
    optics["rlnOpticsGroupName"] = ["a", "b"]
    pa, pb = ta["particles"].copy(), tb["particles"].copy()
    pa["rlnImageName"] = pa["rlnImageName"].str.replace("@", "@a/")
    pb["rlnImageName"] = pb["rlnImageName"].str.replace("@", "@b/")
    pa["rlnOpticsGroup"], pb["rlnOpticsGroup"] = 1, 2
    path = tmp_path / "merged.star"
    starfile.write({"optics": optics, "particles": pd.concat([pa, pb], ignore_index=True)}, path)
    return path


def test_optics_groups_of_different_pixel_sizes_reconstruct_together(tmp_path):
    """Particles of 1.2 Å (box 80) and of 1.2568 Å (box 74; both boxes hold the whole
    molecule) are reconstructed together at 1.2 Å, box 80, as RELION does: group 2 is
    Fourier-padded to 78 px, the box nearest its field of view (77.51 px), padded to 80 px in
    real space, and the rounding (0.64%) is carried as a magnification.

    Measured: the merged map is as close to the truth as group 1's alone (minimum FSC to 0.8
    Nyquist within 0.01), and group 2's map is closer with the carried magnification than
    without it or with it inverted. Defoci are 0.1-0.2 µm: re-windowing an image (Fourier
    padding, then padding in real space) re-samples its CTF, which at 1-3 µm is aliased at
    these small boxes (noiseless simulations wrap the delocalised signal); then group 2
    alone reaches a minimum FSC of 0.96 instead of 0.97."""
    common = dict(n_particles=800, snr=1e8, max_shift_A=2.0, defocus_min_um=0.1,
                  defocus_max_um=0.2)
    a = simulate_dataset(None, tmp_path / "a", SimulationConfig(box_size=80, pixel_size_A=1.2,
                                                                seed=7, **common))
    b = simulate_dataset(None, tmp_path / "b", SimulationConfig(box_size=74, pixel_size_A=1.2568,
                                                                seed=8, **common))
    truth = torch.from_numpy(mrcfile.read(a["ground_truth"]).copy())
    merged = merged_two_groups(tmp_path, a, b)
    with pytest.raises(InputError, match="one pixel size"):
        read_particles(merged).require_single_pixel_size()
    p = read_particles(merged, one_pixel_size=True)
    assert p.box_size == 80 and set(p.pixel_size_A.tolist()) == {1.2}
    ratio = 1.2 * 78 / (74 * 1.2568)
    assert float(p.ctf.mag_matrix[-1, 0, 0]) == pytest.approx(ratio)

    def curve(q):
        return fsc(backproject(q, q.half_set.numpy()).map, truth)[1:int(0.8 * 40) + 1]

    together, alone = float(curve(p).min()), float(curve(read_particles(a["particles"])).min())
    assert together > alone - 0.01, (together, alone)
    g2 = p.subset((p.optics_group == 2).numpy())

    def carried(factor):  # group 2 with the magnification and origins scaled by factor / ratio
        return float(curve(replace(g2, ctf=replace(g2.ctf, mag_matrix=g2.ctf.mag_matrix * factor / ratio),
                                   shifts_A=g2.shifts_A * factor / ratio))[9:].mean())

    right = carried(ratio)
    assert right > carried(1.0) + 0.003 and right > carried(1 / ratio) + 0.003
    # written out (cryosplat downsample), the rescaled set reads back as it is: one pixel
    # size, the rounding in each group's rlnMagMat, the same map
    star = write_particles(tmp_path / "one", p)
    back = read_particles(star)
    assert not back.needs_rescaling() and back.box_size == 80
    torch.testing.assert_close(back.ctf.mag_matrix, p.ctf.mag_matrix, rtol=1e-5, atol=1e-6)
    assert float(curve(back).min()) == pytest.approx(together, abs=1e-3)


@pytest.mark.parametrize(("d", "b"), [(63, 64), (64, 63), (64, 32), (63, 31), (32, 65)])
def test_fourier_resampling_keeps_the_centre_pixel(d, b):
    """A blob at (5, -3) Å from pixel D//2 stays at (5, -3) Å from pixel d//2 (in units of
    the new pixel D/d): the centre does not move when the size changes between odd and even
    (torch-fourier-rescale 0.6.0 moves it by half a pixel there)."""
    grid = torch.arange(d, dtype=torch.float64) - d // 2
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    img = torch.exp(-((xx - 5) ** 2 + (yy + 3) ** 2) / (2 * 3.0**2))
    out = fourier_resample(img, b).clamp(min=0)
    new = (torch.arange(b, dtype=torch.float64) - b // 2) * d / b  # in old pixels
    cy = float((out.sum(1) * new).sum() / out.sum())
    cx = float((out.sum(0) * new).sum() / out.sum())
    assert abs(cx - 5) < 0.01 and abs(cy + 3) < 0.01, (cx, cy)


def test_the_gaussian_forward_model_applies_the_optics_as_the_simulator_does():
    """The training's forward model (the renderer with M3^T A, then the shift and the
    optical transfer) equals the simulator's (torch-fourier-slice of the voxelised mixture
    with the same matrix, then the same modulation) with every aberration at once; the same
    model without the optics does not."""
    g = torch.Generator().manual_seed(3)
    n_gauss, d, pix = 30, 64, 1.5
    gm = GaussianMixture(torch.randn(n_gauss, 3, generator=g, dtype=torch.float64) * 8,
                         1.5 + torch.rand(n_gauss, 3, generator=g, dtype=torch.float64) * 2,
                         torch.randn(n_gauss, 4, generator=g, dtype=torch.float64),
                         0.5 + torch.rand(n_gauss, generator=g, dtype=torch.float64))
    cfg = SimulationConfig(n_particles=4, box_size=d, pixel_size_A=pix, seed=1, **ABERRATIONS)
    rot, origin, ctf, _ = draw_parameters(cfg)
    with torch.no_grad():
        ours = model_images(gm, rot, origin, ctf, d, pix)
        plain = model_images(gm, rot, origin, replace(ctf, beam_tilt_mrad=None, odd_zernike=None,
                                                      even_zernike=None, mag_matrix=None), d, pix)
        vol = gm.voxelise(d, pix)
    sim = forward_images(project(vol, geometry.image_matrices(rot, ctf.mag_matrix)), origin, ctf,
                         pix).double()
    sim = sim * pix  # torch-fourier-slice sums voxels; the renderer integrates (per Å²)

    def residual(model):
        return ((model - sim).norm(dim=(-2, -1)) / sim.norm(dim=(-2, -1)))

    err, err_plain = residual(ours), residual(plain)
    assert (err < 0.03).all() and (err_plain > 4 * err).all(), (err, err_plain)


@pytest.mark.skipif(not RELION_PROJECT, reason="RELION (relion_project) not installed")
def test_relion_project_ctf2_particles_flagged_premultiplied_reconstruct(tmp_path):
    """relion_project --ctf2 (RELION's own CTF²-multiplied projections), flagged
    rlnCtfDataAreCtfPremultiplied 1, reconstruct like its --ctf projections; unflagged they
    do not."""
    sim = simulate_dataset(None, tmp_path / "s", SimulationConfig(
        n_particles=1500, box_size=48, pixel_size_A=2.0, snr=1e8, seed=6, max_shift_A=2.0))
    truth = torch.from_numpy(mrcfile.read(sim["ground_truth"]).copy())
    for name, flag in (("ctf", "--ctf"), ("ctf2", "--ctf2")):
        r = subprocess.run(["relion_project", "--i", sim["ground_truth"], "--ang", sim["particles"],
                            "--o", str(tmp_path / name), flag], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    tables = starfile.read(tmp_path / "ctf2.star", always_dict=True)
    tables["optics"]["rlnCtfDataAreCtfPremultiplied"] = 1
    starfile.write(tables, tmp_path / "ctf2.star", overwrite=True)

    plain = min_fsc(read_particles(tmp_path / "ctf.star"), truth)
    pre = read_particles(tmp_path / "ctf2.star")
    assert bool((pre.ctf.premultiplied == 1).all())
    flagged = min_fsc(pre, truth)
    unflagged = min_fsc(replace(pre, ctf=replace(pre.ctf, premultiplied=None)), truth)
    assert flagged > plain - 0.01 and unflagged < flagged - 0.1, (plain, flagged, unflagged)
