"""The contrast transfer function, in RELION's convention.

``CTF(k) = scale * exp(-B k^2 / 4) * sin(chi(k))`` with

``chi(k) = pi lambda df(alpha) k^2 - (pi/2) Cs lambda^3 k^4 + phase_shift
+ atan(Q0 / sqrt(1 - Q0^2))``

``df(alpha) = (dfU + dfV)/2 + (dfU - dfV)/2 * cos(2 (alpha - alpha_ast))``, ``alpha`` the azimuth
of ``k`` measured from +x towards +y, defocus positive for underfocus. The CTF is positive
at low frequency: a RELION particle image is CTF times the projection of a positive
density (the molecule bright). See docs/conventions.md.

Higher-order optics, per particle (RELION 3.1+ optics groups, written by CtfRefine; RELION's
``ObservationModel``, ``CTF::getCTF`` and ``TiltHelper::insertTilt``), all optional:

- anisotropic magnification ``M`` (rlnMagMat00..11): the image's frequency ``k`` shows what an
  ideal microscope shows at ``M k``. The CTF and every aberration are evaluated at ``M k``;
  the projection samples the map at ``A^T (M k, 0)`` (:func:`cryosplat.geometry.image_matrices`).
- even Zernike coefficients (rlnEvenZernike, radians): ``chi -> chi - sum_i c_i Z_i(M k)``.
- odd Zernike coefficients (rlnOddZernike, radians) and beam tilt (rlnBeamTiltX/Y, mrad): the
  image's transform is multiplied by ``exp(i Phi(M k))`` with
  ``Phi = sum_i c_i Z_i - 2 pi 1e-3 Cs lambda^2 |k|^2 (k . tilt)``.

``Z_i`` are RELION's unnormalised Zernike polynomials of ``k`` in 1/Å (:func:`zernike`), in
RELION's index order (:func:`odd_index_to_mn`, :func:`even_index_to_mn`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch

from cryosplat.fourier import rfft_frequencies_2d
from cryosplat.geometry import origin_to_translation_A, translate_rfft

CTF_FIELDS_DOC = {
    "defocus_u_A": "rlnDefocusU (Å, positive = underfocus)",
    "defocus_v_A": "rlnDefocusV (Å)",
    "defocus_angle_deg": "rlnDefocusAngle (degrees, from +x towards +y)",
    "voltage_kV": "rlnVoltage (kV)",
    "cs_mm": "rlnSphericalAberration (mm)",
    "amplitude_contrast": "rlnAmplitudeContrast (fraction)",
    "phase_shift_deg": "rlnPhaseShift (degrees), default 0",
    "bfactor_A2": "rlnCtfBfactor (Å^2), default 0",
    "scale": "rlnCtfScalefactor, default 1",
    "beam_tilt_mrad": "rlnBeamTiltX/Y (mrad), default none",
    "odd_zernike": "rlnOddZernike (radians, RELION's order), default none",
    "even_zernike": "rlnEvenZernike (radians, RELION's order), default none",
    "mag_matrix": "rlnMagMat00..11, default the identity",
    "premultiplied": "rlnCtfDataAreCtfPremultiplied (0 or 1), default 0",
}


@dataclass
class CTFParams:
    """Per-particle CTF parameters; every field is a `(N,)` float64 tensor."""

    defocus_u_A: torch.Tensor
    defocus_v_A: torch.Tensor
    defocus_angle_deg: torch.Tensor
    voltage_kV: torch.Tensor
    cs_mm: torch.Tensor
    amplitude_contrast: torch.Tensor
    phase_shift_deg: torch.Tensor
    bfactor_A2: torch.Tensor
    scale: torch.Tensor
    beam_tilt_mrad: torch.Tensor | None = None  # (N, 2) x, y
    odd_zernike: torch.Tensor | None = None  # (N, K_odd)
    even_zernike: torch.Tensor | None = None  # (N, K_even)
    mag_matrix: torch.Tensor | None = None  # (N, 2, 2)
    premultiplied: torch.Tensor | None = None  # (N,) 1 where the image was multiplied by its CTF

    def __len__(self) -> int:
        return self.defocus_u_A.shape[0]

    def __getitem__(self, index) -> CTFParams:
        values: dict[str, Any] = {k: None if v is None else v[index]
                                  for k, v in self.as_dict().items()}
        return CTFParams(**values)

    def to(self, device=None, dtype=None) -> CTFParams:
        """Every parameter on ``device`` in ``dtype`` (absent optics stay None)."""
        values: dict[str, Any] = {k: None if v is None else v.to(device=device, dtype=dtype)
                                  for k, v in self.as_dict().items()}
        return CTFParams(**values)

    def as_dict(self) -> dict[str, torch.Tensor | None]:
        """Field name -> its `(N, ...)` tensor, or None for absent optics."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def has_odd_phase(self) -> bool:
        """Whether any particle has beam tilt or odd Zernike terms (a complex transfer)."""
        return any(t is not None and bool((t != 0).any())
                   for t in (self.beam_tilt_mrad, self.odd_zernike))

    def aberrations(self) -> list[str]:
        """Names of the higher-order optics this set carries with non-trivial values."""
        found = []
        if self.mag_matrix is not None and bool(
                (self.mag_matrix != torch.eye(2, dtype=self.mag_matrix.dtype)).any()):
            found.append("anisotropic magnification")
        for name, t in (("beam tilt", self.beam_tilt_mrad), ("odd Zernike", self.odd_zernike),
                        ("even Zernike", self.even_zernike)):
            if t is not None and bool((t != 0).any()):
                found.append(name)
        return found


