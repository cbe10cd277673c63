"""Fourier shell correlation, masks and resolution.

Four FSC curves are reported for a pair of maps, as in RELION's post-processing:

- unmasked;
- with a soft spherical mask (radius 0.9 x half the box by default);
- with a soft auto-mask made from the maps themselves (low-passed, thresholded, extended,
  raised-cosine edge), or with the user's mask;
- that masked curve corrected for the mask's own correlation by phase randomisation
  (Chen et al. 2013, Ultramicroscopy 135:24): the phases of both maps are randomised beyond the
  shell where the unmasked FSC first falls below 0.8, the randomised maps are masked the same
  way, and ``FSC_true = (FSC_masked - FSC_random) / (1 - FSC_random)`` beyond that shell.

The half-map FSC of two *models* (Gaussian mixtures) shares the models' systematic error and
can overestimate the resolution. :func:`cross_validated_fsc` estimates the map's FSC
against the unknown truth from maps it never saw: the other half-set's direct reconstruction,
as FSC_work / FSC_free do for atomic models (Brown et al. 2015, Acta Cryst D 71:136).

:func:`evaluate_maps` is the one evaluation of a pair of half-maps, used by training's
periodic evaluations and by the end of every run. Nothing here writes a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from cryosplat.fourier import rfft_radius_3d, shell_frequencies, shell_voxel_counts
from cryosplat.geometry import grid_1d_A
from cryosplat.summary import Headline


def shell_sums(map_a: torch.Tensor, map_b: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum Re(A conj B), sum |A|², sum |B|²)`` of two `(D, D, D)` maps' transforms in each
    FSC shell, `(D//2 + 1,)` float64 each: the sums :func:`fsc` divides.

    Shell ``i`` is at spatial frequency ``i / (D * voxel_size_A)``. torch-fourier-shell-
    correlation's definition (tests/test_physics.py checks the two agree): each rfft voxel
    at ``|k| D = i + t`` shells counts with weight ``1 - t`` in shell ``i`` and ``t`` in
    shell ``i + 1`` (voxels past the last shell count in it while within one shell of it).
    Computed in one pass of ``bincount`` over the voxels, where the library makes a weight
    vector over every voxel for each shell (O(shells x voxels): most of an 832 s box-400
    backproject).
    """
    if map_a.shape != map_b.shape:
        raise ValueError(f"maps differ in shape: {tuple(map_a.shape)} vs {tuple(map_b.shape)}")
    return transform_shell_sums(flat_rfft(map_a), flat_rfft(map_b), map_a.shape[-1])


def flat_rfft(volume: torch.Tensor) -> torch.Tensor:
    """The float32 rfftn of a `(D, D, D)` map, flattened: what :func:`transform_shell_sums`
    takes (a map used in several sums is transformed once)."""
    return torch.fft.rfftn(volume.float(), dim=(-3, -2, -1)).flatten()


