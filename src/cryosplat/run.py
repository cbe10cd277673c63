"""One run folder: what ``backproject`` and ``reconstruct`` do (``demo`` and ``refine`` build on
it), without a terminal.

A run reads its particles (:class:`ParticleSource`), assigns the half-sets once, makes the
direct-inversion baseline (:func:`run_backprojection`; for a Gaussian run, the half-sets'
validation maps), trains (:func:`run_reconstruction`), evaluates once with
:func:`cryosplat.evaluate.evaluate_maps` and writes every output. Progress is passed in as a
:data:`ProgressFactory`; the command line gives rich bars, a library caller nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cryosplat.backproject import (Backprojection, Insertion, backproject, direct_maps,
                                   insert_particles)
from cryosplat.errors import InputError
from cryosplat.evaluate import evaluate_maps
from cryosplat.gaussians import model_images
from cryosplat.io import Particles, assign_half_sets, read_particles, read_volume
from cryosplat.io.mrc import read_map_like, write_maps
from cryosplat.io.atomic import atomic_path, write_json
from cryosplat.io.gaussians import write_pdb, write_ply
from cryosplat.postprocess.run import postprocess_half_maps
from cryosplat.mapviews import plot_map_views
from cryosplat.symmetry import symmetry_or_none
from cryosplat.report import (describe_cross_validated, embed_png, map_section, plot_montage,
                              plot_training, write_evaluation, write_page, write_report)
from cryosplat.train import (TrainConfig, barrier, check_batch_size, load_checkpoint,
                             rank_and_world, resolve_device, total_steps, train_gold_standard)
from cryosplat.train.volume import fit_gold_standard_volume, make_fits, split_held_out

Advance = Callable[..., None]  # advance(n, info="")
ProgressFactory = Callable[[str, int, int], AbstractContextManager[Advance]]


@contextmanager
def no_progress(description: str, total: int, completed: int = 0) -> Iterator[Advance]:
    """A :data:`ProgressFactory` that shows nothing."""
    yield lambda n, info="": None


@dataclass
class ParticleSource:
    """Where a run's particles come from, as the shared command-line options give it."""

    particles: str
    datadir: str | None = None
    poses: str | None = None
    ctf: str | None = None
    pixel_size: float | None = None
    box: int | None = None
    max_particles: int | None = None
    invert: bool = False
    amplitude_contrast: float | None = None

    def read(self, one_pixel_size: bool = True) -> Particles:
        """The particles; with ``one_pixel_size`` (every command but ``info``) optics groups
        of different pixel sizes or boxes are rescaled to one (:func:`read_particles`)."""
        return read_particles(self.particles, datadir=self.datadir, poses=self.poses,
                              ctf=self.ctf, pixel_size_A=self.pixel_size, box_size=self.box,
                              max_particles=self.max_particles, invert=self.invert,
                              amplitude_contrast=self.amplitude_contrast,
                              one_pixel_size=one_pixel_size)


@dataclass
class RunConfig(ParticleSource):
    """Everything a Gaussian reconstruction was asked to do (``config.json``); the command
    line's defaults are these."""

    truth: str | None = None
    mask: str | None = None
    device: str = "auto"
    validate: bool = True  # reconstruct each half-set directly, to cross-validate
    postprocess: bool = True  # sharpen the half-maps' average into out/postprocess
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return cls(**{**d, "train": TrainConfig(**d["train"])})


def load_run(folder: Path) -> tuple[RunConfig, dict]:
    """The configuration and last checkpoint of the reconstruct run in ``folder``."""
    for f in ("config.json", "checkpoint.pt"):
        if not (folder / f).is_file():
            raise InputError(folder / f, "missing: not a cryosplat reconstruct folder, or the run"
                                         " stopped before its first checkpoint")
    d = json.loads((folder / "config.json").read_text())
    if "refine" in d:
        raise InputError(folder / "config.json", "is a refine run's; continue it with cryosplat "
                                                  "refine --resume")
    return RunConfig.from_dict(d), load_checkpoint(folder / "checkpoint.pt")


