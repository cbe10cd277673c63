"""The alternation of ``cryosplat refine``: per iteration, each half-set's mixture is fitted to
its own particles at their current poses (:mod:`cryosplat.train.volume`), then every particle
of that half-set is searched and polished against that half-set's model alone
(:mod:`cryosplat.refine.search`). The two half-sets never meet: a half-set's poses, model and
alignment limit come from its own particles only, so its half-map stays independent.

Iteration ``i`` searches with steps ``0.5^(i-1)`` times the first iteration's, around the
poses of the last; the bounds always hold around the input poses. After each iteration the
poses and models are checkpointed (``refine_checkpoint.pt``), so a stopped run continues at
the next iteration.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from cryosplat.backproject import insert_particles
from cryosplat.errors import InputError
from cryosplat.fourier_slice import Insertion, PaddedGrid, as_sampled
from cryosplat.gaussians import GaussianMixture
from cryosplat.geometry import rotation_angle_deg
from cryosplat.io import Particles
from cryosplat.progress import bar
from cryosplat.refine.global_refine import GlobalConfig
from cryosplat.refine.search import (
    Pose,
    SearchConfig,
    alignment_limit,
    alignment_points,
    refine_batch,
)
from cryosplat.symmetry import symmetry_or_none
from cryosplat.train.checkpoint import save_state
from cryosplat.train.config import TrainConfig
from cryosplat.train.distributed import all_reduce_sum, barrier, broadcast_object, rank_and_world
from cryosplat.train.halves import step_halves
from cryosplat.train.volume import HalfSetVolumeFit, make_fits, split_held_out


@dataclass
class RefineConfig:
    """Settings of ``cryosplat refine`` beyond reconstruct's (``config.json``'s ``refine``)."""

    iterations: int = 2  # a third moved 4AKE (SNR 0.05) particles by a median 0.3°: noise
    batch_size: int = 64  # particles searched at once
    max_resolution_A: float = 0.0  # the finest resolution used to align; 0: each half-set's
    # own limit (:func:`cryosplat.refine.search.alignment_limit`)
    search: SearchConfig = field(default_factory=SearchConfig)
    global_search: GlobalConfig | None = None  # --global --ref MAP: the global stage first

    def __post_init__(self) -> None:
        """Refuse settings that cannot run, naming the command-line option."""
        c = self.search
        global_only = self.global_search is not None and self.iterations == 0  # its poses go
        if not (self.iterations > 0 or global_only):  # straight to the reconstruction
            raise InputError(None, f"--iterations {self.iterations}: expected a positive value "
                                   "(0 only with --global)")
        for option, value in (("--max-angle", c.max_angle_deg),
                              ("--max-shift", c.max_shift_A), ("--max-defocus", c.max_defocus_A)):
            if not value > 0:
                raise InputError(None, f"{option} {value:g}: expected a positive value")
        if not self.max_resolution_A >= 0:
            raise InputError(None, f"--max-resolution {self.max_resolution_A:g}: expected Å, "
                                   "or 0 for each half-set's own limit")

    @classmethod
    def from_dict(cls, d: dict) -> RefineConfig:
        """The settings of ``config.json``'s ``refine`` entry."""
        g = d.get("global_search")
        return cls(**{**d, "search": SearchConfig(**d["search"]),
                      "global_search": None if g is None else GlobalConfig(**g)})


def with_poses(p: Particles, pose: Pose) -> Particles:
    """``p`` with the rotations, origins and defocus changes of ``pose`` (all `N` rows)."""
    c = p.require_ctf()
    change = pose.defocus_change_A.to(c.defocus_u_A.dtype)
    ctf = replace(c, defocus_u_A=c.defocus_u_A + change, defocus_v_A=c.defocus_v_A + change)
    return replace(p, rotations=pose.rotations.to(torch.float64),
                   shifts_A=pose.origins_A.to(torch.float64), ctf=ctf)


def input_pose(p: Particles) -> Pose:
    """The poses as read: RELION matrices, origins and no defocus change (float64)."""
    return Pose(p.require_poses().clone(), p.shifts_A.clone(),
                torch.zeros(len(p), dtype=torch.float64))


def pose_changes(a: Pose, b: Pose) -> dict[str, np.ndarray]:
    """Per particle: angle (degrees), origin shift (Å) and defocus change (Å) from ``a`` to
    ``b``."""
    return {"angle_deg": rotation_angle_deg(a.rotations, b.rotations).numpy(),
            "shift_A": (a.origins_A - b.origins_A).norm(dim=-1).numpy(),
            "defocus_A": (b.defocus_change_A - a.defocus_change_A).numpy()}


@dataclass
class HalfReference:
    """What searching one half-set needs from its fit, made by the process that fitted it and
    sent to the others: the mixture voxelised `(D, D, D)` (CPU), the alignment limit (a shell
    of the box), the held-out regression per shell `(D//2+1,)` (:func:`alignment_limit`), the
    mixture's parameters (CPU) and why its fit stopped."""

    volume: torch.Tensor
    limit_shell: int
    regression: torch.Tensor
    model: dict[str, torch.Tensor]
    stop_reason: str | None


