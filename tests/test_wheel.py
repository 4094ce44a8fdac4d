"""The built wheel: one top-level name, a runtime that needs numpy alone, and a working command."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, **kw)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)])
    (whl,) = out.glob("edgeperceiver-*.whl")
    return whl


def test_the_only_top_level_name_is_edgeperceiver(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"edgeperceiver"}
    for module in ("edgeperceiver/cli.py", "edgeperceiver/targets/__init__.py", "edgeperceiver/calibration/__init__.py",
                   "edgeperceiver/runtime/runner.py"):
        assert module in names


def test_a_fresh_venv_runs_the_runtime_with_numpy_alone_and_the_command(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    _run([py, "-m", "pip", "install", "-q", "--no-deps", str(wheel), "numpy"])
    probe = ("import sys, edgeperceiver.runtime, edgeperceiver.bundle; "
             "print(sorted(m for m in ('torch', 'onnx', 'openvino', 'tensorrt', 'PIL', 'typer') if m in sys.modules))")
    assert _run([py, "-c", probe], cwd=tmp_path).stdout.strip() == "[]"
    _run([py, "-m", "pip", "install", "-q", "typer", "rich"])
    out = _run([str(venv / "bin" / "edgeperceiver"), "--help"], cwd=tmp_path).stdout
    assert "export" in out and "compile" in out and "calibrate" in out
