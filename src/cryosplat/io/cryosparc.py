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
from typing import Any

import numpy as np
import torch

from cryosplat import geometry
from cryosplat.ctf import CTFParams
from cryosplat.errors import InputError
from cryosplat.io.mrc import ImageSource, read_header
from cryosplat.io.optics import cryosparc_optics_terms, image_model_columns
from cryosplat.io.particles import OpticsGroup, Particles, check_finite, check_range
from cryosplat.io.star import resolve_image_path


class _Fields:
    """A ``.cs`` dataset's fields, checked finite on read, with the defaults taken for
    missing ones recorded (``Particles.defaults``)."""

    def __init__(self, path: Path, data: np.ndarray):
        self.path, self.data = path, data
        self.names = set(data.dtype.names or ())
        self.n = len(data)
        self.defaults: dict[str, str] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def get(self, name: str, fallback: float | None = None) -> np.ndarray:
        """Field ``name`` `(N,)` (finite), or ``fallback`` for every row (recorded as a
        default); a missing field without a fallback is refused."""
        if name not in self.names:
            if fallback is None:
                raise InputError(self.path, f"missing field {name}")
            self.defaults[name] = str(fallback)
            return np.full(self.n, float(fallback))
        return check_finite(self.path, name, self.data[name])


def _blobs(f: _Fields, datadir: str | Path | None) -> tuple[list[str], np.ndarray, np.ndarray,
                                                            np.ndarray]:
    """(the image files, each particle's file code `(N,)`, its index in the file `(N,)`, its
    box `(N,)`)."""
    path, data, n = f.path, f.data, f.n
    uniq_raw, codes = np.unique(data["blob/path"], return_inverse=True)
    decoded = [p.decode() if isinstance(p, bytes) else str(p) for p in uniq_raw]
    codes = codes.astype(np.int64).reshape(n)
    files = [str(resolve_image_path(path, p.lstrip(">"), datadir)) for p in decoded]
    idx = f.get("blob/idx").astype(np.int64)
    if "blob/shape" in f:
        shape = np.asarray(data["blob/shape"]).reshape(n, -1)
        if (shape[:, 0] != shape[:, -1]).any():
            row = int(np.nonzero(shape[:, 0] != shape[:, -1])[0][0])
            raise InputError(path, f"blob/shape row {row + 1} is {shape[row].tolist()}; "
                                   "expected square images")
        boxes = shape[:, 0].astype(np.int64)
    else:
        boxes = np.full(n, read_header(files[0]).shape[-1], dtype=np.int64)
        f.defaults["blob/shape"] = f"{boxes[0]} from the header of {files[0]}"
    return files, codes, idx, boxes


