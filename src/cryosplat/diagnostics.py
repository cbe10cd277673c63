"""What a dataset holds and whether it is ready to reconstruct, without training: the data
behind ``cryosplat info`` and ``cryosplat validate``, as plain dicts."""

from __future__ import annotations

from typing import Any

import torch

from cryosplat.errors import InputError
from cryosplat.io.optics import MODELLED
from cryosplat.io.particles import Particles, empty_half_set


def summarise(p: Particles) -> dict:
    """Counts, optics, defocus, pose coverage and half-sets of a dataset, as plain data."""
    groups = []
    for o in p.optics:
        count = int((p.optics_group == o.number).sum())
        entry = {"number": o.number, "name": o.name, "particles": count,
                 "pixel_size_A": o.pixel_size_A, "box_size": o.box_size,
                 "voltage_kV": o.voltage_kV, "cs_mm": o.cs_mm,
                 "amplitude_contrast": o.amplitude_contrast}
        if p.ctf is not None and count:
            sel = p.optics_group == o.number
            for key in ("voltage_kV", "cs_mm", "amplitude_contrast"):
                values = sorted({round(float(v), 6) for v in getattr(p.ctf, key)[sel]})
                entry[key] = values[0] if len(values) == 1 else values  # per particle, as read
            entry.update(optics_summary(p.ctf[sel]))
        groups.append(entry)
    defocus = None
    if p.ctf is not None:
        mean = ((p.ctf.defocus_u_A + p.ctf.defocus_v_A) / 2 / 1e4).numpy()
        defocus = {"min": float(mean.min()), "max": float(mean.max()), "mean": float(mean.mean())}
    coverage = None if p.rotations is None else pose_coverage(p.rotations)
    half = p.half_set.numpy()
    shifts = p.shifts_A.norm(dim=-1)
    return {
        "file": p.source, "particles": len(p), "box_size": p.box_size,
        "pixel_size_A": sorted({round(float(x), 6) for x in p.pixel_size_A.unique()}),
        "image_stacks": len(p.images.files), "optics_groups": groups, "defocus_um": defocus,
        "pose_coverage": coverage,
        "shifts_A": {"max_abs": float(shifts.max()), "rms": float(shifts.pow(2).mean().sqrt())},
        "half_sets": {"defined": bool((half > 0).all()), "1": int((half == 1).sum()),
                      "2": int((half == 2).sum())},
        "image_model_columns": p.image_model,
        "reconstruction_grid": dict(zip(("pixel_size_A", "box_size"), p.common_grid()),
                                    rescaled=p.needs_rescaling()),
        "defaults": p.defaults,
    }


def optics_summary(ctf) -> dict:
    """The higher-order optics of one optics group (its first particle's; RELION keeps them
    per group), as plain data; empty where it has none."""
    out: dict[str, Any] = {}
    if ctf.beam_tilt_mrad is not None:
        out["beam_tilt_mrad"] = [round(float(x), 6) for x in ctf.beam_tilt_mrad[0]]
    if ctf.odd_zernike is not None:
        out["odd_zernike"] = [round(float(x), 6) for x in ctf.odd_zernike[0]]
    if ctf.even_zernike is not None:
        out["even_zernike"] = [round(float(x), 6) for x in ctf.even_zernike[0]]
    if ctf.mag_matrix is not None:
        out["mag_matrix"] = [round(float(x), 6) for x in ctf.mag_matrix[0].reshape(-1)]
    if ctf.premultiplied is not None:
        out["ctf_premultiplied"] = bool(ctf.premultiplied[0] != 0)
    return out


