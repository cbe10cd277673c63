"""The physics-exact, differentiable projection of a Gaussian mixture, and the particle
images it makes through the CTF (the forward model of training).

Projection along the beam after the rotation ``A`` (RELION's matrix, ``r_image = A r_map``) of
a normalised Gaussian is its normalised 2D marginal:

- mean ``(A mu)[:2]``,
- covariance the top-left 2x2 block of ``A Sigma A^T``,
- prefactor ``1 / (2 pi sqrt(det Sigma_2D))``: the view-dependent normalisation.

Contributions add; there is no alpha blending and no depth sorting. An optional isotropic
blur ``blur_A`` (Å, standard deviation) adds ``blur_A^2 I`` to every 2D covariance, on both
axes, before the prefactor is computed; forward and backward both see it, because the backward
pass differentiates the same blurred covariance.

Backends, behind :func:`render_rfft`:

- ``"patch"`` (default): each Gaussian evaluated on a square window of pixels around its centre
  (``n_sigma`` standard deviations; windows are grouped by size so that a few large Gaussians do
  not widen everyone's window) and scattered into the image. A custom autograd function
  recomputes the windows in the backward pass, so memory does not grow with
  Gaussians x window x batch.
- ``"fourier"``: the analytic transform ``A exp(-2 pi i k.mu) exp(-2 pi^2 k^T Sigma k)`` on the
  rfft grid, optionally band-limited to ``k_max``. Exact for the band it covers, with no
  aliasing and periodic in real space; for tests and low-resolution stages.

Both return ``rfft2`` of the `(D, D)` image array (pixel D//2 at the centre; values are
density per Å², so ``sum(image) * pixel_size^2`` is the projected mass). The CTF and the
particle's shift are then applied by :func:`cryosplat.ctf.modulate`: :func:`model_images_rfft`
is that whole forward model, image = CTF x shift(projection).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cryosplat.ctf import CTFParams, modulate
from cryosplat.fourier import rfft_frequencies_2d
from cryosplat.geometry import image_matrices


def project_gaussians(means_A: torch.Tensor, covariances_A2: torch.Tensor,
                      rotations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2D marginals after rotating by RELION's ``A``.

    Parameters
    ----------
    means_A: `(M, 3)`; covariances_A2: `(M, 3, 3)`; rotations: `(B, 3, 3)`.

    Returns
    -------
    means `(B, M, 2)` (x, y) in Å and covariances `(B, M, 2, 2)` in Å².
    """
    a2 = rotations[:, :2, :]  # (B, 2, 3): the image's x and y rows
    mean2d = torch.einsum("bij,mj->bmi", a2, means_A)
    cov2d = torch.einsum("bij,mjk,blk->bmil", a2, covariances_A2, a2)
    return mean2d, cov2d


def render_rfft(means_A: torch.Tensor, covariances_A2: torch.Tensor, amplitudes: torch.Tensor,
                rotations: torch.Tensor, box_size: int, pixel_size_A: float,
                backend: str = "patch", blur_A: float = 0.0, n_sigma: float = 4.0,
                k_max_per_A: float | None = None) -> torch.Tensor:
    """Project a mixture for a batch of views: ``rfft2`` of the images, `(B, D, D//2+1)`.

    Parameters
    ----------
    means_A `(M, 3)`, covariances_A2 `(M, 3, 3)`, amplitudes `(M,)`: the mixture.
    rotations: `(B, 3, 3)` RELION matrices.
    backend: ``"patch"`` (real-space windows) or ``"fourier"`` (analytic transform).
    blur_A: isotropic blur (standard deviation, Å) added to every 2D covariance.
    n_sigma: the patch backend's window half-width in standard deviations.
    k_max_per_A: the Fourier backend's band limit (1/Å); None for the whole grid.
    """
    mean2d, cov2d = project_gaussians(means_A, covariances_A2, rotations)
    if blur_A > 0:
        cov2d = cov2d + blur_A**2 * torch.eye(2, dtype=cov2d.dtype, device=cov2d.device)
    amp = amplitudes.expand(mean2d.shape[:2])
    if backend == "patch":
        image = splat_patches(mean2d, cov2d, amp, box_size, pixel_size_A, n_sigma)
        return torch.fft.rfft2(image)
    if backend == "fourier":
        return splat_fourier(mean2d, cov2d, amp, box_size, pixel_size_A, k_max_per_A)
    raise ValueError(f"unknown renderer backend {backend!r}; expected 'patch' or 'fourier'")


