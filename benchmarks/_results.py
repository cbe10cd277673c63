"""What every benchmark shares: the machine it ran on, how it runs and measures a child process,
and how it writes its figures."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


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


def run_child(cmd: list[str], env: dict | None = None,
              cwd: str | Path | None = None) -> tuple[str, float, float]:
    """Run ``cmd`` (``env`` added to this environment, in ``cwd``); return its stdout, its wall
    seconds and its own peak RSS in MiB (``os.wait4`` on its pid, so other children do not
    count). Exits with the command and the end of its stderr if it fails."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=cwd,
                                env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{err.read()[-3000:]}")
        return out.read(), wall, usage.ru_maxrss / 1024
