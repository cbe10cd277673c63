"""What the ab initio E-step works on: the particles cropped to a working box and held in
memory (:class:`WorkingSet`), and the search and weighted insertion of a minibatch against the
model (:class:`Searcher`, on :mod:`cryosplat.refine.global_search`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cryosplat import geometry
from cryosplat.ctf import CTFParams, transfer_rfft, wiener_terms
from cryosplat.fourier import shell_index_2d
from cryosplat.fourier_slice import Insertion, PaddedGrid, as_sampled, hermitian_x0, slice_points
from cryosplat.gaussians import GaussianMixture
from cryosplat.io import Particles
from cryosplat.refine.global_search import (
    Hits,
    global_search,
    local_search,
    origin_grid,
    so3_grid,
    so3_grid_size,
)
from cryosplat.refine.search import Points, alignment_points


@dataclass
class WorkingSet:
    """The particles as ab initio holds them: Fourier-cropped to ``box_size`` (pixel
    ``pixel_size_A``), their rfft2 `(N, d, d//2+1)` complex64 (pixel d//2 at the origin), their
    CTF parameters (float32) and the mean power of their transforms per 2D shell `(d//2+1,)`,
    the noise model of the score (at the SNR of particles, nearly all noise)."""

    transforms: torch.Tensor
    ctf: CTFParams
    pixel_size_A: float
    box_size: int
    noise_power: torch.Tensor

    def __len__(self) -> int:
        return len(self.transforms)


def working_box(box_size: int, pixel_size_A: float, final_resolution_A: float) -> int:
    """The even box whose Nyquist is ``final_resolution_A / 1.5`` (a margin for the search's
    interpolation), at most the particles' own box, at least 32 or the box."""
    target_pixel = final_resolution_A / 3.0
    d = int(round(box_size * pixel_size_A / target_pixel / 2)) * 2
    return int(min(box_size, max(d, min(32, box_size))))


def load_working_set(particles: Particles, box: int, device: torch.device,
                     advance: Callable[[int], None] = lambda n: None,
                     batch_size: int = 256) -> WorkingSet:
    """Read every particle once, cropped to ``box`` (:meth:`Particles.downsample`)."""
    p = particles if box == particles.box_size else particles.downsample(box)
    pix = p.require_single_pixel_size()
    ctf = p.require_ctf()
    out = torch.empty(len(p), box, box // 2 + 1, dtype=torch.complex64, device=device)
    for s in range(0, len(p), batch_size):
        idx = np.arange(s, min(s + batch_size, len(p)))
        images = p.read_images(idx).to(device)
        out[s:s + len(idx)] = torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))
        advance(len(idx))
    shell = shell_index_2d(box, device).clamp_max(box // 2)
    power = (out.real**2 + out.imag**2).mean(0)
    noise = torch.zeros(box // 2 + 1, device=device).index_add_(0, shell.flatten(),
                                                                power.flatten().float())
    noise = noise / torch.bincount(shell.flatten(), minlength=box // 2 + 1).clamp_min(1)
    return WorkingSet(out, ctf.to(device, torch.float32), pix, box, noise.clamp_min(1e-30))


class Searcher:
    """The E-step's fixed parts for one run on one working set: the rotation grid of
    ``angle_step_deg`` (:func:`~cryosplat.refine.global_search.so3_grid_size`), the origin disc
    within ``max_shift_A`` (0: 5% of the box) in steps of a working pixel, ``local_levels``
    halving levels of local search, and the points and weights at each limit."""

    def __init__(self, ws: WorkingSet, angle_step_deg: float, max_shift_A: float,
                 local_levels: int, device: torch.device):
        self.ws, self.device = ws, device
        self.angle_step_deg, self.local_levels = angle_step_deg, local_levels
        self.rotations = so3_grid(so3_grid_size(angle_step_deg), device)
        box_A = ws.box_size * ws.pixel_size_A
        self.max_shift_A = max_shift_A if max_shift_A > 0 else 0.05 * box_A
        self.shift_step_A = ws.pixel_size_A
        self.origins = origin_grid(self.max_shift_A, self.shift_step_A, device)
        self.grid = PaddedGrid(ws.box_size, 2 * ws.box_size, device)

    def limit_shell(self, resolution_A: float) -> int:
        """The 2D shell of ``resolution_A`` in the working box, at least 3, at most Nyquist."""
        d = self.ws.box_size
        return int(min(d // 2, max(3, round(d * self.ws.pixel_size_A / resolution_A))))

    def grid_shell(self, diameter_A: float, resolution_A: float = 0.0) -> int:
        """The shell the rotation grid is scored within (:meth:`search`'s ``grid_shell``):
        that of ``resolution_A``, or when 0, of the arc one angular step spans at the
        particle's radius (``diameter_A / 2``), the finest detail the grid's spacing resolves;
        at least 3 shells."""
        if not resolution_A > 0:
            resolution_A = math.radians(self.angle_step_deg) * diameter_A / 2
        return self.limit_shell(resolution_A)

    def points(self, shell: int) -> tuple[Points, torch.Tensor]:
        """The points within ``shell`` and their weights over the noise power."""
        pts = alignment_points(self.ws.box_size, shell, self.device)
        radius = (pts.frequency * self.ws.box_size).norm(dim=-1).round().long()
        return pts, pts.weight / self.ws.noise_power[radius.clamp_max(len(self.ws.noise_power) - 1)]

    def sampled(self, model: GaussianMixture, symmetry: torch.Tensor | None) -> torch.Tensor:
        """The mixture's padded transform as the slices are read (:meth:`sampled_map`)."""
        with torch.no_grad():
            vol = model.voxelise(self.ws.box_size, self.ws.pixel_size_A, symmetry, n_sigma=3.0)
            return self.sampled_map(vol)

    @torch.no_grad()
    def sampled_map(self, volume: torch.Tensor) -> torch.Tensor:
        """A working-box map's `(d, d, d)` padded transform as the slices are read (gridding
        pre-corrected)."""
        return as_sampled(self.grid.transform(volume.to(self.device), -1))

    def _data(self, idx: torch.Tensor, pts: Points) -> tuple[torch.Tensor, torch.Tensor]:
        """Particles ``idx``'s transforms and CTFs at ``pts``: `(B, K)` each."""
        ws = self.ws
        data = ws.transforms[idx].reshape(len(idx), -1)[:, pts.flat]
        c = transfer_rfft(ws.ctf[idx.cpu()], ws.box_size, ws.pixel_size_A)
        return data, c.reshape(len(idx), -1)[:, pts.flat].to(self.device)

    @torch.no_grad()
    def search(self, sampled: torch.Tensor, idx: torch.Tensor, shell: int, keep: int,
               grid_shell: int | None = None) -> Hits:
        """Global then local search of particles ``idx`` within ``shell``: their ``keep`` best
        candidates. ``grid_shell`` (below ``shell``, with local levels): the grid is scored
        within it only, and the local search, from its ``keep`` best, within ``shell`` (its
        scores replace the grid's)."""
        pts, weight = self.points(shell)
        data, ctf = self._data(idx, pts)
        if grid_shell is not None and grid_shell < shell and self.local_levels > 0:
            g_pts, g_weight = self.points(grid_shell)
            g_data, g_ctf = self._data(idx, g_pts)
            hits = global_search(sampled, self.rotations, self.origins, g_data, g_ctf, g_pts,
                                 g_weight, self.ws.pixel_size_A, keep)
            hits.score = torch.full_like(hits.score, -torch.inf)  # scored again within shell
        else:
            hits = global_search(sampled, self.rotations, self.origins, data, ctf, pts, weight,
                                 self.ws.pixel_size_A, keep)
        return local_search(sampled, hits, data, ctf, pts, weight, self.ws.pixel_size_A,
                            self.angle_step_deg, self.shift_step_A, self.local_levels,
                            self.max_shift_A)

    @torch.no_grad()
    def local(self, sampled: torch.Tensor, idx: torch.Tensor, shell: int,
              rotations: torch.Tensor, origins_A: torch.Tensor, step_deg: float) -> Hits:
        """Local search only, from particles ``idx``'s poses (rotations `(B, 3, 3)`, origins
        `(B, 2)` Å): ``local_levels`` levels from ``step_deg / 2`` (origins from half a working
        pixel). One candidate each."""
        pts, weight = self.points(shell)
        data, ctf = self._data(idx, pts)
        b = len(idx)
        start = Hits(torch.full((b, 1), -torch.inf, device=self.device), rotations[:, None],
                     origins_A[:, None], torch.zeros(b, 1, device=self.device))
        return local_search(sampled, start, data, ctf, pts, weight, self.ws.pixel_size_A,
                            step_deg, self.shift_step_A,
                            self.local_levels, self.max_shift_A)

    @torch.no_grad()
    def insert(self, idx: torch.Tensor, hits: Hits, weights: torch.Tensor, shell: int
               ) -> Insertion:
        """The particles ``idx`` inserted at each of their candidates with ``weights`` `(B, M)`,
        up to ``shell``."""
        ws, grid = self.ws, self.grid
        d = ws.box_size
        b, m = weights.shape
        num, den = grid.accumulators()
        pts = slice_points(d, float(shell), self.device)
        factor, w2 = wiener_terms(ws.ctf[idx.cpu()], d, ws.pixel_size_A)
        factor, w2 = factor.to(self.device), w2.to(self.device)
        f = ws.transforms[idx]
        for j in range(m):
            wj = weights[:, j]
            use = wj > 1e-4
            if not bool(use.any()):
                continue
            centred = geometry.translate_rfft(f[use], hits.origins_A[use, j], ws.pixel_size_A, d)
            grid.insert(num, den, wj[use, None, None] * factor[use] * centred,
                        wj[use, None, None] * w2[use], hits.rotations[use, j], pts)
        return Insertion(hermitian_x0(grid.grid_view(num)), hermitian_x0(grid.grid_view(den)),
                         d, 2 * d)
