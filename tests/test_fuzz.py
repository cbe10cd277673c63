"""Property-based tests: corrupted STAR, .cs and pkl files never crash the readers with
anything but InputError (one clear line at the CLI), and never run code from a pkl."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import make_truth, write_cryodrgn, write_cs, write_star31
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryosplat.errors import InputError
from cryosplat.io import read_particles
from cryosplat.io.cryodrgn import load_arrays_pkl, read_ctf_pkl, read_poses_pkl

SETTINGS = settings(max_examples=400, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@st.composite
def corruptions(draw, size: int):
    """A list of edits to a file of ``size`` bytes: flip, insert, delete, truncate."""
    edits = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "duplicate"]))
        pos = draw(st.integers(0, max(0, size - 1)))
        if kind == "flip":
            edits.append((kind, pos, draw(st.integers(0, 255))))
        elif kind == "insert":
            edits.append((kind, pos, draw(st.binary(min_size=1, max_size=12))))
        else:
            edits.append((kind, pos, draw(st.integers(1, 64))))
    return edits


def corrupt(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for kind, pos, arg in edits:
        pos = min(pos, max(0, len(b) - 1))
        if kind == "flip" and b:
            b[pos] = arg
        elif kind == "insert":
            b[pos:pos] = arg
        elif kind == "delete":
            del b[pos:pos + arg]
        elif kind == "truncate":
            del b[pos:]
        elif kind == "duplicate":
            b[pos:pos] = b[pos:pos + arg]
    return bytes(b)


def only_input_errors(read) -> None:
    """Run ``read``; success or InputError are both fine, anything else fails the test."""
    try:
        p = read()
    except InputError as e:
        assert str(e).strip() and "\n" not in str(e).strip()
        return
    if hasattr(p, "check_images"):  # what was read must hold together
        try:
            p.check_images()
            p.read_images(np.arange(min(len(p), 3)))
        except InputError:
            pass


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("orig")
    t = make_truth(n=6, two_groups=True)
    stack, poses, ctf = write_cryodrgn(d / "drgn", t)
    return {"star": write_star31(d / "star", t), "cs": write_cs(d / "cs", t),
            "stack": stack, "poses": poses, "ctf": ctf}


@SETTINGS
@given(st.data(), st.sampled_from(["star", "cs"]))
def test_corrupted_star_and_cs_files(originals, data, kind):
    src = originals[kind]
    raw = src.read_bytes()
    bad = corrupt(raw, data.draw(corruptions(len(raw))))
    target = src.parent / f"fuzz.{kind}"  # beside the original, so its image paths resolve
    target.write_bytes(bad)
    try:
        only_input_errors(lambda: read_particles(target))
    finally:
        target.unlink()


@SETTINGS
@given(st.data(), st.sampled_from(["poses", "ctf"]))
def test_corrupted_pkl_files(originals, tmp_path, data, which):
    raw = originals[which].read_bytes()
    bad = corrupt(raw, data.draw(corruptions(len(raw))))
    target = tmp_path / f"fuzz_{which}.pkl"
    target.write_bytes(bad)
    reader = read_poses_pkl if which == "poses" else read_ctf_pkl
    only_input_errors(lambda: reader(target, 6))


@SETTINGS
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8)
                    | st.binary(max_size=8) | st.floats(),
                    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
                    | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8))
def test_pkl_of_arbitrary_python_objects_is_refused_or_is_arrays(tmp_path, obj):
    target = tmp_path / "obj.pkl"
    target.write_bytes(pickle.dumps(obj))
    try:
        loaded = load_arrays_pkl(target)
    except InputError:
        return
    items = loaded if isinstance(loaded, tuple) else (loaded,)
    assert all(isinstance(x, np.ndarray) for x in items)
