"""Forward + backward throughput and peak memory of the Gaussian-splatting renderer.

For each box size D and Gaussian count M: a random mixture (uniform in a ball of 0.35 D
pixels, anisotropic standard deviations 1-2 pixels, random orientations), batches of 32 random
views, the patch backend, loss = sum of squares of the rendered images; images/s counts
forward + backward. Every configuration runs in its own process so that its peak RSS is its
own (on CUDA the figure is torch.cuda.max_memory_allocated). Prints a table, writes JSON.

    .venv/bin/python benchmarks/render.py [--device cpu|cuda] [--boxes 128 256]
        [--gaussians 2000 10000 30000] [--batch 32] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _results import machine, write_json


def single(box: int, n_gauss: int, batch: int, device: str, backend: str, repeats: int) -> dict:
    import torch

    from cryosplat import geometry
    from cryosplat.gaussians import GaussianMixture

    g = torch.Generator().manual_seed(0)
    gm = GaussianMixture.random(n_gauss, 0.35 * box, 1.0, generator=g)
    with torch.no_grad():
        gm.log_scales_A.copy_(torch.log(1 + torch.rand(n_gauss, 3, generator=g)))
    gm = gm.to(device)
    rots = geometry.random_rotations(batch * (repeats + 1), g, dtype=torch.float32).to(device)

    def step(i: int) -> None:
        gm.zero_grad(set_to_none=True)
        f = gm.render_rfft(rots[i * batch:(i + 1) * batch], box, 1.0, backend=backend)
        img = torch.fft.irfft2(f, s=(box, box))
        (img**2).sum().backward()

    step(0)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(1, repeats + 1):
        step(i)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    out = {"box_size": box, "gaussians": n_gauss, "batch": batch, "backend": backend,
           "device": device, "repeats": repeats, "seconds_per_batch": wall / repeats,
           "images_per_s": batch * repeats / wall}
    import resource

    out["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        out["peak_cuda_MiB"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu"] = torch.cuda.get_device_name()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--boxes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--gaussians", type=int, nargs="+", default=[2000, 10000, 30000])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--backend", default="patch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--single", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.single:
        print(json.dumps(single(*args.single, args.batch, args.device, args.backend, args.repeats)))
        return

    rows = []
    for box in args.boxes:
        for m in args.gaussians:
            cmd = [sys.executable, __file__, "--single", str(box), str(m), "--batch",
                   str(args.batch), "--device", args.device, "--backend", args.backend,
                   "--repeats", str(args.repeats)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out, err = proc.communicate()
            if proc.returncode != 0:
                sys.exit(f"D={box} M={m} failed:\n{err}")
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            mem = f"peak RSS {row['peak_rss_MiB']:.0f} MiB"
            if "peak_cuda_MiB" in row:
                mem += f", peak CUDA {row['peak_cuda_MiB']:.0f} MiB"
            print(f"D={box:4d} M={m:6d} batch {args.batch}: {row['images_per_s']:8.1f} images/s "
                  f"(forward+backward), {row['seconds_per_batch']:.3f} s/batch {mem}", flush=True)
    result = {"device": args.device, **machine(), "rows": rows}
    write_json(result, args.out, f"render_{args.device}.json")


if __name__ == "__main__":
    main()
