"""Direct Fourier inversion with known poses and CTF: the baseline of every Gaussian result,
and the half-sets' unbiased maps that cross-validate it.

As RELION's ``relion_reconstruct`` does, each particle's `(D, D)` transform, shifted back by
``+origin`` and multiplied by its CTF (both on the image's own grid), is inserted as a central
slice (trilinear, up to the box's Nyquist) into a 2x padded 3D transform at twice its
frequency index, and so is its CTF², in one pass (:func:`insert_slices`, equal to
torch-fourier-slice's insertion). The map is ``sum CTF F / (sum CTF² + 1/SNR(k))``
(Wiener-style), where ``SNR(k)`` comes from the half-maps' FSC of a first, lightly
regularised pass; then the gridding correction (sinc²), a crop back to the box, and RELION's
soft mask of the corners beyond radius D/2 (:func:`corner_mask`), where the periodic copies
of each unpadded slice alias.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cryosplat import geometry
from cryosplat.ctf import wiener_terms
from cryosplat.evaluate import fsc, spherical_mask
from cryosplat.fourier import shell_index_3d
from cryosplat.io.particles import Particles


@dataclass
class Insertion:
    """Accumulated ``sum CTF F`` and ``sum CTF²`` on a padded, fftshifted rfft grid."""

    numerator: torch.Tensor  # (P, P, P//2+1) complex
    denominator: torch.Tensor  # (P, P, P//2+1) real
    box_size: int
    padded_size: int


def slice_points(size: int, max_radius: float | None,
                 device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The points of a `(S, S//2+1)` unshifted rfft2 that one central slice inserts.

    Every point with ``|k| <= max_radius`` (in grid units; None: all), except those at
    ``kx = 0, ky < 0``, which are the Friedel mates of the ``ky > 0`` ones. Returns their flat
    indices into the rfft2 and their integer frequencies ``ky``, ``kx`` (float32), each `(K,)`.
    """
    ky = torch.fft.fftfreq(size, 1 / size, device=device)  # integer frequencies, unshifted
    kx = torch.arange(size // 2 + 1, device=device, dtype=ky.dtype)
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
                  points: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                  padded_size: int) -> None:
    """Add central slices to a padded 3D transform with trilinear weights, in place.

    Parameters
    ----------
    numerator, denominator: :func:`accumulators` of ``padded_size``: ``sum CTF F`` and
        ``sum CTF²`` on the fftshifted rfftn grid (z and y shifted, index = frequency + P//2;
        x unshifted).
    slices: `(B, S, S//2+1)` complex, ``CTF x F`` on the unshifted rfft2 grid of an `S`-pixel
        image; its frequency index ``k`` lands at ``k x P / S`` on the padded grid (the same
        frequency in cycles per pixel).
    ctf2: `(B, S, S//2+1)` real, ``CTF²`` on the same grid.
    matrices: `(B, 3, 3)` xyz matrices ``M`` (torch-fourier-slice's): slice point
        ``(kx, ky)`` lands at ``M (kx, ky, 0)``.
    points: :func:`slice_points` of the slice's grid.
    padded_size: `P`.

    A point that lands at ``x < 0`` is inserted, conjugated, at its Friedel mate ``-k``. The
    x = 0 plane holds one half of its Hermitian pairs until :func:`hermitian_x0` completes it.
    Points whose trilinear cube leaves the grid are dropped, as torch-fourier-slice does.
    Each corner is one ``scatter_add_`` of complex and one of real values, which on one CPU
    thread is 5x faster than a scatter of (Re, Im, CTF²) triples (whose index is 3x longer).
    """
    p = padded_size
    w = p // 2 + 1
    flat, ky, kx = points
    b = slices.shape[0]
    data = slices.reshape(b, -1)[:, flat].to(torch.complex64)
    weight = ctf2.reshape(b, -1)[:, flat].float()
    m = matrices.float() * (p / slices.shape[-2])
    xyz = m[:, None, :, 0] * kx[None, :, None] + m[:, None, :, 1] * ky[None, :, None]  # (B, K, 3)
    flip = xyz[..., 0] < 0  # Friedel: insert conj(F(k)) at -k
    xyz = torch.where(flip[..., None], -xyz, xyz)
    data = torch.where(flip, data.conj(), data)
    x, y, z = xyz[..., 0], xyz[..., 1] + p // 2, xyz[..., 2] + p // 2
    inside = (y >= 0) & (y <= p - 1) & (z >= 0) & (z <= p - 1) & (x <= w - 1)
    data, weight = (data * inside).reshape(-1), (weight * inside).reshape(-1)
    x0, y0, z0 = x.floor(), y.floor(), z.floor()
    fx, fy, fz = ((f - f0).reshape(-1) for f, f0 in ((x, x0), (y, y0), (z, z0)))
    # outside points have weight 0; clamping keeps their index on the grid. Integer
    # arithmetic: a float32 index is exact only below 2^24 (a padded grid of P < 320)
    zi, yi, xi = (f.clamp(0, hi).long() for f, hi in ((z0, p - 1), (y0, p - 1), (x0, w - 1)))
    voxel = ((zi * p + yi) * w + xi).reshape(-1)
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


