"""The global stage of ``cryosplat refine --global --ref MAP``: every particle's rotation and
origin searched over all of SO(3) x a disc of origins against its own half-set's map, from one
reference low-passed to ``initial_resolution_A``, with the limit stepped by the two half-maps'
FSC; then :mod:`cryosplat.refine.loop` refines locally at full resolution (docs/abinitio.md).

The particles are Fourier-cropped to the working box of ``final_resolution_A``
(:func:`cryosplat.refine.working.working_box`), each half-set held in memory apart
(:class:`~cryosplat.refine.working.WorkingSet`, its own noise power). Iteration ``i``:

1. **E-step**, each half-set against its own map: for the first ``global_iterations`` (and
   up to ``max_global_iterations`` while either half-set's median rotation change exceeds the
   grid's step: :func:`planned_search`), the global search
   (:meth:`~cryosplat.refine.working.Searcher.search`: the SO(3) grid of ``angle_step_deg`` x
   origins, scored to the limit but no finer than the grid resolves, the
   arc of one step at the particle's radius, about 18 Å for 15° and a 134 Å diameter; the
   ``candidates`` best moved by ``local_levels`` halving levels scored to the limit) with
   posterior weights over the candidates; after that, a local search from each
   particle's pose (:meth:`~cryosplat.refine.working.Searcher.local`), its first step halved
   at each iteration;
2. **M-step**: the half-set's particles inserted with their weights up to the working box's
   limit (not only the search's: the FSC beyond the search's limit is the honest one), the two
   insertions inverted with the Wiener regulariser of their FSC
   (:func:`cryosplat.backproject.wiener_regulariser`, as direct inversion does), symmetrised
   with ``--sym`` and masked by a soft sphere of the particle's diameter;
3. **limit**: the shell where the masked half-maps' FSC falls below 0.143, plus a quarter of
   it (at least 3 shells), never lower than the last, at most ``final_resolution_A``
   (:func:`next_limit`).

This is RELION's gold standard (its auto-refine): the two half-sets' particles, poses and maps
never meet; both start from the same low-passed reference, and only the FSC curve (the
regulariser and the limit) is shared between them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cryosplat.backproject import invert, wiener_regulariser
from cryosplat.errors import InputError
from cryosplat.evaluate import fsc, lowpass, resolution_A, spherical_mask
from cryosplat.fourier import fourier_resample
from cryosplat.fourier_slice import Insertion
from cryosplat.geometry import rotation_angle_deg
from cryosplat.io import Particles
from cryosplat.io.mrc import read_volume
from cryosplat.progress import bar
from cryosplat.refine.global_search import tempered_weights
from cryosplat.refine.working import Searcher, load_working_set, working_box


@dataclass
class GlobalConfig:
    """Settings of the global stage (``config.json``'s ``refine.global_search``)."""

    reference: str = ""  # the MRC map the two half-sets start from (--ref)
    initial_resolution_A: float = 30.0  # the reference low-passed to this: the first limit
    final_resolution_A: float = 8.0  # the working box's limit (its Nyquist is this / 1.5)
    iterations: int = 5
    global_iterations: int = 2  # full SO(3) searches; local searches after
    max_global_iterations: int = 4  # more global ones while the poses still move by more
    # than the grid's step (planned_search); the local ones come after
    angle_step_deg: float = 15.0
    grid_resolution_A: float = 0.0  # the grid scored to at most this (0: the arc of one
    # angular step at the particle's radius, what the grid resolves); local searches to the limit
    local_levels: int = 3
    candidates: int = 4
    max_shift_A: float = 0.0  # 0: 5% of the box
    particle_diameter_A: float = 0.0  # 0: 70% of the box
    batch_size: int = 300

    def __post_init__(self) -> None:
        """Refuse settings that cannot run, naming the command-line option."""
        for option, value in (("--iterations of the global stage", self.iterations),
                              ("--initial-resolution", self.initial_resolution_A),
                              ("--global-resolution", self.final_resolution_A),
                              ("--angle-step", self.angle_step_deg),
                              ("--candidates", self.candidates)):
            if not value > 0:
                raise InputError(None, f"{option} {value:g}: expected a positive value")
        if not self.grid_resolution_A >= 0:
            raise InputError(None, f"grid resolution {self.grid_resolution_A:g} Å: expected Å, "
                                   "or 0 for the arc of one angular step at the particle's radius")
        if self.final_resolution_A > self.initial_resolution_A:
            raise InputError(None, f"--global-resolution {self.final_resolution_A:g} Å is "
                                   f"coarser than --initial-resolution "
                                   f"{self.initial_resolution_A:g} Å")
        if not 1 <= self.global_iterations <= self.iterations:
            raise InputError(None, f"{self.global_iterations} global iterations of "
                                   f"{self.iterations}: expected 1 to {self.iterations}")
        if self.max_global_iterations < self.global_iterations:
            raise InputError(None, f"at most {self.max_global_iterations} global iterations: "
                                   f"fewer than the {self.global_iterations} always run")


@dataclass
class GlobalRecord:
    """One iteration of the global stage, as the report plots it."""

    iteration: int
    search: str  # "global" or "local"
    limit_A: float  # the limit this iteration searched and inserted to
    resolution_A: float  # its half-maps' FSC 0.143 (masked, the working box)
    median_change_deg: list[float | None]  # per half-set, from the last iteration's poses
    # (None in the first)
    elapsed_s: float


@dataclass
class GlobalResult:
    """The global stage's poses of all `N` particles, RELION matrices `(N, 3, 3)` and origins
    `(N, 2)` Å (float64), its half-maps in the working box `(d, d, d)` and the history."""

    rotations: torch.Tensor
    origins_A: torch.Tensor
    half_maps: tuple[torch.Tensor, torch.Tensor]
    box_size: int
    pixel_size_A: float
    history: list[GlobalRecord] = field(default_factory=list)
    search_rate: float = 0.0  # global rotations x origins x particles per second


def reference_map(path: str | Path, box_size: int, pixel_size_A: float) -> torch.Tensor:
    """The MRC map at ``path`` on a `(box_size,)*3` grid of ``pixel_size_A``: Fourier-rescaled
    to the pixel (:func:`cryosplat.fourier.fourier_resample`), then cropped or zero-padded
    about voxel D//2."""
    vol, vox = read_volume(path)
    if not vox > 0:
        raise InputError(path, "the map's header gives no voxel size")
    d0 = vol.shape[0]
    size = max(2, int(round(d0 * vox / pixel_size_A)))
    v = fourier_resample(torch.from_numpy(vol).double(), size, ndim=3)
    out = torch.zeros((box_size,) * 3, dtype=torch.float64)
    m = min(size, box_size)
    src, dst = size // 2 - m // 2, box_size // 2 - m // 2
    out[dst:dst + m, dst:dst + m, dst:dst + m] = v[src:src + m, src:src + m, src:src + m]
    if not float(out.abs().max()) > 0:
        raise InputError(path, "the map is zero everywhere: no reference to align to")
    return out.float()


def check_global(particles: Particles, cfg: GlobalConfig) -> int:
    """Refuse particles the global stage cannot work on (no CTF, several pixel sizes, a final
    resolution beyond Nyquist, an initial one with fewer than 3 shells in the box) and a
    reference it cannot read; the working box."""
    particles.require_ctf()
    d0, pix0 = particles.box_size, particles.require_single_pixel_size()
    if 2 * pix0 > cfg.final_resolution_A:
        raise InputError(particles.source, f"--global-resolution {cfg.final_resolution_A:g} Å "
                                           f"is beyond the particles' Nyquist ({2 * pix0:g} Å)")
    if d0 * pix0 / cfg.initial_resolution_A < 3:
        raise InputError(particles.source, f"--initial-resolution {cfg.initial_resolution_A:g} "
                                           f"Å leaves fewer than 3 shells in a box of "
                                           f"{d0 * pix0:.0f} Å")
    box = working_box(d0, pix0, cfg.final_resolution_A)
    reference_map(cfg.reference, box, d0 * pix0 / box)
    return box


def next_limit(curve: torch.Tensor, shell: int, max_shell: int) -> tuple[int, int]:
    """(the last shell before ``curve`` first falls below 0.143, at most ``max_shell``; the
    next limit: that shell plus a quarter of it (at least 3), never below ``shell``, at most
    ``max_shell``)."""
    below = torch.nonzero(curve[1: max_shell + 1] < 0.143)
    cross = max_shell if len(below) == 0 else max(1, int(below[0]))
    return cross, int(min(max_shell, max(shell, cross + max(3, cross // 4))))


def planned_search(history: list[GlobalRecord], cfg: GlobalConfig
                   ) -> tuple[str, float, int] | None:
    """What the next iteration after ``history`` searches: (``"global"`` or ``"local"``, the
    local search's first step in degrees, the stage's iterations as now planned), or None when
    the stage is done. The first ``cfg.global_iterations`` are global, and more follow, up to
    ``cfg.max_global_iterations``, while either half-set's median rotation change in the last
    exceeds the grid's step (the poses are still jumping between grid cells); then
    ``cfg.iterations - cfg.global_iterations`` local ones, the first step halved each time."""
    it = len(history) + 1
    n_global = sum(h.search == "global" for h in history)
    last = history[-1] if history else None
    moving = (last is not None and last.search == "global"
              and any(c is not None and c > cfg.angle_step_deg for c in last.median_change_deg))
    n_local = cfg.iterations - cfg.global_iterations
    if it <= cfg.global_iterations or (moving and n_global < cfg.max_global_iterations):
        return "global", cfg.angle_step_deg, max(n_global + 1, cfg.global_iterations) + n_local
    if it - n_global > n_local:
        return None
    return "local", cfg.angle_step_deg * 0.5 ** (it - n_global), n_global + n_local


def global_refine(particles: Particles, half: np.ndarray, cfg: GlobalConfig,
                  symmetry: torch.Tensor | None, device: torch.device,
                  log: Callable[[str], None] = print, progress=None, state: dict | None = None,
                  on_iteration: Callable[[dict], None] | None = None) -> GlobalResult:
    """The global stage of the module docstring on ``particles`` (their poses are not read)
    with half-sets ``half`` `(N,)` (1 or 2). ``state``: a checkpoint of ``on_iteration``'s
    form to continue from; ``on_iteration(state)`` after every iteration. ``progress``: a
    :class:`~cryosplat.progress.ProgressFactory`."""
    box = check_global(particles, cfg)
    rows = [np.nonzero(half == h)[0] for h in (1, 2)]
    with bar(progress, "reading particles", len(particles)) as advance:
        sets = [load_working_set(particles.subset(r), box, device, advance) for r in rows]
    pix = sets[0].pixel_size_A
    searchers = [Searcher(ws, cfg.angle_step_deg, cfg.max_shift_A, cfg.local_levels, device)
                 for ws in sets]
    diameter = cfg.particle_diameter_A if cfg.particle_diameter_A > 0 else 0.7 * box * pix
    mask = spherical_mask(box, pix, 0.5 * diameter, soft_edge_A=3 * pix).to(device)
    max_shell = searchers[0].limit_shell(cfg.final_resolution_A)
    grid_shell = searchers[0].grid_shell(diameter, cfg.grid_resolution_A)
    log(f"global stage: working box {box} px of {pix:.3g} Å, half-sets of {len(rows[0])} and "
        f"{len(rows[1])} particles; {len(searchers[0].rotations)} rotations x "
        f"{len(searchers[0].origins)} origins (within {searchers[0].max_shift_A:.3g} Å) scored "
        f"to at most {box * pix / grid_shell:.1f} Å for {cfg.global_iterations} iteration(s) "
        f"(up to {cfg.max_global_iterations} while poses move more than "
        f"{cfg.angle_step_deg:g}°), {cfg.iterations - cfg.global_iterations} local after")
    if state is None:
        start = reference_map(cfg.reference, box, pix).to(device)
        start = lowpass(start, pix, cfg.initial_resolution_A) * mask
        maps = [start, start.clone()]
        poses = [(torch.eye(3, device=device).expand(len(r), 3, 3).clone(),
                  torch.zeros(len(r), 2, device=device)) for r in rows]
        shell, history = searchers[0].limit_shell(cfg.initial_resolution_A), []
        elapsed0, rate = 0.0, 0.0
    else:
        maps = [m.to(device) for m in state["maps"]]
        poses = [(r.to(device), o.to(device)) for r, o in state["poses"]]
        shell = int(state["shell"])
        history = [GlobalRecord(**h) for h in state["history"]]
        elapsed0, rate = (history[-1].elapsed_s if history else 0.0), float(state["rate"])
        log(f"global stage resumed after iteration {len(history)}")
    t0 = time.perf_counter() - elapsed0
    while (plan := planned_search(history, cfg)) is not None:
        kind, step, total = plan
        it = len(history) + 1
        inserted: list[Insertion] = []
        changes: list[float | None] = []
        t_search, n_scored = 0.0, 0.0
        with bar(progress, f"global stage {it}/{total}: {kind} search",
                  len(particles)) as advance:
            for h in range(2):
                sr = searchers[h]
                sampled = sr.sampled_map(maps[h])
                rot, org = poses[h]
                new_rot, new_org = rot.clone(), org.clone()
                num = den = None
                for s in range(0, len(sr.ws), cfg.batch_size):
                    idx = torch.arange(s, min(s + cfg.batch_size, len(sr.ws)), device=device)
                    t = time.perf_counter()
                    if kind == "global":
                        hits = sr.search(sampled, idx, shell, cfg.candidates, grid_shell)
                        weights = tempered_weights(hits.score, 1.0)
                        n_scored += len(idx) * len(sr.rotations) * len(sr.origins)
                    else:
                        hits = sr.local(sampled, idx, shell, rot[idx], org[idx], step)
                        weights = torch.ones(len(idx), 1, device=device)
                    t_search += time.perf_counter() - t
                    ins = sr.insert(idx, hits, weights, max_shell)
                    num = ins.numerator if num is None else num.add_(ins.numerator)
                    den = ins.denominator if den is None else den.add_(ins.denominator)
                    new_rot[idx], new_org[idx] = hits.rotations[:, 0], hits.origins_A[:, 0]
                    advance(len(idx))
                assert num is not None and den is not None
                inserted.append(Insertion(num, den, box, 2 * box).symmetrise(symmetry))
                changes.append(float(rotation_angle_deg(rot, new_rot).median())
                               if it > 1 else None)
                poses[h] = (new_rot, new_org)
        if kind == "global":
            rate = n_scored / max(t_search, 1e-9)
        reg = wiener_regulariser(*inserted)
        maps = [invert(ins, reg / 2) * mask for ins in inserted]
        curve = fsc(*maps)
        limit_A = box * pix / shell
        res = resolution_A(curve[: max_shell + 1].cpu(), box, pix)
        _, shell = next_limit(curve.cpu(), shell, max_shell)
        history.append(GlobalRecord(it, kind, limit_A, res, changes, time.perf_counter() - t0))
        notes = [f"searched to {limit_A:.1f} Å", f"half-maps' FSC 0.143 at {res:.1f} Å",
                 f"next limit {box * pix / shell:.1f} Å"]
        if it > 1:
            notes.append("median change " + ", ".join(f"{c or 0:.2f}°" for c in changes))
        if kind == "global":
            notes.append(f"{rate:.3g} rotations x origins x particles per s")
        log(f"global stage {it}/{total} ({kind}): " + "; ".join(notes))
        if on_iteration is not None:
            on_iteration({"iteration": it, "shell": shell, "rate": rate,
                          "maps": [m.cpu() for m in maps],
                          "poses": [(r.cpu(), o.cpu()) for r, o in poses],
                          "history": [asdict(h) for h in history]})
    n = len(particles)
    rotations = torch.empty(n, 3, 3, dtype=torch.float64)
    origins = torch.empty(n, 2, dtype=torch.float64)
    for r, (rot, org) in zip(rows, poses):
        rotations[torch.from_numpy(r)] = rot.cpu().double()
        origins[torch.from_numpy(r)] = org.cpu().double()
    return GlobalResult(rotations, origins, (maps[0].cpu(), maps[1].cpu()), box, pix, history,
                        rate)
