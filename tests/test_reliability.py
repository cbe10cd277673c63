"""Runs that die, disks that fill, NaNs that appear, and files with only what is required."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
from test_bad_input import run_cli


def cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cryosplat", *map(str, args)],
                          capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sim")
    r = cli("simulate", "--out", d, "--particles", 160, "--box", 24, "--pixel-size", 4.0,
            "--snr", 1.0, "--force")
    assert r.returncode == 0, r.stderr
    return d / "particles.star"


COMMON = ["--objective", "images", "--gaussians", 40, "--batch", 8, "--no-validate", "--seed", 1, "--device", "cpu",
          "--checkpoint-every", 3]


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_result(sim, tmp_path):
    r = cli("reconstruct", sim, "--out", tmp_path / "ref", "--epochs", 8, *COMMON)
    assert r.returncode == 0, r.stderr
    from cryosplat.train import load_checkpoint

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cryosplat", "reconstruct", str(sim),
                             "--out", str(run), "--epochs", "8", *map(str, COMMON)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, step, t0 = run / "checkpoint.pt", 0, time.time()
    while step < 9 and time.time() - t0 < 120:  # a checkpoint some way into the run
        time.sleep(0.02)
        if ckpt.exists():
            step = int(load_checkpoint(ckpt)["halves"][0]["step"])
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(load_checkpoint(ckpt)["halves"][0]["step"])  # the last good checkpoint
    assert 9 <= killed_at < 80
    assert not (run / "map.mrc").exists()
    r = cli("reconstruct", "--resume", run)
    assert r.returncode == 0, r.stderr
    assert f"resumed at step {killed_at}" in (run / "log.txt").read_text()
    for i in (1, 2):
        a = torch.load(run / f"gaussians_half_{i}.pt", weights_only=True)
        b = torch.load(tmp_path / "ref" / f"gaussians_half_{i}.pt", weights_only=True)
        assert a["means_A"].shape == b["means_A"].shape
        np.testing.assert_allclose(a["means_A"].numpy(), b["means_A"].numpy(), atol=1e-3)
    np.testing.assert_allclose(mrcfile.read(run / "map.mrc"),
                               mrcfile.read(tmp_path / "ref" / "map.mrc"), atol=1e-4)


def test_full_disk_gives_a_clear_error_and_keeps_the_last_checkpoint(sim, tmp_path, capsys,
                                                                    monkeypatch):
    real_save, calls = torch.save, []

    def save(obj, f, *a, **kw):  # the second checkpoint finds the disk full half-way
        calls.append(f)
        if len(calls) == 2:
            with open(f, "wb") as fh:
                fh.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    code = run_cli("reconstruct", sim, "--out", out, "--epochs", 2, "--workers", 0, *COMMON)
    err = capsys.readouterr().err
    assert code == 1
    assert "No space left on device" in err and "Traceback" not in err
    from cryosplat.train import load_checkpoint

    assert int(load_checkpoint(out / "checkpoint.pt")["halves"][0]["step"]) == 3
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # no half-written leftovers


@pytest.mark.parametrize("where", ["calibration", "training", "output"])
def test_nan_stops_the_run_naming_the_stage(sim, tmp_path, capsys, monkeypatch, where):
    import cryosplat.train.trainer as rec

    if where in ("calibration", "training"):
        real, calls = rec.model_images, []
        first_nan = 1 if where == "calibration" else 2  # call 1 calibrates half-set 1

        def poisoned(*a, **k):
            calls.append(1)
            return real(*a, **k) * (float("nan") if len(calls) >= first_nan else 1.0)

        monkeypatch.setattr(rec, "model_images", poisoned)
    else:
        monkeypatch.setattr(rec.HalfSetTrainer, "volume",
                            lambda self: torch.full((self.d,) * 3, float("nan")))
    out = tmp_path / "run"
    code = run_cli("reconstruct", sim, "--out", out, "--epochs", 1, "--workers", 0, *COMMON)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"error: {where} stage:" in err
    assert not (out / "map.mrc").exists()


def test_every_command_on_a_star_file_with_only_required_columns(tmp_path):
    """No optional column at all: no origins, defocus V or angle, phase shift, B-factor,
    scale factor or half-sets. Every command must still give finite output."""
    import starfile

    from cryosplat.simulate import SimulationConfig, simulate_dataset

    sim = simulate_dataset(None, tmp_path / "full", SimulationConfig(
        n_particles=80, box_size=24, pixel_size_A=4.0, snr=1.0, seed=3))
    tables = starfile.read(sim["particles"], always_dict=True)
    required = ["rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnDefocusU",
                "rlnOpticsGroup"]
    tables["particles"] = tables["particles"][required]
    tables["particles"]["rlnImageName"] = [
        f"{s.split('@')[0]}@{Path(sim['particles']).parent / s.split('@')[1]}"
        for s in tables["particles"]["rlnImageName"]]
    star = tmp_path / "minimal.star"
    starfile.write(tables, star)
    gt = sim["ground_truth"]
    for args in (["info", star, "--json"], ["validate", star, "--json"],
                 ["downsample", star, "--out", tmp_path / "ds", "--box", 16],
                 ["backproject", star, "--out", tmp_path / "bp", "--truth", gt],
                 ["reconstruct", star, "--out", tmp_path / "rec", "--gaussians", 30,
                  "--epochs", 1, "--batch", 8, "--truth", gt],
                 ["fsc", tmp_path / "bp" / "half_map_1.mrc", tmp_path / "bp" / "half_map_2.mrc",
                  "--json"]):
        r = cli(*args)
        assert r.returncode == 0, (args[0], r.stderr[-2000:])
        if "--json" in args:
            assert "NaN" not in r.stdout and "Infinity" not in r.stdout, args[0]
    for f in ("bp/map.mrc", "rec/map.mrc", "rec/half_map_1.mrc", "ds/particles.mrcs"):
        assert np.isfinite(mrcfile.read(tmp_path / f)).all(), f
    for f in ("bp/summary.json", "rec/summary.json"):
        s = json.loads((tmp_path / f).read_text())
        assert np.isfinite(s["half_map_resolution_A"]), f