def half_reference(fit: HalfSetVolumeFit, cfg: RefineConfig) -> HalfReference:
    """The :class:`HalfReference` of a fitted half-set: the limit from its own held-out
    particles, capped by ``cfg.max_resolution_A``."""
    d, pix = fit.d, fit.pix
    if fit.held_out is None:
        raise InputError(None, f"half-set {fit.half} holds no particles out: refine finds its "
                               "alignment limit from them")
    with torch.no_grad():
        vox = fit.volume()
        shell, r = alignment_limit(fit.objective.transform(vox.to(fit.device)), fit.held_out)
    if cfg.max_resolution_A > 0:
        shell = min(shell, max(3, int(d * pix / cfg.max_resolution_A)))
    return HalfReference(vox, shell, r, {k: v.detach().cpu()
                                         for k, v in fit.model.state_dict().items()},
                         fit.stop_reason)


def search_share(indices: np.ndarray, batch_size: int, rank: int, world: int) -> np.ndarray:
    """The particles of ``indices`` that process ``rank`` of ``world`` searches: batches
    ``rank``, ``rank + world``... of ``batch_size``, so every batch is the one a single
    process would search, and the poses do not depend on the number of processes."""
    starts = range(rank * batch_size, len(indices), world * batch_size)
    return np.concatenate([indices[s:s + batch_size] for s in starts] or [indices[:0]])


def search_half(p: Particles, indices: np.ndarray, ref: HalfReference, pose: Pose, start: Pose,
                cfg: RefineConfig, scale: float, device: torch.device,
                advance: Callable[[int], None]) -> tuple[Pose, torch.Tensor]:
    """Search the particles ``indices`` (`(n,)`, of one half-set) against that half-set's
    model ``ref``. Returns (their new poses, float64 on the CPU, and their scores `(n,)`)."""
    d, pix = p.box_size, p.require_single_pixel_size()
    with torch.no_grad():
        volume = as_sampled(PaddedGrid(d, 2 * d, device).transform(ref.volume.to(device), -1))
    points = alignment_points(d, ref.limit_shell, device)
    ctf = p.require_ctf()
    out, score = [pose[torch.from_numpy(indices[:0])]], [torch.zeros(0, dtype=torch.float64)]
    for s in range(0, len(indices), cfg.batch_size):
        idx = indices[s:s + cfg.batch_size]
        t = torch.from_numpy(idx)
        images = p.read_images(idx).to(device)
        f = torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1))).reshape(len(idx), -1)
        new, sc = refine_batch(volume, f[:, points.flat], ctf[t].to(device, torch.float32),
                               pose[t].to(device, torch.float32),
                               start[t].to(device, torch.float32), points, pix,
                               cfg.search, scale)
        out.append(new.to("cpu", torch.float64))
        score.append(sc.double().cpu())
        advance(len(idx))
    return Pose.cat(out), torch.cat(score)


def gather_rows(pose: Pose, score: torch.Tensor, rows: np.ndarray, n: int, device: torch.device
                ) -> tuple[Pose, float]:
    """Every process's searched ``rows`` (their ``pose`` and ``score``) into one :class:`Pose`
    of all `n` particles (rows no process searched are zero), on every process; and the sum of
    the scores. Each row is searched by one process, so the sums over processes are exact."""
    t = torch.from_numpy(rows)
    full = {}
    for k, v in pose.tensors().items():
        full[k] = torch.zeros((n, *v.shape[1:]), dtype=torch.float64, device=device)
        full[k][t.to(device)] = v.to(device, torch.float64)
        full[k] = all_reduce_sum(full[k]).cpu()
    total = all_reduce_sum(score.sum().reshape(1).to(device, torch.float64))
    return Pose(**full), float(total)


def fit_halves(p: Particles, half: np.ndarray, halves: tuple[int, ...], train: TrainConfig,
               pix: float, device: torch.device, models: list[GaussianMixture] | None,
               advance: Callable[[int], None], log: Callable[[str], None]
               ) -> list[HalfSetVolumeFit]:
    """The mixtures of half-sets ``halves`` fitted each to its own particles at the poses of
    ``p``: seeded in its own support (``models`` None) or continued from ``models`` (both
    half-sets'). ``advance(1)`` after each step."""
    sym = symmetry_or_none(train.symmetry, device)
    ins: list[tuple[Insertion, Insertion | None]] = []
    for h in halves:
        tr, held = split_held_out(np.nonzero(half == h)[0], train.holdout_fraction, train.seed, h)
        ins.append((insert_particles(p, tr, device=device, symmetry=sym),
                    insert_particles(p, held, device=device, symmetry=sym)))
    if models is None:
        fits = make_fits(ins, train, pix, device, out=None, log=log, halves=halves)
    else:
        fits = [HalfSetVolumeFit(models[h - 1], tr, held, train, h, pix, device)
                for h, (tr, held) in zip(halves, ins)]
    step_halves(fits, train.eval_every, train.checkpoint_every, on_step=lambda _: advance(1),
                log=log)
    return fits


