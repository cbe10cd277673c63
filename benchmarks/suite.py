"""The benchmark suite that no single dataset can fool (issue 16): Gaussian reconstruction
against direct Fourier inversion and RELION on datasets of several structures, sizes, SNRs
and particle counts, some simulated by RELION's relion_project rather than by cryosplat.

For each dataset it runs, each as its own process with ``--threads`` threads:

1. ``cryosplat simulate`` (poses, shifts, CTF and the ground truth; for ``relion_project``
   datasets the images are then re-projected by ``relion_project --ctf --add_noise`` at the
   same SNR);
2. ``relion_reconstruct --ctf`` (when installed);
3. ``cryosplat backproject`` with defaults;
4. ``cryosplat reconstruct`` with defaults (which also builds its own validation maps).

It reports wall time, peak RSS, the FSC 0.5 and 0.143 crossings against the truth, the
half-map estimate and (for the Gaussians) the cross-validated estimate. It also reports the
Gaussian map's distance from direct inversion in Fourier shells, positive where the Gaussian
map is finer, and the ratio of reconstruct's wall time to RELION's. When reconstruct keeps
its Gaussians inside a sphere (``support_radius_A``), the direct map it is compared with is
masked by the same sphere, so emptied solvent is not counted as the prior's gain. It writes
``suite.json`` and ``suite.png`` to --out, and ends with one line naming the worst dataset.

Structures: 4AKE (built in), 4E43 (../shared, or MDAnalysisTests), 3KPR (176 kDa, 10 chains,
``MDAnalysisTests/data/mmcif/3KPR.pdb.gz`` of the PyPI package MDAnalysisTests 2.11.0, fetched
with pip into --cache when ../shared lacks it).

    .venv/bin/python benchmarks/suite.py [--datasets NAME ...] [--threads 2]
        [--workdir DIR] [--cache DIR] [--out benchmarks/results] [--no-gaussians]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mrcfile
import torch

from _results import (
    HAVE_RELION,
    crossings,
    machine,
    relion_project_noisy,
    run_child,
    shells,
    truth_fsc,
    write_json,
)
from cryosplat.evaluate import fsc, spherical_mask
from cryosplat.summary import BackprojectionSummary, RunSummary

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "structures"
MDA = "MDAnalysisTests==2.11.0"


@dataclass(frozen=True)
class Dataset:
    name: str
    structure: str  # 4AKE, 4E43 or 3KPR
    simulator: str  # cryosplat or relion_project
    box: int
    pixel_size_A: float
    particles: int
    snr: float
    # cryosplat simulate's options for the effects of real data (docs/simulate.md); with pose
    # errors the runs read the consensus-like particles.star, the truth is particles_true.star
    effects: tuple[str, ...] = ()


# issue 31's realistic set: MTF, ice background, contrast, offsets, 10% junk, consensus errors
REAL = ("--mtf-nyquist", "0.6", "--background-fraction", "0.3", "--contrast-sigma", "0.15",
        "--offset-sigma", "0.2", "--junk-fraction", "0.1", "--angle-error", "1",
        "--shift-error", "0.5", "--defocus-error", "150")

DATASETS = [
    Dataset("4ake-demo", "4AKE", "cryosplat", 64, 1.5, 2000, 0.1),
    Dataset("4ake-rp-snr05", "4AKE", "relion_project", 96, 2.0, 5000, 0.05),
    Dataset("4ake-rp-snr02", "4AKE", "relion_project", 96, 2.0, 3000, 0.02),
    Dataset("4e43-1k-snr01", "4E43", "cryosplat", 64, 1.5, 1000, 0.01),
    Dataset("4e43-rp-10k", "4E43", "relion_project", 96, 1.2, 10000, 0.05),
    # 3KPR spans 166 Å (radius 99 Å about its centre): boxes of 256 Å
    Dataset("3kpr-5k", "3KPR", "cryosplat", 128, 2.0, 5000, 0.05),
    Dataset("3kpr-rp-20k", "3KPR", "relion_project", 128, 2.0, 20000, 0.02),
    Dataset("3kpr-160-2k", "3KPR", "cryosplat", 160, 1.6, 2000, 0.1),
    # realistic (issue 31); 1.2 Å pixels: the truth does not reach Nyquist
    Dataset("4ake-real-80", "4AKE", "cryosplat", 80, 1.2, 4000, 0.03, REAL),
    Dataset("4e43-real-96", "4E43", "cryosplat", 96, 1.2, 5000, 0.03, REAL),
    Dataset("3kpr-real-128", "3KPR", "cryosplat", 128, 2.0, 6000, 0.03, REAL),
]


def structure_path(name: str, cache: Path) -> Path | None:
    """The model file of ``name`` (None: the built-in 4AKE), from ../shared or the
    MDAnalysisTests source package (downloaded once into ``cache``)."""
    if name == "4AKE":
        return None
    member = {"4E43": "4E43.pdb", "3KPR": "mmcif/3KPR.pdb.gz"}[name]
    shared = SHARED / Path(member).name
    if shared.exists():
        return shared
    target = cache / Path(member).name
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        if not list(cache.glob("mdanalysistests-*.tar.gz")):
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                                "--no-binary", ":all:", MDA, "-d", str(cache)],
                               capture_output=True, text=True, check=False)
            if r.returncode != 0:
                sys.exit(f"could not fetch {MDA} for {member}:\n{r.stderr[-2000:]}")
        sdist = next(cache.glob("mdanalysistests-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            found = [m for m in tar.getmembers()
                     if m.name.endswith(f"MDAnalysisTests/data/{member}")]
            if not found:
                sys.exit(f"{sdist} has no MDAnalysisTests/data/{member}")
            target.write_bytes(tar.extractfile(found[0]).read())
    return target


def simulate(ds: Dataset, work: Path, cache: Path, env: dict) -> tuple[dict, Path, Path]:
    """``ds`` simulated into work/NAME/sim (cryosplat simulate, then relion_project for its
    datasets): (the row so far, the particles' STAR, the ground truth); ``"skipped"`` in the
    row when relion_project is needed and absent."""
    d = work / ds.name
    cs = [sys.executable, "-m", "cryosplat"]
    structure = structure_path(ds.structure, cache)
    sim = [*cs, "simulate", *([str(structure)] if structure else []), "--out", str(d / "sim"),
           "--particles", str(ds.particles), "--box", str(ds.box), "--pixel-size",
           str(ds.pixel_size_A), "--snr", str(ds.snr), "--max-shift", str(3 * ds.pixel_size_A),
           "--seed", "1", *ds.effects, "--force"]
    _, wall, _ = run_child(sim, env)
    row = {**asdict(ds), "simulate_s": wall, "run_at": time.strftime("%Y-%m-%d %H:%M")}
    star, truth_path = d / "sim" / "particles.star", d / "sim" / "ground_truth.mrc"
    if ds.simulator == "relion_project":
        if ds.effects:  # relion_project would project at the STAR's perturbed poses
            raise ValueError(f"{ds.name}: effects are made by cryosplat simulate only")
        if not HAVE_RELION:
            return {**row, "skipped": "relion_project not installed"}, star, truth_path
        star, wall, _, sigma = relion_project_noisy(truth_path, star, d / "sim", ds.snr, env)
        row.update(relion_project_s=wall, white_noise_sigma=sigma)
    return row, star, truth_path


def run_dataset(ds: Dataset, work: Path, cache: Path, env: dict, gaussians: bool,
                objective: str = "volume") -> dict:
    d = work / ds.name
    cs = [sys.executable, "-m", "cryosplat"]
    row, star, truth_path = simulate(ds, work, cache, env)
    if "skipped" in row:
        return row
    truth = torch.from_numpy(mrcfile.read(truth_path).copy())
    box, pix = ds.box, ds.pixel_size_A
    curves = {}

    if HAVE_RELION:
        _, wall, rss = run_child(["relion_reconstruct", "--i", star.name, "--o",
                                  str(d / "relion.mrc"), "--ctf"], env, cwd=star.parent)
        curves["relion"] = truth_fsc(d / "relion.mrc", truth)
        row["relion"] = {"wall_s": wall, "peak_rss_MiB": rss,
                         "truth_resolution_A": crossings(curves["relion"], box, pix)}

    _, wall, rss = run_child([*cs, "backproject", str(star), "--out", str(d / "backproject"),
                              "--truth", str(truth_path), "--force"], env)
    b = BackprojectionSummary.read(d / "backproject" / "summary.json")
    curves["backproject"] = truth_fsc(d / "backproject" / "map.mrc", truth)
    row["backproject"] = {"wall_s": wall, "peak_rss_MiB": rss,
                          "truth_resolution_A": crossings(curves["backproject"], box, pix),
                          "half_map_resolution_A": b.headline.half_map_resolution_A}

    if gaussians:
        rec = d / ("reconstruct" if objective == "volume" else f"reconstruct_{objective}")
        _, wall, rss = run_child([*cs, "reconstruct", str(star), "--out", str(rec),
                                  "--truth", str(truth_path), "--objective", objective,
                                  "--force"], env)
        s = RunSummary.read(rec / "summary.json")
        curves["reconstruct"] = truth_fsc(rec / "map.mrc", truth)
        g = crossings(curves["reconstruct"], box, pix)
        row["reconstruct"] = {
            "wall_s": wall, "peak_rss_MiB": rss, "steps": s.steps, "truth_resolution_A": g,
            "objective": s.objective, "gaussians": s.gaussians, "stopped": s.stopped,
            "train_time_s": s.train_time_s,
            "half_map_resolution_A": s.headline.half_map_resolution_A,
            "cross_validated_resolution_A": s.headline.cross_validated_resolution_A,
            "cross_validated_is_limit": s.headline.cross_validated_is_limit}
        # what the terminal, summary.json and the report put first (Headline.resolution_A,
        # which the post-processing also takes); issue 31 asks it to be within one shell of
        # the map's own FSC 0.5 against the truth, and never more than one optimistic
        printed = s.headline.resolution_A
        row["reconstruct"]["printed_resolution_A"] = printed
        row["reconstruct"]["printed_is_limit"] = s.headline.resolution_is_limit
        row["reconstruct"]["printed_shells_beyond_truth_0.5"] = shells(printed, g["0.5"], box,
                                                                        pix)
        pp = s.postprocess or {}
        if "resolution_A" in pp:
            row["reconstruct"]["postprocess_resolution_A"] = pp["resolution_A"]
            row["reconstruct"]["postprocess_shells_beyond_truth_0.5"] = shells(
                pp["resolution_A"], g["0.5"], box, pix)
        support_A = json.loads((rec / "config.json").read_text())["train"][
            "support_radius_A"]
        if support_A > 0:
            # Gaussians kept inside a sphere leave the solvent empty, which alone lifts an
            # unmasked FSC against the truth: compare with the direct map in the same sphere
            # (4AKE, 3000 relion_project particles, SNR 0.02, --particle-diameter 80: 4.15
            # against 7.25 Å unmasked, but 4.15 against 4.02 Å with the direct map masked)
            sphere = spherical_mask(box, pix, radius_A=support_A, soft_edge_A=3 * pix)
            direct = torch.from_numpy(mrcfile.read(d / "backproject" / "map.mrc").copy())
            curves["backproject"] = fsc(direct * sphere, truth)
            row["backproject"]["truth_resolution_A_in_support"] = crossings(
                curves["backproject"], box, pix)
            row["support_radius_A"] = support_A
        supports = [rec / f"support_half_{h}.mrc" for h in (1, 2)]
        if all(f.is_file() for f in supports):
            # the Gaussians start inside each half-set's own support and few leave it, which
            # empties the solvent: how much of their gain that alone gives, the direct map
            # masked by the union of the two supports shows
            union = torch.maximum(*(torch.from_numpy(mrcfile.read(f).copy()) for f in supports))
            direct = torch.from_numpy(mrcfile.read(d / "backproject" / "map.mrc").copy())
            masked = fsc(direct * union, truth)
            row["backproject"]["truth_resolution_A_in_own_supports"] = crossings(masked, box, pix)
            row["gaussian_mean_fsc_minus_direct_in_own_supports"] = float(
                (curves["reconstruct"] - masked)[1:].mean())
            curves["backproject_in_own_supports"] = masked
        b = crossings(curves["backproject"], box, pix)
        row["gaussian_shells_beyond_direct"] = {t: shells(g[t], b[t], box, pix) for t in g}
        row["gaussian_mean_fsc_minus_direct"] = float(
            (curves["reconstruct"] - curves["backproject"])[1:].mean())
        if "relion" in row:
            row["reconstruct_wall_ratio_to_relion"] = wall / row["relion"]["wall_s"]
    if "relion" in row:
        row["backproject_wall_ratio_to_relion"] = (row["backproject"]["wall_s"]
                                                   / row["relion"]["wall_s"])
    row["truth_fsc"] = {k: v.tolist() for k, v in curves.items()}
    return row


def plot(rows: list[dict], path: Path) -> None:
    """FSC 0.5 resolution against the truth per dataset and method (top), the Gaussian map's
    mean FSC against the truth less the direct map's, unmasked and inside the Gaussians' own
    supports (middle), and wall time over relion_reconstruct's (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "backproject" in r]
    methods = [m for m in ("relion", "backproject", "reconstruct") if any(m in r for r in done)]
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(max(6, 1.3 * len(done)), 10))
    width = 0.8 / len(methods)
    colour = {"relion": "tab:grey", "backproject": "tab:blue", "reconstruct": "tab:orange"}
    for i, m in enumerate(methods):
        x = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(done))]
        res = [r[m]["truth_resolution_A"]["0.5"] if m in r else float("nan") for r in done]
        top.bar(x, res, width, label=m, color=colour[m])
        if m != "relion":
            ratio = [r[m]["wall_s"] / r["relion"]["wall_s"] if m in r and "relion" in r
                     else float("nan") for r in done]
            bottom.bar(x, ratio, width, label=m, color=colour[m])
    for i, (key, label) in enumerate((
            ("gaussian_mean_fsc_minus_direct", "direct map"),
            ("gaussian_mean_fsc_minus_direct_in_own_supports", "direct map in the own supports"))):
        middle.bar([j + (i - 0.5) * 0.4 for j in range(len(done))],
                   [r.get(key, float("nan")) for r in done], 0.4, label=f"Gaussian - {label}",
                   color=("tab:blue", "tab:purple")[i])
    middle.axhline(0, color="k", lw=0.8)
    middle.set_ylabel("mean FSC vs truth, difference")
    middle.legend(fontsize=8)
    for ax in (top, middle, bottom):
        ax.set_xticks(range(len(done)), [r["name"] for r in done], rotation=30, ha="right")
    top.legend(fontsize=8)
    top.set_ylabel("FSC 0.5 vs truth (Å, lower is better)")
    bottom.set_ylabel("wall time / relion_reconstruct")
    bottom.axhline(20, color="k", lw=0.8, ls="--", label="issue 16's limit (20x)")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def summary_line(rows: list[dict]) -> str:
    scored = [r for r in rows if "gaussian_shells_beyond_direct" in r]
    if not scored:
        return "no dataset ran the Gaussians"
    worst = min(scored, key=lambda r: r["gaussian_shells_beyond_direct"]["0.5"])
    line = (f"worst: {worst['name']}, the Gaussian map "
            f"{worst['gaussian_shells_beyond_direct']['0.5']:+.1f} shells from direct inversion "
            f"at FSC 0.5 vs truth "
            f"({worst['reconstruct']['truth_resolution_A']['0.5']:.2f} against "
            f"{worst['backproject']['truth_resolution_A']['0.5']:.2f} Å)")
    masked = [r for r in scored if "gaussian_mean_fsc_minus_direct_in_own_supports" in r]
    if masked:
        m = min(masked, key=lambda r: r["gaussian_mean_fsc_minus_direct_in_own_supports"])
        line += (f"; least gain over the direct map in the same supports: {m['name']}, mean FSC "
                 f"{m['gaussian_mean_fsc_minus_direct_in_own_supports']:+.3f}")
    timed = [r for r in scored if "reconstruct_wall_ratio_to_relion" in r]
    if timed:
        slow = max(timed, key=lambda r: r["reconstruct_wall_ratio_to_relion"])
        line += (f"; slowest: {slow['name']}, reconstruct "
                 f"{slow['reconstruct_wall_ratio_to_relion']:.0f}x relion_reconstruct")
    printed = [r for r in scored if "printed_shells_beyond_truth_0.5" in r["reconstruct"]]
    if printed:
        o = max(printed, key=lambda r: r["reconstruct"]["printed_shells_beyond_truth_0.5"])
        p = min(printed, key=lambda r: r["reconstruct"]["printed_shells_beyond_truth_0.5"])
        line += (f"; most optimistic printed resolution: {o['name']}, "
                 f"{o['reconstruct']['printed_resolution_A']:.2f} Å printed, "
                 f"{o['reconstruct']['printed_shells_beyond_truth_0.5']:+.1f} shells beyond the "
                 f"map's FSC 0.5 vs truth; most pessimistic: {p['name']}, "
                 f"{p['reconstruct']['printed_resolution_A']:.2f} Å, "
                 f"{p['reconstruct']['printed_shells_beyond_truth_0.5']:+.1f} shells")
    return line


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", nargs="+", choices=[d.name for d in DATASETS],
                    default=[d.name for d in DATASETS])
    ap.add_argument("--threads", type=int, default=2, help="threads of every process")
    ap.add_argument("--workdir", type=Path, default=None, help="Keep the data here")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "cryosplat-suite")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--no-gaussians", action="store_true", help="Skip cryosplat reconstruct")
    ap.add_argument("--objective", choices=["volume", "images"], default="volume",
                    help="reconstruct's --objective (its rows say which); the images objective "
                    "writes suite_images.json")
    ap.add_argument("--merge", type=Path, default=None, help="An earlier suite.json: keep its "
                    "rows for the datasets not run now (rerun one dataset on a quiet machine)")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    work = args.workdir or Path(tmp.name)
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    result = {**machine(), "threads": args.threads, "relion": HAVE_RELION, "datasets": []}
    earlier = {} if args.merge is None else {
        r["name"]: r for r in json.loads(args.merge.read_text())["datasets"]}
    new: dict[str, dict] = {}
    name = "suite.json" if args.objective == "volume" else f"suite_{args.objective}.json"
    for ds in (d for d in DATASETS if d.name in args.datasets):
        row = run_dataset(ds, work, args.cache, env, not args.no_gaussians, args.objective)
        new[ds.name] = row
        rows = {**earlier, **new}
        result["datasets"] = [rows[d.name] for d in DATASETS if d.name in rows]
        parts = [f"{ds.name:14}"]
        for m in ("relion", "backproject", "reconstruct"):
            if m in row:
                r = row[m]
                parts.append(f"{m} {r['wall_s']:6.1f} s {r['truth_resolution_A']['0.5']:5.2f}/"
                             f"{r['truth_resolution_A']['0.143']:5.2f} Å")
        if "gaussian_shells_beyond_direct" in row:
            parts.append(f"Gaussian - direct {row['gaussian_shells_beyond_direct']['0.5']:+.1f} "
                         f"shells (0.5), mean FSC {row['gaussian_mean_fsc_minus_direct']:+.3f}")
        if "gaussian_mean_fsc_minus_direct_in_own_supports" in row:
            parts.append(f"vs direct in own supports "
                         f"{row['gaussian_mean_fsc_minus_direct_in_own_supports']:+.3f}")
        print(" | ".join(parts) if "skipped" not in row else f"{ds.name}: {row['skipped']}",
              flush=True)
        write_json(result, args.out, name)  # after each dataset: a long run keeps its rows
    result["summary"] = summary_line(result["datasets"])
    write_json(result, args.out, name)
    plot(result["datasets"], args.out / name.replace(".json", ".png"))
    print(result["summary"])


if __name__ == "__main__":
    main()
