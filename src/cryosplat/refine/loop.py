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
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from cryosplat.backproject import insert_particles
from cryosplat.errors import InputError
from cryosplat.gaussians import GaussianMixture
from cryosplat.geometry import rotation_angle_deg
from cryosplat.io import Particles
from cryosplat.io.atomic import atomic_path
from cryosplat.refine.search import (Pose, SearchConfig, alignment_limit, alignment_points,
                                     as_sampled, refine_batch)
from cryosplat.train.config import TrainConfig
from cryosplat.train.volume import (HalfSetVolumeFit, PaddedTransform, fit_gold_standard_volume,
                                    make_fits, split_held_out)


@dataclass
class RefineConfig:
    """Settings of ``cryosplat refine`` beyond reconstruct's (``config.json``'s ``refine``)."""

    iterations: int = 2  # a third moved 4AKE (SNR 0.05) particles by a median 0.3°: noise
    batch_size: int = 64  # particles searched at once
    max_resolution_A: float = 0.0  # the finest resolution used to align; 0: each half-set's
    # own limit (:func:`cryosplat.refine.search.alignment_limit`)
    search: SearchConfig = field(default_factory=SearchConfig)

    def __post_init__(self) -> None:
        """Refuse settings that cannot run, naming the command-line option."""
        c = self.search
        for option, value in (("--iterations", self.iterations), ("--max-angle", c.max_angle_deg),
                              ("--max-shift", c.max_shift_A), ("--max-defocus", c.max_defocus_A)):
            if not value > 0:
                raise InputError(None, f"{option} {value:g}: expected a positive value")
        if not self.max_resolution_A >= 0:
            raise InputError(None, f"--max-resolution {self.max_resolution_A:g}: expected Å, "
                                   "or 0 for each half-set's own limit")

    @classmethod
    def from_dict(cls, d: dict) -> "RefineConfig":
        return cls(**{**d, "search": SearchConfig(**d["search"])})


def with_poses(p: Particles, pose: Pose) -> Particles:
    """``p`` with the rotations, origins and defocus changes of ``pose`` (all `N` rows)."""
    change = pose.defocus_change_A.to(p.ctf.defocus_u_A.dtype)
    ctf = replace(p.ctf, defocus_u_A=p.ctf.defocus_u_A + change,
                  defocus_v_A=p.ctf.defocus_v_A + change)
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


def search_half(p: Particles, indices: np.ndarray, fit: HalfSetVolumeFit, pose: Pose,
                start: Pose, cfg: RefineConfig, scale: float, device: torch.device,
                advance: Callable[[int], None]) -> tuple[Pose, dict]:
    """Search the particles ``indices`` of one half-set against its fitted mixture ``fit``.
    Returns (their new poses, the half-set's statistics: alignment limit, mean score)."""
    d, pix = p.box_size, fit.pix
    with torch.no_grad():
        vox = fit.volume().to(device)
        shell, r = alignment_limit(fit.objective.transform(vox), fit.held_out or fit.objective)
        volume = as_sampled(PaddedTransform(d, 2 * d, -1, device)(vox))
    if cfg.max_resolution_A > 0:
        shell = min(shell, max(3, int(d * pix / cfg.max_resolution_A)))
    points = alignment_points(d, shell, device)
    ctf = p.require_ctf()
    out, score = [], []
    for s in range(0, len(indices), cfg.batch_size):
        idx = indices[s:s + cfg.batch_size]
        t = torch.from_numpy(idx)
        images = p.read_images(idx).to(device)
        f = torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1))).reshape(len(idx), -1)
        batch = pose[t]
        new, sc = refine_batch(volume, f[:, points.flat], ctf[t].to(device, torch.float32),
                               batch.to(device, torch.float32),
                               start[t].to(device, torch.float32), points, pix,
                               cfg.search, scale)
        out.append(new.to("cpu", torch.float64))
        score.append(sc.cpu())
        advance(len(idx))
    new = Pose.cat(out)
    return new, {"limit_shell": shell, "limit_A": d * pix / shell,
                 "mean_score": float(torch.cat(score).mean()), "heldout_regression": r.tolist()}


