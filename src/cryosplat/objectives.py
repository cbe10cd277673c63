"""The two objectives' fitting stage of a ``reconstruct`` run, each returning a
:class:`Reconstruction`: ``images`` (:func:`fit_images`, mini-batches of rendered particles)
and ``volume`` (:func:`fit_volume`, the accumulated Fourier sums). Both make or read the
half-sets' validation maps (:mod:`cryosplat.baseline`) and log why they stopped
(:func:`cryosplat.errors.stage`); :func:`cryosplat.run.run_reconstruction` writes the outputs."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryosplat.backproject import insert_particles
from cryosplat.baseline import Baseline, validation_references
from cryosplat.errors import stage
from cryosplat.fourier_slice import Insertion
from cryosplat.io import Particles
from cryosplat.progress import ProgressFactory, no_progress
from cryosplat.run_config import RunConfig
from cryosplat.symmetry import symmetry_or_none
from cryosplat.train import barrier, rank_and_world, total_steps, train_gold_standard
from cryosplat.train.halves import HalfSetFit, Record
from cryosplat.train.volume import fit_gold_standard_volume, make_fits, split_held_out


@dataclass
class Reconstruction:
    """What either objective's fitting gives :func:`cryosplat.run.run_reconstruction`: the two
    half-set fits (:class:`~cryosplat.train.halves.HalfSetFit`, voxelised at their last
    evaluation), their evaluation history and per-step trace, the half-sets' direct maps of
    the cross-validated FSC (None with ``--no-validate`` and on ranks other than 0) and the
    baseline (made here, or given)."""

    fits: list[HalfSetFit]
    history: list[dict]
    trace: list[list[float]]
    references: tuple[torch.Tensor, torch.Tensor] | None
    baseline: Baseline | None


def _all_of(fitted: Insertion, held_out: Insertion | None) -> Insertion:
    """A half-set's whole insertion: its fitted and held-out particles' sums (new tensors)."""
    if held_out is None:
        return Insertion(fitted.numerator + 0, fitted.denominator + 0, fitted.box_size,
                         fitted.padded_size)
    return Insertion(fitted.numerator + held_out.numerator,
                     fitted.denominator + held_out.denominator, fitted.box_size,
                     fitted.padded_size)


def _resume_hint(out: Path) -> str:
    return f"the last checkpoint is {out / 'checkpoint.pt'} (continue with --resume {out})"


def fit_images(p: Particles, half: np.ndarray, out: Path, config: RunConfig, dev: torch.device,
               truth: torch.Tensor | None, resume: dict | None, baseline: Baseline | None,
               progress: ProgressFactory, log: Callable[[str], None]) -> Reconstruction:
    """``objective="images"``: mini-batches of rendered particles
    (:func:`cryosplat.train.train_gold_standard`), validated against the half-sets' direct
    maps (``baseline``, or made now into ``out/backprojection``); checkpoints in
    ``out/checkpoint.pt``, ``resume`` continuing from one. ``truth``: the ground truth on the
    particles' grid, for the history; ``log``: the run's log."""
    cfg = config.train
    lead = rank_and_world()[0] == 0
    refs = None
    if config.validate and lead:
        baseline = baseline or validation_references(p, out, half, config.truth, config.mask,
                                                     progress)
        refs = baseline.half_maps
        log(f"validation maps (direct inversion of each half-set): half-maps "
            f"{baseline.summary.headline.half_map_resolution_A:.2f} Å")
    barrier()
    done0 = 0 if resume is None else 2 * cfg.batch_size * int(resume["halves"][0]["step"])
    bar = progress if lead else no_progress
    with bar("training", 2 * cfg.batch_size * total_steps(half, cfg), done0) as advance:
        t0, count = time.perf_counter(), [0]

        def on_step(n: int, losses: list[float]) -> None:
            count[0] += n
            rate = count[0] / max(time.perf_counter() - t0, 1e-9)
            advance(n, f"{rate:.0f} particles/s, loss {losses[0]:.4g} / {losses[1]:.4g}")

        with stage("during training", log, _resume_hint(out)):
            run = train_gold_standard(
                p, half, cfg, dev, checkpoint_path=out / "checkpoint.pt", resume=resume,
                truth=truth, progress=on_step, log=log, config=config.to_dict(), references=refs)
    return Reconstruction(list(run.trainers), run.history, run.trace, refs, baseline)


def fit_volume(p: Particles, half: np.ndarray, out: Path, config: RunConfig, dev: torch.device,
               truth: torch.Tensor | None, resume: dict | None, baseline: Baseline | None,
               progress: ProgressFactory, log: Callable[[str], None]) -> Reconstruction:
    """``objective="volume"``: each half-set's mixture fitted to its accumulated Fourier sums
    (:mod:`cryosplat.train.volume`), seeded inside its own direct map
    (:mod:`cryosplat.train.seeding`) or at random, and stopped on its own held-out particles
    (:func:`cryosplat.train.volume.fit_gold_standard_volume`). The insertions also give the
    validation maps (unless ``baseline`` is given). Arguments as for :func:`fit_images`."""
    cfg = config.train
    pix = p.require_single_pixel_size()
    sym = symmetry_or_none(cfg.symmetry, dev)
    sets = [split_held_out(np.nonzero(half == h)[0], cfg.holdout_fraction, cfg.seed, h)
            for h in (1, 2)]
    ins: list[tuple[Insertion, Insertion | None]] = []
    with progress("inserting each half-set's particles", len(p), 0) as advance, \
            stage("while inserting the particles", log):
        for train, held in sets:
            ins.append((insert_particles(p, train, device=dev, progress=advance, symmetry=sym),
                        insert_particles(p, held, device=dev, progress=advance, symmetry=sym)
                        if len(held) else None))
    fits = make_fits(ins, cfg, pix, dev, resume, out, log)
    for h, (train, held) in enumerate(sets, 1):
        log(f"half-set {h}: {len(train)} particles fitted, {len(held)} held out")
    refs = None
    if config.validate:
        if baseline is None:
            full = None
            if not (out / "backprojection" / "summary.json").is_file():  # else read back
                full = (_all_of(*ins[0]), _all_of(*ins[1]))
            baseline = validation_references(p, out, half, config.truth, config.mask,
                                             progress, insertions=full, symmetry=cfg.symmetry)
        refs = baseline.half_maps
        log(f"validation maps (direct inversion of each half-set): half-maps "
            f"{baseline.summary.headline.half_map_resolution_A:.2f} Å")
    del ins
    record = None
    if resume is not None:
        record = Record(resume["history"], resume["trace"])
        log(f"resumed at step {fits[0].step}")
    with progress("fitting (stops on held-out loss)", cfg.max_steps, fits[0].step) as advance:
        def on_step(n: int, held: list[float]) -> None:
            advance(n, f"held-out loss {held[0]:.5g} / {held[1]:.5g}")

        with stage("during fitting", log, _resume_hint(out)):
            history, trace = fit_gold_standard_volume(
                fits, cfg, truth, refs, out / "checkpoint.pt", record, on_step, log,
                config.to_dict())
    return Reconstruction(list(fits), history, trace, refs, baseline)