def prepare_out_dir(out: Path, force: bool) -> Path:
    """Create ``out``; refuse to touch an existing non-empty folder without --force."""
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(out, "exists and is not empty; choose another --out or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _optional_map(path, p: Particles, what: str) -> torch.Tensor | None:
    return None if path is None else read_map_like(path, p.box_size, p.require_single_pixel_size(),
                                                   what)


def run_backprojection(p: Particles, out: Path, half: np.ndarray, truth=None, mask=None,
                       progress: ProgressFactory = no_progress,
                       label: str = "backprojecting",
                       insertions: tuple[Insertion, Insertion] | None = None,
                       symmetry: str = "C1") -> tuple[dict, Backprojection]:
    """Backproject ``p`` with half-sets ``half`` into out/ (maps, fsc.csv, fsc.png,
    map_views.png, summary.json, report.html), each half-set symmetrised by the point group
    ``symmetry``, or invert the half-sets' ``insertions`` when given (the first becomes their
    sum). Returns (the summary, the :class:`Backprojection`)."""
    pix = p.require_single_pixel_size()
    out.mkdir(parents=True, exist_ok=True)
    if insertions is not None:
        result = direct_maps(*insertions)
    else:
        with progress(label, len(p), 0) as advance:
            result = backproject(p, half, progress=advance,
                                 symmetry=symmetry_or_none(symmetry))
    write_maps(out, {"map": result.map, "half_map_1": result.half_map_1,
                      "half_map_2": result.half_map_2}, pix, "backprojection")
    e = evaluate_maps(result.half_map_1, result.half_map_2, pix, _optional_map(truth, p, "ground truth"),
                      mask=_optional_map(mask, p, "mask"), full_map=result.map)
    write_evaluation(out, e, p.box_size, pix, "direct Fourier inversion")
    plot_map_views(out / "map_views.png", result.map.numpy(), pix, title="map.mrc")
    summary = {"particles": len(p), "box_size": p.box_size, "pixel_size_A": pix,
               "symmetry": symmetry, **e.headline(), "resolutions_A": e.resolutions_A}
    write_json(out / "summary.json", summary)
    write_page(out, "cryosplat backproject", f"<p>{len(p)} particles, direct Fourier "
               f"inversion; half-maps {e.headline()['half_map_resolution_A']:.2f} Å at 0.143 "
               f"(unmasked).</p>{map_section(out, 'map.mrc')}<h2>FSC</h2>"
               f"{embed_png(out / 'fsc.png')}")
    return summary, result


def validation_references(p: Particles, out: Path, half: np.ndarray, truth, mask,
                          progress: ProgressFactory = no_progress,
                          insertions: tuple[Insertion, Insertion] | None = None,
                          symmetry: str = "C1"
                          ) -> tuple[dict, tuple[torch.Tensor, torch.Tensor]]:
    """The half-sets' direct reconstructions in out/backprojection, made once (a resumed run
    reads them back): the unbiased references of the cross-validated FSC, and the baseline.
    ``insertions``: the half-sets' insertions, when already made (the first is consumed;
    already symmetrised); else they are made with ``symmetry``."""
    folder = out / "backprojection"
    files = [folder / f"half_map_{i}.mrc" for i in (1, 2)] + [folder / "summary.json"]
    if all(f.is_file() for f in files):
        refs = tuple(torch.from_numpy(read_volume(f)[0]) for f in files[:2])
        return json.loads(files[2].read_text()), refs
    summary, result = run_backprojection(p, folder, half, truth, mask, progress,
                                         label="validation: direct inversion of each half-set",
                                         insertions=insertions, symmetry=symmetry)
    return summary, (result.half_map_1, result.half_map_2)


def start_reconstruction(config: RunConfig, out: Path, force: bool = False,
                         new: bool = True, shares_ranks: bool = False
                         ) -> tuple[Particles, np.ndarray]:
    """Read and check the particles of ``config`` and assign their half-sets (once for the
    whole run); for a ``new`` run, then make ``out`` (refusing a non-empty one without
    ``force``) and write config.json there. Every check comes before the folder is made.
    ``shares_ranks``: the caller divides the work between torchrun's processes itself (refine).
    Returns (the particles, the half-set of each)."""
    p = config.read()
    p.require_poses(), p.require_ctf(), p.check_images()
    half = assign_half_sets(p, config.train.seed)
    if config.train.objective == "images":
        check_batch_size(p, half, config.train)
    elif rank_and_world()[1] > 1 and not shares_ranks:
        raise InputError(None, "--objective volume fits each half-set in one process; "
                               "--nproc is for --objective images")
    elif min(int((half == h).sum()) for h in (1, 2)) < 2:
        raise InputError(p.source, f"each half-set needs at least 2 particles (one to fit, one "
                                   f"to hold out); they hold {int((half == 1).sum())} and "
                                   f"{int((half == 2).sum())}")
    if new and rank_and_world()[0] == 0:
        prepare_out_dir(out, force)
        if (out / "log.txt").exists():  # --force: a new run's log starts empty, the old is kept
            (out / "log.txt").replace(out / "log.previous.txt")
        write_json(out / "config.json", config.to_dict())
    barrier()
    return p, half


def run_reconstruction(p: Particles, half: np.ndarray, out: Path, config: RunConfig,
                       resume: dict | None = None, baseline: tuple[dict, tuple] | None = None,
                       progress: ProgressFactory = no_progress, extra: dict | None = None) -> dict:
    """Train the two half-set mixtures of ``config`` on half-sets ``half`` `(N,)` (1 or 2) and
    write every output into ``out``.

    With ``config.validate`` the half-sets are first reconstructed directly (or ``baseline``,
    a (summary, half-maps) pair made with the same half-sets, is used) to cross-validate the
    Gaussian maps' resolution. ``resume`` is a checkpoint to continue from. Under torchrun
    every rank calls this; rank 0 alone validates, logs and writes, and only it returns the
    summary (the others return {}). ``extra`` entries join the summary (and the report)."""
    cfg = config.train
    dev = resolve_device(config.device)
    rank, world = rank_and_world()
    lead = rank == 0
    pix = p.require_single_pixel_size()
    gt = _optional_map(config.truth, p, "ground truth")

    def log(msg: str) -> None:
        if lead:
            with open(out / "log.txt", "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")

    log(f"cryosplat reconstruct: {len(p)} particles, box {p.box_size}, {pix:.4f} Å, device {dev}, "
        f"{world} process(es), config {json.dumps(asdict(cfg))}")
    t_start = time.perf_counter()
    train = _fit_volume if cfg.objective == "volume" else _train_images  # TrainConfig checks
    trainers, history, trace, refs, baseline = train(p, half, out, config, dev, gt, resume,
                                                     baseline, progress, log)
    if not lead:
        return {}
    v1, v2 = trainers[0].volume(), trainers[1].volume()  # voxelised by the last evaluation
    sym = symmetry_or_none(cfg.symmetry)
    whole = [t.model.expanded(None if sym is None else sym.to(dev)) for t in trainers]
    write_maps(out, {"map": (v1 + v2) / 2, "half_map_1": v1, "half_map_2": v2}, pix, "output",
                f"; the mixtures' checkpoint is {out / 'checkpoint.pt'}")
    plot_map_views(out / "map_views.png", ((v1 + v2) / 2).numpy(), pix,
                   whole[0].means_A.detach().cpu().numpy(), "map.mrc")
    for i, (t, model) in enumerate(zip(trainers, whole), 1):  # .ply/.pdb: every copy
        write_ply(out / f"gaussians_half_{i}.ply", model.cpu(), p.box_size, pix)
        write_pdb(out / f"gaussians_half_{i}.pdb", model.cpu(), p.box_size, pix)
        with atomic_path(out / f"gaussians_half_{i}.pt") as tmp:  # the asymmetric unit
            torch.save(t.model.cpu().state_dict(), tmp)
        t.model.to(dev)
    e = evaluate_maps(v1, v2, pix, gt, refs, _optional_map(config.mask, p, "mask"))
    write_evaluation(out, e, p.box_size, pix, f"Gaussian mixture, {len(trainers[0].model)} and "
                                                f"{len(trainers[1].model)} Gaussians")
    if config.postprocess:
        pp = postprocess_half_maps(v1, v2, pix, _optional_map(config.mask, p, "mask"),
                                   out / "postprocess", "this run's half-maps (Gaussian "
                                   "mixtures)", log)
    plot_training(out / "loss.png", trace, history)
    idx = np.sort(np.random.default_rng(cfg.seed).choice(len(p), min(8, len(p)), replace=False))
    with torch.no_grad():
        renders = [model_images(whole[int(half[i]) - 1].to(dev),
                                p.rotations[i:i + 1].float().to(dev),
                                p.shifts_A[i:i + 1].float().to(dev), p.ctf[i:i + 1].to(dev),
                                p.box_size, pix, cfg.n_sigma, cfg.blur_px * pix)[0].cpu()
                   for i in idx]
    plot_montage(out / "montage.png", p.read_images(idx).numpy(), torch.stack(renders).numpy())
    summary = {"particles": len(p), "box_size": p.box_size, "pixel_size_A": pix,
               "device": str(dev), "processes": world, "steps": trainers[0].step,
               "train_time_s": history[-1]["time_s"],
               "wall_time_s": time.perf_counter() - t_start, **e.headline(),
               "resolutions_A": e.resolutions_A, "history": history,
               "gaussians": [len(t.model) for t in trainers], "objective": cfg.objective,
               "symmetry": cfg.symmetry}
    if cfg.objective == "volume":
        summary["stopped"] = [t.stop_reason for t in trainers]
    if baseline is not None:
        summary["backprojection"] = baseline[0]
    if config.postprocess:
        summary["postprocess"] = pp
    summary.update(extra or {})
    write_json(out / "summary.json", summary)
    summary["report"] = str(write_report(out, summary, config.to_dict()))
    cv = f"; cross-validated {describe_cross_validated(summary)}" if e.cross_validated else ""
    log(f"done: half-maps {summary['half_map_resolution_A']:.2f} Å{cv}; report {summary['report']}")
    return summary


def _train_images(p: Particles, half: np.ndarray, out: Path, config: RunConfig,
                  dev: torch.device, gt, resume, baseline, progress: ProgressFactory, log):
    """``objective="images"``: mini-batches of rendered particles (:mod:`cryosplat.train`).
    Returns (trainers, history, trace, validation references or None, baseline)."""
    cfg = config.train
    lead = rank_and_world()[0] == 0
    refs = None
    if config.validate and lead:
        baseline = baseline or validation_references(p, out, half, config.truth, config.mask,
                                                     progress)
        refs = baseline[1]
        log(f"validation maps (direct inversion of each half-set): half-maps "
            f"{baseline[0]['half_map_resolution_A']:.2f} Å")
    barrier()
    done0 = 0 if resume is None else 2 * cfg.batch_size * int(resume["halves"][0]["step"])
    bar = progress if lead else no_progress
    with bar("training", 2 * cfg.batch_size * total_steps(half, cfg), done0) as advance:
        t0, count = time.perf_counter(), [0]

        def on_step(n: int, losses: list[float]) -> None:
            count[0] += n
            rate = count[0] / max(time.perf_counter() - t0, 1e-9)
            advance(n, f"{rate:.0f} particles/s, loss {losses[0]:.4g} / {losses[1]:.4g}")

        try:
            trainers, history, trace = train_gold_standard(
                p, half, cfg, dev, checkpoint_path=out / "checkpoint.pt", resume=resume, truth=gt,
                progress=on_step, log=log, config=config.to_dict(), references=refs)
        except BaseException as e:
            log(f"stopped during training: {type(e).__name__}: {e}; the last checkpoint is "
                f"{out / 'checkpoint.pt'} (continue with --resume {out})")
            raise
    return trainers, history, trace, refs, baseline


def _fit_volume(p: Particles, half: np.ndarray, out: Path, config: RunConfig,
                dev: torch.device, gt, resume, baseline, progress: ProgressFactory, log):
    """``objective="volume"``: each half-set's mixture fitted to its accumulated Fourier sums
    (:mod:`cryosplat.train.volume`), seeded inside its own direct map
    (:mod:`cryosplat.train.seeding`) or at random. The insertions also give the validation
    maps. Returns (fits, history, trace, validation references or None, baseline)."""
    cfg = config.train
    pix = p.require_single_pixel_size()
    sym = symmetry_or_none(cfg.symmetry, dev)
    sets = [split_held_out(np.nonzero(half == h)[0], cfg.holdout_fraction, cfg.seed, h)
            for h in (1, 2)]
    ins: list[tuple[Insertion, Insertion | None]] = []
    with progress("inserting each half-set's particles", len(p), 0) as advance:
        try:
            for train, held in sets:
                ins.append((insert_particles(p, train, device=dev, progress=advance, symmetry=sym),
                            insert_particles(p, held, device=dev, progress=advance, symmetry=sym)
                            if len(held) else None))
        except BaseException as e:
            log(f"stopped while inserting the particles: {type(e).__name__}: {e}")
            raise
    fits = make_fits(ins, cfg, pix, dev, resume, out, log)
    for h, (train, held) in enumerate(sets, 1):
        log(f"half-set {h}: {len(train)} particles fitted, {len(held)} held out")
    refs = None
    if config.validate:
        if baseline is None:
            full = None
            if not (out / "backprojection" / "summary.json").is_file():  # else read back
                full = tuple(Insertion(t.numerator + (0 if o is None else o.numerator),
                                       t.denominator + (0 if o is None else o.denominator),
                                       t.box_size, t.padded_size) for t, o in ins)
            baseline = validation_references(p, out, half, config.truth, config.mask,
                                             progress, insertions=full, symmetry=cfg.symmetry)
        refs = baseline[1]
        log(f"validation maps (direct inversion of each half-set): half-maps "
            f"{baseline[0]['half_map_resolution_A']:.2f} Å")
    del ins
    history = trace = None
    if resume is not None:
        history, trace = list(resume["history"]), [list(r) for r in resume["trace"]]
        log(f"resumed at step {fits[0].step}")
    elapsed = history[-1]["time_s"] if history else 0.0
    with progress("fitting (stops on held-out loss)", cfg.max_steps, fits[0].step) as advance:
        def on_step(n: int, held: list[float]) -> None:
            advance(n, f"held-out loss {held[0]:.5g} / {held[1]:.5g}")

        try:
            history, trace = fit_gold_standard_volume(
                fits, cfg, gt, refs, out / "checkpoint.pt", history, trace, elapsed, on_step,
                log, config.to_dict())
        except BaseException as e:
            log(f"stopped during fitting: {type(e).__name__}: {e}; the last checkpoint is "
                f"{out / 'checkpoint.pt'} (continue with --resume {out})")
            raise
    return fits, history, trace, refs, baseline
