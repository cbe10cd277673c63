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

from cryosplat.errors import InputError, StageError
from cryosplat.report import describe_cross_validated

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cryo-EM reconstruction with a physics-exact Gaussian-splatting renderer.")
console = Console()
err_console = Console(stderr=True)

DatadirOpt = typer.Option(None, "--datadir", help="Folder that relative image paths are "
                                                  "taken from (default: beside the file)")
PosesOpt = typer.Option(None, "--poses", help="cryoDRGN poses.pkl (with an .mrcs stack)")
CtfOpt = typer.Option(None, "--ctf", help="cryoDRGN ctf.pkl (with an .mrcs stack)")
PixelOpt = typer.Option(None, "--pixel-size", help="Pixel size in Å, for files that give none")
BoxOpt = typer.Option(None, "--box", help="Fourier-crop the particles to this box (pixels)")
MaxParticlesOpt = typer.Option(None, "--max-particles", help="Keep the first N particles")
ForceOpt = typer.Option(False, "--force", help="Write into a non-empty --out")
InvertOpt = typer.Option(False, "--invert", help="Negate the images: for stacks where the "
                                                 "molecule is dark (cryoDRGN-style contrast)")
TruthOpt = typer.Option(None, "--truth", help="Ground-truth map (simulations): also the FSC of "
                                              "the map against it")
MaskOpt = typer.Option(None, "--mask", help="Mask (.mrc, values in [0, 1]) for the masked and "
                                            "corrected FSC, instead of the soft auto-mask")


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
        p.check_images()
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


def validation_checks(p) -> list[dict]:
    """Everything ``reconstruct`` needs, as checks ``{check, status: ok|warn|fail, detail}``,
    without training: stacks and indices, poses, CTF and its ranges, pixel sizes, pose
    coverage, half-sets and shifts."""
    checks: list[dict] = []

    def add(name: str, status: str, detail: str) -> None:
        checks.append({"check": name, "status": status, "detail": detail})

    try:
        p.check_images()
        add("image stacks", "ok", f"{len(p.images.files)} stack(s), every index within its "
                                  f"stack, {p.box_size} x {p.box_size} px")
    except InputError as e:
        add("image stacks", "fail", str(e))
    add("poses", "ok" if p.rotations is not None else "fail",
        "present" if p.rotations is not None else "no angles: reconstruction needs poses")
    sizes = sorted({round(float(x), 6) for x in p.pixel_size_A.unique()})
    add("pixel size", "ok" if len(sizes) == 1 else "fail",
        f"{sizes[0]:g} Å" if len(sizes) == 1 else f"optics groups differ: {sizes} Å")
    if p.ctf is None:
        add("CTF", "fail", "no CTF parameters")
    else:
        c = p.ctf
        mean_um = ((c.defocus_u_A + c.defocus_v_A) / 2e4).numpy()
        astig_um = ((c.defocus_u_A - c.defocus_v_A).abs() / 2e4).numpy()
        ranges = [
            ("defocus", mean_um, 0.1, 10.0, "µm"),
            ("astigmatism", astig_um, 0.0, 1.0, "µm"),
            ("voltage", c.voltage_kV.numpy(), 60.0, 400.0, "kV"),
            ("Cs", c.cs_mm.numpy(), 0.0, 10.0, "mm"),
            ("amplitude contrast", c.amplitude_contrast.numpy(), 0.0, 0.5, ""),
        ]
        for name, v, lo, hi, unit in ranges:
            bad = int(((v < lo) | (v > hi)).sum())
            add(f"CTF {name}", "warn" if bad else "ok",
                f"{v.min():.3g} to {v.max():.3g} {unit}".rstrip()
                + (f"; {bad} particle(s) outside the usual {lo:g}-{hi:g} {unit}" if bad else ""))
    if p.rotations is not None:
        pc = pose_coverage(p.rotations)
        status = "warn" if pc["occupied_fraction"] < 0.25 or pc["max_over_mean"] > 20 else "ok"
        add("pose coverage", status, f"{pc['occupied_fraction']:.0%} of {pc['directions']} "
                                     f"directions seen; fullest {pc['max_over_mean']:.1f}x the mean"
            + ("; strongly preferred orientation" if status == "warn" else ""))
    half = p.half_set.numpy()
    if (half > 0).all():
        n1, n2 = int((half == 1).sum()), int((half == 2).sum())
        add("half-sets", "ok" if min(n1, n2) >= 0.4 * max(n1, n2) else "warn",
            f"defined in the file: {n1} + {n2}")
    else:
        add("half-sets", "ok", "not in the file: a seeded random 50/50 split will be used")
    shift_px = (p.shifts_A.norm(dim=-1) / p.pixel_size_A).max()
    add("shifts", "warn" if shift_px > p.box_size / 4 else "ok",
        f"|origin| up to {float(shift_px):.1f} px of a {p.box_size} px box")
    return checks


