"""The Gaussian-splatting renderer: backends, conventions, mass, gradients, voxeliser."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import real_space_projection
from torch_fourier_slice import project_3d_to_2d

from cryosplat import fourier, geometry
from cryosplat.gaussians import (
    GaussianMixture,
    covariance_from_scales,
    project_gaussians,
    render_rfft,
    splat_patches,
)
from cryosplat.simulate import project


def random_mixture(m: int, seed: int, spread_A: float = 16.0, scale_A=(2.0, 3.5),
                   dtype=torch.float64) -> GaussianMixture:
    """Anisotropic Gaussians well inside a 31-32 px box of 1.5 Å."""
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(m, 3, generator=g, dtype=torch.float64) - 0.5) * spread_A
    scales = scale_A[0] + (scale_A[1] - scale_A[0]) * torch.rand(m, 3, generator=g,
                                                                  dtype=torch.float64)
    q = torch.randn(m, 4, generator=g, dtype=torch.float64)
    amp = torch.rand(m, generator=g, dtype=torch.float64) + 0.5
    return GaussianMixture(means.to(dtype), scales.to(dtype), q.to(dtype), amp.to(dtype))


def band(d: int, pix: float, fraction: float = 0.8) -> torch.Tensor:
    k = fourier.rfft_frequencies_2d(d, pix, dtype=torch.float64).norm(dim=-1)
    return k <= fraction / (2 * pix)


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


@pytest.mark.parametrize("d", [31, 32, 48])
def test_patch_and_fourier_backends_agree_below_0p8_nyquist(d):
    gm = random_mixture(60, seed=d)
    rot = geometry.random_rotations(5, torch.Generator().manual_seed(d)).double()
    with torch.no_grad():
        for blur in (0.0, 1.0):
            p = gm.render_rfft(rot, d, 1.5, backend="patch", blur_A=blur)
            f = gm.render_rfft(rot, d, 1.5, backend="fourier", blur_A=blur)
            inside = band(d, 1.5)
            err = (p - f)[:, inside].abs().norm(dim=-1) / f[:, inside].abs().norm(dim=-1)
            assert (err < 1e-3).all(), err


def test_windows_follow_each_gaussians_size():
    """One wide Gaussian among narrow ones: the narrow ones' windows do not truncate it."""
    gm = random_mixture(20, seed=3, scale_A=(1.2, 2.0))
    with torch.no_grad():
        gm.log_scales_A[0] = math.log(7.0)
        gm.means_A[0] = 0.0
    rot = geometry.random_rotations(3, torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        p = gm.render_rfft(rot, 64, 1.5, backend="patch")
        f = gm.render_rfft(rot, 64, 1.5, backend="fourier")
    inside = band(64, 1.5)
    assert ((p - f)[:, inside].abs().norm(dim=-1) / f[:, inside].abs().norm(dim=-1) < 1e-3).all()


@pytest.mark.parametrize("d", [32, 33])
def test_render_equals_projection_of_the_voxelised_map(d):
    """Against the simulator's projection (torch-fourier-slice, padded to the even box for odd
    D, where its own projections are off-centre) and a real-space rotate-and-sum (both
    boxes): pins the rotation convention (A, not A^T) and the pixel origin at D//2."""
    pix = 1.5
    gm = random_mixture(40, seed=10 + d, spread_A=12.0, scale_A=(1.5, 3.5))
    rot = geometry.random_rotations(6, torch.Generator().manual_seed(d)).double()
    with torch.no_grad():
        vol = gm.voxelise(d, pix)
        ours = torch.fft.irfft2(gm.render_rfft(rot, d, pix), s=(d, d))
        transposed = torch.fft.irfft2(gm.render_rfft(rot.transpose(-1, -2), d, pix), s=(d, d))
    half_px = geometry.translate_images(ours, torch.tensor([0.5 * pix, 0.0]).double(), pix)
    real = [real_space_projection(vol.numpy(), r.numpy()) for r in rot]
    sim = project(vol, rot).double()  # torch-fourier-slice itself for even D
    raw = project_3d_to_2d(vol.float(), geometry.fourier_slice_matrices(rot).float()).double()
    for i in range(len(rot)):
        ref = torch.from_numpy(real[i])
        assert corr(ours[i], ref) > 0.995
        assert corr(ours[i], sim[i]) > 0.999
        if d % 2 == 0:
            assert corr(half_px[i], sim[i]) < corr(ours[i], sim[i]) - 0.002
    if d % 2:  # torch-fourier-slice on the odd box itself is off-centre
        assert np.mean([corr(ours[i], raw[i]) for i in range(len(rot))]) < 0.999 - 0.002
    # the transposed rotation (a view near the identity or a half-turn can be close to its
    # own transpose) is far off on average
    assert np.mean([corr(transposed[i], torch.from_numpy(real[i])) for i in range(6)]) < 0.97


def test_half_pixel_origin_of_a_single_gaussian():
    """A Gaussian at the origin peaks exactly on pixel (D//2, D//2), even and odd D."""
    for d in (16, 17):
        gm = GaussianMixture(torch.zeros(1, 3, dtype=torch.float64),
                             torch.full((1, 3), 1.0, dtype=torch.float64),
                             torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64),
                             torch.ones(1, dtype=torch.float64))
        for backend in ("patch", "fourier"):
            with torch.no_grad():
                img = torch.fft.irfft2(gm.render_rfft(torch.eye(3, dtype=torch.float64)[None], d,
                                                      1.0, backend=backend), s=(d, d))[0]
            iy, ix = divmod(int(img.argmax()), d)
            assert (iy, ix) == (d // 2, d // 2)
            assert torch.allclose(img, img.flip(0).roll(1 - d % 2, 0), atol=1e-9)  # symmetric about D//2


@pytest.mark.parametrize("backend", ["patch", "fourier"])
def test_mass_is_conserved_for_every_view(backend):
    gm = random_mixture(30, seed=4)
    rot = geometry.random_rotations(16, torch.Generator().manual_seed(1)).double()
    with torch.no_grad():
        img = torch.fft.irfft2(gm.render_rfft(rot, 40, 1.5, backend=backend), s=(40, 40))
    mass = img.sum((-2, -1)) * 1.5**2
    total = float(gm.amplitudes.detach().sum())
    assert torch.allclose(mass, torch.full_like(mass, total), rtol=1e-4)


def test_view_dependent_normalisation():
    """A flat Gaussian seen face-on and edge-on: peak heights differ, the integrals do not.
    Photographic splatting (no 1/(2 pi sqrt(det))) would keep the peaks equal."""
    gm = GaussianMixture(torch.zeros(1, 3, dtype=torch.float64),
                         torch.tensor([[4.0, 4.0, 1.0]], dtype=torch.float64),
                         torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64),
                         torch.ones(1, dtype=torch.float64))
    face = torch.eye(3, dtype=torch.float64)
    edge = geometry.euler_relion_to_matrix(torch.tensor([0.0, 90.0, 0.0], dtype=torch.float64))
    with torch.no_grad():
        img = torch.fft.irfft2(gm.render_rfft(torch.stack([face, edge]), 96, 0.5), s=(96, 96))
    # the window truncates at 4 sigma of the widest axis: at most 1 - (1 - 2 Phi(-4))^2 = 1.3e-4
    assert torch.allclose(img.sum((-2, -1)) * 0.25, torch.ones(2, dtype=torch.float64), rtol=1.3e-4)
    # analytic peaks: 1 / (2 pi sx sy) = 1/(2 pi 16) face-on, 1/(2 pi 4) edge-on
    np.testing.assert_allclose(img.amax((-2, -1)).numpy(), [1 / (32 * math.pi), 1 / (8 * math.pi)],
                               rtol=1e-6)


