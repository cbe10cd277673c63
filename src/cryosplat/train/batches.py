"""Which particles each step trains on, and reading them ahead.

A half-set's batch at step ``s`` is a pure function of (seed, half, epoch) (:func:`batch_indices`),
so a resumed or data-parallel run sees exactly the batches an uninterrupted single process
would. Images are read by a prefetching DataLoader (:class:`BatchStream`) from the stacks
with positioned reads, so memory does not grow with the particle count. Under
torch.distributed each rank takes every ``world``-th particle of each global batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from cryosplat.errors import InputError
from cryosplat.io.particles import Particles
from cryosplat.train.config import TrainConfig
from cryosplat.train.distributed import rank_and_world


class BatchSource(Protocol):
    """What :class:`BatchStream` reads batches for (a
    :class:`~cryosplat.train.trainer.HalfSetTrainer`): the particles, one half-set's indices
    into them, the settings that draw its batches, its half-set and its device."""

    p: Particles
    indices: np.ndarray
    cfg: TrainConfig
    half: int
    device: torch.device


def steps_per_epoch(n_particles: int, batch_size: int) -> int:
    """Full batches in one pass over a half-set of ``n_particles`` (at least 1)."""
    return max(1, n_particles // batch_size)


def batch_indices(indices: np.ndarray, batch_size: int, seed: int, half: int,
                  step: int) -> np.ndarray:
    """The particles of a half-set's global batch ``step``: a permutation per epoch drawn from
    ``(seed, half, epoch)``, so a resumed or parallel run sees exactly the same batches."""
    epoch, j = divmod(step, steps_per_epoch(len(indices), batch_size))
    perm = np.random.default_rng([seed, half, epoch]).permutation(len(indices))
    return indices[np.sort(perm[j * batch_size:(j + 1) * batch_size])]


def check_batch_size(particles: Particles, half_set: np.ndarray, cfg: TrainConfig) -> None:
    """Each half-set must hold a batch, and a batch one particle per rank."""
    sizes = [int((half_set == h).sum()) for h in (1, 2)]
    if min(sizes) < cfg.batch_size:
        raise InputError(particles.source, f"each half-set needs at least --batch "
                                           f"{cfg.batch_size} particles; they hold {sizes[0]} "
                                           f"and {sizes[1]}")
    world = rank_and_world()[1]
    if cfg.batch_size < world:
        raise InputError(None, f"--batch {cfg.batch_size} is smaller than the {world} processes: "
                               "each needs at least one particle of every batch")


def total_steps(half_set: np.ndarray, cfg: TrainConfig) -> int:
    """Steps of a run: ``epochs`` passes over the larger half-set (both halves step together)."""
    spe = max(steps_per_epoch(int((half_set == h).sum()), cfg.batch_size) for h in (1, 2))
    return max(1, int(round(cfg.epochs * spe)))


class _StepImages(torch.utils.data.Dataset):
    """Item ``i``: this rank's images of each trainer's batch ``first_step + i``."""

    def __init__(self, trainers: Sequence[BatchSource], first_step: int, last_step: int):
        self.p = trainers[0].p
        self.selectors = [(t.indices, t.cfg.batch_size, t.cfg.seed, t.half) for t in trainers]
        self.first, self.last = first_step, last_step
        self.rank, self.world = rank_and_world()

    def __len__(self) -> int:
        return self.last - self.first

    def __getitem__(self, i: int) -> list[torch.Tensor] | InputError:
        step = self.first + i
        try:
            return [self.p.read_images(batch_indices(*sel, step)[self.rank::self.world])
                    for sel in self.selectors]
        except InputError as e:  # handed to the training loop as it is (see BatchStream)
            return e


class BatchStream:
    """Iterate over the images of steps ``[first_step, last_step)`` for each trainer, read
    ahead by ``workers`` DataLoader processes (0: read in this process, on demand).

    A bad image (NaN pixels, a truncated stack) raises the reader's own InputError here, not
    the DataLoader's wrapped RuntimeError with a worker's traceback."""

    def __init__(self, trainers: Sequence[BatchSource], first_step: int, last_step: int,
                 workers: int = 1, prefetch: int = 2):
        ds = _StepImages(trainers, first_step, last_step)
        kw: dict[str, Any] = dict(num_workers=workers, prefetch_factor=prefetch,
                                  persistent_workers=False) if workers > 0 else {}
        self.loader = torch.utils.data.DataLoader(
            ds, batch_size=None, shuffle=False,
            pin_memory=trainers[0].device.type == "cuda", **kw)

    def __iter__(self):
        for item in self.loader:
            if isinstance(item, InputError):
                raise item
            yield item
