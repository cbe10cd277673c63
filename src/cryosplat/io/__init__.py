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
from cryosplat.io.star import read_star
from cryosplat.io.star_writer import write_particles

__all__ = ["InputError", "OpticsGroup", "Particles", "assign_half_sets", "read_particles",
           "read_volume", "write_particles", "write_volume"]


def read_particles(path: str | Path, datadir: str | Path | None = None,
                   poses: str | Path | None = None, ctf: str | Path | None = None,
                   pixel_size_A: float | None = None, box_size: int | None = None,
                   max_particles: int | None = None, invert: bool = False,
                   amplitude_contrast: float | None = None,
                   one_pixel_size: bool = False) -> Particles:
    """Read particles from ``.star``, ``.cs`` or ``.mrcs`` (+ cryoDRGN ``poses``/``ctf`` pkls).

    ``pixel_size_A`` is the pixel size of files that give none. With ``one_pixel_size`` (what
    the commands ask for), optics groups that differ in pixel size or box are Fourier-rescaled
    to one (the smallest pixel size, or ``pixel_size_A`` for files that give theirs;
    :meth:`Particles.rescaled`); without it the file is read as it is. ``box_size`` then
    Fourier-crops the images on read (pixel size updated); ``max_particles`` keeps the first
    N; ``invert`` negates the images on read (dark particles), relative to what the file
    says (a cryoSPARC ``blob/sign`` of -1 already negates them). ``amplitude_contrast`` is
    for files that give none.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".star":
        with malformed(path, "RELION STAR file"):
            particles = read_star(path, datadir, pixel_size_A, amplitude_contrast)
    elif suffix == ".cs":
        with malformed(path, "cryoSPARC .cs file"):
            particles = read_cs(path, datadir, amplitude_contrast)
    elif suffix in (".mrcs", ".mrc"):
        with malformed(path, "stack or cryoDRGN pkl"):
            particles = read_cryodrgn(path, poses, ctf, pixel_size_A)
    else:
        raise InputError(path, f"unknown particle file type {suffix!r}; expected .star, .cs or "
                               ".mrcs (with --poses/--ctf cryoDRGN pkls)")
    if (poses is not None or ctf is not None) and suffix not in (".mrcs", ".mrc"):
        raise InputError(path, "--poses/--ctf pkls go with an .mrcs stack, not a "
                               f"{suffix} file, which carries its own")
    # where --pixel-size gave the file's pixel size, every group already has it
    if one_pixel_size and (particles.needs_rescaling() or (pixel_size_A is not None and any(
            abs(o.pixel_size_A - pixel_size_A) > 1e-6 * pixel_size_A for o in particles.optics))):
        particles = particles.rescaled(pixel_size_A)
    if invert:
        particles = replace(particles, invert=not particles.invert)
    if max_particles is not None:
        if max_particles < 1:
            raise InputError(None, f"--max-particles {max_particles}: expected a positive count")
        particles = particles.first(max_particles)
    if box_size is not None and box_size != particles.box_size:
        particles = particles.downsample(box_size)
    return particles
