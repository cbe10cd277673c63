"""Reading particles from RELION, cryoSPARC and cryoDRGN files."""

from __future__ import annotations

import os
import pickle

import mrcfile
import numpy as np
import pytest
import starfile
import torch
from conftest import (
    make_truth,
    random_images,
    write_cryodrgn,
    write_cs,
    write_stack,
    write_star30,
    write_star31,
)

from cryosplat.errors import InputError
from cryosplat.io import read_particles, write_particles
from cryosplat.io.cryodrgn import load_arrays_pkl


def assert_matches_truth(p, t, rot_atol=1e-5, shift_atol=1e-4):
    np.testing.assert_allclose(p.rotations.numpy(), t.matrices, atol=rot_atol)
    np.testing.assert_allclose(p.shifts_A.numpy(), t.origin_A, atol=shift_atol)
    np.testing.assert_allclose(p.pixel_size_A.numpy(), t.pixel_A, rtol=1e-6)
    c = p.ctf
    np.testing.assert_allclose(c.defocus_u_A.numpy(), t.df_u, rtol=1e-6)
    np.testing.assert_allclose(c.defocus_v_A.numpy(), t.df_v, rtol=1e-6)
    np.testing.assert_allclose(c.defocus_angle_deg.numpy(), t.df_angle, atol=1e-4)
    np.testing.assert_allclose(c.voltage_kV.numpy(), t.voltage_kV)
    np.testing.assert_allclose(c.cs_mm.numpy(), t.cs_mm, rtol=1e-6)
    np.testing.assert_allclose(c.amplitude_contrast.numpy(), t.q0, rtol=1e-6)
    np.testing.assert_allclose(c.phase_shift_deg.numpy(), t.phase_shift, atol=1e-4)


def test_star31_two_optics_groups_of_different_pixel_size_and_voltage(tmp_path):
    t = make_truth(n=10, two_groups=True)
    p = read_particles(write_star31(tmp_path, t))
    assert len(p) == 10 and p.box_size == t.box
    assert [(o.number, o.pixel_size_A, o.voltage_kV) for o in p.optics] == [(1, 1.2, 300.0),
                                                                              (2, 1.5, 200.0)]
    np.testing.assert_array_equal(p.optics_group.numpy(), np.where(np.arange(10) >= 5, 2, 1))
    assert_matches_truth(p, t)
    np.testing.assert_allclose(p.ctf.bfactor_A2.numpy(), t.bfactor, atol=1e-5)
    np.testing.assert_array_equal(p.half_set.numpy(), t.half)


def test_star30_origin_in_pixels_and_detector_pixel_size(tmp_path):
    t = make_truth(n=8, two_groups=True)
    p = read_particles(write_star30(tmp_path, t))
    assert_matches_truth(p, t)
    assert sorted(o.pixel_size_A for o in p.optics) == [1.2, 1.5]
    assert (p.half_set == 0).all() and "rlnRandomSubset" in p.defaults


def test_cs_with_project_relative_paths(tmp_path):
    t = make_truth(n=8, two_groups=True)
    cs = write_cs(tmp_path, t)
    p = read_particles(cs)  # '>J7/...' is found relative to the .cs file's parent (project)
    assert_matches_truth(p, t)
    np.testing.assert_array_equal(p.half_set.numpy(), t.half)
    images = p.read_images(np.arange(8))
    np.testing.assert_array_equal(images.numpy(), random_images(t))
    # and with an explicit --datadir
    assert read_particles(cs, datadir=tmp_path).images.files == p.images.files


