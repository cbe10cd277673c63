"""Adaptive density control of a Gaussian mixture during training, as a strategy object (the
shape of gsplat's ``DefaultStrategy``): the trainer calls :meth:`DensifyStrategy.after_backward`
once per step and :meth:`DensifyStrategy.refine` when :meth:`DensifyStrategy.due` says so,
and the strategy rebuilds the mixture and its Adam state.

Removed: Gaussians whose amplitude fell below ``prune_below`` x the median (with ``densify``)
and those whose centre left the support sphere (``support_radius_A``). Split: the in-support
Gaussians with the largest accumulated mean-gradient norm, each into two drawn from the parent
(seeded), scales / 1.6, amplitude halved. How many: with ``densify``, during the first
``until_fraction`` of the run, ``fraction`` of the count (up to the cap); with a support, at
least as many as were removed, so the support never lowers the count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cryosplat.gaussians import GaussianMixture, softplus_inverse
from cryosplat.train.config import TrainConfig

PARAMETERS = ("means_A", "log_scales_A", "quaternions", "raw_amplitudes")  # Adam's groups, in order


@dataclass
class DensifyStrategy:
    """When and how a mixture is split, pruned and kept inside its support."""

    densify: bool
    every: int  # steps between rounds
    until_fraction: float  # densify adds Gaussians during this fraction of the run
    fraction: float  # share of the count split per round
    cap: int  # most Gaussians densify grows to
    prune_below: float  # x the median amplitude
    support_radius_A: float  # 0: no support sphere

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> DensifyStrategy:
        """The strategy of ``cfg``'s densify settings (max Gaussians: 4x the start)."""
        return cls(cfg.densify, cfg.densify_every, cfg.densify_until, cfg.densify_fraction,
                   cfg.max_gaussians or 4 * cfg.n_gaussians, cfg.prune_below,
                   cfg.support_radius_A)

    @property
    def active(self) -> bool:
        """Whether rounds happen at all (densification or a support sphere)."""
        return self.densify or self.support_radius_A > 0

    def growing(self, step: int, total_steps: int) -> bool:
        """Whether densification still adds Gaussians at ``step``."""
        return self.densify and step < self.until_fraction * total_steps

    def due(self, step: int, total_steps: int) -> bool:
        """Whether a round follows the optimiser step that made the count ``step``."""
        return step % self.every == 0 and (self.support_radius_A > 0
                                           or self.growing(step, total_steps))

    @torch.no_grad()
    def after_backward(self, model: GaussianMixture, grad_accum: torch.Tensor) -> None:
        """Add each Gaussian's mean-gradient norm to ``grad_accum`` `(M,)` (in place)."""
        if self.active and model.means_A.grad is not None:
            grad_accum += model.means_A.grad.detach().norm(dim=-1)

    @torch.no_grad()
    def refine(self, model: GaussianMixture, optimizer: torch.optim.Adam,
               grad_accum: torch.Tensor, step: int, total_steps: int, seed: int,
               make_optimizer: Callable[[GaussianMixture], torch.optim.Adam]
               ) -> tuple[GaussianMixture, torch.optim.Adam, int, int]:
        """One round; returns the new mixture and optimiser, and (split, removed). With
        nothing to do, the same mixture and optimiser. ``seed`` draws the split children."""
        amp = model.amplitudes
        alive = torch.ones_like(amp, dtype=torch.bool)
        if self.densify:
            alive &= amp > self.prune_below * amp.median()
        if self.support_radius_A > 0:
            alive &= model.means_A.norm(dim=-1) <= self.support_radius_A
        n_removed = int((~alive).sum())
        growing = self.growing(step, total_steps)
        n_split = n_removed if self.support_radius_A > 0 or not growing else 0
        if growing:  # grow by a share of the count, up to the cap
            n_split = max(n_split, min(int(self.fraction * len(model)),
                                       max(0, self.cap - int(alive.sum()))))
        n_split = min(n_split, int(alive.sum()))
        if n_removed == 0 and n_split == 0:
            return model, optimizer, 0, 0
        score = torch.where(alive, grad_accum, -1.0)
        split = torch.topk(score, n_split).indices if n_split > 0 else score.new_zeros(0).long()
        keep = alive.clone()
        keep[split] = False
        g = torch.Generator().manual_seed(seed)
        cov = model.covariances()[split]
        chol = torch.linalg.cholesky(cov + 1e-9 * torch.eye(3, device=cov.device))
        offsets = torch.randn(2, n_split, 3, generator=g).to(cov)
        new = {"means_A": (model.means_A[split][None]
                           + torch.einsum("mij,smj->smi", chol, offsets)).reshape(-1, 3),
               "log_scales_A": (model.log_scales_A[split] - math.log(1.6)).repeat(2, 1),
               "quaternions": model.quaternions[split].repeat(2, 1),
               "raw_amplitudes": softplus_inverse(amp[split] / 2 / model.amplitude_unit).repeat(2)}
        model, optimizer = rebuild(model, optimizer, keep, new, make_optimizer)
        return model, optimizer, n_split, n_removed


@torch.no_grad()
def rebuild(model: GaussianMixture, optimizer: torch.optim.Adam, keep: torch.Tensor,
            new: dict[str, torch.Tensor],
            make_optimizer: Callable[[GaussianMixture], torch.optim.Adam]
            ) -> tuple[GaussianMixture, torch.optim.Adam]:
    """Keep Gaussians ``keep`` `(M,)` bool, with their Adam moments, and append ``new`` raw
    parameters (:data:`PARAMETERS`) with fresh moments; the amplitude unit and the learning
    rates stay."""
    old_opt = optimizer.state_dict()
    tensors = {n: torch.cat([getattr(model, n).detach()[keep], new[n]]) for n in PARAMETERS}
    model = GaussianMixture.from_raw(**tensors, amplitude_unit=model.amplitude_unit)
    optimizer = make_optimizer(model)
    state = optimizer.state_dict()
    n_new = len(new["means_A"])
    for i in range(len(PARAMETERS)):
        st = old_opt["state"].get(i)
        if st is None:
            continue
        state["state"][i] = {"step": st["step"], **{
            k: torch.cat([st[k][keep], st[k].new_zeros((n_new, *st[k].shape[1:]))])
            for k in ("exp_avg", "exp_avg_sq")}}
    optimizer.load_state_dict(state)
    for grp, g in zip(optimizer.param_groups, old_opt["param_groups"]):
        grp["lr"] = g["lr"]
    return model, optimizer
