"""The resolution a Gaussian run prints, checked against the truth on realistic data (issue 31).

A realistic simulation (docs/simulate.md: detector MTF, coloured background, contrast and
offsets, 10% junk, consensus errors of 1° / 0.5 Å / 150 Å) at 1.2 Å per pixel, where the
truth's signal stops short of Nyquist: the two Gaussian half-maps agree far beyond what the
map has (the prior's shared extrapolation), and the printed figure must not follow them.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from cryosplat.evaluate import fsc, resolution_A
from cryosplat.io import read_volume

BOX, PIX = 64, 1.2
REAL = ["--mtf-nyquist", 0.6, "--background-fraction", 0.3, "--contrast-sigma", 0.15,
        "--offset-sigma", 0.2, "--junk-fraction", 0.1, "--angle-error", 1, "--shift-error", 0.5,
        "--defocus-error", 150]


def run(*args):
    return subprocess.run([sys.executable, "-m", "cryosplat", *map(str, args)],
                          capture_output=True, text=True)


def shells_finer(a_A: float, b_A: float) -> float:
    """How many Fourier shells ``a_A`` lies beyond ``b_A`` (positive: finer)."""
    return (1 / a_A - 1 / b_A) * BOX * PIX


@pytest.fixture(scope="module")
def realistic_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("realistic")
    r = run("simulate", "--out", d / "sim", "--particles", 2000, "--box", BOX, "--pixel-size",
            PIX, "--snr", 0.03, "--max-shift", 3 * PIX, "--seed", 1, *REAL)
    assert r.returncode == 0, r.stderr
    r = run("reconstruct", d / "sim" / "particles.star", "--out", d / "rec", "--truth",
            d / "sim" / "ground_truth.mrc", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return d, r.stdout


def test_the_printed_resolution_is_never_finer_than_the_map_has(realistic_run):
    d, stdout = realistic_run
    s = json.loads((d / "rec" / "summary.json").read_text())
    maps = [torch.from_numpy(read_volume(d / "rec" / f)[0]) for f in ("map.mrc",)]
    truth = torch.from_numpy(read_volume(d / "sim" / "ground_truth.mrc")[0])
    truth_05 = resolution_A(fsc(maps[0], truth), BOX, PIX, 0.5)
    printed = s["resolution_A"]
    # never more than one shell optimistic, and close to the map's own resolution
    assert shells_finer(printed, truth_05) <= 1.0, (printed, truth_05)
    assert shells_finer(printed, truth_05) >= -2.0, (printed, truth_05)
    # the half-maps alone would have claimed far more than the map has
    assert shells_finer(s["half_map_resolution_A"], truth_05) > 3.0, s["half_map_resolution_A"]
    # the post-processing reports (and low-passes at) no finer a figure
    assert s["postprocess"]["resolution_A"] >= printed - 1e-6
    assert s["postprocess"]["lowpass_A"] >= printed - 1e-6
    # the terminal puts the same figure first
    assert f"resolution: {printed:.2f} Å" in stdout.replace("\n", " ")
    report = (d / "rec" / "report.html").read_text()
    assert f"Resolution: {printed:.2f} Å" in report


def test_the_cross_validated_curve_follows_the_map_against_the_truth(realistic_run):
    d, _ = realistic_run
    with open(d / "rec" / "fsc.csv", newline="") as f:
        table = list(csv.reader(f))
    header = table[0]
    rows = np.array([[float(x) if x not in ("", "nan") else np.nan for x in r] for r in table[1:]])
    est = rows[:, header.index("estimated map vs truth (cross-validated)")]
    true = rows[:, header.index("map vs truth")]
    refs = rows[:, header.index("direct maps of the half-sets, masked")]
    defined = np.isfinite(est)
    assert defined[:10].all()
    # where the half-sets' data can check it, the estimate is the map's FSC against the
    # truth; its statistical error grows near the end of its reach (the references' floor)
    strong = defined & (refs > 0.1)
    assert strong.sum() >= 15
    np.testing.assert_allclose(est[strong], true[strong], atol=0.05)
    np.testing.assert_allclose(est[defined], true[defined], atol=0.2)
