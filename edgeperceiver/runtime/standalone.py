"""Copy the runtime into a bundle so it runs where edgeperceiver is not installed.

``install_standalone(dest)`` writes ``dest/edgeperceiver/`` (the package's ``__init__``,
``errors``, ``_optional``, ``types``, ``bundle`` and every ``runtime/*.py``: standard
library + numpy + one lazily imported backend) and ``dest/run.py``, so that on a device
with only numpy and a backend installed::

    python bundle/run.py IMAGES_OR_ARRAYS... [--entry E] [--json]

``run.py`` first checks the sha256 of every shipped ``.py`` file and that no unlisted file
sits in the bundle (so tampered code is refused before it runs), then puts its own directory
first on ``sys.path``, so the copied package wins over any installed one of another version.
It never reads or writes bytecode inside the bundle.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

from ..errors import ExportError
from ..fsutil import atomic_write

#: package files (relative to the package root) that the runtime needs, besides runtime/*.py
CORE_FILES = (
    "__init__.py",
    "errors.py",
    "_optional.py",
    "types.py",
    "fsutil.py",
    "versioned.py",
    "manifest.py",
    "bundle.py",
)

RUN_SCRIPT = '''\
#!/usr/bin/env python3
"""Run this edgeperceiver bundle: python run.py IMAGES_OR_ARRAYS... [--entry E] [--json].

Needs numpy and one backend (e.g. onnxruntime); Pillow only for image files.
"""
import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.realpath(__file__))


def _verify_runtime():
    """Before importing anything from the bundle: every shipped .py file matches its sha256 and
    no unlisted file could be imported (the bundle's directory goes first on sys.path)."""
    try:
        with open(os.path.join(HERE, "manifest.json"), encoding="utf-8") as f:
            files = json.load(f)["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        return f"bundle {HERE}: unreadable manifest.json ({exc})"
    for dirpath, dirs, names in os.walk(HERE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), HERE).replace(os.sep, "/")
            if rel != "manifest.json" and rel not in files:
                return f"bundle {HERE}: {rel} is not listed in the manifest (no checksum); refusing to run"
    for rel, digest in files.items():
        if not rel.endswith(".py"):
            continue  # models are verified when the bundle is opened
        try:
            with open(os.path.join(HERE, *rel.split("/")), "rb") as f:
                got = hashlib.sha256(f.read()).hexdigest()
        except OSError as exc:
            return f"bundle {HERE}: {rel} is unreadable ({exc.strerror})"
        if got != digest:
            return f"bundle {HERE}: {rel} fails its checksum (tampered or corrupt); refusing to run it"
    return None


if __name__ == "__main__":
    problem = _verify_runtime()
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(6)
    sys.dont_write_bytecode = True
    sys.pycache_prefix = os.path.join(HERE, "__pycache__", "unused")  # never read a .pyc from the bundle
    sys.path.insert(0, HERE)
    from edgeperceiver.runtime.command import main

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


def install_standalone(dest: str | os.PathLike[str]) -> list[Path]:
    """Copy the minimal runtime package and ``run.py`` into ``dest``; return the files written."""
    dest = Path(dest)
    sources = standalone_sources()
    _check_light(sources[0][0])
    written: list[Path] = []
    for src, rel in sources:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, src.read_bytes())
        written.append(target)
    run = dest / "run.py"
    atomic_write(run, RUN_SCRIPT.encode("utf-8"), mode=0o755)
    written.append(run)
    return written