def symmetrise(ins: Insertion, symmetry: torch.Tensor | None, slab: int = 16) -> Insertion:
    """The sums a map with the point group ``symmetry`` `(G, 3, 3)` gathers, in place:
    ``sum_S A(S k)`` for both accumulators ``A`` (as RELION's backprojector symmetrises its
    data and weights). ``A(S k)`` is read by trilinear interpolation of the padded grid, at
    the Friedel mate ``-S k``, conjugated, where ``S k`` has ``x < 0``. A map ``V`` then
    satisfies ``V(S r) = V(r)``, r = (x, y, z) (:mod:`cryosplat.symmetry`). ``slab`` z-planes
    are resampled at a time. Returns ``ins``; nothing happens for None or one matrix."""
    if symmetry is None or len(symmetry) == 1:
        return ins
    p, w = ins.padded_size, ins.padded_size // 2 + 1
    dev = ins.denominator.device
    src = torch.stack([ins.numerator.real, ins.numerator.imag, ins.denominator.float()])[None]
    out = torch.zeros((3, p, p, w), device=dev)
    k = torch.arange(p, device=dev, dtype=torch.float32) - p // 2
    kx = torch.arange(w, device=dev, dtype=torch.float32)
    scale = torch.tensor([2 / (w - 1), 2 / (p - 1), 2 / (p - 1)], device=dev)
    centre = torch.tensor([0.0, p // 2, p // 2], device=dev)
    for z0 in range(0, p, slab):
        zz, yy, xx = torch.meshgrid(k[z0:z0 + slab], k, kx, indexing="ij")
        q = torch.stack([xx, yy, zz], -1)  # (slab, P, W, 3) xyz frequencies, padded units
        for s_ in symmetry.to(dev, torch.float32):
            r = q @ s_.T
            flip = r[..., 0] < 0
            r = torch.where(flip[..., None], -r, r)
            grid = (r + centre) * scale - 1  # grid_sample's (x, y, z) in [-1, 1]
            v = F.grid_sample(src, grid[None], mode="bilinear", padding_mode="zeros",
                              align_corners=True)[0]
            v[1] = torch.where(flip, -v[1], v[1])
            out[:, z0:z0 + slab] += v
    ins.numerator.copy_(torch.complex(out[0], out[1]))
    ins.denominator.copy_(out[2])
    return ins


def insert_particles(particles: Particles, indices: np.ndarray, pad_factor: int = 2,
                     batch_size: int = 64, device: str | torch.device = "cpu",
                     progress=None, symmetry: torch.Tensor | None = None) -> Insertion:
    """Insert particles ``indices`` (poses, shifts, CTF from ``particles``): each `(D, D)`
    image is transformed, shifted back by ``+origin``, multiplied by its CTF and
    ``exp(-i Phi)`` where there are odd aberrations (:func:`cryosplat.ctf.wiener_terms`; no
    CTF for a CTF-premultiplied image) and inserted (:func:`insert_slices`) with its CTF² at ``A^T (M k, 0)`` (anisotropic
    magnification ``M``, :func:`cryosplat.geometry.image_matrices`) into a ``pad_factor`` x padded grid, up to the
    box's Nyquist (RELION's ``r_max``), not the 2D corners beyond it; then symmetrised by
    ``symmetry`` (:func:`symmetrise`), when given."""
    d = particles.box_size
    p = pad_factor * d
    num, den = accumulators(p, device)
    points = slice_points(d, d / 2, device)
    rotations = particles.require_poses()
    ctf = particles.require_ctf()
    for s in range(0, len(indices), batch_size):
        idx = np.asarray(indices[s:s + batch_size])
        t = torch.from_numpy(idx)
        pix = particles.pixel_size_A[t].to(device).float()
        images = particles.read_images(idx).to(device)
        f = torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))  # pixel D//2 at 0
        shifts = particles.shifts_A[t].float().to(device)
        f = geometry.translate_rfft(f, shifts, pix, d)  # undo the -origin shift
        c = ctf[t].to(device, torch.float32)  # float32: phase error ~1e-5 rad
        factor, weight = wiener_terms(c, d, pix)  # CTF exp(-i Phi), CTF²
        m = geometry.fourier_slice_matrices(
            geometry.image_matrices(rotations[t].to(device), c.mag_matrix)).float()
        insert_slices(num, den, factor * f, weight, m, points, p)
        if progress is not None:
            progress(len(idx))
    return symmetrise(Insertion(hermitian_x0(grid_view(num, p)),
                                hermitian_x0(grid_view(den, p)), d, p), symmetry)


