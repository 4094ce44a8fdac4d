"""Shared INT8 quantization: QDQ whole-graph quantization, Q/DQ-safe cuts, input checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    with pytest.raises(InputError, match="activation_ranges"):
        quantize_qdq(m, toy_inputs(4, size=SIZE), config=QuantizeConfig(activation_ranges="mean"))


def _input_scale(ranges: str, feeds: list[dict[str, np.ndarray]]) -> float:
    """The scale NNCF gives the quantizer of ``x`` in x [1, 8] -> MatMul -> y."""
    from edgeperceiver.quantize import nncf_quantize

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "fc",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    q = nncf_quantize(model, feeds, QuantizeConfig(activation_ranges=ranges, bias_correction=False))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    (node,) = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x"]
    return float(inits[node.input[1]])


def test_activation_ranges_cover_every_calibration_image_by_default() -> None:
    # one calibration image per step, most small, a few wide: the default range covers the
    # widest image; NNCF's own default (the mean of each step's extremes) clips it
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.uniform(-1, 1, (1, 8)).astype(np.float32) * (8.0 if i % 10 == 0 else 1.0)} for i in range(40)]
    widest = max(float(np.abs(f["x"]).max()) for f in feeds)
    assert QuantizeConfig().activation_ranges == "minmax"
    assert QuantizeConfig().describe()["activation_ranges"] == "minmax"
    minmax = _input_scale("minmax", feeds)
    assert minmax * 128 >= widest * (1 - 1e-6) and minmax * 127 <= widest * 1.05
    assert _input_scale("mean_minmax", feeds) * 128 < 0.5 * widest


def test_target_options_check_the_quantizer_settings_before_any_work() -> None:
    from edgeperceiver.targets.onnxruntime import OrtOptions
    from edgeperceiver.targets.openvino import OpenVINOOptions
    from edgeperceiver.targets.tensorrt_options import BuildOptions

    for parse in (OrtOptions.from_options, OpenVINOOptions.from_options, BuildOptions.from_mapping):
        with pytest.raises(InputError, match="activation_ranges must be one of"):
            parse({"activation_ranges": "mean"})
        with pytest.raises(InputError, match="preset must be"):
            parse({"preset": "fastest"})
        assert parse({"activation_ranges": "histogram"}).quant.activation_ranges == "histogram"


@pytest.mark.parametrize("bad", ["0", "-2", True])
def test_target_options_reject_bad_thread_counts(bad: object) -> None:
    from edgeperceiver.targets.onnxruntime import OrtOptions
    from edgeperceiver.targets.openvino import OpenVINOOptions

    for cls in (OrtOptions, OpenVINOOptions):
        with pytest.raises(InputError, match="threads must be a positive integer"):
            cls.from_options({"threads": bad})
        assert cls.from_options({"threads": "2"}).threads == 2


# --------------------------------------------------------------------------- the accuracy ladder


def _stage(root: Path, calib: np.ndarray, config: QuantizeConfig) -> dict[str, Any]:
    from edgeperceiver.bundle import edit_bundle
    from edgeperceiver.quant_stage import ensure_quantized

    with edit_bundle(root) as writer:
        stage = ensure_quantized(writer, calib, config)
    return dict(stage.config)


def test_ladder_retries_with_more_in_float_when_the_first_candidate_misses_the_gate(tmp_path: Path) -> None:
    """A gate of 0 points (every exit must agree with FP32 on every calibration image) makes the
    configured candidate fail (40 classes of random weights: INT8 flips many near-ties); the stage
    then quantizes again with each rung's scopes in float."""
    root = make_toy_bundle(tmp_path / "toy", size=SIZE, width=WIDTH, num_classes=40)
    calib = toy_inputs(96, size=SIZE, seed=11)
    config = _stage(root, calib, QuantizeConfig(subset_size=96, ladder_gate=0.0))
    gate = config["gate"]
    attempts = gate["attempts"]
    assert gate["gate_points"] == 0.0 and gate["images"] == 96
    assert attempts[0]["float_ops"] == [] and not attempts[0]["within_gate"]
    assert min(attempts[0]["top1_agreement"]) < 1.0
    assert [a["float_ops"] for a in attempts[1:]] == [["early_convs"], ["early_convs", "convs"]][: len(attempts) - 1]
    assert len(attempts) >= 2  # the ladder engaged
    chosen = attempts[gate["chosen"]]
    assert config["float_ops"] == chosen["float_ops"] == gate["float_ops"]
    passing = [k for k, a in enumerate(attempts) if a["within_gate"]]
    if passing:  # the first rung within the gate, and nothing tried after it
        assert gate["chosen"] == passing[0] == len(attempts) - 1
    else:  # none: the closest to the gate, marked as outside it
        from edgeperceiver.accuracy_gate import shortfall

        score = [(-shortfall(a["top1_agreement"], a["margin_change"], 0.0, gate["max_margin_change"]),
                  sum(a["top1_agreement"])) for a in attempts]
        assert score[gate["chosen"]] == max(score) and gate["within_gate"] is False
    stage = Bundle.open(root).manifest.quantization
    assert stage is not None
    graph = onnx.load(str(root / stage.model)).graph
    made = {o: n.op_type for n in graph.node for o in n.output}
    fed_by_dq = [made.get(n.input[0]) == "DequantizeLinear" for n in graph.node if n.op_type == "Conv"]
    assert any(fed_by_dq) != ("convs" in chosen["float_ops"])  # the chosen rung's convolutions read float


