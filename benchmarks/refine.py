"""``cryosplat refine`` on simulated data whose true poses are known (issue 18).

For each dataset (a folder with ``particles.star`` holding the true poses and
``ground_truth.mrc``, e.g. one of benchmarks/suite.py's ``sim`` folders), it takes the
particles ``relion_project`` made where the folder has them (``relion.star``, same poses and
CTF; suite.py's relion_project datasets), else ``particles.star`` (``cryosplat simulate``'s
images), and writes a copy of that STAR with every particle's pose perturbed by a random
rotation of 2-5 degrees, an origin move of 1-2 Å and a defocus change of 200-500 Å (U and V
together; seeded), then runs, each as its own process with ``--threads`` threads:

1. ``cryosplat reconstruct`` from the true poses (the target map);
2. ``cryosplat reconstruct`` from the perturbed poses (the damage);
3. ``cryosplat refine`` from the perturbed poses;
4. ``cryosplat refine`` from the true poses (it must do no harm);
5. with ``--nproc N`` (N > 1), ``cryosplat refine --nproc N`` from the perturbed poses, each
   process with ``--threads / N`` threads (the same cores, shared by processes).

It reports the median angular, origin and defocus errors against the truth before and after
refinement, each map's FSC against the ground truth (0.5 and 0.143 crossings, and the mean
FSC), the shells between the refined and the true-pose maps, the wall times and the search
speed (particles/s per iteration). Writes ``refine_<device>.json``.

    .venv/bin/python benchmarks/refine.py SIM_DIR [SIM_DIR ...] [--particles N]
        [--threads 2] [--nproc 1] [--no-exact] [--workdir DIR] [--out benchmarks/results]
        [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import starfile
import torch

from _results import crossings, machine, run_child, shells, truth_fsc, write_json
from cryosplat import geometry
from cryosplat.io import read_particles, read_volume
from cryosplat.summary import Headline, RunSummary


def perturb(src: Path, dst: Path, seed: int = 0) -> None:
    """Copy the STAR ``src`` to ``dst`` with the poses perturbed (module docstring)."""
    blocks = starfile.read(src, always_dict=True)
    df = blocks["particles"]
    n = len(df)
    g = torch.Generator().manual_seed(seed)
    cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    rot = geometry.euler_relion_to_matrix(torch.tensor(df[cols].to_numpy()))
    axis = torch.randn(n, 3, generator=g, dtype=torch.float64)
    axis /= axis.norm(dim=-1, keepdim=True)
    angle = torch.deg2rad(2 + 3 * torch.rand(n, generator=g, dtype=torch.float64))
    euler = geometry.matrix_to_euler_relion(geometry.axis_angle_to_matrix(axis * angle[:, None])
                                            @ rot).numpy()
    for i, c in enumerate(cols):
        df[c] = euler[:, i]
    phi = 2 * np.pi * torch.rand(n, generator=g, dtype=torch.float64).numpy()
    move = 1 + torch.rand(n, generator=g, dtype=torch.float64).numpy()
    df["rlnOriginXAngst"] += np.cos(phi) * move
    df["rlnOriginYAngst"] += np.sin(phi) * move
    sign = np.where(torch.rand(n, generator=g).numpy() < 0.5, -1.0, 1.0)
    change = (200 + 300 * torch.rand(n, generator=g, dtype=torch.float64).numpy()) * sign
    df["rlnDefocusU"] += change
    df["rlnDefocusV"] += change
    starfile.write(blocks, dst, float_format="%.6f")


def errors(star: Path, truth_star: Path, n: int) -> dict:
    """Median errors of ``star``'s poses against ``truth_star``'s (first ``n`` rows)."""
    a, t = read_particles(star).first(n), read_particles(truth_star).first(n)
    return {"angle_deg": float(geometry.rotation_angle_deg(a.rotations, t.rotations).median()),
            "origin_A": float((a.shifts_A - t.shifts_A).norm(dim=-1).median()),
            "defocus_A": float((a.ctf.defocus_u_A - t.ctf.defocus_u_A).abs().median())}


def map_figures(folder: Path, truth: torch.Tensor, box: int, pix: float) -> dict:
    curve = truth_fsc(folder / "map.mrc", truth).numpy()
    s = Headline.from_json(json.loads((folder / "summary.json").read_text()))
    return {**crossings(curve, box, pix), "mean_fsc": float(np.mean(curve[1:])),
            "half_map_A": s.half_map_resolution_A, "fsc_truth": [float(c) for c in curve]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("datasets", nargs="+", type=Path)
    ap.add_argument("--particles", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--no-exact", action="store_true", help="skip refine from the true poses")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cryosplat_refine_bench"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    cli = [sys.executable, "-m", "cryosplat"]
    rows = []
    for sim in args.datasets:
        work = args.workdir / sim.parent.name
        work.mkdir(parents=True, exist_ok=True)
        truth = sim / "ground_truth.mrc"
        true_star = (sim / "relion.star" if (sim / "relion.star").is_file()
                     else sim / "particles.star")
        perturbed = work / "perturbed.star"
        perturb(true_star, perturbed)
        p = read_particles(true_star).first(args.particles)
        gt = torch.from_numpy(read_volume(truth)[0])
        box, pix = p.box_size, float(p.pixel_size_A[0])
        row = {"dataset": sim.parent.name, "particles": len(p), "box": box, "pixel_size_A": pix,
               "images": "relion_project" if true_star.name == "relion.star" else "cryosplat"}
        common = ["--max-particles", str(args.particles), "--truth", str(truth), "--device",
                  args.device, "--force", "--datadir", str(sim)]
        runs = [("reconstruct_true", "reconstruct", true_star, 1),
                ("reconstruct_perturbed", "reconstruct", perturbed, 1),
                ("refine_perturbed", "refine", perturbed, 1)]
        if not args.no_exact:
            runs.append(("refine_true", "refine", true_star, 1))
        if args.nproc > 1:
            runs.append((f"refine_perturbed_nproc{args.nproc}", "refine", perturbed, args.nproc))
        for name, cmd, star, nproc in runs:
            out = work / name
            each = str(max(1, args.threads // nproc))
            _, wall, rss = run_child([*cli, cmd, str(star), "--out", str(out), *common,
                                      *(["--nproc", str(nproc)] if nproc > 1 else [])],
                                     {"OMP_NUM_THREADS": each, "MKL_NUM_THREADS": each})
            fig = {"wall_s": wall, "peak_rss_MiB": rss, **map_figures(out, gt, box, pix)}
            if cmd == "refine":
                s = RunSummary.read(out / "summary.json").refinement
                fig["errors_before"] = errors(star, true_star, args.particles)
                fig["errors_after"] = errors(out / "particles.star", true_star, args.particles)
                fig["iterations"] = [{k: v for k, v in it.items() if k not in ("half_1", "half_2")}
                                     | {f"limit_A_{h}": it[f"half_{h}"]["limit_A"] for h in (1, 2)}
                                     for it in s["iterations"]]
            row[name] = fig
            print(f"{row['dataset']} {name}: {wall:.0f} s, FSC vs truth 0.5 {fig['0.5']:.2f} Å, "
                  f"0.143 {fig['0.143']:.2f} Å, mean {fig['mean_fsc']:.4f}"
                  + (f"; errors {fig['errors_before']} -> {fig['errors_after']}"
                     if "errors_after" in fig else ""), flush=True)
        ref, t = row["refine_perturbed"], row["reconstruct_true"]
        row["angle_error_fold"] = (ref["errors_before"]["angle_deg"]
                                   / ref["errors_after"]["angle_deg"])
        row["shells_refined_vs_true_0.5"] = shells(ref["0.5"], t["0.5"], box, pix)
        row["shells_refined_vs_true_0.143"] = shells(ref["0.143"], t["0.143"], box, pix)
        if "refine_true" in row:
            row["shells_exact_refined_vs_true_0.5"] = shells(row["refine_true"]["0.5"], t["0.5"],
                                                             box, pix)
        # the same particles and input: refine against reconstruct from the perturbed poses
        row["refine_time_x_reconstruct"] = ref["wall_s"] / row["reconstruct_perturbed"]["wall_s"]
        print(f"{row['dataset']}: angle error {row['angle_error_fold']:.2f}-fold lower; refined "
              f"map {row['shells_refined_vs_true_0.5']:+.1f} shells at 0.5 from the true-pose map "
              f"({row['shells_refined_vs_true_0.143']:+.1f} at 0.143); exact input "
              f"{row.get('shells_exact_refined_vs_true_0.5', float('nan')):+.1f}; refine took "
              f"{row['refine_time_x_reconstruct']:.1f}x reconstruct", flush=True)
        rows.append(row)
        write_json({"machine": machine(), "threads": args.threads, "datasets": rows}, args.out,
                   f"refine_{args.device}.json")  # after each dataset: a partial run keeps its rows


if __name__ == "__main__":
    main()
