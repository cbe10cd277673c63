"""Writing particles as RELION 3.1 STAR (data_optics with each group's higher-order optics,
data_particles) + MRCS, as RELION reads them back (:mod:`cryosplat.io.star` reads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import starfile
import torch

from cryosplat import geometry
from cryosplat.ctf import CTFParams
from cryosplat.io.atomic import atomic_path
from cryosplat.io.mrc import write_stack
from cryosplat.io.particles import Particles
from cryosplat.io.star import ANGLE_COLUMNS, OPTICS_CTF_COLUMNS


def particles_to_star_tables(particles: Particles,
                             image_names: list[str]) -> dict[str, pd.DataFrame]:
    """RELION 3.1 data_optics and data_particles tables for ``particles``."""
    optics = pd.DataFrame({
        "rlnOpticsGroup": [o.number for o in particles.optics],
        "rlnOpticsGroupName": [o.name for o in particles.optics],
        "rlnImagePixelSize": [o.pixel_size_A for o in particles.optics],
        "rlnImageSize": [particles.box_size for _ in particles.optics],
        "rlnImageDimensionality": [2 for _ in particles.optics],
        "rlnVoltage": [o.voltage_kV for o in particles.optics],
        "rlnSphericalAberration": [o.cs_mm for o in particles.optics],
        "rlnAmplitudeContrast": [o.amplitude_contrast for o in particles.optics],
    })
    table: dict[str, object] = {"rlnImageName": image_names}
    if particles.rotations is not None:
        euler = geometry.matrix_to_euler_relion(particles.rotations).numpy()
        for i, column in enumerate(ANGLE_COLUMNS):
            table[column] = euler[:, i]
    table["rlnOriginXAngst"] = particles.shifts_A[:, 0].numpy()
    table["rlnOriginYAngst"] = particles.shifts_A[:, 1].numpy()
    if particles.ctf is not None:
        c = particles.ctf
        table.update({
            "rlnDefocusU": c.defocus_u_A.numpy(), "rlnDefocusV": c.defocus_v_A.numpy(),
            "rlnDefocusAngle": c.defocus_angle_deg.numpy(),
            "rlnPhaseShift": c.phase_shift_deg.numpy(),
            "rlnCtfBfactor": c.bfactor_A2.numpy(), "rlnCtfScalefactor": c.scale.numpy(),
        })
        # Per-particle optics values win over the group's (RELION reads them so).
        group_values = {k: np.array([getattr({o.number: o for o in particles.optics}[int(g)], k)
                                     for g in particles.optics_group]) for k in OPTICS_CTF_COLUMNS}
        for key, col in OPTICS_CTF_COLUMNS.items():
            mine = getattr(c, key).numpy()
            if not np.allclose(mine, group_values[key], equal_nan=False):
                table[col] = mine
        _write_optics_terms(optics, particles, c)
    table["rlnOpticsGroup"] = particles.optics_group.numpy()
    if (particles.half_set > 0).all():
        table["rlnRandomSubset"] = particles.half_set.numpy()
    return {"optics": optics, "particles": pd.DataFrame(table)}


def _write_optics_terms(optics: pd.DataFrame, particles: Particles, c: CTFParams) -> None:
    """Add each group's higher-order optics (its first particle's CTF ``c``) to a data_optics
    table."""
    first = [int(torch.nonzero(particles.optics_group == o.number)[0])
             if bool((particles.optics_group == o.number).any()) else 0 for o in particles.optics]

    def coefficients(t: torch.Tensor) -> list[str]:
        return ["[" + ",".join(f"{float(x):.10g}" for x in t[i]) + "]" for i in first]

    if c.beam_tilt_mrad is not None:
        optics["rlnBeamTiltX"] = [float(c.beam_tilt_mrad[i, 0]) for i in first]
        optics["rlnBeamTiltY"] = [float(c.beam_tilt_mrad[i, 1]) for i in first]
    if c.odd_zernike is not None:
        optics["rlnOddZernike"] = coefficients(c.odd_zernike)
    if c.even_zernike is not None:
        optics["rlnEvenZernike"] = coefficients(c.even_zernike)
    if c.mag_matrix is not None:
        for name, (a, b) in (("00", (0, 0)), ("01", (0, 1)), ("10", (1, 0)), ("11", (1, 1))):
            optics[f"rlnMagMat{name}"] = [float(c.mag_matrix[i, a, b]) for i in first]
    if c.premultiplied is not None:
        optics["rlnCtfDataAreCtfPremultiplied"] = [int(c.premultiplied[i] != 0) for i in first]


def write_star(path: str | Path, tables: dict[str, pd.DataFrame]) -> None:
    """Write STAR tables atomically (a temporary name, then a rename)."""
    with atomic_path(path) as tmp:
        starfile.write(tables, tmp, float_format="%.6f")


def write_particles(out_dir: str | Path, particles: Particles, batch_size: int = 256,
                    stack_name: str = "particles.mrcs", star_name: str = "particles.star",
                    progress=None) -> Path:
    """Write ``particles`` (images as read: downsampled, subset) to one MRCS + a 3.1 STAR.

    ``progress`` is an optional callable taking the number of images just written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n, d = len(particles), particles.box_size
    pix = particles.pixel_size_A.unique()

    def batches():
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(n, start + batch_size))
            yield particles.images.read(idx)
            if progress is not None:
                progress(len(idx))

    write_stack(out_dir / stack_name, batches(), n, d, float(pix[0]))
    names = [f"{i + 1:06d}@{stack_name}" for i in range(n)]
    write_star(out_dir / star_name, particles_to_star_tables(particles, names))
    return out_dir / star_name
