"""Ab initio: a Gaussian mixture and every particle's rotation and origin from particles with
CTF parameters only, by stochastic expectation-maximisation at coarse resolution
(docs/abinitio.md).

The particles are Fourier-cropped to a working box whose Nyquist is a little beyond the final
resolution, and their transforms are held in memory. The model starts as random Gaussians in
the particle's sphere. Each iteration takes a random minibatch and

1. **E-step**: scores every rotation of a uniform SO(3) grid x every origin of a disc against
   the model's central slices, within the iteration's resolution limit, by the likelihood with
   each particle's contrast fitted (:func:`cryosplat.refine.global_search.global_search`);
   moves the ``candidates`` best of each particle by a local search (halving steps) and weighs
   them by their posterior, tempered so that it spreads over at least ``n_effective(i)``
   candidates, a number that falls from ``candidates`` to 1 over the first ``anneal_fraction``
   of the iterations (:func:`~cryosplat.refine.global_search.tempered_weights`);
2. **M-step**: inserts each candidate with its weight into the padded grid
   (:meth:`cryosplat.fourier_slice.PaddedGrid.insert`, up to the limit), adds the minibatch's
   sums to the running sums (the older ones decayed by ``decay``), symmetrises them with
   ``--sym``, and takes ``fit_steps`` Adam steps of the mixture on the volume objective of
   those sums (:class:`cryosplat.train.volume.AccumulatedObjective`): the model is positive,
   made of Gaussians, inside the sphere.

The limit goes from ``initial_resolution_A`` to ``final_resolution_A`` (linear in frequency).
A last pass searches every particle at the final resolution (hard assignment: the best
candidate), inserts all of them and fits the mixture to the whole set: the initial model and
the poses that ``cryosplat abinitio`` writes. This follows the scheme of RELION's and
cryoSPARC's initial-model methods (stochastic updates from random minibatches, marginalised or
soft assignments at coarse resolution first), with the model and its M-step those of this
project.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from cryosplat.abinitio.config import AbinitioConfig
from cryosplat.errors import InputError
from cryosplat.fourier_slice import Insertion
from cryosplat.gaussians import GaussianMixture
from cryosplat.io import Particles
from cryosplat.progress import bar
from cryosplat.refine.global_search import Hits, tempered_weights
from cryosplat.refine.working import Searcher, WorkingSet, load_working_set, working_box
from cryosplat.symmetry import symmetry_or_none
from cryosplat.train.densify import PARAMETERS
from cryosplat.train.volume import AccumulatedObjective, calibrate_amplitudes


@dataclass
class IterationRecord:
    """One minibatch of the run: what the report plots."""

    iteration: int
    resolution_A: float
    n_effective: float
    mean_score: float  # the best candidate's, per particle
    mean_contrast: float
    loss: float  # the mixture's volume objective after its steps
    elapsed_s: float


@dataclass
class AbinitioResult:
    """What :func:`run_abinitio` returns: the mixture (in Å, any grid), each particle's
    rotation `(N, 3, 3)` (RELION matrices), origin `(N, 2)` Å, best score `(N,)` and fitted
    contrast `(N,)`, the working box and pixel, the history and the global search's speed."""

    model: GaussianMixture
    rotations: torch.Tensor
    origins_A: torch.Tensor
    score: torch.Tensor
    contrast: torch.Tensor
    box_size: int
    pixel_size_A: float
    history: list[IterationRecord] = field(default_factory=list)
    search_rate: float = 0.0  # the final pass's rotations x origins x particles per second


class ModelFit:
    """The M-step: the mixture and its Adam state, fitted to running sums, kept inside the
    particle's sphere, 1 to 2.5 working voxels wide (wider ones would make the
    voxelisation slow and stand for no detail the working box holds)."""

    def __init__(self, model: GaussianMixture, cfg: AbinitioConfig, ws: WorkingSet,
                 radius_A: float, symmetry: torch.Tensor | None):
        self.model, self.cfg, self.ws = model, cfg, ws
        self.radius_A, self.symmetry = radius_A, symmetry
        self.optimizer = torch.optim.Adam(
            [{"params": [getattr(model, n)], "lr": lr} for n, lr in
             zip(PARAMETERS, [cfg.lr_means_px * ws.pixel_size_A, 0.02, 0.02, 0.02])])
        self.calibrated = False

    def fit(self, sums: Insertion, steps: int) -> float:
        """``steps`` Adam steps on the volume objective of ``sums``; the last loss."""
        objective = AccumulatedObjective(sums)
        d, pix = self.ws.box_size, self.ws.pixel_size_A
        if not self.calibrated:
            calibrate_amplitudes(self.model, objective, pix, 3.0, self.symmetry)
            self.calibrated = True
        loss = torch.zeros(())
        for _ in range(steps):
            loss = objective(objective.transform(
                self.model.voxelise(d, pix, self.symmetry, n_sigma=3.0)))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            with torch.no_grad():
                means = self.model.means_A
                norm = means.norm(dim=-1, keepdim=True)
                means.mul_(torch.where(norm > self.radius_A, self.radius_A / norm, 1.0))
                self.model.log_scales_A.clamp_(math.log(pix), math.log(2.5 * pix))
        return float(loss.detach())


