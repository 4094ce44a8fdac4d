"""Many processes write and read one bundle at once: no update is lost, no reader fails.

Four worker processes run 200 operations in all on one bundle, interleaved: a manifest
edit that adds the worker's own key (a read-modify-write, the shape that loses updates
without a lock), ``calibrate --set`` (the library's ``set_thresholds``), ``compile``
(ONNX Runtime FP32) and ``run`` (open, verify, predict); real CLI processes run
``calibrate --set`` and ``run`` beside them. Afterwards every key a worker added is in the
manifest, the thresholds are one of those set, and no operation failed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from bundles import make_toy_bundle, toy_inputs

from edgeperceiver.bundle import Bundle

WORKERS, OPS = 4, 50  # 200 operations

_WORKER = """
import dataclasses, json, sys
import numpy as np
from edgeperceiver.bundle import Bundle, edit_bundle
from edgeperceiver.calibration import set_thresholds
from edgeperceiver.errors import EdgePerceiverError
from edgeperceiver.runtime import load
from edgeperceiver.targets import compile_bundle
from edgeperceiver.types import Precision, TargetName

root, wid, n, x = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), np.load(sys.argv[4])
log = []
for i in range(n):
    op = ("mark", "set", "compile", "run")[(i + wid) % 4]
    item = {"op": op, "i": i}
    try:
        if op == "mark":
            with edit_bundle(root) as w:
                w.manifest = dataclasses.replace(w.manifest, extra={**w.manifest.extra, f"w{wid}-{i}": i})
        elif op == "set":
            value = 0.5 + (wid * 1000 + i) / 1e6
            set_thresholds(root, f"{value!r},off,0", target="onnxruntime-int8")
            item["value"] = value
        elif op == "compile":
            compile_bundle(root, TargetName.ONNXRUNTIME, Precision.FP32,
                           options={"latency_runs": 0, "report_samples": 0, "threads": 1})
        else:
            pred = load(root, "onnxruntime-int8", threads=1).predict(x)
            item["exits"] = sorted(set(pred.exits.tolist()))
        item["ok"] = True
    except EdgePerceiverError as exc:
        item.update(ok=False, error=f"{type(exc).__name__}: {exc}")
    log.append(item)
print(json.dumps(log))
"""


@pytest.mark.slow
def test_concurrent_writers_and_readers_on_one_bundle(tmp_path: Path) -> None:
    from edgeperceiver.targets import compile_bundle
    from edgeperceiver.types import Precision, TargetName

    root = make_toy_bundle(tmp_path / "b")
    compile_bundle(root, TargetName.ONNXRUNTIME, Precision.INT8, calib_data=toy_inputs(16, seed=2),
                   options={"latency_runs": 0, "report_samples": 0, "threads": 1})  # fmt: skip
    x = tmp_path / "x.npy"
    np.save(x, toy_inputs(8))
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(root), str(w), str(OPS), str(x)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for w in range(WORKERS)
    ]  # fmt: skip
    cli = "import sys; from edgeperceiver.cli import main; sys.exit(main(sys.argv[1:]))"
    cli_sets = (0.25, 0.75)
    clis = [
        subprocess.Popen([sys.executable, "-c", cli, "calibrate", str(root), "--set", f"{v},off,0", "--entry",
                          "onnxruntime-int8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for v in cli_sets
    ] + [
        subprocess.Popen([sys.executable, "-c", cli, "run", str(root), str(x), "--entry", "onnxruntime-int8"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    logs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        logs.append(json.loads(out.strip().splitlines()[-1]))
    for p in clis:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    items = [item for log in logs for item in log]
    assert len(items) == WORKERS * OPS
    failed = [item for item in items if not item["ok"]]
    assert failed == []  # no writer timed out, no reader failed to open the bundle
    b = Bundle.open(root)
    marks = {f"w{w}-{item['i']}" for w, log in enumerate(logs) for item in log if item["op"] == "mark"}
    assert len(marks) == WORKERS * OPS // 4
    assert marks <= set(b.manifest.extra)  # every read-modify-write survived every other writer
    values = {item["value"] for item in items if item["op"] == "set"} | set(cli_sets)
    th = b.manifest.target("onnxruntime-int8").thresholds
    assert th is not None and th.values[0] in values and th.values[1:] == (None, 0.0)
    assert "onnxruntime-fp32" in b.manifest.targets
    siblings = [p.name for p in root.parent.iterdir() if p.name not in (root.name, "x.npy", "worker.py")]
    assert siblings and all(name.startswith(".b.v") for name in siblings)  # versions only: no staging, no lock


def test_thresholds_are_not_written_onto_a_recompiled_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    import edgeperceiver.calibration as cal
    from edgeperceiver.errors import CalibrationError
    from edgeperceiver.targets import compile_bundle
    from edgeperceiver.types import Precision, TargetName

    calibrate_module = importlib.import_module("edgeperceiver.calibration.calibrate")
    monkeypatch.setenv("EDGEPERCEIVER_CACHE", str(tmp_path / "cache"))
    root = make_toy_bundle(tmp_path / "b")
    fast = {"latency_runs": 0, "report_samples": 0, "threads": 1}
    compile_bundle(root, TargetName.ONNXRUNTIME, Precision.INT8, calib_data=toy_inputs(16, seed=2), options=fast)
    x = toy_inputs(60, seed=5)
    np.savez(tmp_path / "held.npz", x=x, y=np.arange(60) % 5)
    real_choose = calibrate_module.choose

    def choose_while_another_process_recompiles(*args, **kwargs):  # type: ignore[no-untyped-def]
        compile_bundle(root, TargetName.ONNXRUNTIME, Precision.INT8, calib_data=toy_inputs(16, seed=9), options=fast)
        return real_choose(*args, **kwargs)

    monkeypatch.setattr(calibrate_module, "choose", choose_while_another_process_recompiles)
    with pytest.raises(CalibrationError, match="compiled again while it was being calibrated"):
        cal.calibrate(root, tmp_path / "held.npz", target="onnxruntime-int8", goal=cal.MaxDrop(100))
    assert Bundle.open(root).manifest.target("onnxruntime-int8").thresholds is None
    monkeypatch.setattr(calibrate_module, "choose", real_choose)
    result = cal.calibrate(root, tmp_path / "held.npz", target="onnxruntime-int8", goal=cal.MaxDrop(100))
    assert Bundle.open(root).manifest.target("onnxruntime-int8").thresholds == result.thresholds
