"""The realistic effects of ``cryosplat simulate`` (simulate_effects.py): each one does what
docs/simulate.md says and nothing else, and with all of them off the simulation is the plain
one. Every test compares a simulation with its twin of the same seed without the effect."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from cryosplat import geometry
from cryosplat.io import read_particles
from cryosplat.simulate import SimulationConfig, simulate_dataset
from cryosplat.simulate_effects import (
    JUNK_NOISE,
    JUNK_OBJECT,
    Effects,
    coloured_noise,
    draw_effects,
)

N, BOX, PIX = 240, 24, 3.0


def _simulate(tmp_path, name: str, snr: float = 1e6, **effects) -> tuple[np.ndarray, dict]:
    cfg = SimulationConfig(n_particles=N, box_size=BOX, pixel_size_A=PIX, snr=snr, seed=4)
    out = simulate_dataset(None, tmp_path / name, cfg, effects=Effects(**effects))
    return mrcfile.read(out["stack"]).astype(np.float64), out


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return _simulate(tmp_path_factory.mktemp("plain"), "plain")[0]


def test_all_effects_off_is_the_plain_simulation(tmp_path, plain):
    images, out = _simulate(tmp_path, "off")
    np.testing.assert_array_equal(images, plain)
    assert "true_particles" not in out and not Effects().active


def test_the_mtf_multiplies_each_frequency_by_its_value(tmp_path, plain):
    """rfft(with MTF) / rfft(without) is ``m^((f/0.5)²)``: 0.5 at Nyquist for m = 0.5, 0.5^0.25
    at f = 0.25 (a transposed or shifted frequency grid gives other ratios)."""
    images, _ = _simulate(tmp_path, "mtf", mtf_nyquist=0.5)
    ratio = np.fft.rfft2(images) / np.fft.rfft2(plain)
    assert np.median(ratio[:, 0, BOX // 2].real) == pytest.approx(0.5, rel=1e-3)  # kx Nyquist
    assert np.median(ratio[:, BOX // 4, 0].real) == pytest.approx(0.5**0.25, rel=1e-3)
    assert np.median(ratio[:, 0, 0].real) == pytest.approx(1.0, rel=1e-4)


def test_contrast_scales_each_particle_by_the_true_stars_scale_factor(tmp_path, plain):
    images, out = _simulate(tmp_path, "contrast", contrast_sigma=0.2)
    true = starfile.read(out["true_particles"])["particles"]["rlnCtfScalefactor"].to_numpy()
    slope = (images * plain).sum((1, 2)) / (plain * plain).sum((1, 2))
    np.testing.assert_allclose(slope, true, rtol=1e-4)
    assert true.std() == pytest.approx(0.2, rel=0.25) and true.mean() == pytest.approx(1, abs=0.05)
    # the STAR the run reads says nothing of it
    assert (read_particles(out["particles"]).ctf.scale == 1).all()


def test_offsets_add_a_constant_to_each_image(tmp_path, plain):
    images, _ = _simulate(tmp_path, "offset", offset_sigma=0.5)
    diff = images - plain
    assert np.abs(diff - diff.mean((1, 2), keepdims=True)).max() < 1e-3 * np.abs(plain).max()
    assert diff.mean((1, 2)).std() > 0


def test_junk_rows_hold_noise_or_another_object_and_are_flagged(tmp_path, plain):
    images, out = _simulate(tmp_path, "junk", junk_fraction=0.2)
    flag = starfile.read(out["true_particles"])["particles"]["rlnCryosplatJunk"].to_numpy()
    assert (flag != 0).sum() == round(0.2 * N)
    assert {int(x) for x in flag} == {0, JUNK_NOISE, JUNK_OBJECT}
    good = flag == 0
    np.testing.assert_array_equal(images[good], plain[good])
    scale = np.abs(plain).max()
    assert np.abs(images[flag == JUNK_NOISE]).max() < 0.05 * scale  # near-noiseless: empty
    wrong = images[flag == JUNK_OBJECT].reshape(-1, BOX * BOX)
    ref = plain[flag == JUNK_OBJECT].reshape(-1, BOX * BOX)
    corr = [np.corrcoef(w, r)[0, 1] for w, r in zip(wrong, ref)]
    assert np.median(corr) < 0.5
    assert wrong.var(1).mean() == pytest.approx(ref.var(1).mean(), rel=0.5)


def test_the_background_keeps_the_noise_variance_and_moves_power_to_low_frequencies(tmp_path):
    """At SNR 1e-4 the images are noise: their variance is unchanged by a 50% background,
    and the power in the lowest shells rises while the outer shells' falls."""
    white, _ = _simulate(tmp_path, "white", snr=1e-4)
    ice, _ = _simulate(tmp_path, "ice", snr=1e-4, background_fraction=0.5, background_A=30.0)
    assert ice.var() == pytest.approx(white.var(), rel=0.05)
    p_white, p_ice = (np.abs(np.fft.rfft2(x)) ** 2 for x in (white, ice))
    assert p_ice[:, :2, :2].mean() > 3 * p_white[:, :2, :2].mean()
    assert p_ice[:, BOX // 2 - 2:BOX // 2 + 2, -3:].mean() < 0.7 * p_white[
        :, BOX // 2 - 2:BOX // 2 + 2, -3:].mean()


def test_coloured_noise_has_unit_variance_and_a_gaussian_spectrum():
    g = torch.Generator().manual_seed(0)
    x = coloured_noise((400, 32, 32), 2.0, 40.0, g).double()
    assert float(x.var()) == pytest.approx(1.0, rel=0.05)
    power = (torch.fft.rfft2(x).abs() ** 2).mean(0)
    fc = 2.0 / 40.0
    for k in (1, 2, 3):  # along kx: power ratio exp(-f²/fc²) between shell k and 0
        assert float(power[0, k] / power[0, 0]) == pytest.approx(np.exp(-(k / 32) ** 2 / fc**2),
                                                                 rel=0.25)


def test_consensus_errors_go_to_the_star_and_the_images_keep_the_exact_poses(tmp_path, plain):
    """The stack is the error-free one; particles.star differs from particles_true.star by
    rotations of median |N(0, 2°)| (0.674 x 2°), origins of std 1 Å per axis and defoci of std
    200 Å, U and V alike; the true STAR holds the simulation's own poses."""
    images, out = _simulate(tmp_path, "errors", angle_error_deg=2.0, shift_error_A=1.0,
                            defocus_error_A=200.0)
    np.testing.assert_array_equal(images, plain)
    seen, true = read_particles(out["particles"]), read_particles(out["true_particles"])
    angle = geometry.rotation_angle_deg(seen.rotations, true.rotations).numpy()
    assert np.median(angle) == pytest.approx(0.674 * 2.0, rel=0.2)
    shift = (seen.shifts_A - true.shifts_A).numpy()
    assert shift.std(0) == pytest.approx([1.0, 1.0], rel=0.2)
    du = (seen.ctf.defocus_u_A - true.ctf.defocus_u_A).numpy()
    dv = (seen.ctf.defocus_v_A - true.ctf.defocus_v_A).numpy()
    np.testing.assert_allclose(du, dv, atol=0.01)  # RELION's STAR rounding
    assert du.std() == pytest.approx(200.0, rel=0.2)
    plain_star = read_particles(simulate_dataset(
        None, tmp_path / "plain_star", SimulationConfig(n_particles=N, box_size=BOX,
                                                        pixel_size_A=PIX, snr=1e6, seed=4)
    )["particles"])
    torch.testing.assert_close(true.rotations, plain_star.rotations, atol=1e-5, rtol=0)


def test_the_draws_are_seeded_and_refuse_impossible_values():
    a, b = (draw_effects(Effects(contrast_sigma=0.1, junk_fraction=0.1), 50, 7) for _ in (1, 2))
    assert torch.equal(a.contrast, b.contrast) and torch.equal(a.junk, b.junk)
    from cryosplat.errors import InputError

    for bad in ({"mtf_nyquist": 0.0}, {"background_fraction": 1.0}, {"junk_fraction": -0.1},
                {"angle_error_deg": -1.0}):
        with pytest.raises(InputError, match="out of range"):
            Effects(**bad).check()
