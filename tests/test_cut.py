"""The cut on hand-built and randomly generated multi-exit ONNX graphs (no torch needed)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgeperceiver.cut import CutPlan, cut_model, plan_cut, run_chain  # noqa: E402
from edgeperceiver.errors import ExportError, InputError  # noqa: E402
from edgeperceiver.onnx_utils import ort_session, static_tensors  # noqa: E402
from edgeperceiver.passes.shapes import fold_static_shapes  # noqa: E402

D = 4


def _model(nodes: list, inits: list, outputs: Sequence[str], *, width: int = D) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["batch", D]) for o in outputs], initializer=inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _init(name: str, shape: Sequence[int], seed: int, dtype: type = np.float32) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.5).astype(dtype), name)


def _check_invariants(m: onnx.ModelProto, plan: CutPlan) -> None:
    """No node in two segments; inputs made earlier; outputs and live_after consistent."""
    static = static_tensors(m.graph)
    owned = [i for s in plan.segments for i in s.nodes]
    assert len(owned) == len(set(owned)), "a node appears in two segments"
    for s in plan.segments:
        for i in s.shared:
            node = m.graph.node[i]
            assert node.op_type == "QuantizeLinear" or all(o in static for o in node.output), (
                "only static nodes (and a Q recomputed for a DQ exit) may be duplicated"
            )
    available = set(plan.graph_inputs)
    for k, s in enumerate(plan.segments):
        assert s.outputs[0] == s.exit
        for t in s.inputs:
            assert t in available, f"segment {s.index} reads {t!r} before any segment produced it"
        available.update(s.outputs)
        later_reads = {t for later in plan.segments[k + 1 :] for t in later.inputs}
        made = set(plan.graph_inputs) | {o for p in plan.segments[: k + 1] for o in p.outputs}
        assert set(s.live_after) == later_reads & made
        for o in s.carried:
            assert o in later_reads, f"segment {s.index} outputs {o!r} that nobody reads"


def _chain_equals_monolithic(
    m: onnx.ModelProto, exits: Sequence[str], batch: int = 3, *, optimize: bool = True
) -> CutPlan:
    plan, segs, specs = cut_model(m, exits, threads=1)
    _check_invariants(m, plan)
    x = np.random.default_rng(1).standard_normal((batch, D)).astype(np.float32)
    ref = ort_session(m, threads=1, optimize=optimize).run(list(exits), {"x": x})
    got = run_chain(segs, {"x": x}, threads=1, optimize=optimize)
    for e, r in zip(exits, ref, strict=True):
        np.testing.assert_allclose(got[e], r, rtol=1e-6, atol=1e-6)
    for seg in segs:
        onnx.checker.check_model(seg)
    for s in plan.segments:
        for t in (*s.inputs, *s.outputs):
            assert specs[t].shape[0] == "batch"
    return plan


def test_exit_reading_from_several_earlier_segments() -> None:
    w = [_init(f"w{i}", (D, D), i) for i in range(4)]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["a"]),
        helper.make_node("Relu", ["a"], ["a_r"]),
        helper.make_node("MatMul", ["a_r", "w1"], ["e1"]),
        helper.make_node("MatMul", ["a_r", "w2"], ["b"]),  # only exit 2 needs b
        helper.make_node("Tanh", ["b"], ["b_t"]),
        helper.make_node("Add", ["b_t", "e1"], ["e2"]),
        helper.make_node("Add", ["b_t", "a_r"], ["c"]),  # exit 3 reads a_r (seg 1) and b_t (seg 2)
        helper.make_node("MatMul", ["c", "w3"], ["c2"]),
        helper.make_node("Add", ["c2", "x"], ["e3"]),  # ... and the model input
    ]
    m = _model(nodes, w, ["e1", "e2", "e3"])
    plan = _chain_equals_monolithic(m, ["e1", "e2", "e3"])
    s1, s2, s3 = plan.segments
    assert s1.inputs == ("x",)
    assert set(s1.outputs) == {"e1", "a_r"}
    assert set(s2.inputs) == {"a_r", "e1"} and set(s2.outputs) == {"e2", "b_t"}
    assert set(s3.inputs) == {"x", "a_r", "b_t"} and s3.outputs == ("e3",)
    assert set(s1.live_after) == {"x", "a_r", "e1"}
    assert "e1" not in s2.live_after and set(s2.live_after) == {"x", "a_r", "b_t"}
    assert s3.live_after == ()
    # a shared initializer goes with every segment that reads it
    assert "w0" in s1.initializers and "w0" not in s2.initializers


def test_subset_of_exits_folds_dropped_nodes_into_next_segment() -> None:
    w = [_init(f"w{i}", (D, D), i) for i in range(3)]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["e1"]),
        helper.make_node("MatMul", ["e1", "w1"], ["e2"]),
        helper.make_node("MatMul", ["e2", "w2"], ["e3"]),
    ]
    m = _model(nodes, w, ["e1", "e2", "e3"])
    plan = _chain_equals_monolithic(m, ["e1", "e3"])
    assert len(plan.segments) == 2
    assert plan.segments[1].nodes == (1, 2)
    assert plan.segments[1].inputs == ("e1",)


def test_shared_static_nodes_are_duplicated_not_carried() -> None:
    inits = [_init("w", (D, D), 0), numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    nodes = [
        helper.make_node("Mul", ["w", "half"], ["w_half"]),  # static: depends on initializers only
        helper.make_node("MatMul", ["x", "w_half"], ["e1"]),
        helper.make_node("MatMul", ["e1", "w_half"], ["e2"]),
    ]
    m = _model(nodes, inits, ["e1", "e2"])
    plan = _chain_equals_monolithic(m, ["e1", "e2"])
    assert plan.segments[0].shared == (0,) and plan.segments[1].shared == (0,)
    assert "w_half" not in plan.segments[1].inputs


def _qdq_model() -> onnx.ModelProto:
    s = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    zp = numpy_helper.from_array(np.array(0, np.int8), "zp")
    wq = numpy_helper.from_array(np.random.default_rng(0).integers(-50, 50, (D, D)).astype(np.int8), "wq")
    ws = numpy_helper.from_array(np.array(0.02, np.float32), "ws")
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "ws", "zp"], ["w"]),  # quantized weight, used by both exits
        helper.make_node("MatMul", ["x", "w"], ["a"]),
        helper.make_node("QuantizeLinear", ["a", "s", "zp"], ["a_q"]),
        helper.make_node("DequantizeLinear", ["a_q", "s", "zp"], ["a_dq1"]),
        helper.make_node("MatMul", ["a_dq1", "w"], ["e1"]),
        helper.make_node("DequantizeLinear", ["a_q", "s", "zp"], ["a_dq2"]),  # exit 2 shares the Q
        helper.make_node("Relu", ["a_dq2"], ["r"]),
        helper.make_node("MatMul", ["r", "w"], ["e2"]),
    ]
    return _model(nodes, [s, zp, wq, ws], ["e1", "e2"])


def test_qdq_pair_is_never_cut() -> None:
    m = _qdq_model()
    # ORT's QDQ fusions would change the numerics per graph: compare the plain QDQ semantics
    plan = _chain_equals_monolithic(m, ["e1", "e2"], optimize=False)
    q_outputs = {n.output[0] for n in m.graph.node if n.op_type == "QuantizeLinear"}
    for s in plan.segments:
        assert not q_outputs & set(s.inputs), "a QuantizeLinear output crosses the cut"
    assert plan.moved_dq  # the second DQ moved next to its Q
    assert plan.segments[1].inputs == ("a_dq2",)
    # the weight's DequantizeLinear is static: copied into both segments
    assert plan.segments[0].shared == (0,) and plan.segments[1].shared == (0,)


def test_unknown_exit_and_bad_exit_order_are_clear_errors() -> None:
    w = [_init("w0", (D, D), 0), _init("w1", (D, D), 1)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["e1"]), helper.make_node("MatMul", ["e1", "w1"], ["e2"])]
    m = _model(nodes, w, ["e1", "e2"])
    with pytest.raises(InputError, match="nope"):
        plan_cut(m, ["e1", "nope"])
    with pytest.raises(ExportError, match="already computed"):
        plan_cut(m, ["e2", "e1"])
    with pytest.raises(InputError, match="more than once"):
        plan_cut(m, ["e1", "e1"])


def test_fold_static_shapes_turns_reshape_targets_into_constants() -> None:
    inits = [
        _init("w", (D, 2 * D), 0),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([2, D], np.int64), "tail"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),  # [batch, 2D]
        helper.make_node("Shape", ["h"], ["shp"]),
        helper.make_node("Gather", ["shp", "zero"], ["b"], axis=0),
        helper.make_node("Concat", ["b", "tail"], ["target"], axis=0),
        helper.make_node("Reshape", ["h", "target"], ["h3"]),  # [batch, 2, D]
        helper.make_node("ReduceMax", ["h3"], ["e1"], axes=[1], keepdims=0),
    ]
    m = _model(nodes, inits, ["e1"])
    folded, stats = fold_static_shapes(m, threads=1)
    ops = [n.op_type for n in folded.graph.node]
    assert "Shape" not in ops and "Concat" not in ops and stats.rewritten_reshapes == 1
    target = next(t for t in folded.graph.initializer if t.name.endswith("__static_shape"))
    assert numpy_helper.to_array(target).tolist() == [0, 2, D]  # 0 copies the batch axis
    x = np.random.default_rng(0).standard_normal((5, D)).astype(np.float32)
    np.testing.assert_array_equal(ort_session(folded).run(None, {"x": x})[0], ort_session(m).run(None, {"x": x})[0])


# --------------------------------------------------------------------------- property test


@st.composite
def multi_exit_dags(draw: st.DrawFn, qdq: bool = False) -> tuple[onnx.ModelProto, list[str]]:
    """A random DAG over [batch, D] tensors with shared (and static) weights and 1..4 exits.

    With ``qdq``, also QuantizeLinear -> DequantizeLinear pairs whose Q may feed several DQs.
    """
    n_w = draw(st.integers(1, 3))
    inits = [_init(f"w{i}", (D, D), i) for i in range(n_w)]
    inits.append(numpy_helper.from_array(np.array(0.02, np.float32), "q_s"))
    inits.append(numpy_helper.from_array(np.array(0, np.int8), "q_zp"))
    inits.append(_init("w_cat", (2 * D, D), 99))
    inits.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))
    nodes = []
    tensors = ["x"]
    weights = [f"w{i}" for i in range(n_w)]
    if draw(st.booleans()):  # a static node (initializer arithmetic) shared by several segments
        nodes.append(helper.make_node("Mul", ["w0", "half"], ["w_static"]))
        weights.append("w_static")
    n_ops = draw(st.integers(2, 12))
    quantized: list[str] = []  # QuantizeLinear outputs; each may feed several DequantizeLinear
    for i in range(n_ops):
        ops = ["Add", "Mul", "Relu", "MatMul", "Concat", "Tanh"] + (["QDQ", "DQ"] if qdq else [])
        op = draw(st.sampled_from(ops))
        if op == "DQ" and not quantized:
            op = "QDQ"
        a = draw(st.sampled_from(tensors))
        b = draw(st.sampled_from(tensors))
        out = f"t{i}"
        if op in ("Add", "Mul"):
            nodes.append(helper.make_node(op, [a, b], [out + "_pre"]))
            nodes.append(helper.make_node("Tanh", [out + "_pre"], [out]))  # keep values bounded
        elif op in ("Relu", "Tanh"):
            nodes.append(helper.make_node(op, [a], [out]))
        elif op == "QDQ":  # quantize an earlier tensor and dequantize it once
            nodes.append(helper.make_node("QuantizeLinear", [a, "q_s", "q_zp"], [out + "_q"]))
            nodes.append(helper.make_node("DequantizeLinear", [out + "_q", "q_s", "q_zp"], [out]))
            quantized.append(out + "_q")
        elif op == "DQ":  # another dequantization of an earlier Q (shared Q, possibly across a cut)
            nodes.append(helper.make_node("DequantizeLinear", [draw(st.sampled_from(quantized)), "q_s", "q_zp"], [out]))
        elif op == "MatMul":
            nodes.append(helper.make_node("MatMul", [a, draw(st.sampled_from(weights))], [out]))
        else:
            nodes.append(helper.make_node("Concat", [a, b], [out + "_cat"], axis=1))
            nodes.append(helper.make_node("MatMul", [out + "_cat", "w_cat"], [out]))
        tensors.append(out)
    made = tensors[1:]
    k = draw(st.integers(1, min(4, len(made))))
    picks = draw(st.lists(st.sampled_from(made), min_size=k, max_size=k, unique=True))
    exits = sorted(picks, key=made.index)  # exits in production order: no exit feeds an earlier one
    # name the exits' tensors as graph outputs; unused nodes are allowed (dead code outside all exits)
    return _model(nodes, inits, exits), exits


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(multi_exit_dags())
def test_random_dags_chain_equals_monolithic(case: tuple[onnx.ModelProto, list[str]]) -> None:
    model, exits = case
    plan = _chain_equals_monolithic(model, exits)
    # every node an exit needs is in exactly one segment, or is static and copied
    needed_by_any = {i for s in plan.segments for i in (*s.nodes, *s.shared)}
    static = static_tensors(model.graph)
    for i in needed_by_any:
        node = model.graph.node[i]
        owners = [s.index for s in plan.segments if i in s.nodes]
        assert len(owners) == 1 or all(o in static for o in node.output)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(multi_exit_dags(qdq=True))
def test_random_qdq_dags_never_cut_between_q_and_dq(case: tuple[onnx.ModelProto, list[str]]) -> None:
    model, exits = case
    plan = _chain_equals_monolithic(model, exits, optimize=False)
    q_outputs = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    for s in plan.segments:
        assert not q_outputs & set(s.inputs), f"segment {s.index} receives a QuantizeLinear output"


def test_subgraph_reads_of_outer_tensors_count_as_inputs() -> None:
    """An If node whose branches read an outer tensor made by segment 1: that tensor is carried."""
    out_vi = helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, ["batch", D])
    then_g = helper.make_graph([helper.make_node("Add", ["a", "a"], ["branch_out"])], "then", [], [out_vi])
    else_g = helper.make_graph([helper.make_node("Mul", ["a", "a"], ["branch_out"])], "else", [], [out_vi])
    inits = [_init("w", (D, D), 0), numpy_helper.from_array(np.array(True), "cond")]
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("MatMul", ["a", "w"], ["e1"]),
        helper.make_node("Tanh", ["x"], ["t"]),
        helper.make_node("If", ["cond"], ["b"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Add", ["b", "t"], ["e2"]),
    ]
    plan = _chain_equals_monolithic(_model(nodes, inits, ["e1", "e2"]), ["e1", "e2"])
    assert set(plan.segments[1].inputs) == {"a", "x"}
    assert plan.segments[0].outputs == ("e1", "a")
