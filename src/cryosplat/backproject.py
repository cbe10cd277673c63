"""Direct Fourier inversion with known poses and CTF: the baseline of every Gaussian result,
and the half-sets' unbiased maps that cross-validate it.

Each particle's transform, shifted back by ``+origin`` and multiplied by its CTF, is inserted
as a central slice (torch-fourier-slice, trilinear) into a 2x padded 3D transform, and so is
its CTF². The map is ``sum CTF F / (sum CTF² + 1/SNR(k))`` (Wiener-style), where ``SNR(k)``
comes from the half-maps' FSC of a first, lightly regularised pass; then the gridding
correction (sinc²) and a crop back to the box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch_fourier_slice import insert_central_slices_rfft_3d
from torch_fourier_slice.volume_utils import separable_sinc2_correction

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


def insert_particles(particles: Particles, indices: np.ndarray, pad_factor: int = 2,
                     batch_size: int = 64, device: str | torch.device = "cpu",
                     progress=None) -> Insertion:
    """Insert particles ``indices`` (poses, shifts, CTF from ``particles``)."""
    d = particles.box_size
    p = pad_factor * d
    pad = (p - d) // 2
    shape = (p, p, p)
    num = torch.zeros(p, p, p // 2 + 1, dtype=torch.complex64, device=device)
    den = torch.zeros(p, p, p // 2 + 1, dtype=torch.float32, device=device)
    rotations = particles.require_poses()
    ctf = particles.require_ctf()
    for s in range(0, len(indices), batch_size):
        idx = np.asarray(indices[s:s + batch_size])
        t = torch.from_numpy(idx)
        pix = particles.pixel_size_A[t].to(device)
        images = particles.read_images(idx).to(device)
        images = F.pad(images, [pad, p - d - pad] * 2)
        f = torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))
        shifts = particles.shifts_A[t].float().to(device)
        f = geometry.translate_rfft(f, shifts, pix.float(), p)  # undo the -origin shift
        c = ctf_rfft(ctf[t].to(device), p, pix).float()
        slices_num = torch.fft.fftshift((c * f).to(torch.complex64), dim=-2)
        slices_den = torch.fft.fftshift((c * c).to(torch.complex64), dim=-2)
        m = geometry.fourier_slice_matrices(rotations[t]).float().to(device)
        n_acc, _ = insert_central_slices_rfft_3d(slices_num, shape, m)
        d_acc, _ = insert_central_slices_rfft_3d(slices_den, shape, m)
        num += n_acc
        den += d_acc.real
        if progress is not None:
            progress(len(idx))
    return Insertion(num, den, d, p)


def invert(ins: Insertion, regulariser: torch.Tensor | float) -> torch.Tensor:
    """``sum CTF F / (sum CTF² + regulariser)`` back to a `(D, D, D)` map.

    ``regulariser`` is a scalar or a grid shaped like ``ins.denominator``.
    """
    total = ins.denominator + regulariser
    ft = torch.where(total > 0, ins.numerator / total.clamp_min(1e-30), torch.zeros_like(ins.numerator))
    p, d = ins.padded_size, ins.box_size
    ft = torch.fft.ifftshift(ft, dim=(-3, -2))
    vol = torch.fft.irfftn(ft, s=(p, p, p), dim=(-3, -2, -1))
    vol = torch.fft.fftshift(vol, dim=(-3, -2, -1))
    vol = vol / separable_sinc2_correction(vol.shape, device=vol.device)
    lo = (p - d) // 2
    return vol[lo:lo + d, lo:lo + d, lo:lo + d].contiguous()


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
