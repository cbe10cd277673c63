"""Scale: peak memory against the particle count, and 1 against N data-parallel ranks.

1. Simulates N_small particles of the built-in 4AKE model at box 128 (SNR 0.1) once, and makes
   a dataset N_large = k x N_small by writing k distinct copies of the stack (new files, so
   nothing is shared in the page cache) and a STAR file of k x N_small rows.
2. For each dataset, in its own process (so the peak RSS is its own):
   - ``read``: one pass over every particle of both half-sets through the training's
     prefetching ``BatchStream`` (positioned reads), and, for contrast, the same pass through
     a memory map of the stacks (the reader cryosplat used before);
   - ``train``: ``--steps`` steps of the gold-standard training (2000 Gaussians), batches drawn
     from the whole dataset.
3. Trains ``--steps`` steps on the small dataset with ``cryosplat reconstruct --nproc R`` for
   each R in ``--ranks`` (torchrun, gloo on CPU) and reports particles/s and the efficiency
   (rate with R ranks / (R x rate with 1)).

Prints every figure and writes benchmarks/results/scale_<device>.json.

    .venv/bin/python benchmarks/scale.py [--small 10000 --copies 10] [--steps 40]
        [--ranks 1 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _results import machine, run_child, write_json
from cryosplat.summary import RunSummary


def peak_rss_MiB() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_large(small: Path, large: Path, copies: int) -> None:
    """A dataset of ``copies`` x the small one: distinct stack files, one STAR."""
    import starfile

    if (large / "particles.star").exists():
        return
    large.mkdir(parents=True, exist_ok=True)
    star = starfile.read(small / "particles.star", always_dict=True)
    parts = star["particles"]
    blocks = []
    for k in range(copies):
        name = f"particles_{k:02d}.mrcs"
        shutil.copyfile(small / "particles.mrcs", large / name)
        b = parts.copy()
        b["rlnImageName"] = [f"{s.split('@')[0]}@{name}" for s in parts["rlnImageName"]]
        blocks.append(b)
    import pandas as pd

    star["particles"] = pd.concat(blocks, ignore_index=True)
    starfile.write(star, large / "particles.star")


def single_read(star: Path, mmap: bool) -> dict:
    """One pass over every particle; peak RSS of this process."""
    import numpy as np
    import torch

    from cryosplat.io import assign_half_sets, read_particles
    from cryosplat.train import BatchStream, HalfSetTrainer, TrainConfig

    p = read_particles(star)
    half = assign_half_sets(p, 0)
    cfg = TrainConfig(n_gaussians=10, batch_size=64)
    trainers = [HalfSetTrainer(p, np.nonzero(half == h)[0], cfg, h, 1, torch.device("cpu"))
                for h in (1, 2)]
    steps = min(len(t.indices) for t in trainers) // cfg.batch_size
    rss0 = peak_rss_MiB()
    t0 = time.perf_counter()
    n = 0
    if mmap:
        import mrcfile

        maps = {}
        for t in trainers:
            for s in range(steps):
                idx = t.batch(s)
                for i in idx:
                    f = p.images.files[p.images.file_index[i]]
                    if f not in maps:
                        maps[f] = mrcfile.mmap(f, mode="r").data
                    np.asarray(maps[f][p.images.slice_index[i]], dtype=np.float32).sum()
                n += len(idx)
    else:
        for images in BatchStream(trainers, 0, steps, workers=1):
            n += sum(len(x) for x in images)
    wall = time.perf_counter() - t0
    return {"particles_read": n, "wall_s": wall, "particles_per_s": n / wall,
            "peak_rss_MiB": peak_rss_MiB(), "rss_before_read_MiB": rss0}


def single_train(star: Path, steps: int, gaussians: int) -> dict:
    import torch

    from cryosplat.io import assign_half_sets, read_particles
    from cryosplat.train import TrainConfig, total_steps, train_gold_standard

    p = read_particles(star)
    half = assign_half_sets(p, 0)
    cfg = TrainConfig(n_gaussians=gaussians, epochs=1.0, eval_every=10**9,
                      checkpoint_every=10**9, densify=False)
    cfg.epochs = steps / total_steps(half, cfg)
    t0 = time.perf_counter()
    trainers, _, _ = train_gold_standard(p, half, cfg, torch.device("cpu"), log=lambda m: None)
    wall = time.perf_counter() - t0
    n = 2 * cfg.batch_size * trainers[0].step
    return {"steps": trainers[0].step, "wall_s": wall, "particles_per_s": n / wall,
            "peak_rss_MiB": peak_rss_MiB()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=10000)
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--pixel-size", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--gaussians", type=int, default=2000)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--workdir", type=Path, default=None, help="Keep the data here")
    ap.add_argument("--single", choices=["read", "mmap", "train"], help=argparse.SUPPRESS)
    ap.add_argument("--star", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.single:
        out = (single_train(args.star, args.steps, args.gaussians) if args.single == "train"
               else single_read(args.star, args.single == "mmap"))
        print(json.dumps(out))
        return

    tmp = tempfile.TemporaryDirectory()
    work = args.workdir or Path(tmp.name)
    small, large = work / "small", work / "large"
    cli = [sys.executable, "-m", "cryosplat"]
    if not (small / "particles.star").exists():
        print(f"simulating {args.small} particles at box {args.box} ...", flush=True)
        run_child([*cli, "simulate", "--out", str(small), "--particles", str(args.small),
                   "--box", str(args.box), "--pixel-size", str(args.pixel_size), "--snr", "0.1",
                   "--force"])
    make_large(small, large, args.copies)
    n_large = args.small * args.copies
    result = {"box_size": args.box, **machine(), "cpus": os.cpu_count(),
              "gaussians": args.gaussians, "memory": [], "ranks": []}
    me = [sys.executable, __file__]
    for _label, star, n in (("small", small, args.small), ("large", large, n_large)):
        row = {"particles": n}
        for what in ("read", "mmap", "train"):
            out, _, _ = run_child([*me, "--single", what, "--star", str(star / "particles.star"),
                                   "--steps", str(args.steps), "--gaussians", str(args.gaussians)])
            row[what] = json.loads(out.strip().splitlines()[-1])
        result["memory"].append(row)
        print(f"{n:>7} particles: one pass (prefetched pread) {row['read']['particles_per_s']:.0f}"
              f" particles/s, peak RSS {row['read']['peak_rss_MiB']:.0f} MiB; the same pass "
              f"memory-mapped: peak RSS {row['mmap']['peak_rss_MiB']:.0f} MiB; training "
              f"{row['train']['steps']} steps: {row['train']['particles_per_s']:.1f} particles/s,"
              f" peak RSS {row['train']['peak_rss_MiB']:.0f} MiB", flush=True)
    base = None
    for r in args.ranks:
        folder = work / f"ranks_{r}"
        import numpy as np

        from cryosplat.train import TrainConfig, total_steps

        half = np.tile([1, 2], args.small // 2 + 1)[: args.small]
        epochs = args.steps / total_steps(half, TrainConfig(epochs=1.0))
        _, wall, _ = run_child([*cli, "reconstruct", str(small / "particles.star"), "--out",
                                str(folder), "--nproc", str(r), "--gaussians", str(args.gaussians),
                                "--epochs", f"{epochs:.6f}", "--no-validate", "--no-densify",
                                "--device", "cpu", "--force"],
                               env={"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // r))})
        s = RunSummary.read(folder / "summary.json")
        rate = 2 * 32 * s.steps / s.train_time_s
        base = base or rate
        row = {"ranks": r, "steps": s.steps, "train_time_s": s.train_time_s,
               "wall_s": wall, "particles_per_s": rate, "efficiency": rate / (r * base)}
        result["ranks"].append(row)
        print(f"{r} rank(s): {rate:.1f} particles/s over {s.steps} steps "
              f"({s['train_time_s']:.0f} s of training, {wall:.0f} s with start-up and outputs); "
              f"efficiency {row['efficiency']:.2f}", flush=True)
    write_json(result, args.out, "scale_cpu.json")


if __name__ == "__main__":
    main()
