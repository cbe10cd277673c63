"""Every figure and file of a run's report: fsc.csv and fsc.png, the loss curve and
resolution against time, a montage of particles beside their renders, and report.html that
shows them on one page; the Guinier plot and the page section of a post-processing.

matplotlib is imported when the first figure is drawn, not with this module: it costs about
0.4 s, which every command would pay at start-up (``cryosplat info`` draws nothing)."""

from __future__ import annotations

import base64
import csv
import html
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cryosplat.evaluate import CROSS_VALIDATION_CURVES, Evaluation, resolution_A
from cryosplat.fourier import shell_frequencies
from cryosplat.io.atomic import atomic_path
from cryosplat.summary import RunSummary

HALF_MAP_CAUTION = (
    "The half-map FSC of two Gaussian mixtures overestimates the resolution where the data "
    "run out: beyond the last shell the half-sets' data measure, both mixtures extrapolate "
    "the same low-resolution map with the same prior, and the half-map FSC counts that shared "
    "extrapolation as signal. On a realistic simulated set (4AKE, box 80, 1.2 Å, 4000 "
    "particles, suite dataset 4ake-real-80) the halves agreed above 0.143 to Nyquist (2.40 Å) "
    "while the map's FSC against the ground truth crossed 0.5 at 2.89 Å. The resolution "
    "reported is the cross-validated one, which checks the map against the half-sets' direct "
    "maps (3.00 Å or better there); the half-map figures are shown for comparison only "
    "(docs/reconstruct.md).")


def pyplot():
    """matplotlib.pyplot with the Agg backend, imported on the first figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> None:
    """Write ``fig`` to ``path`` as PNG atomically, then close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    pyplot().close(fig)


