"""Fitting one half-set's mixture to its accumulated Fourier statistics (``objective="volume"``).

With the poses and CTFs fixed, the image-domain least squares over a half-set's particles,
``sum_i || CTF_i . F(shift_i(P_i V)) - F(y_i) ||²``, is by the Fourier slice theorem a
quadratic in the 3D transform of ``V``:

    L(V) = sum_k W(k) |V^(k)|² - 2 Re(conj(V^(k)) B(k)) + const,

with ``B = sum_i CTF_i F_i`` and ``W = sum_i CTF_i²`` inserted on the 2x padded grid: exactly
the sums that direct inversion accumulates (:func:`cryosplat.backproject.insert_particles`).
Trilinear insertion multiplies the real-space map by the separable sinc² of the padded box,
so the model is multiplied by it too before its transform (:class:`AccumulatedObjective`, on
the grid of :mod:`cryosplat.fourier_slice`).
One evaluation costs a voxelisation and one padded FFT, whatever the particle count, and it
sees every particle of the half-set at once: the gradient has no mini-batch noise.

Each half-set holds out ``holdout_fraction`` of its own particles in a second insertion. The
held-out loss (the same quadratic on their sums) measures how well the mixture predicts
particles it was not fitted to, using nothing of the other half-set: the learning rate is cut
when it stops improving, the run stops after ``lr_cuts`` cuts, and the mixture with the best
held-out loss is kept (:class:`HalfSetVolumeFit`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cryosplat.errors import StageError
from cryosplat.evaluate import spherical_mask
from cryosplat.fourier_slice import Insertion, PaddedGrid
from cryosplat.gaussians import GaussianMixture
from cryosplat.io.mrc import write_volume
from cryosplat.symmetry import symmetry_matrices, symmetry_or_none
from cryosplat.train.config import TrainConfig
from cryosplat.train.densify import PARAMETERS
from cryosplat.train.halves import Record, map_evaluator, step_halves
from cryosplat.train.seeding import (
    checked_amplitude_scale,
    own_support,
    random_mixture,
    seed_mixture,
)


class AccumulatedObjective:
    """:math:`L(V)` of the module docstring for one insertion. The insertion's grids are used
    as they are (fftshifted along z and y, not copied: at box 256 each is 0.8 GB); the
    model's transform (:meth:`transform`, with the gridding function) is shifted to
    match."""

    def __init__(self, ins: Insertion):
        d, p = ins.box_size, ins.padded_size
        dev = ins.numerator.device
        self.box_size, self.padded_size = d, p
        self.numerator, self.denominator = ins.numerator, ins.denominator
        # each element of an rfftn's x > 0 half stands for itself and its conjugate
        self.hermitian = torch.full((p // 2 + 1,), 2.0, device=dev)
        self.hermitian[0] = 1.0
        if p % 2 == 0:
            self.hermitian[-1] = 1.0
        self.grid = PaddedGrid(d, p, dev)
        # per unit of sum CTF²: the loss is a mean squared residual per Fourier sample
        self.norm = 1.0 / float((self.denominator * self.hermitian).sum().clamp_min(1e-30))

    def transform(self, volume: torch.Tensor) -> torch.Tensor:
        """The model's transform as the sums hold it: ``volume`` `(D, D, D)` times the
        gridding function, on the padded grid (:meth:`PaddedGrid.transform`, gridding +1)."""
        return self.grid.transform(volume, 1)

    def terms(self, transform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W |V^|², Re(conj(V^) B))`` of a model's :meth:`transform`, each counted with
        its Hermitian multiplicity: `(P, P, P//2+1)` each."""
        power = self.denominator * (transform.real**2 + transform.imag**2) * self.hermitian
        cross = (self.numerator.real * transform.real
                 + self.numerator.imag * transform.imag) * self.hermitian
        return power, cross

    def __call__(self, transform: torch.Tensor) -> torch.Tensor:
        """The loss of a model's :meth:`transform` (a scalar, minus an unknown constant)."""
        power, cross = self.terms(transform)
        return (power - 2 * cross).sum() * self.norm