def _resolution(cfg: AbinitioConfig, i: int) -> float:
    """The limit of iteration ``i``: linear in frequency from the initial to the final one."""
    t = 1.0 if cfg.iterations == 1 else i / (cfg.iterations - 1)
    f = (1 - t) / cfg.initial_resolution_A + t / cfg.final_resolution_A
    return 1.0 / f


def _n_effective(cfg: AbinitioConfig, i: int) -> float:
    """How many candidates iteration ``i``'s posterior spreads over at least."""
    t = min(1.0, i / max(1.0, cfg.anneal_fraction * cfg.iterations))
    return float(cfg.candidates) ** (1 - t)


def check_particles(particles: Particles, cfg: AbinitioConfig) -> int:
    """Refuse particles that ab initio cannot work on with ``cfg`` (no CTF, several pixel
    sizes, a box too small for the final resolution, a resolution beyond Nyquist), naming the
    file and the option. Returns the working box (:func:`working_box`)."""
    particles.require_ctf()
    d0, pix0 = particles.box_size, particles.require_single_pixel_size()
    if d0 * pix0 / cfg.final_resolution_A < 8:
        raise InputError(particles.source, f"--final-resolution {cfg.final_resolution_A:g} Å "
                                           f"leaves fewer than 8 shells in a box of "
                                           f"{d0 * pix0:.0f} Å: ask for a finer resolution")
    if 2 * pix0 > cfg.final_resolution_A:
        raise InputError(particles.source, f"--final-resolution {cfg.final_resolution_A:g} Å "
                                           f"is beyond the particles' Nyquist ({2 * pix0:g} Å)")
    return working_box(d0, pix0, cfg.final_resolution_A)


def run_abinitio(particles: Particles, cfg: AbinitioConfig, device: torch.device,
                 log: Callable[[str], None] = print, progress=None,
                 state: dict | None = None,
                 on_iteration: Callable[[dict], None] | None = None) -> AbinitioResult:
    """The stochastic EM of the module docstring on ``particles`` (their poses, if any, are
    not read). ``state``: a checkpoint of :func:`on_iteration`'s form to continue from;
    ``on_iteration(state)`` after every minibatch, for checkpoints. ``progress``: a
    :class:`~cryosplat.progress.ProgressFactory`."""
    box = check_particles(particles, cfg)
    with bar(progress, "reading particles", len(particles)) as advance:
        ws = load_working_set(particles, box, device, advance)
    log(f"working box {box} px of {ws.pixel_size_A:.3g} Å (Nyquist {2 * ws.pixel_size_A:.3g} Å)"
        f", {len(ws)} particles in memory")
    searcher = Searcher(ws, cfg.angle_step_deg, cfg.max_shift_A, cfg.local_levels, device)
    log(f"global search: {len(searcher.rotations)} rotations x {len(searcher.origins)} origins "
        f"(within {searcher.max_shift_A:.3g} Å), {cfg.candidates} candidates locally searched "
        f"over {cfg.local_levels} levels")
    symmetry = symmetry_or_none(cfg.symmetry, device)
    box_A = box * ws.pixel_size_A
    diameter = cfg.particle_diameter_A if cfg.particle_diameter_A > 0 else 0.7 * box_A
    gen = torch.Generator().manual_seed(cfg.seed)
    model = GaussianMixture.random(cfg.n_gaussians, 0.5 * diameter * 0.8, 2 * ws.pixel_size_A,
                                   generator=gen).to(device)
    fit = ModelFit(model, cfg, ws, 0.5 * diameter, symmetry)
    sums: Insertion | None = None
    history: list[IterationRecord] = []
    start_it, elapsed0 = 0, 0.0
    rng = np.random.default_rng(cfg.seed)
    if state is not None:
        model.load_state_dict(state["model"])
        fit.optimizer.load_state_dict(state["optimizer"])
        fit.calibrated = True
        sums = Insertion(state["numerator"].to(device), state["denominator"].to(device), box,
                         2 * box)
        history = [IterationRecord(**h) for h in state["history"]]
        start_it, elapsed0 = state["iteration"] + 1, history[-1].elapsed_s if history else 0.0
        rng.bit_generator.state = state["rng"]
        log(f"resumed after iteration {start_it} of {cfg.iterations}")
    t0 = time.perf_counter() - elapsed0
    with bar(progress, "ab initio", cfg.iterations, start_it) as advance:
        for i in range(start_it, cfg.iterations):
            res = _resolution(cfg, i)
            shell = searcher.limit_shell(res)
            n_eff = _n_effective(cfg, i)
            idx = torch.from_numpy(rng.choice(len(ws), min(cfg.batch_size, len(ws)),
                                              replace=False)).to(device)
            hits = searcher.search(searcher.sampled(model, symmetry), idx, shell, cfg.candidates)
            weights = tempered_weights(hits.score, n_eff)
            batch = searcher.insert(idx, hits, weights, shell).symmetrise(symmetry)
            if sums is None:
                sums = batch
            else:
                sums.numerator.mul_(cfg.decay).add_(batch.numerator)
                sums.denominator.mul_(cfg.decay).add_(batch.denominator)
            loss = fit.fit(sums, cfg.fit_steps)
            rec = IterationRecord(i, res, n_eff, float(hits.score[:, 0].mean()),
                                  float((weights * hits.contrast).sum(1).mean()), loss,
                                  time.perf_counter() - t0)
            history.append(rec)
            if i % 10 == 0 or i == cfg.iterations - 1:
                log(f"iteration {i + 1}/{cfg.iterations}: {res:.1f} Å, posterior over "
                    f"{n_eff:.1f}, mean best score {rec.mean_score:.4g}, loss {loss:.4g}")
            advance(1)
            if on_iteration is not None:
                on_iteration({"iteration": i, "model": model.state_dict(),
                              "optimizer": fit.optimizer.state_dict(),
                              "numerator": sums.numerator.cpu(),
                              "denominator": sums.denominator.cpu(),
                              "history": [asdict(h) for h in history],
                              "rng": rng.bit_generator.state})
    return final_pass(ws, searcher, fit, symmetry, cfg, history, log, progress)


