"""Rotations, shifts and grids: every geometric convention of cryosplat lives here.

The conventions are those of RELION and are written out, with the reasoning, in
docs/conventions.md. In short:

* A pose is RELION's matrix ``A = A(rot, tilt, psi)`` (ZYZ Euler angles in degrees).
  ``A`` takes map coordinates to particle-frame coordinates, ``r_image = A @ r_map``, and
  the projection is along the particle frame's z axis:
  ``p(x, y) = integral V(A^T (x, y, z)) dz``.
* Coordinates are in Å and FFT-aligned: pixel or voxel ``i`` of a box of ``D`` sits at
  ``(i - D // 2) * pixel_size_A``. Arrays are indexed ``[..., y, x]`` (images) and
  ``[z, y, x]`` (volumes), as mrcfile, RELION and ChimeraX lay them out.
* A shift is RELION's origin ``(rlnOriginXAngst, rlnOriginYAngst)``: the particle's
  centre sits at ``-origin`` in the image, and shifting the image by ``+origin`` centres
  it. The forward model therefore translates the centred projection by ``-origin``.
* cryoSPARC stores ``alignments3D/pose`` as an axis-angle vector of the matrix ``A^T`` and
  ``alignments3D/shift`` in pixels with RELION's origin sign; cryoDRGN stores ``A`` itself
  and the origin as a fraction of the box.

Nothing outside this module converts angles or shifts; frequency grids and shells are in
:mod:`cryosplat.fourier`.
"""

from __future__ import annotations

import math

import torch

from cryosplat.fourier import rfft_frequencies_2d

# ---------------------------------------------------------------------------------------
# Rotations
# ---------------------------------------------------------------------------------------


def euler_relion_to_matrix(euler_deg: torch.Tensor) -> torch.Tensor:
    """RELION Euler angles to RELION's rotation matrix ``A``.

    Parameters
    ----------
    euler_deg: `(..., 3)` (rlnAngleRot, rlnAngleTilt, rlnAnglePsi) in degrees.

    Returns
    -------
    `(..., 3, 3)` matrices ``A`` with ``r_image = A @ r_map`` (RELION's Euler_angles2matrix).
    """
    a, b, g = torch.deg2rad(euler_deg).unbind(-1)
    ca, sa, cb, sb, cg, sg = a.cos(), a.sin(), b.cos(), b.sin(), g.cos(), g.sin()
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = [
        torch.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], dim=-1),
        torch.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], dim=-1),
        torch.stack([sc, ss, cb], dim=-1),
    ]
    return torch.stack(rows, dim=-2)


