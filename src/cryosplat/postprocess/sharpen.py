"""Post-processing of two half-maps, as RELION's ``relion_postprocess`` does it.

1. **FSC.** The half-maps' FSC unmasked, with the mask (the user's, or the auto-mask of
   :func:`cryosplat.evaluate.auto_mask`) and corrected for the mask by phase randomisation
   (:func:`cryosplat.evaluate.fsc_curves`). The resolution is where the corrected curve falls
   below 0.143.
2. **FSC weighting** (Rosenthal and Henderson 2003, J Mol Biol 333:721). Each Fourier
   component of the average of the half-maps is multiplied by ``sqrt(2 FSC / (1 + FSC))``
   of its shell (``|k| D`` rounded, as RELION), with the corrected FSC. Components from the
   first shell where the FSC falls below 1e-4 onwards are set to 0.
3. **Guinier plot and B-factor.** ``ln`` of the mean amplitude per shell of the weighted
   transform, against ``k² = 1/d²`` in 1/Å². Unless a B-factor is given, a straight line is
   fitted from ``fit_low_A`` (10 Å) to ``fit_high_A``: by default (0) to Nyquist, over every
   shell the weighting kept, as RELION's ``--autob_highres 0``. ``B = 4 x slope``, negative
   for a map whose amplitudes fall off.
4. **Sharpening and low-pass.** The weighted transform is multiplied by ``exp(-B k² / 4)``,
   then by a raised-cosine low-pass from one shell below to one shell above the resolution.

Every frequency comes from :mod:`cryosplat.fourier`. Nothing here writes a file:
:mod:`cryosplat.postprocess.run` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from cryosplat.evaluate import auto_mask, fsc_curves
from cryosplat.evaluate import resolution_A as resolution_A_at
from cryosplat.fourier import shell_frequencies, shell_index_3d

FSC_WEIGHT_FLOOR = 1e-4  # RELION: components from the first shell below this are zeroed


@dataclass
class Guinier:
    """A Guinier plot: ``k²`` (1/Å²) and ``ln`` mean amplitude per shell (NaN where the shell
    is empty or zero), for the input, the FSC-weighted and the sharpened transform; the fit
    (slope, intercept, its range in Å and which shells it used)."""

    k2_per_A2: np.ndarray
    ln_amplitude: dict[str, np.ndarray]
    slope: float = float("nan")
    intercept: float = float("nan")
    fit_range_A: tuple[float, float] = (float("nan"), float("nan"))
    fitted: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


@dataclass
class PostProcessed:
    """The result of :func:`postprocess`: the sharpened map `(D, D, D)` unmasked and masked,
    the mask, the FSC curves (each `(D//2+1,)`), the resolution at 0.143 of the corrected
    curve (Å), the B-factor applied (Å²), the low-pass (Å) and the Guinier plot."""

    map: torch.Tensor
    masked_map: torch.Tensor
    mask: torch.Tensor
    curves: dict[str, np.ndarray]
    resolution_A: float
    bfactor_A2: float
    lowpass_A: float
    guinier: Guinier

    def summary(self) -> dict:
        """The numbers of ``postprocess/summary.json``: resolution (Å), B-factor (Å²),
        low-pass (Å), Guinier fit range (Å) and slope (Å²)."""
        return {"resolution_A": self.resolution_A, "bfactor_A2": self.bfactor_A2,
                "lowpass_A": self.lowpass_A, "guinier_fit_range_A": list(self.guinier.fit_range_A),
                "guinier_slope_A2": self.guinier.slope}


def shell_mean_amplitude(transform: torch.Tensor, shells: torch.Tensor) -> np.ndarray:
    """Mean ``|F|`` of an rfftn `(D, D, D//2+1)` per rounded shell ``shells`` (same shape):
    `(D//2+1,)`, shells 0 to Nyquist. Each rfft element counts once, as in RELION's plot."""
    n = transform.shape[0] // 2 + 1
    inside = shells < n
    total = torch.bincount(shells[inside], transform.abs()[inside].double(), minlength=n)
    count = torch.bincount(shells[inside], minlength=n).double()
    return (total / count.clamp_min(1)).numpy()


def guinier_points(mean_amplitude: np.ndarray) -> np.ndarray:
    """``ln`` of mean amplitudes `(n,)`, NaN where an amplitude is not positive."""
    a = np.asarray(mean_amplitude, dtype=np.float64)
    return np.where(a > 0, np.log(np.where(a > 0, a, 1.0)), np.nan)


def fit_bfactor(k2_per_A2: np.ndarray, ln_amplitude: np.ndarray, low_A: float, high_A: float
                ) -> tuple[float, float, np.ndarray]:
    """Least-squares line through the Guinier points between ``low_A`` and ``high_A``
    (resolutions, ``low_A > high_A``): (slope in Å², intercept, which points it used)."""
    with np.errstate(divide="ignore"):
        d_A = 1 / np.sqrt(k2_per_A2)
    use = (d_A <= low_A) & (d_A >= high_A) & np.isfinite(ln_amplitude)
    if use.sum() < 3:
        raise ValueError(f"the Guinier fit from {low_A:g} to {high_A:.2f} Å has {int(use.sum())} "
                         "shells; it needs 3 (a finer resolution, a larger box, or a lower "
                         "--autob-lowres)")
    slope, intercept = np.polyfit(k2_per_A2[use], ln_amplitude[use], 1)
    return float(slope), float(intercept), use


