"""MRC/MRCS images and volumes with mrcfile: headers, lazy positioned reads, writing.

Particle images are read with ``os.pread`` from the byte offsets the header gives, never
memory-mapped: a memory map leaves every page it touched in the process's resident set, so a
pass over a large stack would look like (and be accounted as) the whole stack in memory.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import mrcfile
import numpy as np
import torch

from cryosplat.errors import InputError, StageError
from cryosplat.fourier import fourier_resample
from cryosplat.io.atomic import atomic_path

# MRC modes we read: 0 int8, 1 int16, 2 float32, 6 uint16, 12 float16.
READABLE_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}


@dataclass(frozen=True)
class MrcHeader:
    """What the header of an MRC file says: `(nz, ny, nx)`, voxel size in Å, mode, and where
    and how the data are stored (byte offset of the first value, numpy dtype with byte order)."""

    path: str
    shape: tuple[int, int, int]
    voxel_size_A: float
    mode: int
    data_offset: int = 1024
    dtype: str = "<f4"


def read_header(path: str | Path) -> MrcHeader:
    """Read only the header of an MRC/MRCS file, with a clear error when it is unusable."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "image file not found")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty (0 bytes); expected an MRC file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", header_only=True, permissive=True) as m:
                h = m.header
                nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
                mode = int(h.mode)
                vs = float(m.voxel_size.x)
                extended = int(h.nsymbt)
                dtype = mrcfile.utils.data_dtype_from_header(h).str if mode in READABLE_MODES \
                    else ""
    except (ValueError, OSError) as e:
        raise InputError(path, f"not a readable MRC file ({e})") from None
    if mode not in READABLE_MODES:
        raise InputError(path, f"MRC mode {mode} is not read; expected one of "
                               f"{', '.join(f'{k} ({v})' for k, v in READABLE_MODES.items())}")
    if min(nx, ny, nz) < 1:
        raise InputError(path, f"header gives dimensions nx={nx} ny={ny} nz={nz}; expected >= 1")
    itemsize = np.dtype(READABLE_MODES[mode]).itemsize
    needed = 1024 + extended + nx * ny * nz * itemsize
    if path.stat().st_size < needed:
        raise InputError(path, f"file is truncated: header promises {nx}x{ny}x{nz} "
                               f"{READABLE_MODES[mode]} values ({needed} bytes), file has "
                               f"{path.stat().st_size} bytes")
    return MrcHeader(str(path), (nz, ny, nx), vs, mode, 1024 + extended, dtype)


def header_pixel_size(header: MrcHeader) -> float | None:
    """The pixel size an MRC header gives, or None where it gives none: 0, or exactly 1.0 Å,
    which is what writers leave when they know none (RELION itself takes the STAR file's
    value). The one rule every reader and check uses."""
    v = header.voxel_size_A
    return None if v <= 0 or v == 1.0 else v


def read_slices(header: MrcHeader, slices: np.ndarray, fd: int) -> np.ndarray:
    """Read 2D sections ``slices`` (sorted, 0-based) of an open MRC file: `(n, ny, nx)` float32.

    Consecutive sections are read in one ``os.pread``; nothing is memory-mapped."""
    _, ny, nx = header.shape
    dtype = np.dtype(header.dtype)
    size = ny * nx * dtype.itemsize
    out = np.empty((len(slices), ny, nx), dtype=np.float32)
    if len(slices) == 0:
        return out
    breaks = np.nonzero(np.diff(slices) != 1)[0] + 1
    start = 0
    for run in np.split(np.asarray(slices), breaks):
        n = len(run)
        offset = header.data_offset + int(run[0]) * size
        buf = os.pread(fd, n * size, offset)
        if len(buf) != n * size:
            raise InputError(header.path, f"short read at section {int(run[0]) + 1} (1-based): "
                                          f"{len(buf)} of {n * size} bytes; is the file truncated"
                                          " or still being written?")
        out[start:start + n] = np.frombuffer(buf, dtype=dtype).reshape(n, ny, nx)
        start += n
    return out


