"""RELION STAR files (3.0 and 3.1/4/5) with starfile: reading into :class:`Particles`
(writing: :mod:`cryosplat.io.star_writer`)."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
import torch

from cryosplat import geometry
from cryosplat.ctf import CTFParams
from cryosplat.errors import InputError
from cryosplat.io.mrc import ImageSource, header_pixel_size, read_header
from cryosplat.io.optics import image_model_columns, relion_optics_terms
from cryosplat.io.particles import OpticsGroup, Particles, check_finite, check_range

ANGLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
OPTICS_CTF_COLUMNS = {"voltage_kV": "rlnVoltage", "cs_mm": "rlnSphericalAberration",
                      "amplitude_contrast": "rlnAmplitudeContrast"}
# Optional columns and the value a missing one takes (docs/conventions.md).
DEFAULTS = {
    "rlnDefocusV": "rlnDefocusU (no astigmatism)",
    "rlnDefocusAngle": "0 degrees",
    "rlnPhaseShift": "0 degrees",
    "rlnCtfBfactor": "0 Å^2",
    "rlnCtfScalefactor": "1",
    "rlnOriginXAngst/YAngst": "0 Å (particles centred)",
    "rlnRandomSubset": "none (half-sets assigned at random by the seed of the run)",
}


def read_star(path: str | Path, datadir: str | Path | None = None,
              pixel_size_A: float | None = None,
              amplitude_contrast: float | None = None) -> Particles:
    """Read a RELION particle STAR file (3.0 or 3.1+) without touching pixel data.

    Parameters
    ----------
    path: the STAR file.
    datadir: folder that relative image paths are taken from (default: the STAR file's
        folder, then its parent, as RELION project paths are relative to the project).
    pixel_size_A: pixel size for RELION 3.0 files that give none; ignored when the file does.
    amplitude_contrast: rlnAmplitudeContrast for files that give none; ignored when the file
        does.

    Optics groups with different pixel sizes or boxes are read as they are;
    :meth:`Particles.rescaled` brings them to one (``read_particles`` does).
    """
    path = Path(path)
    blocks = _read_blocks(path)
    if "particles" in blocks and "optics" in blocks:
        particles, optics_df = blocks["particles"], blocks["optics"]
    elif len(blocks) == 1:
        particles, optics_df = next(iter(blocks.values())), None
    elif "particles" in blocks:
        particles, optics_df = blocks["particles"], None
    else:
        raise InputError(path, f"found data blocks {', '.join(map(repr, blocks))}; expected "
                               "data_particles (+ data_optics) or a single RELION 3.0 block")
    if not isinstance(particles, pd.DataFrame) or len(particles) == 0:
        raise InputError(path, "the particle table has no rows")
    if "rlnImageName" not in particles.columns:
        raise InputError(path, "missing required column rlnImageName (index@stack.mrcs)")
    n = len(particles)
    defaults: dict[str, str] = {}

    images_files, file_index, slice_index = _parse_image_names(path, particles["rlnImageName"],
                                                               datadir)
    if optics_df is not None:
        optics, group = _optics_31(path, optics_df, particles, images_files, file_index, defaults)
    else:
        optics, group = _optics_30(path, particles, images_files, pixel_size_A, defaults)
    by_number = {o.number: o for o in optics}
    pixel = np.array([by_number[g].pixel_size_A for g in group])
    box_of = np.array([by_number[g].box_size for g in group])

    rotations = None
    present = [c for c in ANGLE_COLUMNS if c in particles.columns]
    if len(present) == 3:
        euler = np.stack([_column(path, particles, c) for c in ANGLE_COLUMNS], axis=-1)
        rotations = geometry.euler_relion_to_matrix(torch.from_numpy(euler))
    elif present:
        missing = sorted(set(ANGLE_COLUMNS) - set(present))
        raise InputError(path, f"has {', '.join(present)} but not {', '.join(missing)}; expected "
                               "all three Euler angles or none")

    shifts = _shifts(path, particles, pixel, defaults)
    ctf = _ctf(path, particles, optics_df is not None, by_number, group, defaults,
               amplitude_contrast)
    terms = relion_optics_terms(path, optics_df, particles, group)
    if ctf is not None:
        ctf = replace(ctf, **terms)
    columns = list(particles.columns) + ([] if optics_df is None else list(optics_df.columns))

    if "rlnRandomSubset" in particles.columns:
        half = _column(path, particles, "rlnRandomSubset")
        bad = ~np.isin(half, (1, 2))
        if bad.any():
            row = int(np.nonzero(bad)[0][0])
            raise InputError(path, f"rlnRandomSubset row {row + 1} is {half[row]:g}; expected 1 "
                                   "or 2")
        half_set = torch.from_numpy(half.astype(np.int64))
    else:
        half_set = torch.zeros(n, dtype=torch.int64)
        defaults["rlnRandomSubset"] = DEFAULTS["rlnRandomSubset"]

    source = ImageSource(images_files, file_index, slice_index, int(box_of.max()),
                         int(box_of.max()), source_box=None if (box_of == box_of[0]).all()
                         else box_of.astype(np.int64))
    return Particles(source=str(path), images=source, rotations=rotations, shifts_A=shifts,
                     ctf=ctf, pixel_size_A=torch.from_numpy(pixel),
                     optics_group=torch.from_numpy(group.astype(np.int64)), optics=optics,
                     half_set=half_set, defaults=defaults,
                     image_model=image_model_columns(columns))


def _read_blocks(path: Path) -> dict[str, pd.DataFrame]:
    if not path.exists():
        raise InputError(path, "file not found")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty; expected a RELION STAR file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = starfile.read(path, always_dict=True)
    except Exception as e:  # starfile raises many types on malformed text
        raise InputError(path, f"not a readable STAR file ({type(e).__name__}: {e})") from None
    blocks = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    if not blocks:
        raise InputError(path, "holds no data table (loop_); expected a RELION particle STAR file")
    return blocks


def _column(path: Path, df: pd.DataFrame, name: str) -> np.ndarray:
    values = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=np.float64)
    return check_finite(path, name, values)


def _parse_image_names(path: Path, names: pd.Series, datadir) -> tuple[list[str], np.ndarray,
                                                                        np.ndarray]:
    s = names.astype(str)
    has_at = s.str.contains("@", regex=False)
    parts = s.str.split("@", n=1, expand=True)
    if parts.shape[1] == 1:
        parts[1] = None
    index_str = parts[0].where(has_at, "1")
    file_str = parts[1].where(has_at, s)
    index = pd.to_numeric(index_str, errors="coerce").to_numpy()
    bad = ~np.isfinite(index) | (index < 1) | (index != np.round(index))
    if bad.any():
        row = int(np.nonzero(bad)[0][0])
        raise InputError(path, f"rlnImageName row {row + 1} is {s.iloc[row]!r}; expected "
                               "index@stack.mrcs with a 1-based integer index")
    codes, uniques = pd.factorize(file_str)
    files = [str(resolve_image_path(path, f, datadir)) for f in uniques]
    return files, codes.astype(np.int64), index.astype(np.int64) - 1


def resolve_image_path(metadata_path: Path, name: str, datadir=None) -> Path:
    """Where an image stack named in a metadata file lives.

    Absolute names are taken as they are. Relative names are tried, in order, under
    ``datadir``, the metadata file's folder and its parent (RELION paths are relative to the
    project folder, which usually holds the job folder of the STAR file); then by file name
    alone under ``datadir`` and the metadata folder. The first that exists wins; if none
    does, the first candidate is returned and reading it gives the error.
    """
    p = Path(name)
    if p.is_absolute():
        return p
    here = metadata_path.resolve().parent
    roots = ([Path(datadir)] if datadir is not None else []) + [here, here.parent]
    candidates = [r / p for r in roots]
    candidates += [r / p.name for r in roots[:-1]]
    for c in candidates:
        if c.exists():
            return c
    return candidates[0]


def _optics_31(path: Path, optics_df: pd.DataFrame, particles: pd.DataFrame,
               files: list[str], file_index: np.ndarray, defaults: dict):
    if "rlnOpticsGroup" not in optics_df.columns:
        raise InputError(path, "data_optics lacks rlnOpticsGroup")
    group_of_row = (_column(path, particles, "rlnOpticsGroup").astype(np.int64)
                    if "rlnOpticsGroup" in particles.columns else None)
    optics = []
    for i in range(len(optics_df)):
        row = optics_df.iloc[i:i + 1]
        number = int(_column(path, row, "rlnOpticsGroup")[0])
        where = f"data_optics group {number}"
        if "rlnImagePixelSize" in row.columns:
            pix = _column(path, row, "rlnImagePixelSize")[0]
        elif {"rlnDetectorPixelSize", "rlnMagnification"} <= set(row.columns):
            pix = (_column(path, row, "rlnDetectorPixelSize")[0] * 1e4
                   / _column(path, row, "rlnMagnification")[0])
        else:
            raise InputError(path, f"{where} lacks rlnImagePixelSize")
        if "rlnImageSize" in row.columns:
            box = _column(path, row, "rlnImageSize")[0]
        else:  # RELION 3.1 files converted from 3.0 may lack it: the stack header has it
            rows = np.arange(1) if group_of_row is None else np.nonzero(group_of_row == number)[0]
            stack = files[file_index[rows[0]]] if rows.size else files[0]
            box = _box_from_header(path, stack, f"{where} lacks rlnImageSize")
            defaults[f"rlnImageSize (group {number})"] = f"{box} from the header of {stack}"
        if pix <= 0 or box < 2 or box != int(box):
            raise InputError(path, f"{where} has rlnImagePixelSize {pix:g} and rlnImageSize "
                                   f"{box:g}; expected a positive pixel size and an integer box")
        values = {}
        for key, col in OPTICS_CTF_COLUMNS.items():
            values[key] = float(_column(path, row, col)[0]) if col in row.columns else float("nan")
        name = (str(row["rlnOpticsGroupName"].iloc[0]) if "rlnOpticsGroupName" in row
                else f"opticsGroup{number}")
        optics.append(OpticsGroup(number, name, float(pix), int(box), **values))
    numbers = {o.number for o in optics}
    if "rlnOpticsGroup" in particles.columns:
        group = _column(path, particles, "rlnOpticsGroup").astype(np.int64)
        unknown = ~np.isin(group, list(numbers))
        if unknown.any():
            row = int(np.nonzero(unknown)[0][0])
            raise InputError(path, f"rlnOpticsGroup row {row + 1} is {group[row]}, which "
                                   f"data_optics does not define (it has {sorted(numbers)})")
    elif len(optics) == 1:
        group = np.full(len(particles), optics[0].number, dtype=np.int64)
    else:
        raise InputError(path, "data_particles lacks rlnOpticsGroup but data_optics has "
                               f"{len(optics)} groups")
    return optics, group


def _optics_30(path: Path, particles: pd.DataFrame, files: list[str], pixel_size_A, defaults):
    if "rlnImagePixelSize" in particles.columns:
        pix = _column(path, particles, "rlnImagePixelSize")
    elif {"rlnDetectorPixelSize", "rlnMagnification"} <= set(particles.columns):
        pix = (_column(path, particles, "rlnDetectorPixelSize") * 1e4
               / _column(path, particles, "rlnMagnification"))
    elif pixel_size_A is not None:
        pix = np.full(len(particles), float(pixel_size_A))
        defaults["pixel size"] = f"{pixel_size_A:g} Å from --pixel-size"
    else:
        why = "gives no pixel size (rlnDetectorPixelSize + rlnMagnification or rlnImagePixelSize)"
        header = header_pixel_size(_header(path, files[0], why))
        if header is None:
            raise InputError(path, f"{why} and the header of {files[0]} has none (0 or 1.0 Å, "
                                   "which writers leave when they know none); pass --pixel-size")
        pix = np.full(len(particles), header)
        defaults["pixel size"] = f"{header:g} Å from the header of {files[0]}"
    uniq = np.unique(pix)
    if (uniq <= 0).any():
        raise InputError(path, f"pixel size {uniq.min():g} Å; expected a positive value")
    if "rlnImageSize" in particles.columns:
        box = int(_column(path, particles, "rlnImageSize")[0])
    else:
        box = _box_from_header(path, files[0], "gives no rlnImageSize")
        defaults["rlnImageSize"] = f"{box} from the header of {files[0]}"
    values = {}
    for key, col in OPTICS_CTF_COLUMNS.items():
        # per-particle values in 3.0 files; the group's shows the first (the CTF uses each row's)
        values[key] = (float(_column(path, particles, col)[0]) if col in particles.columns
                       else float("nan"))
    # RELION 3.0 has no optics table: one group per distinct pixel size.
    optics = [OpticsGroup(i + 1, f"opticsGroup{i + 1}", float(p), box, **values)
              for i, p in enumerate(uniq)]
    group = np.searchsorted(uniq, pix) + 1
    return optics, group


def _header(path: Path, stack: str, why: str):
    """The header of ``stack``, read because ``path`` ``why``; a missing stack says so."""
    if not Path(stack).exists():
        raise InputError(path, f"{why}, so it is read from the first image stack, {stack}, "
                               "which was not found: pass --datadir (the folder the file's "
                               "image paths are relative to)")
    return read_header(stack)


def _box_from_header(path: Path, stack: str, why: str) -> int:
    h = _header(path, stack, why)
    if h.shape[1] != h.shape[2]:
        raise InputError(stack, f"images are {h.shape[2]} x {h.shape[1]} pixels; expected "
                                "square images")
    return h.shape[2]


def _shifts(path: Path, particles: pd.DataFrame, pixel: np.ndarray, defaults) -> torch.Tensor:
    n = len(particles)
    for x, y, unit in (("rlnOriginXAngst", "rlnOriginYAngst", "A"),
                       ("rlnOriginX", "rlnOriginY", "px")):
        has = (x in particles.columns, y in particles.columns)
        if all(has):
            xy = np.stack([_column(path, particles, x), _column(path, particles, y)], axis=-1)
            t = torch.from_numpy(xy)
            return t if unit == "A" else geometry.origin_px_to_A(t, torch.from_numpy(pixel))
        if any(has):
            raise InputError(path, f"has {x if has[0] else y} but not {y if has[0] else x}")
    defaults["rlnOriginXAngst/YAngst"] = DEFAULTS["rlnOriginXAngst/YAngst"]
    return torch.zeros(n, 2, dtype=torch.float64)


def _ctf(path: Path, particles: pd.DataFrame, has_optics: bool, by_number, group, defaults,
         amplitude_contrast: float | None = None):
    if "rlnDefocusU" not in particles.columns:
        defaults["CTF"] = "none: the file has no rlnDefocusU"
        return None
    n = len(particles)
    cols = {"defocus_u_A": _column(path, particles, "rlnDefocusU")}

    def optional(col, fallback):
        if col in particles.columns:
            return _column(path, particles, col)
        defaults[col] = DEFAULTS[col]
        return np.broadcast_to(np.asarray(fallback, dtype=np.float64), (n,)).copy()

    cols["defocus_v_A"] = optional("rlnDefocusV", cols["defocus_u_A"])
    cols["defocus_angle_deg"] = optional("rlnDefocusAngle", 0.0)
    for key, col in OPTICS_CTF_COLUMNS.items():
        if col in particles.columns:
            cols[key] = _column(path, particles, col)
        else:
            per_group = np.array([getattr(by_number[g], key) for g in group])
            if np.isnan(per_group).any() and key == "amplitude_contrast" \
                    and amplitude_contrast is not None:
                per_group = np.where(np.isnan(per_group), amplitude_contrast, per_group)
                defaults[col] = f"{amplitude_contrast:g} from --amplitude-contrast"
                for o in by_number.values():
                    if np.isnan(o.amplitude_contrast):
                        o.amplitude_contrast = float(amplitude_contrast)
            if np.isnan(per_group).any():
                where = "data_optics or data_particles" if has_optics else "the particle table"
                hint = " (or pass --amplitude-contrast)" if key == "amplitude_contrast" else ""
                raise InputError(path, f"missing {col}, needed for the CTF; expected it in "
                                       f"{where}{hint}")
            cols[key] = per_group
    cols["phase_shift_deg"] = optional("rlnPhaseShift", 0.0)
    cols["bfactor_A2"] = optional("rlnCtfBfactor", 0.0)
    cols["scale"] = optional("rlnCtfScalefactor", 1.0)
    check_range(path, "rlnVoltage", cols["voltage_kV"], 0, 3000, lo_open=True)
    check_range(path, "rlnSphericalAberration", cols["cs_mm"], 0, 100)
    check_range(path, "rlnAmplitudeContrast", cols["amplitude_contrast"], 0, 1, hi_open=True)
    return CTFParams(**{k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64))
                        for k, v in cols.items()})
