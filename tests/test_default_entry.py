"""With no entry named, ``run``, ``bench``, ``bundle/run.py`` and ``runtime.load`` use the entry
calibrated last (with its thresholds), else the one compiled last, and say which."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from bundles import make_toy_bundle, toy_inputs

from edgeperceiver.bundle import Bundle
from edgeperceiver.cli import main
from edgeperceiver.runtime import load
from edgeperceiver.runtime.entries import NoThresholdsWarning, choose_entry


def _cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _run_py(bundle: Path, *args: str) -> tuple[str, str]:
    proc = subprocess.run([sys.executable, str(bundle / "run.py"), *args], capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr


def test_calibrated_entry_runs_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_toy_bundle(tmp_path / "b", logit_scale=4.0, standalone=True)
    x = toy_inputs(64, seed=3)
    y = load(root, "onnxruntime-fp32").all_exits(x)[-1].argmax(1)
    np.savez(tmp_path / "calib.npz", x=toy_inputs(32, seed=4))
    np.savez(tmp_path / "held.npz", x=x, y=y)
    np.save(tmp_path / "x.npy", x)

    # compiled, not calibrated: the entry compiled last runs, with a warning
    code, _, err = _cli(capsys, "compile", root, "--target", "onnxruntime", "--precision", "int8",
                        "--calib-data", tmp_path / "calib.npz")  # fmt: skip
    assert code == 0, err
    code, out, err = _cli(capsys, "run", root, tmp_path / "x.npy")
    assert code == 0, err
    assert "running entry onnxruntime-int8 (compiled last; no thresholds)" in err and "warning:" in err
    assert "64 sample(s); exit 3: 64" in out
    with pytest.warns(NoThresholdsWarning, match="onnxruntime-int8"):
        assert load(root).entry.key == "onnxruntime-int8"

    # calibrate that entry on held-out data: run, bench, run.py and load use it and its thresholds
    code, out, err = _cli(capsys, "calibrate", root, "--entry", "onnxruntime-int8", "--data", tmp_path / "held.npz",
                          "--max-drop", "50", "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["entry"] == "onnxruntime-int8"
    code, out, err = _cli(capsys, "run", root, tmp_path / "x.npy", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["entry"] == "onnxruntime-int8" and doc["reason"] == "calibrated last"
    assert doc["exit_counts"][0] > 0 and doc["warning"] is None
    code, out, err = _cli(capsys, "run", root, tmp_path / "x.npy")
    assert "running entry onnxruntime-int8 (calibrated last; thresholds max_drop" in err and "warning" not in err
    code, out, err = _cli(capsys, "bench", root, "--batch-sizes", "1", "--repeats", "2", "--data", tmp_path / "x.npy",
                          "--json")  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["entry"] == "onnxruntime-int8" and doc["data_exit_share"][0] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runner = load(root)
    assert runner.entry.key == "onnxruntime-int8" and runner.thresholds is not None
    assert (runner.predict(x).exits == 1).any()

    copy = tmp_path / "elsewhere"
    shutil.copytree(root, copy)
    out, err = _run_py(copy, str(tmp_path / "x.npy"), "--json")
    doc = json.loads(out)
    assert doc["entry"] == "onnxruntime-int8" and doc["exit_counts"][0] > 0
    out, err = _run_py(copy, str(tmp_path / "x.npy"))
    assert "running entry onnxruntime-int8 (calibrated last" in err and "exit 1: " in out

    # calibrating another entry makes it the default; recompiling one drops its thresholds
    code, _, err = _cli(capsys, "calibrate", root, "--entry", "onnxruntime-fp32", "--set", "0.5,0.5,0")
    assert code == 0, err
    assert choose_entry(Bundle.open(root).manifest).key == "onnxruntime-fp32"
    code, _, err = _cli(capsys, "compile", root, "--target", "onnxruntime", "--precision", "int8",
                        "--calib-data", tmp_path / "calib.npz")  # fmt: skip
    m = Bundle.open(root).manifest
    assert m.targets["onnxruntime-int8"].thresholds is None
    assert choose_entry(m).key == "onnxruntime-fp32" and choose_entry(m, "onnxruntime-int8").reason == "named"


def test_load_logs_the_entry_it_runs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_toy_bundle(tmp_path / "b", thresholds=[0.5, None, None])
    with caplog.at_level("INFO", logger="edgeperceiver.runtime"):
        runner = load(root)
    assert runner.entry.key == "onnxruntime-fp32"
    assert "loading entry onnxruntime-fp32 (calibrated last; thresholds manual" in caplog.text


def test_stamps_order_compiles_and_calibrations(tmp_path: Path) -> None:
    import dataclasses

    from edgeperceiver.bundle import Thresholds
    from edgeperceiver.types import Criterion

    m = Bundle.open(make_toy_bundle(tmp_path / "b")).manifest
    ref = m.targets["onnxruntime-fp32"]
    assert (ref.compiled, ref.calibrated) == (0, 0) and choose_entry(m).reason == "compiled last"
    m = m.with_target(dataclasses.replace(ref, thresholds=Thresholds(Criterion.MAX_SOFTMAX, (0.5, None, None))))
    assert m.targets["onnxruntime-fp32"].calibrated == 1
    m = m.with_target(dataclasses.replace(ref, thresholds=None))  # a recompile
    assert (m.targets["onnxruntime-fp32"].compiled, m.targets["onnxruntime-fp32"].calibrated) == (2, 0)
    again = type(m).from_dict(json.loads(m.to_json()))
    assert again.targets["onnxruntime-fp32"].compiled == 2


@pytest.mark.slow
def test_demo_openvino_int8_calibrated_runs_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The user's path on the demo: `demo --json`, then calibrate an entry on the demo's held-out
    digits (OpenVINO INT8, NNCF-quantized) and run, bench and a copied bundle's run.py with no
    entry named: they use it, say so, and samples leave at exit 1."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    pytest.importorskip("sklearn")
    from edgeperceiver.errors import CheckpointError
    from edgeperceiver.models import demo_checkpoint

    try:
        demo_checkpoint()
    except CheckpointError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "demo"
    code, text, err = _cli(capsys, "demo", "-o", out, "--json")
    assert code == 0, err
    doc = json.loads(text)  # one document: NNCF's own progress output went to stderr
    root, held = Path(doc["bundle"]), out / "heldout"
    assert {r["target"] for r in doc["rows"]} == {"onnxruntime-fp32", "openvino-int8"} and doc["n_check"] > 200

    # the demo calibrates OpenVINO INT8 last; calibrating another entry makes that one the default
    code, text, err = _cli(capsys, "run", root, held, "--json")
    assert code == 0, err
    assert json.loads(text)["entry"] == "openvino-int8"
    code, _, err = _cli(capsys, "calibrate", root, "--entry", "onnxruntime-fp32", "--data", held, "--max-drop", "1")
    assert code == 0, err
    code, text, err = _cli(capsys, "run", root, held, "--json")
    assert json.loads(text)["entry"] == "onnxruntime-fp32"

    # calibrate with no entry named: the entry compiled last (OpenVINO INT8)
    code, _, err = _cli(capsys, "calibrate", root, "--data", held, "--max-drop", "0.5")
    assert code == 0, err
    assert "calibrating entry openvino-int8 (compiled last)" in err
    code, text, err = _cli(capsys, "run", root, held, "--json")
    assert code == 0, err
    doc = json.loads(text)
    assert doc["entry"] == "openvino-int8" and doc["reason"] == "calibrated last"
    assert doc["exit_counts"][0] > 0 and doc["samples"] == 539
    code, text, err = _cli(capsys, "run", root, held)
    assert "running entry openvino-int8 (calibrated last; thresholds max_drop=0.5" in err
    code, text, err = _cli(capsys, "bench", root, "--data", held, "--batch-sizes", "1", "--repeats", "3", "--json")
    assert code == 0, err
    doc = json.loads(text)
    assert doc["entry"] == "openvino-int8" and doc["data_exit_share"][0] > 0

    copy = tmp_path / "device" / "bundle"
    shutil.copytree(root, copy)
    text, err = _run_py(copy, str(held), "--json")
    doc = json.loads(text)
    assert doc["entry"] == "openvino-int8" and doc["exit_counts"][0] > 0
