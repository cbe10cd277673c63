"""The direct-Fourier-inversion baseline beside RELION's relion_reconstruct: wall time, peak
memory and FSC against the truth, on particles simulated by cryosplat and by RELION's
relion_project.

For each simulator, the built-in 4AKE model is simulated once with the largest count
(``cryosplat simulate``; for ``relion``, ``relion_project --ctf --add_noise --white_noise``
re-projects its ground truth with the same poses and CTF, sigma set for the same SNR); then
for each count N, ``cryosplat backproject`` and ``relion_reconstruct --ctf`` (when installed)
reconstruct the first N particles, each as its own process with ``--threads`` threads
(RELION 3.1's relion_reconstruct has one). Prints a table and writes JSON
(``baseline_box{box}_snr{snr}.json``); the FSC
difference is in Fourier shells, positive where cryosplat's map crosses further out.

    .venv/bin/python benchmarks/baseline.py [--counts 2000 5000] [--box 96] [--pixel-size 2.0]
        [--snr 0.05] [--simulators cryosplat relion] [--threads 1] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import mrcfile
import starfile
import torch

from _results import (
    HAVE_RELION,
    crossings,
    machine,
    relion_project_noisy,
    run_child,
    shells,
    truth_fsc,
    write_json,
)
from cryosplat.summary import BackprojectionSummary


def simulate(kind: str, work: Path, n: int, args, env: dict) -> tuple[Path, Path, dict]:
    """(particles STAR, ground truth, timing row) of one simulated dataset."""
    d = work / f"sim_{kind}"
    common = ["--box", str(args.box), "--pixel-size", str(args.pixel_size), "--snr",
              str(args.snr), "--max-shift", "6", "--seed", "1", "--force"]
    _, wall, rss = run_child([sys.executable, "-m", "cryosplat", "simulate", "--out", str(d),
                              "--particles", str(n), *common], env)
    row = {"simulator": "cryosplat", "particles": n, "wall_s": wall, "peak_rss_MiB": rss}
    star, truth = d / "particles.star", d / "ground_truth.mrc"
    if kind == "relion":
        star, wall, rss, sigma = relion_project_noisy(truth, star, d, args.snr, env)
        row = {"simulator": "relion_project", "particles": n, "wall_s": wall,
               "peak_rss_MiB": rss, "white_noise_sigma": sigma}
    return star, truth, row


def first(star: Path, n: int) -> Path:
    """A STAR file beside ``star`` with its first ``n`` particles (image paths unchanged)."""
    tables = starfile.read(star, always_dict=True)
    tables["particles"] = tables["particles"].iloc[:n]
    out = star.with_name(f"{star.stem}_first{n}.star")
    starfile.write(tables, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", type=int, nargs="+", default=[2000, 5000])
    ap.add_argument("--box", type=int, default=96)
    ap.add_argument("--pixel-size", type=float, default=2.0)
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--simulators", nargs="+", default=["cryosplat", "relion"],
                    choices=["cryosplat", "relion"])
    ap.add_argument("--threads", type=int, default=1, help="threads of every process")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--workdir", type=Path, default=None, help="Keep the data here")
    args = ap.parse_args()
    if "relion" in args.simulators and not HAVE_RELION:
        print("relion_project not found: simulating with cryosplat only")
        args.simulators = [s for s in args.simulators if s != "relion"]

    tmp = tempfile.TemporaryDirectory()
    work = args.workdir or Path(tmp.name)
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    box, pix = args.box, args.pixel_size
    result = {"box_size": box, "pixel_size_A": pix, "snr": args.snr, "nyquist_A": 2 * pix,
              "threads": args.threads, **machine(), "relion": HAVE_RELION, "simulate": [],
              "backproject": []}
    for kind in args.simulators:
        star, truth_path, row = simulate(kind, work, max(args.counts), args, env)
        result["simulate"].append(row)
        truth = torch.from_numpy(mrcfile.read(truth_path).copy())
        for n in args.counts:
            out = work / f"bp_{kind}_{n}"
            _, wall, rss = run_child([sys.executable, "-m", "cryosplat", "backproject", str(star),
                                      "--out", str(out), "--max-particles", str(n), "--truth",
                                      str(truth_path), "--force"], env)
            s = BackprojectionSummary.read(out / "summary.json")
            row = {"simulator": kind, "particles": n, "wall_s": wall, "peak_rss_MiB": rss,
                   "particles_per_s": n / wall,
                   "half_map_resolution_A": s.headline.half_map_resolution_A,
                   "truth_fsc": truth_fsc(out / "map.mrc", truth).tolist()}
            row["truth_resolution_A"] = crossings(torch.tensor(row["truth_fsc"]), box, pix)
            line = (f"{kind:9} {n:>6}: cryosplat {wall:6.1f} s {rss:6.0f} MiB, vs truth "
                    f"{row['truth_resolution_A']['0.5']:.2f} Å (0.5), half-maps "
                    f"{row['half_map_resolution_A']:.2f} Å (0.143)")
            if HAVE_RELION:
                subset = first(star, n)
                _, rwall, rrss = run_child(["relion_reconstruct", "--i", subset.name, "--o",
                                            str(out / "relion.mrc"), "--ctf"], env,
                                           cwd=subset.parent)
                rcurve = truth_fsc(out / "relion.mrc", truth)
                rres = crossings(rcurve, box, pix)
                row["relion"] = {"wall_s": rwall, "peak_rss_MiB": rrss, "truth_resolution_A": rres,
                                 "truth_fsc": rcurve.tolist()}
                # a curve that hovers at 0.5 crosses it shells apart on a small difference:
                # the mean difference over the shells is the steadier comparison
                row["mean_fsc_difference_vs_relion"] = float(
                    (torch.tensor(row["truth_fsc"]) - rcurve)[1:].mean())
                row["wall_ratio"] = wall / rwall
                row["shells_beyond_relion"] = {
                    t: shells(row["truth_resolution_A"][t], rres[t], box, pix) for t in rres}
                line += (f" | RELION {rwall:5.1f} s {rrss:5.0f} MiB, {rres['0.5']:.2f} Å; ratio "
                         f"{row['wall_ratio']:.2f}, shells beyond RELION at 0.5/0.143: "
                         f"{row['shells_beyond_relion']['0.5']:+.2f} / "
                         f"{row['shells_beyond_relion']['0.143']:+.2f}; mean FSC difference "
                         f"{row['mean_fsc_difference_vs_relion']:+.3f}")
            result["backproject"].append(row)
            print(line, flush=True)
    write_json(result, args.out, f"baseline_box{box}_snr{args.snr:g}.json")


if __name__ == "__main__":
    main()