@pytest.mark.parametrize("backend,blur", [("patch", 0.0), ("patch", 0.7), ("fourier", 0.0)])
def test_gradcheck_float64(backend, blur):
    gm = random_mixture(4, seed=7, spread_A=6.0, scale_A=(1.5, 2.5))
    rot = geometry.random_rotations(2, torch.Generator().manual_seed(2)).double()
    d, pix = 16, 1.5
    weights = torch.randn(2, d, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def f(means, log_scales, quats, raw_amp):
        cov = covariance_from_scales(log_scales.exp(), quats)
        amp = torch.nn.functional.softplus(raw_amp)
        img = torch.fft.irfft2(render_rfft(means, cov, amp, rot, d, pix, backend=backend,
                                           blur_A=blur), s=(d, d))
        return (img * weights).sum((-2, -1))

    params = tuple(p.detach().clone().requires_grad_(True) for p in
                   (gm.means_A, gm.log_scales_A, gm.quaternions, gm.raw_amplitudes))
    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-7, rtol=1e-4)


def test_blur_is_isotropic_and_matches_a_wider_gaussian():
    """Blur b on both axes equals a Gaussian whose variances are sigma^2 + b^2, in value and
    in gradient (the backward pass differentiates the same blurred covariance)."""
    d, pix, b = 24, 1.0, 1.2
    rot = torch.eye(3, dtype=torch.float64)[None]
    means = torch.tensor([[0.3, -0.6, 0.2]], dtype=torch.float64, requires_grad=True)
    cov = torch.diag(torch.tensor([2.0, 2.0, 3.0], dtype=torch.float64))[None]
    amp = torch.ones(1, dtype=torch.float64)
    blurred = render_rfft(means, cov, amp, rot, d, pix, blur_A=b)
    wider = render_rfft(means, cov + b**2 * torch.eye(3, dtype=torch.float64), amp, rot, d, pix)
    assert torch.allclose(blurred, wider, atol=1e-12)
    g1, = torch.autograd.grad(torch.fft.irfft2(blurred, s=(d, d))[0, 10, 13], means)
    g2, = torch.autograd.grad(torch.fft.irfft2(wider, s=(d, d))[0, 10, 13], means)
    assert torch.allclose(g1, g2, atol=1e-12)


