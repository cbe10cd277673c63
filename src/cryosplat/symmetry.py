"""Point-group symmetry with RELION's symbols and axes (``--sym``).

A map ``V`` has the symmetry of a group when ``V(S r) = V(r)`` for every matrix ``S`` of the
group, ``r = (x, y, z)`` in Å from the box centre (x the last array axis). The axes are
RELION's (Heymann, Chagoyen and Belnap 2005, J Struct Biol 151:196), and
tests/test_symmetry.py compares every group's matrices with those ``relion_refine
--print_symmetry_ops`` prints:

- ``Cn``: the n-fold axis along z.
- ``Dn``: the n-fold along z, a 2-fold along x.
- ``T``: a 3-fold along z, a 2-fold in the yz plane, along (0, sqrt(2/3), sqrt(1/3)).
- ``O``: 4-folds along x, y and z.
- ``I`` (= ``I2``): 2-folds along x, y and z, a 5-fold in the xz plane along (1, 0, phi).
  ``I1``: 2-folds along x, y, z, a 5-fold along (0, 1, phi). ``I3``: a 5-fold along z, a 2-fold
  along (-1, 0, phi). ``I4``: a 5-fold along z, a 2-fold along (1, 0, phi). (phi is the
  golden ratio; the vectors are normalised.)

Each group is the closure of its generators (:func:`close`), identity first.
"""

from __future__ import annotations

import functools
import math
import re

import torch

from cryosplat.errors import InputError

PHI = (1 + math.sqrt(5)) / 2


def rotation_about(axis: tuple[float, float, float], degrees: float) -> torch.Tensor:
    """The `(3, 3)` float64 matrix of a right-handed rotation by ``degrees`` about ``axis``
    (x, y, z; normalised here)."""
    a = torch.tensor(axis, dtype=torch.float64)
    a = a / a.norm()
    t = math.radians(degrees)
    k = torch.tensor([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(t) * k + (1 - math.cos(t)) * (k @ k)


def close(generators: list[torch.Tensor], limit: int = 60) -> torch.Tensor:
    """The group the ``generators`` (`(3, 3)` each) generate: `(G, 3, 3)`, identity first,
    the others in the order they are found. Raises if it grows past ``limit`` (the
    generators are not those of a finite point group)."""
    group = [torch.eye(3, dtype=torch.float64)]
    frontier = list(group)
    while frontier:
        new = []
        for g in frontier:
            for s in generators:
                m = s @ g
                if not any(torch.allclose(m, h, atol=1e-9) for h in group):
                    group.append(m)
                    new.append(m)
                    if len(group) > limit:
                        raise ValueError(f"the generators make more than {limit} matrices")
        frontier = new
    return torch.stack(group)


def _generators(symbol: str) -> list[torch.Tensor]:
    z, x = (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)
    m = re.fullmatch(r"([CD])(\d+)", symbol)
    if m:
        n = int(m.group(2))
        gens = [rotation_about(z, 360.0 / n)]
        return gens + [rotation_about(x, 180.0)] if m.group(1) == "D" else gens
    if symbol == "T":
        return [rotation_about(z, 120.0), rotation_about((0.0, math.sqrt(2 / 3), math.sqrt(1 / 3)),
                                                         180.0)]
    if symbol == "O":
        return [rotation_about(z, 90.0), rotation_about(x, 90.0)]
    if symbol in ("I", "I2"):
        return [rotation_about(z, 180.0), rotation_about(x, 180.0),
                rotation_about((1.0, 0.0, PHI), 72.0)]
    if symbol == "I1":
        return [rotation_about(z, 180.0), rotation_about(x, 180.0),
                rotation_about((0.0, 1.0, PHI), 72.0)]
    if symbol in ("I3", "I4"):
        sign = -1.0 if symbol == "I3" else 1.0
        return [rotation_about(z, 72.0), rotation_about((sign, 0.0, PHI), 180.0)]
    raise KeyError(symbol)


def symmetry_matrices(symbol: str) -> torch.Tensor:
    """The matrices `(G, 3, 3)` (float64, identity first) of RELION's point group ``symbol``:
    ``C1``, ``Cn``, ``Dn`` (n >= 2), ``T``, ``O``, ``I``, ``I1`` to ``I4``; case-insensitive.
    A new tensor each call; the closure is computed once per group (0.09 s for I)."""
    try:
        return _group(symbol.strip().upper()).clone()
    except KeyError:
        raise InputError(None, f"--sym {symbol!r}: expected C1, Cn, Dn (n >= 2), T, O, I or "
                               "I1-I4 (RELION's point groups)") from None


@functools.cache
def _group(s: str) -> torch.Tensor:
    """The closure of ``s``'s generators (upper case); KeyError for an unknown symbol."""
    m = re.fullmatch(r"([CD])(\d+)", s)
    n = int(m.group(2)) if m else 0
    if m and (n < 1 or (m.group(1) == "D" and n < 2)):
        raise KeyError(s)
    return close(_generators(s), limit=max(60, 2 * n))


def symmetry_or_none(symbol: str, device=None) -> torch.Tensor | None:
    """:func:`symmetry_matrices` as float32 on ``device``, or None for ``C1`` (no copies)."""
    m = symmetry_matrices(symbol)
    return None if len(m) == 1 else m.float().to(device)