def validation_checks(p: Particles) -> list[dict]:
    """Everything ``reconstruct`` needs, as checks ``{check, status: ok|warn|fail, detail}``,
    without training: stacks and indices, poses, CTF and its ranges, pixel sizes, pose
    coverage, half-sets and shifts."""
    checks: list[dict] = []

    def add(name: str, status: str, detail: str) -> None:
        checks.append({"check": name, "status": status, "detail": detail})

    try:
        p.check_images()
        add("image stacks", "ok", f"{len(p.images.files)} stack(s), every index within its "
                                  f"stack, {p.box_size} x {p.box_size} px")
    except InputError as e:
        add("image stacks", "fail", str(e))
    add("poses", "ok" if p.rotations is not None else "fail",
        "present" if p.rotations is not None else "no angles: reconstruction needs poses")
    sizes = sorted({round(float(x), 6) for x in p.pixel_size_A.unique()})
    add("pixel size", "ok" if len(sizes) == 1 else "fail",
        (f"{sizes[0]:g} Å" + (f" ({p.defaults['pixel size']})" if "pixel size" in p.defaults
                              else "")) if len(sizes) == 1
        else f"optics groups differ: {sizes} Å")
    for column, treatment in p.image_model.items():
        add(f"column {column}", "ok" if treatment.startswith(MODELLED) else "warn", treatment)
    if p.ctf is not None and p.ctf.aberrations():
        add("higher-order optics", "ok", "modelled in the forward model and the direct "
                                         "inversion: " + ", ".join(p.ctf.aberrations()))
    if p.ctf is None:
        add("CTF", "fail", "no CTF parameters")
    else:
        c = p.ctf
        mean_um = ((c.defocus_u_A + c.defocus_v_A) / 2e4).numpy()
        astig_um = ((c.defocus_u_A - c.defocus_v_A).abs() / 2e4).numpy()
        ranges = [
            ("defocus", mean_um, 0.1, 10.0, "µm"),
            ("astigmatism", astig_um, 0.0, 1.0, "µm"),
            ("voltage", c.voltage_kV.numpy(), 60.0, 400.0, "kV"),
            ("Cs", c.cs_mm.numpy(), 0.0, 10.0, "mm"),
            ("amplitude contrast", c.amplitude_contrast.numpy(), 0.0, 0.5, ""),
        ]
        for name, v, lo, hi, unit in ranges:
            bad = int(((v < lo) | (v > hi)).sum())
            add(f"CTF {name}", "warn" if bad else "ok",
                f"{v.min():.3g} to {v.max():.3g} {unit}".rstrip()
                + (f"; {bad} particle(s) outside the usual {lo:g}-{hi:g} {unit}" if bad else ""))
    if p.rotations is not None:
        pc = pose_coverage(p.rotations)
        status = "warn" if pc["occupied_fraction"] < 0.25 or pc["max_over_mean"] > 20 else "ok"
        add("pose coverage", status, f"{pc['occupied_fraction']:.0%} of {pc['directions']} "
                                     f"directions seen; fullest {pc['max_over_mean']:.1f}x the mean"
            + ("; strongly preferred orientation" if status == "warn" else ""))
    half = p.half_set.numpy()
    if (half > 0).all():
        n1, n2 = int((half == 1).sum()), int((half == 2).sum())
        if min(n1, n2) == 0:
            add("half-sets", "fail", empty_half_set(half))
        else:
            add("half-sets", "ok" if min(n1, n2) >= 0.4 * max(n1, n2) else "warn",
                f"defined in the file: {n1} + {n2}")
    else:
        add("half-sets", "ok", "not in the file: a seeded random 50/50 split will be used")
    shift_px = (p.shifts_A.norm(dim=-1) / p.pixel_size_A).max()
    add("shifts", "warn" if shift_px > p.box_size / 4 else "ok",
        f"|origin| up to {float(shift_px):.1f} px of a {p.box_size} px box")
    return checks


def pose_coverage(rotations: torch.Tensor, n_directions: int = 400,
                  max_sample: int = 50_000) -> dict:
    """How evenly the viewing directions cover the sphere.

    Directions (the beam in map coordinates, third row of ``A``) are assigned to the nearest
    of ``n_directions`` near-uniform (Fibonacci) points; reports the fraction seen at least
    once and the fullest bin relative to the mean.
    """
    rot = rotations
    if len(rot) > max_sample:
        rot = rot[torch.linspace(0, len(rot) - 1, max_sample).long()]
    view = rot[:, 2, :].double()
    i = torch.arange(n_directions, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n_directions
    phi = torch.pi * (1 + 5**0.5) * i
    r = torch.sqrt(1 - z**2)
    points = torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], dim=-1)
    counts = torch.bincount((view @ points.T).argmax(dim=1), minlength=n_directions)
    return {"directions": n_directions, "occupied_fraction": float((counts > 0).double().mean()),
            "max_over_mean": float(counts.max() / counts.double().mean())}
