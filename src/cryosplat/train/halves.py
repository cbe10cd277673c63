"""The one driver of two half-sets: both objectives' runs and refine's fits step their two
half-set fits here.

A half-set fit is anything with the :class:`HalfSetFit` protocol: the images objective's
:class:`~cryosplat.train.trainer.HalfSetTrainer` (mini-batches of rendered particles, a fixed
number of steps) and the volume objective's :class:`~cryosplat.train.volume.HalfSetVolumeFit`
(the accumulated sums, stopped on its own held-out loss). :func:`step_halves` steps each fit
that is not done, in half-set order, until both are; every ``eval_every`` steps and at the
end it evaluates both maps into a history row, every ``checkpoint_every`` steps it writes a
checkpoint (:mod:`cryosplat.train.checkpoint`). The half-sets never meet: each step and each
stopping decision uses one fit's own particles; only the evaluation looks at both maps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch

from cryosplat.evaluate import evaluate_maps
from cryosplat.gaussians import GaussianMixture
from cryosplat.train.checkpoint import save_checkpoint


class HalfSetFit(Protocol):
    """One half-set's fit, as :func:`step_halves` drives it."""

    half: int  # 1 or 2
    step: int  # steps taken
    model: GaussianMixture  # the half-set's mixture
    stop_reason: str | None  # why it stopped early (None: it ran its schedule, or runs on)
    loss_names: tuple[str, ...]  # the keys of step_once's result, in the history's order

    @property
    def done(self) -> bool:
        """No step is left to take."""
        ...

    def step_once(self, data: torch.Tensor | None = None) -> dict[str, float]:
        """One step (``data``: its prefetched images, where the fit takes images); returns
        its losses by :attr:`loss_names`."""
        ...

    def volume(self) -> torch.Tensor:
        """The current mixture voxelised, `(D, D, D)` on the CPU."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed fit needs."""
        ...


class Record(NamedTuple):
    """What :func:`step_halves` recorded: one history row per evaluation (``step``,
    ``time_s``, each loss per half-set as ``NAME_1``, ``NAME_2``, then the evaluation's
    headline) and one trace row per step (``[step, NAME_1, NAME_2, ...]``)."""

    history: list[dict]
    trace: list[list[float]]

    @property
    def elapsed_s(self) -> float:
        """Seconds the recorded run had taken at its last evaluation (0 without one)."""
        return self.history[-1]["time_s"] if self.history else 0.0


Evaluator = Callable[[torch.Tensor, torch.Tensor], dict]


def map_evaluator(pixel_size_A: float, truth: torch.Tensor | None = None,
                  references: tuple[torch.Tensor, torch.Tensor] | None = None) -> Evaluator:
    """The evaluation of a history row: :func:`cryosplat.evaluate.evaluate_maps` of the two
    half-maps `(D, D, D)` (unmasked half-map FSC; against ``truth``; cross-validated against
    the half-sets' own direct maps ``references``), as its headline numbers."""
    def evaluate(v1: torch.Tensor, v2: torch.Tensor) -> dict:
        return evaluate_maps(v1, v2, pixel_size_A, truth, references,
                             masked=False).headline().to_json()
    return evaluate


def step_halves(fits: Sequence[HalfSetFit], eval_every: int, checkpoint_every: int,
                evaluate: Evaluator | None = None, checkpoint_path: str | Path | None = None,
                config: dict | None = None, inputs: Iterable[Sequence[torch.Tensor]] | None = None,
                on_step: Callable[[list[dict[str, float]]], None] | None = None,
                log: Callable[[str], None] = print, record: Record | None = None,
                stop_when: Callable[[dict], bool] | None = None,
                lead: bool = True) -> Record:
    """Step half-set fits 1 and 2 until both are done (module docstring).

    Parameters
    ----------
    fits: the two fits, half-set 1 first.
    eval_every, checkpoint_every: steps between evaluations and between checkpoints; both
        also happen after the last step.
    evaluate: the history rows' evaluation (:func:`map_evaluator`); None: no history.
    checkpoint_path: where :func:`~cryosplat.train.checkpoint.save_checkpoint` writes (with
        ``config``); None: no checkpoints.
    inputs: one item per step, each fit's data (prefetched images); None: fits that take none.
    on_step: called after each step with each half-set's last losses.
    log: where each evaluation row, and each early stop, is written.
    record: the history and trace of an interrupted run being resumed, continued here
        (``time_s`` continues from its :attr:`Record.elapsed_s`).
    stop_when: a function of a history row; the run ends after the first evaluation for
        which it is true (benchmarks: stop once the baseline is reached).
    lead: this process evaluates, reports, logs and checkpoints (under torch.distributed only
        rank 0 does; every rank steps).

    Returns
    -------
    The :class:`Record` (the resumed one's rows first).
    """
    history = list(record.history) if record else []
    trace = [list(r) for r in record.trace] if record else []
    t0 = time.perf_counter() - (record.elapsed_s if record else 0.0)
    names = fits[0].loss_names
    last = [{n: math.nan for n in names} for _ in fits]
    batches = iter(inputs) if inputs is not None else None

    def current() -> int:
        return max(f.step for f in fits)

    def evaluate_now() -> None:
        assert evaluate is not None
        row: dict = {"step": current(), "time_s": time.perf_counter() - t0}
        row.update({f"{n}_{i}": last[i - 1][n] for n in names for i in (1, 2)})
        row.update(evaluate(fits[0].volume(), fits[1].volume()))
        history.append(row)
        log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in row.items()))

    while not all(f.done for f in fits):
        data = next(batches) if batches is not None else [None] * len(fits)
        for i, f in enumerate(fits):
            if not f.done:
                last[i] = f.step_once(data[i])
                if f.done and f.stop_reason and lead:
                    log(f"half-set {f.half} stopped at step {f.step}: {f.stop_reason}")
        step = current()
        trace.append([step, *(last[i][n] for n in names for i in range(len(fits)))])
        if not lead:
            continue
        if on_step is not None:
            on_step(last)
        finished = all(f.done for f in fits)
        stop = False
        if evaluate is not None and (step % eval_every == 0 or finished):
            evaluate_now()
            stop = stop_when is not None and bool(stop_when(history[-1]))
        if checkpoint_path is not None and (step % checkpoint_every == 0 or finished or stop):
            save_checkpoint(checkpoint_path, fits, history, trace, config or {})
        if stop:
            log(f"stopped at step {step}: the stopping condition holds")
            break
    if lead and evaluate is not None and (not history or history[-1]["step"] != current()):
        evaluate_now()
    return Record(history, trace)