@dataclass
class ImageSource:
    """Lazy access to particle images scattered over MRC stacks.

    ``files[file_index[i]]`` holds particle ``i`` at 0-based slice ``slice_index[i]``.
    Nothing is read until :meth:`read`; then only the requested slices, with positioned reads
    (safe to share across threads and forked DataLoader workers: each process opens its own
    descriptors). With ``box_size`` smaller than the stored box the images are Fourier-cropped
    on read.
    """

    files: list[str]
    file_index: np.ndarray  # (N,) int
    slice_index: np.ndarray  # (N,) int, 0-based
    stored_box_size: int
    box_size: int
    source_box: np.ndarray | None = None  # (N,) each particle's box on disk, where they differ
    source_pixel_A: np.ndarray | None = None  # (N,) on disk, where images are rescaled on read
    target_pixel_A: float | None = None  # the pixel size they are rescaled to
    _open: dict[int, tuple[MrcHeader, int]] = field(default_factory=dict, repr=False)
    _pid: int = field(default=0, repr=False)

    def __len__(self) -> int:
        return len(self.slice_index)

    def _with(self, **changes) -> ImageSource:
        keep = {k: getattr(self, k) for k in ("files", "file_index", "slice_index",
                                              "stored_box_size", "box_size", "source_box",
                                              "source_pixel_A", "target_pixel_A")}
        return ImageSource(**{**keep, **changes})

    def subset(self, indices: np.ndarray) -> ImageSource:
        """The images ``indices`` `(n,)`, in that order."""
        def cut(a):
            return None if a is None else a[indices]
        return self._with(file_index=self.file_index[indices],
                          slice_index=self.slice_index[indices],
                          source_box=cut(self.source_box), source_pixel_A=cut(self.source_pixel_A))

    def with_box_size(self, box_size: int) -> ImageSource:
        """The same images read at ``box_size`` pixels (Fourier cropped or padded)."""
        return self._with(box_size=box_size)

    def rescaled(self, source_pixel_A: np.ndarray, target_pixel_A: float,
                 box_size: int) -> ImageSource:
        """The same images brought on read to ``target_pixel_A`` and a common ``box_size``:
        each Fourier-padded or cropped by its :func:`rescaled_box` (:func:`rescale_images`)."""
        return self._with(source_pixel_A=np.asarray(source_pixel_A, dtype=np.float64),
                          target_pixel_A=float(target_pixel_A), stored_box_size=box_size,
                          box_size=box_size,
                          source_box=self.disk_boxes())

    def disk_boxes(self) -> np.ndarray:
        """`(N,)` each particle's box as stored on disk."""
        if self.source_box is not None:
            return self.source_box
        return np.full(len(self), self.stored_box_size, dtype=np.int64)

    def check(self) -> list[MrcHeader]:
        """Check every stack's header and every index without reading pixel data; return the
        headers, one per file."""
        headers = []
        for k, f in enumerate(self.files):
            h = read_header(f)
            headers.append(h)
            nz, ny, nx = h.shape
            if ny != nx:
                raise InputError(f, f"images are {nx} x {ny} pixels; expected square images")
            boxes = np.unique(self.disk_boxes()[self.file_index == k])
            if boxes.size and (boxes != nx).any():
                raise InputError(f, f"images are {nx} pixels wide; the metadata give "
                                    f"{int(boxes[boxes != nx][0])} for its particles")
            used = self.slice_index[self.file_index == k]
            if used.size and (used.max() >= nz or used.min() < 0):
                bad = int(used.max() if used.max() >= nz else used.min())
                raise InputError(f, f"particle index {bad + 1} (1-based) is beyond the stack, "
                                    f"which holds {nz} images")
        return headers

    def _file(self, k: int) -> tuple[MrcHeader, int]:
        """Header and descriptor of stack ``k``, opened once per process."""
        if self._pid != os.getpid():  # a forked worker: never share the parent's descriptors
            self._open, self._pid = {}, os.getpid()
        if k not in self._open:
            h = read_header(self.files[k])
            self._open[k] = (h, os.open(self.files[k], os.O_RDONLY))
        return self._open[k]

    def close(self) -> None:
        """Close the stacks this process opened (a forked copy leaves its parent's)."""
        if self._pid == os.getpid():
            for _, fd in self._open.values():
                os.close(fd)
        self._open = {}

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __getstate__(self):  # pickled into spawned workers without descriptors
        state = dict(self.__dict__)
        state["_open"], state["_pid"] = {}, 0
        return state

    def read(self, indices: Iterable[int] | np.ndarray) -> np.ndarray:
        """Read particles ``indices`` as `(n, D, D)` float32 (D = ``box_size``)."""
        indices = np.asarray(indices, dtype=np.int64)
        d0 = self.stored_box_size
        out = np.empty((len(indices), d0, d0), dtype=np.float32)
        fidx = self.file_index[indices]
        disk = self.disk_boxes()
        for k in np.unique(fidx):
            rows = np.nonzero(fidx == k)[0]
            header, fd = self._file(int(k))
            nz, ny, nx = header.shape
            sl = self.slice_index[indices[rows]]
            want = int(disk[indices[rows[0]]])
            if nx != want or ny != want:
                raise InputError(self.files[k], f"images are {nx} x {ny} pixels; expected "
                                                f"{want} x {want}")
            if sl.max() >= nz or sl.min() < 0:
                bad = int(sl.max() if sl.max() >= nz else sl.min())
                raise InputError(self.files[k], f"particle index {bad + 1} (1-based) is beyond "
                                                f"the stack, which holds {nz}")
            order = np.argsort(sl, kind="stable")
            block = read_slices(header, sl[order], fd)
            finite = np.isfinite(block.reshape(len(sl), -1)).all(axis=1)
            if not finite.all():
                bad = int(sl[order][np.argmin(finite)])
                raise InputError(self.files[k], f"image {bad + 1} (1-based) holds NaN or Inf "
                                                "pixels")
            if self.target_pixel_A is not None:
                assert self.source_pixel_A is not None  # set with the target (rescaled())
                src = self.source_pixel_A[indices[rows[order]]]
                block = rescale_images(block, src, self.target_pixel_A, d0)
            out[rows[order]] = block
        if self.box_size != d0:
            return fourier_resample(torch.from_numpy(out), self.box_size).numpy()
        return out