def refine_gold_standard(p: Particles, half: np.ndarray, train: TrainConfig, cfg: RefineConfig,
                         device: torch.device, checkpoint: Path | None = None,
                         resume: dict | None = None, log: Callable[[str], None] = print,
                         progress=None
                         ) -> tuple[Pose, list[dict], list[GaussianMixture] | None]:
    """Alternate fits and searches for ``cfg.iterations`` iterations (module docstring).

    Under torchrun with `W` processes, process ``(h - 1) % W`` fits half-set ``h`` and sends
    its :class:`HalfReference` to the others; every process then searches its share
    (:func:`search_share`) of both half-sets, and the poses are summed over processes. Call it
    on every process; only rank 0 logs, shows progress and writes the checkpoint. The result
    does not depend on `W` (the same fits, the same batches).

    ``progress(description, total, completed)`` is a :data:`cryosplat.progress.ProgressFactory`
    or None. Returns (the refined poses of all `N` particles, one statistics row per
    iteration, the half-sets' mixtures of the last iteration), on every process."""
    if not train.holdout_fraction > 0:
        raise InputError(None, "refine finds each half-set's alignment limit from its own "
                               f"held-out particles: holdout {train.holdout_fraction:g} holds "
                               "none out")
    pix = p.require_single_pixel_size()
    rank, world = rank_and_world()
    if rank != 0:
        log, progress = (lambda msg: None), None
    owner = {h: (h - 1) % world for h in (1, 2)}
    mine = tuple(h for h in (1, 2) if owner[h] == rank)
    start = input_pose(p)
    pose, history, models, first = start, [], None, 1
    if resume is not None:
        pose = Pose(**resume["pose"])
        models = [GaussianMixture.from_raw(**m) for m in resume["models"]]
        history, first = list(resume["history"]), int(resume["iteration"]) + 1
        log(f"resumed after iteration {first - 1}")
    for it in range(first, cfg.iterations + 1):
        t0 = time.perf_counter()
        label = f"iteration {it}/{cfg.iterations}"
        with bar(progress, f"{label}: fitting each half-set", train.max_steps) as advance:
            fits = fit_halves(with_poses(p, pose), half, mine, train, pix, device, models,
                              advance, log)
        refs = {h: broadcast_object(half_reference(fits[mine.index(h)], cfg) if h in mine
                                    else None, owner[h]) for h in (1, 2)}
        t_fit = time.perf_counter() - t0
        new = pose.clone()
        row: dict = {"iteration": it, "fit_time_s": t_fit, "processes": world}
        with bar(progress, f"{label}: searching poses", len(p)) as advance:
            for h in (1, 2):
                idx = np.nonzero(half == h)[0]
                share = search_share(idx, cfg.batch_size, rank, world)
                got, score = search_half(p, share, refs[h], pose, start, cfg, 0.5 ** (it - 1),
                                         device, lambda n: advance(n * world))
                got, total = gather_rows(got, score, share, len(p), device)
                t = torch.from_numpy(idx)
                new.assign(t, got[t])
                r = refs[h]
                row[f"half_{h}"] = {
                    "limit_shell": r.limit_shell, "limit_A": p.box_size * pix / r.limit_shell,
                    "mean_score": total / len(idx), "heldout_regression": r.regression.tolist(),
                    "fit": r.stop_reason, "particles": len(idx),
                    **{f"median_{k}": float(np.median(np.abs(v)))
                       for k, v in pose_changes(pose[t], new[t]).items()}}
        row["search_time_s"] = time.perf_counter() - t0 - t_fit
        row["particles_per_s"] = len(p) / max(row["search_time_s"], 1e-9)
        history.append(row)
        log(f"{label}: fit {t_fit:.0f} s, search {row['search_time_s']:.0f} s "
            f"({row['particles_per_s']:.0f} particles/s, {world} process(es)); " + "; ".join(
                f"half-set {h}: {row[f'half_{h}']['fit']}; aligned to "
                f"{row[f'half_{h}']['limit_A']:.1f} Å, median change "
                f"{row[f'half_{h}']['median_angle_deg']:.2f}°, "
                f"{row[f'half_{h}']['median_shift_A']:.2f} Å, "
                f"{row[f'half_{h}']['median_defocus_A']:.0f} Å defocus" for h in (1, 2)))
        pose = new
        models = [GaussianMixture.from_raw(**refs[h].model) for h in (1, 2)]
        if checkpoint is not None and rank == 0:
            save_state(checkpoint, {"iteration": it, "history": history, "pose": pose.tensors(),
                                    "models": [refs[h].model for h in (1, 2)]})
        barrier()
    return pose, history, models