class HalfSetVolumeFit:
    """One half-set's mixture fitted by Adam to :class:`AccumulatedObjective` of its
    training particles, stopped on the held-out particles' loss (module docstring); a
    :class:`~cryosplat.train.halves.HalfSetFit`."""

    loss_names: tuple[str, ...] = ("loss", "held_out_loss")

    def __init__(self, model: GaussianMixture, train: Insertion, held_out: Insertion | None,
                 cfg: TrainConfig, half: int, voxel_size_A: float, device: torch.device):
        self.cfg, self.half, self.pix, self.device = cfg, half, voxel_size_A, device
        self.d = train.box_size
        self.symmetry = symmetry_or_none(cfg.symmetry, device)  # the model: one asymmetric unit
        self.model = model.to(device)
        self.objective = AccumulatedObjective(train)
        self.held_out = None if held_out is None else AccumulatedObjective(held_out)
        self.base_lrs = [cfg.volume_lr_means_px * voxel_size_A, cfg.lr_scales, cfg.lr_rotations,
                         cfg.lr_amplitudes]
        self.optimizer = torch.optim.Adam(
            [{"params": [getattr(self.model, n)], "lr": lr}
             for n, lr in zip(PARAMETERS, self.base_lrs)])
        self.step = 0
        self.lr_factor = 1.0
        self.cuts = 0
        self.best = math.inf
        self.first = math.nan
        self.best_step = 0
        self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.since_best = 0
        self.stop_reason: str | None = None
        self._volume: tuple[int, torch.Tensor] | None = None

    @property
    def done(self) -> bool:
        """Stopped by its rule or by ``max_steps`` (:attr:`stop_reason` says which)."""
        return self.stop_reason is not None

    def step_once(self, data: torch.Tensor | None = None) -> dict[str, float]:
        """:meth:`train_step` as the half-set driver takes it (``data`` is unused: the fit
        takes its insertion's sums)."""
        return dict(zip(self.loss_names, self.train_step()))

    def _voxelise(self) -> torch.Tensor:
        return self.model.voxelise(self.d, self.pix, self.symmetry,
                                   n_sigma=self.cfg.volume_n_sigma)

    def train_step(self) -> tuple[float, float]:
        """One Adam step on the whole training insertion, then the stopping rule. Returns
        (training loss, held-out loss; the training loss when nothing is held out)."""
        for grp, base in zip(self.optimizer.param_groups, self.base_lrs):
            grp["lr"] = base * self.lr_factor
        t = self.objective.transform(self._voxelise())
        loss = self.objective(t)
        with torch.no_grad():
            watched = loss.detach() if self.held_out is None else self.held_out(t)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not torch.isfinite(loss):
            raise StageError("training", f"half-set {self.half}: the loss became "
                                         f"{float(loss.detach())} at step {self.step}; lower the "
                                         "learning rates")
        self._watch(float(watched))  # the loss of the parameters before this step
        self.optimizer.step()
        self.step += 1
        self._volume = None
        if not self.done and self.step >= self.cfg.max_steps:
            self._finish(f"reached --max-steps {self.cfg.max_steps}")
        return float(loss.detach()), float(watched)

    def _watch(self, value: float) -> None:
        """The stopping rule on the held-out loss of the current parameters."""
        if math.isnan(self.first):
            self.first = value
        if (not math.isfinite(self.best)
                or value < self.best - self.cfg.stop_tolerance * max(self.first - self.best, 0)):
            self.best, self.best_step, self.since_best = value, self.step, 0
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            return
        self.since_best += 1
        if self.since_best < self.cfg.patience:
            return
        if self.cuts < self.cfg.lr_cuts:  # go back to the best and take smaller steps
            self.cuts += 1
            self.lr_factor *= self.cfg.lr_cut_factor
            self.since_best = 0
            self._restore()
            return
        self._finish(f"converged: the {'held-out' if self.held_out else 'training'} loss "
                     f"gained less than {self.cfg.stop_tolerance:g} of its total gain in "
                     f"{self.cfg.patience} steps after {self.cuts} learning-rate cuts")

    def _restore(self) -> None:
        with torch.no_grad():
            self.model.load_state_dict(self.best_state)
        self.optimizer.state.clear()  # fresh moments for the restored parameters
        self._volume = None

    def _finish(self, reason: str) -> None:
        self._restore()
        self.stop_reason = f"{reason}; kept step {self.best_step}"

    def state_dict(self) -> dict:
        """The mixture, Adam's state and the stopping rule's state (with the best mixture)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "lr_factor": self.lr_factor, "cuts": self.cuts,
                "best": self.best, "first": self.first, "best_step": self.best_step,
                "best_state": self.best_state, "since_best": self.since_best,
                "stop_reason": self.stop_reason}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict`."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for k in ("step", "lr_factor", "cuts", "best", "first", "best_step", "best_state",
                  "since_best", "stop_reason"):
            setattr(self, k, state[k])
        self._volume = None

    @torch.no_grad()
    def volume(self) -> torch.Tensor:
        """The mixture voxelised, `(D, D, D)` on the CPU, once per state."""
        if self._volume is None or self._volume[0] != self.step:
            self._volume = (self.step, self._voxelise().cpu())
        return self._volume[1]


def split_held_out(indices: np.ndarray, fraction: float, seed: int, half: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) particles of one half-set: ``fraction`` of them, seeded, at least
    one when ``fraction > 0``; both sorted."""
    n_held = 0 if fraction <= 0 else max(1, int(round(fraction * len(indices))))
    if n_held >= len(indices):
        raise ValueError(f"half-set {half}: holding out {n_held} of {len(indices)} particles "
                         "leaves none to fit")
    perm = np.random.default_rng([seed, half, 17]).permutation(len(indices))
    return np.sort(indices[perm[n_held:]]), np.sort(indices[perm[:n_held]])


