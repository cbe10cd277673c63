"""Ab initio on data nobody tuned on (issue 30): the poses of suite datasets are discarded,
``cryosplat abinitio`` runs with defaults from several seeds, and each result is scored against
the truth.

For each dataset (simulated as ``suite.py`` does, or reused from a suite --workdir) and seed:

1. ``cryosplat abinitio STAR --out W/NAME/abinitio_sSEED --seed SEED`` (it never reads the
   poses; wall time and peak RSS);
2. the estimated poses are aligned to the true ones by one global rotation ``Q`` (``est = true
   Q``, the SVD of ``sum true^T est``), the hand (the mirrored poses ``F A F`` tried too) and
   one translation of the map (least squares of the origins' differences), and for a
   (pseudo-)symmetric molecule its 2-fold (:func:`modulo_two_fold`): the truth is used only
   for this scoring;
3. the angular error of every particle after that alignment (median, 90th percentile, the
   share within 10°), and converged = median within 10°;
3b. with ``--chain``: ``cryosplat refine STAR --global --ref abinitio_sSEED/initial_model.mrc``
   with defaults (the global stage, local refinement, reconstruction), its poses scored the
   same way after the global stage and at the end, its map rebuilt from its aligned poses;
4. with ``--reconstruct``: ``cryosplat reconstruct`` from the aligned poses (the map in the
   truth's frame and hand, no interpolation) and its FSC against the truth, beside
   ``reconstruct`` from the true poses (the suite's, when its folder is there).

    .venv/bin/python benchmarks/abinitio.py [--datasets NAME ...] [--seeds 0 1 2 3 4]
        [--workdir DIR] [--reconstruct] [--chain] [--reuse] [--out benchmarks/results]

Writes abinitio.json and prints one line per run.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import mrcfile
import numpy as np
import torch
from suite import DATASETS, simulate

from _results import crossings, machine, run_child, truth_fsc, write_json
from cryosplat.geometry import (
    axis_angle_to_matrix,
    matrix_to_axis_angle,
    mirrored_rotations,
    rotation_angle_deg,
)
from cryosplat.io import read_particles
from cryosplat.io.refined_star import write_refined_star
from cryosplat.refine.loop import with_poses
from cryosplat.refine.search import Pose
from cryosplat.summary import AbinitioSummary, RunSummary

DEFAULT = ["4ake-demo", "4ake-rp-snr05", "4ake-rp-snr02", "4e43-rp-10k", "3kpr-5k"]


def aligned(true_rot: torch.Tensor, true_org: torch.Tensor, est_rot: torch.Tensor,
            est_org: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(aligned rotations, aligned origins, angular errors °, hand flipped, share at a 2-fold
    mate) of estimated poses against the true ones (module docstring, step 2;
    :func:`modulo_two_fold`)."""
    best = None
    for flipped in (False, True):
        cand = mirrored_rotations(est_rot) if flipped else est_rot
        u, _, vh = torch.linalg.svd((true_rot.transpose(1, 2) @ cand).sum(0))
        q = u @ torch.diag(torch.tensor([1.0, 1.0, float(torch.det(u @ vh))],
                                        dtype=torch.float64)) @ vh
        rot = cand @ q.T
        err = rotation_angle_deg(rot, true_rot)
        if best is None or err.median() < best[1].median():
            best = (rot, err, flipped)
    assert best is not None
    rot, err, flipped = best
    err, mates = modulo_two_fold(true_rot, rot, err)
    m = rot[:, :2, :]  # an offset t of the map moves each origin by (A t)_xy, either sign
    t = torch.linalg.lstsq(m.reshape(-1, 3), (est_org - true_org).reshape(-1, 1)).solution
    return rot, est_org - (m @ t)[..., 0], err, flipped, mates


