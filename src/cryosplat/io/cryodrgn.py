"""cryoDRGN inputs: an image stack with ``poses.pkl`` and ``ctf.pkl``.

A pickle can run code when it is loaded, so these files are never unpickled: a restricted
unpickler accepts numpy arrays, their dtypes and tuples, and refuses anything else before
it is built.

* ``poses.pkl``: ``(rot, trans)`` or ``rot``; ``rot`` `(N, 3, 3)` is RELION's ``A``,
  ``trans`` `(N, 2)` is RELION's origin as a fraction of the box (cryoDRGN's
  parse_pose_star divides rlnOriginX/Y in pixels by D).
* ``ctf.pkl``: `(N, 9)` float: D, pixel size (Å), defocus U (Å), defocus V (Å),
  astigmatism angle (degrees), voltage (kV), Cs (mm), amplitude contrast, phase shift
  (degrees).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch

from cryosplat import geometry
from cryosplat.ctf import CTFParams
from cryosplat.errors import InputError
from cryosplat.io.mrc import ImageSource, header_pixel_size, read_header
from cryosplat.io.particles import OpticsGroup, Particles, check_finite, check_range

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise InputError(self.source, f"refused to load {module}.{name}: a cryoDRGN pkl may "
                                      "hold only numpy arrays and tuples of them")

    def persistent_load(self, pid):
        raise InputError(self.source, "refused a persistent reference: a cryoDRGN pkl may hold "
                                      "only numpy arrays and tuples of them")


def load_arrays_pkl(path: str | Path):
    """Load a pkl that holds a numpy array or a tuple of them, and nothing else."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    raw = path.read_bytes()
    if not raw:
        raise InputError(path, "file is empty; expected a cryoDRGN pkl")
    try:
        obj = _ArraysOnlyUnpickler(io.BytesIO(raw), path).load()
    except InputError:
        raise
    except Exception as e:  # truncated or corrupt pickles raise many types
        raise InputError(path, f"not a readable pkl ({type(e).__name__}: {e})") from None
    items = obj if isinstance(obj, tuple) else (obj,)
    for i, a in enumerate(items):
        if not isinstance(a, np.ndarray) or a.dtype.kind not in "fiu":
            what = type(a).__name__ + (f" of dtype {a.dtype}" if isinstance(a, np.ndarray)
                                       else "")
            raise InputError(path, f"item {i} is a {what}; expected numeric numpy arrays")
    return obj


