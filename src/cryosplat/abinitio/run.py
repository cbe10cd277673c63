"""One ``cryosplat abinitio`` run folder: the stochastic EM of :mod:`cryosplat.abinitio.loop`
on particles with CTF parameters only, then

- ``initial_model.mrc``: the mixture voxelised in the particles' own box and pixel;
- ``gaussians.ply`` / ``gaussians.pdb`` / ``gaussians.pt``: the mixture itself;
- ``particles.star``: a RELION 3.1 STAR of the input with the estimated rotations and origins
  and a random half-set split (rlnRandomSubset) for the refinement that follows;
- ``abinitio.png`` (the limit, the score and the loss per minibatch), ``orientations.png``
  (the viewing directions), ``map_views.png`` and ``report.html``;
- ``summary.json`` (:class:`~cryosplat.summary.AbinitioSummary`), ``log.txt``,
  ``config.json`` and ``abinitio_checkpoint.pt`` (after every minibatch; ``--resume``).

The hand of an ab initio map is undetermined: projections cannot tell a map from its mirror
image. ``--flip-hand`` writes the mirror image (:meth:`GaussianMixture.mirrored`) and the poses
that give the same projections (:func:`cryosplat.geometry.mirrored_rotations`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cryosplat.abinitio.config import AbinitioConfig
from cryosplat.abinitio.loop import AbinitioResult, check_particles, run_abinitio
from cryosplat.errors import InputError, stage
from cryosplat.geometry import mirrored_rotations
from cryosplat.io import assign_half_sets, write_volume
from cryosplat.io.atomic import write_json
from cryosplat.io.gaussians import write_pdb, write_ply
from cryosplat.io.refined_star import write_refined_star
from cryosplat.mapviews import plot_map_views
from cryosplat.progress import ProgressFactory, no_progress
from cryosplat.refine.loop import with_poses
from cryosplat.refine.search import Pose
from cryosplat.report import plot_abinitio, write_abinitio_report
from cryosplat.run import prepare_out_dir
from cryosplat.run_config import ParticleSource
from cryosplat.summary import AbinitioSummary
from cryosplat.symmetry import symmetry_or_none
from cryosplat.train import resolve_device
from cryosplat.train.checkpoint import load_state, save_state

CHECKPOINT = "abinitio_checkpoint.pt"


@dataclass
class AbinitioRunConfig(ParticleSource):
    """Everything an ab initio run was asked to do (``config.json``)."""

    device: str = "auto"
    flip_hand: bool = False
    abinitio: AbinitioConfig = field(default_factory=AbinitioConfig)

    def to_dict(self) -> dict:
        """``config.json``'s contents."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AbinitioRunConfig:
        """The configuration of a :meth:`to_dict`."""
        return cls(**{**d, "abinitio": AbinitioConfig.from_dict(d["abinitio"])})


def load_abinitio_run(folder: Path) -> tuple[AbinitioRunConfig, dict | None]:
    """The configuration of the ab initio run in ``folder`` and its last checkpoint (None when
    it stopped before the first minibatch)."""
    path = folder / "config.json"
    if not path.is_file():
        raise InputError(path, "missing: not a cryosplat abinitio folder")
    d = json.loads(path.read_text())
    if "abinitio" not in d:
        raise InputError(path, "is not an abinitio run's (no 'abinitio' settings)")
    ckpt = folder / CHECKPOINT
    return AbinitioRunConfig.from_dict(d), (load_state(ckpt) if ckpt.is_file() else None)


def run_abinitio_folder(config: AbinitioRunConfig, out: Path, force: bool = False,
                        resume: dict | None = None, new: bool = True,
                        progress: ProgressFactory = no_progress) -> AbinitioSummary:
    """Run ab initio on ``config``'s particles into ``out`` (module docstring). ``new``: make
    ``out`` (refusing a non-empty one without ``force``) and write config.json; ``resume``:
    the checkpoint of :func:`load_abinitio_run`. Every check of the input comes first."""
    p = config.read()
    cfg = config.abinitio
    check_particles(p, cfg)
    pix = p.require_single_pixel_size()
    p.check_images()
    symmetry_or_none(cfg.symmetry)  # an unknown group is refused before anything is written
    if new:
        prepare_out_dir(out, force)
        write_json(out / "config.json", config.to_dict())
    dev = resolve_device(config.device)

    def log(msg: str) -> None:
        with open(out / "log.txt", "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")

    ignored = p.rotations is not None
    log(f"cryosplat abinitio: {len(p)} particles, box {p.box_size} of {pix:g} Å, device {dev}"
        + ("; the poses in the file are ignored" if ignored else ""))
    t0 = time.perf_counter() - (resume["history"][-1]["elapsed_s"] if resume else 0.0)
    with stage("during ab initio", log, f"continue with --resume {out}"):
        result = run_abinitio(p, cfg, dev, log, progress, resume,
                              lambda state: save_state(out / CHECKPOINT, state))
    return write_outputs(config, out, p, pix, result, ignored, time.perf_counter() - t0, log)


def write_outputs(config: AbinitioRunConfig, out: Path, p, pix: float, result: AbinitioResult,
                  poses_ignored: bool, wall_s: float, log) -> AbinitioSummary:
    """Every file of the module docstring from a run's ``result``."""
    cfg = config.abinitio
    model, rotations = result.model.cpu(), result.rotations
    if config.flip_hand:
        model, rotations = model.mirrored(), mirrored_rotations(rotations)
    symmetry = symmetry_or_none(cfg.symmetry)
    with torch.no_grad():
        volume = model.voxelise(p.box_size, pix, symmetry, n_sigma=3.0)
    write_volume(out / "initial_model.mrc", volume, pix)
    expanded = model.expanded(symmetry)
    write_ply(out / "gaussians.ply", expanded, p.box_size, pix)
    write_pdb(out / "gaussians.pdb", expanded, p.box_size, pix)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
               out / "gaussians.pt")
    half = assign_half_sets(p, cfg.seed)
    pose = Pose(rotations, result.origins_A, torch.zeros(len(p), dtype=torch.float64))
    star = write_refined_star(out / "particles.star", with_poses(p, pose), half)
    history = [asdict(h) for h in result.history]
    plot_abinitio(out / "abinitio.png", out / "orientations.png", history, rotations.numpy())
    plot_map_views(out / "map_views.png", volume.numpy(), pix,
                   expanded.means_A.detach().numpy(), "ab initio model")
    summary = AbinitioSummary(
        particles=len(p), box_size=p.box_size, pixel_size_A=pix, working_box=result.box_size,
        working_pixel_A=result.pixel_size_A, final_resolution_A=cfg.final_resolution_A,
        symmetry=cfg.symmetry, gaussians=len(model), wall_time_s=wall_s,
        search_rate=result.search_rate, hand_flipped=config.flip_hand,
        poses_in_file_ignored=poses_ignored, history=history,
        outputs={"map": str(out / "initial_model.mrc"), "particles_star": str(star),
                 "gaussians": str(out / "gaussians.ply"), "report": str(out / "report.html")})
    write_json(out / "summary.json", summary.to_json())
    write_abinitio_report(out, summary)
    log(f"done in {wall_s:.0f} s: {out / 'initial_model.mrc'}, {star}; median best score "
        f"{float(np.median(result.score.numpy())):.4g}")
    return summary
