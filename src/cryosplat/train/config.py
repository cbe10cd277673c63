"""The settings of a Gaussian reconstruction. Their defaults are the command line's: the CLI
takes each option's default from here, and ``config.json`` stores them as a dict."""

from __future__ import annotations

from dataclasses import dataclass

from cryosplat.errors import InputError
from cryosplat.symmetry import symmetry_matrices


@dataclass
class TrainConfig:
    """Settings of a gold-standard Gaussian reconstruction (``config.json``'s ``train``)."""

    objective: str = "volume"  # "volume": each half-set's accumulated Fourier sums, all its
    # particles at once (train/volume.py); "images": mini-batches of rendered particles
    init: str = "map"  # "map": Gaussians drawn inside each half-set's own direct map, as many
    # as its support holds (train/seeding.py); "random": n_gaussians in a ball
    gaussians_per_voxel: float = 0.3  # with init="map": Gaussians per voxel of support
    # (0.3 and 1.0 gave FSCs within 0.006 of each other on 4AKE, box 64; 0.3 is 3.5x faster)
    seed_scale_px: float = 1.0  # with init="map": initial width of the Gaussians, voxels
    max_seed_gaussians: int = 100_000  # with init="map": at most this many per half-set
    volume_lr_means_px: float = 0.1  # objective="volume": Adam step of the means, voxels
    max_steps: int = 300  # objective="volume": most Adam steps per half-set
    holdout_fraction: float = 0.05  # objective="volume": own particles held out to stop on
    volume_n_sigma: float = 3.0  # objective="volume": voxelisation window, sigmas (4.0: 1.5x
    # the time of a step on 4AKE at box 64)
    patience: int = 5  # steps without held-out gain before a learning-rate cut or the stop
    lr_cuts: int = 2  # learning-rate cuts before the run stops
    lr_cut_factor: float = 0.3
    stop_tolerance: float = 1e-3  # a gain below this x the total gain so far is no gain
    n_gaussians: int = 2000  # per half-set, at the start (init="random")
    batch_size: int = 32  # particles per step and half-set
    epochs: float = 4.0  # passes over each half-set
    lr_means_px: float = 0.5  # Adam step of the means, pixels; decays to lr_final_fraction
    lr_scales: float = 0.02  # log-scales
    lr_rotations: float = 0.02  # quaternions
    lr_amplitudes: float = 0.02  # softplus-raw amplitudes
    lr_final_fraction: float = 0.02
    init_radius_fraction: float = 0.3  # Gaussians start uniform in a ball of this x box
    init_scale_px: float = 2.0
    n_sigma: float = 4.0
    blur_px: float = 0.0
    loss: str = "real"  # "real": real-space MSE (the paper's); "fourier": noise-whitened
    densify: bool = True  # split Gaussians with large mean gradients, prune vanishing ones
    # (on 4AKE, 2000 particles, 500 Gaussians, it reached 4.18 Å vs truth at FSC 0.5 in 35 s
    # against 5.62 Å in 42 s with the fixed count)
    densify_every: int = 25  # steps between densify/prune rounds
    densify_until: float = 0.6  # ... during this fraction of the run
    densify_fraction: float = 0.05  # share of Gaussians split per round (largest gradients)
    max_gaussians: int = 0  # cap with densify; 0 = 4 x n_gaussians
    prune_below: float = 0.01  # prune amplitudes below this x the median amplitude
    support_radius_A: float = 0.0  # Gaussians whose centre leaves this sphere are replaced
    # (by splits of in-support ones, so the count holds); 0 = unconstrained
    eval_every: int = 50  # steps between FSC evaluations (and log lines)
    checkpoint_every: int = 50  # steps between checkpoints
    seed: int = 0  # initialisation, batch order and (when the file has none) half-set split
    symmetry: str = "C1"  # RELION's point group (cryosplat/symmetry.py); objective="volume"
    # fits one asymmetric unit and its copies
    loader_workers: int = 1  # DataLoader processes reading ahead (0: read on demand)

    def __post_init__(self) -> None:
        """Refuse settings that cannot run, naming the command-line option."""
        for option, value, allowed in (("--objective", self.objective, ("volume", "images")),
                                       ("--init", self.init, ("map", "random")),
                                       ("--loss", self.loss, ("real", "fourier"))):
            if value not in allowed:
                raise InputError(None, f"{option} {value}: expected {' or '.join(allowed)}")
        order = len(symmetry_matrices(self.symmetry))  # refuses an unknown group
        if order > 1 and self.objective != "volume":
            raise InputError(None, f"--sym {self.symmetry}: symmetry is for --objective volume "
                                   "(the default); --objective images has none yet")
        if not self.support_radius_A >= 0:
            raise InputError(None, f"--particle-diameter {2 * self.support_radius_A:g}: expected "
                                   "a diameter in Å, or 0 for no limit")
        if not 0 <= self.holdout_fraction < 0.5:
            raise InputError(None, f"--holdout {self.holdout_fraction:g}: expected a share of "
                                   "the particles in [0, 0.5)")
        if self.max_steps < 1 or not self.gaussians_per_voxel > 0:
            raise InputError(None, f"--max-steps {self.max_steps}, --gaussians-per-voxel "
                                   f"{self.gaussians_per_voxel:g}: expected at least 1 step "
                                   "and a positive density")
