"""The ``cryosplat`` command line: typer commands only. Each reads its input, calls
:mod:`cryosplat.run` or another module, and shows the result through :mod:`cryosplat.terminal`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch
import typer

from cryosplat import (
    cli_poses,  # noqa: F401  (registers refine and abinitio)
    diagnostics,
)
from cryosplat.baseline import run_backprojection
from cryosplat.cli_app import app
from cryosplat.demo import run_demo
from cryosplat.errors import InputError
from cryosplat.evaluate import fsc_curves, resolutions
from cryosplat.fourier import shell_frequencies
from cryosplat.io import assign_half_sets, read_volume, write_particles
from cryosplat.io.atomic import write_json
from cryosplat.io.mrc import read_map_like
from cryosplat.options import (
    PARTICLES_HELP,
    ForceOpt,
    MaskOpt,
    NprocOpt,
    SymOpt,
    TruthOpt,
    join_processes,
    new_or_resumed,
    numbers,
    particle_options,
)
from cryosplat.postprocess.run import postprocess_files, write_postprocess
from cryosplat.report import write_fsc
from cryosplat.run import load_run, prepare_out_dir, run_reconstruction, start_reconstruction
from cryosplat.run_config import ParticleSource, RunConfig
from cryosplat.simulate import SimulationConfig, simulate_dataset
from cryosplat.simulate_effects import Effects
from cryosplat.symmetry import symmetry_matrices
from cryosplat.terminal import (
    console,
    print_checks,
    print_demo,
    print_info,
    print_postprocess,
    print_reconstruction,
    print_resolutions,
    progress_bar,
    run_app,
)
from cryosplat.train import TrainConfig

TRAIN = TrainConfig()  # the options' defaults
EFFECTS = Effects()


@app.command()
@particle_options(subset=False)
def info(particles: Path = typer.Argument(..., help=PARTICLES_HELP),
         source: ParticleSource = None,  # type: ignore[assignment]  # particle_options
         as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables"),
         check_images: bool = typer.Option(False, "--check-images",
                                           help="Also check every stack's header and index")):
    """Summarise a particle file without reading its images."""
    p = source.read(one_pixel_size=False)  # as the file has it; the summary gives the target
    if check_images:
        p.check_images()
    summary = diagnostics.summarise(p)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        print_info(particles, summary)


@app.command()
@particle_options(subset=False)
def validate(particles: Path = typer.Argument(..., help=PARTICLES_HELP),
             source: ParticleSource = None,  # type: ignore[assignment]  # particle_options
             as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table")):
    """Check everything a reconstruction needs (stacks, headers, poses, CTF ranges, pose
    coverage, half-sets), without training. Exit 0 when nothing fails, 1 otherwise."""
    p = source.read()
    checks = diagnostics.validation_checks(p)
    failed = any(c["status"] == "fail" for c in checks)
    if as_json:
        print(json.dumps({"file": str(particles), "particles": len(p), "ok": not failed,
                          "checks": checks}, indent=2))
    else:
        print_checks(particles, len(p), checks, failed)
    if failed:
        raise typer.Exit(1)


@app.command()
@particle_options()
def downsample(particles: Path = typer.Argument(..., help=PARTICLES_HELP),
               source: ParticleSource = None,  # type: ignore[assignment]  # particle_options
               out: Path = typer.Option(..., "--out", help="Output folder: particles.star + "
                                                           "particles.mrcs"),
               force: bool = ForceOpt):
    """Fourier-crop and/or subset particles into a RELION 3.1 STAR + MRCS."""
    p = source.read()
    p.require_single_pixel_size()
    p.check_images()
    prepare_out_dir(out, force)
    with progress_bar("writing particles", len(p)) as advance:
        star = write_particles(out, p, progress=advance)
    console.print(f"wrote {len(p)} particles, box {p.box_size}, pixel "
                  f"{float(p.pixel_size_A[0]):.4f} Å: {star}")


@app.command()
def simulate(
    structure: Optional[Path] = typer.Argument(None, help="PDB/mmCIF model or MRC map "
                                                           "(default: the built-in 4AKE model)"),
    out: Path = typer.Option(..., "--out", help="Output folder"),
    particles: int = typer.Option(2000, "--particles", help="Number of particles"),
    box: int = typer.Option(64, "--box", help="Box size in pixels"),
    pixel_size: float = typer.Option(1.5, "--pixel-size", help="Pixel size in Å"),
    snr: float = typer.Option(0.1, "--snr", help="Signal variance / noise variance"),
    defocus_min: float = typer.Option(1.0, "--defocus-min", help="µm"),
    defocus_max: float = typer.Option(3.0, "--defocus-max", help="µm"),
    astigmatism: float = typer.Option(0.05, "--astigmatism", help="Max (dfU - dfV)/2, µm"),
    max_shift: float = typer.Option(3.0, "--max-shift", help="Max |origin| per axis, Å"),
    voltage: float = typer.Option(300.0, "--voltage", help="kV"),
    cs: float = typer.Option(2.7, "--cs", help="Spherical aberration, mm"),
    amplitude_contrast: float = typer.Option(0.1, "--amplitude-contrast"),
    bfactor: float = typer.Option(0.0, "--bfactor", help="Extra B-factor on the atoms, Å²"),
    seed: int = typer.Option(0, "--seed"),
    beam_tilt: str = typer.Option("0,0", "--beam-tilt", help="Beam tilt x,y in mrad "
                                  "(rlnBeamTiltX/Y)"),
    odd_zernike: str = typer.Option("", "--odd-zernike", help="Odd Zernike coefficients in "
                                    "radians, RELION's order (rlnOddZernike), comma-separated"),
    even_zernike: str = typer.Option("", "--even-zernike", help="Even Zernike coefficients in "
                                     "radians, RELION's order (rlnEvenZernike)"),
    mag_matrix: str = typer.Option("1,0,0,1", "--mag-matrix", help="Anisotropic magnification "
                                   "M00,M01,M10,M11 (rlnMagMat)"),
    premultiplied: bool = typer.Option(False, "--premultiplied", help="Multiply the images "
                                       "once more by their CTF (rlnCtfDataAreCtfPremultiplied)"),
    mtf_nyquist: float = typer.Option(EFFECTS.mtf_nyquist, "--mtf-nyquist", help="Detector MTF "
                                      "at Nyquist, on signal and shot noise (1: none)"),
    background_fraction: float = typer.Option(EFFECTS.background_fraction,
                                              "--background-fraction", help="Share of the noise "
                                              "variance that is low-frequency background"),
    background_falloff: float = typer.Option(EFFECTS.background_A, "--background-falloff",
                                             help="Å: the background's Gaussian falloff"),
    contrast_sigma: float = typer.Option(EFFECTS.contrast_sigma, "--contrast-sigma",
                                         help="Lognormal sigma of each particle's contrast"),
    offset_sigma: float = typer.Option(EFFECTS.offset_sigma, "--offset-sigma", help="Each "
                                       "image's constant offset, in noise sigmas (std)"),
    junk_fraction: float = typer.Option(EFFECTS.junk_fraction, "--junk-fraction", help="Share "
                                        "of particles that are noise or a wrong object"),
    angle_error: float = typer.Option(EFFECTS.angle_error_deg, "--angle-error", help="°: the "
                                      "STAR's pose errors, |N(0, s)| about a random axis"),
    shift_error: float = typer.Option(EFFECTS.shift_error_A, "--shift-error",
                                      help="Å: the STAR's origin errors, N(0, s) per axis"),
    defocus_error: float = typer.Option(EFFECTS.defocus_error_A, "--defocus-error",
                                        help="Å: the STAR's defocus errors, N(0, s)"),
    force: bool = ForceOpt,
):
    """Simulate particles (RELION 3.1 STAR + MRCS) and the ground-truth map, optionally with
    RELION's higher-order optics (written to the STAR's optics table) and the effects of real
    data (docs/simulate.md; the exact values then go to particles_true.star)."""
    cfg = SimulationConfig(particles, box, pixel_size, snr, defocus_min, defocus_max, astigmatism,
                           max_shift, voltage, cs, amplitude_contrast, bfactor, seed,
                           beam_tilt_mrad=numbers("--beam-tilt", beam_tilt),
                           odd_zernike=numbers("--odd-zernike", odd_zernike),
                           even_zernike=numbers("--even-zernike", even_zernike),
                           mag_matrix=numbers("--mag-matrix", mag_matrix),
                           premultiplied=premultiplied)
    effects = Effects(mtf_nyquist, background_fraction, background_falloff, contrast_sigma,
                      offset_sigma, junk_fraction, angle_error, shift_error, defocus_error)
    cfg.check()
    effects.check()
    prepare_out_dir(out, force)
    with progress_bar("simulating", particles) as advance:
        result = simulate_dataset(structure, out, cfg, progress=advance, effects=effects)
    write_json(out / "simulation.json", {**vars(cfg), **result,
                                         **({"effects": effects.to_dict()}
                                            if effects.active else {})})
    console.print(f"wrote {particles} particles: {result['particles']}")
    console.print(f"ground truth: {result['ground_truth']}")
    if "true_particles" in result:
        console.print(f"exact poses, defoci, contrasts and junk: {result['true_particles']}")


@app.command()
@particle_options()
def backproject(particles: Path = typer.Argument(..., help=PARTICLES_HELP),
                source: ParticleSource = None,  # type: ignore[assignment]  # particle_options
                out: Path = typer.Option(..., "--out", help="Output folder"),
                truth: Optional[Path] = TruthOpt, mask: Optional[Path] = MaskOpt,
                seed: int = typer.Option(0, "--seed", help="Seed of the half-set split, if the "
                                                           "file has none"),
                sym: str = SymOpt, force: bool = ForceOpt):
    """Direct Fourier inversion with known poses and CTF: map, half-maps, FSC."""
    symmetry_matrices(sym)  # refuses an unknown group before anything is read
    p = source.read()
    p.require_poses()
    p.require_ctf()
    p.check_images()
    prepare_out_dir(out, force)
    s, _ = run_backprojection(p, out, assign_half_sets(p, seed), truth, mask, progress_bar,
                              symmetry=sym.upper())
    print_resolutions(s.resolutions_A)
    console.print(f"outputs in {out}: map.mrc, half_map_1.mrc, half_map_2.mrc, fsc.csv, fsc.png, "
                  "map_views.png; report: report.html")


@app.command()
def fsc(
    map_a: Path = typer.Argument(..., help="First map (.mrc)"),
    map_b: Optional[Path] = typer.Argument(None, help="Second map (.mrc)"),
    truth: Optional[Path] = typer.Option(None, "--truth", help="Compare MAP_A with a known map"),
    mask: Optional[Path] = MaskOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Also write fsc.csv and fsc.png here"),
    as_json: bool = typer.Option(False, "--json", help="Print curves and resolutions as JSON"),
):
    """FSC of two maps (or a map and --truth): unmasked, spherical mask, soft auto-mask (or
    --mask), phase-randomisation corrected; resolution at 0.143 and 0.5."""
    other = truth if truth is not None else map_b
    if other is None or (truth is not None and map_b is not None):
        raise InputError(None, "give two maps, or one map and --truth")
    a, pa = read_volume(map_a)
    d = a.shape[0]
    m = None if mask is None else read_map_like(mask, d, pa, "mask")
    curves = fsc_curves(torch.from_numpy(a), read_map_like(other, d, pa, "map"), pa, m)
    res = resolutions(curves, d, pa)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_fsc(out / "fsc.csv", out / "fsc.png", curves, d, pa, f"{map_a.name} vs {other.name}")
    if as_json:
        print(json.dumps({"resolution_A": res, "frequency_per_A": shell_frequencies(d, pa).tolist(),
                          "fsc": {k: c.tolist() for k, c in curves.items()}}, indent=2))
    else:
        print_resolutions(res)


@app.command()
def postprocess(
    half_map_1: Path = typer.Argument(..., help="Half-map 1 (.mrc)"),
    half_map_2: Path = typer.Argument(..., help="Half-map 2 (.mrc)"),
    out: Path = typer.Option(..., "--out", help="Output folder"), mask: Optional[Path] = MaskOpt,
    bfactor: Optional[float] = typer.Option(None, "--bfactor", help="B-factor to apply, Å² "
                                            "(negative sharpens); default: fitted (--auto-bfac)"),
    auto_bfac: bool = typer.Option(False, "--auto-bfac", help="Fit the B-factor (the default)"),
    autob_lowres: float = typer.Option(10.0, "--autob-lowres", help="Å: where the fit starts"),
    force: bool = ForceOpt,
):
    """Sharpen two half-maps as relion_postprocess does: masked, phase-randomisation corrected
    FSC; FSC weighting; B-factor from the Guinier plot; low-pass at the resolution."""
    if auto_bfac and bfactor is not None:
        raise InputError(None, "give --bfactor B or --auto-bfac, not both")
    result, pix = postprocess_files(half_map_1, half_map_2, mask, bfactor, autob_lowres)
    prepare_out_dir(out, force)
    print_postprocess(write_postprocess(out, result, pix, f"{half_map_1} and {half_map_2}"))
    console.print(f"report: {out / 'report.html'}")


@app.command()
@particle_options()
def reconstruct(
    particles: Optional[Path] = typer.Argument(None, help=PARTICLES_HELP + " (not with --resume)"),
    source: Optional[ParticleSource] = None,
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder"),
    objective: str = typer.Option(TRAIN.objective, "--objective", help="volume: fit each "
                                  "half-set's accumulated Fourier sums, all its particles at "
                                  "once; images: mini-batches of rendered particles"),
    init: str = typer.Option(TRAIN.init, "--init", help="map: Gaussians start inside each "
                             "half-set's own direct map, as many as its support holds; random: "
                             "--gaussians in a ball"),
    per_voxel: float = typer.Option(TRAIN.gaussians_per_voxel, "--gaussians-per-voxel",
                                    help="With --init map: Gaussians per voxel of support"),
    max_steps: int = typer.Option(TRAIN.max_steps, "--max-steps", help="--objective volume: "
                                  "most Adam steps (it stops earlier on the held-out loss)"),
    holdout: float = typer.Option(TRAIN.holdout_fraction, "--holdout", help="--objective "
                                  "volume: share of each half-set's own particles held out to "
                                  "decide when to stop (0: stop on the training loss)"),
    gaussians: int = typer.Option(TRAIN.n_gaussians, "--gaussians",
                                  help="Gaussians per half-set with --init random"),
    epochs: float = typer.Option(TRAIN.epochs, "--epochs",
                                 help="--objective images: passes over each half-set"),
    batch: int = typer.Option(TRAIN.batch_size, "--batch",
                              help="--objective images: particles per step and half-set"),
    lr: float = typer.Option(TRAIN.lr_means_px, "--lr-means",
                             help="--objective images: Adam step of the means, px"),
    densify: bool = typer.Option(TRAIN.densify, "--densify/--no-densify", help="Split Gaussians "
                                 "with large gradients and prune vanishing ones (adaptive count)"),
    max_gaussians: int = typer.Option(TRAIN.max_gaussians, "--max-gaussians",
                                      help="Cap with --densify (0: 4 x --gaussians)"),
    loss: str = typer.Option(TRAIN.loss, "--loss", help="real: real-space MSE (the paper's); "
                                                        "fourier: residual whitened per shell"),
    particle_diameter: float = typer.Option(2 * TRAIN.support_radius_A, "--particle-diameter",
                                            help="Å, as in RELION: Gaussians whose centre leaves "
                                            "this sphere are replaced by splits of the ones "
                                            "inside (0: no limit)"),
    device: str = typer.Option(RunConfig.device, "--device", help="cpu, cuda or auto"),
    seed: int = typer.Option(TRAIN.seed, "--seed", help="Initialisation, batch order and half-set "
                                                        "split"),
    checkpoint_every: int = typer.Option(TRAIN.checkpoint_every, "--checkpoint-every",
                                         help="Steps between checkpoints"),
    nproc: int = NprocOpt,
    workers: int = typer.Option(TRAIN.loader_workers, "--workers", help="DataLoader processes "
                                "reading particles ahead of training (0: read on demand)"),
    validate: bool = typer.Option(RunConfig.validate, "--validate/--no-validate", help="Also "
                                  "reconstruct each half-set directly, to cross-validate the "
                                  "resolution (about as long as a few epochs on a CPU)"),
    sym: str = SymOpt,
    post: bool = typer.Option(RunConfig.postprocess, "--postprocess/--no-postprocess",
                              help="Sharpen the half-maps into DIR/postprocess (as RELION)"),
    truth: Optional[Path] = TruthOpt, mask: Optional[Path] = MaskOpt,
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder"),
    force: bool = ForceOpt,
):
    """Gold-standard Gaussian-mixture reconstruction: each half-set's mixture starts inside
    its own direct map (or at random) and is fitted to its own particles only."""
    join_processes(nproc, device)
    config, state, out = new_or_resumed(source, out, resume, truth, mask, load_run,
                                        lambda fields: RunConfig(
        **fields, device=device, validate=validate, postprocess=post, train=TrainConfig(
            objective=objective, init=init, gaussians_per_voxel=per_voxel, max_steps=max_steps,
            holdout_fraction=holdout, n_gaussians=gaussians, batch_size=batch, epochs=epochs,
            lr_means_px=lr, loss=loss, densify=densify, max_gaussians=max_gaussians,
            support_radius_A=particle_diameter / 2, checkpoint_every=checkpoint_every,
            seed=seed, loader_workers=workers, symmetry=sym.upper())))
    p, half = start_reconstruction(config, out, force, new=state is None)
    s = run_reconstruction(p, half, out, config, state, progress=progress_bar)
    if s is not None:  # rank 0
        print_reconstruction(s)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Output folder"),
    particles: int = typer.Option(2000, "--particles"),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto"),
    force: bool = typer.Option(False, "--force", help="Replace the outputs of an earlier demo"),
):
    """Simulate a small dataset from the built-in model, reconstruct it with Gaussians and with
    the direct-Fourier-inversion baseline, and compare both with the ground truth."""
    t0 = time.perf_counter()
    prepare_out_dir(out, force)
    s, bp, sim = run_demo(out, particles, device, progress_bar, console.print)
    print_demo(s, bp, out, 2 * sim.pixel_size_A, time.perf_counter() - t0)


def main() -> None:
    """Entry point: :func:`cryosplat.terminal.run_app` (one line and an exit status for bad
    input, a failed stage or an OS error, never a traceback)."""
    run_app(app)
