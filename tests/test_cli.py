"""The command line as a user runs it: a subprocess, its output and its exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_truth, write_cs, write_star31

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from info_star import write_big_star  # noqa: E402


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cryosplat", *map(str, args)],
                          capture_output=True, text=True)


def test_info_on_100k_star_without_any_image(tmp_path):
    star = tmp_path / "big.star"
    write_big_star(star, 100_000)  # its stacks do not exist: info must not need them
    r = run("info", star, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["particles"] == 100_000 and s["box_size"] == 256
    assert s["pixel_size_A"] == [1.1, 1.3]
    # the groups are reconstructed together at the smaller pixel, in the box of 256 px of 1.3 Å
    assert s["reconstruction_grid"] == {"pixel_size_A": 1.1, "box_size": round(256 * 1.3 / 1.1),
                                        "rescaled": True}
    assert sum(g["particles"] for g in s["optics_groups"]) == 100_000
    assert s["half_sets"]["defined"] and s["half_sets"]["1"] + s["half_sets"]["2"] == 100_000
    assert 8000 / 1e4 <= s["defocus_um"]["min"] < s["defocus_um"]["max"] <= 30000 / 1e4
    assert s["pose_coverage"]["occupied_fraction"] == 1.0  # uniform angles cover the sphere


def test_info_tables_and_check_images(tmp_path):
    t = make_truth(n=10)
    cs = write_cs(tmp_path, t)
    r = run("info", cs, "--check-images")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())  # rich wraps lines at the terminal width
    assert "10 particles" in text and "optics groups" in text
    assert "half-sets: defined (" in text


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "empty.star"
    bad.write_text("")
    r = run("info", bad)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "empty.star: file is empty" in r.stderr


def test_downsample_writes_relion_31_and_refuses_to_overwrite(tmp_path):
    t = make_truth(n=6, box=32, two_groups=False)
    star = write_star31(tmp_path / "in", t)
    out = tmp_path / "out"
    r = run("downsample", star, "--out", out, "--box", 16, "--max-particles", 4)
    assert r.returncode == 0, r.stderr
    s = json.loads(run("info", out / "particles.star", "--json").stdout)
    assert s["particles"] == 4 and s["box_size"] == 16
    assert s["pixel_size_A"] == [pytest.approx(t.pixel_A[0] * 2)]
    before = (out / "particles.mrcs").read_bytes()
    r = run("downsample", star, "--out", out, "--box", 8)
    assert r.returncode == 2 and "--force" in r.stderr
    assert (out / "particles.mrcs").read_bytes() == before


def test_validate_reports_every_check_and_fails_on_what_reconstruction_needs(tmp_path):
    import pandas as pd
    import starfile
    from conftest import random_images

    t = make_truth(n=12, box=16, two_groups=False)
    good = write_star31(tmp_path / "good", t, random_images(t))
    r = run("validate", good, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] and out["particles"] == 12
    names = {c["check"] for c in out["checks"]}
    assert {"image stacks", "poses", "pixel size", "CTF defocus", "pose coverage",
            "half-sets", "shifts"} <= names
    # no angles, and a stack that is missing: both fail, with the reason, exit 1
    star = starfile.read(good)
    parts = star["particles"].drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
    parts["rlnImageName"] = parts["rlnImageName"].str.replace("@", "@missing_", regex=False)
    bad = tmp_path / "good" / "bad.star"
    starfile.write({"optics": star["optics"], "particles": pd.DataFrame(parts)}, bad)
    r = run("validate", bad, "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    status = {c["check"]: c for c in json.loads(r.stdout)["checks"]}
    assert status["poses"]["status"] == "fail"
    assert status["image stacks"]["status"] == "fail" and "missing_" in status["image stacks"]["detail"]
    # an implausible defocus is a warning, not a failure
    star["particles"]["rlnDefocusU"] = 500000.0
    odd = tmp_path / "good" / "odd.star"
    starfile.write(star, odd)
    r = run("validate", odd)
    assert r.returncode == 0 and "warn" in r.stdout
