"""The settings of ``cryosplat abinitio`` (:class:`AbinitioConfig`), whose defaults are the
command line's."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cryosplat.errors import InputError


@dataclass
class AbinitioConfig:
    """Settings of ``cryosplat abinitio`` (``config.json``'s ``abinitio``)."""

    iterations: int = 60  # minibatches
    batch_size: int = 300
    initial_resolution_A: float = 30.0
    final_resolution_A: float = 12.0
    angle_step_deg: float = 15.0  # the global grid (so3_grid_size); the local search halves it
    local_levels: int = 3
    max_shift_A: float = 0.0  # 0: 5% of the box
    candidates: int = 8  # kept per particle, locally searched, weighted
    anneal_fraction: float = 0.6
    decay: float = 0.7  # of the running sums at each minibatch
    n_gaussians: int = 1000
    fit_steps: int = 10  # Adam steps per minibatch
    final_fit_steps: int = 200
    lr_means_px: float = 0.2  # working voxels per Adam step
    particle_diameter_A: float = 0.0  # 0: 70% of the box
    symmetry: str = "C1"
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse settings that cannot run, naming the command-line option."""
        for option, value in (("--iterations", self.iterations), ("--batch", self.batch_size),
                              ("--initial-resolution", self.initial_resolution_A),
                              ("--final-resolution", self.final_resolution_A),
                              ("--angle-step", self.angle_step_deg),
                              ("--candidates", self.candidates),
                              ("--gaussians", self.n_gaussians)):
            if not value > 0:
                raise InputError(None, f"{option} {value}: expected a positive value")
        if self.final_resolution_A > self.initial_resolution_A:
            raise InputError(None, f"--final-resolution {self.final_resolution_A} Å is coarser "
                                   f"than --initial-resolution {self.initial_resolution_A} Å")
        if not 0 <= self.decay < 1:
            raise InputError(None, f"decay {self.decay}: expected 0 <= decay < 1")

    @classmethod
    def from_dict(cls, d: dict) -> AbinitioConfig:
        """The config of a ``config.json`` (:func:`dataclasses.asdict` of one)."""
        return cls(**d)

    def to_dict(self) -> dict:
        """The ``config.json`` form."""
        return asdict(self)
