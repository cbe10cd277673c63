"""The STAR file ``cryosplat refine`` (and ``abinitio``) writes: the input's rows and
columns, with the refined angles, origins and defoci in place, readable by RELION,
cryoSPARC's importer and cryosplat.

From a RELION 3.1+ STAR every block and column is kept as it was and only rlnAngleRot/Tilt/
Psi, rlnOriginX/YAngst and rlnDefocusU/V are replaced (rlnRandomSubset is set to the run's
half-sets, so RELION and cryoSPARC keep them), and rlnImageName names each stack by the path
it was read from, so the new file finds the images wherever it is written. A RELION 3.0
STAR, a cryoSPARC ``.cs`` or a cryoDRGN stack becomes a RELION 3.1 STAR (data_optics +
data_particles) whose image names point at the original stacks, with every other column of
a 3.0 STAR kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryosplat import geometry
from cryosplat.errors import InputError
from cryosplat.io.particles import Particles
from cryosplat.io.star import ANGLE_COLUMNS
from cryosplat.io.star_writer import particles_to_star_tables, write_star

# RELION 3.0 columns that a 3.1 STAR replaces (by data_optics or by rlnOriginX/YAngst)
_SUPERSEDED_30 = {"rlnOriginX", "rlnOriginY", "rlnMagnification", "rlnDetectorPixelSize"}


def refined_tables(refined: Particles, half_set: np.ndarray) -> dict[str, pd.DataFrame]:
    """The STAR tables of module docstring for ``refined`` (the particles as read, with
    their refined poses and CTF) and the half-set of each (1 or 2)."""
    n = len(refined)
    src = Path(refined.source)
    blocks = starfile.read(src, always_dict=True) if src.suffix.lower() == ".star" else {}
    if "optics" in blocks and "particles" in blocks:
        tables = {k: (v.copy() if isinstance(v, pd.DataFrame) else v) for k, v in blocks.items()}
        particles = tables["particles"].iloc[:n].reset_index(drop=True)  # --max-particles
        # the names as resolved on read: a name relative to the input's folder would not be
        # found beside the new file (measured: a cryosplat simulate STAR, abinitio's output)
        images = refined.images
        particles["rlnImageName"] = [f"{int(s) + 1:06d}@{images.files[int(f)]}"
                                     for f, s in zip(images.file_index, images.slice_index)]
    else:
        if refined.origin_scale is not None:
            raise InputError(src, "its optics groups were rescaled to one pixel size; the refined "
                                  "STAR can name the original stacks only for a RELION 3.1+ "
                                  "input, whose optics table it keeps")
        images = refined.images
        names = [f"{int(s) + 1:06d}@{images.files[int(f)]}"
                 for f, s in zip(images.file_index, images.slice_index)]
        tables = particles_to_star_tables(refined, names)
        if refined.box_size != images.stored_box_size:  # --box: the names are the full images
            factor = refined.box_size / images.stored_box_size
            tables["optics"]["rlnImagePixelSize"] *= factor
            tables["optics"]["rlnImageSize"] = images.stored_box_size
        particles = tables["particles"]
        if blocks:  # RELION 3.0: keep its other columns
            old = next(iter(blocks.values())).iloc[:n].reset_index(drop=True)
            for c in old.columns:
                if c not in particles.columns and c not in _SUPERSEDED_30:
                    particles[c] = old[c].to_numpy()
    euler = geometry.matrix_to_euler_relion(refined.require_poses()).numpy()
    for i, c in enumerate(ANGLE_COLUMNS):
        particles[c] = euler[:, i]
    # in the file's own Å (rescaled groups carry their rounding as a scale: Particles.rescaled)
    shifts = refined.shifts_A if refined.origin_scale is None else \
        refined.shifts_A / refined.origin_scale[:, None]
    particles["rlnOriginXAngst"] = shifts[:, 0].numpy()
    particles["rlnOriginYAngst"] = shifts[:, 1].numpy()
    ctf = refined.require_ctf()
    particles["rlnDefocusU"] = ctf.defocus_u_A.numpy()
    particles["rlnDefocusV"] = ctf.defocus_v_A.numpy()
    particles["rlnRandomSubset"] = np.asarray(half_set, dtype=np.int64)
    tables["particles"] = particles
    return tables


def write_refined_star(path: str | Path, refined: Particles, half_set: np.ndarray) -> Path:
    """Write :func:`refined_tables` to ``path`` (atomically). Returns ``path``."""
    write_star(path, refined_tables(refined, half_set))
    return Path(path)
