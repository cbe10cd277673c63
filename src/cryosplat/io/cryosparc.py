"""cryoSPARC ``.cs`` files (numpy structured arrays) into :class:`Particles`.

Fields and units, as cryoSPARC writes them (docs/conventions.md):

==========================  =====================================================
``blob/path``               stack path (bytes); a leading ``>`` marks a path
                            relative to the cryoSPARC project folder
``blob/idx``                0-based index in the stack
``blob/shape``              (ny, nx) in pixels
``blob/psize_A``            pixel size of the stack, Å
``alignments3D/pose``       axis-angle vector (radians) of RELION's ``A^T``
``alignments3D/shift``      in-plane shift in pixels of ``alignments3D/psize_A``
                            (``blob/psize_A`` when absent), sign of rlnOrigin
``alignments3D/split``      half-set, 0 or 1
``ctf/df1_A, ctf/df2_A``    defocus U, V in Å
``ctf/df_angle_rad``        astigmatism angle, radians
``ctf/phase_shift_rad``     phase shift, radians
``ctf/accel_kv``            kV; ``ctf/cs_mm`` mm; ``ctf/amp_contrast`` fraction
``ctf/bfactor``             Å^2 (optional); ``ctf/scale`` (optional)
``ctf/exp_group_id``        exposure group, used as the optics group (optional)
``blob/sign``               -1 where the particles are dark: negated on read
``ctf/tilt_A`` and others   higher-order optics: :mod:`cryosplat.io.optics`
==========================  =====================================================
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cryosplat import geometry
from cryosplat.ctf import CTFParams
from cryosplat.errors import InputError
from cryosplat.io.mrc import ImageSource, read_header
from cryosplat.io.optics import cryosparc_optics_terms, image_model_columns
from cryosplat.io.particles import OpticsGroup, Particles, check_finite, check_range
from cryosplat.io.star import resolve_image_path


def read_cs(path: str | Path, datadir: str | Path | None = None,
            amplitude_contrast: float | None = None) -> Particles:
    """Read a cryoSPARC particle ``.cs`` file without touching pixel data."""
    path = Path(path)
    data = _load(path)
    names = set(data.dtype.names or ())
    for req in ("blob/path", "blob/idx"):
        if req not in names:
            raise InputError(path, f"missing field {req}; expected a cryoSPARC particle .cs file")
    n = len(data)
    defaults: dict[str, str] = {}

    def field(name: str, fallback=None) -> np.ndarray:
        if name not in names:
            if fallback is None:
                raise InputError(path, f"missing field {name}")
            defaults[name] = str(fallback)
            return np.full(n, float(fallback))
        return check_finite(path, name, data[name])

    uniq_raw, codes = np.unique(data["blob/path"], return_inverse=True)
    decoded = [p.decode() if isinstance(p, bytes) else str(p) for p in uniq_raw]
    codes = codes.astype(np.int64).reshape(n)
    files = [str(resolve_image_path(path, p.lstrip(">"), datadir)) for p in decoded]
    idx = field("blob/idx").astype(np.int64)

    if "blob/shape" in names:
        shape = np.asarray(data["blob/shape"]).reshape(n, -1)
        if (shape[:, 0] != shape[:, -1]).any():
            row = int(np.nonzero(shape[:, 0] != shape[:, -1])[0][0])
            raise InputError(path, f"blob/shape row {row + 1} is {shape[row].tolist()}; "
                                   "expected square images")
        boxes = shape[:, 0].astype(np.int64)
    else:
        boxes = np.full(n, read_header(files[0]).shape[-1], dtype=np.int64)
        defaults["blob/shape"] = f"{boxes[0]} from the header of {files[0]}"
    pixel = check_range(path, "blob/psize_A", field("blob/psize_A"), 0, np.inf, lo_open=True)

    rotations = None
    if "alignments3D/pose" in names:
        pose = check_finite(path, "alignments3D/pose", data["alignments3D/pose"]).reshape(n, 3)
        rotations = geometry.cryosparc_pose_to_matrix(torch.from_numpy(pose))
    if "alignments3D/shift" in names:
        shift_px = check_finite(path, "alignments3D/shift", data["alignments3D/shift"]).reshape(n, 2)
        align_pix = (check_finite(path, "alignments3D/psize_A", data["alignments3D/psize_A"])
                     if "alignments3D/psize_A" in names else pixel)
        shifts = geometry.origin_px_to_A(torch.from_numpy(shift_px), torch.from_numpy(align_pix))
    else:
        defaults["alignments3D/shift"] = "0 (particles centred)"
        shifts = torch.zeros(n, 2, dtype=torch.float64)

    ctf = None
    if "ctf/df1_A" in names:
        cols = {
            "defocus_u_A": field("ctf/df1_A"),
            "defocus_v_A": field("ctf/df2_A") if "ctf/df2_A" in names else field("ctf/df1_A"),
            "defocus_angle_deg": np.rad2deg(field("ctf/df_angle_rad", 0.0)),
            "voltage_kV": check_range(path, "ctf/accel_kv", field("ctf/accel_kv"), 0, 3000, lo_open=True),
            "cs_mm": check_range(path, "ctf/cs_mm", field("ctf/cs_mm"), 0, 100),
            "amplitude_contrast": check_range(
                path, "ctf/amp_contrast", field("ctf/amp_contrast", amplitude_contrast), 0, 1,
                hi_open=True),
            "phase_shift_deg": np.rad2deg(field("ctf/phase_shift_rad", 0.0)),
            "bfactor_A2": field("ctf/bfactor", 0.0),
            "scale": field("ctf/scale", 1.0),
        }
        ctf = CTFParams(**{k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64))
                           for k, v in cols.items()},
                        **cryosparc_optics_terms(path, data, cols["cs_mm"]))
    else:
        defaults["CTF"] = "none: the file has no ctf/df1_A"

    # optics groups: exposure groups, split further where pixel size or box differ
    gid = (np.asarray(data["ctf/exp_group_id"]).astype(np.float64) if "ctf/exp_group_id" in names
           else np.zeros(n))
    uniq, group = np.unique(np.stack([gid, pixel, boxes], 1), axis=0, return_inverse=True)
    group = group.reshape(n) + 1
    optics = []
    for g in range(len(uniq)):
        first = int(np.nonzero(group == g + 1)[0][0])
        optics.append(OpticsGroup(
            g + 1, f"opticsGroup{g + 1}", float(pixel[first]), int(boxes[first]),
            float(ctf.voltage_kV[first]) if ctf else float("nan"),
            float(ctf.cs_mm[first]) if ctf else float("nan"),
            float(ctf.amplitude_contrast[first]) if ctf else float("nan")))

    if "alignments3D/split" in names:
        split = np.asarray(data["alignments3D/split"]).astype(np.int64)
        if not np.isin(split, (0, 1)).all():
            row = int(np.nonzero(~np.isin(split, (0, 1)))[0][0])
            raise InputError(path, f"alignments3D/split row {row + 1} is {split[row]}; expected 0 or 1")
        half = torch.from_numpy(split + 1)
    else:
        defaults["alignments3D/split"] = "none (half-sets assigned at random by the run's seed)"
        half = torch.zeros(n, dtype=torch.int64)

    invert = False
    if "blob/sign" in names:
        sign = check_finite(path, "blob/sign", data["blob/sign"])
        if not np.isin(sign, (-1, 1)).all() or (sign != sign[0]).any():
            raise InputError(path, f"blob/sign holds {sorted(set(sign.tolist()))}; expected -1 "
                                   "(dark particles) or 1 for every particle")
        invert = bool(sign[0] == -1)
        if invert:
            defaults["blob/sign"] = "-1: dark particles, negated on read"
    box = int(boxes.max())
    source = ImageSource(files, codes, idx, box, box,
                         source_box=None if (boxes == box).all() else boxes)
    return Particles(str(path), source, rotations, shifts, ctf, torch.from_numpy(pixel),
                     torch.from_numpy(group.astype(np.int64)), optics, half, defaults,
                     invert=invert, image_model=image_model_columns(names))


def _load(path: Path) -> np.ndarray:
    if not path.exists():
        raise InputError(path, "file not found")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty; expected a cryoSPARC .cs file")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, EOFError, OSError, UnpicklingError...
        raise InputError(path, f"not a readable cryoSPARC .cs file ({type(e).__name__}: {e})") from None
    if not isinstance(data, np.ndarray) or data.dtype.names is None or data.ndim != 1:
        raise InputError(path, "expected a 1-D numpy structured array (a cryoSPARC .cs file)")
    if len(data) == 0:
        raise InputError(path, "holds no particles")
    return data
