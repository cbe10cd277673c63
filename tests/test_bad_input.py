"""Bad input, as users bring it: each case must end in one clear line and exit status 2.

Every case starts from a valid dataset written by conftest's independent writers, breaks one
thing, runs a CLI command in this process, and checks the message names what is wrong. An
exception other than our InputError escapes ``main()`` and fails the test: no traceback.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from conftest import (
    make_truth,
    random_images,
    run_cli,
    write_cryodrgn,
    write_cs,
    write_stack,
    write_star31,
)


def one_group(n: int = 12, box: int = 16):
    t = make_truth(n=n, box=box, two_groups=False)
    return t


def star_dataset(tmp: Path, n: int = 12, box: int = 16, images=None) -> Path:
    t = one_group(n, box)
    path = write_star31(tmp, t, images)
    # a header that agrees with the STAR file (conftest writes 1.0)
    with mrcfile.open(tmp / "Extract" / "stack.mrcs", "r+") as m:
        m.voxel_size = float(t.pixel_A[0])
    return path


def edit_star(path: Path, block: str, fn) -> Path:
    tables = starfile.read(path, always_dict=True)
    tables[block] = fn(tables[block])
    starfile.write(tables, path, float_format="%.8f")
    return path


def raw_header_edit(path: Path, word: int, value: int) -> None:
    """Overwrite 32-bit header word ``word`` (0-based) of an MRC file."""
    with open(path, "r+b") as f:
        f.seek(4 * word)
        f.write(np.int32(value).tobytes())


# Each case: (id, builder(tmp) -> (args, expected substring of the error line)).

def _missing_star(tmp):
    return ["info", tmp / "nope.star"], "file not found"


def _empty_star(tmp):
    (tmp / "e.star").write_text("")
    return ["info", tmp / "e.star"], "file is empty"


def _garbage_star(tmp):
    (tmp / "g.star").write_bytes(b"\x00\xff\x10 binary junk, not a STAR file\n")
    return ["info", tmp / "g.star"], "expected a RELION particle STAR file"


def _no_image_name(tmp):
    p = star_dataset(tmp)
    edit_star(p, "particles", lambda d: d.drop(columns=["rlnImageName"]))
    return ["info", p], "missing required column rlnImageName"


def _zero_rows(tmp):
    p = star_dataset(tmp)
    edit_star(p, "particles", lambda d: d.iloc[:0])
    return ["info", p], "no rows"


def _unknown_optics_group(tmp):
    p = star_dataset(tmp)
    edit_star(p, "particles", lambda d: d.assign(rlnOpticsGroup=[1] * (len(d) - 1) + [7]))
    return ["info", p], "rlnOpticsGroup row 12 is 7"


def _optics_without_pixel(tmp):
    p = star_dataset(tmp)
    edit_star(p, "optics", lambda d: d.drop(columns=["rlnImagePixelSize"]))
    return ["info", p], "lacks rlnImagePixelSize"


def _nan_defocus(tmp):
    p = star_dataset(tmp)
    edit_star(p, "particles", lambda d: d.assign(rlnDefocusU=[*d.rlnDefocusU[:4], np.nan,
                                                              *d.rlnDefocusU[5:]]))
    return ["info", p], "row 5"


def _text_in_numeric_column(tmp):
    p = star_dataset(tmp)
    edit_star(p, "particles", lambda d: d.assign(rlnAngleTilt=["abc"] * len(d)))
    return ["info", p], "rlnAngleTilt"


def _half_origin(tmp):
    p = star_dataset(tmp)
    edit_star(p, "particles", lambda d: d.drop(columns=["rlnOriginYAngst"]))
    return ["info", p], "rlnOriginXAngst but not rlnOriginYAngst"


def _bad_random_subset(tmp):
    p = star_dataset(tmp)
    edit_star(p, "particles", lambda d: d.assign(rlnRandomSubset=[3] * len(d)))
    return ["info", p], "rlnRandomSubset row 1 is 3"


def _bad_image_name(tmp):
    p = star_dataset(tmp)
    edit_star(p, "particles", lambda d: d.assign(rlnImageName=["0@Extract/stack.mrcs"] * len(d)))
    return ["info", p], "rlnImageName row 1 is '0@Extract/stack.mrcs'; expected index@stack.mrcs"


def _index_beyond_stack(tmp):
    p = star_dataset(tmp)
    edit_star(p, "particles", lambda d: d.assign(
        rlnImageName=[*d.rlnImageName[:-1], "000099@Extract/stack.mrcs"]))
    return ["backproject", p, "--out", tmp / "o"], "particle index 99 (1-based) is beyond the stack"


def _missing_stack(tmp):
    p = star_dataset(tmp)
    (tmp / "Extract" / "stack.mrcs").unlink()
    return ["backproject", p, "--out", tmp / "o"], "image file not found"


def _empty_stack(tmp):
    p = star_dataset(tmp)
    (tmp / "Extract" / "stack.mrcs").write_bytes(b"")
    return ["backproject", p, "--out", tmp / "o"], "file is empty (0 bytes)"


def _truncated_stack(tmp):
    p = star_dataset(tmp)
    f = tmp / "Extract" / "stack.mrcs"
    f.write_bytes(f.read_bytes()[:-500])
    return ["backproject", p, "--out", tmp / "o"], "file is truncated"


def _unreadable_mode(tmp):
    p = star_dataset(tmp)
    raw_header_edit(tmp / "Extract" / "stack.mrcs", 3, 4)  # mode 4: complex float
    return ["backproject", p, "--out", tmp / "o"], "MRC mode 4 is not read"


def _non_square(tmp):
    t = one_group()
    p = write_star31(tmp, t)
    write_stack(tmp / "Extract" / "stack.mrcs", np.zeros((12, 16, 18), np.float32), 1.2)
    return ["backproject", p, "--out", tmp / "o"], "expected square images"


def _mismatched_box(tmp):
    p = star_dataset(tmp)
    write_stack(tmp / "Extract" / "other.mrcs", np.zeros((12, 20, 20), np.float32), 1.2)
    edit_star(p, "particles", lambda d: d.assign(
        rlnImageName=[*d.rlnImageName[:-1], "000001@Extract/other.mrcs"]))
    return ["backproject", p, "--out", tmp / "o"], "images are 20 pixels wide; the metadata give 16"


def _pixel_size_disagrees(tmp):
    p = star_dataset(tmp)
    with mrcfile.open(tmp / "Extract" / "stack.mrcs", "r+") as m:
        m.voxel_size = 2.4
    return ["backproject", p, "--out", tmp / "o"], "header pixel size 2.4 Å disagrees with 1.2 Å"


def _nan_pixels(tmp):
    t = one_group()
    images = random_images(t)
    images[3, 2, 2] = np.nan
    p = star_dataset(tmp, images=images)
    return ["backproject", p, "--out", tmp / "o"], "image 4 (1-based) holds NaN or Inf"


def _inf_pixels(tmp):
    t = one_group()
    images = random_images(t)
    images[0, 0, 0] = np.inf
    p = star_dataset(tmp, images=images)
    return ["reconstruct", p, "--out", tmp / "o", "--no-validate", "--batch", 4,
            "--objective", "images"], "image 1 (1-based) holds NaN or Inf"


def _inf_pixels_volume(tmp):
    t = one_group()
    images = random_images(t)
    images[0, 0, 0] = np.inf
    p = star_dataset(tmp, images=images)
    return ["reconstruct", p, "--out", tmp / "o", "--no-validate"], \
        "image 1 (1-based) holds NaN or Inf"


def _batch_larger_than_half_set(tmp):
    p = star_dataset(tmp)
    return ["reconstruct", p, "--out", tmp / "o", "--no-validate", "--batch", 32,
            "--objective", "images"], \
        "each half-set needs at least --batch 32 particles"


def _half_set_of_one_particle(tmp):
    p = edit_star(star_dataset(tmp, n=3), "particles",
                  lambda d: d.assign(rlnRandomSubset=[1, 2, 2]))
    return ["reconstruct", p, "--out", tmp / "o", "--no-validate"], \
        "each half-set needs at least 2 particles"


def _empty_half_set(tmp):  # cryoDRGN's relion31.star: all 5 particles in rlnRandomSubset 1
    p = edit_star(star_dataset(tmp, n=5), "particles", lambda d: d.assign(rlnRandomSubset=1))
    return ["backproject", p, "--out", tmp / "o"], "none in half-set 2; a gold-standard FSC"


def _negative_particle_diameter(tmp):
    p = star_dataset(tmp)
    return ["reconstruct", p, "--out", tmp / "o", "--no-validate", "--batch", 4,
            "--particle-diameter", -80], "--particle-diameter -80"


def _no_poses_for_reconstruct(tmp):
    p = star_dataset(tmp)
    edit_star(p, "particles", lambda d: d.drop(columns=["rlnAngleRot", "rlnAngleTilt",
                                                        "rlnAnglePsi"]))
    return ["reconstruct", p, "--out", tmp / "o"], "no poses"


def _cs_without_pose(tmp):
    t = make_truth(two_groups=False)
    cs = write_cs(tmp, t)
    a = np.load(cs)
    keep = [n for n in a.dtype.names if not n.startswith("alignments3D/")]
    with open(cs, "wb") as f:
        np.save(f, a[keep].copy())
    return ["reconstruct", cs, "--out", tmp / "o"], "no poses"


def _cs_without_path(tmp):
    t = make_truth(two_groups=False)
    cs = write_cs(tmp, t)
    a = np.load(cs)
    keep = [n for n in a.dtype.names if n != "blob/path"]
    with open(cs, "wb") as f:
        np.save(f, a[keep].copy())
    return ["info", cs], "missing field blob/path"


def _cs_not_structured(tmp):
    with open(tmp / "x.cs", "wb") as f:
        np.save(f, np.zeros((3, 3)))
    return ["info", tmp / "x.cs"], "expected a 1-D numpy structured array"


def _pkl_of_objects(tmp):
    t = make_truth(two_groups=False)
    stack, poses, ctf = write_cryodrgn(tmp, t)
    with open(poses, "wb") as f:
        pickle.dump({"rotations": [1, 2, 3]}, f)
    return ["info", stack, "--poses", poses, "--ctf", ctf], "expected numeric numpy arrays"


def _malicious_pkl(tmp):
    t = make_truth(two_groups=False)
    stack, poses, ctf = write_cryodrgn(tmp, t)
    marker = tmp / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(ctf, "wb") as f:
        pickle.dump(Payload(), f)
    return ["info", stack, "--poses", poses, "--ctf", ctf], "refused to load io.open"


def _poses_count_mismatch(tmp):
    t = make_truth(two_groups=False)
    stack, poses, ctf = write_cryodrgn(tmp, t)
    with open(poses, "wb") as f:
        pickle.dump((t.matrices[:5].astype(np.float32), np.zeros((5, 2), np.float32)), f)
    return ["info", stack, "--poses", poses, "--ctf", ctf], "holds 5 poses; the image stack holds 12"


def _ctf_wrong_shape(tmp):
    t = make_truth(two_groups=False)
    stack, poses, ctf = write_cryodrgn(tmp, t)
    with open(ctf, "wb") as f:
        pickle.dump(np.zeros((12, 4), np.float32), f)
    return ["info", stack, "--poses", poses, "--ctf", ctf], "expected a (N, 9) array"


def _unknown_extension(tmp):
    (tmp / "p.txt").write_text("hello")
    return ["info", tmp / "p.txt"], ".txt"


def _mask_out_of_range(tmp):
    vol = np.zeros((8, 8, 8), np.float32)
    for name, v in (("a.mrc", vol), ("b.mrc", vol + 1), ("m.mrc", vol + 3)):
        with mrcfile.new(tmp / name) as m:
            m.set_data(v)
            m.voxel_size = 1.0
    return ["fsc", tmp / "a.mrc", tmp / "b.mrc", "--mask", tmp / "m.mrc"], "expected [0, 1]"


def _truth_other_grid(tmp):
    for name, d in (("a.mrc", 8), ("t.mrc", 10)):
        with mrcfile.new(tmp / name) as m:
            m.set_data(np.zeros((d, d, d), np.float32))
            m.voxel_size = 1.0
    return ["fsc", tmp / "a.mrc", "--truth", tmp / "t.mrc"], "expected 8 voxels"


def _non_cubic_map(tmp):
    with mrcfile.new(tmp / "a.mrc") as m:
        m.set_data(np.zeros((8, 8, 6), np.float32))
    return ["fsc", tmp / "a.mrc", tmp / "a.mrc"], "expected a cubic map"


def _resume_not_a_run(tmp):
    (tmp / "r").mkdir()
    return ["reconstruct", "--resume", tmp / "r"], "not a cryosplat reconstruct folder"


def _box_too_large(tmp):
    p = star_dataset(tmp)
    return ["downsample", p, "--out", tmp / "o", "--box", 64], "--box 64"


CASES = [_missing_star, _empty_star, _garbage_star, _no_image_name, _zero_rows,
         _unknown_optics_group, _optics_without_pixel, _nan_defocus, _text_in_numeric_column,
         _half_origin, _bad_random_subset, _bad_image_name, _index_beyond_stack, _missing_stack,
         _empty_stack, _truncated_stack, _unreadable_mode, _non_square, _mismatched_box,
         _pixel_size_disagrees, _nan_pixels, _inf_pixels, _inf_pixels_volume, _batch_larger_than_half_set,
         _half_set_of_one_particle, _empty_half_set, _negative_particle_diameter,
         _no_poses_for_reconstruct,
         _cs_without_pose, _cs_without_path, _cs_not_structured, _pkl_of_objects,
         _malicious_pkl, _poses_count_mismatch, _ctf_wrong_shape, _unknown_extension,
         _mask_out_of_range, _truth_other_grid, _non_cubic_map, _resume_not_a_run,
         _box_too_large]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.strip("_") for c in CASES])
def test_bad_input_gives_one_clear_line(case, tmp_path, capsys):
    args, expected = case(tmp_path)
    code = run_cli(*args)
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:"), err
    assert expected in lines[-1], (expected, err)
    assert "Traceback" not in err + out
    assert not (tmp_path / "pwned").exists()  # the malicious pkl's payload never ran
    if case is _inf_pixels:  # found while training: the run's log says where it stopped
        assert "stopped during training" in (tmp_path / "o" / "log.txt").read_text()
    elif case is _inf_pixels_volume:  # found while inserting the particles
        assert "stopped while inserting" in (tmp_path / "o" / "log.txt").read_text()
    else:  # found before any output was written
        assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_there_are_at_least_25_distinct_cases():
    assert len({c.__name__ for c in CASES}) >= 25
