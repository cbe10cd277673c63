"""The metadata columns that change the image model beyond the CTF's defocus, voltage, Cs and
amplitude contrast: what RELION's CtfRefine and cryoSPARC's global and local CTF refinement
write, read into :class:`~cryosplat.ctf.CTFParams`' optics fields (one value per particle;
RELION keeps them per optics group).

Every such column a file has is listed, with what cryosplat does with it, by ``cryosplat
info`` and ``cryosplat validate`` (:func:`image_model_columns`). Conventions and sources:
docs/conventions.md ("Higher-order optics").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryosplat.errors import InputError

MODELLED = "modelled"  # how every modelled treatment below begins (validate: ok, else warn)
# Column -> what cryosplat does with it. Columns not here do not change the image model.
RELION_IMAGE_MODEL = {
    "rlnBeamTiltX": "modelled: beam tilt (mrad), the odd phase -2 pi Cs lambda^2 |k|^2 k.tilt",
    "rlnBeamTiltY": "modelled: beam tilt (mrad), with rlnBeamTiltX",
    "rlnOddZernike": "modelled: antisymmetric aberrations, a phase on the image's transform",
    "rlnEvenZernike": "modelled: symmetric aberrations, subtracted from the CTF's phase",
    "rlnMagMat00": "modelled: anisotropic magnification (with rlnMagMat01, 10, 11)",
    "rlnCtfDataAreCtfPremultiplied": "modelled: the model multiplies by CTF², direct "
                                     "inversion takes the images without another CTF",
    "rlnPhaseShift": "modelled: phase-plate phase shift",
    "rlnCtfBfactor": "modelled: CTF envelope",
    "rlnCtfScalefactor": "modelled: CTF scale",
    "rlnMtfFileName": "not modelled: the detector MTF (RELION uses it only in post-processing; "
                      "cryosplat postprocess does no MTF correction)",
    "rlnImageDimensionality": "must be 2: 3D subtomograms are refused",
}
CRYOSPARC_IMAGE_MODEL = {
    "ctf/tilt_A": "modelled: beam tilt, mrad = 1e3 arcsin(tilt_A / Cs) (pyem's csparc2star "
                  "mapping)",
    "ctf/trefoil_A": "refused where non-zero: no verified mapping to RELION's Zernike terms",
    "ctf/tetra_A": "refused where non-zero: no verified mapping to RELION's Zernike terms",
    "ctf/anisomag": "refused where non-zero: no verified mapping to RELION's magnification",
    "ctf/shift_A": "refused where non-zero: not modelled",
    "ctf/phase_shift_rad": "modelled: phase-plate phase shift",
    "ctf/bfactor": "modelled: CTF envelope",
    "ctf/scale": "modelled: CTF scale",
    "blob/sign": "modelled: -1 (dark particles) negates the images on read",
}


def image_model_columns(columns) -> dict[str, str]:
    """The columns among ``columns`` that change the image model, with what cryosplat does."""
    table = {**RELION_IMAGE_MODEL, **CRYOSPARC_IMAGE_MODEL}
    found = {c: table[c] for c in columns if c in table}
    for c in ("rlnMagMat01", "rlnMagMat10", "rlnMagMat11"):
        if c in columns and "rlnMagMat00" not in found:
            found["rlnMagMat00"] = table["rlnMagMat00"]
    return found


def parse_coefficients(path: Path, where: str, column: str, value) -> list[float]:
    """A Zernike list as RELION writes it (``[c0,c1,...]``) to floats."""
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = None
    if values is None or not np.isfinite(values).all():
        raise InputError(path, f"{column} of {where} is {str(value)!r}; expected a list of "
                               "numbers like [0.1,-0.2,0,0,0,0.3]")
    return values


def relion_optics_terms(path: Path, optics: pd.DataFrame | None, particles: pd.DataFrame,
                        group: np.ndarray) -> dict[str, torch.Tensor | None]:
    """Beam tilt, Zernike coefficients, magnification matrices and the premultiplied flag of
    each particle, from its optics group's row (or its own row, where data_particles has the
    column: RELION 3.0 wrote per-particle beam tilt). Refuses 3D (subtomogram) groups."""
    n = len(particles)
    rows: dict[int, pd.Series] = {}
    if optics is not None:
        for i in range(len(optics)):
            rows[int(pd.to_numeric(optics["rlnOpticsGroup"].iloc[i]))] = optics.iloc[i]

    def per_particle(column: str, parse, width: int | None = None):
        if column in particles.columns:
            values = [parse(f"data_particles row {i + 1}", particles[column].iloc[i])
                      for i in range(n)]
        elif optics is not None and column in optics.columns:
            by_group = {g: parse(f"data_optics group {g}", r[column]) for g, r in rows.items()}
            values = [by_group[int(g)] for g in group]
        else:
            return None
        if width is None:  # ragged lists (Zernike orders differ between groups): pad with 0
            width = max(len(v) for v in values)
            values = [list(v) + [0.0] * (width - len(v)) for v in values]
        return torch.tensor(np.asarray(values, dtype=np.float64).reshape(n, -1))

    def number(column: str):
        def parse(where: str, value) -> list[float]:
            v = pd.to_numeric(pd.Series([value]), errors="coerce").iloc[0]
            if not np.isfinite(v):
                raise InputError(path, f"{column} of {where} is {value!r}; expected a number")
            return [float(v)]
        return parse

    def coefficients(column: str):
        return lambda where, value: parse_coefficients(path, where, column, value)

    dims = per_particle("rlnImageDimensionality", number("rlnImageDimensionality"), 1)
    if dims is not None and bool((dims != 2).any()):
        raise InputError(path, "rlnImageDimensionality is 3: these are 3D subtomograms; cryosplat "
                               "reconstructs from 2D particle images")
    out: dict[str, torch.Tensor | None] = {}
    tilt = [per_particle(c, number(c), 1) for c in ("rlnBeamTiltX", "rlnBeamTiltY")]
    out["beam_tilt_mrad"] = None if tilt == [None, None] else torch.cat(
        [t if t is not None else torch.zeros(n, 1, dtype=torch.float64) for t in tilt], 1)
    out["odd_zernike"] = per_particle("rlnOddZernike", coefficients("rlnOddZernike"))
    out["even_zernike"] = per_particle("rlnEvenZernike", coefficients("rlnEvenZernike"))
    mag_cols = ("rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11")
    mag = [per_particle(c, number(c), 1) for c in mag_cols]
    if all(m is None for m in mag):
        out["mag_matrix"] = None
    else:
        eye = (1.0, 0.0, 0.0, 1.0)
        mag = [m if m is not None else torch.full((n, 1), e, dtype=torch.float64)
               for m, e in zip(mag, eye)]
        out["mag_matrix"] = torch.cat(mag, 1).reshape(n, 2, 2)
        det = torch.linalg.det(out["mag_matrix"])
        if bool((det.abs() < 0.5).any() | (det.abs() > 2).any()):
            row = int(torch.nonzero((det.abs() < 0.5) | (det.abs() > 2))[0])
            raise InputError(path, f"rlnMagMat of particle {row + 1} has determinant "
                                   f"{float(det[row]):.4g}; expected a matrix near the identity")
    pre = per_particle("rlnCtfDataAreCtfPremultiplied", number("rlnCtfDataAreCtfPremultiplied"), 1)
    if pre is not None and not bool(torch.isin(pre, torch.tensor([0.0, 1.0])).all()):
        raise InputError(path, "rlnCtfDataAreCtfPremultiplied is not 0 or 1")
    out["premultiplied"] = None if pre is None else pre[:, 0]
    return out


def cryosparc_optics_terms(path: Path, data: np.ndarray, cs_mm: np.ndarray
                           ) -> dict[str, torch.Tensor | None]:
    """Beam tilt from ``ctf/tilt_A``; a clear error for the higher-order terms cryosplat has no
    verified mapping for, where they are not zero."""
    names = set(data.dtype.names or ())
    n = len(data)
    for name in ("ctf/trefoil_A", "ctf/tetra_A", "ctf/anisomag", "ctf/shift_A"):
        if name in names:
            values = np.asarray(data[name], dtype=np.float64).reshape(n, -1)
            bad = np.nonzero((values != 0).any(axis=1))[0]
            if bad.size:
                raise InputError(path, f"{name} row {bad[0] + 1} is {values[bad[0]].tolist()}: "
                                       "cryosplat has no verified mapping of this cryoSPARC "
                                       "aberration to RELION's; export the particles without "
                                       "it or use a RELION CtfRefine STAR")
    if "ctf/tilt_A" not in names:
        return {"beam_tilt_mrad": None}
    tilt_A = np.asarray(data["ctf/tilt_A"], dtype=np.float64).reshape(n, 2)
    if not (tilt_A != 0).any():
        return {"beam_tilt_mrad": None}
    ratio = tilt_A / (cs_mm[:, None] * 1e7)
    if (np.abs(ratio) > 1).any() or not np.isfinite(ratio).all():
        row = int(np.nonzero(~(np.abs(ratio) <= 1).all(axis=1))[0][0])
        raise InputError(path, f"ctf/tilt_A row {row + 1} is {tilt_A[row].tolist()}, larger than "
                               "Cs; expected a beam tilt of a few mrad")
    return {"beam_tilt_mrad": torch.from_numpy(np.arcsin(ratio) * 1e3)}
