"""Gaussian reconstruction: a tiny end-to-end run and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryosplat.evaluate import fsc, resolution_A
from cryosplat.io import read_particles, read_volume
from cryosplat.reconstruct import (TrainConfig, assign_half_sets, load_checkpoint,
                                   train_gold_standard)
from cryosplat.simulate import SimulationConfig, simulate_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    cfg = SimulationConfig(n_particles=400, box_size=32, pixel_size_A=3.0, snr=1.0, seed=2)
    sim = simulate_dataset(None, d, cfg)
    truth, _ = read_volume(sim["ground_truth"])
    return read_particles(sim["particles"]), torch.from_numpy(truth)


def test_tiny_reconstruction_beats_a_random_mixture(tiny):
    p, truth = tiny
    cfg = TrainConfig(n_gaussians=150, epochs=4, eval_every=1000, checkpoint_every=1000, seed=1)
    half = assign_half_sets(p, 0)
    trainers, history, trace = train_gold_standard(p, half, cfg, torch.device("cpu"))
    from cryosplat.gmm import GaussianMixture

    rand = GaussianMixture.random(150, 0.3 * 96, 6.0, generator=torch.Generator().manual_seed(9))
    res_random = resolution_A(fsc(rand.voxelise(32, 3.0).detach(), truth), 32, 3.0, 0.5)
    full = (trainers[0].volume() + trainers[1].volume()) / 2
    res = resolution_A(fsc(full, truth), 32, 3.0, 0.5)
    assert res_random > 30.0
    assert res < 0.6 * res_random, (res, res_random)
    assert trace[-1][1] < trace[0][1] and trace[-1][2] < trace[0][2]  # both losses fell


def test_resume_continues_to_the_same_mixture(tiny, tmp_path):
    p, _ = tiny
    cfg = TrainConfig(n_gaussians=60, epochs=2, eval_every=1000, checkpoint_every=4, seed=3)
    half = assign_half_sets(p, 0)
    ref, _, _ = train_gold_standard(p, half, cfg, torch.device("cpu"))

    class Interrupt(Exception):
        pass

    steps = []

    def stop_after_six(n, losses):
        steps.append(1)
        if len(steps) == 6:
            raise Interrupt

    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(Interrupt):
        train_gold_standard(p, half, cfg, torch.device("cpu"), checkpoint_path=ckpt,
                            progress=stop_after_six)
    state = load_checkpoint(ckpt)
    assert state["halves"][0]["step"] == 4  # the last checkpoint before the interruption
    resumed, _, trace = train_gold_standard(p, half, cfg, torch.device("cpu"), checkpoint_path=ckpt,
                                            resume=state)
    assert trace[0][0] == 1 and len(trace) == ref[0].step
    for a, b in zip(ref, resumed):
        assert a.step == b.step
        for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
            assert torch.allclose(x, y, atol=1e-5), name
