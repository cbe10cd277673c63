"""The ``cryosplat`` commands that estimate poses: typer commands only (``abinitio``,
``refine``), registered on :data:`cryosplat.cli_app.app`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cryosplat.abinitio.config import AbinitioConfig
from cryosplat.abinitio.run import AbinitioRunConfig, load_abinitio_run, run_abinitio_folder
from cryosplat.cli_app import app
from cryosplat.errors import InputError
from cryosplat.options import (
    PARTICLES_HELP,
    ForceOpt,
    MaskOpt,
    NprocOpt,
    SymOpt,
    TruthOpt,
    join_processes,
    new_or_resumed,
    particle_options,
)
from cryosplat.refine import (
    RefineConfig,
    RefineRunConfig,
    SearchConfig,
    load_refine_run,
    run_refinement,
)
from cryosplat.refine.global_refine import GlobalConfig
from cryosplat.run_config import ParticleSource, RunConfig
from cryosplat.terminal import print_abinitio, print_reconstruction, progress_bar
from cryosplat.train import TrainConfig

TRAIN, REFINE, SEARCH, ABINITIO = TrainConfig(), RefineConfig(), SearchConfig(), AbinitioConfig()
GLOBAL = GlobalConfig()


@app.command()
@particle_options()
def abinitio(
    particles: Optional[Path] = typer.Argument(None, help=PARTICLES_HELP + " (not with --resume)"),
    source: Optional[ParticleSource] = None, out: Optional[Path] = typer.Option(None, "--out"),
    sym: str = SymOpt,
    final_resolution: float = typer.Option(ABINITIO.final_resolution_A, "--final-resolution",
                                           help="Å: the finest detail the search aligns with"),
    initial_resolution: float = typer.Option(ABINITIO.initial_resolution_A,
                                             "--initial-resolution", help="Å: the first limit"),
    iterations: int = typer.Option(ABINITIO.iterations, "--iterations", help="Minibatches"),
    batch: int = typer.Option(ABINITIO.batch_size, "--batch", help="Particles per minibatch"),
    gaussians: int = typer.Option(ABINITIO.n_gaussians, "--gaussians", help="Random Gaussians"),
    angle_step: float = typer.Option(ABINITIO.angle_step_deg, "--angle-step",
                                     help="Global rotation grid, ° (then local steps halve it)"),
    max_shift: float = typer.Option(ABINITIO.max_shift_A, "--max-shift",
                                    help="Å of origin searched (0: 5% of the box)"),
    diameter: float = typer.Option(ABINITIO.particle_diameter_A, "--particle-diameter",
                                   help="Å: the Gaussians stay inside (0: 70% of the box)"),
    flip_hand: bool = typer.Option(False, "--flip-hand", help="Write the mirror-image map and "
                                   "poses (the hand of an ab initio map is undetermined)"),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto"),
    seed: int = typer.Option(ABINITIO.seed, "--seed", help="Random Gaussians, minibatches"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder"),
    force: bool = ForceOpt,
):
    """Estimate an initial model and every particle's rotation and origin from particles with
    CTF parameters only (poses in the file are ignored): random Gaussians, global searches at
    coarse resolution first. Writes DIR/initial_model.mrc, DIR/particles.star and a report."""
    cfg = AbinitioConfig(iterations=iterations, batch_size=batch,
                         initial_resolution_A=initial_resolution,
                         final_resolution_A=final_resolution, angle_step_deg=angle_step,
                         max_shift_A=max_shift, n_gaussians=gaussians,
                         particle_diameter_A=diameter, symmetry=sym, seed=seed)
    config, state, out = new_or_resumed(source, out, resume, None, None, load_abinitio_run,
                                        lambda fields: AbinitioRunConfig(
        **{k: v for k, v in fields.items() if k not in ("truth", "mask")}, device=device,
        flip_hand=flip_hand, abinitio=cfg))
    s = run_abinitio_folder(config, out, force, state, new=resume is None, progress=progress_bar)
    print_abinitio(s, out)


@app.command()
@particle_options()
def refine(
    particles: Optional[Path] = typer.Argument(None, help=PARTICLES_HELP + " (not with --resume)"),
    source: Optional[ParticleSource] = None, out: Optional[Path] = typer.Option(None, "--out"),
    iterations: int = typer.Option(REFINE.iterations, "--iterations",
                                   help="Rounds of (fit each half-set, search its poses)"),
    max_angle: float = typer.Option(SEARCH.max_angle_deg, "--max-angle", help="Most rotation, °"),
    max_shift: float = typer.Option(SEARCH.max_shift_A, "--max-shift", help="Most origin move, Å"),
    max_defocus: float = typer.Option(SEARCH.max_defocus_A, "--max-defocus",
                                      help="Most change of defocus (U and V together), Å"),
    max_resolution: float = typer.Option(REFINE.max_resolution_A, "--max-resolution", help="Å: "
                                         "align with no finer detail (0: each half-set's own "
                                         "limit, from its held-out particles)"),
    global_search: bool = typer.Option(False, "--global", help="First search every particle "
                                       "over all rotations and origins against --ref (poses in "
                                       "the file are not read), each half-set apart"),
    ref: Optional[Path] = typer.Option(None, "--ref", help="MRC map the --global search starts "
                                       "from (abinitio's initial_model.mrc or your own)"),
    initial_resolution: float = typer.Option(GLOBAL.initial_resolution_A,
                                             "--initial-resolution",
                                             help="Å: --ref is low-passed to this"),
    global_resolution: float = typer.Option(GLOBAL.final_resolution_A, "--global-resolution",
                                            help="Å: the finest the global stage aligns to"),
    global_iterations: int = typer.Option(GLOBAL.iterations, "--global-iterations",
                                          help="Iterations of the global stage: the first "
                                          f"{GLOBAL.global_iterations} over all rotations (up to "
                                          f"{GLOBAL.max_global_iterations} while the poses still "
                                          "move more than the grid's step), local ones after"),
    diameter: float = typer.Option(GLOBAL.particle_diameter_A, "--particle-diameter",
                                   help="Å: the global stage's mask (0: 70% of the box)"),
    device: str = typer.Option(RunConfig.device, "--device", help="cpu, cuda or auto"),
    nproc: int = NprocOpt,
    seed: int = typer.Option(TRAIN.seed, "--seed", help="Seeds and half-set split"),
    truth: Optional[Path] = TruthOpt, mask: Optional[Path] = MaskOpt,
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder"),
    force: bool = ForceOpt,
):
    """Refine each particle's rotation, origin and defocus against its own half-set's Gaussian
    model (local searches, then gradient steps), alternating with the models' fits; writes
    DIR/particles.star with the refined values, and the maps, FSC and report. With --global
    --ref MAP, a global search of every particle comes first (gold standard from MAP
    low-passed to --initial-resolution); --iterations 0 then reconstructs from its poses."""
    if global_search != (ref is not None):
        raise InputError(None, "--global needs --ref MAP (the map it starts from), and --ref "
                               "is only for --global")
    if global_search and nproc > 1:
        raise InputError(None, "--global runs in one process: drop --nproc")
    join_processes(nproc, device)
    search = SearchConfig(max_angle_deg=max_angle, max_shift_A=max_shift, max_defocus_A=max_defocus)
    stage = None if ref is None else GlobalConfig(
        reference=str(ref.resolve()), initial_resolution_A=initial_resolution,
        final_resolution_A=global_resolution, iterations=global_iterations,
        global_iterations=min(GLOBAL.global_iterations, global_iterations),
        particle_diameter_A=diameter)
    if ref is not None and not ref.is_file():
        raise InputError(ref, "not found (--ref)")
    config, state, out = new_or_resumed(source, out, resume, truth, mask, load_refine_run,
                                        lambda fields: RefineRunConfig(
        **fields, device=device, train=TrainConfig(seed=seed),
        refine=RefineConfig(iterations, max_resolution_A=max_resolution, search=search,
                            global_search=stage)))
    s = run_refinement(config, out, force, state, new=resume is None, progress=progress_bar)
    if s is not None:  # rank 0
        print_reconstruction(s)
