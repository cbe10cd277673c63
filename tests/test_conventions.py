"""Each convention of docs/conventions.md against an independent implementation.

Every test here fails if its convention is off by a sign, a transpose or half a pixel.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import real_space_projection
from scipy.spatial.transform import Rotation
from torch_ctf import calculate_ctf_2d
from torch_fourier_shift import fourier_shift_image_2d
from torch_fourier_slice import project_3d_to_2d

from cryosplat import fourier, geometry
from cryosplat.ctf import CTFParams, ctf_rfft, electron_wavelength_A

RNG = np.random.default_rng(7)
EULERS = np.stack([RNG.uniform(-180, 180, 20), RNG.uniform(0, 180, 20),
                   RNG.uniform(-180, 180, 20)], -1)


# --- rotations -------------------------------------------------------------------------

def test_euler_to_matrix_matches_scipy_zyz_inverse():
    """RELION's A(rot, tilt, psi) is the inverse of scipy's intrinsic ZYZ rotation."""
    ours = geometry.euler_relion_to_matrix(torch.from_numpy(EULERS)).numpy()
    ref = Rotation.from_euler("ZYZ", EULERS, degrees=True).inv().as_matrix()
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    assert not np.allclose(ours, np.transpose(ref, (0, 2, 1)), atol=1e-3)


def test_viewing_direction_is_the_third_row():
    """RELION: the beam, in map coordinates, is (cos rot sin tilt, sin rot sin tilt, cos tilt)."""
    a = geometry.euler_relion_to_matrix(torch.from_numpy(EULERS)).numpy()
    rot, tilt = np.deg2rad(EULERS[:, 0]), np.deg2rad(EULERS[:, 1])
    beam = np.stack([np.cos(rot) * np.sin(tilt), np.sin(rot) * np.sin(tilt), np.cos(tilt)], -1)
    np.testing.assert_allclose(a[:, 2, :], beam, atol=1e-12)


def test_matrix_to_euler_round_trip_including_gimbal_lock():
    e = np.concatenate([EULERS, [[0, 0, 30], [0, 180, -40], [10, 1e-9, 20]]])
    a = geometry.euler_relion_to_matrix(torch.from_numpy(e))
    back = geometry.matrix_to_euler_relion(a)
    np.testing.assert_allclose(geometry.euler_relion_to_matrix(back).numpy(), a.numpy(), atol=1e-9)


def test_axis_angle_matches_scipy_rotvec_and_cryosparc_transposes():
    v = RNG.normal(size=(20, 3))
    np.testing.assert_allclose(geometry.axis_angle_to_matrix(torch.from_numpy(v)).numpy(),
                               Rotation.from_rotvec(v).as_matrix(), atol=1e-12)
    a = Rotation.from_euler("ZYZ", EULERS, degrees=True).inv()
    pose = a.inv().as_rotvec()  # cryoSPARC stores A^T
    np.testing.assert_allclose(geometry.cryosparc_pose_to_matrix(torch.from_numpy(pose)).numpy(),
                               a.as_matrix(), atol=1e-12)
    back = geometry.matrix_to_cryosparc_pose(torch.from_numpy(a.as_matrix()))
    np.testing.assert_allclose(Rotation.from_rotvec(back.numpy()).as_matrix(),
                               a.inv().as_matrix(), atol=1e-9)


def test_cryodrgn_rotation_is_relion_a():
    """cryoDRGN's R_from_relion (Ry Rb Ra with four sign flips, its utils.py) equals A."""
    for rot, tilt, psi in EULERS[:5]:
        a, b, y = np.deg2rad([rot, tilt, psi])
        ra = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        rb = np.array([[np.cos(b), 0, -np.sin(b)], [0, 1, 0], [np.sin(b), 0, np.cos(b)]])
        ry = np.array([[np.cos(y), -np.sin(y), 0], [np.sin(y), np.cos(y), 0], [0, 0, 1]])
        r = ry @ rb @ ra
        r[0, 1] *= -1; r[1, 0] *= -1; r[1, 2] *= -1; r[2, 1] *= -1  # noqa: E702
        ours = geometry.euler_relion_to_matrix(torch.tensor([rot, tilt, psi]))
        np.testing.assert_allclose(ours.numpy(), r, atol=1e-12)


