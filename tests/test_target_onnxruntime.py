"""ONNX Runtime target: fp32 = the raw segments, int8 = the shared QDQ graph, cut."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("nncf")

from bundles import make_toy_bundle, toy_inputs

from edgeperceiver.bundle import Bundle
from edgeperceiver.errors import InputError
from edgeperceiver.quantize import quantized_op_count
from edgeperceiver.runtime.runner import load
from edgeperceiver.targets import compile_bundle
from edgeperceiver.types import Precision, TargetName

SIZE, WIDTH = 16, 8
FAST = {"latency_runs": 3, "report_samples": 16, "threads": 1}


def test_fp32_and_int8_entries(tmp_path: Path) -> None:
    import onnx

    root = make_toy_bundle(tmp_path / "toy", size=SIZE, width=WIDTH)
    raw = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (root / "segments").iterdir()}
    fp32 = compile_bundle(root, TargetName.ONNXRUNTIME, Precision.FP32, options=FAST)
    assert fp32.segments == tuple(s.path for s in Bundle.open(root).manifest.segments)
    assert len(fp32.latency_ms) == 3 and fp32.metadata["segment_ms"]
    int8 = compile_bundle(root, TargetName.ONNXRUNTIME, Precision.INT8,
                          calib_data=toy_inputs(32, size=SIZE, seed=3), options=FAST)
    b = Bundle.open(root)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (root / "segments").iterdir()} == raw
    # INT8 runs the bundle's quantization stage: one QDQ graph and its cut, recorded in the manifest
    stage = b.manifest.quantization
    assert stage is not None and stage.tool.startswith("nncf ") and stage.preset == "performance"
    assert stage.calibration_images == 32 and len(stage.calibration_sha256) == 64
    folder = stage.model.rpartition("/")[0]
    assert re.fullmatch(r"quantized-[0-9a-f]{12}", folder)
    assert int8.segments == stage.segments == tuple(f"{folder}/seg{k}.onnx" for k in (1, 2, 3))
    assert int8.monolithic == stage.model == f"{folder}/model.onnx"
    assert int8.metadata["quantization"]["stage"] == folder
    for rel in int8.segments:
        assert quantized_op_count(onnx.load(str(b.path(rel)))) > 0
    rows = int8.metadata["agreement"]["exits"]
    assert len(rows) == 3 and all(r["max_abs_logit_diff"] > 0 for r in rows)

    x = toy_inputs(6, size=SIZE, seed=4)
    ref = load(b, "onnxruntime-fp32").all_exits(x)
    got = load(b, "onnxruntime-int8", threads=1).all_exits(x)
    for r, q in zip(ref, got, strict=True):
        assert not np.array_equal(r, q)
        assert float(np.abs(q - r).max()) < 0.25 * float(np.abs(r).max())
    # the same settings and images reuse the stage (no second quantization)
    again = compile_bundle(root, TargetName.ONNXRUNTIME, Precision.INT8,
                           calib_data=toy_inputs(32, size=SIZE, seed=3), options=FAST)
    assert again.segments == int8.segments and Bundle.open(root).manifest.quantization == stage
    with pytest.raises(InputError, match="ONNX Runtime: unknown option"):
        compile_bundle(root, TargetName.ONNXRUNTIME, Precision.FP32, options={"turbo": 1})