def read_poses_pkl(path: str | Path, n: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """cryoDRGN poses: `(N, 3, 3)` matrices ``A`` and `(N, 2)` translations (box fraction)."""
    path = Path(path)
    obj = load_arrays_pkl(path)
    if isinstance(obj, tuple):
        rot, trans = obj[0], obj[1] if len(obj) > 1 else None
    else:
        rot, trans = obj, None
    if rot.ndim != 3 or rot.shape[1:] != (3, 3):
        raise InputError(path, f"rotations have shape {rot.shape}; expected (N, 3, 3)")
    if trans is not None and (trans.ndim != 2 or trans.shape != (rot.shape[0], 2)):
        raise InputError(path, f"translations have shape {trans.shape}; expected "
                               f"({rot.shape[0]}, 2)")
    if n is not None and rot.shape[0] != n:
        raise InputError(path, f"holds {rot.shape[0]} poses; the image stack holds {n} images")
    rot = check_finite(path, "rotations", rot.astype(np.float64))
    det = np.linalg.det(rot)
    if np.abs(det - 1).max() > 1e-3:
        row = int(np.argmax(np.abs(det - 1)))
        raise InputError(path, f"rotation {row + 1} has determinant {det[row]:.4f}; expected a "
                               "rotation matrix (determinant 1)")
    if trans is not None:
        trans = check_finite(path, "translations", trans.astype(np.float64))
    return rot, trans


def read_ctf_pkl(path: str | Path, n: int | None = None) -> np.ndarray:
    """cryoDRGN CTF parameters, `(N, 9)` float64 (see module docstring)."""
    path = Path(path)
    obj = load_arrays_pkl(path)
    if isinstance(obj, tuple) or obj.ndim != 2 or obj.shape[1] != 9:
        shape = "a tuple" if isinstance(obj, tuple) else str(obj.shape)
        raise InputError(path, f"holds {shape}; expected a (N, 9) array of CTF parameters")
    if n is not None and obj.shape[0] != n:
        raise InputError(path, f"holds {obj.shape[0]} rows; the image stack holds {n} images")
    return check_finite(path, "CTF parameters", obj.astype(np.float64))


def read_cryodrgn(stack: str | Path, poses: str | Path | None, ctf: str | Path | None,
                  pixel_size_A: float | None = None) -> Particles:
    """An MRCS stack (particle i is image i) with cryoDRGN pose and CTF pkls."""
    stack = Path(stack)
    h = read_header(stack)
    n, box = h.shape[0], h.shape[2]
    if h.shape[1] != h.shape[2]:
        raise InputError(stack, f"images are {h.shape[2]} x {h.shape[1]} pixels; expected square")
    defaults: dict[str, str] = {}
    ctf_params, pix = None, None
    if ctf is not None:
        c = read_ctf_pkl(ctf, n)
        if (c[:, 0] != box).any():
            raise InputError(ctf, f"column 0 (box size) is {c[0, 0]:g}; the stack's images are "
                                  f"{box}")
        pix = check_range(ctf, "pixel size (column 1)", c[:, 1], 0, np.inf, lo_open=True)
        check_range(ctf, "voltage (column 5)", c[:, 5], 0, 3000, lo_open=True)
        check_range(ctf, "amplitude contrast (column 7)", c[:, 7], 0, 1, hi_open=True)
        ctf_params = CTFParams(
            defocus_u_A=torch.from_numpy(c[:, 2].copy()),
            defocus_v_A=torch.from_numpy(c[:, 3].copy()),
            defocus_angle_deg=torch.from_numpy(c[:, 4].copy()),
            voltage_kV=torch.from_numpy(c[:, 5].copy()),
            cs_mm=torch.from_numpy(c[:, 6].copy()),
            amplitude_contrast=torch.from_numpy(c[:, 7].copy()),
            phase_shift_deg=torch.from_numpy(c[:, 8].copy()),
            bfactor_A2=torch.zeros(n, dtype=torch.float64),
            scale=torch.ones(n, dtype=torch.float64))
        defaults["B-factor, scale"] = "0 Å^2, 1 (ctf.pkl has neither)"
    if pix is None:
        p = pixel_size_A if pixel_size_A is not None else header_pixel_size(h)
        if p is None or p <= 0:
            raise InputError(stack, "no pixel size: no ctf.pkl, and the header gives none (0 or "
                                    "1.0 Å, which writers leave when they know none); pass "
                                    "--pixel-size")
        defaults["pixel size"] = (f"{p:g} Å from --pixel-size" if pixel_size_A is not None
                                  else f"{p:g} Å from the header of {stack}")
        pix = np.full(n, float(p))
    rotations, shifts = None, torch.zeros(n, 2, dtype=torch.float64)
    if poses is not None:
        rot, trans = read_poses_pkl(poses, n)
        rotations = torch.from_numpy(rot)
        if trans is not None:
            shifts = geometry.cryodrgn_trans_to_origin_A(torch.from_numpy(trans), box,
                                                         torch.from_numpy(pix))
        else:
            defaults["translations"] = "0 (poses.pkl has rotations only)"
    uniq, group = np.unique(pix, return_inverse=True)
    optics = []
    for g, p in enumerate(uniq):
        first = int(np.nonzero(group == g)[0][0])
        optics.append(OpticsGroup(
            g + 1, f"opticsGroup{g + 1}", float(p), box,
            *(float(getattr(ctf_params, k)[first]) if ctf_params else float("nan")
              for k in ("voltage_kV", "cs_mm", "amplitude_contrast"))))
    source = ImageSource([str(stack)], np.zeros(n, dtype=np.int64), np.arange(n), box, box)
    defaults["half-sets"] = "none (assigned at random by the run's seed)"
    return Particles(source=str(stack), images=source, rotations=rotations, shifts_A=shifts,
                     ctf=ctf_params, pixel_size_A=torch.from_numpy(pix),
                     optics_group=torch.from_numpy(group.astype(np.int64) + 1), optics=optics,
                     half_set=torch.zeros(n, dtype=torch.int64), defaults=defaults)
