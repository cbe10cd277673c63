"""One run folder: what ``backproject`` and ``reconstruct`` do (``demo`` and ``refine`` build on
it), without a terminal.

A run reads its particles (:class:`ParticleSource`), assigns the half-sets once, makes the
direct-inversion baseline (:func:`run_backprojection`; for a Gaussian run, the half-sets'
validation maps), trains (:func:`run_reconstruction`), evaluates once with
:func:`cryosplat.evaluate.evaluate_maps` and writes every output. Progress is passed in as a
:data:`ProgressFactory`; the command line gives rich bars, a library caller nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from cryosplat.baseline import Baseline, optional_map
from cryosplat.errors import InputError
from cryosplat.evaluate import evaluate_maps
from cryosplat.gaussians import model_images
from cryosplat.io import Particles, assign_half_sets
from cryosplat.io.atomic import atomic_path, write_json
from cryosplat.io.gaussians import write_pdb, write_ply
from cryosplat.io.mrc import write_maps
from cryosplat.mapviews import plot_map_views
from cryosplat.objectives import fit_images, fit_volume
from cryosplat.postprocess.run import postprocess_half_maps
from cryosplat.progress import ProgressFactory, no_progress
from cryosplat.report import plot_montage, plot_training, write_evaluation, write_report
from cryosplat.run_config import RunConfig
from cryosplat.summary import RunSummary
from cryosplat.symmetry import symmetry_or_none
from cryosplat.train import (
    barrier,
    check_batch_size,
    load_checkpoint,
    rank_and_world,
    resolve_device,
)


def load_run(folder: Path) -> tuple[RunConfig, dict]:
    """The configuration and last checkpoint of the reconstruct run in ``folder``."""
    for f in ("config.json", "checkpoint.pt"):
        if not (folder / f).is_file():
            raise InputError(folder / f, "missing: not a cryosplat reconstruct folder, or the run"
                                         " stopped before its first checkpoint")
    d = json.loads((folder / "config.json").read_text())
    if "refine" in d:
        raise InputError(folder / "config.json", "is a refine run's; continue it with cryosplat "
                                                  "refine --resume")
    return RunConfig.from_dict(d), load_checkpoint(folder / "checkpoint.pt")


def prepare_out_dir(out: Path, force: bool) -> Path:
    """Create ``out``; refuse to touch an existing non-empty folder without --force."""
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(out, "exists and is not empty; choose another --out or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    return out


def start_reconstruction(config: RunConfig, out: Path, force: bool = False,
                         new: bool = True, shares_ranks: bool = False, needs_poses: bool = True,
                         check: Callable[[Particles], object] | None = None
                         ) -> tuple[Particles, np.ndarray]:
    """Read and check the particles of ``config`` and assign their half-sets (once for the
    whole run); for a ``new`` run, then make ``out`` (refusing a non-empty one without
    ``force``) and write config.json there. Every check comes before the folder is made.
    ``shares_ranks``: the caller divides the work between torchrun's processes itself (refine);
    ``needs_poses`` False: the caller estimates them (``refine --global``); ``check(p)``: the
    caller's own checks. Returns (the particles, the half-set of each)."""
    p = config.read()
    if needs_poses:
        p.require_poses()
    p.require_ctf()
    p.check_images()
    if check is not None:
        check(p)
    half = assign_half_sets(p, config.train.seed)
    if config.train.objective == "images":
        check_batch_size(p, half, config.train)
    elif rank_and_world()[1] > 1 and not shares_ranks:
        raise InputError(None, "--objective volume fits each half-set in one process; "
                               "--nproc is for --objective images")
    elif min(int((half == h).sum()) for h in (1, 2)) < 2:
        raise InputError(p.source, f"each half-set needs at least 2 particles (one to fit, one "
                                   f"to hold out); they hold {int((half == 1).sum())} and "
                                   f"{int((half == 2).sum())}")
    if new and rank_and_world()[0] == 0:
        prepare_out_dir(out, force)
        if (out / "log.txt").exists():  # --force: a new run's log starts empty, the old is kept
            (out / "log.txt").replace(out / "log.previous.txt")
        write_json(out / "config.json", config.to_dict())
    barrier()
    return p, half


