"""End to end on the demo model (trained on real digits): OpenVINO INT8 keeps every exit's accuracy.

Slow: exports the shipped demo checkpoint, compiles OpenVINO fp32 and int8 (calibrated on
300 training images) and compares top-1 accuracy per exit on the held-out digits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("nncf")
pytest.importorskip("torch")
pytest.importorskip("sklearn")

from edgeperceiver.errors import CheckpointError
from edgeperceiver.runtime.runner import load
from edgeperceiver.targets import compile_bundle
from edgeperceiver.types import Precision, TargetName

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    from edgeperceiver.datasets.digits import load_digits_split, to_model_input
    from edgeperceiver.export import export_checkpoint
    from edgeperceiver.models import demo_checkpoint

    try:
        ckpt = demo_checkpoint()
    except CheckpointError as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("demo") / "bundle"
    export_checkpoint(ckpt, root, threads=2)
    split = load_digits_split(32)
    calib = to_model_input(split.x_train)[:300]
    compile_bundle(root, TargetName.OPENVINO, Precision.FP32, options={"threads": 2, "latency_runs": 5})
    compile_bundle(root, TargetName.OPENVINO, Precision.INT8, calib_data=calib,
                   options={"threads": 2, "latency_runs": 5, "report_samples": 128})
    return root, calib, to_model_input(split.x_heldout), split.y_heldout


def test_int8_keeps_every_exit_within_half_a_point(demo: tuple[Path, np.ndarray, np.ndarray, np.ndarray]) -> None:
    root, _, x, y = demo
    ref = load(root, "onnxruntime-fp32", threads=2).all_exits(x)  # the raw segments
    fp32 = load(root, "openvino-fp32", threads=2).all_exits(x)
    int8 = load(root, "openvino-int8", threads=2).all_exits(x)
    for k, (r, f, q) in enumerate(zip(ref, fp32, int8, strict=True), start=1):
        np.testing.assert_allclose(f, r, atol=1e-4 * max(1.0, float(np.abs(r).max())))
        acc_f = float(np.mean(r.argmax(1) == y)) * 100
        acc_q = float(np.mean(q.argmax(1) == y)) * 100
        assert acc_f > 80.0, f"exit {k}: the demo model should be trained (fp32 accuracy {acc_f:.1f}%)"
        # INT8 may not lose more than half a point; it may flip a few images either way
        assert acc_q >= acc_f - 0.5 - 1e-9, f"exit {k}: fp32 {acc_f:.2f}% vs int8 {acc_q:.2f}%"
        assert abs(acc_q - acc_f) <= 1.0 + 1e-9, f"exit {k}: fp32 {acc_f:.2f}% vs int8 {acc_q:.2f}%"
        assert not np.array_equal(q, r)  # really quantized


def test_int8_early_exit_matches_running_alone(demo: tuple[Path, np.ndarray, np.ndarray, np.ndarray]) -> None:
    root, _, x, _ = demo
    runner = load(root, "openvino-int8", threads=2, thresholds=[0.9, 0.8, 0.7, None])
    xs = x[:24]
    batch = runner.predict(xs)
    for i in range(len(xs)):
        alone = runner.predict(xs[i : i + 1])
        assert alone.exits[0] == batch.exits[i] and alone.labels[0] == batch.labels[i]
