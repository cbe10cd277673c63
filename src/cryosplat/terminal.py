"""What the command line shows: rich consoles, progress bars and tables. Output only: every
number shown is computed elsewhere."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cryosplat.errors import exit_status
from cryosplat.report import HALF_MAP_CAUTION
from cryosplat.summary import AbinitioSummary, BackprojectionSummary, Headline, RunSummary

console = Console()
err_console = Console(stderr=True)


@contextmanager
def progress_bar(description: str, total: int, completed: int = 0) -> Iterator:
    """A :data:`cryosplat.progress.ProgressFactory` drawing a rich bar on stderr; yields
    ``advance(n, info="")``."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                  console=err_console) as bar:
        task = bar.add_task(description, total=total, completed=completed, info="")
        yield lambda n, info="": bar.update(task, advance=n, info=info)


def print_resolutions(res: dict[str, dict[str, float]]) -> None:
    """A table of FSC curves' resolutions (Å) at 0.143 and 0.5."""
    table = Table("FSC", "0.143 (Å)", "0.5 (Å)")
    for name, r in res.items():
        table.add_row(name, f"{r['0.143']:.2f}", f"{r['0.5']:.2f}")
    console.print(table)


def print_info(path, summary: dict) -> None:
    """``cryosplat info``'s tables from :func:`cryosplat.diagnostics.summarise`."""
    console.print(f"[bold]{path}[/bold]: {summary['particles']} particles, box "
                  f"{summary['box_size']} px, {summary['image_stacks']} image stack(s)")
    def values(v) -> str:  # one value, or the distinct per-particle values of a group
        return ", ".join(f"{x:g}" for x in v) if isinstance(v, list) else f"{v:g}"

    t = Table(title="optics groups")
    for c in ("group", "name", "particles", "pixel Å", "box", "kV", "Cs mm", "Q0", "optics"):
        t.add_column(c)
    for g in summary["optics_groups"]:
        optics = []
        if "beam_tilt_mrad" in g:
            optics.append("tilt {:.3g}, {:.3g} mrad".format(*g["beam_tilt_mrad"]))
        if "mag_matrix" in g:
            optics.append("mag [{:.4f} {:.4f}; {:.4f} {:.4f}]".format(*g["mag_matrix"]))
        for key, name in (("odd_zernike", "odd Z"), ("even_zernike", "even Z")):
            if key in g:
                optics.append(f"{name} {len(g[key])} terms")
        if g.get("ctf_premultiplied"):
            optics.append("CTF-premultiplied")
        t.add_row(str(g["number"]), g["name"], str(g["particles"]), f"{g['pixel_size_A']:.4f}",
                  str(g["box_size"]), values(g["voltage_kV"]), values(g["cs_mm"]),
                  values(g["amplitude_contrast"]), "; ".join(optics) or "-")
    console.print(t)
    grid = summary["reconstruction_grid"]
    if grid["rescaled"]:
        console.print(f"reconstructed at {grid['pixel_size_A']:g} Å, box {grid['box_size']} px: "
                      "every optics group Fourier-rescaled to it (--pixel-size sets another)")
    for column, treatment in summary.get("image_model_columns", {}).items():
        console.print(f"image-model column {column}: {treatment}")
    d = summary["defocus_um"]
    console.print("defocus: " + ("none (no CTF parameters)" if d is None else
                                 f"{d['min']:.2f} to {d['max']:.2f} µm (mean {d['mean']:.2f})"))
    pc = summary["pose_coverage"]
    console.print("poses: " + ("none" if pc is None else
                               f"{pc['occupied_fraction']:.0%} of {pc['directions']} viewing "
                               f"directions seen; fullest holds {pc['max_over_mean']:.1f}x "
                               "the mean"))
    s = summary["shifts_A"]
    console.print(f"shifts: |origin| up to {s['max_abs']:.2f} Å (rms {s['rms']:.2f} Å)")
    h = summary["half_sets"]
    console.print("half-sets: " + (f"defined ({h['1']} + {h['2']})" if h["defined"]
                                   else "not defined in the file"))
    for k, v in summary["defaults"].items():
        console.print(f"[dim]default: {k} -> {v}[/dim]")


def print_checks(path, n_particles: int, checks: list[dict], failed: bool) -> None:
    """``cryosplat validate``'s table from :func:`cryosplat.diagnostics.validation_checks`."""
    table = Table("check", "status", "detail", title=f"{path}: {n_particles} particles")
    colour = {"ok": "green", "warn": "yellow", "fail": "red"}
    for c in checks:
        table.add_row(c["check"], f"[{colour[c['status']]}]{c['status']}[/]", c["detail"])
    console.print(table)
    console.print("[red]not ready for reconstruction[/red]" if failed
                  else "[green]ready for reconstruction[/green]")