def run_reconstruction(p: Particles, half: np.ndarray, out: Path, config: RunConfig,
                       resume: dict | None = None, baseline: Baseline | None = None,
                       progress: ProgressFactory = no_progress,
                       refinement: dict | None = None) -> RunSummary | None:
    """Train the two half-set mixtures of ``config`` on half-sets ``half`` `(N,)` (1 or 2) and
    write every output into ``out``.

    With ``config.validate`` the half-sets are first reconstructed directly (or ``baseline``,
    made with the same half-sets, is used) to cross-validate the
    Gaussian maps' resolution. ``resume`` is a checkpoint to continue from. Under torchrun
    every rank calls this; rank 0 alone validates, logs and writes, and only it returns the
    :class:`~cryosplat.summary.RunSummary` (the others return None). ``refinement``: refine's
    record, for the summary and the report."""
    cfg = config.train
    dev = resolve_device(config.device)
    rank, world = rank_and_world()
    lead = rank == 0
    pix = p.require_single_pixel_size()
    gt = optional_map(config.truth, p, "ground truth")

    def log(msg: str) -> None:
        if lead:
            with open(out / "log.txt", "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")

    log(f"cryosplat reconstruct: {len(p)} particles, box {p.box_size}, {pix:.4f} Å, device {dev}, "
        f"{world} process(es), config {json.dumps(asdict(cfg))}")
    t_start = time.perf_counter()
    fit = fit_volume if cfg.objective == "volume" else fit_images  # TrainConfig checks
    result = fit(p, half, out, config, dev, gt, resume, baseline, progress, log)
    trainers, history, trace, refs = result.fits, result.history, result.trace, result.references
    if not lead:
        return None
    v1, v2 = trainers[0].volume(), trainers[1].volume()  # voxelised by the last evaluation
    sym = symmetry_or_none(cfg.symmetry)
    whole = [t.model.expanded(None if sym is None else sym.to(dev)) for t in trainers]
    write_maps(out, {"map": (v1 + v2) / 2, "half_map_1": v1, "half_map_2": v2}, pix, "output",
                f"; the mixtures' checkpoint is {out / 'checkpoint.pt'}")
    plot_map_views(out / "map_views.png", ((v1 + v2) / 2).numpy(), pix,
                   whole[0].means_A.detach().cpu().numpy(), "map.mrc")
    for i, (t, model) in enumerate(zip(trainers, whole), 1):  # .ply/.pdb: every copy
        write_ply(out / f"gaussians_half_{i}.ply", model.cpu(), p.box_size, pix)
        write_pdb(out / f"gaussians_half_{i}.pdb", model.cpu(), p.box_size, pix)
        with atomic_path(out / f"gaussians_half_{i}.pt") as tmp:  # the asymmetric unit
            torch.save(t.model.cpu().state_dict(), tmp)
        t.model.to(dev)
    e = evaluate_maps(v1, v2, pix, gt, refs, optional_map(config.mask, p, "mask"))
    write_evaluation(out, e, p.box_size, pix, f"Gaussian mixture, {len(trainers[0].model)} and "
                                                f"{len(trainers[1].model)} Gaussians")
    pp = None
    if config.postprocess:
        pp = postprocess_half_maps(v1, v2, pix, optional_map(config.mask, p, "mask"),
                                   out / "postprocess", "this run's half-maps (Gaussian "
                                   "mixtures)", log,
                                   e.headline().resolution_A if e.cross_validated else None)
    plot_training(out / "loss.png", trace, history)
    idx = np.sort(np.random.default_rng(cfg.seed).choice(len(p), min(8, len(p)), replace=False))
    rotations, ctf = p.require_poses(), p.require_ctf()
    with torch.no_grad():
        renders = [model_images(whole[int(half[i]) - 1].to(dev),
                                rotations[i:i + 1].float().to(dev),
                                p.shifts_A[i:i + 1].float().to(dev), ctf[i:i + 1].to(dev),
                                p.box_size, pix, cfg.n_sigma, cfg.blur_px * pix)[0].cpu()
                   for i in idx]
    plot_montage(out / "montage.png", p.read_images(idx).numpy(), torch.stack(renders).numpy())
    summary = RunSummary(
        len(p), p.box_size, pix, str(dev), world, trainers[0].step, history[-1]["time_s"],
        time.perf_counter() - t_start, e.headline(), e.resolutions_A, history,
        [len(t.model) for t in trainers], cfg.objective, cfg.symmetry,
        stopped=[t.stop_reason for t in trainers] if cfg.objective == "volume" else None,
        backprojection=None if result.baseline is None else result.baseline.summary,
        postprocess=pp, refinement=refinement)
    write_json(out / "summary.json", summary.to_json())
    summary.report = str(write_report(out, summary, config.to_dict()))
    log(f"done: resolution {summary.headline.describe()} (half-maps "
        f"{summary.headline.half_map_resolution_A:.2f} Å at 0.143); report {summary.report}")
    return summary


