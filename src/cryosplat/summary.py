"""The typed results a run hands on: its headline resolutions (:class:`Headline`), a direct
inversion's summary (:class:`BackprojectionSummary`) and a Gaussian run's
(:class:`RunSummary`). Each is written as ``summary.json`` by its ``to_json()`` and read back
by ``read()``: the report, the terminal and the benchmarks read these types, not dicts.

All resolutions are in Å; times in seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Headline field -> its summary.json key (a dot is no attribute name)
_HEADLINE_KEYS = {"half_map_resolution_A": "half_map_resolution_A",
                  "half_map_resolution_A_corrected": "half_map_resolution_A_corrected",
                  "truth_resolution_A_0143": "truth_resolution_A_0.143",
                  "truth_resolution_A_05": "truth_resolution_A_0.5",
                  "cross_validated_resolution_A": "cross_validated_resolution_A",
                  "cross_validated_is_limit": "cross_validated_is_limit"}


@dataclass
class Headline:
    """A pair of half-maps' headline figures (:meth:`cryosplat.evaluate.Evaluation.headline`):
    the half-map FSC at 0.143 (unmasked, and phase-randomisation corrected when the masked
    curves were made), the map against the truth at 0.143 and 0.5 (with a truth), and the
    cross-validated resolution at 0.5 (with the half-sets' direct maps), which is a limit
    ("or better") when ``cross_validated_is_limit``. None: not computed."""

    half_map_resolution_A: float
    half_map_resolution_A_corrected: float | None = None
    truth_resolution_A_0143: float | None = None
    truth_resolution_A_05: float | None = None
    cross_validated_resolution_A: float | None = None
    cross_validated_is_limit: bool | None = None

    @property
    def resolution_A(self) -> float:
        """The one resolution a run prints (terminal, summary.json, report, post-processing):
        the cross-validated estimate of the map against the truth at 0.5 when the run has the
        half-sets' direct maps (a Gaussian run), else the half-map FSC at 0.143 (unmasked)."""
        if self.cross_validated_resolution_A is not None:
            return self.cross_validated_resolution_A
        return self.half_map_resolution_A

    @property
    def resolution_is_limit(self) -> bool:
        """Whether :attr:`resolution_A` is only a limit: the map is at least that good, but
        the half-sets' data cannot check it further."""
        return bool(self.cross_validated_resolution_A is not None
                    and self.cross_validated_is_limit)

    @property
    def resolution_basis(self) -> str:
        """How :attr:`resolution_A` was measured, in a few words."""
        if self.cross_validated_resolution_A is not None:
            return ("cross-validated: the map against the half-sets' direct maps, estimated "
                    "FSC against the truth at 0.5")
        return "half-map FSC at 0.143, unmasked"

    def describe(self) -> str:
        """:attr:`resolution_A` with its limit and basis, in one phrase."""
        if self.cross_validated_resolution_A is not None:
            return f"{self.describe_cross_validated()}; {self.resolution_basis}"
        return f"{self.resolution_A:.2f} Å ({self.resolution_basis})"

    def to_json(self) -> dict[str, Any]:
        """The headline (``resolution_A``, ``resolution_is_limit``; its basis is cross-validated
        when ``cross_validated_resolution_A`` is there), then the computed figures under their
        summary.json keys, in this order."""
        head: dict[str, Any] = {"resolution_A": self.resolution_A,
                                "resolution_is_limit": self.resolution_is_limit}
        return head | {key: getattr(self, name) for name, key in _HEADLINE_KEYS.items()
                       if getattr(self, name) is not None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Headline:
        """The headline figures among a summary's keys."""
        return cls(**{name: d[key] for name, key in _HEADLINE_KEYS.items() if key in d})

    def describe_cross_validated(self, short: bool = False) -> str:
        """One phrase for the cross-validated resolution (``short``: without the explanation
        of a limit, for plot legends)."""
        r = self.cross_validated_resolution_A
        if r is None:
            raise ValueError("no cross-validated resolution: the run had no validation maps")
        if not self.cross_validated_is_limit:
            return f"{r:.2f} Å"
        if short:
            return f"{r:.2f} Å or better"
        return (f"{r:.2f} Å or better (the estimate stays above 0.5 as far as the half-sets' "
                f"data have signal to check it)")


Resolutions = dict[str, dict[str, float]]  # curve name -> {"0.143": Å, "0.5": Å}


@dataclass
class BackprojectionSummary:
    """``backproject``'s summary.json (and a Gaussian run's validation maps')."""

    particles: int
    box_size: int
    pixel_size_A: float
    symmetry: str
    headline: Headline
    resolutions_A: Resolutions

    def to_json(self) -> dict[str, Any]:
        """summary.json's contents."""
        return {"particles": self.particles, "box_size": self.box_size,
                "pixel_size_A": self.pixel_size_A, "symmetry": self.symmetry,
                **self.headline.to_json(), "resolutions_A": self.resolutions_A}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BackprojectionSummary:
        """The summary of a :meth:`to_json`."""
        return cls(d["particles"], d["box_size"], d["pixel_size_A"], d.get("symmetry", "C1"),
                   Headline.from_json(d), d["resolutions_A"])

    @classmethod
    def read(cls, path: str | Path) -> BackprojectionSummary:
        """A backprojection folder's summary.json."""
        return cls.from_json(json.loads(Path(path).read_text()))


@dataclass
class RunSummary:
    """``reconstruct``'s (and ``refine``'s) summary.json: the data, the run, its headline
    figures and every resolution, the evaluation history, and what the run made besides.

    ``history``: one row per evaluation (:class:`cryosplat.train.halves.Record`);
    ``stopped``: why each half-set's fit stopped (volume objective); ``backprojection``: the
    validation maps' summary; ``postprocess``: ``postprocess/summary.json``'s contents (or
    ``{"error": ...}``); ``refinement``: refine's iterations and changes; ``report``: the
    report's path (not in summary.json, which the report lists)."""

    particles: int
    box_size: int
    pixel_size_A: float
    device: str
    processes: int
    steps: int
    train_time_s: float
    wall_time_s: float
    headline: Headline
    resolutions_A: Resolutions
    history: list[dict[str, Any]]
    gaussians: list[int]
    objective: str
    symmetry: str
    stopped: list[str | None] | None = None
    backprojection: BackprojectionSummary | None = None
    postprocess: dict[str, Any] | None = None
    refinement: dict[str, Any] | None = None
    report: str | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        """summary.json's contents."""
        out: dict[str, Any] = {
            "particles": self.particles, "box_size": self.box_size,
            "pixel_size_A": self.pixel_size_A, "device": self.device,
            "processes": self.processes, "steps": self.steps,
            "train_time_s": self.train_time_s, "wall_time_s": self.wall_time_s,
            **self.headline.to_json(), "resolutions_A": self.resolutions_A,
            "history": self.history, "gaussians": self.gaussians, "objective": self.objective,
            "symmetry": self.symmetry}
        if self.stopped is not None:
            out["stopped"] = self.stopped
        if self.backprojection is not None:
            out["backprojection"] = self.backprojection.to_json()
        if self.postprocess is not None:
            out["postprocess"] = self.postprocess
        if self.refinement is not None:
            out["refinement"] = self.refinement
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunSummary:
        """The summary of a :meth:`to_json`."""
        bp = d.get("backprojection")
        return cls(d["particles"], d["box_size"], d["pixel_size_A"], d["device"],
                   d.get("processes", 1), d["steps"], d["train_time_s"], d["wall_time_s"],
                   Headline.from_json(d), d["resolutions_A"], d["history"], d["gaussians"],
                   d.get("objective", "images"), d.get("symmetry", "C1"), d.get("stopped"),
                   None if bp is None else BackprojectionSummary.from_json(bp),
                   d.get("postprocess"), d.get("refinement"), d.get("report"))

    @classmethod
    def read(cls, path: str | Path) -> RunSummary:
        """A run folder's summary.json."""
        return cls.from_json(json.loads(Path(path).read_text()))


@dataclass
class AbinitioSummary:
    """``abinitio``'s summary.json: the particles, the working box the search ran in, the
    final resolution it aligned to, the search's speed (rotations x origins x particles scored
    per second in the final pass), whether the hand was flipped, and the history (one dict
    per minibatch: iteration, resolution_A, n_effective, mean_score, mean_contrast, loss,
    elapsed_s)."""

    particles: int
    box_size: int
    pixel_size_A: float
    working_box: int
    working_pixel_A: float
    final_resolution_A: float
    symmetry: str
    gaussians: int
    wall_time_s: float
    search_rate: float
    hand_flipped: bool
    poses_in_file_ignored: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """summary.json's contents."""
        return dict(self.__dict__)

    @classmethod
    def read(cls, path: str | Path) -> AbinitioSummary:
        """An abinitio folder's summary.json."""
        return cls(**json.loads(Path(path).read_text()))