def final_pass(ws: WorkingSet, searcher: Searcher, fit: ModelFit,
               symmetry: torch.Tensor | None, cfg: AbinitioConfig,
               history: list[IterationRecord], log: Callable[[str], None],
               progress=None) -> AbinitioResult:
    """Every particle searched at the final resolution (its best candidate), all of them
    inserted, the mixture fitted to their sums: the run's result."""
    shell = searcher.limit_shell(cfg.final_resolution_A)
    sampled = searcher.sampled(fit.model, symmetry)
    n = len(ws)
    dev = searcher.device
    rot = torch.empty(n, 3, 3, device=dev)
    org = torch.empty(n, 2, device=dev)
    score = torch.empty(n, device=dev)
    contrast = torch.empty(n, device=dev)
    num = den = None
    search_s = 0.0
    with bar(progress, "final search", n) as advance:
        for s in range(0, n, cfg.batch_size):
            idx = torch.arange(s, min(s + cfg.batch_size, n), device=dev)
            t = time.perf_counter()
            hits = searcher.search(sampled, idx, shell, cfg.candidates)
            search_s += time.perf_counter() - t
            best = Hits(hits.score[:, :1], hits.rotations[:, :1], hits.origins_A[:, :1],
                        hits.contrast[:, :1])
            ins = searcher.insert(idx, best, torch.ones(len(idx), 1, device=dev), shell)
            num = ins.numerator if num is None else num.add_(ins.numerator)
            den = ins.denominator if den is None else den.add_(ins.denominator)
            rot[idx], org[idx] = best.rotations[:, 0], best.origins_A[:, 0]
            score[idx], contrast[idx] = best.score[:, 0], best.contrast[:, 0]
            advance(len(idx))
    assert num is not None and den is not None
    sums = Insertion(num, den, ws.box_size, 2 * ws.box_size).symmetrise(symmetry)
    loss = fit.fit(sums, cfg.final_fit_steps)
    rate = n * len(searcher.rotations) * len(searcher.origins) / max(search_s, 1e-9)
    log(f"final pass: {n} particles at {cfg.final_resolution_A:g} Å, mixture loss {loss:.4g}; "
        f"search {rate:.3g} rotations x origins x particles per s")
    return AbinitioResult(fit.model, rot.cpu().double(), org.cpu().double(), score.cpu(),
                          contrast.cpu(), ws.box_size, ws.pixel_size_A, history, rate)
