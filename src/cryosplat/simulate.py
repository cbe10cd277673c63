"""Simulated particles from an atomic model (or a map), with known ground truth.

The electron scattering potential of an atomic model is a sum of Gaussians: each atom's
electron scattering factor is the 5-Gaussian fit of International Tables Vol. C 4.3.2.2
(gemmi's ``c4322``), ``f(s) = sum_i a_i exp(-b_i s^2)`` with ``s = 1/(2d)``; its Fourier
transform, blurred by the atom's B-factor, is the normalised 3D Gaussian of variance
``(b_i + B) / (8 pi^2)`` Å² and mass ``a_i``. The ground-truth map samples that mixture on the
reconstruction grid; particles are its projections (torch-fourier-slice), CTF-modulated,
shifted by ``-origin`` and given white Gaussian noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import gemmi
import numpy as np
import torch
from torch_fourier_slice import project_3d_to_2d

from cryosplat import geometry
from cryosplat.ctf import CTFParams, modulate
from cryosplat.errors import InputError, refuse_out_of_range
from cryosplat.fourier import fourier_resample
from cryosplat.gaussians import voxelise
from cryosplat.io.mrc import ImageSource, read_volume, write_stack, write_volume
from cryosplat.io.particles import OpticsGroup, Particles
from cryosplat.io.star_writer import particles_to_star_tables, write_star
from cryosplat.simulate_effects import (
    JUNK_NOISE,
    JUNK_OBJECT,
    Effects,
    ParticleEffects,
    apply_mtf,
    coloured_noise,
    draw_effects,
    junk_object,
    mtf,
)

BIO_ELEMENTS = {"H", "C", "N", "O", "S", "P", "Se", "Na", "Mg", "K", "Ca", "Cl", "Mn", "Fe",
                "Co", "Ni", "Cu", "Zn", "F", "I", "Br"}


def builtin_structure() -> Path:
    """The shipped example model: PDB 4AKE (adenylate kinase, 24 kDa, CC0)."""
    return Path(str(resources.files("cryosplat") / "data" / "adk_open.pdb"))


def symmetric_assembly(path: str | Path, out_path: str | Path, symmetry: torch.Tensor,
                       offset_A: tuple[float, float, float]) -> Path:
    """Write a PDB of ``len(symmetry)`` copies of the model at ``path``: its atoms centred on
    their mean, moved by ``offset_A`` (x, y, z) and rotated by each matrix ``S`` of
    ``symmetry`` `(G, 3, 3)` (:func:`cryosplat.symmetry.symmetry_matrices`): a test object
    with that point group about the origin (for a generic offset, the copies do not meet)."""
    st = gemmi.read_structure(str(path))
    st.remove_empty_chains()
    st.setup_entities()
    xyz = np.array([[a.pos.x, a.pos.y, a.pos.z] for cra in st[0].all() for a in [cra.atom]])
    shift = np.asarray(offset_A, dtype=np.float64) - xyz.mean(axis=0)
    out = gemmi.Structure()
    out.cell = st.cell
    model = gemmi.Model(1)
    names = iter("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789" * 2)
    for m in symmetry.double().numpy():
        for chain in st[0]:
            c = gemmi.Chain(next(names))
            for res in chain:
                r = res.clone()
                for a in r:
                    p = m @ (np.array([a.pos.x, a.pos.y, a.pos.z]) + shift)
                    a.pos = gemmi.Position(*p)
                c.add_residue(r)
            model.add_chain(c)
    out.add_model(model)
    out.write_pdb(str(out_path))
    return Path(out_path)


def atomic_potential_gaussians(path: str | Path, extra_bfactor_A2: float = 0.0
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """An atomic model's potential as an isotropic Gaussian mixture, centred on the model.

    Returns
    -------
    means_A `(M, 3)`, variances_A2 `(M,)`, amplitudes `(M,)` (float64), and the model's
    centre in its own coordinates (Å), which becomes coordinate 0.
    """
    path = Path(path)
    try:
        st = gemmi.read_structure(str(path))
    except Exception as e:  # gemmi raises RuntimeError/ValueError on bad files
        raise InputError(path, f"not a readable PDB/mmCIF model ({e})") from None
    st.remove_empty_chains()
    if len(st) == 0:
        raise InputError(path, "holds no model")
    xyz, a, b, bfac, occ = [], [], [], [], []
    for cra in st[0].all():
        at = cra.atom
        element = at.element
        if element.name not in BIO_ELEMENTS:
            # No element column (CHARMM PDBs): gemmi guesses from the name ('NH1' -> Nh);
            # outside the elements of biomolecules, take the name's first letter instead.
            letters = "".join(ch for ch in at.name if ch.isalpha())
            element = gemmi.Element(letters[:1] or "X")
        coef = element.c4322
        if element.name == "X" or coef is None:
            raise InputError(path, f"atom {at.name} of residue {cra.residue.name} "
                                   f"{cra.residue.seqid}: unknown element")
        xyz.append([at.pos.x, at.pos.y, at.pos.z])
        a.append(list(coef.a))
        b.append(list(coef.b))
        bfac.append(max(at.b_iso, 0.0))
        occ.append(at.occ)
    if not xyz:
        raise InputError(path, "holds no atoms")
    positions = np.asarray(xyz)
    centre = positions.mean(axis=0)
    centred = torch.from_numpy(positions - centre)
    a_t, b_t = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    occ_t = torch.tensor(occ, dtype=torch.float64)
    bb = torch.tensor(bfac, dtype=torch.float64)[:, None] + b_t + extra_bfactor_A2
    means = centred[:, None, :].expand(-1, a_t.shape[1], 3).reshape(-1, 3)
    variances = (bb / (8 * math.pi**2)).reshape(-1)
    amplitudes = (a_t * occ_t[:, None]).reshape(-1)
    return means, variances, amplitudes, centre


def structure_to_map(path: str | Path, box_size: int, pixel_size_A: float,
                     extra_bfactor_A2: float = 0.0,
                     oversampling: int = 2) -> tuple[torch.Tensor, np.ndarray]:
    """Ground-truth potential of an atomic model on a `(D, D, D)` grid, and its centre.

    Atoms are far narrower than a voxel (sigma about 0.5 Å), so sampling them directly would
    alias their high frequencies into every shell: the map would not be the band-limited
    potential that an ideal detector records. They are sampled on a grid ``oversampling``
    times finer (centre voxel at the same point) and Fourier-cropped back to D about that
    voxel (:func:`cryosplat.fourier.fourier_resample`), which band-limits the map at Nyquist.
    """
    means, var, amp, centre = atomic_potential_gaussians(path, extra_bfactor_A2)
    extent = float(means.abs().max())
    if extent > box_size // 2 * pixel_size_A:
        raise InputError(path, f"the model reaches {extent:.1f} Å from its centre; a box of "
                               f"{box_size} x {pixel_size_A:g} Å holds only "
                               f"{box_size // 2 * pixel_size_A:.1f} Å: use a larger --box or "
                               "--pixel-size")
    cov = var[:, None, None] * torch.eye(3, dtype=torch.float64)
    if oversampling == 1:
        return voxelise(means, cov, amp, box_size, pixel_size_A), centre
    fine = voxelise(means.float(), cov.float(), amp.float(), oversampling * box_size,
                    pixel_size_A / oversampling)
    return fourier_resample(fine, box_size, ndim=3).double(), centre


@dataclass
class SimulationConfig:
    """Everything that defines a simulated dataset (with the seed, it is reproducible)."""

    n_particles: int = 2000
    box_size: int = 64
    pixel_size_A: float = 1.5
    snr: float = 0.1
    defocus_min_um: float = 1.0
    defocus_max_um: float = 3.0
    astigmatism_um: float = 0.05
    max_shift_A: float = 3.0
    voltage_kV: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    bfactor_A2: float = 0.0
    seed: int = 0
    batch_size: int = 256
    # higher-order optics of the one optics group (RELION's definitions, cryosplat.ctf)
    beam_tilt_mrad: tuple[float, ...] = (0.0, 0.0)  # x, y (check() asks for 2)
    odd_zernike: tuple[float, ...] = ()
    even_zernike: tuple[float, ...] = ()
    mag_matrix: tuple[float, ...] = (1.0, 0.0, 0.0, 1.0)  # M00, M01, M10, M11 (check(): 4)
    premultiplied: bool = False  # images multiplied once more by their CTF (RELION 4/5)

    def check(self) -> None:
        """Refuse settings no dataset can have, naming the command-line option."""
        m = self.mag_matrix
        refuse_out_of_range((
            ("--particles", self.n_particles, self.n_particles > 0),
            ("--box", self.box_size, self.box_size >= 8),
            ("--pixel-size", self.pixel_size_A, self.pixel_size_A > 0),
            ("--snr", self.snr, self.snr > 0),
            ("--defocus-max", self.defocus_max_um, self.defocus_max_um >= self.defocus_min_um),
            ("--beam-tilt", self.beam_tilt_mrad, len(self.beam_tilt_mrad) == 2),
            ("--mag-matrix", m, len(m) == 4 and 0.5 < abs(m[0] * m[3] - m[1] * m[2]) < 2)))


def draw_parameters(cfg: SimulationConfig
                    ) -> tuple[torch.Tensor, torch.Tensor, CTFParams, torch.Tensor]:
    """Poses (RELION A), origins (Å), CTF and half-sets for ``cfg``, from its seed."""
    g = torch.Generator().manual_seed(cfg.seed)
    n = cfg.n_particles
    rot = geometry.random_rotations(n, g)
    origin = (torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1) * cfg.max_shift_A
    df = cfg.defocus_min_um + torch.rand(n, generator=g, dtype=torch.float64) * (
        cfg.defocus_max_um - cfg.defocus_min_um)
    ast = torch.rand(n, generator=g, dtype=torch.float64) * cfg.astigmatism_um
    angle = torch.rand(n, generator=g, dtype=torch.float64) * 180 - 90
    full = lambda v: torch.full((n,), float(v), dtype=torch.float64)  # noqa: E731
    ctf = CTFParams(defocus_u_A=(df + ast) * 1e4, defocus_v_A=(df - ast) * 1e4,
                    defocus_angle_deg=angle, voltage_kV=full(cfg.voltage_kV), cs_mm=full(cfg.cs_mm),
                    amplitude_contrast=full(cfg.amplitude_contrast), phase_shift_deg=full(0.0),
                    bfactor_A2=full(cfg.bfactor_A2), scale=full(1.0), **optics_terms(cfg))
    half = torch.randint(1, 3, (n,), generator=g)
    return rot, origin, ctf, half


def optics_terms(cfg: SimulationConfig) -> dict[str, torch.Tensor | None]:
    """The higher-order optics of ``cfg`` as :class:`CTFParams` fields, one row per particle
    (None for each that is absent)."""
    n = cfg.n_particles

    def rows(values, shape):
        return torch.tensor(values, dtype=torch.float64).reshape(shape).expand(n, *shape).clone()

    return {
        "beam_tilt_mrad": rows(cfg.beam_tilt_mrad, (2,)) if any(cfg.beam_tilt_mrad) else None,
        "odd_zernike": rows(cfg.odd_zernike, (len(cfg.odd_zernike),)) if cfg.odd_zernike else None,
        "even_zernike": (rows(cfg.even_zernike, (len(cfg.even_zernike),)) if cfg.even_zernike
                         else None),
        "mag_matrix": (rows(cfg.mag_matrix, (2, 2)) if tuple(cfg.mag_matrix) != (1, 0, 0, 1)
                       else None),
        "premultiplied": torch.ones(n, dtype=torch.float64) if cfg.premultiplied else None,
    }


def project(volume: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Projections of a `(D, D, D)` volume for RELION matrices `(B, 3, 3)`: `(B, D, D)`.

    torch-fourier-slice 0.6.0 is centred for even boxes only (measured: an odd box's
    projections reconstruct, by direct inversion, to FSC 0.97 flat against the volume, the
    renderer's to 0.9999); an odd volume is projected padded by one voxel in front, so that
    voxel D//2 is the even box's centre, and the images are cropped back."""
    v = volume.float()
    odd = v.shape[-1] % 2 == 1
    if odd:
        v = torch.nn.functional.pad(v, (1, 0, 1, 0, 1, 0))
    images = project_3d_to_2d(v, geometry.fourier_slice_matrices(rotations).float())
    return images[..., 1:, 1:] if odd else images


