"""One half-set's Gaussian mixture, fitted by Adam: loss, amplitude calibration, the step,
densification through its :class:`~cryosplat.train.densify.DensifyStrategy`, and its state.

Under torch.distributed each rank handles its share of every batch and the per-rank sums of
the loss, of the amplitude calibration and of the gradients are all-reduced, so every rank
takes the same Adam step an undivided run would take on the whole batch.
"""

from __future__ import annotations

import numpy as np
import torch

from cryosplat.errors import StageError
from cryosplat.fourier import shell_index_2d
from cryosplat.gaussians import GaussianMixture, model_images, model_images_rfft
from cryosplat.io.particles import Particles
from cryosplat.train.batches import batch_indices
from cryosplat.train.config import TrainConfig
from cryosplat.train.densify import PARAMETERS, DensifyStrategy, rebuild
from cryosplat.train.distributed import all_reduce_sum, rank_and_world
from cryosplat.train.seeding import checked_amplitude_scale, random_mixture


class HalfSetTrainer:
    """A Gaussian mixture fitted to one half-set with Adam; deterministic for its seed.

    The batch order is :func:`~cryosplat.train.batches.batch_indices`, so a run resumed at
    step ``s`` sees exactly the batches an uninterrupted run would. It runs ``total_steps``
    steps (a :class:`~cryosplat.train.halves.HalfSetFit`, with no early stop).
    """

    loss_names: tuple[str, ...] = ("loss",)
    stop_reason: str | None = None

    def __init__(self, particles: Particles, indices: np.ndarray, cfg: TrainConfig, half: int,
                 total_steps: int, device: torch.device):
        self.p, self.indices, self.cfg, self.half = particles, np.asarray(indices), cfg, half
        self.device, self.total_steps = device, total_steps
        self.d = particles.box_size
        self.pix = particles.require_single_pixel_size()
        self.rotations = particles.require_poses().float()
        self.ctf = particles.require_ctf()
        self.model = random_mixture(cfg, self.d, self.pix, half).to(device)
        self.base_lrs = [cfg.lr_means_px * self.pix, cfg.lr_scales, cfg.lr_rotations,
                         cfg.lr_amplitudes]
        self.optimizer = self._adam(self.model)
        self.strategy = DensifyStrategy.from_config(cfg)
        self.grad_accum = torch.zeros(cfg.n_gaussians, device=device)
        self.step = 0
        self.calibrated = False
        self.shells = shell_index_2d(self.d, device)
        self.noise_power: torch.Tensor | None = None  # per shell, for loss="fourier"
        self.rank, self.world = rank_and_world()
        self._volume: tuple[int, torch.Tensor] | None = None  # (step, map) of volume()

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
        scale = checked_amplitude_scale(float(sums[0] / sums[1].clamp_min(1e-30)), self.half,
                                        self.p.source)
        self.model.scale_amplitudes(scale)
        self.calibrated = True
        self._volume = None
        return scale

    def _adam(self, model: GaussianMixture) -> torch.optim.Adam:
        params = [getattr(model, n) for n in PARAMETERS]
        return torch.optim.Adam([{"params": [x], "lr": lr} for x, lr in zip(params, self.base_lrs)])

    def _adopt(self, model: GaussianMixture, optimizer: torch.optim.Adam) -> None:
        """Train ``model`` with ``optimizer`` from now on (after densification or a resize):
        fresh gradient statistics, no cached map."""
        self.model, self.optimizer = model, optimizer
        self.grad_accum = torch.zeros(len(model), device=self.device)
        self._volume = None

    def densify_and_prune(self) -> tuple[int, int]:
        """One round of the :class:`DensifyStrategy` now; returns (split, removed)."""
        seed = self.cfg.seed * 7919 + self.half * 104729 + self.step
        model, optimizer, split, removed = self.strategy.refine(
            self.model, self.optimizer, self.grad_accum, self.step, self.total_steps, seed,
            self._adam)
        if model is not self.model:
            self._adopt(model, optimizer)
        return split, removed

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
            raise StageError("training", f"half-set {self.half}: the loss became "
                                         f"{float(loss.detach())} at step {self.step}; lower "
                                         "the learning rates")
        self.strategy.after_backward(self.model, self.grad_accum)
        self.optimizer.step()
        self.step += 1
        self._volume = None
        if self.strategy.due(self.step, self.total_steps):
            self.densify_and_prune()
        return float(loss.detach())

    @property
    def done(self) -> bool:
        """All ``total_steps`` steps taken."""
        return self.step >= self.total_steps

    def step_once(self, data: torch.Tensor | None = None) -> dict[str, float]:
        """:meth:`train_step` as the half-set driver takes it: ``{"loss": ...}``."""
        return {"loss": self.train_step(data)}

    def state_dict(self) -> dict:
        """The mixture, Adam's state, the step, the calibration, the Fourier loss's noise
        spectrum and the densification's gradient statistics."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "calibrated": self.calibrated,
                "noise_power": self.noise_power, "grad_accum": self.grad_accum}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` (a densified one: rebuilt at its size first)."""
        n = state["model"]["means_A"].shape[0]
        if n != len(self.model):  # densified: rebuild at the checkpoint's size first
            empty = torch.zeros(len(self.model), dtype=torch.bool, device=self.device)
            self._adopt(*rebuild(self.model, self.optimizer, empty,
                                 {k: v.to(self.device) for k, v in state["model"].items()
                                  if k != "amplitude_unit"}, self._adam))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "grad_accum" in state:
            self.grad_accum = state["grad_accum"].to(self.device)
        self.step, self.calibrated = int(state["step"]), bool(state["calibrated"])
        self.noise_power = state.get("noise_power")
        self._volume = None

    @torch.no_grad()
    def volume(self) -> torch.Tensor:
        """The mixture voxelised on the particles' grid, `(D, D, D)` on the CPU; computed once
        per state of the mixture (evaluations and the final maps share it)."""
        if self._volume is None or self._volume[0] != self.step:
            vol = self.model.voxelise(self.d, self.pix, n_sigma=self.cfg.n_sigma).cpu()
            self._volume = (self.step, vol)
        return self._volume[1]
