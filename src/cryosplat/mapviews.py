"""Pictures of a 3D map for the reports, drawn headless (report.py's matplotlib): the central slices
and the projections along z, y and x, and an isosurface (scikit-image's marching cubes), with
a Gaussian mixture's centres over the projection along z.

A map is indexed ``[z, y, x]`` and voxel ``i`` lies at ``(i - D//2) x voxel size`` Å on each
axis (docs/conventions.md); every picture is drawn in those Å, origin at the box centre, so a
centre (x, y, z) in Å falls on its own density.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.measure import marching_cubes

from cryosplat.report import pyplot, save_figure


@dataclass
class View:
    """One 2D picture of a map: ``image`` `(rows, columns)` with rows along ``axes[1]`` and
    columns along ``axes[0]``, both in Å over ``extent`` (left, right, bottom, top), as
    matplotlib's ``imshow(origin="lower")`` takes it."""

    image: np.ndarray
    extent: tuple[float, float, float, float]
    axes: tuple[str, str]


def map_views(volume: np.ndarray, voxel_size_A: float) -> dict[str, View]:
    """The central slices (through voxel D//2) and the projections (sums) of a `(D, D, D)`
    map along z, y and x: ``{"slice z": View, ..., "projection x": View}``."""
    d = volume.shape[-1]
    # pixel centres at (i - D//2) * voxel size: the edges half a voxel beyond
    lo, hi = (-(d // 2) - 0.5) * voxel_size_A, (d - d // 2 - 0.5) * voxel_size_A
    extent = (lo, hi, lo, hi)
    c = d // 2
    v = np.asarray(volume, dtype=np.float64)
    return {"slice z": View(v[c], extent, ("x", "y")),
            "slice y": View(v[:, c, :], extent, ("x", "z")),
            "slice x": View(v[:, :, c], extent, ("y", "z")),
            "projection z": View(v.sum(0), extent, ("x", "y")),
            "projection y": View(v.sum(1), extent, ("x", "z")),
            "projection x": View(v.sum(2), extent, ("y", "z"))}


def isosurface_level(volume: np.ndarray) -> float:
    """A contour level: 5 standard deviations of the corners outside the sphere the box
    inscribes (where a centred particle has no density), above their mean, and at least 10%
    of the map's maximum."""
    d = volume.shape[-1]
    i = np.arange(d) - d // 2
    r2 = i[:, None, None] ** 2 + i[None, :, None] ** 2 + i[None, None, :] ** 2
    corners = volume[r2 > (d // 2) ** 2]
    return float(max(corners.mean() + 5 * corners.std(), 0.1 * volume.max()))


def isosurface(volume: np.ndarray, voxel_size_A: float, level: float, max_faces: int = 60000
               ) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes at ``level``: vertices `(V, 3)` as (x, y, z) in Å from the box centre
    and faces `(F, 3)`, coarsened (step of 2, 3... voxels) until at most ``max_faces``."""
    d = volume.shape[-1]
    step = 1
    while True:
        verts, faces, _, _ = marching_cubes(np.asarray(volume, dtype=np.float32), level,
                                            spacing=(voxel_size_A,) * 3, step_size=step)
        if len(faces) <= max_faces or step >= d // 8:
            break
        step += 1
    return verts[:, ::-1] - (d // 2) * voxel_size_A, faces


def plot_map_views(path, volume: np.ndarray, voxel_size_A: float,
                   centres_A: np.ndarray | None = None, title: str = "") -> float:
    """map_views.png: the slices and projections of :func:`map_views` and the isosurface at
    :func:`isosurface_level`, with ``centres_A`` `(M, 3)` (x, y, z in Å from the box centre,
    e.g. a mixture's means) over the projection along z. Returns the isosurface level."""
    plt = pyplot()  # matplotlib on first use (report.py), then its 3D toolkit
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    v = np.asarray(volume, dtype=np.float64)
    views = map_views(v, voxel_size_A)
    level = isosurface_level(v)
    fig = plt.figure(figsize=(15, 7.5), dpi=100)
    grid = fig.add_gridspec(2, 5)
    for k, (name, view) in enumerate(views.items()):
        ax = fig.add_subplot(grid[k // 3, k % 3])
        ax.imshow(view.image, origin="lower", extent=view.extent, cmap="gray")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(f"{view.axes[0]} (Å)", fontsize=8)
        ax.set_ylabel(f"{view.axes[1]} (Å)", fontsize=8)
        ax.tick_params(labelsize=7)
        if name == "projection z" and centres_A is not None and len(centres_A):
            c = np.asarray(centres_A, dtype=np.float64)
            label = f"{len(c)} Gaussian centres"
            if len(c) > 2000:  # a sample, so the density stays visible beneath
                c = c[np.random.default_rng(0).choice(len(c), 2000, replace=False)]
                label = f"2000 of {label}"
            ax.scatter(c[:, 0], c[:, 1], s=1, c="tab:orange", alpha=0.4, linewidths=0,
                       label=label)
            ax.legend(fontsize=7, loc="upper right", markerscale=6)
    ax = fig.add_subplot(grid[:, 3:], projection="3d")
    half = v.shape[-1] / 2 * voxel_size_A
    try:
        verts, faces = isosurface(v, voxel_size_A, level)
    except (ValueError, RuntimeError):  # no surface at this level (an empty or flat map)
        verts, faces = np.zeros((0, 3)), np.zeros((0, 3), dtype=int)
    if len(faces):
        tri = verts[faces]
        normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        normal /= np.linalg.norm(normal, axis=1, keepdims=True).clip(1e-12)
        shade = 0.35 + 0.65 * np.abs(normal @ np.array([0.4, 0.4, 0.82]))
        ax.add_collection3d(Poly3DCollection(tri, facecolors=plt.cm.Blues(0.3 + 0.6 * shade),
                                             edgecolors="none"))
    centre: np.ndarray = np.zeros(3)
    reach = half
    if len(faces):  # the surface's bounding cube, with a margin of 5%
        low, high = verts.min(0), verts.max(0)
        centre, reach = (low + high) / 2, 0.55 * float((high - low).max())
    for set_lim, c in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), centre):
        set_lim(c - reach, c + reach)
    ax.set_box_aspect((1, 1, 1))
    ax.set_xlabel("x (Å)", fontsize=8), ax.set_ylabel("y (Å)", fontsize=8)
    ax.set_zlabel("z (Å)", fontsize=8)
    ax.tick_params(labelsize=6)
    ax.set_title(f"isosurface at {level:.3g}" + ("" if len(faces) else " (none)"), fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    return level
