"""Checkpoints: a run's state written atomically and read back without unpickling code.

Every checkpoint is a ``torch.save`` of tensors, numbers, strings, lists and dicts, written
under a temporary name and renamed (:func:`cryosplat.io.atomic.atomic_path`), so a stopped
run leaves the last complete one; it is read with ``weights_only=True``. The two-half runs
(:func:`save_checkpoint`) hold ``{"config", "history", "trace", "halves"}``, one
``state_dict()`` per half-set; refine's (:mod:`cryosplat.refine.loop`) its own dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from cryosplat.io.atomic import atomic_path


class HasState(Protocol):
    """Anything whose state a checkpoint holds."""

    def state_dict(self) -> dict[str, Any]:
        """The state to save."""
        ...


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: str | Path) -> dict[str, Any]:
    """A state written by :func:`save_state`, on the CPU (weights-only loading: no code in
    the file is ever run)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def save_checkpoint(path: str | Path, fits: Sequence[HasState], history: list[dict],
                    trace: list[list[float]], config: dict) -> None:
    """Both half-sets' states, the history and trace so far, and the run's config."""
    save_state(path, {"config": config, "history": history, "trace": trace,
                      "halves": [f.state_dict() for f in fits]})


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`."""
    return load_state(path)
