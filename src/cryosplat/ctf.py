"""The contrast transfer function, in RELION's convention.

``CTF(k) = scale * exp(-B k^2 / 4) * sin(chi(k))`` with

``chi(k) = pi lambda df(alpha) k^2 - (pi/2) Cs lambda^3 k^4 + phase_shift + atan(Q0 / sqrt(1 - Q0^2))``

``df(alpha) = (dfU + dfV)/2 + (dfU - dfV)/2 * cos(2 (alpha - alpha_ast))``, ``alpha`` the azimuth
of ``k`` measured from +x towards +y, defocus positive for underfocus. The CTF is positive
at low frequency: a RELION particle image is CTF times the projection of a positive
density (the molecule bright). See docs/conventions.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

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

    def __len__(self) -> int:
        return self.defocus_u_A.shape[0]

    def __getitem__(self, index) -> "CTFParams":
        return CTFParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to(self, device=None, dtype=None) -> "CTFParams":
        return CTFParams(**{f.name: getattr(self, f.name).to(device=device, dtype=dtype)
                            for f in fields(self)})

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def electron_wavelength_A(voltage_kV: torch.Tensor) -> torch.Tensor:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV."""
    v = voltage_kV * 1e3
    return 12.2643247 / torch.sqrt(v * (1 + 0.978466e-6 * v))


def ctf_rfft(params: CTFParams, box_size: int, pixel_size_A: float | torch.Tensor) -> torch.Tensor:
    """CTF on the (unshifted) rfft grid of `(D, D)` images.

    Parameters
    ----------
    params: `N` particles' parameters.
    box_size: D.
    pixel_size_A: scalar or `(N,)` pixel sizes.

    Returns
    -------
    `(N, D, D//2+1)` real CTF values, dtype of ``params``.
    """
    dtype, device = params.defocus_u_A.dtype, params.defocus_u_A.device
    p = torch.as_tensor(pixel_size_A, dtype=dtype, device=device)
    k = rfft_frequencies_2d(box_size, 1.0, device=device, dtype=dtype)  # cycles / pixel
    k = k / (p[:, None, None, None] if p.ndim > 0 else p)  # cycles / Å
    ky, kx = k[..., 0], k[..., 1]
    k2 = kx**2 + ky**2
    alpha = torch.atan2(ky, kx)

    def col(t: torch.Tensor) -> torch.Tensor:
        return t[:, None, None]

    lam = col(electron_wavelength_A(params.voltage_kV))
    mean_df = col((params.defocus_u_A + params.defocus_v_A) / 2)
    half_astig = col((params.defocus_u_A - params.defocus_v_A) / 2)
    df = mean_df + half_astig * torch.cos(2 * (alpha - col(torch.deg2rad(params.defocus_angle_deg))))
    cs_A = col(params.cs_mm) * 1e7
    q0 = col(params.amplitude_contrast)
    chi = (math.pi * lam * df * k2
           - 0.5 * math.pi * cs_A * lam**3 * k2**2
           + col(torch.deg2rad(params.phase_shift_deg))
           + torch.atan(q0 / torch.sqrt(1 - q0**2)))
    envelope = col(params.scale) * torch.exp(-col(params.bfactor_A2) * k2 / 4)
    return envelope * torch.sin(chi)


def modulate(image_rfft: torch.Tensor, origin_A: torch.Tensor, params: CTFParams,
             pixel_size_A: float | torch.Tensor) -> torch.Tensor:
    """The particle's image formation after projection, in rfft space: shift by ``-origin``
    (RELION: the particle's centre sits at ``-rlnOrigin`` from the box centre), then the CTF.

    Parameters
    ----------
    image_rfft: `(N, D, D//2+1)` ``rfft2`` of projections (centre at pixel D//2).
    origin_A: `(N, 2)` rlnOriginX/YAngst.
    params: `N` particles' CTF; pixel_size_A: scalar or `(N,)`.
    """
    d = image_rfft.shape[-2]
    f = translate_rfft(image_rfft, origin_to_translation_A(origin_A).to(image_rfft.real.dtype),
                       pixel_size_A, d)
    return f * ctf_rfft(params, d, pixel_size_A).to(f.real.dtype)