def forward_images(projections: torch.Tensor, origin_A: torch.Tensor, ctf: CTFParams,
                   pixel_size_A: float) -> torch.Tensor:
    """CTF(k) x shift(projection, -origin): the noiseless particle images, `(B, D, D)`."""
    d = projections.shape[-1]
    f = modulate(torch.fft.rfft2(projections.double()), origin_A.double(), ctf, pixel_size_A)
    return torch.fft.irfft2(f, s=(d, d)).float()


def simulate_images(volume: torch.Tensor, cfg: SimulationConfig, rotations: torch.Tensor,
                    origin_A: torch.Tensor, ctf: CTFParams, progress=None,
                    effects: Effects | None = None, draws: ParticleEffects | None = None):
    """Yield batches of noisy particle images (float32 numpy), deterministic for the seed.

    The noise is white with variance ``var(signal) / snr``, where ``var(signal)`` is the mean
    per-image variance of the first batch's noiseless images (one sigma for the dataset).
    ``effects`` with its per-particle ``draws`` (:mod:`cryosplat.simulate_effects`) add
    contrast, junk, a coloured background, the detector MTF and offsets, in that order.
    """
    g = torch.Generator().manual_seed(cfg.seed + 1)
    sigma = None
    fx = _EffectImages(effects, draws, cfg) if effects is not None and draws is not None else None
    for s in range(0, cfg.n_particles, cfg.batch_size):
        sl = slice(s, min(cfg.n_particles, s + cfg.batch_size))
        c = ctf[sl]
        matrices = geometry.image_matrices(rotations[sl], c.mag_matrix)
        clean = forward_images(project(volume, matrices), origin_A[sl], c, cfg.pixel_size_A)
        if sigma is None:
            sigma = float(clean.var(dim=(-2, -1)).mean().sqrt()) / math.sqrt(cfg.snr)
        if fx is None:
            noisy = clean + sigma * torch.randn(clean.shape, generator=g)
        else:
            noisy = fx.images(clean, sl, origin_A, c, sigma, g)
        if progress is not None:
            progress(len(noisy))
        yield noisy.numpy()