@app.command()
def validate(
    particles: Path = typer.Argument(..., help="Particles: .star, .cs, or .mrcs with --poses/--ctf"),
    datadir: Optional[Path] = DatadirOpt,
    poses: Optional[Path] = PosesOpt,
    ctf: Optional[Path] = CtfOpt,
    pixel_size: Optional[float] = PixelOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
):
    """Check everything a reconstruction needs (stacks, headers, poses, CTF ranges, pose
    coverage, half-sets), without training. Exit 0 when nothing fails, 1 otherwise."""
    from cryosplat.io import read_particles

    p = read_particles(particles, datadir=datadir, poses=poses, ctf=ctf, pixel_size_A=pixel_size)
    checks = validation_checks(p)
    failed = any(c["status"] == "fail" for c in checks)
    if as_json:
        print(json.dumps({"file": str(particles), "particles": len(p), "ok": not failed,
                          "checks": checks}, indent=2))
    else:
        table = Table("check", "status", "detail", title=f"{particles}: {len(p)} particles")
        colour = {"ok": "green", "warn": "yellow", "fail": "red"}
        for c in checks:
            table.add_row(c["check"], f"[{colour[c['status']]}]{c['status']}[/]", c["detail"])
        console.print(table)
        console.print("[red]not ready for reconstruction[/red]" if failed
                      else "[green]ready for reconstruction[/green]")
    if failed:
        raise typer.Exit(1)


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
    box: Optional[int] = BoxOpt,
    max_particles: Optional[int] = MaxParticlesOpt,
    datadir: Optional[Path] = DatadirOpt,
    poses: Optional[Path] = PosesOpt,
    ctf: Optional[Path] = CtfOpt,
    pixel_size: Optional[float] = PixelOpt,
    invert: bool = InvertOpt,
    force: bool = ForceOpt,
):
    """Fourier-crop and/or subset particles into a RELION 3.1 STAR + MRCS."""
    from cryosplat.io import read_particles, write_particles

    p = read_particles(particles, datadir=datadir, poses=poses, ctf=ctf, pixel_size_A=pixel_size,
                       box_size=box, max_particles=max_particles, invert=invert)
    p.require_single_pixel_size()
    p.check_images()
    prepare_out_dir(out, force)
    with progress_bar() as bar:
        task = bar.add_task("writing particles", total=len(p))
        star = write_particles(out, p, progress=lambda k: bar.advance(task, k))
    console.print(f"wrote {len(p)} particles, box {p.box_size}, pixel "
                  f"{float(p.pixel_size_A[0]):.4f} Å: {star}")


@app.command()
def simulate(
    structure: Optional[Path] = typer.Argument(None, help="PDB/mmCIF model or MRC map "
                                                           "(default: the built-in 4AKE model)"),
    out: Path = typer.Option(..., "--out", help="Output folder"),
    particles: int = typer.Option(2000, "--particles", help="Number of particles"),
    box: int = typer.Option(64, "--box", help="Box size in pixels"),
    pixel_size: float = typer.Option(1.5, "--pixel-size", help="Pixel size in Å"),
    snr: float = typer.Option(0.1, "--snr", help="Signal variance / noise variance"),
    defocus_min: float = typer.Option(1.0, "--defocus-min", help="µm"),
    defocus_max: float = typer.Option(3.0, "--defocus-max", help="µm"),
    astigmatism: float = typer.Option(0.05, "--astigmatism", help="Max (dfU - dfV)/2, µm"),
    max_shift: float = typer.Option(3.0, "--max-shift", help="Max |origin| per axis, Å"),
    voltage: float = typer.Option(300.0, "--voltage", help="kV"),
    cs: float = typer.Option(2.7, "--cs", help="Spherical aberration, mm"),
    amplitude_contrast: float = typer.Option(0.1, "--amplitude-contrast"),
    bfactor: float = typer.Option(0.0, "--bfactor", help="Extra B-factor on the atoms, Å²"),
    seed: int = typer.Option(0, "--seed"),
    force: bool = ForceOpt,
):
    """Simulate particles (RELION 3.1 STAR + MRCS) and the ground-truth map."""
    from cryosplat.simulate import SimulationConfig, simulate_dataset

    cfg = SimulationConfig(particles, box, pixel_size, snr, defocus_min, defocus_max, astigmatism,
                           max_shift, voltage, cs, amplitude_contrast, bfactor, seed)
    for name, value, ok in (("--particles", particles, particles > 0), ("--box", box, box >= 8),
                            ("--pixel-size", pixel_size, pixel_size > 0), ("--snr", snr, snr > 0),
                            ("--defocus-max", defocus_max, defocus_max >= defocus_min)):
        if not ok:
            raise InputError(None, f"{name} {value}: out of range")
    prepare_out_dir(out, force)
    with progress_bar() as bar:
        task = bar.add_task("simulating", total=particles)
        result = simulate_dataset(structure, out, cfg, progress=lambda k: bar.advance(task, k))
    write_json(out / "simulation.json", {**vars(cfg), **result})
    console.print(f"wrote {particles} particles: {result['particles']}")
    console.print(f"ground truth: {result['ground_truth']}")


