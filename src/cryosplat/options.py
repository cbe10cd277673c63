"""The options that several ``cryosplat`` commands share, defined once: how particles are
read (:func:`particle_options`), --force, --truth, --mask and --nproc (:func:`join_processes`),
and PARTICLES --out against --resume DIR (:func:`new_or_resumed`)."""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Optional, TypeVar

import typer

from cryosplat.errors import InputError
from cryosplat.run_config import ParticleSource
from cryosplat.train.distributed import init_distributed, launch_torchrun

PARTICLES_HELP = "Particles: .star, .cs, or .mrcs with --poses/--ctf"
ForceOpt = typer.Option(False, "--force", help="Write into a non-empty --out")
TruthOpt = typer.Option(None, "--truth", help="Ground-truth map (simulations): also the FSC of "
                                              "the map against it")
NprocOpt = typer.Option(1, "--nproc", help="Processes on this machine (launched with torchrun; "
                        "gloo on CPU, NCCL on GPUs). For several machines run torchrun "
                        "yourself: see README")
SymOpt = typer.Option("C1", "--sym", help="Point group, RELION's symbols and axes: C1, Cn, "
                      "Dn, T, O, I (I1-I4); the Gaussians fit one asymmetric unit")
MaskOpt = typer.Option(None, "--mask", help="Mask (.mrc, values in [0, 1]) for the masked and "
                                            "corrected FSC, instead of the soft auto-mask")

C = TypeVar("C")  # a command's configuration type


def _option(name: str, kind, flag: str, default, help: str) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                             default=typer.Option(default, flag, help=help))


READ_OPTIONS = [
    _option("datadir", Optional[Path], "--datadir", None,
            "Folder that relative image paths are taken from (default: beside the file)"),
    _option("poses", Optional[Path], "--poses", None, "cryoDRGN poses.pkl (with an .mrcs stack)"),
    _option("ctf", Optional[Path], "--ctf", None, "cryoDRGN ctf.pkl (with an .mrcs stack)"),
    _option("pixel_size", Optional[float], "--pixel-size", None,
            "Pixel size in Å of files that give none; for files that give theirs, the pixel "
            "size to rescale every optics group to (default: the smallest of the groups)"),
    _option("amplitude_contrast", Optional[float], "--amplitude-contrast", None,
            "Amplitude contrast (fraction), for files that give none")]
SUBSET_OPTIONS = [
    _option("box", Optional[int], "--box", None, "Fourier-crop the particles to this box (pixels)"),
    _option("max_particles", Optional[int], "--max-particles", None, "Keep the first N particles"),
    _option("invert", bool, "--invert", False,
            "Negate the images: for stacks where the molecule is dark (cryoDRGN-style contrast)")]


def particle_options(subset: bool = True):
    """Decorate a command that takes PARTICLES and ``source: ParticleSource``: the command
    gets the shared reading options (with ``subset``, also --box, --max-particles and
    --invert) and receives them as one ``source`` (None when PARTICLES is not given)."""
    extra = READ_OPTIONS + (SUBSET_OPTIONS if subset else [])

    def register(f):
        sig = inspect.signature(f)
        params = [p for n, p in sig.parameters.items() if n != "source"]

        @functools.wraps(f)
        def command(**kw):
            values = {p.name: kw.pop(p.name) for p in extra}
            particles = kw.get("particles")
            source = None if particles is None else ParticleSource(
                str(particles), **{k: str(v) if isinstance(v, Path) else v
                                   for k, v in values.items()})
            return f(source=source, **kw)

        command.__signature__ = sig.replace(parameters=params + extra)
        return command
    return register


def new_or_resumed(source: ParticleSource | None, out: Path | None, resume: Path | None,
                   truth: Path | None, mask: Path | None,
                   load: Callable[[Path], tuple[C, dict | None]],
                   build: Callable[[dict], C]) -> tuple[C, dict | None, Path]:
    """(config, checkpoint or None, output folder) of a command that takes either PARTICLES
    and --out or --resume DIR: ``load(DIR)`` gives (config, checkpoint); ``build(fields)``
    makes a new config from the particle options' fields, --truth and --mask (each path
    made absolute)."""
    if resume is not None:
        if source is not None:
            raise InputError(None, "--resume DIR continues with the particles and settings saved "
                                   "in DIR/config.json; give no PARTICLES")
        config, state = load(resume)
        return config, state, resume
    if source is None or out is None:
        raise InputError(None, "give PARTICLES and --out (or --resume DIR)")
    return build({**vars(source), "particles": str(Path(source.particles).resolve()),
                  "truth": truth and str(truth.resolve()),
                  "mask": mask and str(mask.resolve())}), None, out


def numbers(option: str, text: str) -> tuple[float, ...]:
    """A comma-separated list of numbers from the command line (empty for "")."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(None, f"{option} {text!r}: expected comma-separated numbers") from None


def join_processes(nproc: int, device: str) -> bool:
    """--nproc: outside torchrun with ``nproc`` > 1, run this command line again as ``nproc``
    torchrun processes and exit with their status; under torchrun, join its process group.
    Returns whether this process is rank 0 (the one that prints)."""
    if nproc < 1:
        raise InputError(None, f"--nproc {nproc}: expected 1 or more")
    if nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise typer.Exit(launch_torchrun(nproc, sys.argv[1:]))
    return init_distributed(device)[0] == 0
