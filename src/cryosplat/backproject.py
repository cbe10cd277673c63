"""Direct Fourier inversion with known poses and CTF: the baseline of every Gaussian result,
and the half-sets' unbiased maps that cross-validate it.

As RELION's ``relion_reconstruct`` does, each particle's `(D, D)` transform, shifted back by
``+origin`` and multiplied by its CTF (both on the image's own grid), is inserted as a central
slice (trilinear, up to the box's Nyquist) into a 2x padded 3D transform at twice its
frequency index, and so is its CTF², in one pass (the padded grid's insertion,
:meth:`cryosplat.fourier_slice.PaddedGrid.insert`, equal to torch-fourier-slice's). The map
is ``sum CTF F / (sum CTF² + 1/SNR(k))`` (Wiener-style), where ``SNR(k)`` comes from the
half-maps' FSC of a first, lightly regularised pass; then the gridding correction (sinc²),
a crop back to the box, and RELION's soft mask of the corners beyond radius D/2
(:func:`corner_mask`), where the periodic copies of each unpadded slice alias.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cryosplat import geometry
from cryosplat.ctf import wiener_terms
from cryosplat.evaluate import fsc, spherical_mask
from cryosplat.fourier_slice import Insertion, PaddedGrid, hermitian_x0, slice_points
from cryosplat.io.particles import Particles


def insert_particles(particles: Particles, indices: np.ndarray, pad_factor: int = 2,
                     batch_size: int = 64, device: str | torch.device = "cpu",
                     progress=None, symmetry: torch.Tensor | None = None) -> Insertion:
    """Insert particles ``indices`` (poses, shifts, CTF from ``particles``): each `(D, D)`
    image is transformed, shifted back by ``+origin``, multiplied by its CTF and
    ``exp(-i Phi)`` where there are odd aberrations (:func:`cryosplat.ctf.wiener_terms`; no
    CTF for a CTF-premultiplied image) and inserted
    (:meth:`~cryosplat.fourier_slice.PaddedGrid.insert`) with its CTF² at ``A^T (M k, 0)``
    (anisotropic magnification ``M``, :func:`cryosplat.geometry.image_matrices`) into a
    ``pad_factor`` x padded grid, up to the box's Nyquist (RELION's ``r_max``), not the 2D
    corners beyond it; then symmetrised by ``symmetry``
    (:meth:`~cryosplat.fourier_slice.PaddedGrid.symmetrise`), when given."""
    d = particles.box_size
    p = pad_factor * d
    grid = PaddedGrid(d, p, device)
    num, den = grid.accumulators()
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
        a = geometry.image_matrices(rotations[t].to(device), c.mag_matrix)
        grid.insert(num, den, factor * f, weight, a, points)
        if progress is not None:
            progress(len(idx))
    ins = Insertion(hermitian_x0(grid.grid_view(num)), hermitian_x0(grid.grid_view(den)), d, p)
    return ins.symmetrise(symmetry)


def corner_mask(box_size: int, device=None) -> torch.Tensor:
    """RELION's mask of a reconstruction's corners: 1 inside radius D/2 voxels, a raised
    cosine to 0 over the next 3 voxels, 0 beyond (``softMaskOutsideMap``'s defaults;
    measured on a relion_reconstruct map: flat to 48, 0.16 at 50, 0 from 51 in a box of 96).
    `(D, D, D)`."""
    return spherical_mask(box_size, 1.0, radius_A=box_size / 2, soft_edge_A=3.0).to(device)


def invert(ins: Insertion, regulariser: torch.Tensor | float) -> torch.Tensor:
    """``sum CTF F / (sum CTF² + regulariser)`` back to a `(D, D, D)` map: the grid's
    inversion with its gridding correction (:meth:`cryosplat.fourier_slice.PaddedGrid.invert`),
    then the :func:`corner_mask`.

    ``regulariser``: a scalar, or one value per shell of the padded grid
    (:meth:`~cryosplat.fourier_slice.PaddedGrid.shells`), as :func:`wiener_regulariser` gives.
    The gridding correction is needed even though numerator and denominator share the
    trilinear weights: without it a blob 0.35 box from the centre keeps 0.90 of its mass
    (tests/test_backproject.py).
    """
    vol = ins.grid.invert(ins.numerator, ins.denominator, regulariser)
    return (vol * corner_mask(ins.box_size, vol.device)).contiguous()


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
    grid = half1.grid
    n_shells = int(np.ceil(np.sqrt(3) * (p // 2))) + 1
    sums = torch.zeros(n_shells, dtype=torch.float64, device=dev)
    counts = torch.zeros(n_shells, dtype=torch.float64, device=dev)
    for rows in grid.row_blocks():
        shells = grid.shells(rows).flatten()
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
    """Direct inversion's maps `(D, D, D)` (the full set and each half-set) and the
    half-maps' FSC `(D//2+1,)`."""

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
