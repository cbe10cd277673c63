"""A hard-edged, non-Gaussian phantom map for `cryosplat simulate`: solid bodies of uniform
density (an ellipsoid, a rod, a hollow shell and a cube; 64^3 voxels of 1.5 Å), sampled on a
2x finer grid and Fourier-cropped, so it is band-limited at Nyquist. A Gaussian mixture cannot
represent it exactly, unlike the atomic simulations. docs/reconstruct.md has its results.

    .venv/bin/python benchmarks/phantom.py OUT.mrc
    cryosplat simulate OUT.mrc --out sim --box 64 --pixel-size 1.5 --particles 2000
"""
import sys

import mrcfile
import numpy as np

if len(sys.argv) != 2:
    sys.exit(__doc__)
d, pix, over = 64, 1.5, 2
n, p = d * over, pix / over
c = (np.arange(n) - n // 2) * p
z, y, x = np.meshgrid(c, c, c, indexing="ij")


def rot(ax, deg):
    a = np.deg2rad(deg)
    ca, sa = np.cos(a), np.sin(a)
    return {"z": np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]]),
            "y": np.array([[ca, 0, sa], [0, 1, 0], [-sa, 0, ca]]),
            "x": np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])}[ax]


def local(centre, r):
    q = np.stack([x - centre[0], y - centre[1], z - centre[2]], -1) @ r  # body frame
    return q[..., 0], q[..., 1], q[..., 2]


vol = np.zeros_like(x)
u, v, w = local((-6, 0, 0), rot("z", 25) @ rot("x", 40))
vol += 1.0 * ((u / 18) ** 2 + (v / 12) ** 2 + (w / 9) ** 2 <= 1)            # ellipsoid
u, v, w = local((12, 8, 4), rot("y", 50) @ rot("z", -30))
vol += 1.5 * ((u ** 2 + v ** 2 <= 4 ** 2) & (np.abs(w) <= 15))              # rod
r = np.sqrt((x - 6) ** 2 + (y + 14) ** 2 + (z + 8) ** 2)
vol += 1.0 * ((r >= 6) & (r <= 9))                                          # hollow shell
u, v, w = local((-12, 12, 10), rot("x", 30) @ rot("z", 60))
vol += 0.8 * ((np.abs(u) <= 5) & (np.abs(v) <= 5) & (np.abs(w) <= 5))      # cube
f = np.fft.fftshift(np.fft.fftn(vol))
lo = n // 2 - d // 2
crop = f[lo:lo + d, lo:lo + d, lo:lo + d]
out = np.real(np.fft.ifftn(np.fft.ifftshift(crop))) / over ** 3
with mrcfile.new(sys.argv[1]) as m:  # refuses to overwrite
    m.set_data(out.astype(np.float32))
    m.voxel_size = pix
r = np.sqrt(x * x + y * y + z * z)
print("max radius of the bodies (A):", float(r[vol > 0].max()), "min/max:", out.min(), out.max())
