"""Reading and writing the field's file formats.

:func:`read_particles` reads RELION STAR, cryoSPARC .cs, or an MRCS stack with cryoDRGN
pkls into one :class:`Particles` description.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from cryosplat.errors import InputError, malformed
from cryosplat.io.cryodrgn import read_cryodrgn
from cryosplat.io.cryosparc import read_cs
from cryosplat.io.mrc import read_volume, write_volume
from cryosplat.io.particles import OpticsGroup, Particles, assign_half_sets
from cryosplat.io.star import read_star, write_particles

__all__ = ["InputError", "OpticsGroup", "Particles", "assign_half_sets", "read_particles",
           "read_volume", "write_particles", "write_volume"]


def read_particles(path: str | Path, datadir: str | Path | None = None,
                   poses: str | Path | None = None, ctf: str | Path | None = None,
                   pixel_size_A: float | None = None, box_size: int | None = None,
                   max_particles: int | None = None, invert: bool = False) -> Particles:
    """Read particles from ``.star``, ``.cs`` or ``.mrcs`` (+ cryoDRGN ``poses``/``ctf`` pkls).

    ``box_size`` Fourier-crops the images on read (pixel size updated); ``max_particles``
    keeps the first N; ``invert`` negates the images on read (dark particles).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".star":
        with malformed(path, "RELION STAR file"):
            particles = read_star(path, datadir, pixel_size_A)
    elif suffix == ".cs":
        with malformed(path, "cryoSPARC .cs file"):
            particles = read_cs(path, datadir)
    elif suffix in (".mrcs", ".mrc"):
        with malformed(path, "stack or cryoDRGN pkl"):
            particles = read_cryodrgn(path, poses, ctf, pixel_size_A)
    else:
        raise InputError(path, f"unknown particle file type {suffix!r}; expected .star, .cs or "
                               ".mrcs (with --poses/--ctf cryoDRGN pkls)")
    if (poses is not None or ctf is not None) and suffix not in (".mrcs", ".mrc"):
        raise InputError(path, "--poses/--ctf pkls go with an .mrcs stack, not a "
                               f"{suffix} file, which carries its own")
    if invert:
        particles = replace(particles, invert=True)
    if max_particles is not None:
        if max_particles < 1:
            raise InputError(None, f"--max-particles {max_particles}: expected a positive count")
        particles = particles.first(max_particles)
    if box_size is not None and box_size != particles.box_size:
        particles = particles.downsample(box_size)
    return particles
