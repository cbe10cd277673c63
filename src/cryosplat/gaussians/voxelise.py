"""Sampling a Gaussian mixture on a voxel grid: the maps cryosplat writes and evaluates."""

from __future__ import annotations

import math

import torch

from cryosplat.gaussians.render import group_by_window
from cryosplat.geometry import grid_1d_A


def voxelise(means_A: torch.Tensor, covariances_A2: torch.Tensor, amplitudes: torch.Tensor,
             box_size: int, voxel_size_A: float, n_sigma: float = 4.0,
             chunk: int = 4096, budget: int = 1 << 18) -> torch.Tensor:
    """Sample a Gaussian mixture at the voxel centres of a `(D, D, D)` box, windowed.

    Each Gaussian is evaluated only on the cube of voxels within ``n_sigma`` of its widest
    axis around its centre, so the cost grows with Gaussians x window, not with the grid.
    Windows are grouped by size as in the patch renderer.

    Parameters
    ----------
    means_A: `(M, 3)` centres (x, y, z) in Å.
    covariances_A2: `(M, 3, 3)` covariances in Å².
    amplitudes: `(M,)` integrated masses.
    box_size, voxel_size_A: the output grid.
    chunk, budget: at most ``chunk`` Gaussians and ``budget`` Gaussian-voxel pairs at a time.
        Each pair holds about 60 bytes of temporaries. 2^18 pairs was the fastest of 2^16 to 2^24
        on a 2-core CPU at box 128: 3.8 s and 55 MiB more peak memory for 30k Gaussians, against
        11.0 s and 1.5 GiB at 2^24 (benchmarks/voxelise.py, results/voxelise_cpu.json).

    Returns
    -------
    `(D, D, D)` volume indexed [z, y, x], in mass per Å³.
    """
    d = box_size
    device, dtype = means_A.device, means_A.dtype
    vol = torch.zeros(d * d * d, device=device, dtype=dtype)
    if means_A.shape[0] == 0:
        return vol.reshape(d, d, d)
    widest = torch.linalg.eigvalsh(covariances_A2.detach()).amax(-1).clamp_min(0).sqrt()
    precision = torch.linalg.inv(covariances_A2)
    norm = amplitudes / torch.sqrt((2 * math.pi) ** 3 * torch.linalg.det(covariances_A2))
    for half, members in group_by_window(torch.ceil(n_sigma * widest / voxel_size_A), d):
        offsets = torch.arange(-half, half + 1, device=device)
        oz, oy, ox = torch.meshgrid(offsets, offsets, offsets, indexing="ij")
        window = torch.stack([ox, oy, oz], -1).reshape(-1, 3)  # (W, 3) voxel offsets, xyz
        step = max(1, min(chunk, budget // window.shape[0]))
        for s in range(0, len(members), step):
            sel = members[s:s + step]
            mu, prec, nrm = means_A[sel], precision[sel], norm[sel]
            centre = torch.round(mu / voxel_size_A).long() + d // 2  # nearest voxel, xyz index
            idx = centre[:, None, :] + window[None]  # (m, W, 3)
            delta = (idx - d // 2).to(dtype) * voxel_size_A - mu[:, None, :]
            quad = torch.einsum("mwi,mij,mwj->mw", delta, prec, delta)
            vals = nrm[:, None] * torch.exp(-0.5 * quad)
            inside = ((idx >= 0) & (idx < d)).all(-1)
            flat = (idx[..., 2] * d + idx[..., 1]) * d + idx[..., 0]
            vol = vol.index_add(0, flat[inside], vals[inside])
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
