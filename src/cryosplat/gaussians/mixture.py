"""A mixture of normalised 3D Gaussians, ``V(r) = sum_i A_i N(r; mu_i, Sigma_i)`` with
``Sigma_i = R_i S_i S_i^T R_i^T``, as trainable torch parameters.

Coordinates are in Å, xyz, with the origin at voxel/pixel D//2 (docs/conventions.md).
Positive quantities are stored through exp (scales) and softplus (amplitudes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cryosplat.gaussians.render import render_rfft
from cryosplat.gaussians.voxelise import voxelise
from cryosplat.geometry import matrix_to_quaternion, quaternion_to_matrix


class GaussianMixture(torch.nn.Module):
    """``M`` normalised 3D Gaussians; positive quantities are stored through exp/softplus.

    Parameters (``torch.nn.Parameter``):

    - ``means_A`` `(M, 3)`: centres (x, y, z) in Å from the box centre.
    - ``log_scales_A`` `(M, 3)`: log of the standard deviations along the principal axes.
    - ``quaternions`` `(M, 4)`: orientation ``(w, x, y, z)``, normalised when used.
    - ``raw_amplitudes`` `(M,)`: ``amplitudes = amplitude_unit x softplus(raw_amplitudes)``,
      integrated masses; ``amplitude_unit`` is a buffer (the given amplitudes' mean at
      construction) that keeps the trained numbers near 1 whatever the data's scale.
    """

    amplitude_unit: torch.Tensor  # a buffer (register_buffer)

    def __init__(self, means_A: torch.Tensor, scales_A: torch.Tensor,
                 quaternions: torch.Tensor, amplitudes: torch.Tensor):
        super().__init__()
        if not (means_A.ndim == 2 and means_A.shape[1] == 3 and scales_A.shape == means_A.shape
                and quaternions.shape == (means_A.shape[0], 4)
                and amplitudes.shape == (means_A.shape[0],)):
            raise ValueError("expected means (M, 3), scales (M, 3), quaternions (M, 4), "
                             f"amplitudes (M,); got {tuple(means_A.shape)}, {tuple(scales_A.shape)}"
                             f", {tuple(quaternions.shape)}, {tuple(amplitudes.shape)}")
        if (scales_A <= 0).any() or (amplitudes <= 0).any():
            raise ValueError("scales and amplitudes must be positive")
        self.means_A = torch.nn.Parameter(means_A.clone())
        self.log_scales_A = torch.nn.Parameter(scales_A.log())
        self.quaternions = torch.nn.Parameter(quaternions.clone())
        unit = amplitudes.detach().mean()
        self.register_buffer("amplitude_unit", unit.clone())
        self.raw_amplitudes = torch.nn.Parameter(softplus_inverse(amplitudes / unit))

    def __len__(self) -> int:
        return self.means_A.shape[0]

    @classmethod
    def from_raw(cls, means_A: torch.Tensor, log_scales_A: torch.Tensor, quaternions: torch.Tensor,
                 raw_amplitudes: torch.Tensor, amplitude_unit: torch.Tensor) -> GaussianMixture:
        """A mixture from stored (raw) parameters, e.g. a state dict or a densified model."""
        m = cls(means_A.detach(), log_scales_A.detach().exp(), quaternions.detach(),
                torch.ones_like(raw_amplitudes.detach()))
        with torch.no_grad():
            m.log_scales_A.copy_(log_scales_A)
            m.raw_amplitudes.copy_(raw_amplitudes)
            m.amplitude_unit.copy_(amplitude_unit)
        return m

    @classmethod
    def random(cls, n: int, radius_A: float, scale_A: float, amplitude: float = 1.0,
               generator: torch.Generator | None = None, dtype=torch.float32,
               device=None) -> GaussianMixture:
        """``n`` isotropic Gaussians, uniform in a ball of ``radius_A``, random orientations."""
        u = torch.rand(n, 1, generator=generator, dtype=torch.float64)
        d = torch.randn(n, 3, generator=generator, dtype=torch.float64)
        means = d / d.norm(dim=-1, keepdim=True) * radius_A * u ** (1 / 3)
        q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
        q = q / q.norm(dim=-1, keepdim=True)
        kw = dict(dtype=dtype, device=device)
        return cls(means.to(**kw), torch.full((n, 3), scale_A, **kw), q.to(**kw),
                   torch.full((n,), amplitude, **kw))

    @property
    def scales_A(self) -> torch.Tensor:
        """`(N, 3)` standard deviations along the Gaussians' own axes, Å."""
        return self.log_scales_A.exp()

    @property
    def amplitudes(self) -> torch.Tensor:
        """`(N,)` positive masses (integral of each normalised Gaussian's density)."""
        return self.amplitude_unit * F.softplus(self.raw_amplitudes)

    @torch.no_grad()
    def scale_amplitudes(self, factor: float) -> None:
        """Multiply every amplitude by ``factor > 0`` (the parameters stay as they are)."""
        if not factor > 0:
            raise ValueError(f"amplitude scale factor must be positive, got {factor}")
        self.amplitude_unit.mul_(factor)

    def covariances(self) -> torch.Tensor:
        """``R S S^T R^T``: `(M, 3, 3)` in Å²."""
        return covariance_from_scales(self.scales_A, self.quaternions)

    def render_rfft(self, rotations: torch.Tensor, box_size: int, pixel_size_A: float,
                    **kwargs) -> torch.Tensor:
        """:func:`render_rfft` of this mixture for RELION matrices `(B, 3, 3)`."""
        return render_rfft(self.means_A, self.covariances(), self.amplitudes, rotations,
                           box_size, pixel_size_A, **kwargs)

    def voxelise(self, box_size: int, voxel_size_A: float,
                 symmetry: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """The mixture sampled on a `(D, D, D)` grid ([z, y, x], density per Å³). With
        ``symmetry`` `(G, 3, 3)` (:func:`cryosplat.symmetry.symmetry_matrices`), the mixture is
        one asymmetric unit and its G copies are sampled (:func:`symmetry_copies`)."""
        means, cov, amp = symmetry_copies(self.means_A, self.covariances(), self.amplitudes,
                                          symmetry)
        return voxelise(means, cov, amp, box_size, voxel_size_A, **kwargs)

    @torch.no_grad()
    def mirrored(self) -> GaussianMixture:
        """A new mixture, the mirror image of this one through the plane z = 0 (the other
        hand): means ``(x, y, -z)``, orientations ``F R F`` (``F = diag(1, 1, -1)``: the
        quaternion ``(w, -x, -y, z)``), the same scales and amplitudes."""
        flip = self.means_A.new_tensor([1.0, 1.0, -1.0])
        q = self.quaternions * self.quaternions.new_tensor([1.0, -1.0, -1.0, 1.0])
        return GaussianMixture(self.means_A * flip, self.scales_A, q, self.amplitudes)

    def expanded(self, symmetry: torch.Tensor | None) -> GaussianMixture:
        """A new mixture (no gradient) of the G symmetry copies of this one: what the
        reconstruction holds, for exports and pictures; this one without ``symmetry``."""
        if symmetry is None or len(symmetry) == 1:
            return self
        with torch.no_grad():
            means, _, amp = symmetry_copies(self.means_A, self.covariances(), self.amplitudes,
                                            symmetry)
            s = symmetry.to(self.quaternions)
            rot = s[:, None] @ quaternion_to_matrix(self.quaternions)[None]  # (G, M, 3, 3)
            q = matrix_to_quaternion(rot.reshape(-1, 3, 3))
            return GaussianMixture(means, self.scales_A.repeat(len(s), 1), q, amp)


def symmetry_copies(means_A: torch.Tensor, covariances_A2: torch.Tensor,
                    amplitudes: torch.Tensor, symmetry: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every Gaussian copied by each matrix ``S`` of ``symmetry`` `(G, 3, 3)`: means ``S mu``,
    covariances ``S Sigma S^T``, the same amplitudes; `(G M, ...)`, copy-major. The sum of
    the copies satisfies ``V(S r) = V(r)`` for every ``S``. Without ``symmetry``, the input."""
    if symmetry is None or len(symmetry) == 1:
        return means_A, covariances_A2, amplitudes
    s = symmetry.to(means_A)
    means = torch.einsum("gij,mj->gmi", s, means_A).reshape(-1, 3)
    cov = (s[:, None] @ covariances_A2[None] @ s.transpose(-1, -2)[:, None]).reshape(-1, 3, 3)
    return means, cov, amplitudes.repeat(len(s))


def softplus_inverse(x: torch.Tensor) -> torch.Tensor:
    """``y`` with ``softplus(y) = x`` for ``x > 0``."""
    return x + torch.log(-torch.expm1(-x))


def covariance_from_scales(scales_A: torch.Tensor, quaternions: torch.Tensor) -> torch.Tensor:
    """``Sigma = R S S^T R^T`` from `(M, 3)` scales and `(M, 4)` quaternions: `(M, 3, 3)`."""
    r = quaternion_to_matrix(quaternions)
    rs = r * scales_A[..., None, :]
    return rs @ rs.transpose(-1, -2)