def modulo_two_fold(true_rot: torch.Tensor, rot: torch.Tensor, err: torch.Tensor
                    ) -> tuple[torch.Tensor, float]:
    """For a (pseudo-)symmetric molecule: when over 10% of the aligned poses are about 180°
    off around one consistent axis (the molecule's own 2-fold, found from the data: 4E43 is a
    C2 dimer), the error of a pose at that mate is measured from the mate (``true S``, ``S``
    the 180° turn). Returns (errors, the share at the mate). The poses themselves are not
    changed: mapping them back without the shift the axis needs (it need not pass through
    the box centre) ruined the map (4e43-rp-10k: mean FSC 0.146 against 0.741 unmapped)."""
    rel = matrix_to_axis_angle(true_rot.transpose(1, 2) @ rot)  # rot = true S
    far = rel.norm(dim=-1) > math.radians(150)
    if float(far.double().mean()) < 0.1:
        return err, 0.0
    axes = rel[far] / rel[far].norm(dim=-1, keepdim=True)
    axes = axes * torch.sign(axes @ axes[0])[:, None]
    axis = axes.mean(0)
    if float(axis.norm()) < 0.9:  # no one axis: not a 2-fold
        return err, 0.0
    turn = axis_angle_to_matrix(axis / axis.norm() * math.pi)
    err2 = rotation_angle_deg(rot, true_rot @ turn)
    return torch.minimum(err, err2), float((err2 < err).double().mean())


def score_map(est, rot: torch.Tensor, org: torch.Tensor, folder: Path, truth_path: Path,
              truth: torch.Tensor, ds, cs: list[str], env: dict) -> dict:
    """``cryosplat reconstruct`` from poses aligned to the truth (the map in the truth's frame
    and hand, no interpolation) and its FSC against the truth."""
    half = est.half_set.numpy().astype(np.int64)
    aligned_star = write_refined_star(folder / "aligned_to_truth.star", with_poses(
        est, Pose(rot, org, torch.zeros(len(est), dtype=torch.float64))), half)
    rec = folder / "reconstruct_aligned"
    _, rwall, _ = run_child([*cs, "reconstruct", str(aligned_star), "--out", str(rec),
                             "--truth", str(truth_path), "--force"], env)
    curve = truth_fsc(rec / "map.mrc", truth)
    return {**crossings(curve, ds.box, ds.pixel_size_A), "mean_fsc": float(curve[1:].mean()),
            "wall_s": rwall}