def write_fsc(out_csv, out_png, curves: dict[str, np.ndarray], box_size: int,
              voxel_size_A: float, title: str = "", labels: dict[str, str] | None = None,
              second_panel: list[str] | None = None) -> None:
    """fsc.csv (one quoted column per curve) and fsc.png with the 0.143 and 0.5 lines.

    Each curve is labelled with its 0.143 resolution unless ``labels`` names it; curves named
    in ``second_panel`` are drawn in a second plot beside the first. NaN (undefined) shells
    are left blank in the plot and written as ``nan``.
    """
    plt = pyplot()
    k = shell_frequencies(box_size, voxel_size_A)
    with atomic_path(out_csv) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, quoting=csv.QUOTE_MINIMAL)
        w.writerow(["shell", "frequency_per_A", "resolution_A", *curves])
        for i in range(len(k)):
            w.writerow([i, f"{k[i]:.6g}", f"{1 / k[i]:.6g}" if k[i] > 0 else "inf",
                        *(f"{float(c[i]):.6g}" for c in curves.values())])
    labels = labels or {}
    second = [n for n in (second_panel or []) if n in curves]
    panels = [[n for n in curves if n not in second]] + ([second] if second else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), dpi=120, squeeze=False)
    for ax, names in zip(axes[0], panels):
        for name in names:
            c = np.asarray(curves[name], dtype=np.float64)
            label = labels.get(name, f"{name}: {resolution_A(c, box_size, voxel_size_A):.2f} Å")
            ax.plot(k[1:], c[1:], label=label)
        for t in (0.143, 0.5):
            ax.axhline(t, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("spatial frequency (1/Å) and resolution")
        ax.set_ylabel("FSC")
        ax.set_ylim(-0.1, 1.05)
        ax.legend(fontsize=7, loc="lower left")
        ticks = [t for t in ax.get_xticks() if 0 < t <= k[-1] * 1.001]
        ax.set_xticks(ticks, [f"{t:.2f}\n{1 / t:.1f} Å" for t in ticks])
    axes[0][0].set_title(title)
    if second:
        axes[0][1].set_title("cross-validation against the half-sets' direct maps")
    fig.tight_layout()
    save_figure(fig, out_png)


def write_evaluation(out_dir, evaluation: Evaluation, box_size: int, voxel_size_A: float,
                     title: str) -> None:
    """fsc.csv and fsc.png of an :class:`~cryosplat.evaluate.Evaluation`: its cross-validation
    curves, when it has them, in a second panel, the estimate labelled with its resolution."""
    out = Path(out_dir)
    cv_names = [n for n in CROSS_VALIDATION_CURVES.values() if n in evaluation.curves]
    labels = {}
    if evaluation.cross_validated:
        phrase = evaluation.headline().describe_cross_validated(short=True)
        labels = {n: f"{n}: {phrase} at 0.5" if "cross-validated" in n else n for n in cv_names}
    write_fsc(out / "fsc.csv", out / "fsc.png", evaluation.curves, box_size, voxel_size_A, title,
              labels=labels, second_panel=cv_names or None)


def plot_training(path, trace: list[list[float]], history: list[dict]) -> None:
    """loss.png: per-step loss of both halves, and resolution (Å) against wall time."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    t = np.asarray(trace, dtype=float)
    if len(t):
        for i, name in ((1, "half 1"), (2, "half 2")):
            a.plot(t[:, 0], t[:, i], lw=0.7, label=name)
        if t.shape[1] >= 5:  # objective "volume": the held-out particles' loss too
            for i, name in ((3, "half 1, held out"), (4, "half 2, held out")):
                a.plot(t[:, 0], t[:, i], "--", lw=0.7, label=name)
    a.set_xlabel("step")
    if len(t) and np.nanmin(t[:, 1:]) > 0:
        a.set_ylabel("MSE loss")
        a.set_yscale("log")
    else:  # the accumulated-sums loss is the image MSE less an unknown constant
        a.set_ylabel("loss (image MSE less a constant)")
    a.legend(fontsize=8)
    times = [r["time_s"] for r in history]
    b.plot(times, [r["half_map_resolution_A"] for r in history], "o-", label="half-maps (0.143)")
    if history and history[0].get("cross_validated_resolution_A") is not None:
        b.plot(times, [r["cross_validated_resolution_A"] for r in history], "D-",
               label="cross-validated (0.5; the printed figure)")
    if history and "truth_resolution_A_0.143" in history[0]:
        b.plot(times, [r["truth_resolution_A_0.143"] for r in history], "s-",
               label="vs truth (0.143)")
        b.plot(times, [r["truth_resolution_A_0.5"] for r in history], "^-", label="vs truth (0.5)")
    b.set_xlabel("wall time (s)")
    b.set_ylabel("resolution (Å)")
    b.invert_yaxis()
    b.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_montage(path, particles: np.ndarray, renders: np.ndarray) -> None:
    """montage.png: particles (top row) above the model's CTF-modulated renders (bottom)."""
    plt = pyplot()
    n = len(particles)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), dpi=110, squeeze=False)
    for i in range(n):
        for row, img in ((0, particles[i]), (1, renders[i])):
            ax = axes[row, i]
            ax.imshow(img, cmap="gray", origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, i].set_title(f"particle {i + 1}", fontsize=7)
    axes[0, 0].set_ylabel("particle", fontsize=8)
    axes[1, 0].set_ylabel("render", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_pose_changes(path, changes: dict[str, np.ndarray], half_set: np.ndarray,
                      history: list[dict]) -> None:
    """pose_changes.png (``cryosplat refine``): histograms of each particle's change of angle,
    origin and defocus from its input pose, per half-set, and the median change per iteration."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4), dpi=110)
    for ax, (key, label) in zip(axes, (("angle_deg", "rotation change (°)"),
                                       ("shift_A", "origin change (Å)"),
                                       ("defocus_A", "defocus change (Å)"))):
        for h in (1, 2):
            ax.hist(changes[key][half_set == h], bins=50, histtype="step", label=f"half {h}")
        ax.set_xlabel(label)
        ax.set_ylabel("particles")
        ax.legend(fontsize=8)
    b = axes[3]
    its = [r["iteration"] for r in history]
    for h in (1, 2):
        b.plot(its, [r[f"half_{h}"]["median_angle_deg"] for r in history], "o-",
               label=f"half {h}: median rotation step (°)")
        b.plot(its, [r[f"half_{h}"]["limit_A"] for r in history], "s--",
               label=f"half {h}: alignment limit (Å)")
    b.set_xlabel("iteration")
    b.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def plot_global_stage(path, history: list[dict]) -> None:
    """global_stage.png (``cryosplat refine --global``): per iteration, the limit searched to
    and the half-maps' FSC-0.143 resolution (Å), and each half-set's median rotation change."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    its = [r["iteration"] for r in history]
    a.plot(its, [r["limit_A"] for r in history], "o-", label="search limit")
    a.plot(its, [r["resolution_A"] for r in history], "s--", label="half-maps' FSC 0.143")
    a.set_xlabel("iteration")
    a.set_ylabel("Å")
    a.legend(fontsize=8)
    for h in (0, 1):
        b.plot(its, [np.nan if r["median_change_deg"][h] is None else r["median_change_deg"][h]
                     for r in history], "o-", label=f"half {h + 1}")
    b.set_xlabel("iteration (global searches, then local)")
    b.set_ylabel("median rotation change (°)")
    b.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def postprocess_paragraph(pp: dict) -> str:
    """The report's paragraph on a post-processing's summary (``postprocess/summary.json``)."""
    return (f"<p><b>Post-processed</b> (masked, phase-randomisation corrected FSC at 0.143): "
            f"{pp['resolution_A']:.2f} Å; sharpened with B = {pp['bfactor_A2']:.0f} Å² and "
            f"low-passed at {pp['lowpass_A']:.2f} Å (postprocess.mrc).</p>")


def embed_png(f: Path) -> str:
    """An ``<img>`` holding the PNG ``f`` (base64), or a note that it is missing."""
    if not f.exists():
        return f"<p>({f.name} missing)</p>"
    data = base64.b64encode(f.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{f.name}">'


def write_page(out_dir, title: str, body: str) -> Path:
    """report.html in ``out_dir``: ``title`` and the HTML ``body`` (figures embedded with
    :func:`embed_png`, so the file can be mailed or moved alone)."""
    path = Path(out_dir) / "report.html"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}} td,th{{padding:2px 10px}}
