"""Gaussian reconstruction against the direct-Fourier-inversion baseline, in one run.

Simulates the built-in 4AKE model, backprojects it (timed: the baseline), then trains the
gold-standard Gaussian reconstruction for each Gaussian count, each in its own process (its
peak RSS is its own), evaluating the FSC against the ground truth every --eval-every steps.
Reports resolution against time (half-map FSC, the cross-validated estimate against the
baseline's half-maps, and the FSC against the truth), and the time and peak memory to reach
the baseline's resolution against the truth at both FSC 0.143 and 0.5, or that it was not
reached. A count stops at its first evaluation at the baseline (--run-to-end trains all
--epochs), or at its first evaluation past --time-limit seconds. Prints and writes JSON.

    .venv/bin/python benchmarks/reconstruct.py [--box 128 --pixel-size 1.0 --particles 20000]
        [--gaussians 2000 10000 30000] [--epochs 4] [--time-limit S] [--run-to-end]
        [--device cpu] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from _results import machine, run_child, write_json
from cryosplat.summary import BackprojectionSummary


def train_one(sim: Path, n_gauss: int, epochs: float, eval_every: int, device: str,
              densify: bool = False, target: tuple[float, float] | None = None,
              time_limit_s: float = float("inf")) -> dict:
    """One count's gold-standard run. With ``target`` (the baseline's resolutions against the
    truth at FSC 0.143 and 0.5) it stops at the first evaluation that reaches both; it also
    stops at the first evaluation after ``time_limit_s``."""
    import torch

    from cryosplat.io import assign_half_sets, read_particles, read_volume
    from cryosplat.train import TrainConfig, resolve_device, train_gold_standard

    p = read_particles(sim / "particles.star")
    truth = torch.from_numpy(read_volume(sim / "ground_truth.mrc")[0])
    refs = tuple(torch.from_numpy(read_volume(sim.parent / "bp" / f"half_map_{i}.mrc")[0])
                 for i in (1, 2))  # the baseline's half-maps: references of the cross-validation
    cfg = TrainConfig(n_gaussians=n_gauss, epochs=epochs, eval_every=eval_every,
                      checkpoint_every=10**9, densify=densify)
    def stop_when(row: dict) -> bool:
        return row["time_s"] >= time_limit_s or (target is not None and reached(row, *target))

    t0 = time.perf_counter()
    trainers, history, _ = train_gold_standard(p, assign_half_sets(p, 0), cfg,
                                               resolve_device(device),
                                               truth=truth.to(torch.float32), log=lambda m: None,
                                               references=refs, stop_when=stop_when)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"gaussians": n_gauss, "densify": densify,
           "final_gaussians": [len(t.model) for t in trainers], "epochs": epochs,
           "stopped_at_baseline": target is not None and reached(history[-1], *target),
           "time_limit_s": time_limit_s if time_limit_s < float("inf") else None,
           "wall_s": time.perf_counter() - t0,
           "peak_rss_MiB": peak, "history": history}
    if device != "cpu" and torch.cuda.is_available():
        out["peak_cuda_MiB"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def reached(row: dict, target: float, target_05: float) -> bool:
    """Whether an evaluation is at or past the baseline against the truth at 0.143 and 0.5."""
    return (row["truth_resolution_A_0.143"] <= target + 1e-9
            and row["truth_resolution_A_0.5"] <= target_05 + 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--pixel-size", type=float, default=1.0)
    ap.add_argument("--particles", type=int, default=20000)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--gaussians", type=int, nargs="+", default=[2000, 10000, 30000])
    ap.add_argument("--epochs", type=float, default=4.0)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--densify", action="store_true", help="Also run each count with --densify")
    ap.add_argument("--run-to-end", action="store_true",
                    help="Train every count for all --epochs instead of stopping at the baseline")
    ap.add_argument("--time-limit", type=float, default=float("inf"),
                    help="Stop a count at its first evaluation after this many seconds")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--single", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--single-densify", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--single-target", type=float, nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    work = args.workdir or Path(tmp.name)
    sim = work / "sim"
    if args.single:
        print(json.dumps(train_one(sim, args.single, args.epochs, args.eval_every, args.device,
                                   args.single_densify, args.single_target, args.time_limit)))
        return
    cli = [sys.executable, "-m", "cryosplat"]
    if not (sim / "particles.star").exists():
        run_child([*cli, "simulate", "--out", str(sim), "--particles", str(args.particles),
                   "--box", str(args.box), "--pixel-size", str(args.pixel_size), "--snr",
                   str(args.snr), "--force"])
    _, bp_wall, bp_rss = run_child([*cli, "backproject", str(sim / "particles.star"), "--out",
                                    str(work / "bp"), "--truth", str(sim / "ground_truth.mrc"),
                                    "--force"])
    bp_summary = BackprojectionSummary.read(work / "bp" / "summary.json")
    bp = {**bp_summary.to_json(), "wall_s": bp_wall, "peak_rss_MiB": bp_rss}
    head = bp_summary.headline
    target, target_05 = head.truth_resolution_A_0143, head.truth_resolution_A_05
    print(f"baseline (direct Fourier inversion): {bp_wall:.0f} s, peak RSS "
          f"{bp_rss:.0f} MiB; vs truth {target:.2f} Å "
          f"(0.143) {target_05:.2f} Å (0.5), half-maps {head.half_map_resolution_A:.2f} Å",
          flush=True)
    rows = []
    runs = [(m, False) for m in args.gaussians] + [(m, True) for m in args.gaussians
                                                    if args.densify]
    for m, dens in runs:
        out, _, _ = run_child(
            [sys.executable, __file__, "--single", str(m), "--epochs", str(args.epochs),
             "--eval-every", str(args.eval_every), "--device", args.device,
             "--workdir", str(work), "--time-limit", str(args.time_limit),
             *(["--single-densify"] if dens else []),
             *([] if args.run_to_end else ["--single-target", str(target), str(target_05)])])
        row = json.loads(out.strip().splitlines()[-1])
        hits = [h for h in row["history"] if reached(h, target, target_05)]
        row["time_to_baseline_s"] = hits[0]["time_s"] if hits else None
        last = row["history"][-1]
        rows.append(row)
        when = (f"reached the baseline after {row['time_to_baseline_s']:.0f} s"
                if hits else "did not reach the baseline")
        label = f"{m} -> {'/'.join(map(str, row['final_gaussians']))} (densify)" if dens else str(m)
        print(f"{label:>6} Gaussians: {row['wall_s']:.0f} s, peak RSS "
              f"{row['peak_rss_MiB']:.0f} MiB; "
              f"last vs truth {last['truth_resolution_A_0.143']:.2f} Å (0.143) "
              f"{last['truth_resolution_A_0.5']:.2f} Å (0.5), half-maps "
              f"{last['half_map_resolution_A']:.2f} Å; {when} "
              f"(ratio to the baseline's time: "
              f"{(row['time_to_baseline_s'] or float('nan')) / bp['wall_s']:.2f})", flush=True)
        for h in row["history"]:
            cv = ("<=" if h["cross_validated_is_limit"] else "  ") + \
                f"{h['cross_validated_resolution_A']:.2f}"
            print(f"    {h['time_s']:7.0f} s  step {h['step']:5d}  vs truth "
                  f"{h['truth_resolution_A_0.143']:.2f} Å (0.143) {h['truth_resolution_A_0.5']:.2f}"
                  f" Å (0.5)  half-maps {h['half_map_resolution_A']:.2f} Å (0.143)  "
                  f"cross-validated {cv} Å (0.5)")

    result = {"box_size": args.box, "pixel_size_A": args.pixel_size, "particles": args.particles,
              "snr": args.snr, "device": args.device, **machine(), "baseline": bp,
              "gaussian": rows}
    write_json(result, args.out, f"reconstruct_{args.device}.json")


if __name__ == "__main__":
    main()
