"""Mixtures of normalised 3D Gaussians: ``V(r) = sum_i A_i N(r; mu_i, Sigma_i)``.

Coordinates in Å, origin at voxel D//2 (cryosplat.geometry). This module holds the
windowed voxeliser; the differentiable splatting renderer is built on the same mixture.
"""

from __future__ import annotations

import math

import torch

from cryosplat.geometry import grid_1d_A


def voxelise(means_A: torch.Tensor, covariances_A2: torch.Tensor, amplitudes: torch.Tensor,
             box_size: int, voxel_size_A: float, n_sigma: float = 4.0,
             chunk: int = 4096) -> torch.Tensor:
    """Sample a Gaussian mixture at the voxel centres of a `(D, D, D)` box, windowed.

    Each Gaussian is evaluated only on the cube of voxels within ``n_sigma`` of its widest
    axis around its centre, so the cost grows with Gaussians x window, not with the grid.

    Parameters
    ----------
    means_A: `(M, 3)` centres (x, y, z) in Å.
    covariances_A2: `(M, 3, 3)` covariances in Å².
    amplitudes: `(M,)` integrated masses.
    box_size, voxel_size_A: the output grid.

    Returns
    -------
    `(D, D, D)` volume indexed [z, y, x], in mass per Å³.
    """
    d = box_size
    device, dtype = means_A.device, means_A.dtype
    vol = torch.zeros(d * d * d, device=device, dtype=dtype)
    if means_A.shape[0] == 0:
        return vol.reshape(d, d, d)
    widest = torch.linalg.eigvalsh(covariances_A2).amax(-1).clamp_min(0).sqrt().max()
    half = int(math.ceil(n_sigma * float(widest) / voxel_size_A))
    offsets = torch.arange(-half, half + 1, device=device)
    oz, oy, ox = torch.meshgrid(offsets, offsets, offsets, indexing="ij")
    window = torch.stack([ox, oy, oz], -1).reshape(-1, 3)  # (W, 3) voxel offsets, xyz
    precision = torch.linalg.inv(covariances_A2)
    norm = amplitudes / torch.sqrt((2 * math.pi) ** 3 * torch.linalg.det(covariances_A2))
    for s in range(0, means_A.shape[0], chunk):
        mu, prec, nrm = means_A[s:s + chunk], precision[s:s + chunk], norm[s:s + chunk]
        centre = torch.round(mu / voxel_size_A).long() + d // 2  # nearest voxel, xyz index
        idx = centre[:, None, :] + window[None]  # (m, W, 3)
        delta = (idx - d // 2).to(dtype) * voxel_size_A - mu[:, None, :]
        quad = torch.einsum("mwi,mij,mwj->mw", delta, prec, delta)
        vals = nrm[:, None] * torch.exp(-0.5 * quad)
        inside = ((idx >= 0) & (idx < d)).all(-1)
        flat = (idx[..., 2] * d + idx[..., 1]) * d + idx[..., 0]
        vol.index_add_(0, flat[inside], vals[inside])
    return vol.reshape(d, d, d)


def voxelise_dense(means_A: torch.Tensor, covariances_A2: torch.Tensor, amplitudes: torch.Tensor,
                   box_size: int, voxel_size_A: float) -> torch.Tensor:
    """Reference voxeliser: every Gaussian on every voxel (for tests; cost M x D^3)."""
    c = grid_1d_A(box_size, voxel_size_A, device=means_A.device, dtype=means_A.dtype)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    r = torch.stack([x, y, z], -1).reshape(-1, 1, 3)
    delta = r - means_A[None]
    quad = torch.einsum("nmi,mij,nmj->nm", delta, torch.linalg.inv(covariances_A2), delta)
    norm = amplitudes / torch.sqrt((2 * math.pi) ** 3 * torch.linalg.det(covariances_A2))
    return (norm * torch.exp(-0.5 * quad)).sum(-1).reshape(box_size, box_size, box_size)
