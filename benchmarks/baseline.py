"""The direct-Fourier-inversion baseline: simulate and backproject throughput and peak memory,
and resolution against particle count.

Simulates the built-in 4AKE model (box 128, SNR 0.1, defocus 1-3 um by default) once with the
largest count, then backprojects the first N particles for each N. Every stage runs as its own
``cryosplat`` process, so its peak RSS is its own. Prints a table and writes JSON.

    .venv/bin/python benchmarks/baseline.py [--counts 2000 5000 20000] [--box 128]
        [--pixel-size 1.0] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _results import machine, run_child, write_json


def run_cli(args: list[str]) -> tuple[float, float]:
    """Run ``cryosplat ARGS``; return (wall seconds, peak RSS in MiB) of that process."""
    _, wall, rss = run_child([sys.executable, "-m", "cryosplat", *args])
    return wall, rss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", type=int, nargs="+", default=[2000, 5000, 20000])
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--pixel-size", type=float, default=1.0)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--workdir", type=Path, default=None, help="Keep the data here")
    args = ap.parse_args()

    n_max = max(args.counts)
    tmp = tempfile.TemporaryDirectory()
    work = args.workdir or Path(tmp.name)
    sim = work / "sim"
    common = ["--box", str(args.box), "--pixel-size", str(args.pixel_size), "--snr", str(args.snr),
              "--defocus-min", "1", "--defocus-max", "3", "--seed", "0", "--force"]
    result = {"box_size": args.box, "pixel_size_A": args.pixel_size, "snr": args.snr,
              "nyquist_A": 2 * args.pixel_size, **machine(), "simulate": [], "backproject": []}
    # simulate: a small and the large run, to show that memory does not grow with the count
    for n in sorted({min(args.counts), n_max}):
        d = sim if n == n_max else work / f"sim_{n}"
        wall, rss = run_cli(["simulate", "--out", str(d), "--particles", str(n), *common])
        row = {"particles": n, "wall_s": wall, "particles_per_s": n / wall, "peak_rss_MiB": rss}
        result["simulate"].append(row)
        print(f"simulate {n:>6} particles: {wall:7.1f} s, {n / wall:7.1f} particles/s, "
              f"peak RSS {rss:6.0f} MiB", flush=True)
    for n in args.counts:
        d = work / f"bp_{n}"
        wall, rss = run_cli(["backproject", str(sim / "particles.star"), "--out", str(d),
                             "--max-particles", str(n), "--truth", str(sim / "ground_truth.mrc"),
                             "--force"])
        s = json.loads((d / "summary.json").read_text())
        row = {"particles": n, "wall_s": wall, "particles_per_s": n / wall, "peak_rss_MiB": rss,
               **{k: v for k, v in s.items() if "resolution" in k}}
        result["backproject"].append(row)
        print(f"backproject {n:>6}: {wall:7.1f} s, {n / wall:6.1f} particles/s, peak RSS "
              f"{rss:6.0f} MiB; half-maps {s['half_map_resolution_A']:.2f} Å, vs truth "
              f"{s['truth_resolution_A_0.143']:.2f} Å (0.143) {s['truth_resolution_A_0.5']:.2f} Å (0.5)",
              flush=True)
    write_json(result, args.out, "baseline.json")


if __name__ == "__main__":
    main()
