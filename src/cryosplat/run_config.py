"""What a run was asked to do: where its particles come from (:class:`ParticleSource`, the
shared command-line options) and everything else a reconstruction takes (:class:`RunConfig`,
written to ``config.json`` and read back by ``--resume``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from cryosplat.io import Particles, read_particles
from cryosplat.train.config import TrainConfig


@dataclass
class ParticleSource:
    """Where a run's particles come from, as the shared command-line options give it."""

    particles: str
    datadir: str | None = None
    poses: str | None = None
    ctf: str | None = None
    pixel_size: float | None = None
    box: int | None = None
    max_particles: int | None = None
    invert: bool = False
    amplitude_contrast: float | None = None

    def read(self, one_pixel_size: bool = True) -> Particles:
        """The particles; with ``one_pixel_size`` (every command but ``info``) optics groups
        of different pixel sizes or boxes are rescaled to one (:func:`read_particles`)."""
        return read_particles(self.particles, datadir=self.datadir, poses=self.poses,
                              ctf=self.ctf, pixel_size_A=self.pixel_size, box_size=self.box,
                              max_particles=self.max_particles, invert=self.invert,
                              amplitude_contrast=self.amplitude_contrast,
                              one_pixel_size=one_pixel_size)


@dataclass
class RunConfig(ParticleSource):
    """Everything a Gaussian reconstruction was asked to do (``config.json``); the command
    line's defaults are these."""

    truth: str | None = None
    mask: str | None = None
    device: str = "auto"
    validate: bool = True  # reconstruct each half-set directly, to cross-validate
    postprocess: bool = True  # sharpen the half-maps' average into out/postprocess
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        """``config.json``'s contents."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """The configuration of a :meth:`to_dict`."""
        return cls(**{**d, "train": TrainConfig(**d["train"])})
