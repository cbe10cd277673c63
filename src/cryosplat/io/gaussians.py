"""Exporting a Gaussian mixture: a .ply of the Gaussians and a PDB of pseudo-atoms.

Both are written in the frame of the maps cryosplat writes (origin 0, voxel i at
``i * voxel_size``), so they overlay map.mrc in ChimeraX: a Gaussian's position is its mean
plus ``(D//2) * voxel_size`` on each axis.

- .ply (binary little-endian), one vertex per Gaussian, the field names of 3D Gaussian-splatting
  viewers: ``x y z`` (Å), ``scale_0..2`` (natural log of the standard deviations, Å),
  ``rot_0..3`` (unit quaternion w, x, y, z) and ``amplitude`` (integrated density).
- PDB: one pseudo-atom per Gaussian (element C, residue GAU), occupancy = amplitude /
  max amplitude, B-factor = 8 pi^2 x mean variance (Å², the isotropic B of a Gaussian of
  that size), chains A, B, ... of at most 9999 residues.
"""

from __future__ import annotations

import math
from pathlib import Path

import gemmi
import numpy as np
import torch

from cryosplat.io.atomic import atomic_path


def _map_frame(means_A: torch.Tensor, box_size: int, voxel_size_A: float) -> np.ndarray:
    return means_A.detach().cpu().double().numpy() + (box_size // 2) * voxel_size_A


def write_ply(path: str | Path, mixture, box_size: int, voxel_size_A: float) -> None:
    """Write ``mixture`` (a :class:`cryosplat.gaussians.GaussianMixture`) as a binary .ply."""
    xyz = _map_frame(mixture.means_A, box_size, voxel_size_A)
    log_s = mixture.log_scales_A.detach().cpu().double().numpy()
    q = mixture.quaternions.detach().cpu().double()
    q = (q / q.norm(dim=-1, keepdim=True)).numpy()
    amp = mixture.amplitudes.detach().cpu().double().numpy()
    names = ["x", "y", "z", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3",
             "amplitude"]
    table = np.concatenate([xyz, log_s, q, amp[:, None]], axis=1).astype("<f4")
    header = ["ply", "format binary_little_endian 1.0",
              "comment cryosplat Gaussian mixture; x y z in A in the map frame (origin 0), "
              "scale = ln(standard deviation / A), rot = quaternion (w, x, y, z)",
              f"element vertex {len(table)}", *[f"property float {n}" for n in names],
              "end_header"]
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(("\n".join(header) + "\n").encode("ascii"))
            f.write(np.ascontiguousarray(table).tobytes())


def read_ply(path: str | Path) -> dict[str, np.ndarray]:
    """Read a .ply written by :func:`write_ply`: {property name: `(M,)` array}."""
    with open(path, "rb") as f:
        names: list[str] = []
        n = None
        while True:
            raw = f.readline()
            if not raw:
                raise ValueError(f"{path}: no end_header")
            line = raw.decode("ascii").strip()
            if line.startswith("element vertex"):
                n = int(line.split()[-1])
            elif line.startswith("property float"):
                names.append(line.split()[-1])
            elif line == "end_header":
                break
        data = np.frombuffer(f.read(), dtype="<f4")
    if n is None or data.size != n * len(names):
        raise ValueError(f"{path}: expected {n} vertices of {len(names)} floats")
    table = data.reshape(n, len(names))
    return {name: table[:, i] for i, name in enumerate(names)}


def write_pdb(path: str | Path, mixture, box_size: int, voxel_size_A: float) -> None:
    """Write ``mixture`` as pseudo-atoms in a PDB file (gemmi) that ChimeraX opens."""
    xyz = _map_frame(mixture.means_A, box_size, voxel_size_A)
    var = (mixture.scales_A.detach().cpu().double() ** 2).mean(-1).numpy()
    amp = mixture.amplitudes.detach().cpu().double().numpy()
    occ = amp / max(float(amp.max()), 1e-30)
    structure = gemmi.Structure()
    structure.name = "cryosplat"
    side_A = box_size * voxel_size_A
    structure.cell = gemmi.UnitCell(side_A, side_A, side_A, 90, 90, 90)
    model = gemmi.Model(1)
    per_chain = 9999
    for c in range(math.ceil(len(xyz) / per_chain)):
        chain = gemmi.Chain(_chain_name(c))
        for i in range(c * per_chain, min(len(xyz), (c + 1) * per_chain)):
            res = gemmi.Residue()
            res.name = "GAU"
            res.seqid = gemmi.SeqId(i - c * per_chain + 1, " ")
            res.het_flag = "H"
            atom = gemmi.Atom()
            atom.name = "C"
            atom.element = gemmi.Element("C")
            atom.pos = gemmi.Position(*xyz[i])
            atom.occ = float(occ[i])
            atom.b_iso = float(8 * math.pi**2 * var[i])
            res.add_atom(atom)
            chain.add_residue(res)
        model.add_chain(chain)
    structure.add_model(model)
    structure.setup_entities()
    with atomic_path(path) as tmp:
        structure.write_pdb(str(tmp))


def _chain_name(i: int) -> str:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return letters[i] if i < 26 else letters[i // 26 - 1] + letters[i % 26]
