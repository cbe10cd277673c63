"""Local search of each particle's rotation, origin and defocus against one half-set's
model, then a gradient polish of all three: the E-step of ``cryosplat refine``.

A candidate is scored by the white-noise log-likelihood of the particle (times the noise
variance, less what does not depend on the candidate):

    s = sum_k w_k Re(conj(CTF_k M_k) G_k) - 1/2 sum_k w_k CTF_k² |M_k|²,

where ``M`` is the model's central slice at the candidate rotation, ``G`` the particle's
transform translated by ``+origin`` (centred), ``CTF`` the particle's CTF at the candidate
defocus, ``k`` runs over the rfft2 points within the alignment limit and ``w_k`` is 2 (each
point also stands for its Friedel mate), 1 at the origin. The slices are read by trilinear
interpolation from the model's 2x padded 3D transform, made after dividing the map by the
gridding function (:meth:`cryosplat.fourier_slice.PaddedGrid.transform` with ``gridding=-1``), so
a slice is the mixture's projection: the same renderer, through the Fourier slice theorem,
at a cost per candidate that does not grow with the number of Gaussians.

The search (:func:`refine_batch`) is coarse to fine: at each level, the rotations
``exp(w) R`` with ``w`` on a 3x3x3 grid of that level's angular step (the first level) or
the centre and its 6 neighbours along the axes (the finer levels), times the 9 origins on a
3x3 grid of its shift step, all around the best so far; then 5 defoci around the current one;
then Adam on (rotation vector, origin, defocus) through the same score, which is kept only
for the particles whose score it raised. No change may leave the bounds around the input
pose: ``max_angle_deg``, ``max_shift_A``, ``max_defocus_A``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from cryosplat import geometry
from cryosplat.ctf import CTFParams, transfer_rfft
from cryosplat.fourier_slice import PaddedGrid, slice_points
from cryosplat.train.volume import AccumulatedObjective

_GRID3 = torch.stack(torch.meshgrid(*[torch.tensor([-1.0, 0.0, 1.0])] * 3, indexing="ij"),
                     -1).reshape(-1, 3)  # (27, 3), the centre at 13
AXIS_STEPS = torch.cat([torch.zeros(1, 3), torch.eye(3), -torch.eye(3)])  # (7, 3), the centre at 0
ORIGIN_STEPS = torch.stack(torch.meshgrid(*[torch.tensor([-1.0, 0.0, 1.0])] * 2, indexing="ij"),
                     -1).reshape(-1, 2)  # (9, 2), the centre at 4
_DEFOCUS = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])


@dataclass
class Pose:
    """Particles' poses as the search changes them: RELION matrices `(B, 3, 3)`, origins
    (rlnOriginX/YAngst) `(B, 2)` and a defocus change `(B,)` in Å, added to both defocus U
    and V (the astigmatism is kept)."""

    rotations: torch.Tensor
    origins_A: torch.Tensor
    defocus_change_A: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        """Field name -> tensor, for saving and for applying one operation to all three."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __getitem__(self, index) -> Pose:
        return Pose(**{k: v[index] for k, v in self.tensors().items()})

    def to(self, device=None, dtype=None) -> Pose:
        """All three on ``device`` in ``dtype``."""
        return Pose(**{k: v.to(device, dtype) for k, v in self.tensors().items()})

    def clone(self) -> Pose:
        """A copy that shares no storage."""
        return Pose(**{k: v.clone() for k, v in self.tensors().items()})

    def assign(self, index, other: Pose) -> None:
        """Set rows ``index`` to ``other``'s, in place."""
        for k, v in self.tensors().items():
            v[index] = getattr(other, k)

    @staticmethod
    def cat(poses: list[Pose]) -> Pose:
        """The rows of ``poses`` one after the other."""
        return Pose(**{k: torch.cat([getattr(p, k) for p in poses]) for k in poses[0].tensors()})


@dataclass
class Points:
    """The rfft2 points of a `(D, D)` image that the search compares: flat indices `(K,)`,
    frequencies ``(ky, kx)`` in cycles per pixel `(K, 2)` and their weights `(K,)`."""

    flat: torch.Tensor
    frequency: torch.Tensor
    weight: torch.Tensor
    box_size: int


