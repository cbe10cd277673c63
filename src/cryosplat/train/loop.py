"""The gold-standard run: two :class:`~cryosplat.train.trainer.HalfSetTrainer`, one per
half-set, stepped together over the prefetched batches, evaluated and checkpointed."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cryosplat.evaluate import evaluate_maps
from cryosplat.io.atomic import atomic_path
from cryosplat.io.particles import Particles
from cryosplat.train.batches import BatchStream, check_batch_size, total_steps
from cryosplat.train.config import TrainConfig
from cryosplat.train.distributed import rank_and_world
from cryosplat.train.trainer import HalfSetTrainer


def save_checkpoint(path: str | Path, trainers: list[HalfSetTrainer], history: list[dict],
                    trace: list[list[float]], config: dict) -> None:
    """Both trainers' states, the history and trace so far, and the run's config, atomically."""
    state = {"config": config, "history": history, "trace": trace,
             "halves": [t.state_dict() for t in trainers]}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by :func:`train_gold_standard` (weights-only loading)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def train_gold_standard(particles: Particles, half_set: np.ndarray, cfg: TrainConfig,
                        device: torch.device, checkpoint_path: str | Path | None = None,
                        resume: dict | None = None, truth: torch.Tensor | None = None,
                        progress: Callable[[int, list[float]], None] | None = None,
                        log: Callable[[str], None] = print, config: dict | None = None,
                        references: tuple[torch.Tensor, torch.Tensor] | None = None,
                        stop_when: Callable[[dict], bool] | None = None,
                        ) -> tuple[list[HalfSetTrainer], list[dict], list[list[float]]]:
    """Fit independent mixtures to half-sets 1 and 2 (they never see each other's particles).

    Images are read ahead by a :class:`BatchStream`. Under torch.distributed every rank calls
    this with the same arguments; only rank 0 evaluates, reports progress and writes
    checkpoints. Every ``cfg.eval_every`` steps, and at the last, both halves are voxelised and
    evaluated by :func:`cryosplat.evaluate.evaluate_maps` (half-map FSC; with ``truth`` the map
    against it; with ``references``, the half-sets' own direct maps, the cross-validated
    estimate) into a history row; every ``cfg.checkpoint_every`` steps both trainers are
    checkpointed atomically. ``progress(images, losses)`` follows each step. Returns the
    trainers, the evaluation history and the trace of ``[step, loss_1, loss_2]`` per step.

    ``stop_when``, a function of a history row, ends the run after the first evaluation for
    which it is true (benchmarks: stop once the baseline is reached). Single process only,
    since only rank 0 evaluates.
    """
    check_batch_size(particles, half_set, cfg)
    if stop_when is not None and rank_and_world()[1] > 1:
        raise ValueError("stop_when needs a single process: only rank 0 evaluates")
    halves = [np.nonzero(half_set == h)[0] for h in (1, 2)]
    total = total_steps(half_set, cfg)
    trainers = [HalfSetTrainer(particles, idx, cfg, h + 1, total, device)
                for h, idx in enumerate(halves)]
    history: list[dict] = []
    trace: list[list[float]] = []
    elapsed0 = 0.0
    if resume is not None:
        for t, s in zip(trainers, resume["halves"]):
            t.load_state_dict(s)
        history, trace = list(resume["history"]), [list(r) for r in resume["trace"]]
        elapsed0 = history[-1]["time_s"] if history else 0.0
        log(f"resumed at step {trainers[0].step} of {total}")
    t0 = time.perf_counter() - elapsed0
    pix = particles.require_single_pixel_size()

    def evaluate(losses: list[float]) -> None:
        e = evaluate_maps(trainers[0].volume(), trainers[1].volume(), pix, truth, references,
                          masked=False)
        row = {"step": trainers[0].step, "time_s": time.perf_counter() - t0,
               "loss_1": losses[0], "loss_2": losses[1], **e.headline()}
        history.append(row)
        log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))

    lead = trainers[0].rank == 0
    losses = [float("nan")] * 2
    for images in BatchStream(trainers, trainers[0].step, total, cfg.loader_workers):
        losses = [t.train_step(x) for t, x in zip(trainers, images)]
        step = trainers[0].step
        trace.append([step, *losses])
        if not lead:
            continue
        if progress is not None:
            progress(2 * cfg.batch_size, losses)
        stop = False
        if step % cfg.eval_every == 0 or step == total:
            evaluate(losses)
            stop = stop_when is not None and bool(stop_when(history[-1]))
        if checkpoint_path is not None and (step % cfg.checkpoint_every == 0 or step == total
                                            or stop):
            save_checkpoint(checkpoint_path, trainers, history, trace, config or {})
        if stop:
            log(f"stopped at step {step} of {total}: the stopping condition holds")
            break
    if lead and (not history or history[-1]["step"] != trainers[0].step):
        evaluate(losses)
    return trainers, history, trace