def test_ladder_stops_at_the_first_candidate_within_the_gate_and_can_be_turned_off(tmp_path: Path) -> None:
    root = make_toy_bundle(tmp_path / "toy", size=SIZE, width=WIDTH, num_classes=40)
    calib = toy_inputs(96, size=SIZE, seed=11)
    gate = _stage(root, calib, QuantizeConfig(subset_size=96, ladder_gate=100.0, ladder_max_margin_change=1e6))["gate"]
    assert len(gate["attempts"]) == 1 and gate["chosen"] == 0 and gate["within_gate"]
    # the margin change is part of the stage's gate too (the worst of the consumers' graphs)
    gate = _stage(root, calib, QuantizeConfig(subset_size=96, ladder_gate=100.0, ladder_max_margin_change=0.0))["gate"]
    assert len(gate["attempts"]) == 3 and not gate["within_gate"] and gate["max_margin_change"] == 0.0
    assert all(min(a["margin_change"]) > 0.0 for a in gate["attempts"])
    gate = _stage(root, calib, QuantizeConfig(subset_size=96, ladder_gate=0.0, ladder=()))["gate"]
    assert len(gate["attempts"]) == 1 and gate["chosen"] == 0 and not gate["within_gate"]
    with pytest.raises(InputError, match="unknown scope"):
        _stage(root, calib, QuantizeConfig(subset_size=32, ladder=("everything",)))