def _poses(f: _Fields, pixel: np.ndarray) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(RELION matrices `(N, 3, 3)` or None, origins in Å `(N, 2)`)."""
    path, data, n = f.path, f.data, f.n
    rotations = None
    if "alignments3D/pose" in f:
        pose = check_finite(path, "alignments3D/pose", data["alignments3D/pose"]).reshape(n, 3)
        rotations = geometry.cryosparc_pose_to_matrix(torch.from_numpy(pose))
    if "alignments3D/shift" not in f:
        f.defaults["alignments3D/shift"] = "0 (particles centred)"
        return rotations, torch.zeros(n, 2, dtype=torch.float64)
    shift_px = check_finite(path, "alignments3D/shift", data["alignments3D/shift"]).reshape(n, 2)
    align_pix = (check_finite(path, "alignments3D/psize_A", data["alignments3D/psize_A"])
                 if "alignments3D/psize_A" in f else pixel)
    return rotations, geometry.origin_px_to_A(torch.from_numpy(shift_px),
                                              torch.from_numpy(align_pix))


def _ctf(f: _Fields, amplitude_contrast: float | None) -> CTFParams | None:
    """The CTF parameters, with cryoSPARC's higher-order optics, or None without
    ``ctf/df1_A``."""
    path = f.path
    if "ctf/df1_A" not in f:
        f.defaults["CTF"] = "none: the file has no ctf/df1_A"
        return None
    cols = {
        "defocus_u_A": f.get("ctf/df1_A"),
        "defocus_v_A": f.get("ctf/df2_A") if "ctf/df2_A" in f else f.get("ctf/df1_A"),
        "defocus_angle_deg": np.rad2deg(f.get("ctf/df_angle_rad", 0.0)),
        "voltage_kV": check_range(path, "ctf/accel_kv", f.get("ctf/accel_kv"), 0, 3000,
                                  lo_open=True),
        "cs_mm": check_range(path, "ctf/cs_mm", f.get("ctf/cs_mm"), 0, 100),
        "amplitude_contrast": check_range(
            path, "ctf/amp_contrast", f.get("ctf/amp_contrast", amplitude_contrast), 0, 1,
            hi_open=True),
        "phase_shift_deg": np.rad2deg(f.get("ctf/phase_shift_rad", 0.0)),
        "bfactor_A2": f.get("ctf/bfactor", 0.0),
        "scale": f.get("ctf/scale", 1.0),
    }
    optics: dict[str, Any] = cryosparc_optics_terms(path, f.data, cols["cs_mm"])
    return CTFParams(**{k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64))
                        for k, v in cols.items()}, **optics)


def _optics_groups(f: _Fields, pixel: np.ndarray, boxes: np.ndarray,
                   ctf: CTFParams | None) -> tuple[np.ndarray, list[OpticsGroup]]:
    """(each particle's 1-based group `(N,)`, the groups): exposure groups, split further
    where pixel size or box differ."""
    gid = (np.asarray(f.data["ctf/exp_group_id"]).astype(np.float64)
           if "ctf/exp_group_id" in f else np.zeros(f.n))
    uniq, group = np.unique(np.stack([gid, pixel, boxes], 1), axis=0, return_inverse=True)
    group = group.reshape(f.n) + 1
    optics = []
    for g in range(len(uniq)):
        first = int(np.nonzero(group == g + 1)[0][0])
        optics.append(OpticsGroup(
            g + 1, f"opticsGroup{g + 1}", float(pixel[first]), int(boxes[first]),
            float(ctf.voltage_kV[first]) if ctf else float("nan"),
            float(ctf.cs_mm[first]) if ctf else float("nan"),
            float(ctf.amplitude_contrast[first]) if ctf else float("nan")))
    return group, optics


def _half_sets(f: _Fields) -> torch.Tensor:
    """``alignments3D/split`` 0/1 as half-sets 1/2, or 0 for every row without it."""
    if "alignments3D/split" not in f:
        f.defaults["alignments3D/split"] = "none (half-sets assigned at random by the run's seed)"
        return torch.zeros(f.n, dtype=torch.int64)
    split = np.asarray(f.data["alignments3D/split"]).astype(np.int64)
    if not np.isin(split, (0, 1)).all():
        row = int(np.nonzero(~np.isin(split, (0, 1)))[0][0])
        raise InputError(f.path, f"alignments3D/split row {row + 1} is {split[row]}; expected "
                                 "0 or 1")
    return torch.from_numpy(split + 1)


def _dark(f: _Fields) -> bool:
    """Whether ``blob/sign`` says the particles are dark (-1 for every row)."""
    if "blob/sign" not in f:
        return False
    sign = check_finite(f.path, "blob/sign", f.data["blob/sign"])
    if not np.isin(sign, (-1, 1)).all() or (sign != sign[0]).any():
        raise InputError(f.path, f"blob/sign holds {sorted(set(sign.tolist()))}; expected -1 "
                                 "(dark particles) or 1 for every particle")
    if sign[0] == -1:
        f.defaults["blob/sign"] = "-1: dark particles, negated on read"
    return bool(sign[0] == -1)


def read_cs(path: str | Path, datadir: str | Path | None = None,
            amplitude_contrast: float | None = None) -> Particles:
    """Read a cryoSPARC particle ``.cs`` file without touching pixel data: poses
    (``alignments3D/pose``, a rotation vector) as RELION matrices, shifts (pixels) as origins
    in Å, the CTF with its optics, exposure groups as optics groups, ``alignments3D/split``
    as half-sets and ``blob/sign`` -1 as dark particles (docs/conventions.md)."""
    path = Path(path)
    data = _load(path)
    f = _Fields(path, data)
    for req in ("blob/path", "blob/idx"):
        if req not in f:
            raise InputError(path, f"missing field {req}; expected a cryoSPARC particle .cs file")
    files, codes, idx, boxes = _blobs(f, datadir)
    pixel = check_range(path, "blob/psize_A", f.get("blob/psize_A"), 0, np.inf, lo_open=True)
    rotations, shifts = _poses(f, pixel)
    ctf = _ctf(f, amplitude_contrast)
    group, optics = _optics_groups(f, pixel, boxes, ctf)
    half = _half_sets(f)
    invert = _dark(f)
    names, defaults = f.names, f.defaults
    box = int(boxes.max())
    source = ImageSource(files, codes, idx, box, box,
                         source_box=None if (boxes == box).all() else boxes)
    return Particles(source=str(path), images=source, rotations=rotations, shifts_A=shifts,
                     ctf=ctf, pixel_size_A=torch.from_numpy(pixel),
                     optics_group=torch.from_numpy(group.astype(np.int64)), optics=optics,
                     half_set=half, defaults=defaults, invert=invert,
                     image_model=image_model_columns(names))


def _load(path: Path) -> np.ndarray:
    if not path.exists():
        raise InputError(path, "file not found")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty; expected a cryoSPARC .cs file")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, EOFError, OSError, UnpicklingError...
        raise InputError(path, f"not a readable cryoSPARC .cs file "
                               f"({type(e).__name__}: {e})") from None
    if not isinstance(data, np.ndarray) or data.dtype.names is None or data.ndim != 1:
        raise InputError(path, "expected a 1-D numpy structured array (a cryoSPARC .cs file)")
    if len(data) == 0:
        raise InputError(path, "holds no particles")
    return data
