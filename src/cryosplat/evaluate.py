"""Fourier shell correlation and resolution."""

from __future__ import annotations

import numpy as np
import torch


def fsc(map_a: torch.Tensor, map_b: torch.Tensor) -> torch.Tensor:
    """FSC of two `(D, D, D)` maps (torch-fourier-shell-correlation): `(D//2 + 1,)`.

    Shell ``i`` is at spatial frequency ``i / (D * voxel_size_A)``.
    """
    from torch_fourier_shell_correlation import fsc as _fsc

    if map_a.shape != map_b.shape:
        raise ValueError(f"maps differ in shape: {tuple(map_a.shape)} vs {tuple(map_b.shape)}")
    return _fsc(map_a.double(), map_b.double()).float()


def shell_frequencies(box_size: int, voxel_size_A: float) -> np.ndarray:
    """Spatial frequency of each FSC shell, 1/Å: `(D//2 + 1,)`."""
    return np.arange(box_size // 2 + 1) / (box_size * voxel_size_A)


def resolution_A(curve: torch.Tensor | np.ndarray, box_size: int, voxel_size_A: float,
                 threshold: float = 0.143) -> float:
    """Resolution (Å) where the FSC first falls below ``threshold``, linearly interpolated.

    Shell 0 is ignored. If the curve never falls below it, Nyquist (2 x voxel size).
    """
    c = np.asarray(curve, dtype=np.float64)
    k = shell_frequencies(box_size, voxel_size_A)
    below = np.nonzero(c[1:] < threshold)[0]
    if below.size == 0:
        return 2 * voxel_size_A
    i = int(below[0]) + 1
    if i == 1:
        return float(1 / k[1])
    f = k[i - 1] + (c[i - 1] - threshold) / (c[i - 1] - c[i]) * (k[i] - k[i - 1])
    return float(1 / f)


def write_fsc(out_csv, out_png, curves: dict[str, np.ndarray], box_size: int,
              voxel_size_A: float, title: str = "") -> None:
    """fsc.csv (one column per curve) and fsc.png with the 0.143 and 0.5 lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cryosplat.io.mrc import atomic_path

    k = shell_frequencies(box_size, voxel_size_A)
    header = "shell,frequency_per_A,resolution_A," + ",".join(curves)
    rows = [[i, k[i], (1 / k[i]) if k[i] > 0 else float("inf"), *(float(c[i]) for c in curves.values())]
            for i in range(len(k))]
    with atomic_path(out_csv) as tmp:
        np.savetxt(tmp, np.asarray(rows), delimiter=",", header=header, comments="", fmt="%.6g")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, c in curves.items():
        res = resolution_A(c, box_size, voxel_size_A)
        ax.plot(k[1:], np.asarray(c)[1:], label=f"{name}: {res:.2f} Å")
    for t in (0.143, 0.5):
        ax.axhline(t, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("spatial frequency (1/Å) and resolution")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ticks = [t for t in ax.get_xticks() if 0 < t <= k[-1] * 1.001]
    ax.set_xticks(ticks, [f"{t:.2f}\n{1 / t:.1f} Å" for t in ticks])
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