def splat_fourier(mean2d: torch.Tensor, cov2d: torch.Tensor, amplitudes: torch.Tensor,
                  box_size: int, pixel_size_A: float, k_max_per_A: float | None = None,
                  chunk: int = 256) -> torch.Tensor:
    """Analytic transform of 2D Gaussians on the rfft grid of the image array.

    ``F(k) = sum_m a_m exp(-2 pi i k.(mu_m + c)) exp(-2 pi^2 k^T Sigma_m k) / pixel_size^2``,
    with ``c = (D//2) * pixel_size`` putting the image centre at pixel D//2. Frequencies above
    ``k_max_per_A`` are zero. Shapes: `(B, M, 2)`, `(B, M, 2, 2)`, `(B, M)` -> `(B, D, D//2+1)`.
    """
    d = box_size
    k = rfft_frequencies_2d(d, pixel_size_A, device=mean2d.device, dtype=mean2d.dtype)
    ky, kx = k[..., 0].flatten(), k[..., 1].flatten()  # (K,)
    keep = torch.ones_like(kx, dtype=torch.bool)
    if k_max_per_A is not None:
        keep = kx**2 + ky**2 <= k_max_per_A**2
    kx, ky = kx[keep], ky[keep]
    centre = (d // 2) * pixel_size_A
    out_re = torch.zeros(mean2d.shape[0], kx.numel(), dtype=mean2d.dtype, device=mean2d.device)
    out_im = torch.zeros_like(out_re)

    def chunk_sum(mu, cov, amp):
        phase = -2 * math.pi * ((mu[..., 0:1] + centre) * kx + (mu[..., 1:2] + centre) * ky)
        quad = cov[..., 0, 0, None] * kx**2 + 2 * cov[..., 0, 1, None] * kx * ky \
            + cov[..., 1, 1, None] * ky**2
        mag = amp[..., None] * torch.exp(-2 * math.pi**2 * quad)  # (B, m, K)
        return (mag * torch.cos(phase)).sum(1), (mag * torch.sin(phase)).sum(1)

    for s in range(0, mean2d.shape[1], chunk):
        sl = slice(s, s + chunk)
        args = (mean2d[:, sl], cov2d[:, sl], amplitudes[:, sl])
        if torch.is_grad_enabled() and any(a.requires_grad for a in args):
            re, im = torch.utils.checkpoint.checkpoint(chunk_sum, *args, use_reentrant=False)
        else:
            re, im = chunk_sum(*args)
        out_re = out_re + re
        out_im = out_im + im
    values = torch.complex(out_re, out_im)
    full = torch.zeros(mean2d.shape[0], d * (d // 2 + 1), dtype=values.dtype, device=values.device)
    full = full.index_copy(1, keep.nonzero()[:, 0], values)
    return full.reshape(-1, d, d // 2 + 1) / pixel_size_A**2


def splat_patches(mean2d: torch.Tensor, cov2d: torch.Tensor, amplitudes: torch.Tensor,
                  box_size: int, pixel_size_A: float, n_sigma: float = 4.0) -> torch.Tensor:
    """Real-space splatting of 2D Gaussians on FFT-aligned pixels: `(B, D, D)` images.

    Pixel (iy, ix) is at ((ix - D//2) p, (iy - D//2) p). Each Gaussian is evaluated on the
    window of pixels within ``n_sigma`` standard deviations (of its widest axis, over the
    batch) around the pixel nearest its centre.

    Shapes: means `(B, M, 2)` Å, covariances `(B, M, 2, 2)` Å², amplitudes `(B, M)`.
    """
    return _PatchSplat.apply(mean2d, cov2d, amplitudes, box_size, pixel_size_A, n_sigma)


def _window_groups(cov2d: torch.Tensor, pixel_size_A: float, n_sigma: float,
                   box_size: int) -> list[tuple[int, torch.Tensor]]:
    """Gaussians grouped by window half-width in pixels: [(h, indices)].

    ``h >= n_sigma x (widest standard deviation over the batch) / pixel``, rounded up to the
    next of 1, 2, 3, 4, 6, 8, 12, 16, ... (steps of about sqrt 2), at most D.
    """
    widest = torch.linalg.eigvalsh(cov2d.detach()).amax(-1).amax(0).clamp_min(0).sqrt()  # (M,)
    return group_by_window(torch.ceil(n_sigma * widest / pixel_size_A), box_size)


def group_by_window(need_px: torch.Tensor, box_size: int) -> list[tuple[int, torch.Tensor]]:
    """Gaussians grouped by the window half-width ``h`` (pixels or voxels) they need:
    ``[(h, indices)]``, ``h`` the next of 1, 2, 3, 4, 6, 8, ... at or above ``need_px``."""
    level = torch.ceil(2 * torch.log2(need_px.clamp_min(1)) - 1e-9).long()  # half-octaves
    groups = []
    for lv in torch.unique(level).tolist():
        h = min(2 ** (lv // 2) * (3 if lv % 2 else 2) // 2, box_size)
        groups.append((h, torch.nonzero(level == lv)[:, 0]))
    return groups


def _window_terms(mean2d, cov2d, h: int, box_size: int, pad: int, pixel_size_A: float):
    """Canvas indices, offsets and Gaussian values on `(2h+1)^2` windows.

    The canvas is the image with ``pad >= 2h`` pixels added on every side, so every window
    pixel lands on it and nothing needs masking; a Gaussian whose window misses the image is
    moved to the canvas edge and given weight 0 (``touches``).

    Returns
    -------
    flat `(B, m, w, w)` indices into the flattened `(B, D + 2 pad, D + 2 pad)` canvas;
    ``dx`` `(B, m, 1, w)` and ``dy`` `(B, m, w, 1)`: pixel minus centre, Å; precision entries
    ``p00, p01, p11`` `(B, m, 1, 1)`; ``value`` `(B, m, w, w)`: ``touches x N(x; mu, Sigma)``.
    """
    d, c = box_size, box_size + 2 * pad
    b = mean2d.shape[0]
    off = torch.arange(-h, h + 1, device=mean2d.device)
    centre = torch.round(mean2d / pixel_size_A).long() + d // 2  # (B, m, 2) nearest pixel
    touches = ((centre >= -h) & (centre < d + h)).all(-1)
    centre = centre.clamp(-h, d - 1 + h)
    ix = (centre[..., 0, None] + off)[..., None, :]  # (B, m, 1, w): window columns
    iy = (centre[..., 1, None] + off)[..., :, None]  # (B, m, w, 1): window rows
    dx = (ix - d // 2).to(mean2d.dtype) * pixel_size_A - mean2d[..., 0, None, None]
    dy = (iy - d // 2).to(mean2d.dtype) * pixel_size_A - mean2d[..., 1, None, None]
    batch = torch.arange(b, device=mean2d.device)[:, None, None, None]
    flat = (batch * c + iy + pad) * c + (ix + pad)
    c00, c01, c11 = cov2d[..., 0, 0], cov2d[..., 0, 1], cov2d[..., 1, 1]
    det = c00 * c11 - c01 * c01
    p00, p01, p11 = ((x / det)[..., None, None] for x in (c11, -c01, c00))
    quad = (p00 * dx * dx) + (p11 * dy * dy) + (2 * p01 * dx) * dy  # (B, m, w, w)
    norm = touches / (2 * math.pi * det.sqrt())
    value = torch.exp(-0.5 * quad) * norm[..., None, None]
    return flat, dx, dy, (p00, p01, p11), value


def _chunks(groups, b: int, budget: int = 1 << 22):
    """Split each window group so that B x m x W stays under ``budget`` elements."""
    for h, members in groups:
        w = (2 * h + 1) ** 2
        step = max(1, budget // (b * w))
        for s in range(0, len(members), step):
            yield h, members[s:s + step]


class _PatchSplat(torch.autograd.Function):
    """Windowed splatting with a recomputing backward pass (memory O(B x D^2 + chunk))."""

    @staticmethod
    def forward(ctx, mean2d, cov2d, amplitudes, box_size, pixel_size_A, n_sigma):
        b, d = mean2d.shape[0], box_size
        groups = _window_groups(cov2d, pixel_size_A, n_sigma, d)
        pad = 2 * max(h for h, _ in groups)
        c = d + 2 * pad
        canvas = torch.zeros(b * c * c, dtype=mean2d.dtype, device=mean2d.device)
        for h, members in _chunks(groups, b):
            flat, _, _, _, value = _window_terms(mean2d[:, members], cov2d[:, members], h, d, pad,
                                                 pixel_size_A)
            canvas.index_add_(0, flat.flatten(),
                              (amplitudes[:, members, None, None] * value).flatten())
        ctx.save_for_backward(mean2d, cov2d, amplitudes)
        ctx.groups, ctx.box_size, ctx.pad, ctx.pixel_size_A = groups, box_size, pad, pixel_size_A
        return canvas.reshape(b, c, c)[:, pad:pad + d, pad:pad + d]

    @staticmethod
    def backward(ctx, grad_image):
        mean2d, cov2d, amplitudes = ctx.saved_tensors
        d, pad, pix = ctx.box_size, ctx.pad, ctx.pixel_size_A
        g_canvas = F.pad(grad_image, (pad, pad, pad, pad)).reshape(-1)  # 0 off the image
        g_mean = torch.zeros_like(mean2d)
        g_cov = torch.zeros_like(cov2d)
        g_amp = torch.zeros(amplitudes.shape, dtype=amplitudes.dtype, device=amplitudes.device)
        for h, members in _chunks(ctx.groups, mean2d.shape[0]):
            flat, dx, dy, (p00, p01, p11), value = _window_terms(
                mean2d[:, members], cov2d[:, members], h, d, pad, pix)
            gv = g_canvas[flat] * value  # dL/dpixel x N, (B, m, w, w)
            amp = amplitudes[:, members]
            # d N / d mu = N P delta ; d N / d Sigma = N (P delta delta^T P - P) / 2
            u = p00 * dx + p01 * dy  # (P delta)_x, (B, m, w, w)
            v = p01 * dx + p11 * dy
            gvu, gvv = gv * u, gv * v
            s0 = gv.sum((-2, -1))
            g_amp[:, members] = s0
            g_mean[:, members] = amp[..., None] * torch.stack([gvu.sum((-2, -1)),
                                                               gvv.sum((-2, -1))], -1)
            suu, suv, svv = ((gvu * u).sum((-2, -1)), (gvu * v).sum((-2, -1)),
                             (gvv * v).sum((-2, -1)))
            half_amp = 0.5 * amp
            gc00 = half_amp * (suu - s0 * p00[..., 0, 0])
            gc01 = half_amp * (suv - s0 * p01[..., 0, 0])
            gc11 = half_amp * (svv - s0 * p11[..., 0, 0])
            g_cov[:, members] = torch.stack([torch.stack([gc00, gc01], -1),
                                             torch.stack([gc01, gc11], -1)], -2)
        return g_mean, g_cov, g_amp, None, None, None


def model_images_rfft(mixture, rotations: torch.Tensor, origin_A: torch.Tensor, ctf: CTFParams,
                      box_size: int, pixel_size_A: float, n_sigma: float = 4.0,
                      blur_A: float = 0.0) -> torch.Tensor:
    """The forward model in rfft space: CTF x shift(projection) of ``mixture`` (a
    :class:`~cryosplat.gaussians.GaussianMixture`) for `B` particles, `(B, D, D//2+1)`.

    rotations `(B, 3, 3)` RELION matrices; origin_A `(B, 2)` rlnOriginX/YAngst; ``ctf`` the
    `B` particles' CTF parameters, with their optics (anisotropic magnification through
    :func:`cryosplat.geometry.image_matrices`, aberrations through :func:`modulate`).
    """
    rotations = image_matrices(rotations, ctf.mag_matrix)
    f = mixture.render_rfft(rotations, box_size, pixel_size_A, n_sigma=n_sigma, blur_A=blur_A)
    return modulate(f, origin_A, ctf, pixel_size_A)


def model_images(mixture, rotations: torch.Tensor, origin_A: torch.Tensor, ctf: CTFParams,
                 box_size: int, pixel_size_A: float, n_sigma: float = 4.0,
                 blur_A: float = 0.0) -> torch.Tensor:
    """:func:`model_images_rfft` in real space: the mixture's particle images, `(B, D, D)`."""
    f = model_images_rfft(mixture, rotations, origin_A, ctf, box_size, pixel_size_A, n_sigma,
                          blur_A)
    return torch.fft.irfft2(f, s=(box_size, box_size))
