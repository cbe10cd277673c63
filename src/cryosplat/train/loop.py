"""The images objective's gold-standard run: two :class:`~cryosplat.train.trainer.HalfSetTrainer`,
one per half-set, stepped together over the prefetched batches by the half-set driver
(:func:`cryosplat.train.halves.step_halves`), which evaluates and checkpoints them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from cryosplat.io.particles import Particles
from cryosplat.train.batches import BatchStream, check_batch_size, total_steps
from cryosplat.train.config import TrainConfig
from cryosplat.train.distributed import rank_and_world
from cryosplat.train.halves import Record, map_evaluator, step_halves
from cryosplat.train.trainer import HalfSetTrainer


class ImagesRun(NamedTuple):
    """What :func:`train_gold_standard` returns: the two trainers, the evaluation history and
    the per-step trace (:class:`~cryosplat.train.halves.Record`)."""

    trainers: list[HalfSetTrainer]
    history: list[dict]
    trace: list[list[float]]



def train_gold_standard(particles: Particles, half_set: np.ndarray, cfg: TrainConfig,
                        device: torch.device, checkpoint_path: str | Path | None = None,
                        resume: dict | None = None, truth: torch.Tensor | None = None,
                        progress: Callable[[int, list[float]], None] | None = None,
                        log: Callable[[str], None] = print, config: dict | None = None,
                        references: tuple[torch.Tensor, torch.Tensor] | None = None,
                        stop_when: Callable[[dict], bool] | None = None,
                        ) -> ImagesRun:
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
    record = None
    if resume is not None:
        for t, s in zip(trainers, resume["halves"]):
            t.load_state_dict(s)
        record = Record(resume["history"], resume["trace"])
        log(f"resumed at step {trainers[0].step} of {total}")
    pix = particles.require_single_pixel_size()
    lead = trainers[0].rank == 0

    def on_step(last: list[dict[str, float]]) -> None:
        if progress is not None:
            progress(2 * cfg.batch_size, [x["loss"] for x in last])

    history, trace = step_halves(
        trainers, cfg.eval_every, cfg.checkpoint_every, map_evaluator(pix, truth, references),
        checkpoint_path, config, BatchStream(trainers, trainers[0].step, total,
                                             cfg.loader_workers),
        on_step, log, record, stop_when, lead)
    return ImagesRun(trainers, history, trace)