def write_json(path: Path, obj) -> None:
    """JSON written to a temporary name and renamed: a crash never leaves half a file."""
    from cryosplat.io.mrc import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2), encoding="utf-8")


def read_map_like(path: Path, box_size: int, voxel_size_A: float, what: str) -> torch.Tensor:
    """A map (truth or mask) that must share the reconstruction's grid."""
    from cryosplat.io import read_volume

    vol, vox = read_volume(path)
    if vol.shape[0] != box_size or abs(vox - voxel_size_A) > 1e-3:
        raise InputError(path, f"{what} is {vol.shape[0]} voxels of {vox:g} Å; expected "
                               f"{box_size} voxels of {voxel_size_A:g} Å like the maps")
    if what == "mask" and (vol.min() < -1e-3 or vol.max() > 1 + 1e-3):
        raise InputError(path, f"mask values span [{vol.min():g}, {vol.max():g}]; expected [0, 1]")
    return torch.from_numpy(vol)


def fsc_report(half_1: torch.Tensor, half_2: torch.Tensor, full: torch.Tensor | None,
               voxel_size_A: float, truth: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> tuple[dict, dict]:
    """Half-map FSC curves (unmasked, spherical, auto-mask or ``mask``, corrected) and, with
    ``truth``, the full map against it. Returns (curves, resolutions in Å at 0.143 and 0.5)."""
    from cryosplat.evaluate import fsc as fsc_curve, fsc_curves, resolutions

    curves = {f"half-maps, {k}": v
              for k, v in fsc_curves(half_1, half_2, voxel_size_A, mask).items()}
    if truth is not None:
        curves["map vs truth"] = fsc_curve(full, truth).numpy()
    return curves, resolutions(curves, half_1.shape[-1], voxel_size_A)


def headline_resolutions(res: dict) -> dict:
    """The summary.json fields of a :func:`fsc_report`: half-map resolutions at 0.143
    (unmasked, corrected), the truth's at 0.143 and 0.5 when there is one, and every curve's."""
    out = {"half_map_resolution_A": res["half-maps, unmasked"]["0.143"],
           "half_map_resolution_A_corrected": res["half-maps, corrected"]["0.143"],
           "resolutions_A": res}
    if "map vs truth" in res:
        out["truth_resolution_A_0.143"] = res["map vs truth"]["0.143"]
        out["truth_resolution_A_0.5"] = res["map vs truth"]["0.5"]
    return out


def print_resolutions(res: dict) -> None:
    table = Table("FSC", "0.143 (Å)", "0.5 (Å)")
    for name, r in res.items():
        table.add_row(name, f"{r['0.143']:.2f}", f"{r['0.5']:.2f}")
    console.print(table)


def run_backprojection(p, out: Path, half: np.ndarray, truth: Optional[Path] = None,
                       mask: Optional[Path] = None, label: str = "backprojecting"):
    """Backproject ``p`` with half-sets ``half`` into out/ (maps, fsc.csv, fsc.png).

    Returns (the summary's resolutions, the :class:`Backprojection`)."""
    from cryosplat.evaluate import write_fsc
    from cryosplat.io import write_volume
    from cryosplat.reconstruct import backproject as bp

    pix = p.require_single_pixel_size()
    out.mkdir(parents=True, exist_ok=True)
    with progress_bar() as bar:
        task = bar.add_task(label, total=len(p))
        result = bp(p, half, progress=lambda k: bar.advance(task, k))
    for name, vol in (("map", result.map), ("half_map_1", result.half_map_1),
                      ("half_map_2", result.half_map_2)):
        if not torch.isfinite(vol).all():
            raise StageError("backprojection", f"NaN/Inf in {name}")
        write_volume(out / f"{name}.mrc", vol, pix)
    d = p.box_size
    curves, res = fsc_report(
        result.half_map_1, result.half_map_2, result.map, pix,
        None if truth is None else read_map_like(truth, d, pix, "ground truth"),
        None if mask is None else read_map_like(mask, d, pix, "mask"))
    write_fsc(out / "fsc.csv", out / "fsc.png", curves, p.box_size, pix, "direct Fourier inversion")
    summary = {"particles": len(p), "box_size": p.box_size, "pixel_size_A": pix,
               **headline_resolutions(res)}
    write_json(out / "summary.json", summary)
    return summary, result


@app.command()
def backproject(
    particles: Path = typer.Argument(..., help="Particles: .star, .cs, or .mrcs with --poses/--ctf"),
    out: Path = typer.Option(..., "--out", help="Output folder"),
    truth: Optional[Path] = TruthOpt,
    mask: Optional[Path] = MaskOpt,
    box: Optional[int] = BoxOpt,
    max_particles: Optional[int] = MaxParticlesOpt,
    seed: int = typer.Option(0, "--seed", help="Seed of the half-set split, if the file has none"),
    datadir: Optional[Path] = DatadirOpt,
    poses: Optional[Path] = PosesOpt,
    ctf: Optional[Path] = CtfOpt,
    pixel_size: Optional[float] = PixelOpt,
    invert: bool = InvertOpt,
    force: bool = ForceOpt,
):
    """Direct Fourier inversion with known poses and CTF: map, half-maps, FSC."""
    from cryosplat.io import read_particles

    p = read_particles(particles, datadir=datadir, poses=poses, ctf=ctf, pixel_size_A=pixel_size,
                       box_size=box, max_particles=max_particles, invert=invert)
    p.require_poses(), p.require_ctf(), p.check_images()
    from cryosplat.reconstruct import assign_half_sets

    prepare_out_dir(out, force)
    s, _ = run_backprojection(p, out, assign_half_sets(p, seed), truth, mask)
    print_resolutions(s["resolutions_A"])
    console.print(f"outputs in {out}: map.mrc, half_map_1.mrc, half_map_2.mrc, fsc.csv, fsc.png")


@app.command()
def fsc(
    map_a: Path = typer.Argument(..., help="First map (.mrc)"),
    map_b: Optional[Path] = typer.Argument(None, help="Second map (.mrc)"),
    truth: Optional[Path] = typer.Option(None, "--truth", help="Compare MAP_A with a known map"),
    mask: Optional[Path] = MaskOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Also write fsc.csv and fsc.png here"),
    as_json: bool = typer.Option(False, "--json", help="Print curves and resolutions as JSON"),
):
    """FSC of two maps (or a map and --truth): unmasked, spherical mask, soft auto-mask (or
    --mask), phase-randomisation corrected; resolution at 0.143 and 0.5."""
    from cryosplat.evaluate import fsc_curves, resolutions, shell_frequencies, write_fsc
    from cryosplat.io import read_volume

    other = truth if truth is not None else map_b
    if other is None or (truth is not None and map_b is not None):
        raise InputError(None, "give two maps, or one map and --truth")
    a, pa = read_volume(map_a)
    b = read_map_like(other, a.shape[0], pa, "map")
    m = None if mask is None else read_map_like(mask, a.shape[0], pa, "mask")
    curves = fsc_curves(torch.from_numpy(a), b, pa, m)
    d = a.shape[0]
    res = resolutions(curves, d, pa)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_fsc(out / "fsc.csv", out / "fsc.png", curves, d, pa, f"{map_a.name} vs {other.name}")
    if as_json:
        print(json.dumps({"resolution_A": res, "frequency_per_A": shell_frequencies(d, pa).tolist(),
                          "fsc": {k: c.tolist() for k, c in curves.items()}}, indent=2))
    else:
        print_resolutions(res)


def validation_references(p, out: Path, half: np.ndarray, truth: Optional[Path],
                          mask: Optional[Path]) -> tuple[dict, tuple[torch.Tensor, torch.Tensor]]:
    """The half-sets' direct reconstructions in out/backprojection, made once (a resumed run
    reads them back): the unbiased references of the cross-validated FSC, and the baseline."""
    from cryosplat.io import read_volume

    folder = out / "backprojection"
    files = [folder / f"half_map_{i}.mrc" for i in (1, 2)] + [folder / "summary.json"]
    if all(f.is_file() for f in files):
        refs = tuple(torch.from_numpy(read_volume(f)[0]) for f in files[:2])
        return json.loads(files[2].read_text()), refs
    summary, result = run_backprojection(p, folder, half, truth, mask,
                                         label="validation: direct inversion of each half-set")
    return summary, (result.half_map_1, result.half_map_2)


def cross_validation_report(v1: torch.Tensor, v2: torch.Tensor, references, voxel_size_A: float
                            ) -> tuple[dict, dict]:
    """The cross-validated curves of two half-set models (for fsc.csv) and the summary fields."""
    from cryosplat.evaluate import cross_validated_fsc, cross_validated_resolution

    cv = cross_validated_fsc(v1, v2, *references)
    r, limit = cross_validated_resolution(cv["estimate"], v1.shape[-1], voxel_size_A)
    curves = {"model vs other half's direct map (FSC free)": cv["free"],
              "model vs own half's direct map (FSC work)": cv["work"],
              "direct maps of the half-sets": cv["references"],
              "estimated model vs truth (cross-validated)": cv["estimate"]}
    return curves, {"cross_validated_resolution_A": r, "cross_validated_is_limit": limit}


def launch_torchrun(nproc: int) -> int:
    """Run this command line again as ``nproc`` torchrun processes on this machine (without
    --nproc); return their exit code."""
    import subprocess

    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "cryosplat", *args]
    err_console.print(f"launching {nproc} processes: {' '.join(cmd)}", highlight=False)
    return subprocess.run(cmd).returncode


