"""Where a half-set's Gaussians start: inside the molecule as that half-set's own particles
show it, with a count from the molecule's volume.

A half-set's insertion (:func:`cryosplat.backproject.insert_particles` of its particles only)
is inverted with a light, flat regulariser (its own mean ``sum CTF²``; no FSC, so nothing of
the other half-set enters), low-passed to ``lowpass_A`` and thresholded at
``max(noise_sigmas x the noise, min_fraction x the maximum)``, the noise being the robust
standard deviation of the low-passed map in a shell near the box's edge. The voxels above the
threshold are the support; the Gaussians are drawn in it with probability proportional to the
unfiltered own map's positive density, one per ``1 / per_voxel`` voxels of support.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryosplat.backproject import invert
from cryosplat.errors import InputError, StageError
from cryosplat.evaluate import lowpass, spherical_mask
from cryosplat.fourier_slice import Insertion
from cryosplat.gaussians import GaussianMixture
from cryosplat.train.config import TrainConfig


@dataclass
class Support:
    """A half-set's own view of its molecule."""

    own_map: torch.Tensor  # (D, D, D) lightly regularised direct map of the half-set
    mask: torch.Tensor  # (D, D, D) bool: the support
    threshold: float  # on the low-passed map
    noise: float  # robust standard deviation of the low-passed map near the box's edge

    def volume_A3(self, voxel_size_A: float) -> float:
        """The support's volume in Å³."""
        return float(self.mask.sum()) * voxel_size_A**3


def own_support(ins: Insertion, voxel_size_A: float, lowpass_A: float = 15.0,
                noise_sigmas: float = 6.0, min_fraction: float = 0.05) -> Support:
    """The support of a half-set from its own insertion ``ins`` alone (module docstring)."""
    own = invert(ins, float(ins.denominator.mean()))
    d = own.shape[-1]
    low = lowpass(own, voxel_size_A, max(lowpass_A, 4 * voxel_size_A))
    outer, inner = (spherical_mask(d, 1.0, f * d, soft_edge_A=0.0).to(own.device) > 0
                    for f in (0.48, 0.40))
    edge = low[outer & ~inner]  # a shell near the box's edge, where the molecule is not
    noise = float(1.4826 * (edge - edge.median()).abs().median())
    threshold = max(noise_sigmas * noise, min_fraction * float(low.max()))
    mask = low > threshold
    return Support(own, mask, threshold, noise)


def random_mixture(cfg: TrainConfig, box_size: int, voxel_size_A: float,
                   half: int) -> GaussianMixture:
    """``cfg.n_gaussians`` random Gaussians (``init="random"``): uniform in a ball of
    ``init_radius_fraction`` x the box (at most the support sphere), ``init_scale_px`` wide,
    drawn from ``(seed, half)``."""
    radius_A = cfg.init_radius_fraction * box_size * voxel_size_A
    if cfg.support_radius_A > 0:
        radius_A = min(radius_A, cfg.support_radius_A)
    return GaussianMixture.random(cfg.n_gaussians, radius_A, cfg.init_scale_px * voxel_size_A,
                                  generator=torch.Generator().manual_seed(cfg.seed * 1000 + half))


def checked_amplitude_scale(scale: float, half: int, source: str | None = None) -> float:
    """``scale``, the least-squares factor that fits a random start's amplitudes to its
    half-set's data (either objective), if it is positive. NaN or Inf: a
    :class:`~cryosplat.errors.StageError` of the calibration stage (the data or the render hold
    NaN/Inf); not positive: an :class:`~cryosplat.errors.InputError` naming ``source`` (the
    molecule is dark in the images: ``--invert``)."""
    if not math.isfinite(scale):
        raise StageError("calibration", f"half-set {half}: the images or the render hold "
                                        f"NaN/Inf (amplitude scale {scale})")
    if not scale > 0:
        raise InputError(source, f"half-set {half}: the particles anti-correlate with a random "
                                 f"positive density (scale {scale:.3g}); the molecule looks "
                                 "dark: try --invert")
    return scale


def seed_mixture(support: Support, voxel_size_A: float, per_voxel: float, scale_px: float,
                 max_gaussians: int, generator: torch.Generator,
                 label: str = "") -> GaussianMixture:
    """Gaussians drawn in ``support`` (module docstring): ``per_voxel`` per voxel of support,
    at most ``max_gaussians``; isotropic, ``scale_px`` voxels wide, random orientations,
    equal amplitudes that sum to the own map's positive mass in the support."""
    density = (support.own_map.clamp_min(0) * support.mask).flatten().double().cpu()
    if not support.mask.any() or float(density.sum()) <= 0:
        raise InputError(None, f"{label}: its own direct map shows no density above the noise "
                               f"(threshold {support.threshold:.3g}); start from random "
                               "Gaussians with --init random")
    d = support.mask.shape[-1]
    n = int(min(max_gaussians, max(100, round(per_voxel * int(support.mask.sum())))))
    idx = torch.multinomial(density / density.sum(), n, replacement=True, generator=generator)
    zyx = torch.stack([idx // (d * d), (idx // d) % d, idx % d], -1).double()
    jitter = torch.rand(n, 3, generator=generator, dtype=torch.float64) - 0.5
    means = (zyx.flip(-1) - d // 2 + jitter) * voxel_size_A  # xyz, Å
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True)
    mass = float(density.sum()) * voxel_size_A**3
    return GaussianMixture(means.float(), torch.full((n, 3), scale_px * voxel_size_A),
                           q.float(), torch.full((n,), mass / n))
