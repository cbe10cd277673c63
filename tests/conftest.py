"""Small datasets written by the tests themselves, with starfile/mrcfile/numpy/pickle
directly (not with cryosplat's writers), so that a reader bug cannot hide behind a
matching writer bug."""

from __future__ import annotations

import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from scipy.spatial.transform import Rotation

SHARED = Path(__file__).resolve().parents[2] / "shared"


@dataclass
class Truth:
    """The particles' parameters, in RELION's units, as the files were written from."""

    euler_deg: np.ndarray  # (N, 3)
    origin_A: np.ndarray  # (N, 2)
    pixel_A: np.ndarray  # (N,)
    voltage_kV: np.ndarray
    cs_mm: np.ndarray
    q0: np.ndarray
    df_u: np.ndarray
    df_v: np.ndarray
    df_angle: np.ndarray
    phase_shift: np.ndarray
    bfactor: np.ndarray
    half: np.ndarray
    box: int

    @property
    def matrices(self) -> np.ndarray:
        """RELION's A from scipy (independent of cryosplat.geometry)."""
        return Rotation.from_euler("ZYZ", self.euler_deg, degrees=True).inv().as_matrix()


def make_truth(n: int = 12, box: int = 16, seed: int = 0, two_groups: bool = True) -> Truth:
    rng = np.random.default_rng(seed)
    g2 = np.arange(n) >= n // 2 if two_groups else np.zeros(n, bool)
    return Truth(
        euler_deg=np.stack([rng.uniform(-180, 180, n), rng.uniform(0, 180, n),
                            rng.uniform(-180, 180, n)], -1),
        origin_A=rng.uniform(-4, 4, (n, 2)),
        pixel_A=np.where(g2, 1.5, 1.2), voltage_kV=np.where(g2, 200.0, 300.0),
        cs_mm=np.where(g2, 2.0, 2.7), q0=np.where(g2, 0.07, 0.1),
        df_u=rng.uniform(10000, 30000, n), df_v=rng.uniform(10000, 30000, n),
        df_angle=rng.uniform(-90, 90, n), phase_shift=rng.uniform(0, 10, n),
        bfactor=rng.uniform(0, 50, n), half=rng.integers(1, 3, n), box=box)


def write_stack(path: Path, images: np.ndarray, pixel_A: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(images.astype(np.float32))
        m.set_image_stack()
        m.voxel_size = pixel_A
    return path


def random_images(t: Truth, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(len(t.df_u), t.box, t.box)).astype(np.float32)


def write_star31(folder: Path, t: Truth, images: np.ndarray | None = None,
                 drop: tuple[str, ...] = ()) -> Path:
    """RELION 3.1 STAR, images in folder/Extract/stack.mrcs, one optics group per pixel size."""
    images = random_images(t) if images is None else images
    write_stack(folder / "Extract" / "stack.mrcs", images)
    pix = np.unique(t.pixel_A)
    group = np.searchsorted(pix, t.pixel_A) + 1
    first = [int(np.nonzero(group == g)[0][0]) for g in range(1, len(pix) + 1)]
    optics = pd.DataFrame({
        "rlnOpticsGroupName": [f"opticsGroup{g}" for g in range(1, len(pix) + 1)],
        "rlnOpticsGroup": list(range(1, len(pix) + 1)),
        "rlnImagePixelSize": pix, "rlnImageSize": [t.box] * len(pix),
        "rlnImageDimensionality": [2] * len(pix), "rlnVoltage": t.voltage_kV[first],
        "rlnSphericalAberration": t.cs_mm[first], "rlnAmplitudeContrast": t.q0[first]})
    n = len(t.df_u)
    parts = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@Extract/stack.mrcs" for i in range(n)],
        "rlnAngleRot": t.euler_deg[:, 0], "rlnAngleTilt": t.euler_deg[:, 1],
        "rlnAnglePsi": t.euler_deg[:, 2], "rlnOriginXAngst": t.origin_A[:, 0],
        "rlnOriginYAngst": t.origin_A[:, 1], "rlnDefocusU": t.df_u, "rlnDefocusV": t.df_v,
        "rlnDefocusAngle": t.df_angle, "rlnPhaseShift": t.phase_shift,
        "rlnCtfBfactor": t.bfactor, "rlnRandomSubset": t.half, "rlnOpticsGroup": group})
    parts = parts.drop(columns=[c for c in drop if c in parts.columns])
    path = folder / "particles.star"
    starfile.write({"optics": optics, "particles": parts}, path, float_format="%.8f")
    return path