def test_same_particles_from_star_cs_and_cryodrgn(tmp_path):
    t = make_truth(n=9, two_groups=False)
    images = random_images(t)
    star = read_particles(write_star31(tmp_path / "r", t, images))
    cs = read_particles(write_cs(tmp_path / "c", t, images))
    drgn = read_particles(write_cryodrgn(tmp_path / "d", t, images)[0],
                          poses=tmp_path / "d" / "poses.pkl", ctf=tmp_path / "d" / "ctf.pkl")
    for other in (cs, drgn):
        np.testing.assert_allclose(other.rotations.numpy(), star.rotations.numpy(), atol=2e-6)
        np.testing.assert_allclose(other.shifts_A.numpy(), star.shifts_A.numpy(), atol=2e-5)
        for k, v in star.ctf.as_dict().items():
            if v is None:  # no higher-order optics in any of the three files
                assert getattr(other.ctf, k) is None, k
            elif k != "bfactor_A2":  # cryoDRGN's ctf.pkl has no B-factor
                np.testing.assert_allclose(getattr(other.ctf, k).numpy(), v.numpy(), rtol=1e-5,
                                           atol=1e-4, err_msg=k)
        np.testing.assert_array_equal(other.read_images([0, 4, 8]).numpy(),
                                      star.read_images([0, 4, 8]).numpy())


def test_missing_optional_columns_take_documented_defaults(tmp_path):
    t = make_truth(n=6, two_groups=False)
    drop = ("rlnPhaseShift", "rlnCtfBfactor", "rlnRandomSubset", "rlnOriginXAngst",
            "rlnOriginYAngst", "rlnDefocusV", "rlnDefocusAngle")
    p = read_particles(write_star31(tmp_path, t, drop=drop))
    c = p.ctf
    assert torch.equal(c.phase_shift_deg, torch.zeros(6, dtype=torch.float64))
    assert torch.equal(c.bfactor_A2, torch.zeros(6, dtype=torch.float64))
    assert torch.equal(c.scale, torch.ones(6, dtype=torch.float64))
    assert torch.equal(c.defocus_v_A, c.defocus_u_A)
    assert torch.equal(p.shifts_A, torch.zeros(6, 2, dtype=torch.float64))
    assert (p.half_set == 0).all()
    for name, field in c.as_dict().items():
        if name in ("beam_tilt_mrad", "odd_zernike", "even_zernike", "mag_matrix",
                    "premultiplied"):
            assert field is None, name  # no higher-order optics where the file has none
        else:
            assert torch.isfinite(field).all()
    assert {"rlnPhaseShift", "rlnCtfBfactor", "rlnCtfScalefactor", "rlnRandomSubset",
            "rlnOriginXAngst/YAngst"} <= set(p.defaults)


def test_nan_in_a_column_is_refused_with_row_and_column(tmp_path):
    t = make_truth(n=5, two_groups=False)
    t.phase_shift[3] = np.nan
    with pytest.raises(InputError, match=r"rlnPhaseShift row 4 .*finite"):
        read_particles(write_star31(tmp_path, t))


def test_reading_metadata_does_not_touch_images(tmp_path):
    t = make_truth(n=5, two_groups=False)
    star = write_star31(tmp_path, t)
    os.remove(tmp_path / "Extract" / "stack.mrcs")
    p = read_particles(star)  # 3.1 gives the box in data_optics: no image needed
    assert len(p) == 5
    with pytest.raises(InputError, match="image file not found"):
        p.read_images([0])


def test_index_beyond_stack_is_named(tmp_path):
    t = make_truth(n=5, two_groups=False)
    star = write_star31(tmp_path, t)
    write_stack(tmp_path / "Extract" / "stack.mrcs", random_images(t)[:3])
    p = read_particles(star)
    with pytest.raises(InputError, match=r"index 5 \(1-based\) is beyond the stack, which holds 3"):
        p.images.check()


def test_relative_paths_from_datadir(tmp_path):
    t = make_truth(n=4, two_groups=False)
    star = write_star31(tmp_path / "proj", t)
    moved = tmp_path / "elsewhere" / "particles.star"
    moved.parent.mkdir()
    star.rename(moved)
    p = read_particles(moved, datadir=tmp_path / "proj")
    assert p.images.files[0] == str(tmp_path / "proj" / "Extract" / "stack.mrcs")
    assert p.read_images([1]).shape == (1, t.box, t.box)


