"""The demo end to end: real trained weights, real digits, ORT FP32 and OpenVINO INT8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeperceiver.bundle import Bundle


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    from edgeperceiver.apps.demo import run_demo

    lines: list[str] = []
    report = run_demo(tmp_path, echo=lines.append, rounds=1)

    bundle = Bundle.open(tmp_path / "bundle")
    assert {"onnxruntime-fp32", "openvino-int8"} <= set(bundle.manifest.targets)
    assert bundle.manifest.preprocess.resize is None  # the model's own transform: trained on whole images
    assert len(report.rows) == 4 and report.n_check > 200
    for row in report.rows:
        assert np.isclose(sum(row.share), 1.0)
        assert row.latency_ms > 0
        assert row.accuracy > 0.95  # a real trained model on real digits
    by = {(r.target, r.policy): r for r in report.rows}
    for key in ("onnxruntime-fp32", "openvino-int8"):
        last, early = by[(key, "last exit")], by[(key, "max-drop 0.5")]
        assert last.share[-1] == 1.0
        assert early.share[0] > 0.5  # most digits are easy: they leave at exit 1
        thresholds = bundle.manifest.targets[key].thresholds
        assert thresholds is not None and tuple(thresholds.values) == early.thresholds
    # INT8 keeps every exit's decisions within a point of FP32 on held-out digits
    fp32, int8 = (dict(report.exit_accuracy)[k] for k in ("onnxruntime-fp32", "openvino-int8"))
    assert all(abs(a - b) <= 0.01 for a, b in zip(fp32, int8, strict=True))
    assert all(p.is_file() for p in report.plots) and len(report.plots) == 2
    assert "held-out digits" in "\n".join(lines)
    # one engine thread throughout: the compile-time latencies (the calibration's costs) too
    assert report.threads == 1 and "1 thread(s) per engine" in report.render()
    assert all(e.metadata.get("latency_threads") == 1 for e in bundle.manifest.targets.values())