def electron_wavelength_A(voltage_kV: torch.Tensor) -> torch.Tensor:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV."""
    v = voltage_kV * 1e3
    return 12.2643247 / torch.sqrt(v * (1 + 0.978466e-6 * v))


def odd_index_to_mn(i: int) -> tuple[int, int]:
    """RELION's ``Zernike::oddIndexToMN``: index ``i`` of rlnOddZernike to ``(m, n)``
    (0: (-1, 1), 1: (1, 1), 2: (-3, 3), 3: (-1, 3), 4: (1, 3), 5: (3, 3), ...)."""
    k = int((math.sqrt(1 + 4 * i) - 1) / 2)
    n = 2 * k + 1
    return 2 * (i - k * k - k) - n, n


def even_index_to_mn(i: int) -> tuple[int, int]:
    """RELION's ``Zernike::evenIndexToMN``: index ``i`` of rlnEvenZernike to ``(m, n)``
    (0: (0, 0), 1: (-2, 2), 2: (0, 2), 3: (2, 2), 4: (-4, 4), ..., 8: (4, 4), ...)."""
    k = int(math.sqrt(i))
    return 2 * (i - k * k - k), 2 * k


def zernike(m: int, n: int, kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    """RELION's unnormalised Zernike polynomial ``Z_n^m`` at Cartesian ``(kx, ky)``:
    ``R_n^|m|(rho) cos(m phi)`` for ``m >= 0``, ``R_n^|m|(rho) sin(|m| phi)`` for ``m < 0``,
    with ``rho`` not scaled to a unit disc (``rho = |k|`` in 1/Å) and
    ``R_n^m(rho) = sum_s (-1)^s (n-s)! / (s! ((n+m)/2-s)! ((n-m)/2-s)!) rho^(n-2s)``."""
    a = abs(m)
    if a > n or (n - a) % 2:
        raise ValueError(f"no Zernike polynomial with m={m}, n={n}")
    rho = torch.sqrt(kx**2 + ky**2)
    phi = torch.atan2(ky, kx)
    radial = sum((-1) ** s * math.factorial(n - s)
                 / (math.factorial(s) * math.factorial((n + a) // 2 - s)
                    * math.factorial((n - a) // 2 - s)) * rho ** (n - 2 * s)
                 for s in range((n - a) // 2 + 1))
    return radial * (torch.cos(m * phi) if m >= 0 else torch.sin(a * phi))


def _zernike_sum(coefficients: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor,
                 index_to_mn: Callable[[int], tuple[int, int]]) -> torch.Tensor:
    """``sum_i c_i Z_i(kx, ky)`` for `(N, K)` coefficients and `(N, H, W)` frequencies."""
    out = torch.zeros_like(kx)
    for i in range(coefficients.shape[-1]):
        c = coefficients[:, i]
        if bool((c != 0).any()):
            out = out + c[:, None, None] * zernike(*index_to_mn(i), kx, ky)
    return out


def _frequencies_A(params: CTFParams, box_size: int,
                   pixel_size_A) -> tuple[torch.Tensor, torch.Tensor]:
    """``M k`` on the rfft grid, in cycles / Å: x and y, `(N, D, D//2+1)` with a magnification
    or per-particle pixel sizes, else `(D, D//2+1)` (one grid that broadcasts)."""
    dtype, device = params.defocus_u_A.dtype, params.defocus_u_A.device
    p = torch.as_tensor(pixel_size_A, dtype=dtype, device=device)
    k = rfft_frequencies_2d(box_size, 1.0, device=device, dtype=dtype)  # cycles / pixel
    k = k / (p[:, None, None, None] if p.ndim > 0 else p)  # cycles / Å
    ky, kx = k[..., 0], k[..., 1]
    if params.mag_matrix is not None:
        m = params.mag_matrix.to(dtype)[:, :, :, None, None]
        kx, ky = m[:, 0, 0] * kx + m[:, 0, 1] * ky, m[:, 1, 0] * kx + m[:, 1, 1] * ky
    return kx, ky


def odd_phase_rfft(params: CTFParams, box_size: int, pixel_size_A: float | torch.Tensor
                   ) -> torch.Tensor | None:
    """The antisymmetric aberration phase ``Phi(M k)`` (radians) of the module docstring on
    the rfft grid, `(N, D, D//2+1)`; None when no particle has beam tilt or odd Zernike terms.
    The model image's transform is multiplied by ``exp(i Phi)`` (RELION's
    ``ObservationModel::getPhaseCorrection``)."""
    if not params.has_odd_phase():
        return None
    kx, ky = _frequencies_A(params, box_size, pixel_size_A)
    phase = torch.zeros_like(kx)
    if params.odd_zernike is not None:
        phase = phase + _zernike_sum(params.odd_zernike.to(kx.dtype), kx, ky, odd_index_to_mn)
    if params.beam_tilt_mrad is not None:
        lam = electron_wavelength_A(params.voltage_kV)[:, None, None]
        cs_A = params.cs_mm[:, None, None] * 1e7
        tilt = params.beam_tilt_mrad.to(kx.dtype) * 1e-3
        phase = phase - (2 * math.pi * cs_A * lam**2 * (kx**2 + ky**2)
                         * (kx * tilt[:, 0, None, None] + ky * tilt[:, 1, None, None]))
    return phase


def _premultiplied(params: CTFParams) -> torch.Tensor | None:
    """`(N, 1, 1)` True where a particle's image was multiplied by its CTF; None if none was."""
    pre = params.premultiplied
    return None if pre is None or not bool((pre != 0).any()) else (pre != 0)[:, None, None]


