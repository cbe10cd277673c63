"""Where the time of ``reconstruct --objective volume`` goes, per box size.

For each box it simulates the built-in 4AKE model (``--particles``, pixel size chosen so the
box spans 192 Å), then times, in this process with ``--threads`` threads:

* insertion of one half-set (particles per second; the only part that grows with the
  particle count),
* the own support and the seeds (seconds, the number of Gaussians),
* ``--steps`` fit steps of that half-set split into voxelisation, padded FFT and loss,
  backward pass and Adam (seconds per step),

and the peak RSS. A run of ``S`` steps per half-set then costs about
``2 x (insertion + S x step)`` plus the validation inversion. Prints and writes
``volume_fit_<device>.json``.

    .venv/bin/python benchmarks/volume_fit.py [--boxes 96 128 256] [--particles 2000]
        [--steps 5] [--threads 2] [--device cpu] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _results import machine, write_json
from cryosplat.backproject import insert_particles
from cryosplat.io import assign_half_sets, read_particles
from cryosplat.simulate import SimulationConfig, simulate_dataset
from cryosplat.train import TrainConfig
from cryosplat.train.seeding import own_support, seed_mixture
from cryosplat.train.volume import HalfSetVolumeFit


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def one_box(box: int, n_particles: int, steps: int, device: torch.device, work: Path) -> dict:
    pix = 192.0 / box
    sim = simulate_dataset(None, work / f"box{box}", SimulationConfig(
        n_particles=n_particles, box_size=box, pixel_size_A=pix, snr=0.05, seed=1))
    p = read_particles(sim["particles"])
    idx = np.nonzero(assign_half_sets(p, 0) == 1)[0]
    t0 = time.perf_counter()
    ins = insert_particles(p, idx, device=device)
    sync(device)
    t_insert = time.perf_counter() - t0
    t0 = time.perf_counter()
    support = own_support(ins, pix)
    model = seed_mixture(support, pix, TrainConfig.gaussians_per_voxel, 1.0, 100_000,
                         torch.Generator().manual_seed(0))
    t_seed = time.perf_counter() - t0
    fit = HalfSetVolumeFit(model, ins, None, TrainConfig(max_steps=10**6), 1, pix, device)
    parts = {"voxelise": 0.0, "fft_and_loss": 0.0, "backward": 0.0, "adam": 0.0}
    for s in range(steps + 1):  # the first step warms up and is not counted
        marks = [time.perf_counter()]
        vol = fit._voxelise()
        sync(device)
        marks.append(time.perf_counter())
        loss = fit.objective(fit.objective.transform(vol))
        sync(device)
        marks.append(time.perf_counter())
        fit.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync(device)
        marks.append(time.perf_counter())
        fit.optimizer.step()
        sync(device)
        marks.append(time.perf_counter())
        if s > 0:
            for k, a, b in zip(parts, marks, marks[1:]):
                parts[k] += (b - a) / steps
    return {"box": box, "pixel_size_A": pix, "particles_in_half_set": len(idx),
            "insert_s": t_insert, "insert_particles_per_s": len(idx) / t_insert,
            "support_and_seeds_s": t_seed, "support_A3": support.volume_A3(pix),
            "gaussians": len(model), "step_s": sum(parts.values()),
            "step_parts_s": parts}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boxes", type=int, nargs="+", default=[96, 128, 256])
    ap.add_argument("--particles", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for box in args.boxes:
            r = one_box(box, args.particles, args.steps, device, Path(tmp))
            rows.append(r)
            parts = ", ".join(f"{k} {v:.2f}" for k, v in r["step_parts_s"].items())
            print(f"box {box}: insertion {r['insert_particles_per_s']:.0f} particles/s; "
                  f"{r['gaussians']} Gaussians in {r['support_A3']:.0f} Å³; "
                  f"{r['step_s']:.2f} s per step ({parts})", flush=True)
    result = {**machine(), "threads": args.threads, "device": str(device),
              "particles": args.particles, "boxes": rows,
              "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    write_json(result, args.out, f"volume_fit_{device.type}.json")


if __name__ == "__main__":
    main()