def test_openvino_int8_climbs_the_ladder_on_this_cpu(tmp_path: Path) -> None:
    """OpenVINO's per-segment INT8 checks its own chain, run by OpenVINO on this CPU, against FP32."""
    pytest.importorskip("openvino")
    from edgeperceiver.targets import compile_bundle
    from edgeperceiver.types import Precision, TargetName

    root = make_toy_bundle(tmp_path / "toy", size=SIZE, width=WIDTH, num_classes=40)
    calib = toy_inputs(96, size=SIZE, seed=11)
    opts = {"threads": 1, "latency_runs": 0, "report_samples": 0, "subset_size": 96, "float_precision": "f32"}
    entry = compile_bundle(root, TargetName.OPENVINO, Precision.INT8, calib_data=calib,
                           options={**opts, "ladder_gate": 0.0})
    gate = entry.metadata["int8_gate"]
    assert not gate["attempts"][0]["within_gate"] and len(gate["attempts"]) >= 2
    assert gate["float_ops"] == gate["attempts"][gate["chosen"]]["float_ops"]
    # the margin change is part of the gate: random weights make near-ties, whose margins INT8 moves
    assert all("margin_change" in a for a in gate["attempts"]) and gate["max_margin_change"] == 0.15
    entry = compile_bundle(root, TargetName.OPENVINO, Precision.INT8, calib_data=calib,
                           options={**opts, "ladder_gate": 100.0, "ladder_max_margin_change": 1e6})
    assert len(entry.metadata["int8_gate"]["attempts"]) == 1 and entry.metadata["int8_gate"]["within_gate"]
    entry = compile_bundle(root, TargetName.OPENVINO, Precision.INT8, calib_data=calib,
                           options={**opts, "ladder_gate": 100.0, "ladder_max_margin_change": 0.0})
    gate = entry.metadata["int8_gate"]
    assert [a["float_ops"] for a in gate["attempts"]] == [[], ["attention"], ["attention", "early_convs"]]
    assert not gate["within_gate"]  # nothing quantized keeps every margin exactly
    closest = min(range(3), key=lambda k: (max(gate["attempts"][k]["margin_change"]),
                                           -sum(gate["attempts"][k]["top1_agreement"])))
    assert gate["chosen"] == closest


def _attention_model() -> onnx.ModelProto:
    """x [1, 6, 4] -> q, k projections -> scores q k^T -> softmax -> scores x -> projection."""
    rng = np.random.default_rng(0)
    w = {n: numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), n) for n in ("wq", "wk", "wo")}
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
        helper.make_node("Softmax", ["s"], ["a"], axis=-1),
        helper.make_node("MatMul", ["a", "x"], ["o"], name="mix"),
        helper.make_node("Transpose", ["wo"], ["wot"], perm=[1, 0]),
        helper.make_node("MatMul", ["o", "wot"], ["y"], name="o_proj"),
    ]
    graph = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 4])], list(w.values()))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_attention_scope_names_the_products_of_two_activations(tmp_path: Path) -> None:
    from edgeperceiver.quant_ladder import float_names

    model = _attention_model()
    assert float_names(model, ["attention"], []) == ["scores", "mix"]  # not the projections, whatever their layout
    ov = pytest.importorskip("openvino")
    onnx.save(model, str(tmp_path / "attn.onnx"))
    assert float_names(ov.Core().read_model(str(tmp_path / "attn.onnx")), ["attention"], []) == ["scores", "mix"]


def test_ladder_gate_bounds_the_margin_change_where_it_is_measured() -> None:
    """A rung that agrees with FP32 everywhere but moves its margins by 40% is outside the gate."""
    from edgeperceiver.quant_ladder import Verdict, climb

    measured = {(): Verdict([1.0, 1.0], [0.05, 0.40]), ("attention",): Verdict([1.0, 0.99], [0.05, 0.08])}

    def build(cfg: QuantizeConfig) -> tuple[tuple[str, ...], Verdict]:
        return cfg.float_ops, measured.get(cfg.float_ops, Verdict([0.5, 0.5], [0.9, 0.9]))

    config = QuantizeConfig(ladder=("attention", "early_convs"))
    ops, _, meta = climb(config, build, gate_points=2.0, images=100, max_margin_change=0.15)
    assert ops == ("attention",) and meta["chosen"] == 1 and meta["within_gate"]
    assert meta["attempts"][0] == {"float_ops": [], "top1_agreement": [1.0, 1.0], "margin_change": [0.05, 0.4],
                                   "within_gate": False}
    ops, _, meta = climb(config, build, gate_points=2.0, images=100)  # agreement alone
    assert ops == () and len(meta["attempts"]) == 1 and "margin_change" not in meta["attempts"][0]
    # nothing within the gate: the rung closest to it, in units of the gate (rung 1 misses the
    # agreement floor by one gate and the margin bound by 7; rung 0 the bound by 39)
    ops, _, meta = climb(config, build, gate_points=0.5, images=100, max_margin_change=0.01)
    assert ops == ("attention",) and not meta["within_gate"] and len(meta["attempts"]) == 3
