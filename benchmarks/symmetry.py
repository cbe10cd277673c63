"""``--sym`` on a symmetric test object (issue 20): the right group against C1 and a wrong one.

The object is an assembly of copies of the built-in 4AKE model placed by the group's matrices
(``simulate.symmetric_assembly``; offset (24, 10, 14) Å, so the copies do not meet). Its
particles are simulated twice: by ``cryosplat simulate`` and, where RELION is installed, by
``relion_project --ctf --add_noise`` at the same poses, CTF and SNR. Each dataset is
reconstructed, each run as its own process with ``--threads`` threads, by:

- ``cryosplat backproject --sym G`` for G in (C1, the right group, the wrong group);
- ``cryosplat reconstruct --sym G`` for the same three;
- ``relion_reconstruct --ctf --sym`` with the right group, where installed.

Every map is compared with the ground truth (FSC 0.5 and 0.143 crossings, mean FSC), at equal
particle count. Writes ``symmetry_<device>.json``.

    .venv/bin/python benchmarks/symmetry.py [--group D3] [--wrong D4] [--particles 1500]
        [--box 96] [--pixel-size 1.5] [--snr 0.05] [--threads 2] [--workdir DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys

import torch

from _results import (
    HAVE_RELION,
    machine,
    relion_project_noisy,
    run_child,
    simulation_arguments,
    truth_figures,
    write_json,
)
from cryosplat.io import read_volume
from cryosplat.simulate import builtin_structure, symmetric_assembly
from cryosplat.summary import RunSummary
from cryosplat.symmetry import symmetry_matrices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--group", default="D3")
    ap.add_argument("--wrong", default="D4")
    simulation_arguments(ap, particles=1500, box=96, workdir="/tmp/cryosplat_symmetry_bench")
    args = ap.parse_args()
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cli = [sys.executable, "-m", "cryosplat"]
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    pdb = symmetric_assembly(builtin_structure(), work / f"assembly_{args.group}.pdb",
                             symmetry_matrices(args.group), (24.0, 10.0, 14.0))
    sim = work / "sim"
    run_child([*cli, "simulate", str(pdb), "--out", str(sim), "--particles", str(args.particles),
               "--box", str(args.box), "--pixel-size", str(args.pixel_size), "--snr",
               str(args.snr), "--seed", "3", "--force"], env)
    datasets = {"cryosplat": sim / "particles.star"}
    if HAVE_RELION:
        star, _, _, sigma = relion_project_noisy(sim / "ground_truth.mrc", sim / "particles.star",
                                                 sim, args.snr, env)
        datasets["relion_project"] = star
    truth = torch.from_numpy(read_volume(sim / "ground_truth.mrc")[0])
    box, pix = args.box, args.pixel_size
    rows = []
    for simulator, star in datasets.items():
        row = {"simulator": simulator, "group": args.group, "wrong": args.wrong,
               "particles": args.particles, "box": box, "pixel_size_A": pix, "snr": args.snr}
        for sym in ("C1", args.group, args.wrong):
            for cmd in ("backproject", "reconstruct"):
                out = work / simulator / f"{cmd}_{sym}"
                extra = ["--truth", str(sim / "ground_truth.mrc")]
                _, wall, rss = run_child([*cli, cmd, str(star), "--out", str(out), "--sym", sym,
                                          "--force", "--datadir", str(sim), *extra,
                                          *(["--device", args.device] if cmd == "reconstruct"
                                            else [])], env)
                fig = {"wall_s": wall, "peak_rss_MiB": rss, **truth_figures(out / "map.mrc", truth,
                                                                       box, pix)}
                if cmd == "reconstruct":
                    fig["gaussians"] = RunSummary.read(out / "summary.json").gaussians
                row[f"{cmd}_{sym}"] = fig
                print(f"{simulator} {cmd} --sym {sym}: {wall:.0f} s, FSC vs truth 0.5 "
                      f"{fig['0.5']:.2f} Å, 0.143 {fig['0.143']:.2f} Å, mean {fig['mean_fsc']:.4f}"
                      + (f", {fig['gaussians']} Gaussians" if "gaussians" in fig else ""),
                      flush=True)
        if HAVE_RELION:
            out = work / simulator / f"relion_{args.group}.mrc"
            _, wall, rss = run_child(["relion_reconstruct", "--i", str(star), "--o", str(out),
                                      "--ctf", "--sym", args.group, "--angpix", str(pix)],
                                     env, cwd=sim)
            row[f"relion_reconstruct_{args.group}"] = {"wall_s": wall, "peak_rss_MiB": rss,
                                                       **truth_figures(out, truth, box, pix)}
            print(f"{simulator} relion_reconstruct --sym {args.group}: {wall:.0f} s, mean FSC "
                  f"{row[f'relion_reconstruct_{args.group}']['mean_fsc']:.4f}", flush=True)
        rows.append(row)
        write_json({"machine": machine(), "threads": args.threads, "datasets": rows}, args.out,
                   f"symmetry_{args.device}.json")


if __name__ == "__main__":
    main()
