"""The package's layout stays what docs/architecture.md describes: small modules, no import
cycle, imports at the top of modules, and every module named in the architecture page."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "cryosplat"
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
# Imports allowed inside functions, each for a measured reason.
LATE_IMPORTS = {("report", "matplotlib"), ("report", "matplotlib.pyplot"),  # 0.4 s start-up
                ("mapviews", "mpl_toolkits.mplot3d.art3d"),
                ("mapviews", "mpl_toolkits.mplot3d.art3d.Poly3DCollection")}


def modules() -> dict[str, Path]:
    """Dotted name (without ``cryosplat.``) of every module of the package, to its file."""
    out = {}
    for f in sorted(SRC.rglob("*.py")):
        parts = f.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name or "__init__"] = f
    return out


def module_imports(name: str, path: Path) -> tuple[set[str], list[tuple[str, str]]]:
    """(cryosplat modules imported at module level, outside ``if TYPE_CHECKING``;
    (module, imported name) of every import inside a function or class)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    known = modules()
    top, late = set(), []

    def targets(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        assert node.level == 0, f"{path}: relative import"  # the package imports absolutely
        base = node.module or ""
        # "from cryosplat.io import x" may import the module cryosplat.io.x
        return [base] + [f"{base}.{a.name}" for a in node.names]

    def visit(node, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for t in targets(child):
                    if nested:
                        late.append((name, t))
                    elif t.startswith("cryosplat.") and t[len("cryosplat."):] in known:
                        top.add(t[len("cryosplat."):])
                    elif t == "cryosplat":
                        top.add("__init__")
            else:
                visit(child, nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                          ast.ClassDef)))

    visit(tree, False)
    return top - {name}, late


def test_every_module_is_small_and_cli_holds_only_commands():
    sizes = {n: len(p.read_text(encoding="utf-8").splitlines()) for n, p in modules().items()}
    assert {n: s for n, s in sizes.items() if s > 400} == {}
    for name in ("cli.py", "cli_poses.py"):
        tree = ast.parse((SRC / name).read_text(encoding="utf-8"))
        helpers = [f.name for f in tree.body if isinstance(f, (ast.FunctionDef, ast.ClassDef))
                   and f.name != "main" and not any(
                       isinstance(d, ast.Call) and ast.unparse(d.func) == "app.command"
                       for d in getattr(f, "decorator_list", []))]
        assert helpers == [], f"{name} holds typer commands only; move {helpers} to their module"


def test_no_import_cycle():
    graph = {n: module_imports(n, p)[0] for n, p in modules().items()}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(n: str, path: list[str]) -> None:
        if state.get(n) == 2:
            return
        assert state.get(n) != 1, "import cycle: " + " -> ".join(path + [n])
        state[n] = 1
        for m in sorted(graph[n]):
            visit(m, path + [n])
        state[n] = 2

    for n in graph:
        visit(n, [])
    # the check can see a cycle: the CLI is above the run, which is above training
    assert "run" in graph["cli"] and "train" in graph["run"]


def test_imports_are_at_the_top_of_modules():
    late = [x for n, p in modules().items() for x in module_imports(n, p)[1]]
    assert [x for x in late if x not in LATE_IMPORTS] == []


def test_architecture_page_names_every_module():
    text = DOC.read_text(encoding="utf-8")
    missing = [n for n in modules() if n != "__init__" and not n.endswith("__main__")
               and f"{n.replace('.', '/')}" not in text]
    assert missing == []


def documented_layers() -> list[list[str]]:
    """The numbered layer list of docs/architecture.md, top first, as dotted module names."""
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## Layers"):]
    section = section[:section.index("\n## ")] if "\n## " in section[3:] else section
    layers = []
    for line in section.splitlines():
        m = re.match(r"\d+\. (.*)", line)
        if m:
            layers.append([n.replace("/", ".") for n in re.findall(r"`([^`]+)`", m.group(1))])
    return layers


def test_every_import_goes_down_the_documented_layers():
    """docs/architecture.md's layers hold every module once, and no module imports one of a
    layer above its own (a module placed wrongly, or a new arrow up, fails here)."""
    layers = documented_layers()
    level = {n: i for i, names in enumerate(layers) for n in names}
    listed = [n for names in layers for n in names]
    assert len(listed) == len(set(listed)), "a module is listed in two layers"
    mods = {n for n in modules() if n != "__init__"}
    assert mods - set(level) == set(), "modules missing from docs/architecture.md's layers"
    assert set(level) - mods == set(), "layers name modules that do not exist"
    up = [f"{n} (layer {level[n] + 1}) imports {m} (layer {level[m] + 1})"
          for n, p in modules().items() if n != "__init__"
          for m in module_imports(n, p)[0] if m != "__init__" and level[m] < level[n]]
    assert up == []
    # the check can fail: the CLI is above everything it runs
    assert level["cli"] < level["run"] < level["train"] < level["fourier_slice"]


def test_every_public_definition_has_a_docstring():
    """Every public function, class and method of the package says what it does."""
    missing = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))

        def visit(node, prefix: str) -> None:
            for c in node.body:
                if isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    if c.name.startswith("_"):
                        continue
                    if ast.get_docstring(c) is None:
                        missing.append(f"{prefix}{c.name}")
                    if isinstance(c, ast.ClassDef):
                        visit(c, f"{prefix}{c.name}.")

        visit(tree, f"{name}.")
        if ast.get_docstring(tree) is None and not name.endswith("__main__"):
            missing.append(f"{name} (module)")
    assert missing == []


def test_frequency_grids_are_built_in_their_two_homes():
    """FFT frequency grids come from fourier.py (the box's) and fourier_slice.py (the padded
    grid's) only, so each convention is written once."""
    homes = {"fourier", "fourier_slice"}
    builders = sorted(n for n, p in modules().items()
                      if re.search(r"\bfftfreq\(|\brfftfreq\(", p.read_text(encoding="utf-8"))
                      and n not in homes)
    assert builders == []
    assert "fftfreq(" in (SRC / "fourier_slice.py").read_text(encoding="utf-8")