def rescaled_box(box_size: int, pixel_size_A: float, target_pixel_A: float) -> int:
    """The box an image of ``box_size`` pixels of ``pixel_size_A`` Fourier-pads or crops to at
    ``target_pixel_A``: the nearest integer to the same field of view. Its pixel is then
    ``box_size pixel_size_A / rescaled_box`` exactly; the small difference from the target
    is carried as a magnification (:meth:`cryosplat.io.Particles.rescaled`)."""
    return max(2, int(round(box_size * pixel_size_A / target_pixel_A)))


def rescale_images(images: np.ndarray, pixel_size_A: np.ndarray, target_pixel_A: float,
                   box_size: int) -> np.ndarray:
    """Bring `(n, d, d)` images of per-image ``pixel_size_A`` `(n,)` to the target pixel
    size (Fourier padding or cropping to :func:`rescaled_box`, values kept as samples of the
    same function), then pad with zeros or crop in real space to ``box_size``, keeping pixel
    D//2 at the centre. Returns `(n, box_size, box_size)` float32."""
    n, d = images.shape[0], images.shape[-1]
    out = np.zeros((n, box_size, box_size), dtype=np.float32)
    for pix in np.unique(pixel_size_A):
        rows = np.nonzero(pixel_size_A == pix)[0]
        b = rescaled_box(d, float(pix), target_pixel_A)
        t = torch.from_numpy(np.ascontiguousarray(images[rows]))
        if b != d:
            t = fourier_resample(t, b)
        x = t.numpy()
        if b >= box_size:
            s = b // 2 - box_size // 2
            out[rows] = x[:, s:s + box_size, s:s + box_size]
        else:
            s = box_size // 2 - b // 2
            out[rows, s:s + b, s:s + b] = x
    return out


