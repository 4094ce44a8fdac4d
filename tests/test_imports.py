"""Import hygiene: the runtime stays light, and every module of the package imports cleanly."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgeperceiver

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "onnx", "openvino", "tensorrt", "nncf", "typer", "PIL")


def _python(code: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def test_runtime_imports_and_runs_without_heavy_modules(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from bundles import make_toy_bundle, toy_inputs

    b = make_toy_bundle(tmp_path / "b", thresholds=[0.5, 0.4, None])
    np.save(tmp_path / "x.npy", toy_inputs(5))
    code = f"""
import json, sys
import numpy as np
import edgeperceiver, edgeperceiver.runtime, edgeperceiver.bundle
from edgeperceiver.runtime import load
r = load({str(b)!r}, threads=1)
pred = r.predict(np.load({str(tmp_path / 'x.npy')!r}))
names, _ = r.predict_files([{str(tmp_path / 'x.npy')!r}])
print(json.dumps({{"n": len(pred), "heavy": [m for m in {HEAVY!r} if m in sys.modules],
                  "ort": "onnxruntime" in sys.modules}}))
"""
    out = _python(code)
    assert out == {"n": 5, "heavy": [], "ort": True}


def test_light_modules_do_not_import_heavy_ones() -> None:
    light = ["edgeperceiver", "edgeperceiver.bundle", "edgeperceiver.errors", "edgeperceiver.types",
             "edgeperceiver._optional", "edgeperceiver.bench"]
    runtime = Path(edgeperceiver.__file__).parent / "runtime"
    light += [f"edgeperceiver.runtime.{m.name}" for m in pkgutil.iter_modules([str(runtime)]) if m.name != "__main__"]
    code = f"""
import importlib, json, sys
for m in {light!r}:
    importlib.import_module(m)
print(json.dumps({{"heavy": [m for m in {(*HEAVY, "onnxruntime")!r} if m in sys.modules]}}))
"""
    assert _python(code) == {"heavy": []}


def _all_modules() -> list[str]:
    names = []
    for pkg in ("edgeperceiver",):
        path = REPO / pkg
        if not (path / "__init__.py").is_file():
            continue
        names.append(pkg)
        names += [m.name for m in pkgutil.walk_packages([str(path)], prefix=f"{pkg}.")
                  if not m.name.endswith("__main__")]
    return names


def test_every_module_imports_cleanly() -> None:
    mods = _all_modules()
    assert "edgeperceiver.runtime.runner" in mods
    code = f"""
import importlib, json
failed = {{}}
for m in {mods!r}:
    try:
        importlib.import_module(m)
    except Exception as exc:  # collected and reported by the assertion below
        failed[m] = repr(exc)
print(json.dumps(failed))
"""
    assert _python(code) == {}