def test_voxeliser_is_consistent_with_the_renderer():
    """Summing the voxelised map along z equals the render for the identity view."""
    gm = random_mixture(30, seed=8)
    with torch.no_grad():
        vol = gm.voxelise(32, 1.5)
        img = torch.fft.irfft2(gm.render_rfft(torch.eye(3, dtype=torch.float64)[None], 32, 1.5),
                               s=(32, 32))[0]
    proj = vol.sum(0) * 1.5
    assert (proj - img).abs().max() < 1e-3 * img.abs().max()


def test_patch_renderer_memory_does_not_keep_windows():
    """The autograd graph keeps the inputs, not B x M x window intermediates."""
    gm = random_mixture(200, seed=9, dtype=torch.float32)
    rot = geometry.random_rotations(8, torch.Generator().manual_seed(0), dtype=torch.float32)
    mean2d, cov2d = (t.detach().requires_grad_(True) for t in
                     project_gaussians(gm.means_A, gm.covariances(), rot))
    img = splat_patches(mean2d, cov2d, gm.amplitudes.detach().expand(8, 200), 32, 1.5)
    saved = img.grad_fn.saved_tensors
    assert sum(t.numel() for t in saved) == mean2d.numel() + cov2d.numel() + 8 * 200


def test_ply_and_pdb_export_overlay_the_map(tmp_path):
    import gemmi

    from cryosplat.io.gaussians import read_ply, write_pdb, write_ply

    gm = random_mixture(25, seed=11, dtype=torch.float32)
    d, pix = 32, 1.5
    write_ply(tmp_path / "g.ply", gm, d, pix)
    write_pdb(tmp_path / "g.pdb", gm, d, pix)
    ply = read_ply(tmp_path / "g.ply")
    centre = (d // 2) * pix  # maps have origin 0: the box centre voxel is at 16 x 1.5 Å
    xyz = np.stack([ply["x"], ply["y"], ply["z"]], -1)
    np.testing.assert_allclose(xyz, gm.means_A.detach().numpy() + centre, atol=1e-4)
    np.testing.assert_allclose(np.exp(np.stack([ply[f"scale_{i}"] for i in range(3)], -1)),
                               gm.scales_A.detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(ply["amplitude"], gm.amplitudes.detach().numpy(), rtol=1e-5)
    st = gemmi.read_structure(str(tmp_path / "g.pdb"))
    atoms = [a for r in st[0][0] for a in r]
    assert len(atoms) == 25
    np.testing.assert_allclose([[a.pos.x, a.pos.y, a.pos.z] for a in atoms], xyz, atol=1e-3)
    # the pseudo-atoms sit on the density of the voxelised map written with origin 0
    vol = gm.voxelise(d, pix).detach()
    heaviest = int(gm.amplitudes.argmax())
    i = np.round(np.array([atoms[heaviest].pos.z, atoms[heaviest].pos.y,
                           atoms[heaviest].pos.x]) / pix).astype(int)
    assert vol[tuple(i)] > torch.quantile(vol.flatten(), 0.99)