class _EffectImages:
    """The image side of :mod:`cryosplat.simulate_effects` for one simulation."""

    def __init__(self, effects: Effects, draws: ParticleEffects, cfg: SimulationConfig):
        self.effects, self.draws, self.cfg = effects, draws, cfg
        self.generator = torch.Generator().manual_seed(cfg.seed + 4)
        self.mtf = mtf(cfg.box_size, effects.mtf_nyquist) if effects.mtf_nyquist < 1 else None
        self.junk_volume = (junk_object(cfg.box_size, cfg.pixel_size_A, cfg.seed)
                            if bool((draws.junk == JUNK_OBJECT).any()) else None)

    def images(self, clean: torch.Tensor, sl: slice, origin_A: torch.Tensor, ctf: CTFParams,
               sigma: float, g: torch.Generator) -> torch.Tensor:
        """The batch ``sl``'s noiseless molecule images `(B, D, D)` made into recorded ones."""
        e, dr = self.effects, self.draws
        signal_var = clean.var(dim=(-2, -1)).mean()
        signal = clean * dr.contrast[sl].to(clean.dtype)[:, None, None]
        junk = dr.junk[sl]
        signal[junk == JUNK_NOISE] = 0
        rows = torch.nonzero(junk == JUNK_OBJECT)[:, 0]
        if len(rows) and self.junk_volume is not None:
            c = ctf[rows]
            m = geometry.image_matrices(dr.junk_rotations[sl][rows], c.mag_matrix)
            wrong = forward_images(project(self.junk_volume, m), origin_A[sl][rows], c,
                                   self.cfg.pixel_size_A)
            scale = (signal_var / wrong.var(dim=(-2, -1)).clamp_min(1e-30)).sqrt()
            signal[rows] = wrong * scale[:, None, None]
        noise = sigma * torch.randn(clean.shape, generator=g)
        b = e.background_fraction
        if b > 0:
            ice = coloured_noise(tuple(clean.shape), self.cfg.pixel_size_A, e.background_A,
                                 self.generator)
            noise = math.sqrt(1 - b) * noise + math.sqrt(b) * sigma * ice
        image = signal + noise
        if self.mtf is not None:
            image = apply_mtf(image, self.mtf)
        return image + sigma * dr.offset[sl].to(image.dtype)[:, None, None]


