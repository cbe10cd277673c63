"""``cryosplat refine --global --ref MAP``: the reference's grid, the FSC-stepped limit, the
half-sets' independence and the command end to end on a simulation whose poses it never reads
(refine/global_refine.py, refine/run.py)."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import starfile
import torch
from conftest import run_cli
from typer.testing import CliRunner

from cryosplat.cli import app
from cryosplat.errors import InputError
from cryosplat.geometry import rotation_angle_deg
from cryosplat.io import read_particles
from cryosplat.io.particles import assign_half_sets
from cryosplat.refine.global_refine import (
    GlobalConfig,
    GlobalRecord,
    global_refine,
    next_limit,
    planned_search,
    reference_map,
)
from cryosplat.simulate import SimulationConfig, simulate_dataset
from cryosplat.summary import RunSummary


def _blob(box: int, voxel_A: float, centre_A: tuple[float, float, float]) -> np.ndarray:
    """A Gaussian blob (sigma 4 Å) at ``centre_A`` (x, y, z) on the FFT-aligned grid: voxel
    i at (i - D//2) * voxel; the array is (z, y, x)."""
    c = (np.arange(box) - box // 2) * voxel_A
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    r2 = (x - centre_A[0]) ** 2 + (y - centre_A[1]) ** 2 + (z - centre_A[2]) ** 2
    return np.exp(-r2 / (2 * 4.0**2)).astype(np.float32)


def _centre_A(vol: torch.Tensor, voxel_A: float) -> np.ndarray:
    """The centre of mass (x, y, z) in Å of a (z, y, x) map on the FFT-aligned grid."""
    v = vol.double().numpy()
    c = (np.arange(v.shape[0]) - v.shape[0] // 2) * voxel_A
    return np.array([(v.sum((0, 1)) * c).sum(), (v.sum((0, 2)) * c).sum(),
                     (v.sum((1, 2)) * c).sum()]) / v.sum()


@pytest.mark.parametrize("box0, vox0, box, pix", [(64, 1.5, 40, 2.4), (63, 1.5, 48, 2.0),
                                                  (40, 3.0, 64, 1.5)])
def test_reference_map_keeps_positions_in_angstrom(tmp_path, box0, vox0, box, pix):
    """Rescaled and cropped or padded, a blob stays where it was in Å (a half-voxel or a
    transposed axis would move it by 0.75 Å or more)."""
    where = (7.0, -5.0, 3.0)
    path = tmp_path / "ref.mrc"
    with mrcfile.new(path) as m:
        m.set_data(_blob(box0, vox0, where))
        m.voxel_size = vox0
    vol = reference_map(path, box, pix)
    assert vol.shape == (box,) * 3
    assert np.allclose(_centre_A(vol, pix), where, atol=0.1), _centre_A(vol, pix)


def test_reference_map_refuses_an_empty_map(tmp_path):
    path = tmp_path / "zero.mrc"
    with mrcfile.new(path) as m:
        m.set_data(np.zeros((16, 16, 16), np.float32))
        m.voxel_size = 2.0
    with pytest.raises(InputError, match="zero everywhere"):
        reference_map(path, 16, 2.0)


def test_next_limit_steps_by_the_fsc():
    curve = torch.tensor([1.0] + [0.9] * 9 + [0.1] * 10)  # falls below 0.143 at shell 10
    assert next_limit(curve, 6, 18) == (9, 12)  # the last shell above, + max(3, 9 // 4)
    assert next_limit(curve, 14, 18) == (9, 14)  # never below the last limit
    assert next_limit(torch.ones(20), 6, 15) == (15, 15)  # at most the working box's
    assert next_limit(curve, 6, 10) == (9, 10)


def _record(it: int, search: str, change: float | None) -> GlobalRecord:
    return GlobalRecord(it, search, 20.0, 10.0, [change, change], 1.0)


def test_global_searches_go_on_while_the_poses_jump_grid_cells():
    cfg = GlobalConfig()  # 2 to 4 global iterations, then 3 local; the grid's step 15°
    assert (cfg.global_iterations, cfg.max_global_iterations, cfg.iterations) == (2, 4, 5)
    h = [_record(1, "global", None)]
    assert planned_search(h, cfg) == ("global", 15.0, 5)  # the first two always
    # moved less than a step: local searches, the first step halved each time
    settled = h + [_record(2, "global", 12.0)]
    assert planned_search(settled, cfg) == ("local", 7.5, 5)
    done = settled + [_record(i, "local", 1.0) for i in (3, 4, 5)]
    assert planned_search(done[:3], cfg) == ("local", 3.75, 5)
    assert planned_search(done, cfg) is None
    # one half-set still jumping (a median change of 23° > 15°): one more global search
    jumping = h + [GlobalRecord(2, "global", 20.0, 10.0, [23.0, 9.0], 1.0)]
    assert planned_search(jumping, cfg) == ("global", 15.0, 6)
    more = jumping + [_record(3, "global", 30.0), _record(4, "global", 30.0)]
    assert planned_search(more, cfg) == ("local", 7.5, 7)  # at most 4 global
    assert planned_search(more + [_record(i, "local", 1.0) for i in (5, 6, 7)], cfg) is None


@pytest.mark.parametrize("field, value", [("iterations", 0), ("initial_resolution_A", -1.0),
                                          ("global_iterations", 0), ("candidates", 0),
                                          ("max_global_iterations", 1),
                                          ("grid_resolution_A", -1.0)])
def test_global_config_refuses_settings_that_cannot_run(field, value):
    with pytest.raises(InputError):
        GlobalConfig(**{field: value})
    with pytest.raises(InputError, match="coarser"):
        GlobalConfig(initial_resolution_A=10.0, final_resolution_A=20.0)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    d = tmp_path_factory.mktemp("global")
    return simulate_dataset(None, d, SimulationConfig(n_particles=600, box_size=40,
                                                      pixel_size_A=3.0, snr=0.2, seed=5))


def _small(ref: str, **kw) -> GlobalConfig:
    return GlobalConfig(reference=ref, final_resolution_A=9.0, angle_step_deg=20.0,
                        batch_size=200, **kw)


def test_each_half_set_is_searched_from_its_own_particles(sim):
    """The first iteration's poses of half-set 1 do not change when half-set 2 loses a third
    of its particles: its working set, noise power, map and search are its own. (Later
    iterations share the half-maps' FSC curve, as in RELION.)"""
    p = read_particles(sim["particles"])
    half = assign_half_sets(p, 0)
    keep = np.nonzero((half == 1) | (np.arange(len(p)) % 3 == 0))[0]
    got = []
    for sub in (np.arange(len(p)), keep):
        seen: list[dict] = []
        global_refine(p.subset(sub), half[sub], _small(sim["ground_truth"], iterations=1,
                                                   global_iterations=1),
                      None, torch.device("cpu"), log=lambda m: None, on_iteration=seen.append)
        got.append(seen[0]["poses"][0])
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])


def test_global_stage_resumed_from_its_checkpoint_ends_where_an_unbroken_run_does(sim):
    p = read_particles(sim["particles"])
    half = assign_half_sets(p, 0)
    cfg = _small(sim["ground_truth"], iterations=2, global_iterations=1)
    states: list[dict] = []
    whole = global_refine(p, half, cfg, None, torch.device("cpu"), log=lambda m: None,
                          on_iteration=states.append)
    resumed = global_refine(p, half, cfg, None, torch.device("cpu"), log=lambda m: None,
                            state=states[0])
    assert torch.allclose(whole.rotations, resumed.rotations, atol=1e-6)
    assert torch.allclose(whole.origins_A, resumed.origins_A, atol=1e-6)
    assert [h.limit_A for h in resumed.history] == [h.limit_A for h in whole.history]


def test_refine_global_finds_the_poses_it_never_read(sim, tmp_path):
    out = tmp_path / "g"
    r = CliRunner().invoke(app, ["refine", sim["particles"], "--global", "--ref",
                                 sim["ground_truth"], "--global-resolution", "9",
                                 "--iterations", "0", "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    for name in ("global_poses.star", "global_stage.png", "particles.star", "map.mrc",
                 "half_map_1.mrc", "report.html", "global_checkpoint.pt"):
        assert (out / name).is_file(), name
    assert "Global stage" in (out / "report.html").read_text()
    assert "global stage" in r.output and "poses were not read" in r.output
    s = RunSummary.read(out / "summary.json")
    stage = s.refinement["global_stage"]
    kinds = [h["search"] for h in stage["history"]]
    cfg = GlobalConfig()
    n_global = kinds.count("global")
    assert kinds == ["global"] * n_global + ["local"] * (cfg.iterations - cfg.global_iterations)
    assert cfg.global_iterations <= n_global <= cfg.max_global_iterations
    assert stage["search_rate"] > 0
    est, truth = read_particles(out / "particles.star"), read_particles(sim["particles"])
    err = rotation_angle_deg(est.rotations, truth.rotations)
    # the reference is the truth, low-passed to 30 Å: the poses come back in its frame.
    # Random poses would be 126° off in the median; measured here: 4.4° (9 Å in a 40 Å molecule)
    print(f"median error {float(err.median()):.2f}°")
    assert float(err.median()) < 6.0, float(err.median())
    assert float((est.shifts_A - truth.shifts_A).norm(dim=-1).median()) < 2.0
    halves = starfile.read(out / "particles.star")["particles"]["rlnRandomSubset"]
    assert set(halves) == {1, 2}


@pytest.mark.parametrize("options, message", [
    (["--global"], "--global needs --ref"),
    (["--ref", "MAP"], "--ref"),
    (["--global", "--ref", "missing.mrc"], "not found"),
    (["--global", "--ref", "MAP", "--global-resolution", "4"], "Nyquist"),
    (["--global", "--ref", "MAP", "--nproc", "2"], "one process"),
])
def test_refine_global_refuses_what_cannot_work(sim, tmp_path, capsys, options, message):
    opts = [sim["ground_truth"] if o == "MAP" else o for o in options]
    assert run_cli("refine", sim["particles"], "--out", tmp_path / "o", *opts) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "global_poses.star").exists()