def transfer_rfft(params: CTFParams, box_size: int, pixel_size_A: float | torch.Tensor
                  ) -> torch.Tensor:
    """The whole optical transfer of the image formation, as RELION's
    ``ObservationModel::predictObservation`` applies it: :func:`ctf_rfft` (squared for
    particles whose images are CTF-premultiplied), times ``exp(i Phi)``
    (:func:`odd_phase_rfft`). `(N, D, D//2+1)`, real where there is no odd phase, complex
    where there is."""
    c = ctf_rfft(params, box_size, pixel_size_A)
    pre = _premultiplied(params)
    if pre is not None:
        c = torch.where(pre, c * c, c)
    phase = odd_phase_rfft(params, box_size, pixel_size_A)
    return c if phase is None else c * torch.polar(torch.ones_like(phase), phase)


def wiener_terms(params: CTFParams, box_size: int, pixel_size_A: float | torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """What direct inversion multiplies each image's transform by, and the weight it adds:
    ``(CTF exp(-i Phi), CTF²)``; for a CTF-premultiplied image, which already carries one
    CTF, ``(exp(-i Phi), CTF²)`` (relion_reconstruct's treatment). `(N, D, D//2+1)` each; the
    first is complex only where there is an odd phase."""
    c = ctf_rfft(params, box_size, pixel_size_A)
    pre = _premultiplied(params)
    factor = c if pre is None else torch.where(pre, torch.ones_like(c), c)
    phase = odd_phase_rfft(params, box_size, pixel_size_A)
    if phase is not None:
        factor = factor * torch.polar(torch.ones_like(phase), -phase)
    return factor, c * c


def ctf_rfft(params: CTFParams, box_size: int, pixel_size_A: float | torch.Tensor) -> torch.Tensor:
    """CTF on the (unshifted) rfft grid of `(D, D)` images, at ``M k`` and with the even
    Zernike terms where the parameters carry them (module docstring).

    Parameters
    ----------
    params: `N` particles' parameters.
    box_size: D.
    pixel_size_A: scalar or `(N,)` pixel sizes.

    Returns
    -------
    `(N, D, D//2+1)` real CTF values, dtype of ``params``.
    """
    kx, ky = _frequencies_A(params, box_size, pixel_size_A)
    k2 = kx**2 + ky**2
    alpha = torch.atan2(ky, kx)

    def col(t: torch.Tensor) -> torch.Tensor:
        return t[:, None, None]

    lam = col(electron_wavelength_A(params.voltage_kV))
    mean_df = col((params.defocus_u_A + params.defocus_v_A) / 2)
    half_astig = col((params.defocus_u_A - params.defocus_v_A) / 2)
    angle = col(torch.deg2rad(params.defocus_angle_deg))
    df = mean_df + half_astig * torch.cos(2 * (alpha - angle))
    cs_A = col(params.cs_mm) * 1e7
    q0 = col(params.amplitude_contrast)
    chi = (math.pi * lam * df * k2
           - 0.5 * math.pi * cs_A * lam**3 * k2**2
           + col(torch.deg2rad(params.phase_shift_deg))
           + torch.atan(q0 / torch.sqrt(1 - q0**2)))
    if params.even_zernike is not None:
        chi = chi - _zernike_sum(params.even_zernike.to(kx.dtype), kx, ky, even_index_to_mn)
    envelope = col(params.scale) * torch.exp(-col(params.bfactor_A2) * k2 / 4)
    return envelope * torch.sin(chi)


def modulate(image_rfft: torch.Tensor, origin_A: torch.Tensor, params: CTFParams,
             pixel_size_A: float | torch.Tensor) -> torch.Tensor:
    """The particle's image formation after projection, in rfft space: shift by ``-origin``
    (RELION: the particle's centre sits at ``-rlnOrigin`` from the box centre), then the
    optical transfer (:func:`transfer_rfft`: the CTF, and the odd aberrations' phase).

    Parameters
    ----------
    image_rfft: `(N, D, D//2+1)` ``rfft2`` of projections (centre at pixel D//2).
    origin_A: `(N, 2)` rlnOriginX/YAngst.
    params: `N` particles' CTF; pixel_size_A: scalar or `(N,)`.
    """
    d = image_rfft.shape[-2]
    f = translate_rfft(image_rfft, origin_to_translation_A(origin_A).to(image_rfft.real.dtype),
                       pixel_size_A, d)
    h = transfer_rfft(params, d, pixel_size_A)
    return f * (h.to(f.dtype) if h.is_complex() else h.to(f.real.dtype))