def simulate_dataset(structure: str | Path | None, out_dir: str | Path, cfg: SimulationConfig,
                     progress=None, effects: Effects | None = None) -> dict:
    """Write out_dir/particles.mrcs, particles.star (RELION 3.1, rlnRandomSubset) and
    ground_truth.mrc (the noiseless potential on the reconstruction grid). Streams: memory
    holds one batch of images, whatever the particle count. With ``effects`` on
    (:mod:`cryosplat.simulate_effects`), particles.star holds the consensus-like values and
    particles_true.star the exact ones (``"true_particles"`` in the result)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    structure = builtin_structure() if structure is None else Path(structure)
    centre = None
    if structure.suffix.lower() in (".mrc", ".map"):
        vol_np, voxel = read_volume(structure)
        if vol_np.shape[0] != cfg.box_size or abs(voxel - cfg.pixel_size_A) > 1e-3:
            raise InputError(structure, f"map is {vol_np.shape[0]} voxels of {voxel:g} Å; "
                                        f"expected --box {cfg.box_size} and --pixel-size "
                                        f"{cfg.pixel_size_A:g} to match it")
        volume = torch.from_numpy(vol_np).double()
    else:
        volume, centre = structure_to_map(structure, cfg.box_size, cfg.pixel_size_A,
                                          cfg.bfactor_A2)
    rotations, origin, ctf, half = draw_parameters(cfg)
    n, d = cfg.n_particles, cfg.box_size
    active = effects is not None and effects.active
    draws = draw_effects(effects, n, cfg.seed) if effects is not None and active else None
    write_stack(out_dir / "particles.mrcs",
                simulate_images(volume, cfg, rotations, origin, ctf, progress, effects, draws),
                n, d, cfg.pixel_size_A)
    optics = [OpticsGroup(1, "opticsGroup1", cfg.pixel_size_A, d, cfg.voltage_kV, cfg.cs_mm,
                          cfg.amplitude_contrast)]
    source = ImageSource([str(out_dir / "particles.mrcs")], np.zeros(n, dtype=np.int64),
                         np.arange(n), d, d)
    particles = Particles(source=str(out_dir / "particles.star"), images=source,
                          rotations=rotations, shifts_A=origin, ctf=ctf,
                          pixel_size_A=torch.full((n,), cfg.pixel_size_A, dtype=torch.float64),
                          optics_group=torch.ones(n, dtype=torch.int64), optics=optics,
                          half_set=half)
    names = [f"{i + 1:06d}@particles.mrcs" for i in range(n)]
    extra = {}
    if draws is not None:  # the exact values, then what a consensus refinement leaves
        truth = replace(particles, ctf=replace(ctf, scale=draws.contrast.clone()))
        tables = particles_to_star_tables(truth, names)
        tables["particles"]["rlnCryosplatJunk"] = draws.junk.numpy()
        write_star(out_dir / "particles_true.star", tables)
        extra["true_particles"] = str(out_dir / "particles_true.star")
        change = draws.defocus_error_A
        particles = replace(particles, rotations=draws.rotation_error @ rotations,
                            shifts_A=origin + draws.shift_error_A,
                            ctf=replace(ctf, defocus_u_A=ctf.defocus_u_A + change,
                                        defocus_v_A=ctf.defocus_v_A + change))
    write_star(out_dir / "particles.star", particles_to_star_tables(particles, names))
    write_volume(out_dir / "ground_truth.mrc", volume, cfg.pixel_size_A,
                 center_A=None if centre is None else (float(centre[0]), float(centre[1]),
                                                       float(centre[2])))
    return {"particles": str(out_dir / "particles.star"), "stack": str(out_dir / "particles.mrcs"),
            "ground_truth": str(out_dir / "ground_truth.mrc"), "structure": str(structure),
            **extra}
