"""Global search of particles' rotations and origins against one model: every rotation of a
uniform grid over SO(3) times every origin of a disc, scored at once as matrix products, then
a local search around the best candidates. The E-step of ``cryosplat abinitio``.

A candidate (rotation ``r``, origin ``s``) of particle ``b`` is scored by the white-noise
log-likelihood of the particle with its contrast ``alpha`` fitted (RELION's per-particle
scale, profiled out):

    X = sum_k w_k Re(conj(CTF_k M_rk) G_bsk),   P = sum_k w_k |CTF_k M_rk|²,
    score = max(X, 0)² / (2 P)     (at alpha = X / P, the likelihood's maximum over alpha >= 0),

where ``M_r`` is the model's central slice at rotation ``r`` (the padded grid's extraction,
:meth:`cryosplat.fourier_slice.PaddedGrid.extract`), ``G_bs`` the particle's transform
translated by ``+origin`` (centred), ``k`` runs over the rfft2 points within the search's
limit, and ``w_k`` is the Friedel multiplicity (2, 1 at the origin) over the noise power of
``k``'s shell. The score does not depend on the model's scale, so a random start needs no
calibration. With the slices of a chunk of rotations as a `(R, 2K)` real matrix and the
particles' CTF-weighted, centred transforms at every origin as a `(B S, 2K)` one, ``X`` of the
chunk is one matrix product and ``P`` another (`(B, K) @ (K, R)`).

The rotations are a super-Fibonacci spiral on the unit quaternions (M. Alexa, "Super-Fibonacci
Spirals: Fast, Low-Discrepancy Sampling of SO(3)", CVPR 2022): ``n`` samples as uniform as a
random draw on average and far more even (:func:`so3_grid`). The local search
(:func:`local_search`) steps the best candidates over the rotations ``exp(w) R`` with ``w``
the centre and its 6 neighbours along the axes, times 9 origins, halving both steps at each
level, with the same score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryosplat import geometry
from cryosplat.refine.search import AXIS_STEPS, ORIGIN_STEPS, extract_slices

_PSI = 1.533751168755204288118041  # the root of x^4 = x + 4 that Alexa's spiral uses
def so3_grid(n: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` rotations spread evenly over SO(3) (a super-Fibonacci spiral of quaternions):
    `(n, 3, 3)`. The same ``n`` always gives the same rotations."""
    if n < 1:
        raise ValueError(f"a rotation grid needs at least one rotation, got {n}")
    i = torch.arange(n, dtype=torch.float64) + 0.5
    s = i / n
    r, big_r = s.sqrt(), (1 - s).sqrt()
    alpha, beta = 2 * math.pi * i / math.sqrt(2), 2 * math.pi * i / _PSI
    q = torch.stack([r * alpha.sin(), r * alpha.cos(), big_r * beta.sin(), big_r * beta.cos()], -1)
    return geometry.quaternion_to_matrix(q).to(device, dtype)


def so3_grid_size(step_deg: float) -> int:
    """The size of the :func:`so3_grid` whose rotations lie about ``step_deg`` from their
    nearest neighbour (``n`` balls of radius ``step / 2`` fill SO(3), whose share of
    rotations within an angle ``t`` of one is ``(t - sin t) / pi``)."""
    if not 0 < step_deg <= 90:
        raise ValueError(f"angular step {step_deg}°: expected 0-90°")
    h = math.radians(step_deg) / 2
    return max(1, math.ceil(math.pi / (h - math.sin(h))))


def origin_grid(max_shift_A: float, step_A: float, device=None) -> torch.Tensor:
    """The origins (rlnOriginX/YAngst) of a square grid of ``step_A`` within ``max_shift_A``
    of (0, 0), the centre first: `(S, 2)` in Å."""
    if not step_A > 0 or max_shift_A < 0:
        raise ValueError(f"origin grid: step {step_A} Å, range {max_shift_A} Å")
    m = int(math.floor(max_shift_A / step_A + 1e-6))
    ax = torch.arange(-m, m + 1, dtype=torch.float32) * step_A
    xy = torch.stack(torch.meshgrid(ax, ax, indexing="xy"), -1).reshape(-1, 2)
    xy = xy[xy.norm(dim=-1) <= max_shift_A + 1e-6]
    order = torch.argsort(xy.norm(dim=-1), stable=True)
    return xy[order].to(device)


