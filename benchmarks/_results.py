"""What every benchmark records about the machine it ran on, and how it writes its figures."""

from __future__ import annotations

import json
import platform
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