def chain(star: Path, abinitio: Path, out: Path, true_p, truth_path: Path, truth: torch.Tensor,
          ds, cs: list[str], env: dict, reuse: bool) -> dict:
    """``cryosplat refine STAR --global --ref ABINITIO/initial_model.mrc`` with defaults, its
    poses after the global stage and at the end scored against the truth, and its map (made
    again from its final poses aligned to the truth: :func:`score_map`)."""
    if reuse and (out / "summary.json").is_file():
        wall, rss = RunSummary.read(out / "summary.json").wall_time_s, float("nan")
    else:
        _, wall, rss = run_child([*cs, "refine", str(star), "--global", "--ref",
                                  str(abinitio / "initial_model.mrc"), "--out", str(out),
                                  "--force"], env)
    g = read_particles(out / "global_poses.star")
    ge = aligned(true_p.rotations, true_p.shifts_A, g.rotations, g.shifts_A)[2].numpy()
    est = read_particles(out / "particles.star")
    rot, org, err, flipped, mates = aligned(true_p.rotations, true_p.shifts_A, est.rotations,
                                            est.shifts_A)
    e = err.numpy()
    stage = RunSummary.read(out / "summary.json").refinement["global_stage"]
    return {"wall_s": wall, "refine_wall_s": wall, "peak_rss_MiB": rss,
            "global_stage_s": stage["time_s"], "search_rate": stage["search_rate"],
            "global_median_deg": float(np.median(ge)),
            "global_within_10_deg": float((ge < 10).mean()),
            "median_error_deg": float(np.median(e)), "p90_error_deg": float(np.percentile(e, 90)),
            "within_10_deg": float((e < 10).mean()), "share_at_two_fold_mate": mates,
            "converged": bool(np.median(e) < 10),
            "map": score_map(est, rot, org, out, truth_path, truth, ds, cs, env)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", nargs="+", choices=[d.name for d in DATASETS], default=DEFAULT)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None, help="Keep (or reuse) the data here")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "cryosplat-suite")
    ap.add_argument("--reconstruct", action="store_true",
                    help="Also reconstruct from the aligned poses and from the true ones")
    ap.add_argument("--chain", action="store_true", help="Then refine --global --ref the "
                    "initial model (the whole chain) and score its poses and map as well")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--reuse", action="store_true", help="Score the abinitio folders already "
                    "in --workdir instead of running them again (wall time from summary.json)")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    work = args.workdir or Path(tmp.name)
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cs = [sys.executable, "-m", "cryosplat"]
    result = {**machine(), "threads": args.threads, "runs": []}
    for ds in (d for d in DATASETS if d.name in args.datasets):
        d = work / ds.name
        sim = d / "sim"
        star = sim / ("relion.star" if ds.simulator == "relion_project" else "particles.star")
        truth_path = sim / "ground_truth.mrc"
        if not (star.is_file() and truth_path.is_file()):
            row, star, truth_path = simulate(ds, work, args.cache, env)
            if "skipped" in row:
                print(f"{ds.name}: skipped ({row['skipped']})")
                continue
        true_star = sim / ("particles_true.star" if (sim / "particles_true.star").is_file()
                           else "particles.star")
        truth = torch.from_numpy(mrcfile.read(truth_path).copy())
        true_p = read_particles(true_star)
        reference = None
        if args.reconstruct or args.chain:
            rec = d / "reconstruct"
            if not (rec / "summary.json").is_file():
                run_child([*cs, "reconstruct", str(star), "--out", str(rec), "--truth",
                           str(truth_path), "--force"], env)
            reference = {**crossings(truth_fsc(rec / "map.mrc", truth), ds.box,
                                     ds.pixel_size_A),
                         "mean_fsc": float(truth_fsc(rec / "map.mrc", truth)[1:].mean()),
                         "wall_s": RunSummary.read(rec / "summary.json").wall_time_s}
        for seed in args.seeds:
            out = d / f"abinitio_s{seed}"
            if args.reuse and (out / "summary.json").is_file():
                s = AbinitioSummary.read(out / "summary.json")
                wall, rss = s.wall_time_s, float("nan")
            else:
                _, wall, rss = run_child([*cs, "abinitio", str(star), "--out", str(out),
                                          "--seed", str(seed), "--force"], env)
                s = AbinitioSummary.read(out / "summary.json")
            est = read_particles(out / "particles.star")
            rot, org, err, flipped, mates = aligned(true_p.rotations, true_p.shifts_A,
                                                    est.rotations, est.shifts_A)
            e = err.numpy()
            run = {"dataset": ds.name, "seed": seed, "wall_s": wall, "peak_rss_MiB": rss,
                   "working_box": s.working_box, "final_resolution_A": s.final_resolution_A,
                   "search_rate": s.search_rate, "hand_flipped_vs_truth": flipped,
                   "share_at_two_fold_mate": mates,
                   "median_error_deg": float(np.median(e)),
                   "p90_error_deg": float(np.percentile(e, 90)),
                   "within_10_deg": float((e < 10).mean()),
                   "converged": bool(np.median(e) < 10)}
            if args.reconstruct:
                run["reconstruct_from_abinitio"] = score_map(est, rot, org, out, truth_path,
                                                             truth, ds, cs, env)
            run["reconstruct_from_true_poses"] = reference
            if args.chain:
                run["chain"] = chain(star, out, d / f"chain_s{seed}", true_p, truth_path, truth,
                                     ds, cs, env, args.reuse)
                run["chain"]["wall_s"] += wall
                # against a reconstruct of the same particles timed in this run (the map's)
                run["chain"]["time_vs_reconstruct"] = (run["chain"]["wall_s"]
                                                       / run["chain"]["map"]["wall_s"])
            result["runs"].append(run)
            line = (f"{ds.name:14} seed {seed}: {wall:6.0f} s, "
                    + (f"{100 * mates:.0f}% at the 2-fold mate, " if mates else "")
                    + "median error "
                    f"{run['median_error_deg']:6.2f}°, 90% {run['p90_error_deg']:6.2f}°, "
                    f"{100 * run['within_10_deg']:5.1f}% within 10°, "
                    f"{'converged' if run['converged'] else 'NOT converged'}")
            if args.reconstruct:
                a, r = run["reconstruct_from_abinitio"], reference
                line += (f"; map from these poses {a['0.5']:.2f} Å (mean FSC {a['mean_fsc']:.3f})"
                         f" vs true poses {r['0.5']:.2f} Å ({r['mean_fsc']:.3f})")
            if args.chain:
                c = run["chain"]
                line += (f"; chain {c['wall_s']:.0f} s: global stage {c['global_median_deg']:.2f}°"
                         f", final {c['median_error_deg']:.2f}° (90% {c['p90_error_deg']:.2f}°), "
                         f"map {c['map']['0.5']:.2f} Å (mean FSC {c['map']['mean_fsc']:.3f})")
            print(line, flush=True)
            write_json(result, args.out, "abinitio.json")
    runs = result["runs"]
    if runs:
        print(f"converged: {sum(r['converged'] for r in runs)} of {len(runs)} runs")


if __name__ == "__main__":
    main()
