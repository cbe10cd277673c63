"""A run's direct-inversion baseline folder: ``cryosplat backproject``'s outputs, and for a
Gaussian run the half-sets' direct maps in ``DIR/backprojection`` that cross-validate it
(made once; a resumed run reads them back)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryosplat.backproject import Backprojection, backproject, direct_maps
from cryosplat.evaluate import evaluate_maps
from cryosplat.fourier_slice import Insertion
from cryosplat.io import Particles, read_volume
from cryosplat.io.atomic import write_json
from cryosplat.io.mrc import read_map_like, write_maps
from cryosplat.mapviews import plot_map_views
from cryosplat.progress import ProgressFactory, no_progress
from cryosplat.report import embed_png, map_section, write_evaluation, write_page
from cryosplat.summary import BackprojectionSummary
from cryosplat.symmetry import symmetry_or_none


@dataclass
class Baseline:
    """The half-sets' direct reconstructions that validate a Gaussian run: the backprojection
    folder's summary and the two half-maps `(D, D, D)`."""

    summary: BackprojectionSummary
    half_maps: tuple[torch.Tensor, torch.Tensor]


def optional_map(path: str | Path | None, p: Particles, what: str) -> torch.Tensor | None:
    """The map at ``path`` on the particles' grid (``what`` names it in errors), or None."""
    return None if path is None else read_map_like(path, p.box_size, p.require_single_pixel_size(),
                                                   what)


def run_backprojection(p: Particles, out: Path, half: np.ndarray, truth=None, mask=None,
                       progress: ProgressFactory = no_progress,
                       label: str = "backprojecting",
                       insertions: tuple[Insertion, Insertion] | None = None,
                       symmetry: str = "C1") -> tuple[BackprojectionSummary, Backprojection]:
    """Backproject ``p`` with half-sets ``half`` into out/ (maps, fsc.csv, fsc.png,
    map_views.png, summary.json, report.html), each half-set symmetrised by the point group
    ``symmetry``, or invert the half-sets' ``insertions`` when given (the first becomes their
    sum). Returns (the summary, the :class:`Backprojection`)."""
    pix = p.require_single_pixel_size()
    out.mkdir(parents=True, exist_ok=True)
    if insertions is not None:
        result = direct_maps(*insertions)
    else:
        with progress(label, len(p), 0) as advance:
            result = backproject(p, half, progress=advance,
                                 symmetry=symmetry_or_none(symmetry))
    write_maps(out, {"map": result.map, "half_map_1": result.half_map_1,
                      "half_map_2": result.half_map_2}, pix, "backprojection")
    e = evaluate_maps(result.half_map_1, result.half_map_2, pix,
                      optional_map(truth, p, "ground truth"),
                      mask=optional_map(mask, p, "mask"), full_map=result.map)
    write_evaluation(out, e, p.box_size, pix, "direct Fourier inversion")
    plot_map_views(out / "map_views.png", result.map.numpy(), pix, title="map.mrc")
    summary = BackprojectionSummary(len(p), p.box_size, pix, symmetry, e.headline(),
                                    e.resolutions_A)
    write_json(out / "summary.json", summary.to_json())
    write_page(out, "cryosplat backproject", f"<p>{len(p)} particles, direct Fourier "
               f"inversion; half-maps {summary.headline.half_map_resolution_A:.2f} Å at 0.143 "
               f"(unmasked).</p>{map_section(out, 'map.mrc')}<h2>FSC</h2>"
               f"{embed_png(out / 'fsc.png')}")
    return summary, result


def validation_references(p: Particles, out: Path, half: np.ndarray, truth, mask,
                          progress: ProgressFactory = no_progress,
                          insertions: tuple[Insertion, Insertion] | None = None,
                          symmetry: str = "C1"
                          ) -> Baseline:
    """The half-sets' direct reconstructions in out/backprojection, made once (a resumed run
    reads them back): the unbiased references of the cross-validated FSC, and the baseline.
    ``insertions``: the half-sets' insertions, when already made (the first is consumed;
    already symmetrised); else they are made with ``symmetry``."""
    folder = out / "backprojection"
    files = [folder / f"half_map_{i}.mrc" for i in (1, 2)] + [folder / "summary.json"]
    if all(f.is_file() for f in files):
        h1, h2 = (torch.from_numpy(read_volume(f)[0]) for f in files[:2])
        return Baseline(BackprojectionSummary.read(files[2]), (h1, h2))
    summary, result = run_backprojection(p, folder, half, truth, mask, progress,
                                         label="validation: direct inversion of each half-set",
                                         insertions=insertions, symmetry=symmetry)
    return Baseline(summary, (result.half_map_1, result.half_map_2))
