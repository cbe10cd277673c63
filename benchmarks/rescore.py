"""Score the resolution a Gaussian run prints against the truth, again, on a suite's kept data.

When only the evaluation changes (how the printed resolution is estimated, not the fit), the
fits of a ``suite.py --workdir DIR`` run need not be made again: for each dataset folder in
DIR with a finished ``reconstruct`` (or ``reconstruct_images``) this reads the half-maps, the
half-sets' direct maps (``backprojection/``) and ``sim/ground_truth.mrc``, evaluates them
exactly as the end of ``cryosplat reconstruct`` does (:func:`cryosplat.evaluate.evaluate_maps`
with no user mask) and prints, per dataset, the headline resolution
(:attr:`cryosplat.summary.Headline.resolution_A`), the map's FSC 0.5 against the truth and
the distance between them in Fourier shells (positive: the printed figure is finer than the
map). Writes ``rescore.json`` to --out.

    .venv/bin/python benchmarks/rescore.py DIR [--run reconstruct] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from _results import crossings, machine, shells, write_json
from cryosplat.evaluate import evaluate_maps, fsc
from cryosplat.io.mrc import read_volume


def rescore(folder: Path, run: str) -> dict | None:
    rec = folder / run
    files = [rec / "half_map_1.mrc", rec / "half_map_2.mrc",
             rec / "backprojection" / "half_map_1.mrc", rec / "backprojection" / "half_map_2.mrc",
             folder / "sim" / "ground_truth.mrc"]
    if not all(f.is_file() for f in files):
        return None
    maps = [torch.from_numpy(read_volume(f)[0]) for f in files]
    pix = read_volume(files[0])[1]
    box = maps[0].shape[-1]
    e = evaluate_maps(maps[0], maps[1], pix, maps[4], (maps[2], maps[3]))
    h = e.headline()
    truth = crossings(fsc((maps[0] + maps[1]) / 2, maps[4]).numpy(), box, pix)
    return {"name": folder.name, "box": box, "pixel_size_A": pix,
            "printed_resolution_A": h.resolution_A, "printed_is_limit": h.resolution_is_limit,
            "half_map_resolution_A": h.half_map_resolution_A, "truth_resolution_A": truth,
            "printed_shells_beyond_truth_0.5": shells(h.resolution_A, truth["0.5"], box, pix),
            "half_map_shells_beyond_truth_0.5": shells(h.half_map_resolution_A, truth["0.5"],
                                                       box, pix)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir", type=Path, help="a suite.py --workdir")
    ap.add_argument("--run", default="reconstruct", help="the run folder in each dataset's")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    rows = []
    for folder in sorted(p for p in args.workdir.iterdir() if p.is_dir()):
        row = rescore(folder, args.run)
        if row is None:
            continue
        rows.append(row)
        limit = "or better" if row["printed_is_limit"] else ""
        print(f"{row['name']:16} printed {row['printed_resolution_A']:5.2f} Å {limit:9} | map vs "
              f"truth 0.5 {row['truth_resolution_A']['0.5']:5.2f} Å | printed "
              f"{row['printed_shells_beyond_truth_0.5']:+5.1f} shells from it (half-maps 0.143 "
              f"{row['half_map_resolution_A']:5.2f} Å: "
              f"{row['half_map_shells_beyond_truth_0.5']:+5.1f})", flush=True)
    worst = max(rows, key=lambda r: r["printed_shells_beyond_truth_0.5"]) if rows else None
    result = {**machine(), "workdir": str(args.workdir), "run": args.run, "datasets": rows,
              "most_optimistic": None if worst is None else worst["name"]}
    write_json(result, args.out, f"rescore_{args.run}.json")


if __name__ == "__main__":
    main()