def write_star30(folder: Path, t: Truth, images: np.ndarray | None = None) -> Path:
    """RELION 3.0 STAR: one table, rlnOriginX/Y in pixels, detector pixel + magnification."""
    images = random_images(t) if images is None else images
    write_stack(folder / "stack30.mrcs", images)
    n = len(t.df_u)
    df = pd.DataFrame({
        "rlnImageName": [f"{i + 1}@stack30.mrcs" for i in range(n)],
        "rlnAngleRot": t.euler_deg[:, 0], "rlnAngleTilt": t.euler_deg[:, 1],
        "rlnAnglePsi": t.euler_deg[:, 2],
        "rlnOriginX": t.origin_A[:, 0] / t.pixel_A, "rlnOriginY": t.origin_A[:, 1] / t.pixel_A,
        "rlnDefocusU": t.df_u, "rlnDefocusV": t.df_v, "rlnDefocusAngle": t.df_angle,
        "rlnVoltage": t.voltage_kV, "rlnSphericalAberration": t.cs_mm,
        "rlnAmplitudeContrast": t.q0, "rlnPhaseShift": t.phase_shift, "rlnCtfBfactor": t.bfactor,
        # pixel (Å) = detector pixel (µm) * 1e4 / magnification
        "rlnDetectorPixelSize": t.pixel_A * 5.0, "rlnMagnification": np.full(n, 50000.0),
    })
    path = folder / "particles30.star"
    starfile.write({"images": df}, path, float_format="%.8f")
    return path


def write_cs(folder: Path, t: Truth, images: np.ndarray | None = None) -> Path:
    """cryoSPARC .cs with '>'-prefixed paths relative to the project folder ``folder``."""
    images = random_images(t) if images is None else images
    write_stack(folder / "J7" / "extract" / "stack.mrc", images)
    n = len(t.df_u)
    pose = Rotation.from_matrix(np.transpose(t.matrices, (0, 2, 1))).as_rotvec()
    dtype = [("uid", "<u8"), ("blob/path", "S40"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
             ("blob/psize_A", "<f4"), ("alignments3D/pose", "<f4", (3,)),
             ("alignments3D/shift", "<f4", (2,)), ("alignments3D/psize_A", "<f4"),
             ("alignments3D/split", "<u4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"),
             ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"),
             ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4"), ("ctf/bfactor", "<f4"),
             ("ctf/exp_group_id", "<u4")]
    a = np.zeros(n, dtype=dtype)
    a["uid"] = np.arange(n) + 1000
    a["blob/path"] = b">J7/extract/stack.mrc"
    a["blob/idx"] = np.arange(n)
    a["blob/shape"] = t.box
    a["blob/psize_A"] = t.pixel_A
    a["alignments3D/pose"] = pose
    a["alignments3D/shift"] = t.origin_A / t.pixel_A[:, None]
    a["alignments3D/psize_A"] = t.pixel_A
    a["alignments3D/split"] = t.half - 1
    a["ctf/accel_kv"], a["ctf/cs_mm"], a["ctf/amp_contrast"] = t.voltage_kV, t.cs_mm, t.q0
    a["ctf/df1_A"], a["ctf/df2_A"] = t.df_u, t.df_v
    a["ctf/df_angle_rad"] = np.deg2rad(t.df_angle)
    a["ctf/phase_shift_rad"] = np.deg2rad(t.phase_shift)
    a["ctf/bfactor"] = t.bfactor
    a["ctf/exp_group_id"] = np.searchsorted(np.unique(t.pixel_A), t.pixel_A) + 1
    out = folder / "J9" / "particles.cs"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:  # np.save would append .npy
        np.save(f, a)
    return out


def write_cryodrgn(folder: Path, t: Truth, images: np.ndarray | None = None) -> tuple[Path, Path, Path]:
    """MRCS + poses.pkl ((A, trans as box fraction)) + ctf.pkl ((N, 9))."""
    images = random_images(t) if images is None else images
    stack = write_stack(folder / "drgn.mrcs", images, float(t.pixel_A[0]))
    trans = t.origin_A / t.pixel_A[:, None] / t.box
    with open(folder / "poses.pkl", "wb") as f:
        pickle.dump((t.matrices.astype(np.float32), trans.astype(np.float32)), f)
    ctf = np.stack([np.full(len(t.df_u), t.box), t.pixel_A, t.df_u, t.df_v, t.df_angle,
                    t.voltage_kV, t.cs_mm, t.q0, t.phase_shift], -1).astype(np.float32)
    with open(folder / "ctf.pkl", "wb") as f:
        pickle.dump(ctf, f)
    return stack, folder / "poses.pkl", folder / "ctf.pkl"


@pytest.fixture
def truth() -> Truth:
    return make_truth()


def real_space_projection(vol: np.ndarray, a: np.ndarray) -> np.ndarray:
    """p(x, y) = sum_z V(A^T (x, y, z)), trilinear sampling, FFT-aligned grid."""
    from scipy.ndimage import map_coordinates

    d = vol.shape[0]
    c = np.arange(d) - d // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    r = np.stack([x, y, z], -1).reshape(-1, 3)  # particle-frame coordinates
    s = r @ a  # rows of (A^T r)^T
    idx = np.stack([s[:, 2], s[:, 1], s[:, 0]]) + d // 2
    return map_coordinates(vol, idx, order=1, cval=0.0).reshape(d, d, d).sum(axis=0)


def run_cli(*args) -> int:
    """The ``cryosplat`` entry point as a user runs it: errors as one line on stderr and an
    exit status (returned), never a traceback."""
    from cryosplat.cli import main

    old = sys.argv
    sys.argv = ["cryosplat", *map(str, args)]
    try:
        main()
        return 0
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        sys.argv = old