def alignment_points(box_size: int, limit_shell: int, device=None) -> Points:
    """The points of :class:`Points` within shell ``limit_shell`` of a `(D, D)` image."""
    flat, ky, kx = slice_points(box_size, float(limit_shell), device)
    weight = torch.where((ky == 0) & (kx == 0), 1.0, 2.0)
    return Points(flat, torch.stack([ky, kx], -1) / box_size, weight, box_size)


def extract_slices(volume: torch.Tensor, rotations: torch.Tensor, points: Points) -> torch.Tensor:
    """The model's central slices at ``points``: `(..., K)` complex, differentiable in
    ``rotations`` `(..., 3, 3)` (RELION matrices), read from ``volume`` `(1, 2, P, P, P//2+1)`
    (:func:`~cryosplat.fourier_slice.as_sampled` of the model's padded transform) by
    :meth:`cryosplat.fourier_slice.PaddedGrid.extract`."""
    grid = PaddedGrid(points.box_size, volume.shape[2], volume.device)
    return grid.extract(volume, rotations, points.frequency)


def _imaged(rotations: torch.Tensor, ctf: CTFParams) -> torch.Tensor:
    """Candidate rotations `(B, R, 3, 3)` with each particle's anisotropic magnification
    (:func:`cryosplat.geometry.image_matrices`)."""
    mag = ctf.mag_matrix
    return geometry.image_matrices(rotations, None if mag is None else mag[:, None])


def ctf_at(ctf: CTFParams, defocus_change_A: torch.Tensor, points: Points,
           pixel_size_A: float) -> torch.Tensor:
    """The optical transfer (:func:`cryosplat.ctf.transfer_rfft`) of `B` particles at
    ``points`` with their defocus changed by ``defocus_change_A`` `(B, C)` (both U and V):
    `(B, C, K)`, real, or complex where there are odd aberrations."""
    b, c = defocus_change_A.shape
    rep = ctf[torch.arange(b).repeat_interleave(c)]
    change = defocus_change_A.reshape(-1).to(rep.defocus_u_A.dtype)
    rep = replace(rep, defocus_u_A=rep.defocus_u_A + change, defocus_v_A=rep.defocus_v_A + change)
    values = transfer_rfft(rep, points.box_size, pixel_size_A).reshape(b * c, -1)[:, points.flat]
    return values.reshape(b, c, -1)


def centred_data(data: torch.Tensor, origins_A: torch.Tensor, points: Points,
                 pixel_size_A: float) -> torch.Tensor:
    """Particles' transforms at ``points`` `(B, K)` translated to their centre for each of
    their candidate origins `(B, S, 2)` (undoing the forward model's shift): `(B, S, K)`."""
    undo = -geometry.origin_to_translation_A(origins_A)
    return data[:, None] * geometry.translation_phase(points.frequency, undo, pixel_size_A)


def scores(slices: torch.Tensor, ctf: torch.Tensor, centred: torch.Tensor,
           weight: torch.Tensor) -> torch.Tensor:
    """The score of the module docstring for every (rotation, origin) pair.

    slices `(B, R, K)` complex; ctf `(B, R, K)` real (or broadcastable); centred
    `(B, S, K)` complex; weight `(K,)`. Returns `(B, R, S)`."""
    c = slices * ctf
    power = 0.5 * (weight * (c.real**2 + c.imag**2)).sum(-1)  # (B, R)
    a = torch.cat([c.real * weight, c.imag * weight], -1)
    g = torch.cat([centred.real, centred.imag], -1)
    return torch.bmm(a, g.transpose(1, 2)) - power[..., None]


@dataclass
class SearchConfig:
    """How far and how finely :func:`refine_batch` searches (the bounds are RELION-like
    local searches: ``--max-angle``, ``--max-shift``, ``--max-defocus``)."""

    max_angle_deg: float = 10.0
    max_shift_A: float = 5.0
    max_defocus_A: float = 1000.0
    angle_step_deg: float = 2.0  # the first level's step; each level halves it
    shift_step_A: float = 1.0  # idem
    defocus_step_A: float = 200.0  # 5 defoci, +-2 steps (100 Å reached +-300 Å in 2 iterations)
    levels: int = 3  # the first searches 27 rotations (3x3x3), the others 7 (centre, +-axes)
    polish_steps: int = 5