def fit_halves(p: Particles, half: np.ndarray, train: TrainConfig, pix: float,
               device: torch.device, models: list[GaussianMixture] | None,
               log: Callable[[str], None], progress: Callable | None, out: Path | None
               ) -> list[HalfSetVolumeFit]:
    """Each half-set's mixture fitted to its own particles at the poses of ``p``: seeded in
    its own support (``models`` None) or continued from ``models``."""
    ins = []
    for h in (1, 2):
        tr, held = split_held_out(np.nonzero(half == h)[0], train.holdout_fraction, train.seed, h)
        ins.append((insert_particles(p, tr, device=device),
                    insert_particles(p, held, device=device) if len(held) else None))
    if models is None:
        fits = make_fits(ins, train, pix, device, out=None, log=log)
    else:
        fits = [HalfSetVolumeFit(m, tr, held, train, h, pix, device)
                for h, (m, (tr, held)) in enumerate(zip(models, ins), 1)]
    fit_gold_standard_volume(fits, train, progress=progress, log=log)
    for f in fits:
        log(f"half-set {f.half}: {f.stop_reason}")
    return fits


def refine_gold_standard(p: Particles, half: np.ndarray, train: TrainConfig, cfg: RefineConfig,
                         device: torch.device, checkpoint: Path | None = None,
                         resume: dict | None = None, log: Callable[[str], None] = print,
                         progress=None) -> tuple[Pose, list[dict], list[GaussianMixture]]:
    """Alternate fits and searches for ``cfg.iterations`` iterations (module docstring).

    ``progress(description, total, completed)`` is a :data:`cryosplat.run.ProgressFactory`
    or None. Returns (the refined poses of all `N` particles, one statistics row per
    iteration, the half-sets' mixtures of the last iteration)."""
    pix = p.require_single_pixel_size()
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
        with _bar(progress, f"{label}: fitting each half-set", train.max_steps) as advance:
            fits = fit_halves(with_poses(p, pose), half, train, pix, device, models, log,
                              lambda n, held: advance(n), None)
        t_fit = time.perf_counter() - t0
        new = pose.clone()
        row: dict = {"iteration": it, "fit_time_s": t_fit}
        with _bar(progress, f"{label}: searching poses", len(p)) as advance:
            for h, fit in enumerate(fits, 1):
                idx = np.nonzero(half == h)[0]
                t = torch.from_numpy(idx)
                got, stats = search_half(p, idx, fit, pose, start, cfg, 0.5 ** (it - 1),
                                         device, advance)
                new.assign(t, got)
                row[f"half_{h}"] = {**stats, "particles": len(idx),
                                    **{f"median_{k}": float(np.median(np.abs(v)))
                                       for k, v in pose_changes(pose[t], got).items()}}
        row["search_time_s"] = time.perf_counter() - t0 - t_fit
        row["particles_per_s"] = len(p) / max(row["search_time_s"], 1e-9)
        history.append(row)
        log(f"{label}: fit {t_fit:.0f} s, search {row['search_time_s']:.0f} s "
            f"({row['particles_per_s']:.0f} particles/s); " + "; ".join(
                f"half-set {h}: aligned to {row[f'half_{h}']['limit_A']:.1f} Å, median change "
                f"{row[f'half_{h}']['median_angle_deg']:.2f}°, "
                f"{row[f'half_{h}']['median_shift_A']:.2f} Å, "
                f"{row[f'half_{h}']['median_defocus_A']:.0f} Å defocus" for h in (1, 2)))
        pose, models = new, [f.model.cpu() for f in fits]
        if checkpoint is not None:
            with atomic_path(checkpoint) as tmp:
                torch.save({"iteration": it, "history": history,
                            "pose": pose.tensors(),
                            "models": [m.state_dict() for m in models]}, tmp)
    return pose, history, models


def _bar(progress, description: str, total: int):
    if progress is None:
        return nullcontext(lambda n, info="": None)
    return progress(description, total, 0)
