"""The padded Fourier-slice grid: the one place its convention is written.

A map of `D` voxels a side has its 3D transform on a grid of `P` (``pad_factor`` x `D`,
RELION's ``padding_factor`` 2) voxels a side, kept as one half of an ``rfftn``:

- **shape** `(P, P, P//2+1)`, axes (z, y, x); z and y **fftshifted** (index = frequency +
  P//2), x unshifted (index = frequency, x >= 0 only);
- **box voxel -> padded index**: voxel ``i`` of the box (at ``x = i - D//2``, the FFT-aligned
  convention of :mod:`cryosplat.geometry`) is voxel ``(i - D//2) % P`` of the padded box,
  whose origin is the box's centre (:attr:`PaddedGrid.keep`);
- **frequencies**: a `(S, S//2+1)` image's frequency index ``k`` lands at ``k P / S`` (the
  same frequency in cycles per pixel), so a box image's index ``k`` is index ``2k``;
- **Friedel**: a point that lands at ``x < 0`` is written (or read), conjugated, at ``-k``;
  the x = 0 plane holds each Hermitian pair twice once :func:`hermitian_x0` completed it;
- **gridding**: trilinear insertion (and extraction) multiplies the real-space map by the
  separable ``sinc²`` of the padded box, ``sinc(n / P)²`` at padded voxel ``n``
  (:meth:`PaddedGrid.gridding_1d`); transforms of box maps take it to the power +1 (what an
  insertion accumulates), -1 (pre-corrected, for extracted slices) or 0.

The verbs of :class:`PaddedGrid`: :meth:`~PaddedGrid.insert` central slices (trilinear,
equal to torch-fourier-slice's ``insert_central_slices_rfft_3d``), :meth:`~PaddedGrid.extract`
them (trilinear), :meth:`~PaddedGrid.symmetrise` the sums over a point group,
:meth:`~PaddedGrid.transform` a box map onto the grid and :meth:`~PaddedGrid.invert` the grid
back to a box map. Direct inversion (:mod:`cryosplat.backproject`), the volume objective
(:mod:`cryosplat.train.volume`) and the pose search (:mod:`cryosplat.refine.search`) use them
and derive none of it themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cryosplat import geometry
from cryosplat.fourier import shell_index_3d

Device = torch.device | str | None


def slice_points(size: int, max_radius: float | None,
                 device: Device = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The points of a `(S, S//2+1)` unshifted rfft2 that one central slice inserts.

    Parameters
    ----------
    size: `S`, the image's box in pixels.
    max_radius: keep ``|k| <= max_radius`` (grid units, cycles per box); None keeps all.
    device: where the results live.

    Returns
    -------
    flat: `(K,)` flat indices into the `(S, S//2+1)` rfft2.
    ky, kx: `(K,)` their integer frequencies (float32, cycles per box).

    The points at ``kx = 0, ky < 0`` are left out: they are the Friedel mates of the
    ``ky > 0`` ones.
    """
    ky = torch.fft.fftfreq(size, 1 / size, device=device)  # integer frequencies, unshifted
    kx = torch.arange(size // 2 + 1, device=device, dtype=ky.dtype)
    grid_y, grid_x = (g.flatten() for g in torch.meshgrid(ky, kx, indexing="ij"))
    keep = ~((grid_x == 0) & (grid_y < 0))
    if max_radius is not None:
        keep &= grid_y**2 + grid_x**2 <= max_radius**2
    flat = keep.nonzero()[:, 0]
    return flat, grid_y[flat].float(), grid_x[flat].float()


def hermitian_x0(volume: torch.Tensor) -> torch.Tensor:
    """Complete, in place, the Hermitian pairs of the x = 0 plane of a `(P, P, P//2+1)` grid
    that :meth:`PaddedGrid.insert` filled: each ``(kz, ky, 0)`` also receives the conjugate of
    ``(-kz, -ky, 0)``, the origin excepted (what torch-fourier-slice does point by point).
    Real grids (the CTF² sums) receive the value itself. Returns ``volume``."""
    p = volume.shape[0]
    plane = volume[..., 0].clone()
    mirror = torch.roll(plane.flip(0, 1), shifts=(1, 1), dims=(0, 1))  # index i -> (P - i) % P
    volume[..., 0] = plane + (mirror.conj() if plane.is_complex() else mirror)
    volume[p // 2, p // 2, 0] = plane[p // 2, p // 2]
    return volume


def as_sampled(transform: torch.Tensor) -> torch.Tensor:
    """A `(P, P, P//2+1)` complex grid as :meth:`PaddedGrid.extract` reads it:
    `(1, 2, P, P, P//2+1)` real, the real and imaginary parts as two channels."""
    return torch.view_as_real(transform).permute(3, 0, 1, 2)[None].contiguous()


class PaddedGrid:
    """The padded, half-fftshifted rfftn grid of `(D, D, D)` box maps (module docstring).

    Parameters
    ----------
    box_size: `D`, voxels a side of the map.
    padded_size: `P`, voxels a side of the padded grid (RELION's 2 `D`).
    device: where the index tensors and tapers live.
    """

    def __init__(self, box_size: int, padded_size: int, device: Device = None):
        self.box_size, self.padded_size = int(box_size), int(padded_size)
        self.device = device
        d, p = self.box_size, self.padded_size
        #: `(D,)` padded index of each box voxel: the box's centre at the padded origin
        self.keep = (torch.arange(d, device=device) - d // 2) % p
        self._tapers: dict[int, torch.Tensor] = {}

    @property
    def shape(self) -> tuple[int, int, int]:
        """`(P, P, P//2+1)`."""
        p = self.padded_size
        return p, p, p // 2 + 1

    # -- the gridding function ---------------------------------------------------------------
    def gridding_1d(self, power: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`(D,)`: the trilinear kernel's transform on the padded box, ``sinc(n / P)²`` at the
        padded index ``n`` of each box voxel, to the power ``power``, in ``dtype``."""
        freq = torch.fft.fftfreq(self.padded_size, device=self.device, dtype=dtype)
        return torch.sinc(freq[self.keep]) ** (2 * power)

    def _taper(self, gridding: int) -> torch.Tensor:
        """`(D, D, D)` float64: the separable gridding function to the power ``gridding``,
        times ``(-1)^(n_z + n_y)`` on padded voxel ``n`` for an even `P` (which fftshifts the
        transform along z and y)."""
        if gridding not in self._tapers:
            s = self.gridding_1d(gridding, torch.float64)
            zy = s * (1.0 - 2.0 * (self.keep % 2).to(s.dtype)) if self.padded_size % 2 == 0 else s
            self._tapers[gridding] = zy[:, None, None] * zy[None, :, None] * s[None, None, :]
        return self._tapers[gridding]

    # -- box map -> grid ---------------------------------------------------------------------
    def transform(self, volume: torch.Tensor, gridding: int = 1) -> torch.Tensor:
        """The grid's transform of a box map.

        Parameters
        ----------
        volume: `(D, D, D)` real map, (z, y, x), voxel D//2 at the centre; differentiable.
        gridding: the power of the gridding function the map is multiplied by first: +1
            models what trilinear *insertion* accumulates (the volume objective's model), -1
            pre-corrects a map whose slices are *extracted* (the pose search), 0 none.

        Returns
        -------
        `(P, P, P//2+1)` complex, fftshifted along z and y.

        One axis at a time (x, y, then z), padding each just before its transform: the zeros
        of the padded box are never transformed along an axis where they stay zero, 0.6x the
        work of an ``rfftn`` of the whole padded box.
        """
        p, d, k = self.padded_size, self.box_size, self.keep
        x = volume.new_zeros(d, d, p)
        x[..., k] = volume * self._taper(gridding).to(volume.dtype)
        f = torch.fft.rfft(x, dim=2)  # (D, D, P//2+1)
        y = f.new_zeros(d, p, f.shape[2])
        y[:, k] = f
        f = torch.fft.fft(y, dim=1)  # (D, P, P//2+1)
        z = f.new_zeros(p, p, f.shape[2])
        z[k] = f
        f = torch.fft.fft(z, dim=0)
        return f if p % 2 == 0 else torch.fft.fftshift(f, dim=(0, 1))

    # -- slices -> grid ----------------------------------------------------------------------
    def accumulators(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed flat accumulators for :meth:`insert`: ``sum CTF F`` (complex64) and
        ``sum CTF²`` (float32), each the grid flattened plus a margin that takes the
        zero-weight corners past its last voxel (see :meth:`grid_view`)."""
        p = self.padded_size
        n = p * p * (p // 2 + 1) + (p + 1) * (p // 2 + 1) + 1
        return (torch.zeros(n, dtype=torch.complex64, device=self.device),
                torch.zeros(n, dtype=torch.float32, device=self.device))

    def grid_view(self, accumulator: torch.Tensor) -> torch.Tensor:
        """The `(P, P, P//2+1)` grid of an :meth:`accumulators` tensor, without its margin."""
        p = self.padded_size
        return accumulator[: p * p * (p // 2 + 1)].view(p, p, p // 2 + 1)

    def insert(self, numerator: torch.Tensor, denominator: torch.Tensor, slices: torch.Tensor,
               ctf2: torch.Tensor, rotations: torch.Tensor,
               points: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Add central slices to the grid with trilinear weights, in place.

        Parameters
        ----------
        numerator, denominator: :meth:`accumulators`: ``sum CTF F`` and ``sum CTF²``.
        slices: `(B, S, S//2+1)` complex, ``CTF x F`` on the unshifted rfft2 of an `S`-pixel
            image; index ``k`` lands at ``k P / S``.
        ctf2: `(B, S, S//2+1)` real, ``CTF²`` on the same grid.
        rotations: `(B, 3, 3)` RELION matrices ``A`` (with any magnification,
            :func:`cryosplat.geometry.image_matrices`): slice point ``(kx, ky)`` lands at the
            map's frequency ``A^T (kx, ky, 0)``.
        points: :func:`slice_points` of the slice's grid.

        A point landing at ``x < 0`` goes, conjugated, to its Friedel mate; the x = 0 plane
        holds one half of its Hermitian pairs until :func:`hermitian_x0`. Points whose
        trilinear cube leaves the grid are dropped, as torch-fourier-slice drops them. Each
        corner is one ``scatter_add_`` of complex and one of real values, which on one CPU
        thread is 5x faster than a scatter of (Re, Im, CTF²) triples.
        """
        p = self.padded_size
        w = p // 2 + 1
        flat, ky, kx = points
        b = slices.shape[0]
        data = slices.reshape(b, -1)[:, flat].to(torch.complex64)
        weight = ctf2.reshape(b, -1)[:, flat].float()
        m = geometry.fourier_slice_matrices(rotations).float() * (p / slices.shape[-2])
        xyz = m[:, None, :, 0] * kx[None, :, None] + m[:, None, :, 1] * ky[None, :, None]
        flip = xyz[..., 0] < 0  # Friedel: insert conj(F(k)) at -k
        xyz = torch.where(flip[..., None], -xyz, xyz)
        data = torch.where(flip, data.conj(), data)
        x, y, z = xyz[..., 0], xyz[..., 1] + p // 2, xyz[..., 2] + p // 2
        inside = (y >= 0) & (y <= p - 1) & (z >= 0) & (z <= p - 1) & (x <= w - 1)
        data, weight = (data * inside).reshape(-1), (weight * inside).reshape(-1)
        x0, y0, z0 = x.floor(), y.floor(), z.floor()
        fx, fy, fz = ((f - f0).reshape(-1) for f, f0 in ((x, x0), (y, y0), (z, z0)))
        # outside points have weight 0; clamping keeps their index on the grid. Integer
        # arithmetic: a float32 index is exact only below 2^24 (a padded grid of P < 320)
        zi, yi, xi = (f.clamp(0, hi).long() for f, hi in ((z0, p - 1), (y0, p - 1), (x0, w - 1)))
        voxel = ((zi * p + yi) * w + xi).reshape(-1)
        for dz, wz in ((0, 1 - fz), (1, fz)):
            for dy, wy in ((0, 1 - fy), (1, fy)):
                wzy = wz * wy
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    idx = voxel + ((dz * p + dy) * w + dx)  # past the grid: the margin, weight 0
                    c = wzy * wx
                    numerator.scatter_add_(0, idx, data * c)
                    denominator.scatter_add_(0, idx, weight * c)

    # -- grid -> slices ----------------------------------------------------------------------
    def _sample_coordinates(self, xyz: torch.Tensor) -> torch.Tensor:
        """``grid_sample``'s (x, y, z) in [-1, 1] (corners aligned) of grid frequencies
        ``xyz`` `(..., 3)` with ``x >= 0`` (padded units)."""
        p = self.padded_size
        w = p // 2 + 1
        scale = xyz.new_tensor([2.0 / (w - 1), 2.0 / (p - 1), 2.0 / (p - 1)])
        centre = 2.0 * (p // 2) / (p - 1) - 1
        return xyz * scale + xyz.new_tensor([-1.0, centre, centre])

    def extract(self, sampled: torch.Tensor, rotations: torch.Tensor,
                frequency: torch.Tensor) -> torch.Tensor:
        """Central slices read from the grid by trilinear interpolation (``grid_sample``: 2x
        faster on a CPU than eight gathers, and differentiable in the sample positions).

        Parameters
        ----------
        sampled: `(1, 2, P, P, P//2+1)` real, :func:`as_sampled` of a grid.
        rotations: `(..., 3, 3)` RELION matrices ``A``: slice point ``(kx, ky)`` is the map's
            frequency ``A^T (kx, ky, 0)``.
        frequency: `(K, 2)` the slice points' ``(ky, kx)`` in cycles per pixel.

        Returns
        -------
        `(..., K)` complex, differentiable in ``rotations``. Corners off the grid read 0.
        """
        p = self.padded_size
        m = geometry.fourier_slice_matrices(rotations).to(sampled.dtype) * p
        ky, kx = frequency[:, 0], frequency[:, 1]
        xyz = m[..., None, :, 0] * kx[:, None] + m[..., None, :, 1] * ky[:, None]  # (..., K, 3)
        flip = xyz[..., 0] < 0  # the rfft half: read conj(F(-k))
        xyz = torch.where(flip[..., None], -xyz, xyz)
        g = self._sample_coordinates(xyz)
        out = F.grid_sample(sampled, g.reshape(1, -1, 1, 1, 3), mode="bilinear",
                            padding_mode="zeros", align_corners=True)[0, :, :, 0, 0]
        out = torch.complex(out[0], out[1]).reshape(xyz.shape[:-1])
        return torch.where(flip, out.conj(), out)

    # -- point groups ------------------------------------------------------------------------
    def symmetrise(self, numerator: torch.Tensor, denominator: torch.Tensor,
                   symmetry: torch.Tensor | None, slab: int = 16) -> None:
        """The sums a map with the point group ``symmetry`` `(G, 3, 3)` gathers, in place:
        ``sum_S A(S k)`` for both grids ``A`` (`(P, P, P//2+1)` each), as RELION's
        backprojector symmetrises its data and weights. ``A(S k)`` is read by trilinear
        interpolation, at the Friedel mate ``-S k``, conjugated, where ``S k`` has ``x < 0``.
        A map ``V`` then satisfies ``V(S r) = V(r)``, r = (x, y, z)
        (:mod:`cryosplat.symmetry`). ``slab`` z-planes are resampled at a time. Nothing
        happens for None or one matrix."""
        if symmetry is None or len(symmetry) == 1:
            return
        p, w = self.padded_size, self.padded_size // 2 + 1
        dev = denominator.device
        src = torch.stack([numerator.real, numerator.imag, denominator.float()])[None]
        out = torch.zeros((3, p, p, w), device=dev)
        k = torch.arange(p, device=dev, dtype=torch.float32) - p // 2
        kx = torch.arange(w, device=dev, dtype=torch.float32)
        scale = torch.tensor([2 / (w - 1), 2 / (p - 1), 2 / (p - 1)], device=dev)
        centre = torch.tensor([0.0, p // 2, p // 2], device=dev)
        for z0 in range(0, p, slab):
            zz, yy, xx = torch.meshgrid(k[z0:z0 + slab], k, kx, indexing="ij")
            q = torch.stack([xx, yy, zz], -1)  # (slab, P, W, 3) xyz frequencies, padded units
            for s_ in symmetry.to(dev, torch.float32):
                r = q @ s_.T
                flip = r[..., 0] < 0
                r = torch.where(flip[..., None], -r, r)
                grid = (r + centre) * scale - 1  # grid_sample's (x, y, z) in [-1, 1]
                v = F.grid_sample(src, grid[None], mode="bilinear", padding_mode="zeros",
                                  align_corners=True)[0]
                v[1] = torch.where(flip, -v[1], v[1])
                out[:, z0:z0 + slab] += v
        numerator.copy_(torch.complex(out[0], out[1]))
        denominator.copy_(out[2])

    # -- grid -> box map ---------------------------------------------------------------------
    def row_blocks(self, budget: int = 1 << 23) -> list[slice]:
        """Blocks of y rows of the grid, each about ``budget`` elements, that
        :meth:`invert` (and per-shell sums over the grid) take at a time."""
        p = self.padded_size
        step = max(1, budget // (p * (p // 2 + 1)))
        return [slice(y, min(y + step, p)) for y in range(0, p, step)]

    def shells(self, rows: slice = slice(None)) -> torch.Tensor:
        """The grid's Fourier shell of each voxel (rounded radius in padded units), only y
        rows ``rows``: `(P, len(rows), P//2+1)` long."""
        return shell_index_3d(self.padded_size, True, self.device, rows)

    def invert(self, numerator: torch.Tensor, denominator: torch.Tensor,
               regulariser: torch.Tensor | float) -> torch.Tensor:
        """``numerator / (denominator + regulariser)`` back to a `(D, D, D)` box map,
        divided by the gridding function (:meth:`gridding_1d`).

        Parameters
        ----------
        numerator: `(P, P, P//2+1)` complex grid.
        denominator: `(P, P, P//2+1)` real grid; where the total is 0 the quotient is 0.
        regulariser: a scalar, or one value per shell of the grid (:meth:`shells`).

        The inverse transform is taken one axis at a time (z, y, then x), keeping after each
        only the box's D voxels: the padded volume, 8x the box, is never made, and the z pass
        runs on :meth:`row_blocks`, so the quotient is never whole either.
        """
        p, d = self.padded_size, self.box_size
        w = p // 2 + 1
        dev = numerator.device
        keep = self.keep.to(dev)
        # the inverse transform of an fftshifted axis is that of the unshifted axis times
        # exp(-2 pi i (P//2) n / P) at voxel n: no shifted copy is made
        phase = torch.exp(-2j * torch.pi * (p // 2) * keep.double() / p).to(torch.complex64)
        zy = torch.empty(d, p, w, dtype=torch.complex64, device=dev)
        for rows in self.row_blocks():
            total = denominator[:, rows]
            total = total + (regulariser[shell_index_3d(p, True, dev, rows)]
                             if isinstance(regulariser, torch.Tensor) else regulariser)
            scale = torch.where(total > 0, total.clamp_min(1e-30).reciprocal(), 0)
            ft = torch.view_as_complex(torch.view_as_real(numerator[:, rows]) * scale[..., None])
            zy[:, rows] = torch.fft.ifft(ft, dim=0)[keep] * phase[:, None, None]
        zy = torch.fft.ifft(zy, dim=1)[:, keep] * phase[None, :, None]
        vol = torch.fft.irfft(zy, n=p, dim=2)[..., keep]
        s = self.gridding_1d(1, vol.dtype).to(dev)
        return vol / (s[:, None, None] * s[None, :, None] * s[None, None, :])


@dataclass
class Insertion:
    """Accumulated ``sum CTF F`` and ``sum CTF²`` of a set of particles on a
    :class:`PaddedGrid` (what direct inversion divides and the volume objective fits)."""

    numerator: torch.Tensor  # (P, P, P//2+1) complex
    denominator: torch.Tensor  # (P, P, P//2+1) real
    box_size: int
    padded_size: int

    @property
    def grid(self) -> PaddedGrid:
        """The :class:`PaddedGrid` the sums live on, on their device."""
        return PaddedGrid(self.box_size, self.padded_size, self.denominator.device)

    def symmetrise(self, symmetry: torch.Tensor | None) -> Insertion:
        """Both sums symmetrised over the point group ``symmetry`` `(G, 3, 3)` in place
        (:meth:`PaddedGrid.symmetrise`). Returns ``self``."""
        self.grid.symmetrise(self.numerator, self.denominator, symmetry)
        return self
