"""Type-check the TensorRT modules against the ``tensorrt-stubs`` package with mypy.

TensorRT itself cannot be installed on development/CI machines, so its API use is checked
statically (both code paths: weakly typed builds for 10.3..10.11, strongly typed ones).
The stubs (10.13.0.35.1) cannot be used by mypy as installed: they put a bare
``tensorrt/__init__.pyi`` into site-packages without ``py.typed`` (mypy skips it as an
untyped package) and ``tensorrt_bindings/tensorrt.pyi`` has syntax errors (parameters
named ``in``, a keyword; a parameter without default after defaults). This test copies the
installed stub files, fixes exactly those two mechanical problems, and runs mypy on our
TensorRT modules with the copy on ``mypy_path``; errors inside the stub files themselves are
silenced, errors in our code are not.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: every module that calls TensorRT (the build and the runtime, both typings)
MODULES = tuple(sorted(str(p.relative_to(ROOT)) for d in ("targets", "edgeperceiver/runtime")
                       for p in (ROOT / d).glob("tensorrt*.py")))

pytestmark = pytest.mark.slow


def _patched_stubs(dest: Path) -> Path:
    try:
        dist = importlib.metadata.distribution("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs)")
    stubs = dest / "stubs"
    copied = 0
    for f in dist.files or []:
        parts = Path(str(f)).parts
        if str(f).endswith(".pyi") and parts[0] in ("tensorrt", "tensorrt_bindings"):
            src = Path(str(dist.locate_file(f)))
            out = stubs.joinpath(*parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            text = src.read_text(encoding="utf-8")
            text = re.sub(r"(?<=[(, ])in: ", "in_: ", text)
            text = text.replace("channel_axis: int) ->", "channel_axis: int = ...) ->")
            out.write_text(text, encoding="utf-8")
            copied += 1
    if not copied:
        pytest.skip("tensorrt-stubs has no .pyi files for tensorrt")
    return stubs


def _mypy(tmp_path: Path, files: list[str]) -> subprocess.CompletedProcess[str]:
    if shutil.which("mypy") is None and not Path(sys.executable).with_name("mypy").exists():
        pytest.skip("mypy is not installed")
    stubs = _patched_stubs(tmp_path)
    cfg = tmp_path / "mypy.ini"
    cfg.write_text(
        textwrap.dedent(
            f"""\
            [mypy]
            python_version = 3.11
            mypy_path = {stubs}
            ignore_missing_imports = True
            check_untyped_defs = True
            warn_unused_ignores = True
            no_implicit_optional = True
            follow_imports = silent

            [mypy-tensorrt,tensorrt.*,tensorrt_bindings,tensorrt_bindings.*]
            ignore_errors = True
            """
        ),
        encoding="utf-8",
    )
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(cfg), "--cache-dir", str(tmp_path / "cache"),
           "--python-executable", sys.executable, *files]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_tensorrt_modules_typecheck_against_stubs(tmp_path: Path) -> None:
    proc = _mypy(tmp_path, list(MODULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_stubs_are_really_in_effect(tmp_path: Path) -> None:
    """A wrong use of the TensorRT API must be caught (so the test above can fail)."""
    bad = tmp_path / "bad_trt_use.py"
    bad.write_text(
        textwrap.dedent(
            """\
            import tensorrt as trt

            def build() -> None:
                builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
                network = builder.create_network("strongly typed")
                reveal_type(network)
            """
        ),
        encoding="utf-8",
    )
    proc = _mypy(tmp_path, [str(bad)])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "INetworkDefinition" in out, out
    assert 'incompatible type "str"' in out, out