def corner_mask(box_size: int, device=None) -> torch.Tensor:
    """RELION's mask of a reconstruction's corners: 1 inside radius D/2 voxels, a raised
    cosine to 0 over the next 3 voxels, 0 beyond (``softMaskOutsideMap``'s defaults;
    measured on a relion_reconstruct map: flat to 48, 0.16 at 50, 0 from 51 in a box of 96).
    `(D, D, D)`."""
    return spherical_mask(box_size, 1.0, radius_A=box_size / 2, soft_edge_A=3.0).to(device)


def _row_blocks(padded_size: int, budget: int = 1 << 23) -> list[slice]:
    """The blocks of y rows that :func:`invert` and :func:`wiener_regulariser` take at a time
    from a `(P, P, P//2+1)` grid: each about ``budget`` elements."""
    p = padded_size
    step = max(1, budget // (p * (p // 2 + 1)))
    return [slice(y, min(y + step, p)) for y in range(0, p, step)]


def invert(ins: Insertion, regulariser: torch.Tensor | float) -> torch.Tensor:
    """``sum CTF F / (sum CTF² + regulariser)`` back to a `(D, D, D)` map.

    ``regulariser``: a scalar, or one value per shell of the padded grid
    (``fourier.shell_index_3d(P, fftshifted=True)``), as :func:`wiener_regulariser` gives.

    The inverse transform is taken one axis at a time (z, y, then x), keeping after each only
    the box's D voxels (D//2 either side of the centre): the padded volume, 8x the box, is
    never made, and the z pass runs on blocks of y rows, so the quotient is never whole either.
    Then the gridding correction (division by sinc², the trilinear kernel's transform on the
    padded box) on those voxels, and the :func:`corner_mask`. The correction is needed even
    though numerator and denominator share the trilinear weights: without it a blob 0.35 box
    from the centre keeps 0.90 of its mass (tests/test_backproject.py).
    """
    p, d = ins.padded_size, ins.box_size
    w = p // 2 + 1
    dev = ins.numerator.device
    keep = (torch.arange(d, device=dev) - d // 2) % p  # the box's voxels, unshifted order
    # the inverse transform of an fftshifted axis is that of the unshifted axis times
    # exp(-2 pi i (P//2) n / P) at voxel n: no shifted copy is made
    phase = torch.exp(-2j * torch.pi * (p // 2) * keep.double() / p).to(torch.complex64)
    per_shell = torch.is_tensor(regulariser)
    zy = torch.empty(d, p, w, dtype=torch.complex64, device=dev)
    for rows in _row_blocks(p):
        total = ins.denominator[:, rows]
        total = total + (regulariser[shell_index_3d(p, True, dev, rows)] if per_shell
                         else regulariser)
        scale = torch.where(total > 0, total.clamp_min(1e-30).reciprocal(), 0)
        ft = torch.view_as_complex(torch.view_as_real(ins.numerator[:, rows]) * scale[..., None])
        zy[:, rows] = torch.fft.ifft(ft, dim=0)[keep] * phase[:, None, None]
    zy = torch.fft.ifft(zy, dim=1)[:, keep] * phase[None, :, None]
    vol = torch.fft.irfft(zy, n=p, dim=2)[..., keep]
    s = torch.sinc(torch.fft.fftfreq(p, device=dev)[keep].to(vol.dtype)) ** 2
    vol = vol / (s[:, None, None] * s[None, :, None] * s[None, None, :])
    return (vol * corner_mask(d, dev)).contiguous()


def wiener_regulariser(half1: Insertion, half2: Insertion) -> torch.Tensor:
    """``1/SNR(k)`` for the full set, one value per shell of the padded grid
    (``fourier.shell_index_3d(P, fftshifted=True)``), from a first pass's half-map FSC.

    ``SNR_full = 2 FSC / (1 - FSC)`` (the full set doubles the half-sets' SNR), with the FSC
    averaged over 5 neighbouring shells; the regulariser is the shell's mean ``sum CTF²``
    divided by it (RELION's tau² idea).
    """
    eps = 1e-3 * float(half1.denominator.mean() + half2.denominator.mean())
    f = fsc(invert(half1, eps), invert(half2, eps)).double()
    # a running mean over 5 shells: where the FSC is near 0 its noise (~1/sqrt(voxels in
    # the shell)) is as large as its value, and one shell read as 0 would take that shell's
    # signal out of the map (box 256, 300 particles: FSC against the truth 0.09 at shells
    # 68-70 between 0.33 and 0.24 without it, 0.18 and 0.10 with it)
    f = torch.cat([f[:1], F.avg_pool1d(f[None, None], 5, 1, 2, count_include_pad=False)[0, 0, 1:]])
    f = f.clamp(1e-3, 0.999)
    snr_full = 2 * f / (1 - f)
    p, dev = half1.padded_size, half1.denominator.device
    n_shells = int(np.ceil(np.sqrt(3) * (p // 2))) + 1
    sums = torch.zeros(n_shells, dtype=torch.float64, device=dev)
    counts = torch.zeros(n_shells, dtype=torch.float64, device=dev)
    for rows in _row_blocks(p):
        shells = shell_index_3d(p, True, dev, rows).flatten()
        den = (half1.denominator[:, rows] + half2.denominator[:, rows]).flatten().double()
        sums += torch.bincount(shells, weights=den, minlength=n_shells)
        counts += torch.bincount(shells, minlength=n_shells)
    mean_den = sums / counts.clamp_min(1)
    # padded-grid shell r is box shell r * D / P (beyond Nyquist: the last shell's SNR)
    scale = half1.box_size / p
    box_shell = torch.clamp((torch.arange(n_shells, device=dev) * scale).round().long(),
                            max=len(f) - 1)
    # shells no slice reached (the padded grid's corners) keep the first pass's eps
    return (mean_den / snr_full.to(dev)[box_shell]).clamp_min(eps).float()


@dataclass
class Backprojection:
    map: torch.Tensor
    half_map_1: torch.Tensor
    half_map_2: torch.Tensor
    fsc: torch.Tensor


def direct_maps(half1: Insertion, half2: Insertion) -> Backprojection:
    """The Wiener-regularised maps of two half-sets' insertions and of their sum. ``half1``
    becomes the sum (in place: no third padded grid); pass copies to keep it."""
    reg = wiener_regulariser(half1, half2)
    m1, m2 = invert(half1, reg / 2), invert(half2, reg / 2)  # each half holds half the CTF²
    half1.numerator += half2.numerator
    half1.denominator += half2.denominator
    full = invert(half1, reg)
    return Backprojection(full, m1, m2, fsc(m1, m2))


def backproject(particles: Particles, half_set: np.ndarray, batch_size: int = 64,
                device: str | torch.device = "cpu", progress=None,
                symmetry: torch.Tensor | None = None) -> Backprojection:
    """Direct Fourier inversion of the two half-sets separately and together, each
    symmetrised by ``symmetry`` `(G, 3, 3)` when given."""
    i1, i2 = np.nonzero(half_set == 1)[0], np.nonzero(half_set == 2)[0]
    h1, h2 = (insert_particles(particles, i, batch_size=batch_size, device=device,
                               progress=progress, symmetry=symmetry) for i in (i1, i2))
    return direct_maps(h1, h2)
