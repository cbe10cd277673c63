"""Real metadata files of cryoDRGN's and ASPIRE's public test data (tests/data/README.md): each
is read by cryosplat and checked against the file's own numbers, read here independently
(starfile for STAR, numpy for .cs)."""

import json
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from cryosplat import diagnostics, geometry
from cryosplat.errors import InputError
from cryosplat.io import assign_half_sets, read_particles

DATA = Path(__file__).parent / "data"


def tables(name: str) -> dict:
    return starfile.read(DATA / name, always_dict=True)


def coefficient_list(text: str) -> list[float]:
    return [float(x) for x in str(text).strip("[]").split(",")]


def fake_stack(path: Path, n: int, box: int = 8) -> None:
    """A stand-in stack for files whose box comes from the stack header (not shipped)."""
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.zeros((n, box, box), dtype=np.float32))
        m.set_image_stack()


def assert_star_particles(p, particles) -> None:
    """Angles, origins and defoci of a RELION table, as the file has them."""
    euler = particles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(np.float64)
    np.testing.assert_allclose(p.rotations.numpy(),
                               geometry.euler_relion_to_matrix(torch.from_numpy(euler)).numpy(),
                               atol=1e-12)
    if "rlnOriginXAngst" in particles:
        np.testing.assert_allclose(p.shifts_A.numpy(),
                                   particles[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy())
    np.testing.assert_allclose(p.ctf.defocus_u_A.numpy(), particles["rlnDefocusU"].to_numpy())
    np.testing.assert_allclose(p.ctf.defocus_v_A.numpy(), particles["rlnDefocusV"].to_numpy())
    np.testing.assert_allclose(p.ctf.defocus_angle_deg.numpy(),
                               particles["rlnDefocusAngle"].to_numpy())


def test_relion31_one_group_and_its_empty_half_set():
    t = tables("relion31.star")
    p = read_particles(DATA / "relion31.star")
    o = t["optics"].iloc[0]
    assert len(p) == 5 and p.box_size == int(o["rlnImageSize"])
    assert p.optics[0].pixel_size_A == pytest.approx(o["rlnImagePixelSize"])
    np.testing.assert_allclose(p.ctf.cs_mm.numpy(), o["rlnSphericalAberration"])
    np.testing.assert_allclose(p.ctf.voltage_kV.numpy(), o["rlnVoltage"])
    np.testing.assert_allclose(p.ctf.amplitude_contrast.numpy(), o["rlnAmplitudeContrast"])
    assert_star_particles(p, t["particles"])
    assert (t["particles"]["rlnRandomSubset"] == 1).all()
    with pytest.raises(InputError, match="none in half-set 2"):
        assign_half_sets(p, seed=0)
    fails = [c for c in diagnostics.validation_checks(p) if c["status"] == "fail"]
    assert any(c["check"] == "half-sets" for c in fails)


def test_relion31_six_optics_groups_with_ctfrefine_optics():
    t = tables("relion31.6opticsgroups.star")
    p = read_particles(DATA / "relion31.6opticsgroups.star")
    optics, particles = t["optics"], t["particles"]
    assert len(p) == len(particles) and len(p.optics) == 6
    assert_star_particles(p, particles)
    rows = {int(r["rlnOpticsGroup"]): r for _, r in optics.iterrows()}
    for i in range(len(p)):
        r = rows[int(particles["rlnOpticsGroup"].iloc[i])]
        assert float(p.pixel_size_A[i]) == pytest.approx(r["rlnImagePixelSize"])
        np.testing.assert_allclose(p.ctf.beam_tilt_mrad[i].numpy(),
                                   [r["rlnBeamTiltX"], r["rlnBeamTiltY"]])
        np.testing.assert_allclose(p.ctf.odd_zernike[i].numpy(),
                                   coefficient_list(r["rlnOddZernike"]))
        np.testing.assert_allclose(p.ctf.even_zernike[i].numpy(),
                                   coefficient_list(r["rlnEvenZernike"]))
        np.testing.assert_allclose(p.ctf.mag_matrix[i].numpy().reshape(-1),
                                   [r["rlnMagMat00"], r["rlnMagMat01"], r["rlnMagMat10"],
                                    r["rlnMagMat11"]])
        assert float(p.ctf.cs_mm[i]) == pytest.approx(r["rlnSphericalAberration"])
    # 1.24 and 1.25 Å: reconstructed together at 1.24 Å in the box of 196 px of 1.25 Å
    assert sorted({o.pixel_size_A for o in p.optics}) == [1.24, 1.25]
    assert p.common_grid() == (1.24, round(196 * 1.25 / 1.24))
    s = diagnostics.summarise(p)
    assert s["reconstruction_grid"] == {"pixel_size_A": 1.24, "box_size": 198, "rescaled": True}
    r = p.rescaled()
    assert {o.pixel_size_A for o in r.optics} == {1.24} and r.box_size == 198
    g125 = np.array(particles["rlnOpticsGroup"].map(lambda g: rows[g]["rlnImagePixelSize"]) == 1.25)
    ratio = 1.24 * 198 / (196 * 1.25)  # the rounding, carried as a magnification
    np.testing.assert_allclose(r.ctf.mag_matrix[g125].numpy(), ratio * p.ctf.mag_matrix[g125].numpy())
    np.testing.assert_allclose(r.shifts_A[g125].numpy(), ratio * p.shifts_A[g125].numpy())
    np.testing.assert_allclose(r.ctf.mag_matrix[~g125].numpy(), p.ctf.mag_matrix[~g125].numpy())


def test_relion5_premultiplied_flag_beam_tilt_zernike_and_magnification():
    t = tables("relion5.star")
    p = read_particles(DATA / "relion5.star")
    o = t["optics"].iloc[0]
    assert p.box_size == 448 and p.optics[0].pixel_size_A == pytest.approx(0.89)
    assert_star_particles(p, t["particles"])
    assert (p.ctf.premultiplied == 0).all()
    np.testing.assert_allclose(p.ctf.beam_tilt_mrad.numpy(), [[0.043489, 0.014097]] * len(p))
    np.testing.assert_allclose(p.ctf.odd_zernike[0].numpy(), coefficient_list(o["rlnOddZernike"]))
    np.testing.assert_allclose(p.ctf.even_zernike[0].numpy(), coefficient_list(o["rlnEvenZernike"]))
    np.testing.assert_allclose(p.ctf.mag_matrix[0].numpy(),
                               [[o["rlnMagMat00"], o["rlnMagMat01"]],
                                [o["rlnMagMat10"], o["rlnMagMat11"]]])
    assert o["rlnMagMat00"] == pytest.approx(1.0018, abs=1e-4)
    assert set(p.ctf.aberrations()) == {"anisotropic magnification", "beam tilt", "odd Zernike",
                                        "even Zernike"}
    assert {"rlnCtfDataAreCtfPremultiplied", "rlnBeamTiltX", "rlnOddZernike", "rlnEvenZernike",
            "rlnMagMat00"} <= set(p.image_model)


def test_a_premultiplied_group_is_flagged_per_particle(tmp_path):
    t = tables("relion5.star")
    t["optics"]["rlnCtfDataAreCtfPremultiplied"] = 1
    starfile.write(t, tmp_path / "pre.star")
    p = read_particles(tmp_path / "pre.star")
    assert (p.ctf.premultiplied == 1).all()
    t["optics"]["rlnImageDimensionality"] = 3
    starfile.write(t, tmp_path / "tomo.star")
    with pytest.raises(InputError, match="3D subtomograms"):
        read_particles(tmp_path / "tomo.star")


def test_empiar_10076_star_and_cs_give_the_same_particles(tmp_path):
    t = tables("empiar_10076_7.star")
    particles = next(iter(t.values()))
    with pytest.raises(InputError, match="pass --datadir"):
        read_particles(DATA / "empiar_10076_7.star")  # box from a stack that is not shipped
    fake_stack(tmp_path / "empiar_10076_7.mrc", 7)
    star = read_particles(DATA / "empiar_10076_7.star", datadir=tmp_path)
    cs_data = np.load(DATA / "empiar_10076_7.cs")
    cs = read_particles(DATA / "empiar_10076_7.cs", datadir=tmp_path)
    assert star.rotations is None  # the file has no angles
    pix = particles["rlnDetectorPixelSize"].to_numpy() * 1e4 / particles["rlnMagnification"].to_numpy()
    np.testing.assert_allclose(star.pixel_size_A.numpy(), pix)
    np.testing.assert_allclose(cs.pixel_size_A.numpy(), cs_data["blob/psize_A"])
    np.testing.assert_allclose(star.pixel_size_A.numpy(), cs.pixel_size_A.numpy(), rtol=1e-5)
    np.testing.assert_allclose(star.ctf.defocus_u_A.numpy(), particles["rlnDefocusU"].to_numpy())
    np.testing.assert_allclose(cs.ctf.defocus_u_A.numpy(), cs_data["ctf/df1_A"])
    np.testing.assert_allclose(cs.ctf.defocus_u_A.numpy(), star.ctf.defocus_u_A.numpy(), rtol=1e-6)
    np.testing.assert_allclose(cs.ctf.defocus_angle_deg.numpy(),
                               np.rad2deg(cs_data["ctf/df_angle_rad"]), rtol=1e-6)
    np.testing.assert_allclose(star.ctf.amplitude_contrast.numpy(), 0.07)
    # blob/sign -1 (dark particles: measured on the 7 images of cryoDRGN's test data, whose
    # low-passed centres are darker than their edges): negated on read
    assert (cs_data["blob/sign"] == -1).all() and cs.invert and not star.invert
    # zero tilt, trefoil, tetrafoil and anisomag: nothing to model
    assert cs.ctf.beam_tilt_mrad is None and cs.ctf.aberrations() == []
    assert "ctf/anisomag" in cs.image_model


def test_cryosparc_refinement_output():
    data = np.load(DATA / "cryosparc_P12_J24_001_particles.cs")
    p = read_particles(DATA / "cryosparc_P12_J24_001_particles.cs")
    assert len(p) == len(data) == 2019 and p.box_size == int(data["blob/shape"][0, 0]) == 180
    np.testing.assert_allclose(p.pixel_size_A.numpy(), data["blob/psize_A"])
    np.testing.assert_allclose(p.rotations.numpy(), geometry.cryosparc_pose_to_matrix(
        torch.from_numpy(data["alignments3D/pose"].astype(np.float64))).numpy())
    np.testing.assert_allclose(p.shifts_A.numpy(),
                               data["alignments3D/shift"] * data["blob/psize_A"][:, None],
                               rtol=1e-6)
    np.testing.assert_allclose(p.ctf.defocus_v_A.numpy(), data["ctf/df2_A"])
    np.testing.assert_array_equal(p.half_set.numpy(), data["alignments3D/split"] + 1)
    assert p.invert  # blob/sign -1
    assert len(p.images.files) == len(np.unique(data["blob/path"]))


def test_cryosparc_aberrations_without_a_verified_mapping_are_refused(tmp_path):
    data = np.load(DATA / "empiar_10076_7.cs")
    data["ctf/anisomag"][2] = [0.01, 0.0, 0.0, -0.01]
    np.save(tmp_path / "aniso.npy", data)
    (tmp_path / "aniso.npy").rename(tmp_path / "aniso.cs")
    with pytest.raises(InputError, match="ctf/anisomag row 3"):
        read_particles(tmp_path / "aniso.cs")
    data = np.load(DATA / "empiar_10076_7.cs")
    data["ctf/tilt_A"][:] = [2.7e7 * np.sin(1e-3), 0.0]  # 1 mrad at Cs 2.7 mm (pyem's mapping)
    np.save(tmp_path / "tilt.npy", data)
    (tmp_path / "tilt.npy").rename(tmp_path / "tilt.cs")
    p = read_particles(tmp_path / "tilt.cs")
    np.testing.assert_allclose(p.ctf.beam_tilt_mrad.numpy(), [[1.0, 0.0]] * 7, rtol=1e-6)


def test_aspire_relion31_without_image_size_reads_the_box_from_the_stack(tmp_path):
    t = tables("sample_particles_relion31.star")
    with pytest.raises(InputError, match="lacks rlnImageSize.*pass --datadir"):
        read_particles(DATA / "sample_particles_relion31.star")
    fake_stack(tmp_path / "sample.mrcs", 17, box=12)
    p = read_particles(DATA / "sample_particles_relion31.star", datadir=tmp_path)
    assert p.box_size == 12 and [o.number for o in p.optics] == [1, 2]
    assert_star_particles(p, t["particles"])
    np.testing.assert_array_equal(p.optics_group.numpy(), t["particles"]["rlnOpticsGroup"])
    assert p.image_model["rlnMtfFileName"].startswith("not modelled")
    assert any("rlnImageSize" in k for k in p.defaults)


def test_aspire_relion30_per_particle_voltages(tmp_path):
    t = tables("sample_particles_relion30.star")
    particles = next(iter(t.values()))
    fake_stack(tmp_path / "sample.mrcs", 17, box=12)
    p = read_particles(DATA / "sample_particles_relion30.star", datadir=tmp_path)
    np.testing.assert_allclose(p.ctf.voltage_kV.numpy(), particles["rlnVoltage"].to_numpy())
    assert sorted(set(particles["rlnVoltage"])) == [200.0, 300.0]
    origin_px = particles[["rlnOriginX", "rlnOriginY"]].to_numpy()
    np.testing.assert_allclose(p.shifts_A.numpy(), origin_px * 5e4 / 37369.207031, rtol=1e-6)
    group = diagnostics.summarise(p)["optics_groups"][0]
    assert group["voltage_kV"] == [200.0, 300.0]  # per particle, not the first row's


def test_info_and_validate_list_the_image_model_columns():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "cryosplat", *map(str, args)],
                              capture_output=True, text=True)
    r = run("info", DATA / "relion5.star", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["file"].endswith("relion5.star")
    assert s["image_model_columns"]["rlnBeamTiltX"].startswith("modelled")
    assert s["optics_groups"][0]["beam_tilt_mrad"] == [0.043489, 0.014097]
    r = run("validate", DATA / "relion5.star", "--json")
    checks = {c["check"]: c for c in json.loads(r.stdout)["checks"]}
    assert checks["column rlnOddZernike"]["status"] == "ok"
    assert "beam tilt" in checks["higher-order optics"]["detail"]
