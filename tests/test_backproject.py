"""Direct Fourier inversion: the fused slice insertion against torch-fourier-slice's, the
inversion's real-space fidelity, and the maps against RELION's relion_reconstruct (where
RELION is installed)."""

from __future__ import annotations

import shutil
import subprocess

import mrcfile
import numpy as np
import pytest
import torch
from torch_fourier_slice import insert_central_slices_rfft_3d

from cryosplat import geometry
from cryosplat.backproject import backproject, corner_mask, invert
from cryosplat.evaluate import fsc, resolution_A
from cryosplat.fourier import rfft_radius_3d, shell_index_3d
from cryosplat.fourier_slice import Insertion, PaddedGrid, hermitian_x0, slice_points
from cryosplat.gaussians import voxelise
from cryosplat.io import read_particles
from cryosplat.io.mrc import write_volume
from cryosplat.simulate import SimulationConfig, simulate_dataset


@pytest.mark.parametrize("nyquist_only", [False, True])
@pytest.mark.parametrize("p", [16, 30])
def test_insert_slices_equals_torch_fourier_slice(p, nyquist_only):
    """Numerator and CTF² grids equal the library's two insertions (its Friedel handling,
    its dropped edge points, and with ``fftfreq_max`` its Nyquist limit) to float rounding."""
    g = torch.Generator().manual_seed(p)
    b = 6
    f = torch.randn(b, p, p // 2 + 1, dtype=torch.complex64, generator=g)
    c2 = torch.rand(b, p, p // 2 + 1, generator=g)
    m = geometry.fourier_slice_matrices(geometry.random_rotations(b, g)).float()
    limit = 0.5 if nyquist_only else None
    ref_num, _ = insert_central_slices_rfft_3d(torch.fft.fftshift(f, dim=-2), (p, p, p), m,
                                               fftfreq_max=limit)
    ref_den, _ = insert_central_slices_rfft_3d(torch.fft.fftshift(c2.to(torch.complex64), dim=-2),
                                               (p, p, p), m, fftfreq_max=limit)
    grid = PaddedGrid(p, p)
    num, den = grid.accumulators()
    grid.insert(num, den, f, c2, m.transpose(-1, -2), slice_points(p, p / 2 if nyquist_only else None))
    num, den = hermitian_x0(grid.grid_view(num)), hermitian_x0(grid.grid_view(den))
    scale = float(ref_num.abs().max())
    assert scale > 1
    torch.testing.assert_close(num, ref_num, atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(den, ref_den.real, atol=1e-5 * float(ref_den.abs().max()), rtol=0)


@pytest.mark.parametrize("d", [8, 15])
def test_image_slices_land_at_twice_their_index_on_the_padded_grid(d):
    """A `(D, D//2+1)` slice inserted into the 2x padded grid (RELION's way) equals the
    library's insertion of a `(2D, D+1)` slice that holds the same values at even indices and
    zeros between: frequency index k of the image is index 2k of the padded grid (the same
    cycles per pixel), for odd boxes too."""
    p = 2 * d
    g = torch.Generator().manual_seed(d)
    b = 5
    f = torch.randn(b, d, d // 2 + 1, dtype=torch.complex64, generator=g)
    c2 = torch.rand(b, d, d // 2 + 1, generator=g)
    m = geometry.fourier_slice_matrices(geometry.random_rotations(b, g)).float()
    ky = torch.fft.fftfreq(d, 1 / d).long() * 2 % p
    kx = torch.arange(d // 2 + 1) * 2
    big_f = torch.zeros(b, p, p // 2 + 1, dtype=torch.complex64)
    big_c2 = torch.zeros(b, p, p // 2 + 1, dtype=torch.complex64)
    big_f[:, ky[:, None], kx[None, :]] = f
    big_c2[:, ky[:, None], kx[None, :]] = c2.to(torch.complex64)
    ref_num, _ = insert_central_slices_rfft_3d(torch.fft.fftshift(big_f, dim=-2), (p, p, p), m,
                                               fftfreq_max=0.5)
    ref_den, _ = insert_central_slices_rfft_3d(torch.fft.fftshift(big_c2, dim=-2), (p, p, p), m,
                                               fftfreq_max=0.5)
    grid = PaddedGrid(d, p)
    num, den = grid.accumulators()
    grid.insert(num, den, f, c2, m.transpose(-1, -2), slice_points(d, d / 2))
    num, den = hermitian_x0(grid.grid_view(num)), hermitian_x0(grid.grid_view(den))
    assert float(ref_num.abs().max()) > 1
    torch.testing.assert_close(num, ref_num, atol=1e-5 * float(ref_num.abs().max()), rtol=0)
    torch.testing.assert_close(den, ref_den.real, atol=1e-5 * float(ref_den.abs().max()), rtol=0)


def test_insertion_index_is_exact_on_grids_past_float32_integers():
    """On a padded grid of 340 (19.8M voxels, past float32's exact integers at 2^24), a slice
    point lands on exactly its voxel: rotated 90 degrees about x, (kx, ky) = (7, 160) goes to
    x = 7, y = 0, z = 160, voxel (330, 170, 7) of the fftshifted grid, and nowhere else."""
    p = 340
    f = torch.zeros(1, p, p // 2 + 1, dtype=torch.complex64)
    f[0, 160, 7] = 1.0
    c2 = f.real.clone()
    m = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]])
    grid = PaddedGrid(p, p)
    num, den = grid.accumulators()
    grid.insert(num, den, f, c2, m.transpose(-1, -2), slice_points(p, None))
    num = grid.grid_view(num)
    assert num[330, 170, 7] == 1 and float(num.abs().sum()) == 1
    assert grid.grid_view(den)[330, 170, 7] == 1


def test_corners_beyond_half_the_box_are_masked_as_relion_does(tmp_path):
    """Noisy particles: the map is untouched inside radius D/2 (the mask is 1 there) and 0
    from D/2 + 3 voxels on, where RELION's softMaskOutsideMap also leaves nothing."""
    d = 32
    cfg = SimulationConfig(n_particles=300, box_size=d, pixel_size_A=3.0, snr=0.05, seed=2)
    sim = simulate_dataset(None, tmp_path, cfg)
    p = read_particles(sim["particles"])
    m = backproject(p, p.half_set.numpy()).map.numpy()
    c = np.arange(d) - d // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    mask = corner_mask(d).numpy()
    assert (mask[r <= d / 2] == 1).all() and (mask[r >= d / 2 + 3] == 0).all()
    assert np.abs(m[r >= d / 2 + 3]).max() == 0
    assert m[r < d / 2].std() > 0


def test_off_centre_density_keeps_its_mass(tmp_path):
    """Two equal blobs, one at the centre and one 0.35 box off it along x, simulated without
    noise: the map gives both the same mass. Without the gridding (sinc²) correction of the
    padded box the outer blob keeps only about 0.9 of its mass."""
    d, pix = 32, 3.0
    centres = torch.tensor([[0.0, 0.0, 0.0], [0.35 * d * pix, 0.0, 0.0]])
    cov = (2 * pix) ** 2 * torch.eye(3).expand(2, 3, 3)
    truth = voxelise(centres, cov, torch.ones(2), d, pix)
    write_volume(tmp_path / "blobs.mrc", truth, pix)
    cfg = SimulationConfig(n_particles=1500, box_size=d, pixel_size_A=pix, snr=1e8,
                           max_shift_A=0.0, seed=4)
    sim = simulate_dataset(tmp_path / "blobs.mrc", tmp_path / "sim", cfg)
    p = read_particles(sim["particles"])
    m = backproject(p, p.half_set.numpy()).map
    c = np.arange(d) - d // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")

    def mass(centre_px: float) -> float:
        near = (x - centre_px) ** 2 + y**2 + z**2 <= 4**2
        return float(m.numpy()[near].sum())

    ratio = mass(0.35 * d) / mass(0.0)
    assert ratio == pytest.approx(1.0, abs=0.03), ratio


RELION = shutil.which("relion_reconstruct") and shutil.which("relion_project")


@pytest.mark.skipif(not RELION, reason="RELION (relion_project, relion_reconstruct) not installed")
def test_map_matches_relion_reconstruct_on_relion_project_particles(tmp_path):
    """Particles simulated by RELION's relion_project (not by cryosplat; SNR 0.02, box 48),
    reconstructed by relion_reconstruct --ctf and by cryosplat: the FSC of cryosplat's map
    against the truth crosses 0.5 and 0.143 at most one Fourier shell before RELION's (both
    crossings lie inside the band: measured 8.94 vs 8.93 Å and 6.04 vs 6.00 Å)."""
    d, pix = 48, 3.0
    sim = simulate_dataset(None, tmp_path / "poses", SimulationConfig(
        n_particles=2000, box_size=d, pixel_size_A=pix, snr=1.0, max_shift_A=4.0, seed=8))
    truth = torch.from_numpy(mrcfile.read(sim["ground_truth"]).copy())

    def relion(*args: str) -> None:
        r = subprocess.run(list(args), cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    relion("relion_project", "--i", sim["ground_truth"], "--ang", sim["particles"],
           "--o", "clean", "--ctf")
    sigma = float(np.sqrt(mrcfile.read(tmp_path / "clean.mrcs").var(axis=(1, 2)).mean() / 0.02))
    relion("relion_project", "--i", sim["ground_truth"], "--ang", sim["particles"],
           "--o", "noisy", "--ctf", "--add_noise", "--white_noise", f"{sigma:.6f}")
    relion("relion_reconstruct", "--i", "noisy.star", "--o", "relion.mrc", "--ctf")
    p = read_particles(tmp_path / "noisy.star")
    ours = backproject(p, p.half_set.numpy()).map
    theirs = torch.from_numpy(mrcfile.read(tmp_path / "relion.mrc").copy())
    shell = 1 / (d * pix)
    for threshold in (0.5, 0.143):
        r_ours = resolution_A(fsc(ours, truth), d, pix, threshold)
        r_theirs = resolution_A(fsc(theirs, truth), d, pix, threshold)
        assert 1 / r_ours >= 1 / r_theirs - shell, (threshold, r_ours, r_theirs)


@pytest.mark.parametrize("box", [31, 32])
def test_noiseless_particles_give_the_map_in_odd_and_even_boxes(tmp_path, box):
    """Noiseless particles reconstruct the truth to FSC > 0.995 out to 0.8 Nyquist: the padded
    image, the padded volume and the crop share one centre (pixel D//2) for odd boxes too
    (measured 0.9995 for both; 0.97 for box 31 while the simulator's truth and projections
    were off-centre in odd boxes)."""
    cfg = SimulationConfig(n_particles=1500, box_size=box, pixel_size_A=3.0, snr=1e8,
                           max_shift_A=3.0, seed=6)
    sim = simulate_dataset(None, tmp_path, cfg)
    p = read_particles(sim["particles"])
    truth = torch.from_numpy(mrcfile.read(sim["ground_truth"]).copy())
    curve = fsc(backproject(p, p.half_set.numpy()).map, truth).numpy()
    assert curve[1:int(0.8 * (box // 2)) + 1].min() > 0.995


@pytest.mark.parametrize(("d", "pad"), [(12, 2), (9, 2), (9, 1)])
def test_axis_by_axis_inverse_equals_the_whole_padded_transform(d, pad):
    """invert's cropped, one-axis-at-a-time inverse equals irfftn of the whole padded grid,
    cropped to the box's voxels about P//2, then sinc²-corrected and corner-masked, with a
    per-shell regulariser looked up on the fftshifted grid (odd padded sizes too)."""
    p = pad * d
    g = torch.Generator().manual_seed(d * pad)
    num = torch.randn(p, p, p // 2 + 1, dtype=torch.complex64, generator=g)
    den = torch.rand(p, p, p // 2 + 1, generator=g)
    reg = torch.rand(int(np.ceil(np.sqrt(3) * (p // 2))) + 1, generator=g)
    ours = invert(Insertion(num, den, d, p), reg)
    shells = shell_index_3d(p, fftshifted=True)
    ft = torch.fft.ifftshift(num / (den + reg[shells]), dim=(0, 1))
    vol = torch.fft.fftshift(torch.fft.irfftn(ft, s=(p, p, p)))
    lo = p // 2 - d // 2
    box = vol[lo:lo + d, lo:lo + d, lo:lo + d]
    s = torch.sinc((torch.arange(d) - d // 2) / p) ** 2
    ref = box / (s[:, None, None] * s[None, :, None] * s[None, None, :]) * corner_mask(d)
    assert float(ref.abs().max()) > 0
    torch.testing.assert_close(ours, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)


@pytest.mark.parametrize("box", [7, 16])
def test_shell_table_equals_rounded_radius(box):
    """shell_index_3d's integer table gives round(|k| D) of the float radius, both orders."""
    for shifted in (False, True):
        ref = torch.round(rfft_radius_3d(box, shifted) * box).long()
        assert torch.equal(shell_index_3d(box, shifted), ref)
        assert torch.equal(shell_index_3d(box, shifted, rows=slice(2, 5)), ref[:, 2:5])
