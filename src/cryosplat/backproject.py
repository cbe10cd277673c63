"""Direct Fourier inversion with known poses and CTF: the baseline of every Gaussian result,
and the half-sets' unbiased maps that cross-validate it.

Each particle's transform, shifted back by ``+origin`` and multiplied by its CTF, is inserted
as a central slice (trilinear, up to the box's Nyquist) into a 2x padded 3D transform, and so
is its CTF², in one pass (:func:`insert_slices`, equal to torch-fourier-slice's insertion). The map is ``sum CTF F / (sum CTF² + 1/SNR(k))`` (Wiener-style), where ``SNR(k)``
comes from the half-maps' FSC of a first, lightly regularised pass; then the gridding
correction (sinc²) and a crop back to the box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cryosplat import geometry
from cryosplat.ctf import ctf_rfft
from cryosplat.evaluate import fsc
from cryosplat.fourier import shell_index_3d
from cryosplat.io.particles import Particles


@dataclass
class Insertion:
    """Accumulated ``sum CTF F`` and ``sum CTF²`` on a padded, fftshifted rfft grid."""

    numerator: torch.Tensor  # (P, P, P//2+1) complex
    denominator: torch.Tensor  # (P, P, P//2+1) real
    box_size: int
    padded_size: int

    def __add__(self, other: "Insertion") -> "Insertion":
        return Insertion(self.numerator + other.numerator, self.denominator + other.denominator,
                         self.box_size, self.padded_size)


def slice_points(padded_size: int, max_radius: float | None,
                 device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The points of a `(P, P//2+1)` unshifted rfft2 that one central slice inserts.

    Every point with ``|k| <= max_radius`` (in grid units; None: all), except those at
    ``kx = 0, ky < 0``, which are the Friedel mates of the ``ky > 0`` ones. Returns their flat
    indices into the rfft2 and their integer frequencies ``ky``, ``kx`` (float32), each `(K,)`.
    """
    p = padded_size
    ky = torch.fft.fftfreq(p, 1 / p, device=device)  # integer frequencies, unshifted
    kx = torch.arange(p // 2 + 1, device=device, dtype=ky.dtype)
    grid_y, grid_x = (g.flatten() for g in torch.meshgrid(ky, kx, indexing="ij"))
    keep = ~((grid_x == 0) & (grid_y < 0))
    if max_radius is not None:
        keep &= grid_y**2 + grid_x**2 <= max_radius**2
    flat = keep.nonzero()[:, 0]
    return flat, grid_y[flat].float(), grid_x[flat].float()


def accumulators(padded_size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed flat accumulators for :func:`insert_slices`: ``sum CTF F`` (complex64) and
    ``sum CTF²`` (float32), each the `(P, P, P//2+1)` fftshifted rfftn grid flattened plus a
    margin that takes the zero-weight corners past the grid's last voxel."""
    p = padded_size
    n = p * p * (p // 2 + 1) + (p + 1) * (p // 2 + 1) + 1
    return (torch.zeros(n, dtype=torch.complex64, device=device),
            torch.zeros(n, dtype=torch.float32, device=device))


def grid_view(accumulator: torch.Tensor, padded_size: int) -> torch.Tensor:
    """The `(P, P, P//2+1)` grid of an :func:`accumulators` tensor (without its margin)."""
    p = padded_size
    return accumulator[: p * p * (p // 2 + 1)].view(p, p, p // 2 + 1)


def insert_slices(numerator: torch.Tensor, denominator: torch.Tensor, slices: torch.Tensor,
                  ctf2: torch.Tensor, matrices: torch.Tensor,
                  points: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """Add central slices to a padded 3D transform with trilinear weights, in place.

    Parameters
    ----------
    numerator, denominator: :func:`accumulators`: ``sum CTF F`` and ``sum CTF²`` on the
        fftshifted rfftn grid (z and y shifted, index = frequency + P//2; x unshifted).
    slices: `(B, P, P//2+1)` complex, ``CTF x F`` on the unshifted rfft2 grid.
    ctf2: `(B, P, P//2+1)` real, ``CTF²`` on the same grid.
    matrices: `(B, 3, 3)` xyz matrices ``M`` (torch-fourier-slice's): slice point
        ``(kx, ky)`` lands at ``M (kx, ky, 0)``.
    points: :func:`slice_points` of this grid.

    A point that lands at ``x < 0`` is inserted, conjugated, at its Friedel mate ``-k``. The
    x = 0 plane holds one half of its Hermitian pairs until :func:`hermitian_x0` completes it.
    Points whose trilinear cube leaves the grid are dropped, as torch-fourier-slice does.
    Each corner is one ``scatter_add_`` of complex and one of real values, which on one CPU
    thread is 5x faster than a scatter of (Re, Im, CTF²) triples (whose index is 3x longer).
    """
    p = slices.shape[-2]
    w = p // 2 + 1
    flat, ky, kx = points
    b = slices.shape[0]
    data = slices.reshape(b, -1)[:, flat].to(torch.complex64)
    weight = ctf2.reshape(b, -1)[:, flat].float()
    m = matrices.float()
    xyz = m[:, None, :, 0] * kx[None, :, None] + m[:, None, :, 1] * ky[None, :, None]  # (B, K, 3)
    flip = xyz[..., 0] < 0  # Friedel: insert conj(F(k)) at -k
    xyz = torch.where(flip[..., None], -xyz, xyz)
    data = torch.where(flip, data.conj(), data)
    x, y, z = xyz[..., 0], xyz[..., 1] + p // 2, xyz[..., 2] + p // 2
    inside = (y >= 0) & (y <= p - 1) & (z >= 0) & (z <= p - 1) & (x <= w - 1)
    data, weight = (data * inside).reshape(-1), (weight * inside).reshape(-1)
    x0, y0, z0 = x.floor(), y.floor(), z.floor()
    fx, fy, fz = ((f - f0).reshape(-1) for f, f0 in ((x, x0), (y, y0), (z, z0)))
    # outside points have weight 0; clamping keeps their index on the grid
    voxel = ((z0.clamp(0, p - 1) * p + y0.clamp(0, p - 1)) * w
             + x0.clamp(0, w - 1)).long().reshape(-1)
    for dz, wz in ((0, 1 - fz), (1, fz)):
        for dy, wy in ((0, 1 - fy), (1, fy)):
            wzy = wz * wy
            for dx, wx in ((0, 1 - fx), (1, fx)):
                idx = voxel + ((dz * p + dy) * w + dx)  # past the grid: the margin, weight 0
                c = wzy * wx
                numerator.scatter_add_(0, idx, data * c)
                denominator.scatter_add_(0, idx, weight * c)


def hermitian_x0(volume: torch.Tensor) -> torch.Tensor:
    """Complete, in place, the Hermitian pairs of the x = 0 plane of an fftshifted rfftn
    `(P, P, P//2+1)` that :func:`insert_slices` filled: each ``(kz, ky, 0)`` also receives the
    conjugate of ``(-kz, -ky, 0)``, the origin excepted (what torch-fourier-slice does point
    by point). Returns ``volume``."""
    p = volume.shape[0]
    plane = volume[..., 0].clone()
    mirror = torch.roll(plane.flip(0, 1), shifts=(1, 1), dims=(0, 1))  # index i -> (P - i) % P
    volume[..., 0] = plane + (mirror.conj() if plane.is_complex() else mirror)
    volume[p // 2, p // 2, 0] = plane[p // 2, p // 2]
    return volume


def insert_particles(particles: Particles, indices: np.ndarray, pad_factor: int = 2,
                     batch_size: int = 64, device: str | torch.device = "cpu",
                     progress=None) -> Insertion:
    """Insert particles ``indices`` (poses, shifts, CTF from ``particles``): each image is
    padded to ``pad_factor`` x its box, transformed, shifted back by ``+origin``, multiplied by
    its CTF and inserted (:func:`insert_slices`) with its CTF², up to the box's Nyquist
    (RELION's ``r_max``), not the 2D corners beyond it."""
    d = particles.box_size
    p = pad_factor * d
    before = p // 2 - d // 2  # the image's centre pixel D//2 lands on the padded centre P//2
    num, den = accumulators(p, device)
    points = slice_points(p, p / 2, device)
    rotations = particles.require_poses()
    ctf = particles.require_ctf()
    for s in range(0, len(indices), batch_size):
        idx = np.asarray(indices[s:s + batch_size])
        t = torch.from_numpy(idx)
        pix = particles.pixel_size_A[t].to(device)
        images = particles.read_images(idx).to(device)
        images = F.pad(images, [before, p - d - before] * 2)
        f = torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))
        shifts = particles.shifts_A[t].float().to(device)
        f = geometry.translate_rfft(f, shifts, pix.float(), p)  # undo the -origin shift
        c = ctf_rfft(ctf[t].to(device, torch.float32), p, pix.float())  # float32: phase error ~1e-5 rad
        m = geometry.fourier_slice_matrices(rotations[t]).float().to(device)
        insert_slices(num, den, c * f, c * c, m, points)
        if progress is not None:
            progress(len(idx))
    return Insertion(hermitian_x0(grid_view(num, p)), hermitian_x0(grid_view(den, p)), d, p)


def invert(ins: Insertion, regulariser: torch.Tensor | float) -> torch.Tensor:
    """``sum CTF F / (sum CTF² + regulariser)`` back to a `(D, D, D)` map.

    ``regulariser`` is a scalar or a grid shaped like ``ins.denominator``.

    The gridding correction (division by sinc², the trilinear kernel's transform on the
    padded box) is needed even though numerator and denominator share the trilinear weights:
    without it a blob 0.35 box from the centre keeps 0.90 of its mass
    (tests/test_backproject.py). Leaving it out raises the FSC against the truth (box 96,
    SNR 0.05: 4.13 instead of 4.25 Å at 0.5) only because the uncorrected map is windowed,
    which damps the solvent noise as a soft mask would.
    """
    total = ins.denominator + regulariser
    ft = torch.where(total > 0, ins.numerator / total.clamp_min(1e-30), torch.zeros_like(ins.numerator))
    p, d = ins.padded_size, ins.box_size
    ft = torch.fft.ifftshift(ft, dim=(-3, -2))
    vol = torch.fft.irfftn(ft, s=(p, p, p), dim=(-3, -2, -1))  # unshifted: centre at voxel 0
    # the box's voxels (D//2 either side of the centre), gathered axis by axis, and the
    # separable sinc² of the padded box on them only (no padded-size grid is made)
    keep = (torch.arange(d, device=vol.device) - d // 2) % p
    vol = vol[keep][:, keep][:, :, keep]
    s = torch.sinc(torch.fft.fftfreq(p, device=vol.device)[keep].to(vol.dtype)) ** 2
    return (vol / (s[:, None, None] * s[None, :, None] * s[None, None, :])).contiguous()


def wiener_regulariser(half1: Insertion, half2: Insertion) -> torch.Tensor:
    """``1/SNR(k)`` for the full set on the padded grid, from a first pass's half-map FSC.

    ``SNR_full = 2 FSC / (1 - FSC)`` (the full set doubles the half-sets' SNR); the
    regulariser is the shell's mean ``sum CTF²`` divided by it (RELION's tau² idea).
    """
    eps = 1e-3 * float(half1.denominator.mean() + half2.denominator.mean())
    f = fsc(invert(half1, eps), invert(half2, eps)).double()
    f = f.clamp(1e-3, 0.999)
    snr_full = 2 * f / (1 - f)
    # padded-grid shell r is box shell r * D / P (beyond Nyquist: the last shell's SNR)
    grid_shells = shell_index_3d(half1.padded_size, fftshifted=True,
                                 device=half1.denominator.device)
    shells = grid_shells.flatten()
    n_shells = int(shells.max()) + 1
    scale = half1.box_size / half1.padded_size
    box_shell = torch.clamp((torch.arange(n_shells) * scale).round().long(), max=len(f) - 1)
    den = (half1.denominator + half2.denominator).double().flatten()
    counts = torch.bincount(shells, minlength=n_shells).clamp_min(1)
    mean_den = torch.bincount(shells, weights=den, minlength=n_shells) / counts
    # shells no slice reached (the padded grid's corners) keep the first pass's eps
    per_shell = (mean_den / snr_full[box_shell]).clamp_min(eps).float()
    return per_shell[grid_shells]


@dataclass
class Backprojection:
    map: torch.Tensor
    half_map_1: torch.Tensor
    half_map_2: torch.Tensor
    fsc: torch.Tensor


def backproject(particles: Particles, half_set: np.ndarray, batch_size: int = 64,
                device: str | torch.device = "cpu", progress=None) -> Backprojection:
    """Direct Fourier inversion of the two half-sets separately and together."""
    i1, i2 = np.nonzero(half_set == 1)[0], np.nonzero(half_set == 2)[0]
    h1 = insert_particles(particles, i1, batch_size=batch_size, device=device, progress=progress)
    h2 = insert_particles(particles, i2, batch_size=batch_size, device=device, progress=progress)
    reg = wiener_regulariser(h1, h2)
    m1, m2 = invert(h1, reg / 2), invert(h2, reg / 2)  # each half holds half the CTF²
    full = invert(h1 + h2, reg)
    return Backprojection(full, m1, m2, fsc(m1, m2))
