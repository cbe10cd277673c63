"""Streaming and data parallelism: prefetched reads, gloo ranks against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cryosplat.io import assign_half_sets, read_particles
from cryosplat.simulate import SimulationConfig, simulate_dataset
from cryosplat.train import (
    BatchStream,
    HalfSetTrainer,
    TrainConfig,
    batch_indices,
    train_gold_standard,
)
from cryosplat.train.distributed import leave_group

CFG = dict(n_gaussians=40, batch_size=8, epochs=2, eval_every=10**6, checkpoint_every=10**6,
           seed=4, loss="fourier", densify=True, densify_every=4)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("small")
    sim = simulate_dataset(None, d, SimulationConfig(n_particles=120, box_size=24,
                                                     pixel_size_A=4.0, snr=1.0, seed=5))
    return Path(sim["particles"])


def test_prefetched_batches_are_the_batches_read_on_demand(small):
    p = read_particles(small)
    half = assign_half_sets(p, 0)
    cfg = TrainConfig(**CFG)
    trainers = [HalfSetTrainer(p, np.nonzero(half == h)[0], cfg, h, 20, torch.device("cpu"))
                for h in (1, 2)]
    for workers in (0, 2):
        got = list(BatchStream(trainers, 3, 9, workers=workers))
        assert len(got) == 6
        for i, images in enumerate(got):
            for t, x in zip(trainers, images):
                idx = batch_indices(t.indices, 8, cfg.seed, t.half, 3 + i)
                np.testing.assert_array_equal(x.numpy(), p.read_images(idx).numpy())


def test_batches_are_an_epoch_permutation_of_the_half_set():
    idx = np.arange(100, 141)  # 41 particles, batch 8: 5 full batches per epoch
    seen = np.concatenate([batch_indices(idx, 8, 0, 1, s) for s in range(5)])
    assert len(np.unique(seen)) == 40 and set(seen) <= set(idx)
    assert not np.array_equal(batch_indices(idx, 8, 0, 1, 0), batch_indices(idx, 8, 0, 1, 5))
    assert not np.array_equal(batch_indices(idx, 8, 0, 1, 0), batch_indices(idx, 8, 0, 2, 0))


def _rank_main(rank: int, world: int, init_file: str, star: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    p = read_particles(star)
    trainers, _, trace = train_gold_standard(p, assign_half_sets(p, 0), TrainConfig(**CFG),
                                             torch.device("cpu"), log=lambda m: None)
    if rank == 0:
        torch.save({"models": [t.model.state_dict() for t in trainers], "trace": trace}, out)
    leave_group()  # a barrier, then destroy (as the commands leave)


def test_two_gloo_ranks_give_the_mixture_of_one_process(small, tmp_path):
    """Same global batch and seed: rank 0 and 1 each take half of every batch, the loss, the
    calibration, the Fourier loss's noise spectrum and the gradients are summed over ranks;
    densification must then make the same choices too."""
    import torch.multiprocessing as mp

    out = tmp_path / "two.pt"
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(small), str(out)), nprocs=2)
    two = torch.load(out, weights_only=True)
    p = read_particles(small)
    trainers, _, trace = train_gold_standard(p, assign_half_sets(p, 0), TrainConfig(**CFG),
                                             torch.device("cpu"), log=lambda m: None)
    np.testing.assert_allclose(np.asarray(two["trace"]), np.asarray(trace), rtol=1e-4)
    for t, state in zip(trainers, two["models"]):
        one = t.model.state_dict()
        assert state["means_A"].shape == one["means_A"].shape  # same densify/prune choices
        assert len(one["means_A"]) != CFG["n_gaussians"]  # ... and there were some
        # float32 sums in another order, through 14 Adam steps: agree to 1/1000 of a pixel
        # (4 Å) for the means and 1e-3 for the dimensionless parameters
        for k, tol in (("means_A", 4e-3), ("log_scales_A", 1e-3), ("quaternions", 1e-3),
                       ("raw_amplitudes", 1e-3)):
            np.testing.assert_allclose(state[k].numpy(), one[k].numpy(), atol=tol, err_msg=k)


def test_cli_nproc_2_runs_torchrun_and_rank_0_writes_the_outputs(small, tmp_path):
    def run(*args):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-m", "cryosplat", *map(str, args)],
                              capture_output=True, text=True, env=env)

    common = ["--objective", "images", "--gaussians", 30, "--epochs", 1, "--batch", 8, "--device", "cpu",
              "--no-validate", "--no-densify", "--seed", 2]
    r2 = run("reconstruct", small, "--out", tmp_path / "two", "--nproc", 2, *common)
    assert r2.returncode == 0, r2.stderr[-3000:]
    r1 = run("reconstruct", small, "--out", tmp_path / "one", *common)
    assert r1.returncode == 0, r1.stderr[-3000:]
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s2["processes"] == 2
    for i in (1, 2):
        a = torch.load(tmp_path / "two" / f"gaussians_half_{i}.pt", weights_only=True)
        b = torch.load(tmp_path / "one" / f"gaussians_half_{i}.pt", weights_only=True)
        np.testing.assert_allclose(a["means_A"].numpy(), b["means_A"].numpy(), atol=4e-3)
    log = (tmp_path / "two" / "log.txt").read_text()
    assert log.count("cryosplat reconstruct:") == 1  # one rank logs
