"""Time and peak memory of voxelising a Gaussian mixture against the chunk budget.

``gaussians.voxelise`` evaluates at most ``budget`` Gaussian-voxel pairs at a time. The training
voxelises both half-set mixtures at every evaluation, and the last maps at the end, so this
sets the evaluation time and, on CPU, the training's peak RSS. For each Gaussian count and
budget, in its own process so that its peak memory is its own: a random mixture (uniform in a
ball of 0.3 D pixels, standard deviations 1-2 pixels, random orientations) is voxelised at
D^3 once to warm up at the smallest budget, then ``--repeats`` times at the budget under test.
The best time is reported, with the rise of peak RSS over the warm-up (on CUDA,
torch.cuda.max_memory_allocated). Every budget must give the same map as the smallest one.
Prints a table and writes benchmarks/results/voxelise_<device>.json.

    .venv/bin/python benchmarks/voxelise.py [--box 128] [--gaussians 2000 30000]
        [--budgets 16 18 20 22 24] [--device cpu|cuda] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from _results import machine, run_child, write_json


def single(box: int, n_gauss: int, log2_budget: int, smallest: int, device: str,
           repeats: int) -> dict:
    import torch

    from cryosplat.gaussians import GaussianMixture, voxelise

    g = torch.Generator().manual_seed(0)
    gm = GaussianMixture.random(n_gauss, 0.3 * box, 1.0, generator=g)
    with torch.no_grad():
        gm.log_scales_A.copy_(torch.log(1 + torch.rand(n_gauss, 3, generator=g)))
    gm = gm.to(device)

    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize()

    with torch.no_grad():
        args = (gm.means_A, gm.covariances(), gm.amplitudes, box, 1.0)
        reference = voxelise(*args, budget=1 << smallest)
        sync()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if device != "cpu":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            vol = voxelise(*args, budget=1 << log2_budget)
            sync()
            times.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"gaussians": n_gauss, "log2_budget": log2_budget, "seconds": min(times),
           "peak_rss_rise_MiB": after - before,
           "max_abs_difference": float((vol - reference).abs().max()),
           "map_max": float(reference.abs().max())}
    if device != "cpu":
        out["peak_cuda_MiB"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--gaussians", type=int, nargs="+", default=[2000, 30000])
    ap.add_argument("--budgets", type=int, nargs="+", default=[16, 18, 20, 22, 24],
                    help="log2 of the Gaussian-voxel pairs per chunk")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--single", type=int, nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    smallest = min(args.budgets)
    if args.single:
        print(json.dumps(single(args.box, *args.single, smallest, args.device, args.repeats)))
        return
    rows = []
    print(f"voxelise at {args.box}^3 on {args.device}")
    for m in args.gaussians:
        for b in args.budgets:
            out, _, _ = run_child([sys.executable, __file__, "--single", str(m), str(b), "--box",
                                   str(args.box), "--budgets", *map(str, args.budgets),
                                   "--repeats", str(args.repeats), "--device", args.device])
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            mem = (f"peak CUDA {row['peak_cuda_MiB']:.0f} MiB" if "peak_cuda_MiB" in row
                   else f"peak RSS +{row['peak_rss_rise_MiB']:.0f} MiB")
            print(f"{m:6d} Gaussians  budget 2^{b:<2d}  {row['seconds']:6.2f} s  {mem}  "
                  f"max |difference| {row['max_abs_difference']:.1e} "
                  f"(map max {row['map_max']:.1e})", flush=True)
            if row["max_abs_difference"] > 1e-5 * row["map_max"]:
                sys.exit(f"budget 2^{b} changed the map: {row['max_abs_difference']:.3e}")

    result = {"box_size": args.box, "device": args.device, **machine(), "rows": rows}
    write_json(result, args.out, f"voxelise_{args.device}.json")


if __name__ == "__main__":
    main()