def test_max_particles_and_subset(tmp_path):
    t = make_truth(n=10, two_groups=True)
    p = read_particles(write_star31(tmp_path, t), max_particles=4)
    assert len(p) == 4
    np.testing.assert_allclose(p.shifts_A.numpy(), t.origin_A[:4])
    q = p.subset(np.array([3, 1]))
    np.testing.assert_array_equal(q.read_images([0, 1]).numpy(), random_images(t)[[3, 1]])


def test_downsample_updates_pixel_size_and_keeps_the_centre(tmp_path):
    t = make_truth(n=2, box=64, two_groups=False)
    yy, xx = np.mgrid[:64, :64] - 32  # FFT-aligned: centre at D//2
    blob = np.exp(-(xx**2 + yy**2) / (2 * 3.0**2)).astype(np.float32)
    shifted = np.exp(-((xx - 8) ** 2 + (yy + 4) ** 2) / (2 * 3.0**2)).astype(np.float32)
    star = write_star31(tmp_path, t, images=np.stack([blob, shifted]))
    p = read_particles(star, box_size=32)
    assert p.box_size == 32
    np.testing.assert_allclose(p.pixel_size_A.numpy(), t.pixel_A * 2)
    img = p.read_images([0, 1]).numpy()
    assert np.unravel_index(img[0].argmax(), img[0].shape) == (16, 16)
    assert np.unravel_index(img[1].argmax(), img[1].shape) == (14, 20)
    assert img[0].mean() == pytest.approx(blob.mean(), rel=1e-4)


def test_write_then_read_round_trip(tmp_path):
    t = make_truth(n=7, two_groups=False)
    p = read_particles(write_star31(tmp_path / "in", t))
    write_particles(tmp_path / "out", p)
    q = read_particles(tmp_path / "out" / "particles.star")
    assert_matches_truth(q, t)
    np.testing.assert_array_equal(q.half_set.numpy(), t.half)
    np.testing.assert_array_equal(q.read_images(np.arange(7)).numpy(), random_images(t))
    with mrcfile.open(tmp_path / "out" / "particles.mrcs") as m:
        assert m.voxel_size.x == pytest.approx(1.2)


def test_malicious_pkl_is_refused_without_running_its_payload(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "poses.pkl"
    bad.write_bytes(pickle.dumps((np.eye(3)[None], Payload())))
    with pytest.raises(InputError, match="refused to load"):
        load_arrays_pkl(bad)
    assert not marker.exists()


def test_pkl_of_non_arrays_is_refused(tmp_path):
    f = tmp_path / "ctf.pkl"
    f.write_bytes(pickle.dumps(({"a": 1},)))  # dicts are built by opcodes, no import needed
    with pytest.raises(InputError, match="expected numeric numpy arrays"):
        load_arrays_pkl(f)


def test_unknown_optics_group_is_refused(tmp_path):
    t = make_truth(n=4, two_groups=False)
    star = write_star31(tmp_path, t)
    blocks = starfile.read(star, always_dict=True)
    blocks["particles"].loc[2, "rlnOpticsGroup"] = 7
    starfile.write(blocks, star)
    with pytest.raises(InputError, match=r"rlnOpticsGroup row 3 is 7, which data_optics does not"):
        read_particles(star)


@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<i2", ">i2", "<f2", "|i1", "<u2"])
def test_positioned_reads_match_mrcfile_for_every_mode_and_byte_order(tmp_path, dtype):
    from cryosplat.io.mrc import ImageSource

    rng = np.random.default_rng(0)
    stack = (rng.normal(size=(9, 6, 6)) * 20).astype(dtype)
    if dtype == "<u2":
        stack = np.abs(stack.astype(np.float32)).astype(dtype)
    path = tmp_path / "s.mrcs"
    with mrcfile.new(path) as m:
        m.set_data(stack)
        m.set_extended_header(np.zeros(32, dtype=np.uint8))  # data start after 1024 + 32 bytes
    src = ImageSource([str(path)], np.zeros(5, int), np.array([7, 2, 3, 3, 0]), 6, 6)
    got = src.read(np.arange(5))
    ref = mrcfile.read(path).astype(np.float32)
    np.testing.assert_array_equal(got, ref[[7, 2, 3, 3, 0]])