def transform_shell_sums(fa: torch.Tensor, fb: torch.Tensor, box_size: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`shell_sums` of two maps' :func:`flat_rfft` transforms (box ``box_size``)."""
    d = box_size
    n = d // 2 + 1
    coord = (rfft_radius_3d(d, device=fa.device) * d).flatten()
    low = coord.floor().clamp(max=n - 2)
    w_high = coord - low  # weight in shell low + 1; past the last shell: 2 - (coord - low)
    w_low = (1 - w_high).clamp_min(0)
    w_high = torch.where(w_high > 1, (2 - w_high).clamp_min(0), w_high)
    low = low.long()
    ar, ai, br, bi = fa.real.double(), fa.imag.double(), fb.real.double(), fb.imag.double()

    def shells(values: torch.Tensor) -> torch.Tensor:
        return (torch.bincount(low, values * w_low, minlength=n + 1)
                + torch.bincount(low + 1, values * w_high, minlength=n + 1))[:n]

    return shells(ar * br + ai * bi), shells(ar * ar + ai * ai), shells(br * br + bi * bi)


def fsc(map_a: torch.Tensor, map_b: torch.Tensor) -> torch.Tensor:
    """FSC of two `(D, D, D)` maps: `(D//2 + 1,)`, float32, from their :func:`shell_sums`;
    shell 0 is 1."""
    cross, power_a, power_b = shell_sums(map_a, map_b)
    norm = torch.sqrt(power_a * power_b)
    curve = torch.where(norm > 0, cross / norm.clamp_min(1e-300), torch.zeros_like(cross))
    curve[0] = 1.0
    return curve.float()


def fsc_curves(map_a: torch.Tensor, map_b: torch.Tensor, voxel_size_A: float,
               mask: torch.Tensor | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """The four FSC curves of two `(D, D, D)` maps: each `(D//2 + 1,)`.

    Keys: ``unmasked``, ``spherical mask``, ``auto-mask`` (or ``mask`` when ``mask`` is given)
    and ``corrected`` (phase-randomisation corrected, with the auto-mask or ``mask``).
    """
    a, b = map_a.double(), map_b.double()
    d = a.shape[-1]
    sphere = spherical_mask(d, voxel_size_A).double()
    name = "mask"
    if mask is None:
        mask, name = auto_mask((a + b) / 2, voxel_size_A).double(), "auto-mask"
    mask = mask.double()
    unmasked = fsc(a, b)
    masked = fsc(a * mask, b * mask)
    return {"unmasked": unmasked.numpy(), "spherical mask": fsc(a * sphere, b * sphere).numpy(),
            name: masked.numpy(),
            "corrected": phase_randomised_correction(a, b, mask, unmasked, masked, seed).numpy()}


def phase_randomised_correction(map_a: torch.Tensor, map_b: torch.Tensor, mask: torch.Tensor,
                                unmasked: torch.Tensor, masked: torch.Tensor,
                                seed: int = 0) -> torch.Tensor:
    """Chen et al. (2013): the masked FSC with the mask's own correlation removed.

    Each map's phases are replaced by independent random ones from the first shell where
    ``unmasked`` falls below 0.8; the curves are `(D//2 + 1,)`. As in RELION's postprocessing,
    the correction starts two shells further out (at the randomisation shell itself the
    randomised maps still share the unrandomised neighbour shells through the mask, and the
    corrected curve would dip to near 0 there), and is 0 where the randomised maps correlate
    more than the maps. If ``unmasked`` never falls below 0.8, ``masked`` is returned.
    """
    d = map_a.shape[-1]
    below = np.nonzero(np.asarray(unmasked)[1:] < 0.8)[0]
    if below.size == 0:
        return masked.clone()
    cutoff = int(below[0]) + 1
    g = torch.Generator().manual_seed(seed)
    radius = rfft_radius_3d(d) * d  # in shells
    beyond = radius >= cutoff
    randomised = []
    for m in (map_a, map_b):
        f = torch.fft.rfftn(m)
        phase = torch.rand(f.shape, generator=g, dtype=torch.float64) * 2 * torch.pi
        f = torch.where(beyond, f.abs() * torch.exp(1j * phase), f)
        randomised.append(torch.fft.irfftn(f, s=m.shape))
    rand = fsc(randomised[0] * mask, randomised[1] * mask).double()
    masked = masked.double()
    corrected = masked.clone()
    tail = slice(cutoff + 2, None)
    true = (masked[tail] - rand[tail]) / (1 - rand[tail]).clamp_min(1e-6)
    corrected[tail] = torch.where(rand[tail] > masked[tail], 0.0, true)
    return corrected.float()


def spherical_mask(box_size: int, voxel_size_A: float, radius_A: float | None = None,
                   soft_edge_A: float | None = None) -> torch.Tensor:
    """A soft spherical mask centred on voxel D//2: `(D, D, D)` in [0, 1].

    Defaults: radius 0.9 x D/2 voxels less the edge, a raised-cosine edge of 0.1 x D/2 voxels,
    so the mask reaches 0 at 0.9 x D/2 and never touches the box's faces.
    """
    half = box_size / 2 * voxel_size_A
    edge = 0.1 * half if soft_edge_A is None else soft_edge_A
    radius = 0.9 * half - edge if radius_A is None else radius_A
    c = grid_1d_A(box_size, voxel_size_A, dtype=torch.float64)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return _soft_edge(torch.sqrt(x**2 + y**2 + z**2) - radius, edge).float()


def _soft_edge(distance_A: torch.Tensor, width_A: float) -> torch.Tensor:
    """1 at distance <= 0, raised cosine to 0 at ``width_A``, 0 beyond."""
    if width_A <= 0:
        return (distance_A <= 0).to(distance_A.dtype)
    t = (distance_A / width_A).clamp(0, 1)
    return 0.5 * (1 + torch.cos(torch.pi * t))


def lowpass(volume: torch.Tensor, voxel_size_A: float, resolution_A: float) -> torch.Tensor:
    """``volume`` `(D, D, D)` times a Gaussian in Fourier space whose amplitude is
    ``exp(-1/2)`` at ``1 / resolution_A``: `(D, D, D)`, same dtype."""
    d = volume.shape[-1]
    k_per_A = rfft_radius_3d(d, device=volume.device) / voxel_size_A
    gauss = torch.exp(-0.5 * (k_per_A * resolution_A) ** 2).to(volume.dtype)
    return torch.fft.irfftn(torch.fft.rfftn(volume) * gauss, s=volume.shape)


def auto_mask(volume: torch.Tensor, voxel_size_A: float, lowpass_A: float = 15.0,
              threshold: float | None = None, extend_A: float = 3.0,
              soft_edge_A: float = 6.0) -> torch.Tensor:
    """A soft mask around the density of ``volume`` `(D, D, D)`: `(D, D, D)` in [0, 1].

    The map is low-passed (Gaussian, to ``lowpass_A``), thresholded (default: 10% of the
    low-passed map's maximum), the binary mask is extended by ``extend_A`` and given a
    raised-cosine edge ``soft_edge_A`` wide. The distance is Euclidean (scipy).
    """
    low = lowpass(volume.double(), voxel_size_A, lowpass_A)
    level = 0.1 * float(low.max()) if threshold is None else threshold
    binary = (low > level).numpy()
    if not binary.any():
        raise ValueError(f"auto-mask: no voxel above the threshold {level:g}")
    # Only distances below extend + edge matter, and every voxel of the binary mask lies in
    # its bounding box: the distance transform of that box grown by the reach is exact there,
    # and everything beyond it is 0 (at box 400 this was most of an evaluation's time).
    reach = int(np.ceil((extend_A + max(soft_edge_A, 0.0)) / voxel_size_A)) + 1
    nz = np.nonzero(binary)
    box = tuple(slice(max(int(i.min()) - reach, 0), min(int(i.max()) + reach + 1, n))
                for i, n in zip(nz, binary.shape))
    outside = ndimage.distance_transform_edt(~binary[box]) * voxel_size_A
    mask = torch.zeros(binary.shape, dtype=torch.float32)
    mask[box] = _soft_edge(torch.from_numpy(outside) - extend_A, soft_edge_A).float()
    return mask


def running_sum(values: np.ndarray, window: int) -> np.ndarray:
    """Sum of ``values`` `(n,)` over shells ``i - window .. i + window`` (those that exist)."""
    if window <= 0:
        return np.asarray(values, dtype=np.float64).copy()
    return np.convolve(np.asarray(values, dtype=np.float64), np.ones(2 * window + 1), "same")


def cross_validated_fsc(model_1: torch.Tensor, model_2: torch.Tensor,
                        reference_1: torch.Tensor, reference_2: torch.Tensor,
                        voxel_size_A: float, mask: torch.Tensor | None = None,
                        n_sigma: float = 3.0,
                        window: int = 2) -> dict[str, np.ndarray]:
    """Estimate the FSC of the map ``(model_1 + model_2) / 2`` against the truth, without it.

    ``model_i`` was fitted to half-set ``i`` only; ``reference_i`` is an unbiased map of the
    same half-set (direct Fourier inversion): ``reference_i = g (truth + noise_i)``, with a
    per-shell filter ``g`` and noise independent between the half-sets. Model 1's error is
    independent of half-set 2's noise, so in each shell (sums over its Fourier voxels)

        sum Re(model_1 conj reference_2) = g sum Re(model_1 conj truth),
        sum Re(reference_1 conj reference_2) = g² sum |truth|²,

    and the map's FSC against the truth is estimated with no truth as

        estimate = X / sqrt(sum |map|² x sum Re(reference_1 conj reference_2)),
        X = (sum Re(model_1 conj reference_2) + sum Re(model_2 conj reference_1)) / 2

    (``g`` cancels). Agreement the models share but the truth lacks (the prior's
    extrapolation beyond the data) raises the half-map FSC, not ``X``. All four maps are
    multiplied by ``mask`` (default: the :func:`auto_mask` of the map), which removes the
    solvent's noise, and each sum is taken over ``2 window + 1`` neighbouring shells, which
    halves the noise of the sums again; both let the estimate reach further than the
    references' own FSC would.

    The estimate is defined from shell 1 up to the last shell before the references' FSC
    (with the same mask and window) falls below ``n_sigma / sqrt(voxels in the window)``:
    beyond it the half-sets' data hold no measurable signal to check a map against, and the
    estimate is NaN.

    Parameters
    ----------
    model_1, model_2, reference_1, reference_2: `(D, D, D)` maps on one grid.
    voxel_size_A: their voxel size (for the auto-mask).
    mask: `(D, D, D)` in [0, 1], or None for the auto-mask of the models' average.
    n_sigma, window: the reach's significance and the shells summed on each side.

    Returns
    -------
    ``{"free", "work", "references", "estimate"}``, each `(D//2 + 1,)`: each model against
    the other half-set's reference (FSC free) and against its own (FSC work; well above FSC
    free means the models fitted their own noise), averaged over the two models; the
    references' FSC; the estimate. All with the mask and window.
    """
    average = (model_1 + model_2) / 2
    if mask is None:
        mask = auto_mask(average.double().cpu(), voxel_size_A)
    m = mask.to(model_1.device, torch.float64)
    a1, a2, b1, b2 = (x.double() * m for x in (model_1, model_2, reference_1, reference_2))

    d = model_1.shape[-1]
    f = {k: flat_rfft(x) for k, x in
         (("a1", a1), ("a2", a2), ("b1", b1), ("b2", b2), ("map", average.double() * m))}

    def summed(x: str, y: str) -> list[np.ndarray]:
        return [running_sum(v.cpu().numpy(), window)
                for v in transform_shell_sums(f[x], f[y], d)]

    def corr(c: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
        return c / np.sqrt(np.clip(p * q, 1e-300, None))

    x12, p_a1, p_b2 = summed("a1", "b2")
    x21, p_a2, p_b1 = summed("a2", "b1")
    x11 = summed("a1", "b1")[0]
    x22 = summed("a2", "b2")[0]
    refs_cross = summed("b1", "b2")[0]
    map_power = summed("map", "map")[1]
    free = (corr(x12, p_a1, p_b2) + corr(x21, p_a2, p_b1)) / 2
    work = (corr(x11, p_a1, p_b1) + corr(x22, p_a2, p_b2)) / 2
    refs = corr(refs_cross, p_b1, p_b2)
    floor = n_sigma / np.sqrt(np.maximum(running_sum(shell_voxel_counts(d), window), 1))
    low = np.nonzero(refs[1:] < floor[1:])[0]
    last = d // 2 if low.size == 0 else int(low[0])  # last valid shell
    estimate = np.full(d // 2 + 1, np.nan)
    estimate[: last + 1] = ((x12 + x21) / 2)[: last + 1] / np.sqrt(
        np.clip(map_power * refs_cross, 1e-300, None)[: last + 1])
    for curve in (free, work, refs, estimate):
        curve[0] = 1.0
    return {"free": free, "work": work, "references": refs, "estimate": estimate}


def cross_validated_resolution(estimate: np.ndarray, box_size: int, voxel_size_A: float,
                               threshold: float = 0.5) -> tuple[float, bool]:
    """Where a :func:`cross_validated_fsc` estimate falls below ``threshold`` (Å), and whether
    that is only a limit: ``(resolution_A, True)`` means the estimate stayed above the
    threshold up to its last defined shell, so the model is *at least* that good there.

    0.5 is the threshold at which a map's FSC against the truth matches the gold-standard
    half-map 0.143 (Rosenthal and Henderson 2003).
    """
    e = np.asarray(estimate, dtype=np.float64)
    defined = np.nonzero(np.isfinite(e))[0]
    last = int(defined.max())
    if (e[1: last + 1] < threshold).any():
        return resolution_A(e[: last + 1], box_size, voxel_size_A, threshold), False
    return float(1 / shell_frequencies(box_size, voxel_size_A)[max(last, 1)]), True


def resolution_A(curve: torch.Tensor | np.ndarray, box_size: int, voxel_size_A: float,
                 threshold: float = 0.143) -> float:
    """Resolution (Å) where the FSC first falls below ``threshold``, linearly interpolated.

    Shell 0 is ignored. If the curve never falls below it, Nyquist (2 x voxel size).
    """
    c = np.asarray(curve, dtype=np.float64)
    k = shell_frequencies(box_size, voxel_size_A)
    below = np.nonzero(c[1:] < threshold)[0]
    if below.size == 0:
        return 2 * voxel_size_A
    i = int(below[0]) + 1
    if i == 1:
        return float(1 / k[1])
    f = k[i - 1] + (c[i - 1] - threshold) / (c[i - 1] - c[i]) * (k[i] - k[i - 1])
    return float(1 / f)


def resolutions(curves: dict[str, np.ndarray], box_size: int,
                voxel_size_A: float) -> dict[str, dict[str, float]]:
    """``{curve: {"0.143": Å, "0.5": Å}}`` for each FSC curve."""
    return {name: {"0.143": resolution_A(c, box_size, voxel_size_A),
                   "0.5": resolution_A(c, box_size, voxel_size_A, 0.5)}
            for name, c in curves.items()}


@dataclass
class Evaluation:
    """The FSC curves of a pair of half-maps and what they say (:func:`evaluate_maps`)."""

    curves: dict[str, np.ndarray]  # each (D//2 + 1,), by name as in fsc.csv
    resolutions_A: dict[str, dict[str, float]]  # {curve: {"0.143": Å, "0.5": Å}}, not for
    # the cross-validation curves
    cross_validated: dict[str, Any]  # resolution (Å) and is-limit (bool); empty without references

    def headline(self) -> Headline:
        """The summary fields (:class:`~cryosplat.summary.Headline`): half-map resolution at
        0.143 (unmasked, and corrected when the masked curves were made), the map against the
        truth at 0.143 and 0.5 when there is one, and the cross-validated resolution when
        there are references."""
        res = self.resolutions_A
        cv = self.cross_validated
        return Headline(
            res["half-maps, unmasked"]["0.143"],
            res["half-maps, corrected"]["0.143"] if "half-maps, corrected" in res else None,
            res["map vs truth"]["0.143"] if "map vs truth" in res else None,
            res["map vs truth"]["0.5"] if "map vs truth" in res else None,
            cv.get("cross_validated_resolution_A"),
            cv.get("cross_validated_is_limit"))


CROSS_VALIDATION_CURVES = {"free": "model vs other half's direct map, masked (FSC free)",
                           "work": "model vs own half's direct map, masked (FSC work)",
                           "references": "direct maps of the half-sets, masked",
                           "estimate": "estimated map vs truth (cross-validated)"}


def evaluate_maps(half_map_1: torch.Tensor, half_map_2: torch.Tensor, voxel_size_A: float,
                  truth: torch.Tensor | None = None,
                  references: tuple[torch.Tensor, torch.Tensor] | None = None,
                  mask: torch.Tensor | None = None, masked: bool = True,
                  full_map: torch.Tensor | None = None) -> Evaluation:
    """Every FSC of two `(D, D, D)` half-maps on one grid.

    - the half-map FSC: unmasked, and with ``masked`` also with a spherical mask, with the
      auto-mask (or ``mask``) and phase-randomisation corrected (:func:`fsc_curves`);
    - with ``truth``: the map against it: ``full_map``, or by default the half-maps' average;
    - with ``references``, the half-sets' own direct reconstructions: the cross-validated
      estimate of their average against the truth (:func:`cross_validated_fsc`).
    """
    if masked:
        curves = {f"half-maps, {k}": v
                  for k, v in fsc_curves(half_map_1, half_map_2, voxel_size_A, mask).items()}
    else:
        curves = {"half-maps, unmasked": fsc(half_map_1, half_map_2).numpy()}
    if truth is not None:
        full = (half_map_1 + half_map_2) / 2 if full_map is None else full_map
        curves["map vs truth"] = fsc(full, truth).numpy()
    cv = {}
    if references is not None:
        c = cross_validated_fsc(half_map_1, half_map_2, *references, voxel_size_A, mask)
        curves.update({CROSS_VALIDATION_CURVES[k]: c[k] for k in CROSS_VALIDATION_CURVES})
        r, limit = cross_validated_resolution(c["estimate"], half_map_1.shape[-1], voxel_size_A)
        cv = {"cross_validated_resolution_A": r, "cross_validated_is_limit": limit}
    # the cross-validation curves have their own resolution rule (NaN beyond the references'
    # signal), so they get no 0.143/0.5 crossings here
    plain = {k: v for k, v in curves.items() if k not in CROSS_VALIDATION_CURVES.values()}
    return Evaluation(curves, resolutions(plain, half_map_1.shape[-1], voxel_size_A), cv)
