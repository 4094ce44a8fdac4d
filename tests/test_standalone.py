"""The runtime copied into a bundle runs where edgeperceiver is not installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from bundles import make_toy_bundle, toy_inputs

from edgeperceiver.errors import ExportError
from edgeperceiver.runtime import load
from edgeperceiver.runtime.standalone import _check_light, install_standalone

HEAVY = ("torch", "onnx", "openvino", "tensorrt", "PIL", "typer", "rich")


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def test_install_standalone_writes_the_runtime(tmp_path: Path) -> None:
    files = install_standalone(tmp_path / "b")
    rel = {p.relative_to(tmp_path / "b").as_posix() for p in files}
    for need in ("run.py", "edgeperceiver/__init__.py", "edgeperceiver/errors.py", "edgeperceiver/types.py",
                 "edgeperceiver/bundle.py", "edgeperceiver/runtime/runner.py",
                 "edgeperceiver/runtime/onnxruntime.py", "edgeperceiver/runtime/backend.py"):
        assert need in rel
    assert not any("models" in r or "export" in r or "__pycache__" in r for r in rel)
    assert all(p.is_file() for p in files)


def test_heavy_package_init_is_refused(tmp_path: Path) -> None:
    init = tmp_path / "__init__.py"
    init.write_text("from __future__ import annotations\nimport json\nfrom .errors import X\n")
    _check_light(init)
    init.write_text("from .models import zoo\n")
    with pytest.raises(ExportError, match="models"):
        _check_light(init)
    init.write_text("import torch\n")
    with pytest.raises(ExportError, match="torch"):
        _check_light(init)


def _run_bundle(python: str, bundle: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``bundle/run.py`` in ``python``; the script then reports which heavy modules got imported."""
    code = (
        "import runpy, sys, json\n"
        f"sys.argv = ['run.py', *{list(args)!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(bundle / 'run.py')!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        "import edgeperceiver\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print('@@', json.dumps({'rc': rc, 'heavy': heavy, 'pkg': edgeperceiver.__file__}))\n"
    )
    return subprocess.run([python, "-I", "-c", code], cwd=cwd, env=_clean_env(), capture_output=True,
                          text=True, timeout=300, check=False)


def _check_output(proc: subprocess.CompletedProcess[str], bundle: Path, want: list[dict[str, object]]) -> None:
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    status = json.loads(lines[-1].removeprefix("@@ "))
    assert status["rc"] == 0, proc.stderr
    assert status["heavy"] == []
    assert Path(status["pkg"]).resolve().is_relative_to(bundle.resolve())
    doc = json.loads("\n".join(lines[:-1]))  # one JSON document, then the status line
    assert doc["entry"] == "onnxruntime-fp32" and doc["reason"] == "calibrated last"
    rows = doc["rows"]
    assert [(r["label"], r["exit"]) for r in rows] == [(w["label"], w["exit"]) for w in want]


def _expected(bundle: Path, x: np.ndarray) -> list[dict[str, object]]:
    pred = load(bundle, threads=1).predict(x)
    return [{"label": int(a), "exit": int(b)} for a, b in zip(pred.labels, pred.exits, strict=True)]


def test_run_py_from_a_copied_bundle(tmp_path: Path) -> None:
    b = make_toy_bundle(tmp_path / "built", thresholds=[0.5, 0.4, None], standalone=True)
    x = toy_inputs(9)
    np.save(tmp_path / "x.npy", x)
    moved = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(b, moved)
    proc = _run_bundle(sys.executable, moved, str(tmp_path / "x.npy"), "--json", "--threads", "1", cwd=tmp_path)
    _check_output(proc, moved, _expected(b, x))
    bad = _run_bundle(sys.executable, moved, str(tmp_path / "nope.npy"), cwd=tmp_path)
    assert "no such file" in bad.stderr
    assert '"rc": 2' in bad.stdout


def _cached_venv() -> Path:
    """A venv with only numpy and onnxruntime (same versions as here), cached in the temp dir."""
    ort = metadata.version("onnxruntime")
    versions = f"py{sys.version_info.major}{sys.version_info.minor}-np{np.__version__}-ort{ort}"
    root = Path(tempfile.gettempdir()) / f"edgeperceiver-standalone-venv-{versions}"
    py = root / "bin" / "python"
    if py.is_file():
        return root
    # build beside it, then rename: a venv's bin/python works after a move (scripts do not)
    staging = Path(tempfile.mkdtemp(prefix=f"{root.name}.", suffix=".staging", dir=root.parent))
    venv = staging / "venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"numpy=={np.__version__}",
             f"onnxruntime=={ort}"],
            check=True, timeout=600, env=_clean_env(),
        )
        try:
            os.rename(venv, root)
        except OSError:
            if not py.is_file():  # not another process's finished venv
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


@pytest.mark.slow
def test_run_py_in_a_venv_with_only_numpy_and_onnxruntime(tmp_path: Path) -> None:
    venv = _cached_venv()
    py = str(venv / "bin" / "python")
    probe = subprocess.run([py, "-c", "import PIL"], capture_output=True, text=True, check=False)
    if probe.returncode == 0:
        pytest.skip("the cached venv has Pillow; it must hold only numpy and onnxruntime")
    b = make_toy_bundle(tmp_path / "b", thresholds=[0.5, 0.4, None], standalone=True)
    x = toy_inputs(7)
    np.savez(tmp_path / "x.npz", x=x)
    proc = _run_bundle(py, b, str(tmp_path / "x.npz"), "--json", cwd=tmp_path)
    _check_output(proc, b, _expected(b, x))
    # an image input without Pillow: a clear error naming what to install
    (tmp_path / "im.png").write_bytes(b"\x89PNG")
    proc = _run_bundle(py, b, str(tmp_path / "im.png"), cwd=tmp_path)
    assert "pip install pillow" in proc.stderr
