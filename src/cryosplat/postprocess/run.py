"""One post-processing folder: :func:`~cryosplat.postprocess.sharpen.postprocess` of two
half-maps, written as postprocess.mrc, postprocess_masked.mrc, postprocess_mask.mrc,
fsc.csv/png, guinier.png, map_views.png, summary.json and report.html. ``cryosplat
postprocess`` makes one from two MRC files (:func:`postprocess_files`, then
:func:`write_postprocess`); ``reconstruct`` from its own half-maps
(:func:`postprocess_half_maps`, into DIR/postprocess)."""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path

import torch

from cryosplat.errors import InputError
from cryosplat.io.atomic import write_json
from cryosplat.io.mrc import read_map_like, read_volume, write_maps
from cryosplat.mapviews import plot_map_views
from cryosplat.postprocess.sharpen import PostProcessed, postprocess
from cryosplat.report import (
    embed_png,
    map_section,
    postprocess_paragraph,
    pyplot,
    save_figure,
    write_fsc,
    write_page,
)


def plot_guinier(path, result: PostProcessed) -> None:
    """guinier.png: ln mean amplitude per shell against 1/d² for the input, FSC-weighted and
    sharpened map, the fitted line over its range, and the resolution."""
    plt = pyplot()
    g = result.guinier
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for name, y in g.ln_amplitude.items():
        ax.plot(g.k2_per_A2[1:], y[1:], label=name)
    if g.fitted.any():
        x = g.k2_per_A2[g.fitted]
        ax.plot(x, g.intercept + g.slope * x, "k--",
                label=f"fit {g.fit_range_A[0]:.1f}-{g.fit_range_A[1]:.1f} Å: "
                      f"B = {result.bfactor_A2:.0f} Å²")
    ax.axvline(1 / result.resolution_A**2, color="grey", lw=0.8, ls=":",
               label=f"resolution {result.resolution_A:.2f} Å")
    ax.set_xlabel("1/d² (1/Å²)")
    ax.set_ylabel("ln(mean amplitude)")
    ax.set_title(f"Guinier plot; sharpened with B = {result.bfactor_A2:.0f} Å²")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def write_postprocess(out_dir, result: PostProcessed, voxel_size_A: float, source: str) -> dict:
    """A post-processing folder: postprocess.mrc (sharpened, FSC-weighted, low-passed),
    postprocess_masked.mrc, postprocess_mask.mrc, fsc.csv/png, guinier.png, summary.json and
    report.html. ``source`` says where the half-maps came from. Returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    maps = {"postprocess": result.map, "postprocess_masked": result.masked_map,
            "postprocess_mask": result.mask}
    write_maps(out, maps, voxel_size_A, "postprocess")
    box = result.map.shape[-1]
    write_fsc(out / "fsc.csv", out / "fsc.png", result.curves, box, voxel_size_A,
              f"post-processing of {source}")
    plot_guinier(out / "guinier.png", result)
    summary = {**result.summary(), "half_maps": source, "box_size": box,
               "pixel_size_A": voxel_size_A, "maps": {k: str(out / f"{k}.mrc") for k in maps}}
    write_json(out / "summary.json", summary)

    plot_map_views(out / "map_views.png", result.masked_map.numpy(), voxel_size_A,
                   title="postprocess_masked.mrc")
    write_page(out, "cryosplat postprocess", f"<p>{html.escape(source)}</p>"
               f"{postprocess_paragraph(summary)}{map_section(out, 'postprocess_masked.mrc')}"
               f"<h2>FSC</h2>{embed_png(out / 'fsc.png')}<h2>Guinier plot</h2>"
               f"{embed_png(out / 'guinier.png')}")
    return summary


def postprocess_half_maps(half_map_1: torch.Tensor, half_map_2: torch.Tensor,
                          voxel_size_A: float, mask: torch.Tensor | None, out: Path, source: str,
                          log: Callable[[str], None], resolution_A: float | None = None) -> dict:
    """A run's own half-maps post-processed into the folder ``out`` with RELION's defaults
    (auto-mask unless ``mask``, B-factor fitted from 10 Å). Returns the summary, or
    ``{"error": why}`` when the maps cannot be post-processed (e.g. fewer than 3 shells finer
    than 10 Å for the Guinier fit): the run's other outputs stand, and its log, summary and
    terminal say why. ``resolution_A``: the run's cross-validated resolution, when it has one
    (:func:`cryosplat.postprocess.sharpen.postprocess`)."""
    try:
        result = postprocess(half_map_1, half_map_2, voxel_size_A, mask,
                             resolution_A=resolution_A)
    except ValueError as e:
        log(f"post-processing not done: {e}")
        return {"error": str(e)}
    summary = write_postprocess(out, result, voxel_size_A, source)
    log(f"post-processed: {summary['resolution_A']:.2f} Å, B-factor {summary['bfactor_A2']:.0f} "
        f"Å² ({out})")
    return summary


def postprocess_files(half_map_1: Path, half_map_2: Path, mask: Path | None = None,
                      bfactor_A2: float | None = None, fit_low_A: float = 10.0
                      ) -> tuple[PostProcessed, float]:
    """``cryosplat postprocess``: read and check the two half-maps (and ``mask``) and
    post-process them, writing nothing (so bad input leaves no folder behind). Returns the
    result and the voxel size (Å); :func:`write_postprocess` writes it."""
    a, pix = read_volume(half_map_1)
    if a.ndim != 3 or len(set(a.shape)) != 1:
        raise InputError(half_map_1, f"expected a cubic map; it is {a.shape}")
    d = a.shape[0]
    b = read_map_like(half_map_2, d, pix, "half-map 2")
    m = None if mask is None else read_map_like(mask, d, pix, "mask")
    try:
        return postprocess(torch.from_numpy(a), b, pix, m, bfactor_A2, fit_low_A), pix
    except ValueError as e:
        raise InputError(half_map_1, str(e)) from e