@torch.no_grad()
def calibrate_amplitudes(model: GaussianMixture, objective: AccumulatedObjective,
                         voxel_size_A: float, n_sigma: float,
                         symmetry: torch.Tensor | None = None, half: int = 1) -> float:
    """Scale the amplitudes to the least-squares optimum of ``objective`` (a random start's
    amplitudes are in no unit of the data), refused as
    :func:`~cryosplat.train.seeding.checked_amplitude_scale` refuses it for half-set ``half``.
    Returns the factor."""
    t = objective.transform(model.voxelise(objective.box_size, voxel_size_A, symmetry,
                                           n_sigma=n_sigma))
    power, cross = (float(x.sum()) for x in objective.terms(t))
    scale = checked_amplitude_scale(cross / max(power, 1e-30), half)
    model.scale_amplitudes(scale)
    return scale


def make_fits(insertions: list[tuple[Insertion, Insertion | None]], cfg: TrainConfig,
              voxel_size_A: float, device: torch.device, resume: dict | None = None,
              out: Path | None = None, log: Callable[[str], None] = print,
              halves: tuple[int, ...] = (1, 2)) -> list[HalfSetVolumeFit]:
    """The fits of half-sets ``halves`` from their (training, held-out) ``insertions``, in
    the same order (both half-sets unless a process makes only its own): each mixture from
    ``resume``'s checkpoint, else seeded in its own training insertion's support
    (``init="map"``, the support written to out/support_half_H.mrc) or at random in a ball
    (``init="random"``, amplitudes calibrated on its own sums)."""
    pix = voxel_size_A
    box = insertions[0][0].box_size
    fits = []
    for h, (train, held) in zip(halves, insertions, strict=True):
        label = f"half-set {h}"
        if resume is not None:
            model = GaussianMixture.from_raw(**resume["halves"][h - 1]["model"])
        elif cfg.init == "map":
            support = own_support(train, pix)
            if cfg.support_radius_A > 0:
                sphere = spherical_mask(box, pix, cfg.support_radius_A, soft_edge_A=0.0)
                support.mask &= sphere.to(support.mask.device) > 0
            order = len(symmetry_matrices(cfg.symmetry))  # seeds of one asymmetric unit
            model = seed_mixture(support, pix, cfg.gaussians_per_voxel / order,
                                 cfg.seed_scale_px, max(1, cfg.max_seed_gaussians // order),
                                 torch.Generator().manual_seed(cfg.seed * 1000 + h), label)
            model.scale_amplitudes(1 / order)  # the G copies hold the own map's mass
            if out is not None:
                write_volume(out / f"support_half_{h}.mrc", support.mask.float().cpu(), pix)
            log(f"{label}: own support {support.volume_A3(pix):.0f} Å³ (low-passed own map "
                f"above {support.threshold:.3g}, noise {support.noise:.3g}): {len(model)} "
                "Gaussians")
        else:  # "random" (TrainConfig refuses anything else)
            model = random_mixture(cfg, box, pix, h)
        fit = HalfSetVolumeFit(model, train, held, cfg, h, pix, device)
        if resume is not None:
            fit.load_state_dict(resume["halves"][h - 1])
        elif cfg.init == "random":
            calibrate_amplitudes(fit.model, fit.objective, pix, cfg.volume_n_sigma, fit.symmetry,
                                 h)
        fits.append(fit)
    return fits


def fit_gold_standard_volume(fits: list[HalfSetVolumeFit], cfg: TrainConfig,
                             truth: torch.Tensor | None = None,
                             references: tuple[torch.Tensor, torch.Tensor] | None = None,
                             checkpoint_path: str | Path | None = None,
                             record: Record | None = None,
                             progress: Callable[[int, list[float]], None] | None = None,
                             log: Callable[[str], None] = print, config: dict | None = None
                             ) -> Record:
    """Step both half-sets' fits until each has stopped (its own rule) with the half-set
    driver (:func:`cryosplat.train.halves.step_halves`), evaluating both every
    ``cfg.eval_every`` steps and at the end (half-map FSC, against ``truth``, and
    cross-validated against ``references``) and checkpointing every ``cfg.checkpoint_every``.
    The half-sets never meet: each step and each stopping decision uses one half-set's own
    sums. ``record``: a resumed run's history and trace; ``progress(1, held-out losses)``
    follows each step. Returns the :class:`~cryosplat.train.halves.Record`."""
    def on_step(last: list[dict[str, float]]) -> None:
        if progress is not None:
            progress(1, [x["held_out_loss"] for x in last])

    return step_halves(fits, cfg.eval_every, cfg.checkpoint_every,
                       map_evaluator(fits[0].pix, truth, references), checkpoint_path, config,
                       None, on_step, log, record)