img{{max-width:100%}}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"""
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def map_section(out: Path, what: str) -> str:
    """The report's pictures of the map (map_views.png, :mod:`cryosplat.mapviews`)."""
    return (f"<h2>Map</h2><p>{html.escape(what)}: central slices and projections along z, y "
            f"and x, and an isosurface.</p>{embed_png(out / 'map_views.png')}")


def _refinement_section(summary: RunSummary, img: Callable[[str], str]) -> str:
    r = summary.refinement
    if not r:
        return ""
    rows = "".join(
        f"<tr><td>{row['iteration']}</td>" + "".join(
            f"<td>{row[f'half_{h}']['limit_A']:.2f}</td><td>{row[f'half_{h}']['median_angle_deg']:.2f}"
            f"</td><td>{row[f'half_{h}']['median_shift_A']:.2f}</td>"
            f"<td>{row[f'half_{h}']['median_defocus_A']:.0f}</td>" for h in (1, 2))
        + f"<td>{row['particles_per_s']:.0f}</td></tr>" for row in r["iterations"])
    med = r["median_change_from_input"]
    g = r.get("global_stage")
    stage = "" if g is None else (
        "<h2>Global stage</h2><p>The particle file's poses were not read. Each half-set was "
        f"searched against its own map from {html.escape(g['reference'])} low-passed, in a "
        f"working box of {g['working_box']} px of {g['working_pixel_A']:.3g} Å, over "
        f"{len(g['history'])} iterations ({g['time_s']:.0f} s); poses in "
        f"{html.escape(g['poses_star'])}. The refinement below starts from them.</p>"
        + "<table><tr><th>iteration</th><th>search</th><th>limit (Å)</th><th>half-maps' FSC "
        "0.143 (Å)</th><th>median change (°)</th></tr>" + "".join(
            f"<tr><td>{h['iteration']}</td><td>{h['search']}</td><td>{h['limit_A']:.1f}</td>"
            f"<td>{h['resolution_A']:.1f}</td><td>"
            + ", ".join("–" if c is None else f"{c:.2f}" for c in h["median_change_deg"])
            + "</td></tr>"
            for h in g["history"]) + f"</table>{img('global_stage.png')}")
    if not r["iterations"]:
        return stage
    return (f"{stage}<h2>Refinement</h2><p>Median change from the input poses: "
            f"{med['angle_deg']:.2f}°, {med['shift_A']:.2f} Å of origin, {med['defocus_A']:.0f} Å "
            f"of defocus; refined poses in {html.escape(r['particles_star'])}.</p>"
            "<table><tr><th>iteration</th>" + "<th>limit (Å)</th><th>median step (°)</th>"
            "<th>(Å)</th><th>defocus (Å)</th>" * 2 + "<th>particles/s</th></tr>"
            f"{rows}</table><p>(half-set 1's columns, then half-set 2's)</p>"
            f"{img('pose_changes.png')}")