def run_reconstruction(p, out: Path, cfg, device: str, truth: Optional[Path], mask: Optional[Path],
                       config: dict, resume: Optional[dict] = None, validate: bool = True,
                       baseline: Optional[tuple[dict, tuple]] = None) -> dict:
    """Train the two half-set mixtures and write every output into ``out``.

    With ``validate``, the half-sets are first reconstructed directly (or ``baseline``, a
    (summary, half-maps) pair made with the same half-sets, is used) to cross-validate the
    Gaussian maps' resolution."""
    import time
    from dataclasses import asdict

    from cryosplat.evaluate import write_fsc
    from cryosplat.io import write_volume
    from cryosplat.io.gaussians import write_pdb, write_ply
    from cryosplat.io.mrc import atomic_path
    from cryosplat.reconstruct import (assign_half_sets, barrier, model_images, rank_and_world,
                                       resolve_device, total_steps, train_gold_standard)
    from cryosplat.report import plot_montage, plot_training, write_report

    dev = resolve_device(device)
    rank, world = rank_and_world()
    lead = rank == 0  # under torchrun only rank 0 validates, logs and writes
    pix = p.require_single_pixel_size()
    half = assign_half_sets(p, cfg.seed)
    gt = None if truth is None else read_map_like(truth, p.box_size, pix, "ground truth")

    def log(msg: str) -> None:
        if lead:
            with open(out / "log.txt", "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")

    log(f"cryosplat reconstruct: {len(p)} particles, box {p.box_size}, {pix:.4f} Å, device {dev}, "
        f"{world} process(es), config {json.dumps(asdict(cfg))}")
    t_start = time.perf_counter()
    refs = None
    if validate and lead:
        baseline = baseline or validation_references(p, out, half, truth, mask)
        refs = baseline[1]
        log(f"validation maps (direct inversion of each half-set): half-maps "
            f"{baseline[0]['half_map_resolution_A']:.2f} Å")
    barrier()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=err_console,
                  disable=not lead) as bar:
        total_images = 2 * cfg.batch_size * total_steps(half, cfg)
        done0 = 0 if resume is None else 2 * cfg.batch_size * int(resume["halves"][0]["step"])
        task = bar.add_task("training", total=total_images, completed=done0, info="")
        t0 = time.perf_counter()
        count = [0]

        def progress(n, losses):
            count[0] += n
            rate = count[0] / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, advance=n, info=f"{rate:.0f} particles/s, loss {losses[0]:.4g} / "
                                             f"{losses[1]:.4g}")

        try:
            trainers, history, trace = train_gold_standard(
                p, half, cfg, dev, checkpoint_path=out / "checkpoint.pt", resume=resume, truth=gt,
                progress=progress, log=log, config=config, references=refs)
        except BaseException as e:
            log(f"stopped during training: {type(e).__name__}: {e}; the last checkpoint is "
                f"{out / 'checkpoint.pt'} (continue with --resume {out})")
            raise
    if not lead:
        return {}
    train_time = history[-1]["time_s"]
    v1, v2 = trainers[0].volume(), trainers[1].volume()
    full = (v1 + v2) / 2
    for name, vol in (("map", full), ("half_map_1", v1), ("half_map_2", v2)):
        if not torch.isfinite(vol).all():
            raise StageError("output", f"NaN/Inf in {name}; the mixtures' checkpoint is "
                                       f"{out / 'checkpoint.pt'}")
        write_volume(out / f"{name}.mrc", vol, pix)
    for i, t in enumerate(trainers, 1):
        model = t.model.cpu()
        write_ply(out / f"gaussians_half_{i}.ply", model, p.box_size, pix)
        write_pdb(out / f"gaussians_half_{i}.pdb", model, p.box_size, pix)
        with atomic_path(out / f"gaussians_half_{i}.pt") as tmp:
            torch.save(model.state_dict(), tmp)
        t.model.to(dev)
    curves, res = fsc_report(v1, v2, full, pix, gt,
                             None if mask is None else read_map_like(mask, p.box_size, pix, "mask"))
    cv_fields = {}
    if refs is not None:
        cv_curves, cv_fields = cross_validation_report(v1, v2, refs, pix)
        curves = {**curves, **cv_curves}
    labels = {}
    if cv_fields:
        phrase = describe_cross_validated(cv_fields, short=True)
        labels = {n: f"{n}: {phrase} at 0.5" for n in cv_curves if "cross-validated" in n}
        labels.update({n: n for n in cv_curves if "cross-validated" not in n})
    write_fsc(out / "fsc.csv", out / "fsc.png", curves, p.box_size, pix,
              f"Gaussian mixture, {cfg.n_gaussians} per half-set", labels=labels,
              second_panel=list(cv_curves) if cv_fields else None)
    plot_training(out / "loss.png", trace, history)
    idx = np.sort(np.random.default_rng(cfg.seed).choice(len(p), min(8, len(p)), replace=False))
    with torch.no_grad():
        renders = []
        for i in idx:
            tr = trainers[int(half[i]) - 1]
            renders.append(model_images(tr.model, p.rotations[i:i + 1].float().to(dev),
                                        p.shifts_A[i:i + 1].float().to(dev), p.ctf[i:i + 1].to(dev),
                                        p.box_size, pix, cfg.n_sigma, cfg.blur_px * pix)[0].cpu())
    plot_montage(out / "montage.png", p.read_images(idx).numpy(), torch.stack(renders).numpy())
    summary = {"particles": len(p), "box_size": p.box_size, "pixel_size_A": pix,
               "device": str(dev), "processes": world, "steps": trainers[0].step, "train_time_s": train_time,
               "wall_time_s": time.perf_counter() - t_start, **headline_resolutions(res),
               **cv_fields, "history": history}
    if baseline is not None:
        summary["backprojection"] = baseline[0]
    write_json(out / "summary.json", summary)
    summary["report"] = str(write_report(out, summary, config))
    cv = f"; cross-validated {describe_cross_validated(summary)}" if cv_fields else ""
    log(f"done: half-maps {summary['half_map_resolution_A']:.2f} Å{cv}; report {summary['report']}")
    return summary


