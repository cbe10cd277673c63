"""Reconstruction: the baseline (direct Fourier inversion with known poses) and the
gold-standard Gaussian-mixture reconstruction, streamed and optionally data-parallel.

Baseline. Each particle's transform, shifted back by ``+origin`` and multiplied by its CTF, is inserted
as a central slice (torch-fourier-slice, trilinear) into a 2x padded 3D transform, and so is
its CTF². The map is ``sum CTF F / (sum CTF² + 1/SNR(k))`` (Wiener-style), where ``SNR(k)``
comes from the half-maps' FSC of a first, lightly regularised pass; then the gridding
correction (sinc²) and a crop back to the box.

Gaussian mixtures. Each half-set's mixture is fitted by Adam to mini-batches whose order is a
pure function of (seed, half, epoch) (:func:`batch_indices`). Images are read by a prefetching
DataLoader (:class:`BatchStream`) from the stacks with positioned reads, so memory does not
grow with the particle count. Under ``torch.distributed`` each rank takes every
``world``-th particle of each global batch, and the per-rank sums of the loss, of the
amplitude calibration and of the gradients are all-reduced, so every rank takes the same Adam
step an undivided run would take on the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cryosplat import geometry
from cryosplat.ctf import ctf_rfft
from cryosplat.errors import InputError
from cryosplat.evaluate import fsc
from cryosplat.gmm import softplus_inverse
from cryosplat.io.particles import Particles


@dataclass
class Insertion:
    """Accumulated ``sum CTF F`` and ``sum CTF²`` on a padded, fftshifted rfft grid."""

    numerator: torch.Tensor  # (P, P, P//2+1) complex
    denominator: torch.Tensor  # (P, P, P//2+1) real
    box_size: int
    padded_size: int

    def __add__(self, other: "Insertion") -> "Insertion":
        return Insertion(self.numerator + other.numerator, self.denominator + other.denominator,
                         self.box_size, self.padded_size)


def insert_particles(particles: Particles, indices: np.ndarray, pad_factor: int = 2,
                     batch_size: int = 64, device: str | torch.device = "cpu",
                     progress=None) -> Insertion:
    """Insert particles ``indices`` (poses, shifts, CTF from ``particles``)."""
    from torch_fourier_slice import insert_central_slices_rfft_3d

    d = particles.box_size
    p = pad_factor * d
    pad = (p - d) // 2
    shape = (p, p, p)
    num = torch.zeros(p, p, p // 2 + 1, dtype=torch.complex64, device=device)
    den = torch.zeros(p, p, p // 2 + 1, dtype=torch.float32, device=device)
    rotations = particles.require_poses()
    ctf = particles.require_ctf()
    for s in range(0, len(indices), batch_size):
        idx = np.asarray(indices[s:s + batch_size])
        t = torch.from_numpy(idx)
        pix = particles.pixel_size_A[t].to(device)
        images = particles.read_images(idx).to(device)
        images = F.pad(images, [pad, p - d - pad] * 2)
        f = torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))
        shifts = particles.shifts_A[t].float().to(device)
        f = geometry.translate_rfft(f, shifts, pix.float(), p)  # undo the -origin shift
        c = ctf_rfft(ctf[t].to(device), p, pix).float()
        slices_num = torch.fft.fftshift((c * f).to(torch.complex64), dim=-2)
        slices_den = torch.fft.fftshift((c * c).to(torch.complex64), dim=-2)
        m = geometry.fourier_slice_matrices(rotations[t]).float().to(device)
        n_acc, _ = insert_central_slices_rfft_3d(slices_num, shape, m)
        d_acc, _ = insert_central_slices_rfft_3d(slices_den, shape, m)
        num += n_acc
        den += d_acc.real
        if progress is not None:
            progress(len(idx))
    return Insertion(num, den, d, p)


def shell_index(padded_size: int, device=None) -> torch.Tensor:
    """Integer radius, in shells of the padded grid, of each voxel of an fftshifted rfft."""
    p = padded_size
    kz = torch.fft.fftshift(torch.fft.fftfreq(p, device=device))
    kx = torch.fft.rfftfreq(p, device=device)
    z, y, x = torch.meshgrid(kz, kz, kx, indexing="ij")
    return torch.round(torch.sqrt(z**2 + y**2 + x**2) * p).long()


def invert(ins: Insertion, regulariser: torch.Tensor | float) -> torch.Tensor:
    """``sum CTF F / (sum CTF² + regulariser)`` back to a `(D, D, D)` map.

    ``regulariser`` is a scalar or a grid shaped like ``ins.denominator``.
    """
    from torch_fourier_slice.volume_utils import separable_sinc2_correction

    total = ins.denominator + regulariser
    ft = torch.where(total > 0, ins.numerator / total.clamp_min(1e-30), torch.zeros_like(ins.numerator))
    p, d = ins.padded_size, ins.box_size
    ft = torch.fft.ifftshift(ft, dim=(-3, -2))
    vol = torch.fft.irfftn(ft, s=(p, p, p), dim=(-3, -2, -1))
    vol = torch.fft.fftshift(vol, dim=(-3, -2, -1))
    vol = vol / separable_sinc2_correction(vol.shape, device=vol.device)
    lo = (p - d) // 2
    return vol[lo:lo + d, lo:lo + d, lo:lo + d].contiguous()


def wiener_regulariser(half1: Insertion, half2: Insertion) -> torch.Tensor:
    """``1/SNR(k)`` for the full set on the padded grid, from a first pass's half-map FSC.

    ``SNR_full = 2 FSC / (1 - FSC)`` (the full set doubles the half-sets' SNR); the
    regulariser is the shell's mean ``sum CTF²`` divided by it (RELION's tau² idea).
    """
    eps = 1e-3 * float(half1.denominator.mean() + half2.denominator.mean())
    f = fsc(invert(half1, eps), invert(half2, eps)).double()
    f = f.clamp(1e-3, 0.999)
    snr_full = 2 * f / (1 - f)
    # padded-grid shell r is box shell r * D / P (beyond Nyquist: the last shell's SNR)
    grid_shells = shell_index(half1.padded_size, half1.denominator.device)
    shells = grid_shells.flatten()
    n_shells = int(shells.max()) + 1
    scale = half1.box_size / half1.padded_size
    box_shell = torch.clamp((torch.arange(n_shells) * scale).round().long(), max=len(f) - 1)
    den = (half1.denominator + half2.denominator).double().flatten()
    counts = torch.bincount(shells, minlength=n_shells).clamp_min(1)
    mean_den = torch.bincount(shells, weights=den, minlength=n_shells) / counts
    # shells no slice reached (the padded grid's corners) keep the first pass's eps
    per_shell = (mean_den / snr_full[box_shell]).clamp_min(eps).float()
    return per_shell[grid_shells]


@dataclass
class Backprojection:
    map: torch.Tensor
    half_map_1: torch.Tensor
    half_map_2: torch.Tensor
    fsc: torch.Tensor


def backproject(particles: Particles, half_set: np.ndarray, batch_size: int = 64,
                device: str | torch.device = "cpu", progress=None) -> Backprojection:
    """Direct Fourier inversion of the two half-sets separately and together."""
    i1, i2 = np.nonzero(half_set == 1)[0], np.nonzero(half_set == 2)[0]
    h1 = insert_particles(particles, i1, batch_size=batch_size, device=device, progress=progress)
    h2 = insert_particles(particles, i2, batch_size=batch_size, device=device, progress=progress)
    reg = wiener_regulariser(h1, h2)
    m1, m2 = invert(h1, reg / 2), invert(h2, reg / 2)  # each half holds half the CTF²
    full = invert(h1 + h2, reg)
    return Backprojection(full, m1, m2, fsc(m1, m2))


def assign_half_sets(particles: Particles, seed: int) -> np.ndarray:
    """The file's half-sets where defined; otherwise a random, seeded 50/50 split."""
    half = particles.half_set.numpy().copy()
    if (half > 0).all():
        return half
    g = np.random.default_rng(seed)
    n = len(half)
    perm = g.permutation(n)
    half[perm[: n // 2]] = 1
    half[perm[n // 2:]] = 2
    return half


# ---------------------------------------------------------------------------------------
# Gaussian-mixture reconstruction, gold standard: one mixture per half-set
# ---------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Settings of a Gaussian reconstruction (written to config.json)."""

    n_gaussians: int = 2000
    batch_size: int = 32
    epochs: float = 4.0  # passes over each half-set
    lr_means_px: float = 0.5  # Adam step of the means, pixels; decays to lr_final_fraction
    lr_scales: float = 0.02  # log-scales
    lr_rotations: float = 0.02  # quaternions
    lr_amplitudes: float = 0.02  # softplus-raw amplitudes
    lr_final_fraction: float = 0.02
    init_radius_fraction: float = 0.3  # Gaussians start uniform in a ball of this x box
    init_scale_px: float = 2.0
    n_sigma: float = 4.0
    blur_px: float = 0.0
    loss: str = "real"  # "real": real-space MSE (the paper's); "fourier": noise-whitened
    densify: bool = False  # split Gaussians with large mean gradients, prune vanishing ones
    # (the CLI turns it on: on 4AKE, 2000 particles, 500 Gaussians, it reached 4.18 Å vs
    # truth at FSC 0.5 in 35 s against 5.62 Å in 42 s with the fixed count)
    densify_every: int = 25  # steps between densify/prune rounds
    densify_until: float = 0.6  # ... during this fraction of the run
    densify_fraction: float = 0.05  # share of Gaussians split per round (largest gradients)
    max_gaussians: int = 0  # cap with densify; 0 = 4 x n_gaussians
    prune_below: float = 0.01  # prune amplitudes below this x the median amplitude
    support_radius_A: float = 0.0  # Gaussians whose centre leaves this sphere are replaced
    # (by splits of in-support ones, so the count holds); 0 = unconstrained
    eval_every: int = 50  # steps between FSC evaluations (and log lines)
    checkpoint_every: int = 50  # steps between checkpoints
    seed: int = 0
    loader_workers: int = 1  # DataLoader processes reading ahead (0: read on demand)


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` (CUDA when there is one); under torchrun, CUDA means this
    process's GPU, ``cuda:LOCAL_RANK``."""
    import os

    if name not in ("cpu", "cuda", "auto"):
        raise ValueError(f"--device {name!r}: expected cpu, cuda or auto")
    if name == "cuda" and not torch.cuda.is_available():
        from cryosplat.errors import StageError

        raise StageError("device", "--device cuda: torch finds no CUDA device (torch "
                           f"{torch.__version__}, built for CUDA {torch.version.cuda})")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device_name: str) -> tuple[int, int]:
    """Join the process group that torchrun describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``MASTER_ADDR``...) when ``WORLD_SIZE`` > 1: NCCL when the ranks train on CUDA,
    gloo on CPU. Returns (rank, world size); (0, 1) outside torchrun.

    The timeout is long (24 h) because rank 0 alone makes the validation maps while the others
    wait at a barrier."""
    import datetime
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dev = resolve_device(device_name)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=24))
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    """Wait for every rank (nothing to do in a single process)."""
    import torch.distributed as dist

    if rank_and_world()[1] > 1:
        dist.barrier()


def model_images(mixture, rotations: torch.Tensor, origin_A: torch.Tensor, ctf, box_size: int,
                 pixel_size_A: float, n_sigma: float = 4.0, blur_A: float = 0.0) -> torch.Tensor:
    """The mixture's particle images: CTF x shift(projection), real space, `(B, D, D)`."""
    f = model_images_rfft(mixture, rotations, origin_A, ctf, box_size, pixel_size_A, n_sigma, blur_A)
    return torch.fft.irfft2(f, s=(box_size, box_size))


def model_images_rfft(mixture, rotations: torch.Tensor, origin_A: torch.Tensor, ctf,
                      box_size: int, pixel_size_A: float, n_sigma: float = 4.0,
                      blur_A: float = 0.0) -> torch.Tensor:
    """:func:`model_images` in rfft space, `(B, D, D//2+1)`."""
    from cryosplat.ctf import modulate

    f = mixture.render_rfft(rotations, box_size, pixel_size_A, n_sigma=n_sigma, blur_A=blur_A)
    return modulate(f, origin_A, ctf, pixel_size_A)


def radial_shells_2d(box_size: int, device=None) -> torch.Tensor:
    """Integer radius (Fourier shell) of each element of a `(D, D//2+1)` rfft2: long tensor."""
    k = geometry.rfft_frequencies_2d(box_size, 1.0, device=device, dtype=torch.float64)
    return torch.round(k.norm(dim=-1) * box_size).long()


# ---------------------------------------------------------------------------------------
# Batches, streaming and data parallelism
# ---------------------------------------------------------------------------------------


def steps_per_epoch(n_particles: int, batch_size: int) -> int:
    """Full batches in one pass over a half-set of ``n_particles`` (at least 1)."""
    return max(1, n_particles // batch_size)


def batch_indices(indices: np.ndarray, batch_size: int, seed: int, half: int,
                  step: int) -> np.ndarray:
    """The particles of a half-set's global batch ``step``: a permutation per epoch drawn from
    ``(seed, half, epoch)``, so a resumed or parallel run sees exactly the same batches."""
    epoch, j = divmod(step, steps_per_epoch(len(indices), batch_size))
    perm = np.random.default_rng([seed, half, epoch]).permutation(len(indices))
    return indices[np.sort(perm[j * batch_size:(j + 1) * batch_size])]


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks (0, 1 without torch.distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (nothing to do in a single process)."""
    import torch.distributed as dist

    if rank_and_world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class _StepImages(torch.utils.data.Dataset):
    """Item ``i``: this rank's images of each trainer's batch ``first_step + i``."""

    def __init__(self, trainers: list["HalfSetTrainer"], first_step: int, last_step: int):
        self.p = trainers[0].p
        self.selectors = [(t.indices, t.cfg.batch_size, t.cfg.seed, t.half) for t in trainers]
        self.first, self.last = first_step, last_step
        self.rank, self.world = rank_and_world()

    def __len__(self) -> int:
        return self.last - self.first

    def __getitem__(self, i: int) -> list[torch.Tensor] | InputError:
        step = self.first + i
        try:
            return [self.p.read_images(batch_indices(*sel, step)[self.rank::self.world])
                    for sel in self.selectors]
        except InputError as e:  # handed to the training loop as it is (see BatchStream)
            return e


class BatchStream:
    """Iterate over the images of steps ``[first_step, last_step)`` for each trainer, read
    ahead by ``workers`` DataLoader processes (0: read in this process, on demand).

    A bad image (NaN pixels, a truncated stack) raises the reader's own InputError here, not
    the DataLoader's wrapped RuntimeError with a worker's traceback."""

    def __init__(self, trainers: list["HalfSetTrainer"], first_step: int, last_step: int,
                 workers: int = 1, prefetch: int = 2):
        ds = _StepImages(trainers, first_step, last_step)
        kw = dict(num_workers=workers, prefetch_factor=prefetch,
                  persistent_workers=False) if workers > 0 else {}
        self.loader = torch.utils.data.DataLoader(
            ds, batch_size=None, shuffle=False,
            pin_memory=trainers[0].device.type == "cuda", **kw)

    def __iter__(self):
        for item in self.loader:
            if isinstance(item, InputError):
                raise item
            yield item


class HalfSetTrainer:
    """A Gaussian mixture fitted to one half-set with Adam; deterministic for its seed.

    The batch order is :func:`batch_indices`, so a run resumed at step ``s`` sees exactly the
    batches an uninterrupted run would. Under torch.distributed each rank handles its share of
    every batch and the sums are all-reduced (see the module's docstring).
    """

    def __init__(self, particles: Particles, indices: np.ndarray, cfg: TrainConfig, half: int,
                 total_steps: int, device: torch.device):
        from cryosplat.gmm import GaussianMixture

        self.p, self.indices, self.cfg, self.half = particles, np.asarray(indices), cfg, half
        self.device, self.total_steps = device, total_steps
        self.d = particles.box_size
        self.pix = particles.require_single_pixel_size()
        self.rotations = particles.require_poses().float()
        self.ctf = particles.require_ctf()
        g = torch.Generator().manual_seed(cfg.seed * 1000 + half)
        init_radius_A = cfg.init_radius_fraction * self.d * self.pix
        if cfg.support_radius_A > 0:
            init_radius_A = min(init_radius_A, cfg.support_radius_A)
        self.model = GaussianMixture.random(cfg.n_gaussians, init_radius_A,
                                            cfg.init_scale_px * self.pix, generator=g).to(device)
        self.lr_means = cfg.lr_means_px * self.pix
        self.base_lrs = [self.lr_means, cfg.lr_scales, cfg.lr_rotations, cfg.lr_amplitudes]
        self.optimizer = self._adam()
        self.grad_accum = torch.zeros(cfg.n_gaussians, device=device)
        self.step = 0
        self.calibrated = False
        self.shells = radial_shells_2d(self.d, device)
        self.noise_power: torch.Tensor | None = None  # per shell, for loss="fourier"
        self.rank, self.world = rank_and_world()

    def batch(self, step: int) -> np.ndarray:
        """The global batch of ``step`` (all ranks' particles)."""
        return batch_indices(self.indices, self.cfg.batch_size, self.cfg.seed, self.half, step)

    def local_batch(self, step: int) -> np.ndarray:
        """This rank's share of the global batch of ``step``."""
        return self.batch(step)[self.rank::self.world]

    def _images(self, idx: np.ndarray, rfft: bool = False, data: torch.Tensor | None = None):
        t = torch.from_numpy(idx)
        data = self.p.read_images(idx) if data is None else data
        data = data.to(self.device, non_blocking=True)
        args = (self.model, self.rotations[t].to(self.device),
                self.p.shifts_A[t].float().to(self.device), self.ctf[t].to(self.device),
                self.d, self.pix, self.cfg.n_sigma, self.cfg.blur_px * self.pix)
        if rfft:
            return torch.fft.rfft2(data), model_images_rfft(*args)
        return data, model_images(*args)

    def _loss(self, idx: np.ndarray, n_global: int, data: torch.Tensor | None = None
              ) -> torch.Tensor:
        """This rank's part of the global batch's loss (the parts sum to it over ranks):
        real-space MSE, or with ``loss="fourier"`` the rfft residual weighted per shell by
        1 / (running mean residual power of that shell), the weights averaging 1."""
        if self.cfg.loss == "real":
            data, model = self._images(idx, data=data)
            return ((model - data) ** 2).sum() / (n_global * self.d * self.d)
        if self.cfg.loss != "fourier":
            raise ValueError(f"loss {self.cfg.loss!r}: expected 'real' or 'fourier'")
        data_f, model_f = self._images(idx, rfft=True, data=data)
        power = (model_f - data_f).abs() ** 2  # (B, D, D//2+1)
        shells = self.shells
        with torch.no_grad():
            n = int(shells.max()) + 1
            total = all_reduce_sum(power.sum(0).double()) / n_global
            per_shell = torch.bincount(shells.flatten(), total.flatten(),
                                       minlength=n) / torch.bincount(shells.flatten(), minlength=n)
            if self.noise_power is None:
                self.noise_power = per_shell
            else:
                self.noise_power = 0.9 * self.noise_power + 0.1 * per_shell
            w = 1 / self.noise_power.clamp_min(1e-30)[shells]
            w = (w / w.mean()).float()
        return (power * w).sum() / (n_global * power[0].numel() * self.d**2)

    @torch.no_grad()
    def calibrate(self) -> float:
        """Scale the amplitudes so that the first batch's render best fits its images."""
        data, model = self._images(self.local_batch(0))
        sums = all_reduce_sum(torch.stack([(model * data).sum(), (model * model).sum()]).double())
        scale = float(sums[0] / sums[1].clamp_min(1e-30))
        if not np.isfinite(scale):
            from cryosplat.errors import StageError

            raise StageError("calibration", f"half-set {self.half}: the first batch's images or "
                                            f"render hold NaN/Inf (amplitude scale {scale})")
        if not scale > 0:
            from cryosplat.errors import InputError

            raise InputError(self.p.source, f"half-set {self.half}: the images anti-correlate "
                                            f"with a random positive density (scale {scale:.3g})"
                                            "; the molecule looks dark: try --invert")
        self.model.scale_amplitudes(scale)
        self.calibrated = True
        return scale

    def _adam(self) -> torch.optim.Adam:
        m = self.model
        params = (m.means_A, m.log_scales_A, m.quaternions, m.raw_amplitudes)
        return torch.optim.Adam([{"params": [x], "lr": lr} for x, lr in zip(params, self.base_lrs)])

    def _rebuild(self, keep: torch.Tensor, new: dict[str, torch.Tensor]) -> None:
        """Keep Gaussians ``keep`` (their Adam moments too) and append ``new`` parameters
        (fresh moments); the amplitude unit stays."""
        from cryosplat.gmm import GaussianMixture

        old, old_opt = self.model, self.optimizer.state_dict()
        names = ("means_A", "log_scales_A", "quaternions", "raw_amplitudes")
        tensors = {n: torch.cat([getattr(old, n).detach()[keep], new[n]]) for n in names}
        self.model = GaussianMixture.from_raw(**tensors, amplitude_unit=old.amplitude_unit)
        self.optimizer = self._adam()
        state = self.optimizer.state_dict()
        n_new = len(new["means_A"])
        for i, n in enumerate(names):
            st = old_opt["state"].get(i)
            if st is None:
                continue
            state["state"][i] = {"step": st["step"], **{
                k: torch.cat([st[k][keep], st[k].new_zeros((n_new, *st[k].shape[1:]))])
                for k in ("exp_avg", "exp_avg_sq")}}
        self.optimizer.load_state_dict(state)
        for grp, g in zip(self.optimizer.param_groups, old_opt["param_groups"]):
            grp["lr"] = g["lr"]
        self.grad_accum = torch.zeros(len(self.model), device=self.device)

    def growing(self) -> bool:
        """Whether densification still adds Gaussians at the current step."""
        return self.cfg.densify and self.step < self.cfg.densify_until * self.total_steps

    @torch.no_grad()
    def densify_and_prune(self) -> tuple[int, int]:
        """One round of adaptive density control; returns (split, removed).

        Removed: Gaussians whose amplitude fell below ``prune_below`` x the median (with
        ``densify``) and those whose centre left the support sphere (``support_radius_A``).
        Split: the in-support Gaussians with the largest accumulated mean-gradient norm, each
        into two drawn from the parent (seeded), scales / 1.6, amplitude halved. How many:
        with ``densify``, during the first ``densify_until`` of the run, ``densify_fraction``
        of the count (up to the cap); with a support, at least as many as were removed, so the
        support never lowers the count.
        """
        cfg, m = self.cfg, self.model
        amp = m.amplitudes
        alive = torch.ones_like(amp, dtype=torch.bool)
        if cfg.densify:
            alive &= amp > cfg.prune_below * amp.median()
        if cfg.support_radius_A > 0:
            alive &= m.means_A.norm(dim=-1) <= cfg.support_radius_A
        n_removed = int((~alive).sum())
        growing = self.growing()
        n_split = n_removed if cfg.support_radius_A > 0 or not growing else 0
        if growing:  # grow by a share of the count, up to the cap
            cap = cfg.max_gaussians or 4 * cfg.n_gaussians
            n_split = max(n_split, min(int(cfg.densify_fraction * len(m)),
                                       max(0, cap - int(alive.sum()))))
        n_split = min(n_split, int(alive.sum()))
        if n_removed == 0 and n_split == 0:
            return 0, 0
        score = torch.where(alive, self.grad_accum, -1.0)
        split = torch.topk(score, n_split).indices if n_split > 0 else score.new_zeros(0).long()
        keep = alive.clone()
        keep[split] = False
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.half * 104729 + self.step)
        cov = m.covariances()[split]
        chol = torch.linalg.cholesky(cov + 1e-9 * torch.eye(3, device=cov.device))
        new = {}
        offsets = torch.randn(2, n_split, 3, generator=g).to(cov)
        new["means_A"] = (m.means_A[split][None] + torch.einsum("mij,smj->smi", chol, offsets)
                          ).reshape(-1, 3)
        new["log_scales_A"] = (m.log_scales_A[split] - math.log(1.6)).repeat(2, 1)
        new["quaternions"] = m.quaternions[split].repeat(2, 1)
        half_amp = amp[split] / 2 / m.amplitude_unit
        new["raw_amplitudes"] = softplus_inverse(half_amp).repeat(2)
        self._rebuild(keep, new)
        return n_split, n_removed

    def train_step(self, data: torch.Tensor | None = None) -> float:
        """One Adam step on the global batch of ``self.step`` (``data``: this rank's images of
        it, prefetched; read here when None). Returns the batch's loss."""
        if not self.calibrated:
            self.calibrate()
        frac = min(1.0, self.step / max(1, self.total_steps))
        decay = self.cfg.lr_final_fraction ** frac
        for grp, base in zip(self.optimizer.param_groups, self.base_lrs):
            grp["lr"] = base * decay
        batch = self.batch(self.step)
        loss = self._loss(batch[self.rank::self.world], len(batch), data)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.world > 1:  # one all-reduce of the loss and every gradient
            flat = all_reduce_sum(torch.cat([loss.detach().reshape(1).double()] +
                                            [p.grad.reshape(-1).double() for p in params]))
            loss, off = flat[0], 1
            for p in params:
                p.grad.copy_(flat[off:off + p.numel()].reshape(p.shape))
                off += p.numel()
        if not torch.isfinite(loss):
            from cryosplat.errors import StageError

            raise StageError("training", f"half-set {self.half}: the loss became "
                                         f"{float(loss.detach())} at step {self.step}; lower "
                                         "the learning rates")
        if self.cfg.densify or self.cfg.support_radius_A > 0:
            self.grad_accum += self.model.means_A.grad.detach().norm(dim=-1)
        self.optimizer.step()
        self.step += 1
        if self.step % self.cfg.densify_every == 0 and (self.cfg.support_radius_A > 0
                                                         or self.growing()):
            self.densify_and_prune()
        return float(loss.detach())

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "calibrated": self.calibrated,
                "noise_power": self.noise_power, "grad_accum": self.grad_accum}

    def load_state_dict(self, state: dict) -> None:
        n = state["model"]["means_A"].shape[0]
        if n != len(self.model):  # densified: rebuild at the checkpoint's size first
            self._rebuild(torch.zeros(len(self.model), dtype=torch.bool, device=self.device),
                          {k: v.to(self.device) for k, v in state["model"].items()
                           if k != "amplitude_unit"})
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "grad_accum" in state:
            self.grad_accum = state["grad_accum"].to(self.device)
        self.step, self.calibrated = int(state["step"]), bool(state["calibrated"])
        self.noise_power = state.get("noise_power")

    @torch.no_grad()
    def volume(self) -> torch.Tensor:
        return self.model.voxelise(self.d, self.pix, n_sigma=self.cfg.n_sigma).cpu()


def check_batch_size(particles: Particles, half_set: np.ndarray, cfg: TrainConfig) -> None:
    """Each half-set must hold a batch, and a batch one particle per rank."""
    sizes = [int((half_set == h).sum()) for h in (1, 2)]
    if min(sizes) < cfg.batch_size:
        raise InputError(particles.source, f"each half-set needs at least --batch "
                                           f"{cfg.batch_size} particles; they hold {sizes[0]} "
                                           f"and {sizes[1]}")
    world = rank_and_world()[1]
    if cfg.batch_size < world:
        raise InputError(None, f"--batch {cfg.batch_size} is smaller than the {world} processes: "
                               "each needs at least one particle of every batch")


def total_steps(half_set: np.ndarray, cfg: TrainConfig) -> int:
    """Steps of a run: ``epochs`` passes over the larger half-set (both halves step together)."""
    spe = max(steps_per_epoch(int((half_set == h).sum()), cfg.batch_size) for h in (1, 2))
    return max(1, int(round(cfg.epochs * spe)))


def _save_checkpoint(path, trainers, history, trace, config: dict) -> None:
    from cryosplat.io.mrc import atomic_path

    state = {"config": config, "history": history, "trace": trace,
             "halves": [t.state_dict() for t in trainers]}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path) -> dict:
    """A checkpoint written by :func:`train_gold_standard` (weights-only loading)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def train_gold_standard(particles: Particles, half_set: np.ndarray, cfg: TrainConfig,
                        device: torch.device, checkpoint_path=None, resume: dict | None = None,
                        truth: torch.Tensor | None = None, progress=None, log=print,
                        config: dict | None = None,
                        references: tuple[torch.Tensor, torch.Tensor] | None = None,
                        stop_when=None,
                        ) -> tuple[list[HalfSetTrainer], list[dict], list[list[float]]]:
    """Fit independent mixtures to half-sets 1 and 2 (they never see each other's particles).

    Images are read ahead by a :class:`BatchStream`. Under torch.distributed every rank calls
    this with the same arguments; only rank 0 evaluates, reports progress and writes
    checkpoints. Every ``cfg.eval_every`` steps both halves are voxelised and the half-map FSC (with
    ``truth``, the FSC of their average against it; with ``references``, the half-sets' own
    direct reconstructions, the cross-validated estimate of
    :func:`cryosplat.evaluate.cross_validated_fsc`) is recorded in the history; every
    ``cfg.checkpoint_every`` steps both trainers are checkpointed atomically. Returns the
    trainers, the evaluation history and the trace of ``[step, loss_1, loss_2]`` per step.

    ``stop_when``, a function of a history row, ends the run after the first evaluation for
    which it is true (benchmarks: stop once the baseline is reached). Single process only,
    since only rank 0 evaluates.
    """
    import time

    from cryosplat.evaluate import cross_validated_fsc, cross_validated_resolution, resolution_A

    check_batch_size(particles, half_set, cfg)
    if stop_when is not None and rank_and_world()[1] > 1:
        raise ValueError("stop_when needs a single process: only rank 0 evaluates")
    halves = [np.nonzero(half_set == h)[0] for h in (1, 2)]
    total = total_steps(half_set, cfg)
    trainers = [HalfSetTrainer(particles, idx, cfg, h + 1, total, device)
                for h, idx in enumerate(halves)]
    history: list[dict] = []
    trace: list[list[float]] = []
    elapsed0 = 0.0
    if resume is not None:
        for t, s in zip(trainers, resume["halves"]):
            t.load_state_dict(s)
        history, trace = list(resume["history"]), [list(r) for r in resume["trace"]]
        elapsed0 = history[-1]["time_s"] if history else 0.0
        log(f"resumed at step {trainers[0].step} of {total}")
    t0 = time.perf_counter() - elapsed0
    d, pix = particles.box_size, particles.require_single_pixel_size()

    def evaluate(losses):
        v1, v2 = trainers[0].volume(), trainers[1].volume()
        row = {"step": trainers[0].step, "time_s": time.perf_counter() - t0,
               "loss_1": losses[0], "loss_2": losses[1],
               "half_map_resolution_A": resolution_A(fsc(v1, v2), d, pix)}
        if truth is not None:
            ft = fsc((v1 + v2) / 2, truth)
            row["truth_resolution_A_0.143"] = resolution_A(ft, d, pix)
            row["truth_resolution_A_0.5"] = resolution_A(ft, d, pix, 0.5)
        if references is not None:
            est = cross_validated_fsc(v1, v2, *references)["estimate"]
            r, limit = cross_validated_resolution(est, d, pix)
            row["cross_validated_resolution_A"] = r
            row["cross_validated_is_limit"] = limit
        history.append(row)
        log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))

    lead = trainers[0].rank == 0
    losses = [float("nan")] * 2
    for images in BatchStream(trainers, trainers[0].step, total, cfg.loader_workers):
        losses = [t.train_step(x) for t, x in zip(trainers, images)]
        step = trainers[0].step
        trace.append([step, *losses])
        if not lead:
            continue
        if progress is not None:
            progress(2 * cfg.batch_size, losses)
        stop = False
        if step % cfg.eval_every == 0 or step == total:
            evaluate(losses)
            stop = stop_when is not None and bool(stop_when(history[-1]))
        if checkpoint_path is not None and (step % cfg.checkpoint_every == 0 or step == total
                                            or stop):
            _save_checkpoint(checkpoint_path, trainers, history, trace, config or {})
        if stop:
            log(f"stopped at step {step} of {total}: the stopping condition holds")
            break
    if lead and (not history or history[-1]["step"] != trainers[0].step):
        evaluate(losses)
    return trainers, history, trace