def _postprocess_section(pp: dict | None, img: Callable[[str], str]) -> str:
    """The report's post-processing section of ``postprocess/summary.json``'s contents (or
    the reason it was not done)."""
    if not pp:
        return ""
    if "error" in pp:
        return f"<h2>Post-processing</h2><p>Not done: {html.escape(pp['error'])}</p>"
    return (f"<h2>Post-processing</h2>{postprocess_paragraph(pp)}<p>In postprocess/: the "
            f"sharpened maps, their FSC and the Guinier plot.</p>{img('postprocess/guinier.png')}")


def write_report(out_dir: str | Path, summary: RunSummary, config: dict) -> Path:
    """report.html: resolutions, FSC, training curves, montage and the config on one page.
    The figures are embedded, so the file can be mailed or moved alone."""
    out = Path(out_dir)

    def img(name: str) -> str:
        return embed_png(out / name)

    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v['0.143']:.2f}</td>"
                   f"<td>{v['0.5']:.2f}</td></tr>" for k, v in summary.resolutions_A.items())
    cv = f"<p><b>Resolution: {html.escape(summary.headline.describe())}.</b></p>"
    files = "".join(f"<li>{html.escape(p.name)}</li>" for p in sorted(out.iterdir()) if p.is_file())
    stopped = "".join(f"<p>Half-set {i} stopped: {html.escape(str(w))}.</p>"
                      for i, w in enumerate(summary.stopped or [], 1))
    head = '<meta charset="utf-8"><title>cryosplat reconstruction</title>'
    views = map_section(out, "map.mrc, with half-set 1's Gaussian centres over the projection "
                             "along z")
    page = f"""<!doctype html><html><head>{head}
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}} td,th{{padding:2px 10px}}
img{{max-width:100%}} pre{{background:#f4f4f4;padding:8px}}</style></head><body>
<h1>cryosplat reconstruction</h1>
<p>{summary.particles} particles, box {summary.box_size} px of
{summary.pixel_size_A:.3f} Å, objective {html.escape(summary.objective)},
symmetry {html.escape(summary.symmetry)},
{' and '.join(str(n) for n in summary.gaussians) or '?'} Gaussians at the end,
{summary.steps} steps in {summary.train_time_s:.0f} s on {html.escape(summary.device)}.</p>
{stopped}
<h2>Resolution (Å)</h2>{cv}
<table><tr><th>FSC</th><th>0.143</th><th>0.5</th></tr>{rows}</table>
<p><b>Caution.</b> {html.escape(HALF_MAP_CAUTION)}</p>
{_refinement_section(summary, img)}{views}
<h2>FSC</h2>{img('fsc.png')}
{_postprocess_section(summary.postprocess, img)}
<h2>Training</h2>{img('loss.png')}
<h2>Particles and renders</h2>{img('montage.png')}
<h2>Configuration</h2><pre>{html.escape(json.dumps(config, indent=2))}</pre>
<h2>Files</h2><ul>{files}</ul></body></html>"""
    path = out / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def plot_abinitio(history_png, orientations_png, history: list[dict],
                  rotations: np.ndarray) -> None:
    """abinitio.png (per minibatch: the resolution limit, the posterior's spread, the mean
    best score and the mixture's loss) and orientations.png (each particle's viewing
    direction, the map's direction projected along z, ``A^T (0, 0, 1)``, as longitude and
    latitude in an equal-area histogram: where views are missing or crowd)."""
    plt = pyplot()
    its = [h["iteration"] + 1 for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.4), dpi=110)
    axes[0].plot(its, [h["resolution_A"] for h in history], "-")
    axes[0].set_ylabel("resolution limit (Å)")
    twin = axes[0].twinx()
    twin.plot(its, [h["n_effective"] for h in history], "--", color="tab:orange")
    twin.set_ylabel("posterior spread (candidates)", color="tab:orange")
    axes[1].plot(its, [h["mean_score"] for h in history], "-")
    axes[1].set_ylabel("mean best score (log-likelihood)")
    axes[2].plot(its, [h["loss"] for h in history], "-")
    axes[2].set_ylabel("mixture loss (running sums)")
    for ax in axes:
        ax.set_xlabel("minibatch")
    fig.tight_layout()
    save_figure(fig, history_png)
    view = np.asarray(rotations)[:, 2, :]  # A^T (0, 0, 1): the third row of A
    lon = np.degrees(np.arctan2(view[:, 1], view[:, 0]))
    sin_lat = np.clip(view[:, 2], -1, 1)
    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    counts, _, _, im = ax.hist2d(lon, sin_lat, bins=(36, 18), range=((-180, 180), (-1, 1)),
                                 cmap="viridis")
    fig.colorbar(im, ax=ax, label="particles per bin (equal areas)")
    ax.set_xlabel("longitude of the viewing direction (°)")
    ax.set_ylabel("sin(latitude)")
    ax.set_title(f"{len(view)} particles; emptiest bin {int(counts.min())}, "
                 f"fullest {int(counts.max())}")
    fig.tight_layout()
    save_figure(fig, orientations_png)