def test_quaternion_round_trip():
    q = torch.from_numpy(RNG.normal(size=(50, 4)))
    m = geometry.quaternion_to_matrix(q)
    np.testing.assert_allclose(m.numpy(), Rotation.from_quat(q.numpy()[:, [1, 2, 3, 0]]).as_matrix(),
                               atol=1e-12)
    np.testing.assert_allclose(geometry.quaternion_to_matrix(geometry.matrix_to_quaternion(m)).numpy(),
                               m.numpy(), atol=1e-12)


# --- projection direction and the pixel origin ------------------------------------------

def lopsided_volume(d: int) -> tuple[np.ndarray, list[tuple[np.ndarray, float]]]:
    """Four Gaussian blobs of different mass at asymmetric positions (voxel units)."""
    blobs = [(np.array([8.0, 0, 0]), 1.0), (np.array([0, 5.0, 0]), 2.0),
             (np.array([0, 0, -6.0]), 3.0), (np.array([3.0, 3.0, 3.0]), 1.5)]
    z, y, x = np.meshgrid(*[np.arange(d) - d // 2] * 3, indexing="ij")
    vol = np.zeros((d, d, d))
    for mu, amp in blobs:
        vol += amp * np.exp(-((x - mu[0]) ** 2 + (y - mu[1]) ** 2 + (z - mu[2]) ** 2) / (2 * 1.5**2))
    return vol, blobs


def corr(a, b) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.mark.parametrize("euler", [(30.0, 50.0, 70.0), (-120.0, 100.0, 15.0), (75.0, 160.0, -45.0)])
def test_projection_direction_three_ways(euler):
    """torch-fourier-slice with A^T == real-space rotate-and-sum == the projected blob centres
    (first two rows of A mu); with A instead of A^T they disagree."""
    d = 32
    vol, blobs = lopsided_volume(d)
    a = geometry.euler_relion_to_matrix(torch.tensor(euler, dtype=torch.float64))
    real = real_space_projection(vol, a.numpy())
    tfs = project_3d_to_2d(torch.from_numpy(vol).float(),
                           geometry.fourier_slice_matrices(a).float()).numpy()
    assert corr(real, tfs) > 0.99
    wrong = project_3d_to_2d(torch.from_numpy(vol).float(), a.float()).numpy()
    assert corr(real, wrong) < 0.9
    # the heaviest blob (mass 3 at z = -6) lands at the first two rows of A mu
    y, x = np.mgrid[:d, :d] - d // 2
    mu2 = (a.numpy() @ blobs[2][0])[:2]
    near = (x - mu2[0]) ** 2 + (y - mu2[1]) ** 2 < 1.0
    assert tfs[near].max() > np.percentile(tfs, 90)


@pytest.mark.parametrize("d", [31, 32])
def test_pixel_origin_is_d_over_2_in_grid_and_fourier_slice(d):
    """A blob at coordinate 0 is at index D//2: our grid, torch-fourier-slice, and the FFT."""
    c = geometry.grid_1d_A(d, 1.0, dtype=torch.float64)
    assert c[d // 2] == 0 and c[0] == -(d // 2)
    vol = np.zeros((d, d, d))
    vol[d // 2, d // 2, d // 2] = 1.0
    proj = project_3d_to_2d(torch.from_numpy(vol).float(), torch.eye(3)).numpy()
    assert np.unravel_index(proj.argmax(), proj.shape) == (d // 2, d // 2)
    # an image centred at D//2 has a real (zero-phase) transform after ifftshift
    y, x = np.meshgrid(c.numpy(), c.numpy(), indexing="ij")
    g = np.exp(-(x**2 + y**2) / 8)
    f = np.fft.fft2(np.fft.ifftshift(g))
    assert np.abs(f.imag).max() < 1e-9 * np.abs(f).max()


# --- shifts ------------------------------------------------------------------------------

def test_origin_sign_particle_sits_at_minus_origin():
    """RELION: a positive rlnOriginX means the particle sits at negative x; the forward model
    translates the centred projection by -origin. Checked by centroid and torch-fourier-shift."""
    d, pix = 32, 1.5
    c = geometry.grid_1d_A(d, pix, dtype=torch.float64)
    y, x = torch.meshgrid(c, c, indexing="ij")
    centred = torch.exp(-(x**2 + y**2) / (2 * 3.0**2))
    origin_A = torch.tensor([4.5, -3.0], dtype=torch.float64)  # 3 px, -2 px
    img = geometry.translate_images(centred, geometry.origin_to_translation_A(origin_A), pix)
    cx, cy = float((img * x).sum() / img.sum()), float((img * y).sum() / img.sum())
    assert cx == pytest.approx(-4.5, abs=1e-6) and cy == pytest.approx(3.0, abs=1e-6)
    ref = fourier_shift_image_2d(centred, shifts=torch.tensor([2.0, -3.0], dtype=torch.float64))
    torch.testing.assert_close(img, ref, atol=1e-6, rtol=0)  # torch-fourier-shift works in float32


def test_origin_unit_conversions():
    o = torch.tensor([[3.0, -1.5]], dtype=torch.float64)
    assert torch.allclose(geometry.origin_px_to_A(o, torch.tensor([1.2])), o * 1.2)
    assert torch.allclose(geometry.cryodrgn_trans_to_origin_A(o / 64, 64, 1.2), o * 1.2)
    assert torch.allclose(geometry.origin_A_to_cryodrgn_trans(o * 1.2, 64, 1.2), o / 64)


# --- CTF ---------------------------------------------------------------------------------

def params(u=15000.0, v=12000.0, angle=30.0, kv=300.0, cs=2.7, q0=0.1, phase=20.0, b=0.0, s=1.0):
    return CTFParams(*[torch.tensor([x], dtype=torch.float64) for x in (u, v, angle, kv, cs, q0, phase, b, s)])


def test_ctf_matches_torch_ctf_including_astigmatism_angle_and_sign():
    d, pix = 64, 1.5
    ours = ctf_rfft(params(), d, pix)[0]
    ref = calculate_ctf_2d(defocus=1.35, astigmatism=0.15, astigmatism_angle=30.0, voltage=300.0,
                           spherical_aberration=2.7, amplitude_contrast=0.1, phase_shift=20.0,
                           pixel_size=pix, image_shape=(d, d), rfft=True, fftshift=False)
    ref = ref.squeeze().double()
    assert (ours - ref).abs().max() < 2e-3
    assert (ctf_rfft(params(angle=-30.0), d, pix)[0] - ref).abs().max() > 0.5
    assert (ctf_rfft(params(u=12000.0, v=15000.0), d, pix)[0] - ref).abs().max() > 0.5


def test_ctf_known_values():
    # k = 0: sin(atan(Q0/sqrt(1-Q0^2))) = Q0, positive (RELION: the molecule bright)
    assert float(ctf_rfft(params(phase=0.0), 64, 1.0)[0, 0, 0]) == pytest.approx(0.1, abs=1e-12)
    # wavelength at 300 kV is 0.019687 Å
    assert float(electron_wavelength_A(torch.tensor(300.0, dtype=torch.float64))) == pytest.approx(0.0196875, abs=1e-6)
    # first zero without Cs, astigmatism or phase plate: pi lam df k^2 + atan(..) = pi
    d, pix, df = 256, 1.0, 20000.0
    lam = 0.0196875
    k0 = math.sqrt((math.pi - math.atan(0.1 / math.sqrt(0.99))) / (math.pi * lam * df))
    c = ctf_rfft(params(u=df, v=df, cs=0.0, phase=0.0), d, pix)[0, 0]  # ky = 0 row
    kx = torch.fft.rfftfreq(d, d=pix, dtype=torch.float64)
    sign_change = int(torch.nonzero(c[:-1] * c[1:] < 0)[0])
    assert kx[sign_change] <= k0 <= kx[sign_change + 1]
    # B-factor envelope exp(-B k^2 / 4), scale multiplies
    c1 = ctf_rfft(params(b=100.0, s=0.5), d, pix)[0]
    c0 = ctf_rfft(params(), d, pix)[0]
    k2 = fourier.rfft_frequencies_2d(d, pix, dtype=torch.float64).pow(2).sum(-1)
    torch.testing.assert_close(c1, 0.5 * torch.exp(-100.0 * k2 / 4) * c0)
    # defocus U acts along the astigmatism angle: at angle 0 the x axis sees defocus U
    cu = ctf_rfft(params(u=20000.0, v=10000.0, angle=0.0, cs=0.0, phase=0.0), d, pix)[0, 0]
    ref = ctf_rfft(params(u=20000.0, v=20000.0, angle=0.0, cs=0.0, phase=0.0), d, pix)[0, 0]
    torch.testing.assert_close(cu, ref)
