"""The ``cryosplat`` command line (typer + rich)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cryosplat.errors import InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cryo-EM reconstruction with a physics-exact Gaussian-splatting renderer.")
console = Console()
err_console = Console(stderr=True)

DatadirOpt = typer.Option(None, "--datadir", help="Folder that relative image paths are "
                                                  "taken from (default: beside the file)")
PosesOpt = typer.Option(None, "--poses", help="cryoDRGN poses.pkl (with an .mrcs stack)")
CtfOpt = typer.Option(None, "--ctf", help="cryoDRGN ctf.pkl (with an .mrcs stack)")
PixelOpt = typer.Option(None, "--pixel-size", help="Pixel size in Å, for files that give none")


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=err_console, transient=False)


def prepare_out_dir(out: Path, force: bool) -> Path:
    """Create ``out``; refuse to touch an existing non-empty folder without --force."""
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(out, "exists and is not empty; choose another --out or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    return out


@app.command()
def info(
    particles: Path = typer.Argument(..., help="Particles: .star, .cs, or .mrcs with --poses/--ctf"),
    datadir: Optional[Path] = DatadirOpt,
    poses: Optional[Path] = PosesOpt,
    ctf: Optional[Path] = CtfOpt,
    pixel_size: Optional[float] = PixelOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables"),
    check_images: bool = typer.Option(False, "--check-images",
                                      help="Also check every stack's header and index"),
):
    """Summarise a particle file without reading its images."""
    from cryosplat.io import read_particles

    p = read_particles(particles, datadir=datadir, poses=poses, ctf=ctf, pixel_size_A=pixel_size)
    if check_images:
        p.images.check()
    summary = summarise(p)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    console.print(f"[bold]{particles}[/bold]: {summary['particles']} particles, box "
                  f"{summary['box_size']} px, {len(p.images.files)} image stack(s)")
    t = Table(title="optics groups")
    for c in ("group", "name", "particles", "pixel Å", "kV", "Cs mm", "Q0"):
        t.add_column(c)
    for g in summary["optics_groups"]:
        t.add_row(str(g["number"]), g["name"], str(g["particles"]), f"{g['pixel_size_A']:.4f}",
                  f"{g['voltage_kV']:g}", f"{g['cs_mm']:g}", f"{g['amplitude_contrast']:g}")
    console.print(t)
    d = summary["defocus_um"]
    console.print("defocus: " + ("none (no CTF parameters)" if d is None else
                                 f"{d['min']:.2f} to {d['max']:.2f} µm (mean {d['mean']:.2f})"))
    pc = summary["pose_coverage"]
    console.print("poses: " + ("none" if pc is None else
                               f"{pc['occupied_fraction']:.0%} of {pc['directions']} viewing "
                               f"directions seen; fullest holds {pc['max_over_mean']:.1f}x the mean"))
    s = summary["shifts_A"]
    console.print(f"shifts: |origin| up to {s['max_abs']:.2f} Å (rms {s['rms']:.2f} Å)")
    h = summary["half_sets"]
    console.print("half-sets: " + (f"defined ({h['1']} + {h['2']})" if h["defined"]
                                   else "not defined in the file"))
    for k, v in summary["defaults"].items():
        console.print(f"[dim]default: {k} -> {v}[/dim]")


def summarise(p) -> dict:
    """Counts, optics, defocus, pose coverage and half-sets of a dataset, as plain data."""
    groups = []
    for o in p.optics:
        count = int((p.optics_group == o.number).sum())
        groups.append({"number": o.number, "name": o.name, "particles": count,
                       "pixel_size_A": o.pixel_size_A, "voltage_kV": o.voltage_kV,
                       "cs_mm": o.cs_mm, "amplitude_contrast": o.amplitude_contrast})
    defocus = None
    if p.ctf is not None:
        mean = ((p.ctf.defocus_u_A + p.ctf.defocus_v_A) / 2 / 1e4).numpy()
        defocus = {"min": float(mean.min()), "max": float(mean.max()), "mean": float(mean.mean())}
    coverage = None if p.rotations is None else pose_coverage(p.rotations)
    half = p.half_set.numpy()
    shifts = p.shifts_A.norm(dim=-1)
    return {
        "file": p.source, "particles": len(p), "box_size": p.box_size,
        "pixel_size_A": sorted({round(float(x), 6) for x in p.pixel_size_A.unique()}),
        "image_stacks": len(p.images.files), "optics_groups": groups, "defocus_um": defocus,
        "pose_coverage": coverage,
        "shifts_A": {"max_abs": float(shifts.max()), "rms": float(shifts.pow(2).mean().sqrt())},
        "half_sets": {"defined": bool((half > 0).all()), "1": int((half == 1).sum()),
                      "2": int((half == 2).sum())},
        "defaults": p.defaults,
    }


def pose_coverage(rotations: torch.Tensor, n_directions: int = 400, max_sample: int = 50_000) -> dict:
    """How evenly the viewing directions cover the sphere.

    Directions (the beam in map coordinates, third row of ``A``) are assigned to the nearest
    of ``n_directions`` near-uniform (Fibonacci) points; reports the fraction seen at least
    once and the fullest bin relative to the mean.
    """
    rot = rotations
    if len(rot) > max_sample:
        rot = rot[torch.linspace(0, len(rot) - 1, max_sample).long()]
    view = rot[:, 2, :].double()
    i = torch.arange(n_directions, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n_directions
    phi = torch.pi * (1 + 5**0.5) * i
    r = torch.sqrt(1 - z**2)
    points = torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], dim=-1)
    counts = torch.bincount((view @ points.T).argmax(dim=1), minlength=n_directions)
    return {"directions": n_directions, "occupied_fraction": float((counts > 0).double().mean()),
            "max_over_mean": float(counts.max() / counts.double().mean())}


@app.command()
def downsample(
    particles: Path = typer.Argument(..., help="Particles: .star, .cs, or .mrcs with --poses/--ctf"),
    out: Path = typer.Option(..., "--out", help="Output folder: particles.star + particles.mrcs"),
    box: Optional[int] = typer.Option(None, "--box", help="New box size in pixels (Fourier crop)"),
    max_particles: Optional[int] = typer.Option(None, "--max-particles", help="Keep the first N"),
    datadir: Optional[Path] = DatadirOpt,
    poses: Optional[Path] = PosesOpt,
    ctf: Optional[Path] = CtfOpt,
    pixel_size: Optional[float] = PixelOpt,
    force: bool = typer.Option(False, "--force", help="Write into a non-empty --out"),
):
    """Fourier-crop and/or subset particles into a RELION 3.1 STAR + MRCS."""
    from cryosplat.io import read_particles, write_particles

    p = read_particles(particles, datadir=datadir, poses=poses, ctf=ctf, pixel_size_A=pixel_size,
                       box_size=box, max_particles=max_particles)
    if len(p.pixel_size_A.unique()) > 1:
        raise InputError(particles, "optics groups have different pixel sizes; one output stack "
                                    "needs one pixel size")
    p.images.check()
    prepare_out_dir(out, force)
    with progress_bar() as bar:
        task = bar.add_task("writing particles", total=len(p))
        star = write_particles(out, p, progress=lambda k: bar.advance(task, k))
    console.print(f"wrote {len(p)} particles, box {p.box_size}, pixel "
                  f"{float(p.pixel_size_A[0]):.4f} Å: {star}")


def main() -> None:
    """Entry point: runs the app and turns input errors into one line and exit code 2."""
    try:
        app(standalone_mode=False)
    except InputError as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
