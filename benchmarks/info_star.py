"""Time `cryosplat info` on a RELION 3.1 STAR file of many particles whose stacks do not
exist (so nothing can read images). Prints the figures and writes JSON.

    .venv/bin/python benchmarks/info_star.py [--particles 100000] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from _results import machine, run_child, write_json


def write_big_star(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    optics = pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnOpticsGroupName": ["g1", "g2"],
                           "rlnImagePixelSize": [1.1, 1.3], "rlnImageSize": [256, 256],
                           "rlnImageDimensionality": [2, 2], "rlnVoltage": [300.0, 200.0],
                           "rlnSphericalAberration": [2.7, 2.7],
                           "rlnAmplitudeContrast": [0.1, 0.1]})
    stack = rng.integers(0, 500, n)
    parts = pd.DataFrame({
        "rlnImageName": [f"{i % 200 + 1:06d}@Extract/job012/mic{s:04d}.mrcs"
                         for i, s in enumerate(stack)],
        "rlnAngleRot": rng.uniform(-180, 180, n), "rlnAngleTilt": rng.uniform(0, 180, n),
        "rlnAnglePsi": rng.uniform(-180, 180, n), "rlnOriginXAngst": rng.normal(0, 3, n),
        "rlnOriginYAngst": rng.normal(0, 3, n), "rlnDefocusU": rng.uniform(8000, 30000, n),
        "rlnDefocusV": rng.uniform(8000, 30000, n), "rlnDefocusAngle": rng.uniform(-90, 90, n),
        "rlnPhaseShift": np.zeros(n), "rlnCtfBfactor": np.zeros(n),
        "rlnRandomSubset": rng.integers(1, 3, n), "rlnOpticsGroup": rng.integers(1, 3, n)})
    starfile.write({"optics": optics, "particles": parts}, path, float_format="%.6f")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--particles", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        star = Path(tmp) / "particles.star"
        write_big_star(star, args.particles)
        out, wall, rss = run_child([sys.executable, "-m", "cryosplat", "info", str(star), "--json"])
        summary = json.loads(out)
    result = {"benchmark": "info_star", "particles": args.particles,
              "wall_s": round(wall, 3), "peak_rss_MiB": round(rss, 1),
              "read_particles": summary["particles"], **machine()}
    print(json.dumps(result, indent=2))
    write_json(result, args.out, "info_star.json")


if __name__ == "__main__":
    main()
