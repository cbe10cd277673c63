"""Higher-order optics (issue 21): particles with aberrations, reconstructed with the optics
modelled and ignored, against aberration-free particles of the same poses.

Datasets (the built-in 4AKE model, one seed, the same poses, CTF and noise level):

- ``clean``: ``cryosplat simulate`` without aberrations;
- ``aberrated``: ``cryosplat simulate`` with beam tilt, odd and even Zernike terms and
  anisotropic magnification (``--beam-tilt --odd-zernike --even-zernike --mag-matrix``);
- ``relion_even`` (where RELION is installed): ``relion_project --ctf --add_noise`` of the
  truth at the aberrated STAR's poses with only its even Zernike terms, the optics that
  RELION 3.1's relion_project applies in full (it puts the magnification into its CTF but
  not into its projection, and ignores beam tilt and odd terms: tests/test_optics.py).

Each aberrated dataset is reconstructed, each run its own process with ``--threads``
threads, by ``cryosplat backproject`` and ``cryosplat reconstruct`` from its STAR (optics
modelled) and from a copy whose optics table lacks the aberration columns (ignored); the
relion_project dataset also by ``relion_reconstruct --ctf``. Every map is compared with the
ground truth (FSC 0.5 and 0.143 crossings, mean FSC). Writes ``optics_<device>.json``.

    .venv/bin/python benchmarks/optics.py [--particles 2000] [--box 64] [--pixel-size 1.5]
        [--snr 0.05] [--threads 2] [--workdir DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import starfile
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

OPTICS = {"--beam-tilt": "1.0,-0.6", "--odd-zernike": "0,0,150,0,0,100",
          "--even-zernike": "0,0,0,0,400,0,0,0,300", "--mag-matrix": "1.015,0.006,-0.004,0.99"}
ABERRATION_COLUMNS = ("rlnBeamTiltX", "rlnBeamTiltY", "rlnOddZernike", "rlnEvenZernike",
                      "rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11")


def without(star: Path, columns, out: Path) -> Path:
    """A copy of ``star`` whose optics table lacks ``columns`` (the optics then ignored)."""
    tables = starfile.read(star, always_dict=True)
    tables["optics"] = tables["optics"].drop(columns=[c for c in columns
                                                      if c in tables["optics"]])
    starfile.write(tables, out, overwrite=True)
    return out


def only(star: Path, keep, out: Path) -> Path:
    """A copy of ``star`` with only the aberration ``keep`` of its optics table."""
    return without(star, [c for c in ABERRATION_COLUMNS if c not in keep], out)



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    simulation_arguments(ap, particles=2000, box=64, workdir="/tmp/cryosplat_optics_bench")
    args = ap.parse_args()
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cli = [sys.executable, "-m", "cryosplat"]
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    common = ["--particles", str(args.particles), "--box", str(args.box), "--pixel-size",
              str(args.pixel_size), "--snr", str(args.snr), "--seed", "5", "--force"]
    for name, extra in (("clean", []), ("aberrated", [x for kv in OPTICS.items() for x in kv])):
        run_child([*cli, "simulate", "--out", str(work / name), *common, *extra], env)
    sim = work / "aberrated"
    truth = torch.from_numpy(read_volume(sim / "ground_truth.mrc")[0])
    box, pix = args.box, args.pixel_size
    datasets = {"clean": (work / "clean" / "particles.star", None),
                "aberrated": (sim / "particles.star",
                              without(sim / "particles.star", ABERRATION_COLUMNS,
                                      sim / "ignored.star"))}
    if HAVE_RELION:
        even = only(sim / "particles.star", ("rlnEvenZernike",), sim / "even.star")
        star, _, _, _ = relion_project_noisy(sim / "ground_truth.mrc", even, sim, args.snr, env)
        datasets["relion_even"] = (star, without(star, ABERRATION_COLUMNS,
                                                 sim / "relion_ignored.star"))
    rows = []
    for name, (modelled, ignored) in datasets.items():
        row = {"dataset": name, "particles": args.particles, "box": box, "pixel_size_A": pix,
               "snr": args.snr, "optics": OPTICS if name == "aberrated" else
               ({"--even-zernike": OPTICS["--even-zernike"]} if name == "relion_even" else {})}
        for how, star in (("modelled", modelled), ("ignored", ignored)):
            if star is None:
                continue
            for cmd in ("backproject", "reconstruct"):
                out = work / name / f"{cmd}_{how}"
                _, wall, rss = run_child([*cli, cmd, str(star), "--out", str(out), "--force",
                                          "--datadir", str(star.parent), "--truth",
                                          str(sim / "ground_truth.mrc"),
                                          *(["--device", args.device] if cmd == "reconstruct"
                                            else [])], env)
                fig = {"wall_s": wall, "peak_rss_MiB": rss,
                       **truth_figures(out / "map.mrc", truth, box, pix)}
                row[f"{cmd}_{how}"] = fig
                print(f"{name} {cmd} ({how}): {wall:.0f} s, FSC vs truth 0.5 {fig['0.5']:.2f} Å, "
                      f"0.143 {fig['0.143']:.2f} Å, mean {fig['mean_fsc']:.4f}", flush=True)
        if name == "relion_even":
            out = work / name / "relion.mrc"
            out.parent.mkdir(parents=True, exist_ok=True)
            _, wall, rss = run_child(["relion_reconstruct", "--i", str(modelled), "--o", str(out),
                                      "--ctf", "--angpix", str(pix)], env, cwd=sim)
            row["relion_reconstruct"] = {"wall_s": wall, "peak_rss_MiB": rss,
                                         **truth_figures(out, truth, box, pix)}
            print(f"{name} relion_reconstruct: mean FSC "
                  f"{row['relion_reconstruct']['mean_fsc']:.4f}", flush=True)
        rows.append(row)
        write_json({"machine": machine(), "threads": args.threads, "datasets": rows}, args.out,
                   f"optics_{args.device}.json")
    print(json.dumps({r["dataset"]: {k: v["mean_fsc"] for k, v in r.items()
                                     if isinstance(v, dict) and "mean_fsc" in v} for r in rows},
                     indent=1))


if __name__ == "__main__":
    main()
