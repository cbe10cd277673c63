"""One in-memory description of a particle dataset, whatever file it came from."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from cryosplat.ctf import CTFParams
from cryosplat.errors import InputError
from cryosplat.io.mrc import ImageSource, header_pixel_size, rescaled_box


@dataclass
class OpticsGroup:
    """One optics group as RELION 3.1 defines it (values shared by its particles)."""

    number: int
    name: str
    pixel_size_A: float
    box_size: int
    voltage_kV: float
    cs_mm: float
    amplitude_contrast: float


@dataclass(kw_only=True)
class Particles:
    """A particle dataset.

    Images are lazy (:class:`ImageSource`); everything else is in memory, one row per
    particle, float64 on the CPU. Conventions (docs/conventions.md, cryosplat.geometry):

    * ``rotations`` `(N, 3, 3)`: RELION's ``A`` (``r_image = A r_map``), or None if the file
      has no poses.
    * ``shifts_A`` `(N, 2)`: RELION's (rlnOriginXAngst, rlnOriginYAngst) in Å.
    * ``ctf``: :class:`CTFParams`, or None if the file has no CTF parameters.
    * ``pixel_size_A`` `(N,)`: pixel size of the images as read (after any downsampling).
    * ``optics_group`` `(N,)`: 1-based optics group number, indexing ``optics``.
    * ``half_set`` `(N,)`: 1 or 2 from the file, 0 where the file defines no half-sets.
    * ``invert``: images are negated on read, for stacks with dark particles (cryoDRGN's and
      some cryoSPARC exports). The default follows RELION: the molecule is bright.
    * ``image_model``: the file's columns that change the image model beyond the basic CTF,
      each with what cryosplat does with it (:mod:`cryosplat.io.optics`).
    """

    source: str
    images: ImageSource
    rotations: torch.Tensor | None
    shifts_A: torch.Tensor
    ctf: CTFParams | None
    pixel_size_A: torch.Tensor
    optics_group: torch.Tensor
    optics: list[OpticsGroup]
    half_set: torch.Tensor
    defaults: dict[str, str] = field(default_factory=dict)
    invert: bool = False
    image_model: dict[str, str] = field(default_factory=dict)
    origin_scale: torch.Tensor | None = None  # (N,) shifts_A / the file's, after rescaled()

    def __len__(self) -> int:
        return len(self.images)

    @property
    def box_size(self) -> int:
        """`D`, the images' side in pixels as read."""
        return self.images.box_size

    def subset(self, indices) -> Particles:
        """The particles ``indices`` (array of ints or boolean mask), in that order."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.nonzero(idx)[0]
        t = torch.from_numpy(idx.astype(np.int64))
        return replace(
            self,
            images=self.images.subset(idx),
            rotations=None if self.rotations is None else self.rotations[t],
            shifts_A=self.shifts_A[t],
            ctf=None if self.ctf is None else self.ctf[t],
            pixel_size_A=self.pixel_size_A[t],
            optics_group=self.optics_group[t],
            half_set=self.half_set[t],
            origin_scale=None if self.origin_scale is None else self.origin_scale[t],
        )

    def first(self, n: int | None) -> Particles:
        """The first ``n`` particles (all if None)."""
        return self if n is None or n >= len(self) else self.subset(np.arange(n))

    def downsample(self, box_size: int) -> Particles:
        """Fourier-crop the images to ``box_size`` on read; pixel sizes grow by D/d."""
        d = self.images.stored_box_size
        if not 1 < box_size <= d:
            raise InputError(self.source, f"--box {box_size}: expected a box between 2 and "
                                          f"the images' {d} pixels")
        factor = self.images.box_size / box_size
        optics = [replace(o, pixel_size_A=o.pixel_size_A * o.box_size / box_size,
                          box_size=box_size) for o in self.optics]
        return replace(self, images=self.images.with_box_size(box_size),
                       pixel_size_A=self.pixel_size_A * factor, optics=optics)

    def needs_rescaling(self) -> bool:
        """Whether the optics groups differ in pixel size or box."""
        return len({(round(o.pixel_size_A, 6), o.box_size) for o in self.optics}) > 1

    def common_grid(self, target_pixel_A: float | None = None) -> tuple[float, int]:
        """The pixel size (Å) and box that :meth:`rescaled` brings every group to."""
        target = min(o.pixel_size_A for o in self.optics) if target_pixel_A is None \
            else float(target_pixel_A)
        if not target > 0:
            raise InputError(self.source, f"--pixel-size {target}: expected a positive size")
        return target, max(rescaled_box(o.box_size, o.pixel_size_A, target) for o in self.optics)

    def rescaled(self, target_pixel_A: float | None = None) -> Particles:
        """Every optics group brought to one pixel size (the smallest of the groups unless
        ``target_pixel_A``) and one box, as RELION reconstructs groups of different pixel
        sizes together.

        Each group's images are Fourier-padded or cropped to the box nearest its field of view
        at the target (:func:`cryosplat.io.mrc.rescaled_box`), then padded or cropped in real
        space to the largest such box. That box's true pixel ``p'`` differs from the target
        ``p`` by the rounding (0.2% for 196 px from 1.25 to 1.24 Å: 198 px); the difference is
        carried exactly as an isotropic magnification ``p / p'`` (on top of the group's own
        rlnMagMat) and the origins in Å are scaled by the same factor, so that nothing is
        approximated beyond the Fourier interpolation itself."""
        target, common = self.common_grid(target_pixel_A)
        boxes = {o.number: rescaled_box(o.box_size, o.pixel_size_A, target) for o in self.optics}
        ratio_of = {o.number: target * boxes[o.number] / (o.box_size * o.pixel_size_A)
                    for o in self.optics}
        ratio = torch.tensor([ratio_of[int(g)] for g in self.optics_group], dtype=torch.float64)
        ctf = self.ctf
        if ctf is not None and (ctf.mag_matrix is not None or bool((ratio != 1).any())):
            mag = (torch.eye(2, dtype=torch.float64).expand(len(self), 2, 2)
                   if ctf.mag_matrix is None else ctf.mag_matrix)
            ctf = replace(ctf, mag_matrix=ratio[:, None, None] * mag)
        described = ", ".join(f"group {o.number}: {o.box_size} px of {o.pixel_size_A:g} Å"
                              for o in self.optics)
        defaults = {**self.defaults, "pixel size": f"all optics groups Fourier-rescaled to "
                    f"{target:g} Å in a box of {common} px ({described})"}
        return replace(
            self, images=self.images.rescaled(self.pixel_size_A.numpy(), target, common),
            pixel_size_A=torch.full((len(self),), target, dtype=torch.float64),
            shifts_A=self.shifts_A * ratio[:, None], ctf=ctf, defaults=defaults,
            optics=[replace(o, pixel_size_A=target, box_size=common) for o in self.optics],
            origin_scale=ratio if self.origin_scale is None else self.origin_scale * ratio)

    def require_poses(self) -> torch.Tensor:
        """The rotations `(N, 3, 3)` (RELION's ``A``), or an InputError naming the file."""
        if self.rotations is None:
            raise InputError(self.source, "no poses (rlnAngleRot/Tilt/Psi, alignments3D/pose or "
                                          "a poses.pkl): reconstruction needs particles from a "
                                          "consensus refinement")
        return self.rotations

    def require_ctf(self) -> CTFParams:
        """The CTF parameters, or an InputError naming the file."""
        if self.ctf is None:
            raise InputError(self.source, "no CTF parameters (rlnDefocusU, ctf/df1_A or a "
                                          "ctf.pkl)")
        return self.ctf

    def require_single_pixel_size(self) -> float:
        """The dataset's one pixel size; an error if its optics groups differ."""
        sizes = sorted({round(float(x), 6) for x in self.pixel_size_A.unique()})
        if len(sizes) > 1:
            raise InputError(self.source, f"optics groups have different pixel sizes ({sizes} Å);"
                                          " this step needs one pixel size")
        return float(self.pixel_size_A[0])

    def check_images(self) -> None:
        """Check every stack (headers, sizes, indices; no pixel data) and that each stack's
        header pixel size, where it gives one (:func:`cryosplat.io.mrc.header_pixel_size`),
        agrees with the metadata to 1%."""
        headers = self.images.check()
        to_stored = self.images.box_size / self.images.stored_box_size
        on_disk = (None if self.images.source_pixel_A is None
                   else torch.from_numpy(self.images.source_pixel_A))
        for k, (f, h) in enumerate(zip(self.images.files, headers)):
            sel = torch.from_numpy(self.images.file_index == k)
            if not bool(sel.any()):
                continue
            header = header_pixel_size(h)
            stored = (self.pixel_size_A[sel] * to_stored) if on_disk is None else on_disk[sel]
            for pix in sorted({round(float(x), 6) for x in stored}):
                if header is not None and abs(header - pix) > 0.01 * pix:
                    raise InputError(f, f"header pixel size {header:g} Å disagrees with "
                                        f"{pix:g} Å in {self.source}; one of them is wrong: fix "
                                        "the header or the metadata")

    def read_images(self, indices) -> torch.Tensor:
        """Images of particles ``indices``: `(n, D, D)` float32 tensor (negated if ``invert``)."""
        images = torch.from_numpy(self.images.read(np.asarray(indices)))
        return -images if self.invert else images


def assign_half_sets(particles: Particles, seed: int) -> np.ndarray:
    """The gold-standard half-set (1 or 2) of each particle, `(N,)`: the file's
    ``rlnRandomSubset`` (or cryoSPARC split) where every particle has one; otherwise a random,
    seeded 50/50 split. Every command that splits a dataset calls this, once per run."""
    half = particles.half_set.numpy().copy()
    if (half > 0).all():
        empty = [h for h in (1, 2) if not (half == h).any()]
        if empty:
            raise InputError(particles.source, empty_half_set(half))
        return half
    g = np.random.default_rng(seed)
    n = len(half)
    perm = g.permutation(n)
    half[perm[: n // 2]] = 1
    half[perm[n // 2:]] = 2
    return half


def empty_half_set(half: np.ndarray) -> str:
    """The error for a file whose half-set column leaves one half-set empty."""
    full = 1 if (half == 1).any() else 2
    return (f"the file's half-sets (rlnRandomSubset or alignments3D/split) put all {len(half)} "
            f"particles in half-set {full} and none in half-set {3 - full}; a gold-standard "
            "FSC needs both: drop that column (a seeded random split is then used) or fix it")


def check_finite(source: str | Path, name: str, values: np.ndarray) -> np.ndarray:
    """Refuse NaN/Inf in a metadata column, naming the column and the first bad row."""
    values = np.array(values, dtype=np.float64)  # a writable copy
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.nonzero(bad.reshape(len(values), -1).any(axis=1))[0][0])
        raise InputError(source, f"{name} row {row + 1} is {values.reshape(len(values), -1)[row]}"
                                 "; expected a finite number")
    return values


def check_range(source: str | Path, name: str, values: np.ndarray, lo: float, hi: float,
                lo_open: bool = False, hi_open: bool = False) -> np.ndarray:
    """Refuse values outside [lo, hi] (or open bounds), naming the first bad row."""
    values = check_finite(source, name, values)
    bad = (values <= lo if lo_open else values < lo) | (values >= hi if hi_open else values > hi)
    if bad.any():
        row = int(np.nonzero(bad)[0][0])
        lb, hb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise InputError(source, f"{name} row {row + 1} is {values[row]:g}; expected a value in "
                                 f"{lb}{lo:g}, {hi:g}{hb}")
    return values