def _allowed(rotations: torch.Tensor, origins_A: torch.Tensor, change_A: torch.Tensor,
             start: Pose, cfg: SearchConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which candidate rotations `(B, R, 3, 3)`, origins `(B, S, 2)` and defocus changes
    `(B, C)` stay within ``cfg``'s bounds around the input poses ``start``: `(B, R)`,
    `(B, S)`, `(B, C)` booleans."""
    angle = geometry.rotation_angle_deg(rotations, start.rotations[:, None])
    move = (origins_A - start.origins_A[:, None]).norm(dim=-1)
    change = (change_A - start.defocus_change_A[:, None]).abs()
    return (angle <= cfg.max_angle_deg + 1e-4, move <= cfg.max_shift_A + 1e-4,
            change <= cfg.max_defocus_A + 1e-3)


def refine_batch(transform: torch.Tensor, data: torch.Tensor, ctf: CTFParams, pose: Pose,
                 start: Pose, points: Points, pixel_size_A: float, cfg: SearchConfig,
                 scale: float = 1.0) -> tuple[Pose, torch.Tensor]:
    """Search and polish `B` particles' poses (module docstring).

    Parameters
    ----------
    transform: the model's padded transform (:func:`extract_slices`).
    data: `(B, K)` the particles' rfft2 at ``points`` (as recorded: not centred).
    ctf: their CTF parameters with the *input* defoci; ``pose.defocus_change_A`` is added.
    pose: where the search starts (the last iteration's result).
    start: the input poses, around which ``cfg``'s bounds hold.
    scale: multiplies the steps (later iterations search more finely).

    Returns
    -------
    (the new poses, their scores `(B,)`).
    """
    b = data.shape[0]
    dev = data.device
    rot, org, dfc = pose.rotations, pose.origins_A, pose.defocus_change_A
    for level in range(cfg.levels):
        step = scale / 2**level
        grid = _GRID3 if level == 0 else AXIS_STEPS
        cand_r = geometry.axis_angle_to_matrix(grid.to(dev) * torch.deg2rad(
            torch.tensor(cfg.angle_step_deg * step))) @ rot[:, None]  # (B, 27, 3, 3)
        cand_o = org[:, None] + ORIGIN_STEPS.to(dev) * cfg.shift_step_A * step  # (B, 9, 2)
        with torch.no_grad():
            s = scores(extract_slices(transform, _imaged(cand_r, ctf), points),
                       ctf_at(ctf, dfc[:, None], points, pixel_size_A),
                       centred_data(data, cand_o, points, pixel_size_A), points.weight)
            ok_r, ok_o, _ = _allowed(cand_r, cand_o, dfc[:, None], start, cfg)
            s = s.masked_fill(~(ok_r[:, :, None] & ok_o[:, None, :]), -torch.inf)
            best = s.reshape(b, -1).argmax(-1)
        pick = torch.arange(b, device=dev)
        rot, org = cand_r[pick, best // len(ORIGIN_STEPS)], cand_o[pick, best % len(ORIGIN_STEPS)]
    with torch.no_grad():  # defocus, at the best rotation and origin
        cand_d = dfc[:, None] + _DEFOCUS.to(dev) * cfg.defocus_step_A * scale  # (B, 5)
        slices = extract_slices(transform, _imaged(rot[:, None], ctf), points)  # (B, 1, K)
        centred = centred_data(data, org[:, None], points, pixel_size_A)  # (B, 1, K)
        c = ctf_at(ctf, cand_d, points, pixel_size_A)  # (B, 5, K)
        s = scores(slices.expand_as(c), c, centred, points.weight)[..., 0]  # (B, 5)
        s = s.masked_fill(~_allowed(rot[:, None], org[:, None], cand_d, start, cfg)[2], -torch.inf)
        dfc = cand_d[torch.arange(b, device=dev), s.argmax(-1)]
    return polish(transform, data, ctf, Pose(rot, org, dfc), start, points, pixel_size_A, cfg,
                  scale / 2**cfg.levels)


def polish(transform: torch.Tensor, data: torch.Tensor, ctf: CTFParams, pose: Pose, start: Pose,
           points: Points, pixel_size_A: float, cfg: SearchConfig,
           scale: float) -> tuple[Pose, torch.Tensor]:
    """Adam on each particle's (rotation vector, origin, defocus change) through the score,
    ``cfg.polish_steps`` steps of about ``scale`` x the first level's steps; a particle keeps
    the result only if it raised its score within the bounds. Returns (poses, scores)."""
    dev = data.device
    omega = torch.zeros(len(data), 3, device=dev, requires_grad=True)
    d_org = torch.zeros(len(data), 2, device=dev, requires_grad=True)
    d_df = torch.zeros(len(data), device=dev, requires_grad=True)
    opt = torch.optim.Adam([
        {"params": [omega], "lr": float(torch.deg2rad(torch.tensor(cfg.angle_step_deg * scale)))},
        {"params": [d_org], "lr": cfg.shift_step_A * scale},
        {"params": [d_df], "lr": cfg.defocus_step_A * scale}])

    def score() -> torch.Tensor:
        r = geometry.axis_angle_to_matrix(omega) @ pose.rotations
        s = scores(extract_slices(transform, _imaged(r[:, None], ctf), points),
                   ctf_at(ctf, (pose.defocus_change_A + d_df)[:, None], points, pixel_size_A),
                   centred_data(data, (pose.origins_A + d_org)[:, None], points, pixel_size_A),
                   points.weight)
        return s[:, 0, 0]

    with torch.no_grad():
        before = score()
    for _ in range(cfg.polish_steps):
        opt.zero_grad(set_to_none=True)
        (-score().sum()).backward()
        opt.step()
    with torch.no_grad():
        after = score()
        new = Pose(geometry.axis_angle_to_matrix(omega) @ pose.rotations,
                   pose.origins_A + d_org, pose.defocus_change_A + d_df)
        ok_r, ok_o, ok_d = _allowed(new.rotations[:, None], new.origins_A[:, None],
                                    new.defocus_change_A[:, None], start, cfg)
        take = (after > before) & ok_r[:, 0] & ok_o[:, 0] & ok_d[:, 0]
        return (Pose(torch.where(take[:, None, None], new.rotations, pose.rotations),
                     torch.where(take[:, None], new.origins_A, pose.origins_A),
                     torch.where(take, new.defocus_change_A, pose.defocus_change_A)),
                torch.where(take, after, before))


@torch.no_grad()
def alignment_limit(tapered_transform: torch.Tensor, held_out: AccumulatedObjective,
                    threshold: float = 0.25) -> tuple[int, torch.Tensor]:
    """The finest shell at which a half-set's model still predicts its own held-out particles.

    Per shell ``s`` of the box, ``r(s) = sum Re(conj(V^) B_held) / sum W_held |V^|²``: the
    regression of the held-out particles on the model's slices, near 1 where the model holds
    their signal, near 0 where it holds noise (for a model ``truth + noise`` it is the
    squared FSC of the model against the truth). ``tapered_transform`` is the objective's
    transform of the model (:class:`~cryosplat.train.volume.AccumulatedObjective`). The limit
    is the shell before the first two consecutive shells (3-shell running mean) below
    ``threshold``, at least 3 and at most D//2. Returns (the limit, r `(D//2+1,)`)."""
    d = held_out.box_size
    power, cross = held_out.terms(tapered_transform)
    shell = (held_out.grid.shells() + 1) // 2
    n = d // 2 + 1
    inside = shell < n
    sums = [torch.zeros(n, dtype=torch.float64, device=power.device).index_add_(
        0, shell[inside], t[inside].double()) for t in (power, cross)]
    r = sums[1] / sums[0].clamp_min(1e-30)
    smooth = torch.nn.functional.avg_pool1d(r[None, None], 3, 1, 1, count_include_pad=False)[0, 0]
    low = smooth < threshold
    for s in range(3, n - 1):
        if low[s] and low[s + 1]:
            return s - 1, r.cpu()
    return d // 2, r.cpu()