def write_stack(path: str | Path, batches: Iterable[np.ndarray], n: int, box_size: int,
                pixel_size_A: float) -> None:
    """Stream `(b, D, D)` batches into a float32 MRCS file of ``n`` images, atomically.

    The data are appended with plain writes (not a memory map), so the process's memory holds
    one batch whatever ``n``; the header statistics are accumulated batch by batch.
    """
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as m:  # header only, for a (n, D, D) stack
            m.set_data(np.zeros((0, box_size, box_size), dtype=np.float32))
            m.set_image_stack()
            m.voxel_size = pixel_size_A
            header = m.header.copy()
        header.nz = header.mz = n
        header.cella.z = n * pixel_size_A
        count, lo, hi, total, total_sq = 0, np.inf, -np.inf, 0.0, 0.0
        with open(tmp, "r+b") as f:
            f.seek(header.nbytes + int(header.nsymbt))
            for batch in batches:
                b = np.ascontiguousarray(batch, dtype="<f4")
                if b.shape[1:] != (box_size, box_size) or count + len(b) > n:
                    raise RuntimeError(f"{path}: batch of shape {b.shape} does not fit a stack of "
                                       f"{n} images of {box_size} x {box_size}")
                f.write(b.tobytes())
                count += len(b)
                lo, hi = min(lo, float(b.min())), max(hi, float(b.max()))
                total += float(b.sum(dtype=np.float64))
                total_sq += float(np.square(b, dtype=np.float64).sum())
            if count != n:
                raise RuntimeError(f"{path}: wrote {count} images, expected {n}")
            size = n * box_size * box_size
            mean = total / size
            header.dmin, header.dmax, header.dmean = lo, hi, mean
            header.rms = np.sqrt(max(total_sq / size - mean * mean, 0.0))
            f.seek(0)
            f.write(header.tobytes())


def write_volume(path: str | Path, volume: np.ndarray | torch.Tensor, voxel_size_A: float,
                 center_A: tuple[float, float, float] | None = None) -> None:
    """Write a `(D, D, D)` volume (indexed z, y, x) as a float32 MRC map, atomically.

    The voxel size is set in the header. By default the origin is 0, as RELION writes maps,
    so ChimeraX puts voxel i at i * voxel_size. With ``center_A`` the origin is set so that
    the box centre (voxel D//2) lands at that point, e.g. an atomic model's centre.
    """
    if isinstance(volume, torch.Tensor):
        volume = volume.detach().cpu().numpy()
    volume = np.ascontiguousarray(volume, dtype=np.float32)
    if not np.isfinite(volume).all():
        raise ValueError(f"{path}: refusing to write a map with NaN or Inf voxels")
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(volume)
            m.voxel_size = voxel_size_A
            if center_A is not None:
                d = volume.shape[-1]
                m.header.origin.x = center_A[0] - (d // 2) * voxel_size_A
                m.header.origin.y = center_A[1] - (d // 2) * voxel_size_A
                m.header.origin.z = center_A[2] - (d // 2) * voxel_size_A
            m.update_header_stats()


def read_volume(path: str | Path) -> tuple[np.ndarray, float]:
    """Read a cubic MRC map as `(D, D, D)` float32 (z, y, x) and its voxel size in Å."""
    h = read_header(path)
    if len(set(h.shape)) != 1:
        raise InputError(path, f"map is {h.shape[2]} x {h.shape[1]} x {h.shape[0]} voxels; "
                               "expected a cubic map")
    fd = os.open(path, os.O_RDONLY)
    try:
        data = read_slices(h, np.arange(h.shape[0]), fd)
    finally:
        os.close(fd)
    if not np.isfinite(data).all():
        raise InputError(path, "map holds NaN or Inf voxels")
    return data, h.voxel_size_A


def read_map_like(path: str | Path, box_size: int, voxel_size_A: float,
                  what: str) -> torch.Tensor:
    """A map (truth or mask) that must share the reconstruction's grid."""
    vol, vox = read_volume(path)
    if vol.shape[0] != box_size or abs(vox - voxel_size_A) > 1e-3:
        raise InputError(path, f"{what} is {vol.shape[0]} voxels of {vox:g} Å; expected "
                               f"{box_size} voxels of {voxel_size_A:g} Å like the maps")
    if what == "mask" and (vol.min() < -1e-3 or vol.max() > 1 + 1e-3):
        raise InputError(path, f"mask values span [{vol.min():g}, {vol.max():g}]; expected [0, 1]")
    return torch.from_numpy(vol)


def write_maps(out_dir: str | Path, maps: dict[str, torch.Tensor], voxel_size_A: float,
               stage: str, why: str = "") -> None:
    """Each map as ``out_dir/NAME.mrc``, after checking that every one is finite (else a
    :class:`~cryosplat.errors.StageError` of ``stage``, ending with ``why``, and nothing is
    written)."""
    for name, vol in maps.items():
        if not torch.isfinite(vol).all():
            raise StageError(stage, f"NaN/Inf in {name}{why}")
    for name, vol in maps.items():
        write_volume(Path(out_dir) / f"{name}.mrc", vol, voxel_size_A)