def write_abinitio_report(out_dir, summary) -> Path:
    """report.html of an ab initio folder (an :class:`~cryosplat.summary.AbinitioSummary`):
    the model's pictures, how the run went, the orientation distribution, what to do next."""
    out = Path(out_dir)
    s = summary
    notes = []
    if s.poses_in_file_ignored:
        notes.append("The poses in the input file were ignored: every pose here was estimated "
                     "from the images.")
    notes.append("The hand of an ab initio map is undetermined (a map and its mirror image "
                 "give the same projections). " + ("This is the mirror image of the map found "
                 "(--flip-hand)." if s.hand_flipped else "If the map has the wrong hand "
                 "(left-handed helices), run again with --flip-hand or mirror it."))
    notes.append("The poses come from one model of all particles: a reconstruction from them "
                 "is not gold standard. Refine from this model with independent half-sets "
                 "before you report a resolution.")
    body = (f"<p>{s.particles} particles, box {s.box_size} of {s.pixel_size_A:g} Å; searched "
            f"in a box of {s.working_box} of {s.working_pixel_A:.3g} Å to "
            f"{s.final_resolution_A:g} Å; {s.gaussians} Gaussians; symmetry {s.symmetry}; "
            f"{s.wall_time_s:.0f} s; global search {s.search_rate:.3g} rotations x origins x "
            "particles per second.</p>" + "".join(f"<p>{html.escape(n)}</p>" for n in notes)
            + map_section(out, "The initial model (the mixture voxelised in the particles' box)")
            + "<h2>The run</h2>" + embed_png(out / "abinitio.png")
            + "<h2>Orientations</h2>" + embed_png(out / "orientations.png"))
    return write_page(out, "cryosplat abinitio", body)