def matrix_to_euler_relion(matrix: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """RELION's rotation matrix ``A`` to Euler angles (rot, tilt, psi) in degrees.

    Tilt is returned in [0, 180]; at tilt 0 or 180 (gimbal lock) rot is set to 0.

    Parameters
    ----------
    matrix: `(..., 3, 3)` rotation matrices ``A``.

    Returns
    -------
    `(..., 3)` Euler angles in degrees.
    """
    abs_sb = torch.sqrt(matrix[..., 0, 2] ** 2 + matrix[..., 1, 2] ** 2)
    regular = abs_sb > 16 * eps
    tilt = torch.atan2(abs_sb, matrix[..., 2, 2])
    psi = torch.atan2(matrix[..., 1, 2], -matrix[..., 0, 2])
    rot = torch.atan2(matrix[..., 2, 1], matrix[..., 2, 0])
    # Gimbal lock: only rot + psi (tilt = 0) or psi - rot (tilt = 180) is defined.
    up = matrix[..., 2, 2] > 0
    psi_lock = torch.where(
        up,
        torch.atan2(-matrix[..., 1, 0], matrix[..., 0, 0]),
        torch.atan2(matrix[..., 1, 0], -matrix[..., 0, 0]),
    )
    tilt_lock = torch.where(up, torch.zeros_like(tilt), torch.full_like(tilt, math.pi))
    rot = torch.where(regular, rot, torch.zeros_like(rot))
    tilt = torch.where(regular, tilt, tilt_lock)
    psi = torch.where(regular, psi, psi_lock)
    return torch.rad2deg(torch.stack([rot, tilt, psi], dim=-1))


def axis_angle_to_matrix(rotvec: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula: rotation vector (axis * angle in radians) to an active matrix.

    Parameters
    ----------
    rotvec: `(..., 3)` rotation vectors.

    Returns
    -------
    `(..., 3, 3)` matrices ``R`` that rotate column vectors by ``|rotvec|`` about its axis.
    """
    theta = torch.linalg.vector_norm(rotvec, dim=-1)[..., None, None]
    x, y, z = rotvec.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack(
        [
            torch.stack([zero, -z, y], dim=-1),
            torch.stack([z, zero, -x], dim=-1),
            torch.stack([-y, x, zero], dim=-1),
        ],
        dim=-2,
    )
    small = theta < 1e-8
    safe = torch.where(small, torch.ones_like(theta), theta)
    # sin(t)/t and (1-cos(t))/t^2 with their Taylor limits at t -> 0
    a = torch.where(small, 1 - theta**2 / 6, torch.sin(safe) / safe)
    b = torch.where(small, 0.5 - theta**2 / 24, (1 - torch.cos(safe)) / safe**2)
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device).expand_as(k)
    return eye + a * k + b * (k @ k)


def matrix_to_axis_angle(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`axis_angle_to_matrix`, angle in [0, pi].

    Parameters
    ----------
    matrix: `(..., 3, 3)` rotation matrices.

    Returns
    -------
    `(..., 3)` rotation vectors.
    """
    quat = matrix_to_quaternion(matrix)
    quat = torch.where(quat[..., :1] < 0, -quat, quat)
    w, xyz = quat[..., 0], quat[..., 1:]
    s = torch.linalg.vector_norm(xyz, dim=-1)
    angle = 2 * torch.atan2(s, w)
    small = s < 1e-8
    scale = torch.where(small, 2 / w.clamp_min(1e-8), angle / torch.where(small, 1.0, s))
    return xyz * scale[..., None]


def rotation_angle_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Geodesic angle between rotations ``a`` and ``b`` `(..., 3, 3)`: the angle of
    ``a b^T``, in degrees `(...)`."""
    cos = ((a * b).sum((-1, -2)) - 1) / 2
    return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))


def quaternion_to_matrix(quat: torch.Tensor) -> torch.Tensor:
    """Unit quaternion ``(w, x, y, z)`` to an active rotation matrix (normalises first).

    Parameters
    ----------
    quat: `(..., 4)` quaternions, scalar first.

    Returns
    -------
    `(..., 3, 3)` rotation matrices.
    """
    q = quat / torch.linalg.vector_norm(quat, dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rows = [
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ]
    return torch.stack(rows, dim=-2)


def matrix_to_quaternion(matrix: torch.Tensor) -> torch.Tensor:
    """Rotation matrix to a unit quaternion ``(w, x, y, z)`` (Shepperd's method).

    Parameters
    ----------
    matrix: `(..., 3, 3)` rotation matrices.

    Returns
    -------
    `(..., 4)` quaternions, scalar first, sign arbitrary.
    """
    m = matrix
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    candidates = torch.stack(
        [
            torch.stack([1 + m00 + m11 + m22, m[..., 2, 1] - m[..., 1, 2],
                         m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
            torch.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m00 - m11 - m22,
                         m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]], -1),
            torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0],
                         1 - m00 + m11 - m22, m[..., 1, 2] + m[..., 2, 1]], -1),
            torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0],
                         m[..., 1, 2] + m[..., 2, 1], 1 - m00 - m11 + m22], -1),
        ],
        dim=-2,
    )  # (..., 4 candidates, 4)
    diag = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22,
                        1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    best = diag.argmax(dim=-1, keepdim=True)
    q = torch.gather(candidates, -2, best[..., None].expand(*best.shape, 4)).squeeze(-2)
    return q / torch.linalg.vector_norm(q, dim=-1, keepdim=True)


def cryosparc_pose_to_matrix(pose: torch.Tensor) -> torch.Tensor:
    """cryoSPARC ``alignments3D/pose`` (axis-angle, radians) to RELION's ``A``.

    cryoSPARC's axis-angle vector encodes ``A^T`` (cryoDRGN and pyem transpose it).

    Parameters
    ----------
    pose: `(..., 3)` rotation vectors.

    Returns
    -------
    `(..., 3, 3)` matrices ``A``.
    """
    return axis_angle_to_matrix(pose).transpose(-1, -2)


def matrix_to_cryosparc_pose(matrix: torch.Tensor) -> torch.Tensor:
    """RELION's ``A`` to a cryoSPARC ``alignments3D/pose`` vector; `(..., 3, 3) -> (..., 3)`."""
    return matrix_to_axis_angle(matrix.transpose(-1, -2))


def fourier_slice_matrices(matrix: torch.Tensor) -> torch.Tensor:
    """RELION's ``A`` to the xyz matrices torch-fourier-slice expects (``A^T``).

    torch-fourier-slice samples the volume's transform at ``M @ (kx, ky, 0)``; RELION's
    projection samples it at ``A^T @ (kx, ky, 0)``.
    """
    return matrix.transpose(-1, -2)


def image_matrices(rotations: torch.Tensor, mag_matrix: torch.Tensor | None) -> torch.Tensor:
    """The matrices that take the map to a particle's image frame, anisotropic
    magnification included: ``M3^T A`` with ``M3 = [[M, 0], [0, 1]]`` (RELION's rlnMagMat);
    ``A`` itself where ``mag_matrix`` is None.

    RELION projects with ``M3^-1 A`` and samples the map's transform at the inverse of that
    matrix applied to ``(kx, ky, 0)``: ``A^T (M k, 0)``, which is what
    :func:`fourier_slice_matrices` of ``M3^T A`` gives. In real space the same matrix takes a
    Gaussian's 2D marginal to mean ``M^T mu_2D`` and covariance ``M^T Sigma_2D M``.

    rotations `(..., 3, 3)`; mag_matrix `(..., 2, 2)` or None. Returns `(..., 3, 3)`.
    """
    if mag_matrix is None:
        return rotations
    m3 = torch.zeros(*mag_matrix.shape[:-2], 3, 3, dtype=rotations.dtype, device=rotations.device)
    m3[..., :2, :2] = mag_matrix.to(rotations.dtype)
    m3[..., 2, 2] = 1
    return m3.transpose(-1, -2) @ rotations


def mirrored_rotations(rotations: torch.Tensor) -> torch.Tensor:
    """The poses `(..., 3, 3)` (RELION matrices ``A``) of the mirror-image map
    ``V'(x, y, z) = V(x, y, -z)`` that give the same projections: ``F A F`` with
    ``F = diag(1, 1, -1)`` (the projection along z cannot tell the hands apart)."""
    f = rotations.new_tensor([1.0, 1.0, -1.0])
    return rotations * f[:, None] * f[None, :]


def random_rotations(n: int, generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Rotations drawn uniformly from SO(3) (normalised Gaussian quaternions); `(n, 3, 3)`."""
    q = torch.randn(n, 4, generator=generator, dtype=dtype)
    return quaternion_to_matrix(q)


# ---------------------------------------------------------------------------------------
# Shifts
# ---------------------------------------------------------------------------------------


def origin_px_to_A(origin_px: torch.Tensor, pixel_size_A: torch.Tensor | float) -> torch.Tensor:
    """RELION 3.0 ``rlnOriginX/Y`` (pixels) to 3.1 ``rlnOriginX/YAngst``; `(..., 2)`."""
    return origin_px * _per_row(pixel_size_A, origin_px)


def origin_A_to_px(origin_A: torch.Tensor, pixel_size_A: torch.Tensor | float) -> torch.Tensor:
    """``rlnOriginX/YAngst`` to pixels; `(..., 2)`."""
    return origin_A / _per_row(pixel_size_A, origin_A)


def cryodrgn_trans_to_origin_A(trans: torch.Tensor, box_size: int,
                               pixel_size_A: torch.Tensor | float) -> torch.Tensor:
    """cryoDRGN ``poses.pkl`` translations (fraction of the box) to RELION origin in Å."""
    return origin_px_to_A(trans * box_size, pixel_size_A)


def origin_A_to_cryodrgn_trans(origin_A: torch.Tensor, box_size: int,
                               pixel_size_A: torch.Tensor | float) -> torch.Tensor:
    """RELION origin in Å to cryoDRGN translations (fraction of the box)."""
    return origin_A_to_px(origin_A, pixel_size_A) / box_size


def origin_to_translation_A(origin_A: torch.Tensor) -> torch.Tensor:
    """Translation that places a centred projection where the particle sits: ``-origin``."""
    return -origin_A


def _per_row(pixel_size_A: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    p = torch.as_tensor(pixel_size_A, dtype=like.dtype, device=like.device)
    return p[..., None] if p.ndim > 0 else p


# ---------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------


def grid_1d_A(box_size: int, pixel_size_A: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """FFT-aligned coordinates ``(i - D//2) * pixel_size_A`` of a box; `(D,)` in Å."""
    return (torch.arange(box_size, device=device, dtype=dtype) - box_size // 2) * pixel_size_A


def translation_phase(frequency: torch.Tensor, translation_A: torch.Tensor,
                      pixel_size_A: float | torch.Tensor) -> torch.Tensor:
    """The factor ``exp(-2 pi i k.t)`` that translates an FFT-aligned image's content by
    ``+t`` (``f(x - t)``), at frequencies ``frequency`` (cycles per pixel).

    Parameters
    ----------
    frequency: `(*G, 2)` ``(ky, kx)`` in cycles per pixel (an rfft2 grid, or chosen points).
    translation_A: `(*B, 2)` translations (tx, ty) in Å.
    pixel_size_A: scalar or `(*B)` pixel sizes.

    Returns
    -------
    `(*B, *G)` complex factors.
    """
    grid = frequency.shape[:-1]
    k = frequency.reshape(-1, 2).to(translation_A.dtype)
    t_px = translation_A / _per_row(pixel_size_A, translation_A)
    phase = t_px[..., 1, None] * k[:, 0] + t_px[..., 0, None] * k[:, 1]
    phase = phase.reshape(*translation_A.shape[:-1], *grid)
    return torch.polar(torch.ones_like(phase), -2 * math.pi * phase)


def translate_rfft(image_rfft: torch.Tensor, translation_A: torch.Tensor,
                   pixel_size_A: float | torch.Tensor, box_size: int) -> torch.Tensor:
    """Translate images by ``translation_A`` (content moves to +t) in rfft space.

    For an FFT-aligned image (centre at D//2) the rfft of its real-space array already has
    the origin convention built in: ``f(x - t)`` has transform ``F(k) exp(-2 pi i k.t)``
    (:func:`translation_phase`).

    Parameters
    ----------
    image_rfft: `(..., D, D//2+1)` ``torch.fft.rfft2`` of `(..., D, D)` images.
    translation_A: `(..., 2)` translations (tx, ty) in Å.
    pixel_size_A: scalar or `(...)` pixel sizes.
    """
    k = rfft_frequencies_2d(box_size, 1.0, device=image_rfft.device,
                            dtype=translation_A.dtype)  # cycles per pixel
    return image_rfft * translation_phase(k, translation_A, pixel_size_A)


def translate_images(images: torch.Tensor, translation_A: torch.Tensor,
                     pixel_size_A: float | torch.Tensor) -> torch.Tensor:
    """Real-space wrapper of :func:`translate_rfft`; `(..., D, D) -> (..., D, D)`."""
    d = images.shape[-1]
    f = torch.fft.rfft2(images)
    return torch.fft.irfft2(translate_rfft(f, translation_A, pixel_size_A, d), s=(d, d))
