"""Copy the runtime into a bundle so it runs where edgeperceiver is not installed.

``install_standalone(dest)`` writes ``dest/edgeperceiver/`` (the package's ``__init__``,
``errors``, ``_optional``, ``types``, ``bundle`` and every ``runtime/*.py``: standard
library + numpy + one lazily imported backend) and ``dest/run.py``, so that on a device
with only numpy and a backend installed::

    python bundle/run.py IMAGES_OR_ARRAYS... [--target T] [--json]

``run.py`` puts its own directory first on ``sys.path``, so the copied package wins over
any installed one of another version.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

from ..errors import ExportError

#: package files (relative to the package root) that the runtime needs, besides runtime/*.py
CORE_FILES = ("__init__.py", "errors.py", "_optional.py", "types.py", "bundle.py")

RUN_SCRIPT = '''\
#!/usr/bin/env python3
"""Run this edgeperceiver bundle: python run.py IMAGES_OR_ARRAYS... [--target T] [--json].

Needs numpy and one backend (e.g. onnxruntime); Pillow only for image files.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from edgeperceiver.runtime.command import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], bundle=HERE))
'''


def _package_root() -> Path:
    return Path(__file__).resolve().parents[1]


def standalone_sources() -> list[tuple[Path, str]]:
    """(source file, path relative to the destination) of every file the standalone copy holds."""
    root = _package_root()
    files = [(root / name, f"edgeperceiver/{name}") for name in CORE_FILES]
    files += [(p, f"edgeperceiver/runtime/{p.name}") for p in sorted((root / "runtime").glob("*.py"))]
    return files


def _check_light(init: Path) -> None:
    """Refuse to ship a package ``__init__`` that imports anything outside the copied modules."""
    shipped = {Path(name).stem for name in CORE_FILES} | {"runtime"}
    tree = ast.parse(init.read_text(encoding="utf-8"), filename=str(init))
    for node in ast.walk(tree):
        bad: str | None = None
        if isinstance(node, ast.ImportFrom):
            if node.level > 0:
                top = (node.module or "").split(".")[0]
                if top and top not in shipped:
                    bad = "." * node.level + (node.module or "")
                if not top:
                    bad = next((a.name for a in node.names if a.name not in shipped), None)
            elif (node.module or "").split(".")[0] not in sys.stdlib_module_names:
                bad = node.module
        elif isinstance(node, ast.Import):
            bad = next((a.name for a in node.names if a.name.split(".")[0] not in sys.stdlib_module_names), None)
        if bad is not None:
            raise ExportError(
                f"{init} imports {bad!r} at line {getattr(node, 'lineno', '?')}, which the standalone "
                "runtime does not ship; keep edgeperceiver/__init__.py light (stdlib + its core modules)"
            )


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def install_standalone(dest: str | os.PathLike[str]) -> list[Path]:
    """Copy the minimal runtime package and ``run.py`` into ``dest``; return the files written."""
    dest = Path(dest)
    sources = standalone_sources()
    _check_light(sources[0][0])
    written: list[Path] = []
    for src, rel in sources:
        target = dest / rel
        _write_atomic(target, src.read_bytes())
        written.append(target)
    run = dest / "run.py"
    _write_atomic(run, RUN_SCRIPT.encode("utf-8"))
    os.chmod(run, 0o755)
    written.append(run)
    return written
