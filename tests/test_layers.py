"""The package's layers import one way (core <- targets <- calibration <- apps), without cycles.

Every import statement counts, also those inside functions (a lazy import is still a
dependency). ``edgeperceiver.targets``, ``edgeperceiver.calibration`` and ``edgeperceiver.cli``
are the repository's top-level ``targets/``, ``calibration/`` and ``cli.py``.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "edgeperceiver"

#: layer of a module by name prefix (longest prefix wins); everything else is core (0)
LAYERS = {
    "edgeperceiver.targets": 1,
    "edgeperceiver.calibration": 2,
    "edgeperceiver.cli": 3,
    "edgeperceiver.apps": 3,
}
NAMES = {0: "core", 1: "targets", 2: "calibration", 3: "apps"}


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for root, _dirs, files in os.walk(PKG, followlinks=True):
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = (Path(root) / f).relative_to(PKG.parent).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = Path(root) / f
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Internal modules that ``name`` imports (``from p import m`` counts as ``p.m`` when a module)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for a in node.names:
                full = f"{base}.{a.name}"
                found.add(full if full in known else base)
    return {m for m in found if m in known and m != name}


def _layer(module: str) -> int:
    best = ""
    for prefix in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
            best = prefix
    return LAYERS.get(best, 0)


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_the_links_make_one_namespace() -> None:
    mods = _modules()
    for m in ("edgeperceiver.targets.openvino", "edgeperceiver.calibration.calibrate", "edgeperceiver.cli",
              "edgeperceiver.runtime.runner", "edgeperceiver.apps.demo"):
        assert m in mods, m


def test_no_upward_imports() -> None:
    upward = [
        f"{m} ({NAMES[_layer(m)]}) imports {d} ({NAMES[_layer(d)]})"
        for m, deps in _graph().items() for d in sorted(deps) if _layer(d) > _layer(m)
    ]
    assert upward == []


def test_no_import_cycles() -> None:
    graph = _graph()
    # Tarjan's strongly connected components; a component of more than one module is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The walker resolves relative and function-level imports (so the checks above can fail)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from ..calibration import report\n    import edgeperceiver.cli\n")
    known = {"edgeperceiver.calibration", "edgeperceiver.calibration.report", "edgeperceiver.cli"}
    got = _imports("edgeperceiver.runtime.m", f, known)
    assert got == {"edgeperceiver.calibration.report", "edgeperceiver.cli"}
    assert _layer("edgeperceiver.calibration.report") > _layer("edgeperceiver.runtime.m")
