"""What every benchmark shares: the machine it ran on, how it runs and measures a child process,
and how it writes its figures."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HAVE_RELION = bool(shutil.which("relion_reconstruct") and shutil.which("relion_project"))


def relion_project_noisy(truth: Path, star: Path, out_dir: Path, snr: float,
                         env: dict | None = None) -> tuple[Path, float, float, float]:
    """Re-project ``truth`` with RELION's ``relion_project --ctf`` at the poses, shifts and CTF
    of ``star``, then again with white noise of the sigma that gives ``snr`` (the clean
    images' mean variance over sigma²). Returns the noisy STAR, the two runs' wall seconds,
    the noisy run's peak RSS in MiB and sigma."""
    import mrcfile

    rp = ["relion_project", "--i", str(truth), "--ang", str(star), "--ctf"]
    _, w1, _ = run_child([*rp, "--o", str(out_dir / "clean")], env)
    var = float(mrcfile.read(out_dir / "clean.mrcs").var(axis=(1, 2)).mean())
    sigma = (var / snr) ** 0.5
    _, w2, rss = run_child([*rp, "--o", str(out_dir / "relion"), "--add_noise", "--white_noise",
                            f"{sigma:.6g}"], env)
    return out_dir / "relion.star", w1 + w2, rss, sigma


def truth_fsc(volume: Path, truth):
    """FSC of the map in ``volume`` against the ``truth`` tensor."""
    import mrcfile
    import torch

    from cryosplat.evaluate import fsc

    return fsc(torch.from_numpy(mrcfile.read(volume).copy()), truth)


def truth_figures(volume: Path, truth, box: int, pix: float) -> dict:
    """A map's FSC against ``truth``: the 0.5 and 0.143 crossings (Å), the mean FSC and the
    curve."""
    import numpy as np

    curve = truth_fsc(volume, truth).numpy()
    return {**crossings(curve, box, pix), "mean_fsc": float(np.mean(curve[1:])),
            "fsc_truth": [float(c) for c in curve]}


def simulation_arguments(ap, particles: int, box: int, workdir: str) -> None:
    """The options every simulate-and-reconstruct benchmark takes, with their defaults."""
    ap.add_argument("--particles", type=int, default=particles)
    ap.add_argument("--box", type=int, default=box)
    ap.add_argument("--pixel-size", type=float, default=1.5)
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", type=Path, default=Path(workdir))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")


def crossings(curve, box: int, pix: float) -> dict:
    """Where ``curve`` first falls below 0.143 and 0.5 (Å)."""
    from cryosplat.evaluate import resolution_A

    return {"0.143": resolution_A(curve, box, pix), "0.5": resolution_A(curve, box, pix, 0.5)}


def shells(a_A: float, b_A: float, box: int, pix: float) -> float:
    """How many Fourier shells ``a`` lies beyond ``b`` (positive: ``a`` is finer)."""
    return (1 / a_A - 1 / b_A) * box * pix


def machine() -> dict:
    """torch's CPU threads, the processor and torch's version, for a result's JSON."""
    import torch

    return {"threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__}


def write_json(result: dict, out_dir: Path, name: str) -> Path:
    """Write ``result`` to ``out_dir/name`` (made if missing), say where, and return the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return path


# Runs argv[2:] as its child and writes the child's peak RSS (KiB) to the file argv[1]. A
# child's ru_maxrss counts the memory of the process it was forked from up to its exec, so a
# child forked from a benchmark that holds torch and maps would report at least that: this
# launcher, started without site packages, is what the command is forked from instead.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_child(cmd: list[str], env: dict | None = None,
              cwd: str | Path | None = None) -> tuple[str, float, float]:
    """Run ``cmd`` (``env`` added to this environment, in ``cwd``); return its stdout, its wall
    seconds and its own peak RSS in MiB (``os.wait4`` on its pid, forked from a small launcher
    whose own memory, about 10 MiB, bounds what is counted beyond the command's). Exits with
    the command and the end of its stderr if it fails."""
    t0 = time.perf_counter()
    with (tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err,
          tempfile.NamedTemporaryFile("r") as rss):
        proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, rss.name, *cmd],
                              stdout=out, stderr=err, text=True, cwd=cwd,
                              env={**os.environ, **(env or {})}, check=False)
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{err.read()[-3000:]}")
        return out.read(), wall, int(rss.read()) / 1024
