"""One ``cryosplat refine`` run folder: the alternation of :mod:`cryosplat.refine.loop`, then
``DIR/particles.star`` with the refined poses, ``pose_changes.png``, and the maps, FSC curves
and report of a reconstruction from the refined poses (:func:`cryosplat.run.run_reconstruction`,
which also makes the validation maps by direct inversion with the refined poses)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from cryosplat.errors import InputError, stage
from cryosplat.io import Particles
from cryosplat.io.atomic import write_json
from cryosplat.io.refined_star import write_refined_star
from cryosplat.progress import ProgressFactory, no_progress
from cryosplat.refine.global_refine import check_global, global_refine
from cryosplat.refine.loop import (
    RefineConfig,
    input_pose,
    pose_changes,
    refine_gold_standard,
    with_poses,
)
from cryosplat.refine.search import Pose
from cryosplat.report import plot_global_stage, plot_pose_changes
from cryosplat.run import run_reconstruction, start_reconstruction
from cryosplat.run_config import RunConfig
from cryosplat.summary import RunSummary
from cryosplat.symmetry import symmetry_or_none
from cryosplat.train import TrainConfig, rank_and_world, resolve_device
from cryosplat.train.checkpoint import load_state, save_state
from cryosplat.train.distributed import leave_group

CHECKPOINT = "refine_checkpoint.pt"
GLOBAL_CHECKPOINT = "global_checkpoint.pt"


@dataclass
class RefineRunConfig(RunConfig):
    """Everything a refinement was asked to do (``config.json``)."""

    refine: RefineConfig = field(default_factory=RefineConfig)

    @classmethod
    def from_dict(cls, d: dict) -> RefineRunConfig:
        """The configuration of a refine folder's ``config.json``."""
        return cls(**{**d, "train": TrainConfig(**d["train"]),
                      "refine": RefineConfig.from_dict(d["refine"])})


def load_refine_run(folder: Path) -> tuple[RefineRunConfig, dict | None]:
    """The configuration of the refine run in ``folder`` and its last iteration's checkpoint
    (None when it stopped before the first)."""
    if not (folder / "config.json").is_file():
        raise InputError(folder / "config.json", "missing: not a cryosplat refine folder")
    d = json.loads((folder / "config.json").read_text())
    if "refine" not in d:
        raise InputError(folder / "config.json", "is a reconstruct run's; continue it with "
                                                  "cryosplat reconstruct --resume")
    ckpt = folder / CHECKPOINT
    state = load_state(ckpt) if ckpt.is_file() else None
    return RefineRunConfig.from_dict(d), state


def run_refinement(config: RefineRunConfig, out: Path, force: bool = False,
                   resume: dict | None = None, new: bool = True,
                   progress: ProgressFactory = no_progress) -> RunSummary | None:
    """Refine the particles of ``config`` into ``out`` (module docstring). ``new``: make
    ``out`` (refusing a non-empty one without ``force``); ``resume``: the checkpoint of
    :func:`load_refine_run`. Returns the final reconstruction's
    :class:`~cryosplat.summary.RunSummary`, with its ``refinement`` (per iteration, and the
    changes from the input poses).

    Under torchrun every process calls it and shares the searches
    (:func:`~cryosplat.refine.loop.refine_gold_standard`); then rank 0 alone writes the outputs
    and reconstructs, and the others return None."""
    gcfg = config.refine.global_search
    p, half = start_reconstruction(config, out, force, new=new, shares_ranks=True,
                                   needs_poses=gcfg is None,
                                   check=None if gcfg is None else partial(check_global,
                                                                           cfg=gcfg))
    lead = rank_and_world()[0] == 0
    stale = out / "backprojection"  # validation maps of an earlier run into this folder
    if new and lead and stale.is_dir():
        shutil.rmtree(stale)
    dev = resolve_device(config.device)

    def log(msg: str) -> None:
        if not lead:
            return
        with open(out / "log.txt", "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")

    log(f"cryosplat refine: {len(p)} particles, box {p.box_size}, device {dev}, "
        f"{rank_and_world()[1]} process(es), refine {json.dumps(config.to_dict()['refine'])}")
    t0 = time.perf_counter()
    stage_record = None
    if gcfg is not None:
        with stage("during the global stage", log, f"continue with --resume {out}"):
            p, stage_record = global_stage(p, half, config, out, new, dev, log, progress)
    history: list[dict] = []
    with stage("during refinement", log, f"continue with --resume {out}"):
        if config.refine.iterations > 0:
            pose, history, _ = refine_gold_standard(p, half, config.train, config.refine, dev,
                                                    out / CHECKPOINT, resume, log, progress)
        else:
            pose = input_pose(p)
    leave_group()  # the final reconstruction fits each half-set in one process: rank 0's
    if not lead:
        return None
    refined = with_poses(p, pose)
    star = write_refined_star(out / "particles.star", refined, half)
    changes = pose_changes(input_pose(p), pose)
    if history:
        plot_pose_changes(out / "pose_changes.png", changes, half, history)
    refinement = {"iterations": history, "particles_star": str(star),
                  "refine_time_s": time.perf_counter() - t0,
                  "median_change_from_input": {k: float(np.median(np.abs(v)))
                                               for k, v in changes.items()}}
    if stage_record is not None:
        refinement["global_stage"] = stage_record
    log(f"refined poses written to {star}; reconstructing from them")
    summary = run_reconstruction(refined, half, out, config, progress=progress,
                                 refinement=refinement)
    if summary is not None:  # the whole refinement's time, not the final reconstruction's
        summary.wall_time_s = time.perf_counter() - t0
        write_json(out / "summary.json", summary.to_json())
    return summary


def global_stage(p: Particles, half: np.ndarray, config: RefineRunConfig, out: Path, new: bool,
                 device: torch.device, log, progress: ProgressFactory
                 ) -> tuple[Particles, dict]:
    """The global stage (:func:`~cryosplat.refine.global_refine.global_refine`) of a
    ``refine --global`` run: ``p`` with its poses, and the stage's record for the summary.
    Checkpointed after every iteration in ``DIR/global_checkpoint.pt`` (a resumed run
    continues it, or reads its poses when it was done); writes ``DIR/global_poses.star`` and
    ``DIR/global_stage.png``."""
    gcfg = config.refine.global_search
    assert gcfg is not None
    if rank_and_world()[1] > 1:
        raise InputError(None, "--global runs in one process: drop --nproc")
    ckpt = out / GLOBAL_CHECKPOINT
    state = load_state(ckpt) if not new and ckpt.is_file() else None
    if p.rotations is not None:
        log("the poses in the particle file are not read: --global searches all of them")
    t0 = time.perf_counter()
    res = global_refine(p, half, gcfg, symmetry_or_none(config.train.symmetry, device), device,
                        log, progress, state, lambda st: save_state(ckpt, st))
    posed = with_poses(p, Pose(res.rotations, res.origins_A,
                               torch.zeros(len(p), dtype=torch.float64)))
    star = write_refined_star(out / "global_poses.star", posed, half)
    plot_global_stage(out / "global_stage.png", [asdict(h) for h in res.history])
    log(f"global stage: poses written to {star}")
    return posed, {"history": [asdict(h) for h in res.history], "working_box": res.box_size,
                   "working_pixel_A": res.pixel_size_A, "search_rate": res.search_rate,
                   "time_s": time.perf_counter() - t0, "reference": gcfg.reference,
                   "poses_star": str(star)}
