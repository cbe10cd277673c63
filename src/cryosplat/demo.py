"""``cryosplat demo`` (``make demo``): simulate a small dataset from the structure the package
ships, reconstruct it directly and with Gaussian mixtures, both against the ground truth."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cryosplat.baseline import Baseline, run_backprojection
from cryosplat.io import assign_half_sets, read_particles
from cryosplat.io.atomic import write_json
from cryosplat.progress import ProgressFactory, no_progress
from cryosplat.run import run_reconstruction
from cryosplat.run_config import RunConfig
from cryosplat.simulate import SimulationConfig, simulate_dataset
from cryosplat.summary import BackprojectionSummary, RunSummary


def run_demo(out: Path, n_particles: int, device: str,
             progress: ProgressFactory = no_progress,
             say: Callable[[str], None] = print
             ) -> tuple[RunSummary, BackprojectionSummary, SimulationConfig]:
    """Simulate ``n_particles`` of the built-in 4AKE model into out/data, reconstruct them
    directly (out/backprojection) and with Gaussian mixtures at the default settings
    (out/reconstruction), both against the ground truth. Returns (the Gaussian run's summary,
    the baseline's, the simulation's settings). ``out`` must exist and be empty."""
    cfg = SimulationConfig(n_particles=n_particles)
    say(f"[bold]1. simulate[/bold] {n_particles} particles of the built-in 4AKE model: box "
        f"{cfg.box_size}, {cfg.pixel_size_A} Å/px, SNR {cfg.snr}, defocus "
        f"{cfg.defocus_min_um}-{cfg.defocus_max_um} µm")
    data = out / "data"
    data.mkdir(exist_ok=True)
    with progress("simulating", n_particles, 0) as advance:
        sim = simulate_dataset(None, data, cfg, progress=advance)
    p = read_particles(sim["particles"])
    say("[bold]2. baseline[/bold]: direct Fourier inversion with the same half-sets")
    config = RunConfig(sim["particles"], truth=sim["ground_truth"], device=device)
    half = assign_half_sets(p, config.train.seed)
    bp, bp_result = run_backprojection(p, out / "backprojection", half, config.truth,
                                       progress=progress)
    say("[bold]3. reconstruct[/bold]: Gaussians seeded inside each half-set's own direct map, "
        "fitted to that half-set's particles until its held-out particles stop improving")
    rec = out / "reconstruction"
    rec.mkdir(exist_ok=True)
    write_json(rec / "config.json", config.to_dict())
    s = run_reconstruction(p, half, rec, config, progress=progress,
                           baseline=Baseline(bp, (bp_result.half_map_1, bp_result.half_map_2)))
    if s is None:
        raise RuntimeError("the demo runs in one process; this one is not rank 0")
    return s, bp, cfg