def weighted_centred(data: torch.Tensor, ctf: torch.Tensor, weight: torch.Tensor,
                     origins_A: torch.Tensor, frequency: torch.Tensor, pixel_size_A: float
                     ) -> torch.Tensor:
    """``w conj(CTF) G`` of `B` particles at every origin: data `(B, K)` complex (as recorded,
    not centred), ctf `(B, K)`, weight `(K,)`, origins `(B, S, 2)` or `(S, 2)` Å, frequency
    `(K, 2)` (ky, kx) cycles per pixel. Returns `(B, S, K)` complex."""
    undo = -geometry.origin_to_translation_A(origins_A)
    phase = geometry.translation_phase(frequency, undo, pixel_size_A)  # (..., S, K)
    g = (data * ctf.conj() * weight)[:, None] if ctf.is_complex() else \
        (data * ctf * weight)[:, None]
    return g * phase


def transfer_power(ctf: torch.Tensor) -> torch.Tensor:
    """``|CTF|²`` of a real or complex transfer, elementwise."""
    return ctf.real**2 + ctf.imag**2 if ctf.is_complex() else ctf * ctf


def profiled_scores(slices: torch.Tensor, weighted: torch.Tensor, power_weight: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The module docstring's score of every (particle, origin, rotation).

    slices `(R, K)` complex, shared by the particles, or `(B, R, K)` per particle; weighted
    `(B, S, K)` (:func:`weighted_centred`); power_weight `(B, K)`, ``w |CTF|²``. Returns
    (score `(B, S, R)`, fitted contrast `(B, S, R)`)."""
    b, s, k = weighted.shape
    g = torch.cat([weighted.real, weighted.imag], -1)  # (B, S, 2K)
    m2 = slices.real**2 + slices.imag**2
    if slices.dim() == 2:
        a = torch.cat([slices.real, slices.imag], -1)  # (R, 2K)
        x = (g.reshape(b * s, 2 * k) @ a.T).reshape(b, s, -1)
        p = power_weight @ m2.T  # (B, R)
    else:
        a = torch.cat([slices.real, slices.imag], -1)  # (B, R, 2K)
        x = torch.bmm(g, a.transpose(1, 2))
        p = (power_weight[:, None] * m2).sum(-1)
    p = p[:, None].clamp_min(1e-30)
    xp = x.clamp_min(0)
    return xp * xp / (2 * p), xp / p


@dataclass
class Hits:
    """The best candidates of `B` particles, best first: scores `(B, M)`, rotations
    `(B, M, 3, 3)` (RELION matrices), origins `(B, M, 2)` Å, fitted contrasts `(B, M)`."""

    score: torch.Tensor
    rotations: torch.Tensor
    origins_A: torch.Tensor
    contrast: torch.Tensor


def global_search(sampled: torch.Tensor, grid_rotations: torch.Tensor, origins_A: torch.Tensor,
                  data: torch.Tensor, ctf: torch.Tensor, points, weight: torch.Tensor,
                  pixel_size_A: float, keep: int, chunk: int = 2048) -> Hits:
    """Every rotation of ``grid_rotations`` `(R, 3, 3)` x every origin of ``origins_A`` `(S, 2)`
    for `B` particles, keeping the ``keep`` best of each.

    sampled: the model's padded transform (:func:`~cryosplat.fourier_slice.as_sampled` of
        :meth:`~cryosplat.fourier_slice.PaddedGrid.transform` with gridding -1).
    data: `(B, K)` the particles' rfft2 at ``points`` (a
        :class:`~cryosplat.refine.search.Points`); ctf `(B, K)` their transfer there.
    weight: `(K,)` the Friedel multiplicity over the noise power of each point.
    chunk: rotations scored at once (memory ``B S chunk`` floats)."""
    b = data.shape[0]
    dev = data.device
    wg = weighted_centred(data, ctf, weight, origins_A, points.frequency, pixel_size_A)
    pw = weight * transfer_power(ctf)
    n_s = len(origins_A)
    best_s = torch.full((b, 0), -torch.inf, device=dev)
    best_i = torch.zeros((b, 0), dtype=torch.long, device=dev)
    best_c = torch.zeros((b, 0), device=dev)
    for start in range(0, len(grid_rotations), chunk):
        rot = grid_rotations[start:start + chunk].to(dev)
        sl = extract_slices(sampled, rot, points)  # (Rc, K)
        sc, con = profiled_scores(sl, wg, pw)  # (B, S, Rc)
        flat_s = sc.transpose(1, 2).reshape(b, -1)  # index = r * S + s
        top = torch.topk(flat_s, min(keep, flat_s.shape[1]), dim=1)
        idx = top.indices + start * n_s
        c = con.transpose(1, 2).reshape(b, -1).gather(1, top.indices)
        best_s, order = torch.cat([best_s, top.values], 1).topk(
            min(keep, best_s.shape[1] + top.values.shape[1]), dim=1)
        best_i = torch.cat([best_i, idx], 1).gather(1, order)
        best_c = torch.cat([best_c, c], 1).gather(1, order)
    rot = grid_rotations.to(dev)[best_i // n_s]
    return Hits(best_s, rot, origins_A.to(dev)[best_i % n_s], best_c)


def local_search(sampled: torch.Tensor, hits: Hits, data: torch.Tensor, ctf: torch.Tensor,
                 points, weight: torch.Tensor, pixel_size_A: float, step_deg: float,
                 shift_step_A: float, levels: int, max_shift_A: float) -> Hits:
    """Each of the `M` candidates of ``hits`` moved to the best of 7 rotations x 9 origins
    around it, ``levels`` times, halving ``step_deg`` and ``shift_step_A`` each time; origins
    stay within ``max_shift_A``. The candidates come back re-sorted by their new scores."""
    b, m = hits.score.shape
    dev = data.device
    rot = hits.rotations.reshape(b * m, 3, 3)
    org = hits.origins_A.reshape(b * m, 2)
    rep = torch.arange(b, device=dev).repeat_interleave(m)
    d, c = data[rep], ctf[rep]
    pw = weight * transfer_power(c)
    score = hits.score.reshape(-1)
    contrast = hits.contrast.reshape(-1)
    for level in range(levels):
        step = 2.0 ** -(level + 1)
        w = AXIS_STEPS.to(dev) * math.radians(step_deg * step)
        cand_r = geometry.axis_angle_to_matrix(w) @ rot[:, None]  # (BM, 7, 3, 3)
        cand_o = org[:, None] + ORIGIN_STEPS.to(dev) * shift_step_A * step  # (BM, 9, 2)
        cand_o = torch.where(cand_o.norm(dim=-1, keepdim=True) <= max_shift_A + 1e-6, cand_o,
                             org[:, None])
        sl = extract_slices(sampled, cand_r, points)  # (BM, 7, K)
        wg = weighted_centred(d, c, weight, cand_o, points.frequency, pixel_size_A)
        sc, con = profiled_scores(sl, wg, pw)  # (BM, 9, 7)
        flat = sc.reshape(b * m, -1)
        top = flat.argmax(-1)
        take = flat.gather(1, top[:, None])[:, 0] > score
        pick = torch.arange(b * m, device=dev)
        rot = torch.where(take[:, None, None], cand_r[pick, top % 7], rot)
        org = torch.where(take[:, None], cand_o[pick, top // 7], org)
        contrast = torch.where(take, con.reshape(b * m, -1)[pick, top], contrast)
        score = torch.where(take, flat[pick, top], score)
    score = score.reshape(b, m)
    order = torch.argsort(score, dim=1, descending=True)
    return Hits(score.gather(1, order), rot.reshape(b, m, 3, 3)[torch.arange(b)[:, None], order],
                org.reshape(b, m, 2)[torch.arange(b)[:, None], order],
                contrast.reshape(b, m).gather(1, order))


def tempered_weights(score: torch.Tensor, n_effective: float, iterations: int = 40
                     ) -> torch.Tensor:
    """Posterior weights of each particle's candidates, ``softmax(score / T)``, with the
    smallest temperature ``T >= 1`` at which the weights spread over at least ``n_effective``
    candidates (the exponential of their entropy; at ``T = 1`` the exact posterior among the
    candidates). score `(B, M)`; returns `(B, M)` summing to 1 per row."""
    m = score.shape[1]
    target = math.log(min(max(n_effective, 1.0), m))
    s = score - score.max(dim=1, keepdim=True).values

    def entropy(log_t: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(s / log_t.exp()[:, None], dim=1)
        return -(p * p.clamp_min(1e-30).log()).sum(1)

    lo = torch.zeros(len(s), dtype=s.dtype, device=s.device)
    hi = torch.full_like(lo, 30.0)
    enough = entropy(lo) >= target - 1e-6  # T = 1 already spreads enough
    for _ in range(iterations):
        mid = (lo + hi) / 2
        ok = entropy(mid) >= target
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    log_t = torch.where(enough, torch.zeros_like(hi), hi)
    return torch.softmax(s / log_t.exp()[:, None], dim=1)
