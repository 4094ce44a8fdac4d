"""Shared INT8 quantization: QDQ whole-graph quantization, Q/DQ-safe cuts, input checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("nncf")
ort = pytest.importorskip("onnxruntime")

from bundles import make_toy_bundle, toy_inputs  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgeperceiver.bundle import Bundle  # noqa: E402
from edgeperceiver.errors import ExportError, InputError  # noqa: E402
from edgeperceiver.passes.qdq_check import check_qdq_segments  # noqa: E402
from edgeperceiver.quantize import (  # noqa: E402
    QuantizeConfig,
    check_calibration,
    exit_agreement,
    qdq_segments,
    quantize_qdq,
    quantized_op_count,
    split_shared_quantizers,
)

SIZE, WIDTH = 16, 8


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return list(sess.run(None, feeds))


def _shared_dq_model() -> onnx.ModelProto:
    """x -> Q -> DQ, whose output feeds two Relu/Neg consumers (one shared quantizer)."""
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.int8), "z")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
        helper.make_node("Relu", ["xd"], ["a"], name="relu"),
        helper.make_node("Neg", ["xd"], ["b"], name="neg"),
    ]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 4])],
        initializer=[scale, zero],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_split_shared_quantizers_gives_each_consumer_its_own_pair() -> None:
    m = _shared_dq_model()
    out = split_shared_quantizers(m)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 2
    producer = {o: n for n in out.graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in out.graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    for n in out.graph.node:
        if n.op_type == "DequantizeLinear":
            assert consumers[n.output[0]] == 1
            assert producer[n.input[0]].op_type == "QuantizeLinear"
    onnx.checker.check_model(out)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    for a, b in zip(_run(m, {"x": x}), _run(out, {"x": x}), strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(m.graph.node) == 4  # input untouched


def test_check_qdq_segments_rejects_an_integer_tensor_crossing_a_cut() -> None:
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.int8), "z")
    seg = helper.make_model(helper.make_graph(
        [helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["y"])], "g",
        [helper.make_tensor_value_info("xq", TensorProto.INT8, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], initializer=[scale, zero],
    ))
    with pytest.raises(ExportError, match="integer tensor"):
        check_qdq_segments([seg])
    check_qdq_segments([_shared_dq_model()])  # a whole graph is fine


def test_check_calibration() -> None:
    x = np.zeros((2, 3, 8, 8), np.float64)
    assert check_calibration(x, ("batch", 3, 8, 8)).dtype == np.float32
    with pytest.raises(InputError, match="N, C, H, W"):
        check_calibration(np.zeros((3, 8, 8), np.float32))
    with pytest.raises(InputError, match="NaN"):
        check_calibration(np.full((1, 3, 8, 8), np.inf, np.float32))
    with pytest.raises(InputError, match="expects"):
        check_calibration(np.zeros((1, 3, 9, 8), np.float32), ("batch", 3, 8, 8))
    with pytest.raises(InputError, match="float"):
        check_calibration(np.zeros((1, 3, 8, 8), np.uint8))
    with pytest.raises(InputError, match="numpy"):
        check_calibration([[1.0]])  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy_bundle(tmp_path_factory.mktemp("q") / "toy", size=SIZE, width=WIDTH)


def test_quantize_qdq_is_quantized_close_and_cuts_like_fp32(toy: Path) -> None:
    b = Bundle.open(toy)
    m = onnx.load(str(b.path(b.manifest.model_path)))
    calib = toy_inputs(32, size=SIZE, seed=7)
    q = quantize_qdq(m, calib, config=QuantizeConfig(subset_size=32))
    assert quantized_op_count(q) > 0 and quantized_op_count(m) == 0
    x = toy_inputs(8, size=SIZE, seed=8)
    ref, got = _run(m, {"x": x}), _run(q, {"x": x})
    for r, g in zip(ref, got, strict=True):
        assert not np.array_equal(r, g)  # really quantized
        assert float(np.abs(r - g).max()) < 0.2 * float(np.abs(r).max())
    _qmodel, segs = qdq_segments(b.path(b.manifest.model_path), b.manifest, calib, QuantizeConfig(subset_size=32))
    assert len(segs) == len(b.manifest.segments)
    for spec, seg in zip(b.manifest.segments, segs, strict=True):
        assert {i.name for i in seg.graph.input} == {t.name for t in spec.inputs}
        assert {o.name for o in seg.graph.output} == {t.name for t in spec.outputs}
        assert quantized_op_count(seg) > 0
    rows = exit_agreement(ref, got, b.manifest.exits)
    assert [r["name"] for r in rows] == list(b.manifest.exits)
    assert all(r["top1_agreement"] >= 0.5 for r in rows)


def test_quantize_qdq_rejects_bad_inputs(toy: Path) -> None:
    b = Bundle.open(toy)
    m = onnx.load(str(b.path(b.manifest.model_path)))
    with pytest.raises(InputError, match="expects"):
        quantize_qdq(m, toy_inputs(4, size=SIZE + 2))
    with pytest.raises(InputError, match="no input"):
        quantize_qdq(m, toy_inputs(4, size=SIZE), input_name="nope")
    with pytest.raises(InputError, match="ModelProto"):
        quantize_qdq("model.onnx", toy_inputs(4, size=SIZE))
    with pytest.raises(InputError, match="preset"):
        quantize_qdq(m, toy_inputs(4, size=SIZE), config=QuantizeConfig(preset="fastest"))


@pytest.mark.parametrize("bad", ["0", "-2", True])
def test_target_options_reject_bad_thread_counts(bad: object) -> None:
    from edgeperceiver.targets.onnxruntime import OrtOptions
    from edgeperceiver.targets.openvino import OpenVINOOptions

    for cls in (OrtOptions, OpenVINOOptions):
        with pytest.raises(InputError, match="threads must be a positive integer"):
            cls.from_options({"threads": bad})
        assert cls.from_options({"threads": "2"}).threads == 2