@app.command()
def reconstruct(
    particles: Optional[Path] = typer.Argument(None, help="Particles: .star, .cs, or .mrcs with "
                                                          "--poses/--ctf (not with --resume)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder"),
    gaussians: int = typer.Option(2000, "--gaussians", help="Gaussians per half-set"),
    epochs: float = typer.Option(4.0, "--epochs", help="Passes over each half-set"),
    batch: int = typer.Option(32, "--batch", help="Particles per step and half-set"),
    lr: float = typer.Option(0.5, "--lr-means", help="Adam step of the means, pixels"),
    densify: bool = typer.Option(True, "--densify/--no-densify", help="Split Gaussians with large "
                                 "gradients and prune vanishing ones (adaptive count)"),
    max_gaussians: int = typer.Option(0, "--max-gaussians", help="Cap with --densify (0: 4 x "
                                                                 "--gaussians)"),
    loss: str = typer.Option("real", "--loss", help="real: real-space MSE (the paper's); fourier:"
                                                    " residual whitened per Fourier shell"),
    particle_diameter: float = typer.Option(0.0, "--particle-diameter", help="Å, as in RELION: "
                                            "Gaussians whose centre leaves this sphere are "
                                            "replaced by splits of the ones inside (0: no limit)"),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto"),
    seed: int = typer.Option(0, "--seed", help="Initialisation, batch order and half-set split"),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="Steps between checkpoints"),
    nproc: int = typer.Option(1, "--nproc", help="Data-parallel processes on this machine "
                              "(launched with torchrun; gloo on CPU, NCCL on GPUs). For several "
                              "machines run torchrun yourself: see README"),
    workers: int = typer.Option(1, "--workers", help="DataLoader processes reading particles "
                                "ahead of training (0: read on demand)"),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Also reconstruct each "
                                  "half-set directly, to cross-validate the resolution (about as "
                                  "long as a few epochs on a CPU)"),
    truth: Optional[Path] = TruthOpt,
    mask: Optional[Path] = MaskOpt,
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder"),
    box: Optional[int] = BoxOpt,
    max_particles: Optional[int] = MaxParticlesOpt,
    datadir: Optional[Path] = DatadirOpt,
    poses: Optional[Path] = PosesOpt,
    ctf: Optional[Path] = CtfOpt,
    pixel_size: Optional[float] = PixelOpt,
    invert: bool = InvertOpt,
    force: bool = ForceOpt,
):
    """Gold-standard Gaussian-mixture reconstruction from random initialisation."""
    import os
    from dataclasses import asdict

    from cryosplat.io import read_particles
    from cryosplat.reconstruct import TrainConfig, barrier, init_distributed, load_checkpoint

    if nproc < 1:
        raise InputError(None, f"--nproc {nproc}: expected 1 or more")
    if nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise typer.Exit(launch_torchrun(nproc))
    rank, _ = init_distributed(device)
    lead = rank == 0
    state = None
    if resume is not None:
        if particles is not None:
            raise InputError(None, "--resume DIR continues with the particles and settings saved "
                                   "in DIR/config.json; give no PARTICLES")
        for f in ("config.json", "checkpoint.pt"):
            if not (resume / f).is_file():
                raise InputError(resume / f, "missing: not a cryosplat reconstruct folder, or the"
                                             " run stopped before its first checkpoint")
        config = json.loads((resume / "config.json").read_text())
        state = load_checkpoint(resume / "checkpoint.pt")
        out = resume
    else:
        if particles is None or out is None:
            raise InputError(None, "give PARTICLES and --out (or --resume DIR)")
        if loss not in ("real", "fourier"):
            raise InputError(None, f"--loss {loss}: expected real or fourier")
        if not particle_diameter >= 0:
            raise InputError(None, f"--particle-diameter {particle_diameter:g}: expected a "
                                   "diameter in Å, or 0 for no limit")
        cfg = TrainConfig(n_gaussians=gaussians, batch_size=batch, epochs=epochs, lr_means_px=lr,
                          loss=loss, densify=densify, max_gaussians=max_gaussians,
                          support_radius_A=particle_diameter / 2,
                          checkpoint_every=checkpoint_every, seed=seed, loader_workers=workers)
        config = {"particles": str(particles.resolve()), "datadir": datadir and str(datadir),
                  "poses": poses and str(poses), "ctf": ctf and str(ctf), "pixel_size": pixel_size,
                  "box": box, "max_particles": max_particles, "invert": invert,
                  "truth": truth and str(truth.resolve()), "mask": mask and str(mask.resolve()),
                  "device": device, "validate": validate, "train": asdict(cfg)}
    cfg = TrainConfig(**config["train"])
    p = read_particles(config["particles"], datadir=config["datadir"], poses=config["poses"],
                       ctf=config["ctf"], pixel_size_A=config["pixel_size"], box_size=config["box"],
                       max_particles=config["max_particles"], invert=config["invert"])
    p.require_poses(), p.require_ctf(), p.check_images()
    from cryosplat.reconstruct import assign_half_sets, check_batch_size

    check_batch_size(p, assign_half_sets(p, cfg.seed), cfg)
    if state is None and lead:
        prepare_out_dir(out, force)
        write_json(out / "config.json", config)
    barrier()
    t = config["truth"]
    m = config["mask"]
    s = run_reconstruction(p, out, cfg, config["device"], t and Path(t), m and Path(m), config,
                           state, validate=config.get("validate", True))
    if not lead:
        return
    print_resolutions(s["resolutions_A"])
    from cryosplat.report import HALF_MAP_CAUTION

    if "cross_validated_resolution_A" in s:
        console.print(f"[bold]cross-validated resolution[/bold] (each mixture against the other "
                      f"half-set's direct map, FSC 0.5): {describe_cross_validated(s)}")
    console.print(f"[yellow]caution:[/yellow] {HALF_MAP_CAUTION}")
    console.print(f"report: {s['report']}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Output folder"),
    particles: int = typer.Option(2000, "--particles"),
    gaussians: int = typer.Option(500, "--gaussians", help="Gaussians per half-set at the start "
                                                           "(densified up to 4x)"),
    epochs: float = typer.Option(6.0, "--epochs"),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto"),
    force: bool = typer.Option(False, "--force", help="Replace the outputs of an earlier demo"),
):
    """Simulate a small dataset from the built-in model, reconstruct it with Gaussians and with
    the direct-Fourier-inversion baseline, and compare both with the ground truth."""
    import time
    from dataclasses import asdict

    from cryosplat.io import read_particles
    from cryosplat.reconstruct import TrainConfig, assign_half_sets
    from cryosplat.simulate import SimulationConfig, simulate_dataset

    prepare_out_dir(out, force)
    cfg = SimulationConfig(n_particles=particles)
    t0 = time.perf_counter()
    console.print(f"[bold]1. simulate[/bold] {particles} particles of the built-in 4AKE model: box "
                  f"{cfg.box_size}, {cfg.pixel_size_A} Å/px, SNR {cfg.snr}, defocus "
                  f"{cfg.defocus_min_um}-{cfg.defocus_max_um} µm")
    data = out / "data"
    data.mkdir(exist_ok=True)
    with progress_bar() as bar:
        task = bar.add_task("simulating", total=particles)
        sim = simulate_dataset(None, data, cfg, progress=lambda k: bar.advance(task, k))
    truth = Path(sim["ground_truth"])
    p = read_particles(sim["particles"])
    console.print("[bold]2. baseline[/bold]: direct Fourier inversion with the same half-sets")
    bp_dir = out / "backprojection"
    tcfg = TrainConfig(n_gaussians=gaussians, epochs=epochs, densify=True)
    bp, bp_result = run_backprojection(p, bp_dir, assign_half_sets(p, tcfg.seed), truth)
    console.print(f"[bold]3. reconstruct[/bold]: {gaussians} random Gaussians per half-set, "
                  f"{epochs:g} epochs, densify and prune")
    rec = out / "reconstruction"
    rec.mkdir(exist_ok=True)
    config = {"particles": sim["particles"], "datadir": None, "poses": None, "ctf": None,
              "pixel_size": None, "box": None, "max_particles": None, "invert": False,
              "truth": str(truth), "mask": None, "device": device, "train": asdict(tcfg)}
    write_json(rec / "config.json", config)
    s = run_reconstruction(p, rec, tcfg, device, truth, None, config,
                           baseline=(bp, (bp_result.half_map_1, bp_result.half_map_2)))
    table = Table("", "half-maps 0.143 (Å)", "cross-val. 0.5 (Å)", "vs truth 0.143 (Å)",
                  "vs truth 0.5 (Å)")
    cv = s["cross_validated_resolution_A"]
    for name, r, c in (("Gaussian mixture", s, f"{'≤ ' if s['cross_validated_is_limit'] else ''}"
                                               f"{cv:.2f}"),
                       ("direct Fourier inversion", bp, "")):
        table.add_row(name, f"{r['half_map_resolution_A']:.2f}", c,
                      f"{r['truth_resolution_A_0.143']:.2f}", f"{r['truth_resolution_A_0.5']:.2f}")
    console.print(table)
    console.print("The half-map FSC of two Gaussian mixtures shares their bias; the cross-"
                  "validated estimate compares each mixture with the other half-set's direct map "
                  "(docs/reconstruct.md).")
    console.print(f"Nyquist {2 * cfg.pixel_size_A:.2f} Å; {time.perf_counter() - t0:.0f} s in all")
    console.print(f"report: [bold]{s['report']}[/bold]")
    console.print(f"data: {data}; baseline: {bp_dir}; reconstruction: {rec}")


def main() -> None:
    """Entry point: runs the app and turns input errors into one line and exit code 2."""
    try:
        rc = app(standalone_mode=False)  # click returns a typer.Exit's code in this mode
        if isinstance(rc, int) and rc != 0:
            sys.exit(rc)
    except InputError as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except StageError as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    except OSError as e:  # a full disk, a folder we may not write, a file that went away
        import errno

        where = f"{e.filename}: " if e.filename else ""
        msg = f"{where}{e.strerror or e}"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            msg += ("; files being written were left under temporary names and removed, and "
                    "what was written before (the last checkpoint) is intact")
        err_console.print(f"[red]error:[/red] {msg}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except Exception as e:  # usage errors of typer's click
        click_error = next(c for c in typer.BadParameter.__mro__
                           if c.__name__ == "ClickException")
        if isinstance(e, click_error):
            e.show()
            sys.exit(e.exit_code)
        raise
