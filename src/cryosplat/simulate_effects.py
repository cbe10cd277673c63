"""What real particle stacks have and a plain simulation lacks, as options of
``cryosplat simulate`` (each off by default; docs/simulate.md gives the models).

- **Detector MTF**, on the signal and on the shot noise alike (both pass through the
  detector): the image's transform is multiplied by ``MTF(f) = m^((f / 0.5)²)`` at ``f``
  cycles per pixel, ``m`` its value at Nyquist (``mtf_nyquist``; 1: none).
- **Coloured background** ("ice"): a share ``background_fraction`` of the noise variance is
  white noise low-passed by ``exp(-f² / (2 f_c²))``, ``f_c = pixel / background_A`` cycles per
  pixel, scaled to that share; the rest stays white. The total noise variance is unchanged.
- **Contrast**: each particle's signal is multiplied by a lognormal scale of mean 1
  (``exp(sigma z - sigma²/2)``, ``sigma = contrast_sigma``), and a constant offset
  ``offset_sigma x`` (noise sigma) ``x z'`` is added to its image.
- **Junk**: a share ``junk_fraction`` of the particles (drawn at random) hold no molecule:
  half of them pure noise, half a wrong object (a few blobs, projected at their own random
  pose with the particle's CTF, at the molecule's signal variance).
- **Consensus errors**: the STAR the run reads (``particles.star``) gives each particle's
  pose turned by an angle ``|N(0, angle_error_deg)|`` about a random axis, its origin moved by
  ``N(0, shift_error_A)`` per axis and its defocus changed by ``N(0, defocus_error_A)`` (U and V
  together), as a consensus refinement leaves them; ``particles_true.star`` holds the exact
  values, with each particle's contrast as ``rlnCtfScalefactor`` and the junk flagged.

All draws come from their own generator (seed + 2), so with every effect off a simulation is
the same, bit for bit, as one without this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from cryosplat import geometry
from cryosplat.errors import refuse_out_of_range
from cryosplat.fourier import rfft_frequencies_2d

JUNK_NOISE, JUNK_OBJECT = 1, 2  # the kinds of junk in ``ParticleEffects.junk``


@dataclass
class Effects:
    """The options of the module docstring (``cryosplat simulate``'s flags of the same names)."""

    mtf_nyquist: float = 1.0
    background_fraction: float = 0.0
    background_A: float = 50.0
    contrast_sigma: float = 0.0
    offset_sigma: float = 0.0
    junk_fraction: float = 0.0
    angle_error_deg: float = 0.0
    shift_error_A: float = 0.0
    defocus_error_A: float = 0.0

    def check(self) -> None:
        """Refuse values no dataset can have, naming the command-line option."""
        refuse_out_of_range((
                ("--mtf-nyquist", self.mtf_nyquist, 0 < self.mtf_nyquist <= 1),
                ("--background-fraction", self.background_fraction,
                 0 <= self.background_fraction < 1),
                ("--background-falloff", self.background_A, self.background_A > 0),
                ("--contrast-sigma", self.contrast_sigma, self.contrast_sigma >= 0),
                ("--offset-sigma", self.offset_sigma, self.offset_sigma >= 0),
                ("--junk-fraction", self.junk_fraction, 0 <= self.junk_fraction < 1),
                ("--angle-error", self.angle_error_deg, self.angle_error_deg >= 0),
                ("--shift-error", self.shift_error_A, self.shift_error_A >= 0),
                ("--defocus-error", self.defocus_error_A, self.defocus_error_A >= 0)))

    @property
    def active(self) -> bool:
        """Whether any effect is on."""
        return self != Effects()

    @property
    def errors(self) -> bool:
        """Whether the STAR the run reads differs from the exact values."""
        return (self.angle_error_deg > 0 or self.shift_error_A > 0
                or self.defocus_error_A > 0)

    def to_dict(self) -> dict[str, float]:
        """The options by field name (simulation.json)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class ParticleEffects:
    """The per-particle draws of :func:`draw_effects`, `(N,)` each (float64; ``junk`` int64:
    0 a particle, :data:`JUNK_NOISE` or :data:`JUNK_OBJECT`), and the junk objects' poses
    `(N, 3, 3)`. Errors: ``rotation_error`` `(N, 3, 3)` left-multiplies the true pose,
    ``shift_error_A`` `(N, 2)` and ``defocus_error_A`` `(N,)` add to the true values."""

    contrast: torch.Tensor
    offset: torch.Tensor
    junk: torch.Tensor
    junk_rotations: torch.Tensor
    rotation_error: torch.Tensor
    shift_error_A: torch.Tensor
    defocus_error_A: torch.Tensor


def draw_effects(effects: Effects, n: int, seed: int) -> ParticleEffects:
    """Every per-particle draw of ``effects`` for `n` particles, from ``(seed + 2)``."""
    g = torch.Generator().manual_seed(seed + 2)
    f64 = torch.float64
    s = effects.contrast_sigma
    contrast = torch.exp(s * torch.randn(n, generator=g, dtype=f64) - s * s / 2)
    offset = effects.offset_sigma * torch.randn(n, generator=g, dtype=f64)
    junk = torch.zeros(n, dtype=torch.int64)
    n_junk = int(round(effects.junk_fraction * n))
    rows = torch.randperm(n, generator=g)[:n_junk]
    junk[rows[: n_junk // 2]] = JUNK_NOISE
    junk[rows[n_junk // 2:]] = JUNK_OBJECT
    junk_rotations = geometry.random_rotations(n, g)
    axis = torch.randn(n, 3, generator=g, dtype=f64)
    axis = axis / axis.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    angle = torch.randn(n, generator=g, dtype=f64).abs() * math.radians(effects.angle_error_deg)
    rotation_error = geometry.axis_angle_to_matrix(axis * angle[:, None])
    shift = effects.shift_error_A * torch.randn(n, 2, generator=g, dtype=f64)
    defocus = effects.defocus_error_A * torch.randn(n, generator=g, dtype=f64)
    return ParticleEffects(contrast, offset, junk, junk_rotations, rotation_error, shift,
                           defocus)


def mtf(box_size: int, mtf_nyquist: float, device=None) -> torch.Tensor:
    """`(D, D//2+1)` the detector MTF ``m^((f / 0.5)²)`` on the unshifted rfft2 grid."""
    f2 = (rfft_frequencies_2d(box_size, 1.0, device, torch.float64) ** 2).sum(-1)
    return mtf_nyquist ** (f2 / 0.25)


def apply_mtf(images: torch.Tensor, mtf_rfft: torch.Tensor) -> torch.Tensor:
    """`(B, D, D)` images through the detector: their transforms times ``mtf_rfft``."""
    d = images.shape[-1]
    out = torch.fft.irfft2(torch.fft.rfft2(images.double()) * mtf_rfft, s=(d, d))
    return out.to(images.dtype)


def coloured_noise(shape: tuple[int, ...], pixel_size_A: float, falloff_A: float,
                   generator: torch.Generator) -> torch.Tensor:
    """`(B, D, D)` Gaussian noise of unit variance per pixel whose power falls as
    ``exp(-f² / f_c²)``, ``f_c = pixel_size_A / falloff_A`` cycles per pixel (a low-passed
    white noise, scaled so its expected variance is 1)."""
    d = shape[-1]
    white = torch.randn(shape, generator=generator, dtype=torch.float64)
    fc = pixel_size_A / falloff_A
    f2 = (rfft_frequencies_2d(d, 1.0, dtype=torch.float64) ** 2).sum(-1)
    h = torch.exp(-f2 / (2 * fc**2))
    # unit white noise through the filter has the variance sum(impulse response²)
    gain = float((torch.fft.irfft2(h, s=(d, d)) ** 2).sum())
    out = torch.fft.irfft2(torch.fft.rfft2(white) * h, s=(d, d))
    return (out / math.sqrt(gain)).float()


def junk_object(box_size: int, pixel_size_A: float, seed: int) -> torch.Tensor:
    """`(D, D, D)` the wrong object of the junk: 4 Gaussian blobs of 3-6 voxels' width at
    random places within a quarter box of the centre (seeded)."""
    g = torch.Generator().manual_seed(seed + 3)
    d = box_size
    axis = (torch.arange(d, dtype=torch.float64) - d // 2)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    vol = torch.zeros(d, d, d, dtype=torch.float64)
    for _ in range(4):
        c = (torch.rand(3, generator=g, dtype=torch.float64) * 2 - 1) * d / 4
        w = 3 + 3 * float(torch.rand(1, generator=g))
        vol += torch.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * w * w))
    return vol
