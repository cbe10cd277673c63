"""Point-group symmetry (symmetry.py): RELION's groups and axes, the symmetrised Fourier
sums of direct inversion, the Gaussian model's copies, and maps against relion_reconstruct
--sym where RELION is installed."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from cryosplat.backproject import invert
from cryosplat.errors import InputError
from cryosplat.evaluate import fsc
from cryosplat.fourier_slice import Insertion
from cryosplat.gaussians import GaussianMixture
from cryosplat.symmetry import rotation_about, symmetry_matrices

GROUPS = {"C1": 1, "C2": 2, "C7": 7, "D2": 4, "D7": 14, "T": 12, "O": 24, "I": 60, "I1": 60,
          "I2": 60, "I3": 60, "I4": 60}


@pytest.mark.parametrize("symbol", GROUPS)
def test_each_group_is_a_group_of_rotations_of_its_order(symbol):
    m = symmetry_matrices(symbol)
    assert len(m) == GROUPS[symbol] and torch.equal(m[0], torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(m @ m.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand_as(m))
    torch.testing.assert_close(torch.linalg.det(m), torch.ones(len(m), dtype=torch.float64))
    products = (m[:, None] @ m[None]).reshape(-1, 1, 3, 3)
    assert ((products - m[None]).abs().amax((-1, -2)).amin(-1) < 1e-9).all()  # closed


def test_the_axes_are_relions():
    """Cn about z (x turns towards y), Dn's 2-fold along x, O's 4-folds along x, y, z, I2's
    2-folds along x, y, z: fails if an axis is swapped or a rotation runs the other way
    (as a set, a group holds each rotation and its inverse, so the 4-fold's 90° is checked
    by the matrix that maps x to y)."""
    c4 = symmetry_matrices("C4")
    assert any(torch.allclose(s @ torch.tensor([1.0, 0, 0], dtype=torch.float64),
                              torch.tensor([0.0, 1, 0], dtype=torch.float64)) for s in c4)
    assert all(torch.allclose(s[2], torch.tensor([0.0, 0, 1], dtype=torch.float64)) for s in c4)
    d5 = symmetry_matrices("D5")
    two_x = torch.diag(torch.tensor([1.0, -1, -1], dtype=torch.float64))
    assert any(torch.allclose(s, two_x) for s in d5)
    for symbol, angle in (("O", 90.0), ("I", 180.0)):
        g = symmetry_matrices(symbol)
        for axis in ((1, 0, 0), (0, 1, 0), (0, 0, 1)):
            assert any(torch.allclose(s, rotation_about(axis, angle)) for s in g), (symbol, axis)


def test_unknown_groups_are_refused_naming_the_option():
    for bad in ("C0", "D1", "X3", "I5", "D"):
        with pytest.raises(InputError, match="--sym"):
            symmetry_matrices(bad)


RELION_REFINE = shutil.which("relion_refine")


@pytest.mark.skipif(not RELION_REFINE, reason="RELION (relion_refine) not installed")
@pytest.mark.parametrize("symbol", [g for g in GROUPS if g != "C1"])
def test_matrices_are_those_relion_prints(symbol):
    out = subprocess.run([RELION_REFINE, "--print_symmetry_ops", "--sym", symbol],
                         capture_output=True, text=True).stdout
    lines = out.splitlines()
    relion = np.array([[[float(x) for x in lines[i + k].split()] for k in (1, 2, 3)]
                       for i, line in enumerate(lines) if re.match(r"\s*R\(\d+\)=", line)])
    ours = symmetry_matrices(symbol).numpy()
    assert len(relion) == len(ours)
    # RELION prints 5 decimals; each of its matrices is one of ours
    distance = np.abs(relion[:, None] - ours[None]).max(axis=(-1, -2))
    assert (distance.min(axis=1) < 2e-4).all() and len(set(distance.argmin(axis=1))) == len(ours)


def _mixture(seed: int = 0, n: int = 5) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    return GaussianMixture((torch.rand(n, 3, generator=g) - 0.5) * 24, torch.full((n, 3), 3.0),
                           torch.randn(n, 4, generator=g), torch.rand(n, generator=g) + 0.5)


def _insertion(volume: torch.Tensor) -> Insertion:
    """The padded, fftshifted sums of a map ``volume`` seen from every direction once."""
    d = volume.shape[-1]
    p = 2 * d
    pad = torch.zeros(p, p, p)
    o = p // 2 - d // 2
    pad[o:o + d, o:o + d, o:o + d] = volume
    f = torch.fft.fftshift(torch.fft.rfftn(torch.fft.ifftshift(pad)), dim=(0, 1))
    return Insertion(f.to(torch.complex64), torch.ones(f.shape), d, p)


@pytest.mark.parametrize("symbol", ["C2", "D3", "O", "I"])
def test_symmetrised_sums_give_the_average_of_the_symmetry_copies(symbol):
    """sum_S A(S k) inverted is the mean of the map's copies V(S r), which the mixture's own
    copies (S mu, S Sigma S^T) give exactly: the two agree but for interpolation."""
    s = symmetry_matrices(symbol)
    m = _mixture()
    with torch.no_grad():
        average = m.voxelise(32, 2.0, s.float()) / len(s)
        symmetric = invert(_insertion(m.voxelise(32, 2.0)).symmetrise(s), 0.0)
    expected = invert(_insertion(average), 0.0)
    assert float((symmetric - expected).norm() / expected.norm()) < 0.03
    assert float(fsc(symmetric, expected)[:12].min()) > 0.995
    with torch.no_grad():  # and it is not the unsymmetrised map
        plain = invert(_insertion(m.voxelise(32, 2.0)), 0.0)
    assert float((plain - expected).norm() / expected.norm()) > 0.5


def test_the_expanded_mixture_is_the_symmetric_map():
    s = symmetry_matrices("D3").float()
    m = _mixture(1)
    with torch.no_grad():
        a = m.voxelise(32, 2.0, s)
        b = m.expanded(s).voxelise(32, 2.0)
    assert len(m.expanded(s)) == 6 * len(m)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 * float(a.max()))


RELION_RECONSTRUCT = shutil.which("relion_reconstruct")


@pytest.mark.skipif(not RELION_RECONSTRUCT, reason="RELION (relion_reconstruct) not installed")
def test_backproject_sym_d3_matches_relion_reconstruct_sym_d3(tmp_path):
    """Particles of a D3 assembly of 4AKE: cryosplat backproject --sym D3 and
    relion_reconstruct --sym D3 give the same map (FSC > 0.95 to 0.8 of Nyquist), and a far
    better one against the truth than without symmetry."""
    from test_reliability import cli

    from cryosplat.io import read_volume
    from cryosplat.simulate import builtin_structure, symmetric_assembly

    pdb = symmetric_assembly(builtin_structure(), tmp_path / "d3.pdb", symmetry_matrices("D3"),
                             (24.0, 10.0, 14.0))
    sim = tmp_path / "sim"
    r = cli("simulate", pdb, "--out", sim, "--particles", 600, "--box", 64, "--pixel-size", 2.2,
            "--snr", 0.1, "--seed", 3)
    assert r.returncode == 0, r.stderr
    for sym in ("D3", "C1"):
        r = cli("backproject", sim / "particles.star", "--out", tmp_path / sym, "--sym", sym)
        assert r.returncode == 0, r.stderr
    r = subprocess.run([RELION_RECONSTRUCT, "--i", "particles.star", "--o", str(tmp_path / "rel.mrc"),
                        "--ctf", "--sym", "D3", "--angpix", "2.2"], cwd=sim, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    ours, relion, plain, truth = (torch.from_numpy(read_volume(f)[0]) for f in (
        tmp_path / "D3" / "map.mrc", tmp_path / "rel.mrc", tmp_path / "C1" / "map.mrc",
        sim / "ground_truth.mrc"))
    assert float(fsc(ours, relion)[1:26].min()) > 0.95
    assert fsc(ours, truth)[1:26].mean() > fsc(plain, truth)[1:26].mean() + 0.05


def test_cli_reconstruct_sym_fits_one_asymmetric_unit(tmp_path):
    """--sym C2: the mixture saved (.pt) is one asymmetric unit, the exports (.ply) hold both
    copies, the summary says the group; --objective images refuses a symmetry."""
    from test_reliability import cli

    from cryosplat.simulate import builtin_structure, symmetric_assembly

    pdb = symmetric_assembly(builtin_structure(), tmp_path / "c2.pdb", symmetry_matrices("C2"),
                             (14.0, 6.0, 4.0))
    sim = tmp_path / "sim"
    r = cli("simulate", pdb, "--out", sim, "--particles", 200, "--box", 32, "--pixel-size", 3.5,
            "--snr", 1.0)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "rec"
    r = cli("reconstruct", sim / "particles.star", "--out", out, "--sym", "c2", "--max-steps", 5,
            "--no-validate", "--no-postprocess")
    assert r.returncode == 0, r.stderr
    import json

    s = json.loads((out / "summary.json").read_text())
    unit = torch.load(out / "gaussians_half_1.pt", weights_only=True)["means_A"]
    assert s["symmetry"] == "C2" and s["gaussians"][0] == len(unit)
    header = (out / "gaussians_half_1.ply").read_bytes()[:400].decode("ascii", "replace")
    assert f"element vertex {2 * len(unit)}" in header
    r = cli("reconstruct", sim / "particles.star", "--out", tmp_path / "img", "--sym", "C2",
            "--objective", "images")
    assert r.returncode == 2 and "--sym C2" in r.stderr and not (tmp_path / "img").exists()


def test_symmetric_fits_keep_the_half_sets_apart():
    """--sym C2 with the volume objective: half-set 1's asymmetric unit is bit for bit the same
    when half-set 2's sums change."""
    from cryosplat.train import TrainConfig
    from cryosplat.train.volume import fit_gold_standard_volume, make_fits

    cfg = TrainConfig(symmetry="C2", init="random", n_gaussians=30, max_steps=6, eval_every=1000,
                      checkpoint_every=1000)
    s = symmetry_matrices("C2").float()

    def sums(seed: int):
        with torch.no_grad():
            v = _mixture(seed).voxelise(32, 2.0, s)
        return [(_insertion(v).symmetrise(s), None)]

    def fit(half_2_seed: int):
        fits = make_fits(sums(0) + sums(half_2_seed), cfg, 2.0, torch.device("cpu"),
                         log=lambda m: None)
        fit_gold_standard_volume(fits, cfg, log=lambda m: None)
        return fits

    a, b = fit(1), fit(2)
    for name, x in a[0].model.state_dict().items():
        assert torch.equal(x, b[0].model.state_dict()[name]), name
    assert not torch.equal(a[1].model.means_A, b[1].model.means_A)
    assert len(a[0].model) == 30  # one asymmetric unit; its map holds 2 copies
