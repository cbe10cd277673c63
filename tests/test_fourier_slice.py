"""The padded Fourier-slice grid (fourier_slice.py) against torch-fourier-slice, which we do
not share code with: extraction here (insertion, the transform and the inversion are checked
against it and against whole-grid FFTs in test_backproject.py and test_volume.py), and the
grid's conventions that every caller relies on."""

from __future__ import annotations

import pytest
import torch
from torch_fourier_slice import extract_central_slices_rfft_3d

from cryosplat import geometry
from cryosplat.fourier_slice import PaddedGrid, as_sampled, slice_points


def _library_grid(volume: torch.Tensor) -> torch.Tensor:
    """The library's documented pre-processing of a real `(P, P, P)` volume."""
    f = torch.fft.rfftn(torch.fft.fftshift(volume, dim=(-3, -2, -1)), dim=(-3, -2, -1))
    return torch.fft.fftshift(f, dim=(-3, -2))


@pytest.mark.parametrize("p", [16, 24])
def test_extract_equals_torch_fourier_slice(p):
    """Slices read at RELION matrices ``A`` equal the library's at its xyz matrices ``A^T``,
    on the points of an image as large as the grid (frequency index k at grid index k),
    inside Nyquist; a transposed matrix or a Friedel read without the conjugate fails."""
    g = torch.Generator().manual_seed(p)
    vol = torch.randn(p, p, p, generator=g)
    grid_ft = _library_grid(vol)
    rot = geometry.random_rotations(5, g).float()
    ref = extract_central_slices_rfft_3d(grid_ft, geometry.fourier_slice_matrices(rot))
    ref = torch.fft.ifftshift(ref, dim=-2).reshape(5, -1)  # unshifted rfft2 rows
    flat, ky, kx = slice_points(p, p / 2 - 1)
    ours = PaddedGrid(p, p).extract(as_sampled(grid_ft), rot, torch.stack([ky, kx], -1) / p)
    scale = float(ref.abs().max())
    torch.testing.assert_close(ours, ref[:, flat], atol=1e-4 * scale, rtol=0)
    wrong = PaddedGrid(p, p).extract(as_sampled(grid_ft), rot.transpose(-1, -2),
                                     torch.stack([ky, kx], -1) / p)
    assert float((wrong - ref[:, flat]).abs().max()) > 0.1 * scale


@pytest.mark.parametrize("d", [9, 10])
def test_the_box_centre_is_the_padded_origin(d):
    """Box voxel D//2 (the FFT-aligned centre) is padded voxel 0, for odd and even boxes: a
    delta there has a flat transform, and one voxel off it does not."""
    grid = PaddedGrid(d, 2 * d)
    assert int(grid.keep[d // 2]) == 0
    delta = torch.zeros(d, d, d, dtype=torch.float64)
    delta[d // 2, d // 2, d // 2] = 1
    f = grid.transform(delta, 0)
    torch.testing.assert_close(f, torch.ones_like(f))
    delta = delta.roll(1, 2)
    assert float((grid.transform(delta, 0) - 1).abs().max()) > 0.5


def test_transform_then_invert_is_the_identity_and_the_gridding_powers_cancel():
    """``invert(transform(V, g) / gridding^g)``: the inversion divides by the gridding function
    once, so a map transformed with gridding +1 and inverted with unit weights comes back;
    with gridding 0 it comes back divided by the sinc², which is not 1 off-centre."""
    d = 12
    grid = PaddedGrid(d, 2 * d)
    vol = torch.randn(d, d, d, generator=torch.Generator().manual_seed(3))
    ones = torch.ones(grid.shape)
    back = grid.invert(grid.transform(vol, 1).to(torch.complex64), ones, 0.0)
    torch.testing.assert_close(back, vol, atol=1e-4, rtol=0)
    plain = grid.invert(grid.transform(vol, 0).to(torch.complex64), ones, 0.0)
    assert float((plain - vol).abs().max()) > 0.01
