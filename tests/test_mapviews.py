"""Pictures of maps (mapviews.py): the views' axes against a Gaussian placed by the
voxeliser, the isosurface's position and size, and the reports as a real headless browser
(Debian's chromium, where installed) renders them."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from cryosplat.gaussians import GaussianMixture
from cryosplat.mapviews import isosurface, isosurface_level, map_views, plot_map_views
from cryosplat.postprocess import postprocess
from cryosplat.postprocess.run import write_postprocess

BOX, PIX = 32, 2.0


def _blob(centre_A, box: int = BOX, sigma_A: float = 2.5) -> np.ndarray:
    m = GaussianMixture(torch.tensor([centre_A], dtype=torch.float64),
                        torch.full((1, 3), sigma_A, dtype=torch.float64),
                        torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64),
                        torch.ones(1, dtype=torch.float64))
    with torch.no_grad():
        return m.voxelise(box, PIX).numpy()


def test_each_view_puts_a_gaussian_at_its_own_coordinates():
    """A Gaussian at (x, y, z) = (5, -2, 3) voxels, placed by the voxeliser: the brightest
    pixel of each view lies at its coordinates on that view's axes. Fails if a view is
    transposed, flipped or half a pixel off."""
    x, y, z = 5 * PIX, -2 * PIX, 3 * PIX
    views = map_views(_blob([x, y, z]), PIX)
    where = {"x": x, "y": y, "z": z}
    for name, view in views.items():
        row, col = np.unravel_index(np.argmax(view.image), view.image.shape)
        left, right, bottom, top = view.extent
        px = (right - left) / view.image.shape[1]
        at = (left + (col + 0.5) * px, bottom + (row + 0.5) * px)
        assert at == pytest.approx((where[view.axes[0]], where[view.axes[1]]), abs=1e-9), name


def test_the_isosurface_lies_around_the_density_in_angstrom():
    """A round blob off-centre: the surface's vertices surround its centre (x, y, z order,
    Å from the box centre) at one radius."""
    centre = np.array([4.0, -6.0, 2.0])
    v = _blob(list(centre), sigma_A=3.0)
    level = isosurface_level(v)
    assert 0 < level < v.max()
    verts, faces = isosurface(v, PIX, level)
    assert len(faces) > 50
    np.testing.assert_allclose(verts.mean(0), centre, atol=0.3 * PIX)
    r = np.linalg.norm(verts - centre, axis=1)
    assert r.std() < 0.1 * r.mean()
    # the radius where a normalised 3D Gaussian falls to the level
    peak = 1 / (2 * np.pi * 3.0**2) ** 1.5
    expected = 3.0 * np.sqrt(2 * np.log(peak / level))
    assert r.mean() == pytest.approx(expected, rel=0.1)


CHROMIUM = shutil.which("chromium")


def screenshot(page, png, height: int = 3000) -> np.ndarray:
    """``page`` rendered by headless chromium into ``png``: `(H, W, 3)` uint8."""
    import matplotlib.image

    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", "--no-first-run", "--hide-scrollbars",
                        f"--user-data-dir={png.parent / 'chromium-profile'}",
                        f"--window-size=1200,{height}", f"--screenshot={png}",
                        page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and png.exists(), r.stderr[-2000:]
    return (matplotlib.image.imread(png)[..., :3] * 255).astype(np.uint8)


@pytest.mark.skipif(not CHROMIUM, reason="chromium not installed")
def test_a_postprocess_report_shows_its_figures_in_a_browser(tmp_path):
    """The post-processing page in chromium: every figure decoded and drawn (a broken image
    leaves only its alt text on white), the map views among them."""
    v = _blob([0.0, 0.0, 0.0], sigma_A=4.0) + _blob([8.0, 4.0, -4.0], sigma_A=3.0)
    g = torch.Generator().manual_seed(0)
    halves = [torch.from_numpy(v).float() + 0.2 * float(v.std()) * torch.randn(v.shape, generator=g)
              for _ in range(2)]
    write_postprocess(tmp_path, postprocess(*halves, PIX, bfactor_A2=-50.0), PIX, "test maps")
    plot_map_views(tmp_path / "alone.png", v, PIX, np.array([[0.0, 0.0, 0.0]]))
    shot = screenshot(tmp_path / "report.html", tmp_path / "shot.png")
    ink = (shot < 200).any(-1)
    rows = np.nonzero(ink.mean(1) > 0.05)[0]  # rows where figures are drawn
    assert ink.mean() > 0.03 and rows.size > 600, (ink.mean(), rows.size)
    # the isosurface is drawn in matplotlib's Blues: blue pixels exist on the page
    blue = (shot[..., 2].astype(int) - shot[..., 0] > 60) & (shot[..., 2] > 120)
    assert blue.sum() > 500, blue.sum()