def print_reconstruction(summary: RunSummary) -> None:
    """Resolutions of a finished ``reconstruct``: every FSC curve's, then the one it reports
    (:attr:`~cryosplat.summary.Headline.resolution_A`) and why not the half-maps'."""
    print_resolutions(summary.resolutions_A)
    for i, why in enumerate(summary.stopped or [], 1):
        console.print(f"half-set {i} stopped: {why}")
    console.print(f"[bold]resolution[/bold]: {summary.headline.describe()}")
    if summary.headline.cross_validated_resolution_A is not None:
        console.print(f"[yellow]caution:[/yellow] {HALF_MAP_CAUTION}")
    else:
        console.print("[yellow]caution:[/yellow] without the half-sets' direct maps "
                      "(--no-validate) this is the half-maps' FSC at 0.143, which overestimates "
                      "a Gaussian map's resolution where the data run out (docs/reconstruct.md)")
    print_postprocess(summary.postprocess)
    if summary.refinement is not None:  # cryosplat refine
        r = summary.refinement
        g = r.get("global_stage")
        if g is not None:
            last = g["history"][-1]
            console.print(f"[bold]global stage[/bold]: the file's poses were not read; "
                          f"{len(g['history'])} iterations from {g['reference']}, to "
                          f"{last['limit_A']:.1f} Å in {g['time_s']:.0f} s (global search "
                          f"{g['search_rate']:.3g} rotations x origins x particles per s); "
                          f"poses in {g['poses_star']}")
        med = r["median_change_from_input"]
        console.print(f"[bold]refined poses[/bold]: {r['particles_star']} (median change "
                      f"{med['angle_deg']:.2f}°, {med['shift_A']:.2f} Å of origin, "
                      f"{med['defocus_A']:.0f} Å of defocus)")
    console.print(f"report: {summary.report}")


def print_abinitio(summary: AbinitioSummary, out: Path) -> None:
    """What a finished ``abinitio`` made, the hand caution and the next step."""
    s = summary
    if s.poses_in_file_ignored:
        console.print("the poses in the input file were ignored")
    console.print(f"[bold]initial model[/bold]: {s.outputs['map']} ({s.gaussians} Gaussians, "
                  f"aligned to {s.final_resolution_A:g} Å in a box of {s.working_box} of "
                  f"{s.working_pixel_A:.3g} Å, {s.wall_time_s:.0f} s; global search "
                  f"{s.search_rate:.3g} rotations x origins x particles per s)")
    console.print(f"[bold]estimated poses[/bold]: {s.outputs['particles_star']}")
    console.print("[yellow]caution:[/yellow] the hand is undetermined"
                  + (" (this is the mirror image: --flip-hand)" if s.hand_flipped else
                     "; --flip-hand writes the mirror image and its poses")
                  + ". The poses come from one model of all particles: not gold standard.")
    console.print(f"report: {s.outputs['report']}")


def print_postprocess(pp: dict | None) -> None:
    """A post-processing's resolution, B-factor and map, or why it was not done."""
    if not pp:
        return
    if "error" in pp:
        console.print(f"[yellow]post-processing not done:[/yellow] {pp['error']}")
        return
    console.print(f"[bold]post-processed[/bold] (masked, corrected FSC 0.143): "
                  f"{pp['resolution_A']:.2f} Å; B-factor {pp['bfactor_A2']:.0f} Å²; sharpened "
                  f"map {pp['maps']['postprocess']}")


def print_demo(gaussian: RunSummary, baseline: BackprojectionSummary, out: Path,
               nyquist_A: float, seconds: float) -> None:
    """The demo's table (both methods' half-map, cross-validated and truth resolutions), its
    time and where its outputs are."""
    table = Table("", "half-maps 0.143 (Å)", "cross-val. 0.5 (Å)", "vs truth 0.143 (Å)",
                  "vs truth 0.5 (Å)")
    g = gaussian.headline
    limit = "≤ " if g.cross_validated_is_limit else ""
    rows: list[tuple[str, Headline, str]] = [
        ("Gaussian mixture", g, f"{limit}{g.cross_validated_resolution_A:.2f}"),
        ("direct Fourier inversion", baseline.headline, "")]
    for name, r, c in rows:
        table.add_row(name, f"{r.half_map_resolution_A:.2f}", c,
                      f"{r.truth_resolution_A_0143:.2f}", f"{r.truth_resolution_A_05:.2f}")
    console.print(table)
    console.print("The half-map FSC of two Gaussian mixtures counts the prior's shared "
                  "extrapolation as signal; the cross-validated estimate (the resolution "
                  "reported) checks the map against the half-sets' direct maps "
                  "(docs/reconstruct.md).")
    console.print(f"Nyquist {nyquist_A:.2f} Å; {seconds:.0f} s in all")
    console.print(f"report: [bold]{gaussian.report}[/bold]")
    console.print(f"data: {out / 'data'}; baseline: {out / 'backprojection'}; reconstruction: "
                  f"{out / 'reconstruction'}")


def run_app(app: typer.Typer) -> None:
    """Run the command line: bad input is one line and exit status 2, a failed stage or an OS
    error one line and 1 (:func:`cryosplat.errors.exit_status`), never a traceback."""
    try:
        rc = app(standalone_mode=False)  # click returns a typer.Exit's code in this mode
        if isinstance(rc, int) and rc != 0:
            sys.exit(rc)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    except Exception as e:
        status = exit_status(e)
        if status is not None:
            err_console.print(f"[red]error:[/red] {status[1]}", highlight=False, soft_wrap=True)
            sys.exit(status[0])
        click_error = next(c for c in typer.BadParameter.__mro__
                           if c.__name__ == "ClickException")
        if isinstance(e, click_error):  # usage errors of typer's click
            usage: Any = e
            usage.show()
            sys.exit(usage.exit_code)
        raise
