"""Frequency grids and Fourier shells: the one place where cryosplat builds them; and
Fourier resampling of images about their centre pixel.

Every grid is that of ``torch.fft.rfft2`` / ``rfftn`` of an FFT-aligned array (pixel or voxel
D//2 at the centre, docs/conventions.md): frequencies are unshifted unless ``fftshifted``
says otherwise, in which case the full axes (not the half axis) are ``fftshift``-ed, the
layout torch-fourier-slice uses. A shell index is ``round(|k| * D)`` with ``|k|`` in cycles
per pixel, so shell ``i`` is at ``i / (D * pixel_size_A)`` per Å.
"""

from __future__ import annotations

import numpy as np
import torch


def rfft_frequencies_2d(box_size: int, pixel_size_A: float | torch.Tensor = 1.0,
                        device=None, dtype=torch.float32) -> torch.Tensor:
    """Spatial frequencies of a ``torch.fft.rfft2`` of a `(D, D)` image, unshifted.

    Returns
    -------
    `(D, D//2+1, 2)` ``(ky, kx)`` in 1/Å (cycles per Å). With a tensor of pixel sizes
    `(B,)` the result is `(B, D, D//2+1, 2)`.
    """
    ky = torch.fft.fftfreq(box_size, device=device, dtype=dtype)
    kx = torch.fft.rfftfreq(box_size, device=device, dtype=dtype)
    grid = torch.stack(torch.meshgrid(ky, kx, indexing="ij"), dim=-1)
    p = torch.as_tensor(pixel_size_A, device=device, dtype=dtype)
    return grid / (p[..., None, None, None] if p.ndim > 0 else p)


def rfft_radius_3d(box_size: int, fftshifted: bool = False, device=None) -> torch.Tensor:
    """``|k|`` in cycles per voxel of each element of a `(D, D, D//2+1)` rfftn, float64.

    ``fftshifted``: the z and y axes in ``fftshift`` order (torch-fourier-slice's grids).
    """
    k = torch.fft.fftfreq(box_size, dtype=torch.float64, device=device)
    if fftshifted:
        k = torch.fft.fftshift(k)
    kx = torch.fft.rfftfreq(box_size, dtype=torch.float64, device=device)
    z, y, x = k[:, None, None], k[None, :, None], kx[None, None, :]
    return torch.sqrt(z**2 + y**2 + x**2)


def shell_index_2d(box_size: int, device=None) -> torch.Tensor:
    """Fourier shell of each element of a `(D, D//2+1)` rfft2: long tensor, unshifted."""
    k = rfft_frequencies_2d(box_size, 1.0, device=device, dtype=torch.float64)
    return torch.round(k.norm(dim=-1) * box_size).long()


def shell_index_3d(box_size: int, fftshifted: bool = False, device=None,
                   rows: slice = slice(None)) -> torch.Tensor:
    """Fourier shell (``|k| D`` rounded) of each element of a `(D, D, D//2+1)` rfftn, only
    y rows ``rows``: long tensor.

    From the integer ``|k|² D²`` through a table of rounded square roots, which is exact (no
    integer lies half-way between two shells' squares) and 10x faster than a float ``sqrt``
    over the grid."""
    k = torch.fft.fftfreq(box_size, 1 / box_size, device=device).round().long()
    if fftshifted:
        k = torch.fft.fftshift(k)
    kx = torch.arange(box_size // 2 + 1, device=device)
    r2 = (k * k)[:, None, None] + (k[rows] ** 2)[None, :, None] + (kx * kx)[None, None, :]
    top = 3 * (box_size // 2 + 1) ** 2
    table = torch.sqrt(torch.arange(top + 1, device=device, dtype=torch.float64)).round().long()
    return table[r2]


def shell_voxel_counts(box_size: int) -> np.ndarray:
    """Number of rfft voxels in each FSC shell (|k| rounded to the shell): `(D//2 + 1,)`."""
    counts = torch.bincount(shell_index_3d(box_size).flatten(), minlength=box_size // 2 + 1)
    return counts[: box_size // 2 + 1].numpy()


def shell_frequencies(box_size: int, voxel_size_A: float) -> np.ndarray:
    """Spatial frequency of each FSC shell, 1/Å: `(D//2 + 1,)`."""
    return np.arange(box_size // 2 + 1) / (box_size * voxel_size_A)


def fourier_resample(images: torch.Tensor, box_size: int, ndim: int = 2) -> torch.Tensor:
    """FFT-aligned `(..., D, D)` images (or `(..., D, D, D)` volumes with ``ndim=3``) to box
    ``d`` by Fourier cropping or padding about the centre pixel D//2, which becomes pixel
    d//2: the frequencies ``-m//2 .. m - m//2 - 1`` (``m = min(D, d)``) are kept, on the rfft
    grid. Pixel values keep their scale (the mean is preserved); the pixel size changes by
    D/d.

    Between even sizes this equals torch-fourier-rescale 0.6.0's ``fourier_rescale_2d`` (to
    float precision, tested); we do not use it because, measured, it scales about pixel 0 and
    so moves the centre by half a pixel when the size changes between odd and even
    (63 -> 64: -0.51 px; 64 -> 65: +0.50 px; 63 -> 31: +0.26 px), a phase error that would
    ruin high resolution (tests/test_optics.py)."""
    d, b = images.shape[-1], box_size
    if b == d:
        return images
    dims = tuple(range(-ndim, 0))
    f = torch.fft.fftshift(torch.fft.rfftn(torch.fft.ifftshift(images.double(), dim=dims),
                                           dim=dims), dim=dims[:-1])  # frequency 0 at d//2
    out = torch.zeros(*images.shape[:-ndim], *(b,) * (ndim - 1), b // 2 + 1, dtype=f.dtype)
    m, w = min(d, b), min(d, b) // 2 + 1
    src, dst = d // 2 - m // 2, b // 2 - m // 2
    into = (Ellipsis,) + (slice(dst, dst + m),) * (ndim - 1) + (slice(0, w),)
    take = (Ellipsis,) + (slice(src, src + m),) * (ndim - 1) + (slice(0, w),)
    out[into] = f[take]
    resampled = torch.fft.irfftn(torch.fft.ifftshift(out, dim=dims[:-1]), s=(b,) * ndim,
                                 dim=dims)
    return (torch.fft.fftshift(resampled, dim=dims) * (b / d) ** ndim).to(images.dtype)