def bfactor_filter(shells_k2_per_A2: torch.Tensor, bfactor_A2: float) -> torch.Tensor:
    """``exp(-B k² / 4)`` at each element's ``k²`` (1/Å²): negative B sharpens."""
    return torch.exp(-bfactor_A2 / 4 * shells_k2_per_A2)


def raised_cosine_lowpass(radius_shells: torch.Tensor, cutoff_shell: float,
                          half_width: float = 1.0) -> torch.Tensor:
    """1 below ``cutoff_shell - half_width``, 0 above ``cutoff_shell + half_width``, a
    raised cosine between; ``radius_shells`` is ``|k| D`` per element."""
    t = ((radius_shells - (cutoff_shell - half_width)) / (2 * half_width)).clamp(0, 1)
    return 0.5 * (1 + torch.cos(torch.pi * t))


def fsc_weights(curve: np.ndarray) -> np.ndarray:
    """``sqrt(2 FSC / (1 + FSC))`` per shell `(n,)`; 0 where FSC <= 0 and from the first
    shell below 1e-4 onwards."""
    c = np.asarray(curve, dtype=np.float64)
    w = np.sqrt(np.clip(2 * c / (1 + np.clip(c, 0, None)), 0, None))
    below = np.nonzero(c < FSC_WEIGHT_FLOOR)[0]
    if below.size:
        w[below[0]:] = 0.0
    return w


def postprocess(half_map_1: torch.Tensor, half_map_2: torch.Tensor, voxel_size_A: float,
                mask: torch.Tensor | None = None, bfactor_A2: float | None = None,
                fit_low_A: float = 10.0, fit_high_A: float = 0.0,
                lowpass_A: float | None = None, seed: int = 0,
                resolution_A: float | None = None) -> PostProcessed:
    """Post-process two `(D, D, D)` half-maps (module docstring).

    ``mask`` `(D, D, D)` in [0, 1], or None for the auto-mask of their average.
    ``bfactor_A2``: the B-factor to apply (negative sharpens), or None to fit it.
    ``fit_high_A``: the fit's finest resolution (0: Nyquist).
    ``lowpass_A``: the low-pass, by default the map's resolution.
    ``resolution_A``: the map's resolution when it is measured better than the half-maps'
    own FSC can (a Gaussian run's cross-validated estimate, :func:`cryosplat.evaluate.
    cross_validated_fsc`): the result's resolution (and so its default low-pass) is the
    coarser of it and the corrected FSC's 0.143."""
    a, b = half_map_1.double(), half_map_2.double()
    if a.shape != b.shape or a.ndim != 3 or len(set(a.shape)) != 1:
        raise ValueError(f"half-maps must be cubes of one size: {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    d = a.shape[-1]
    average = (a + b) / 2
    if mask is None:
        mask = auto_mask(average, voxel_size_A)
    mask = mask.double()
    curves = fsc_curves(a, b, voxel_size_A, mask, seed)
    corrected = curves["corrected"]
    resolution = resolution_A_at(corrected, d, voxel_size_A)
    if resolution_A is not None:
        resolution = max(resolution, resolution_A)
    shells = shell_index_3d(d)
    n = d // 2 + 1
    k_per_A = shell_frequencies(d, voxel_size_A)
    k2 = k_per_A**2
    f = torch.fft.rfftn(average)
    inside = shells < n
    weights = torch.from_numpy(fsc_weights(corrected))
    weighted = f * torch.where(inside, weights[shells.clamp(max=n - 1)], 0.0)
    ln_in = guinier_points(shell_mean_amplitude(f, shells))
    ln_weighted = guinier_points(shell_mean_amplitude(weighted, shells))
    high = max(fit_high_A, 2 * voxel_size_A)
    slope = intercept = float("nan")
    used = np.zeros(n, dtype=bool)
    if bfactor_A2 is None:
        slope, intercept, used = fit_bfactor(k2, ln_weighted, fit_low_A, high)
        bfactor_A2 = 4 * slope
    element_k2 = torch.from_numpy(k2)[shells.clamp(max=n - 1)]
    sharpened = weighted * bfactor_filter(element_k2, bfactor_A2)
    ln_sharp = guinier_points(shell_mean_amplitude(sharpened, shells))
    lowpass = resolution if lowpass_A is None else lowpass_A
    radius = shells.double()  # |k| D rounded, as the FSC weighting
    sharpened = sharpened * raised_cosine_lowpass(radius, d * voxel_size_A / lowpass)
    out = torch.fft.irfftn(sharpened, s=average.shape)
    guinier = Guinier(k2, {"input": ln_in, "FSC-weighted": ln_weighted, "sharpened": ln_sharp},
                      slope, intercept, (fit_low_A, high), used)
    return PostProcessed(out.float(), (out * mask).float(), mask.float(), curves, resolution,
                         float(bfactor_A2), float(lowpass), guinier)
