"""OpenVINO target (compile) and runtime backend, on the small hand-made toy bundle."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("nncf")

import itertools

from bundles import make_toy_bundle, run_in_threads, toy_inputs

from edgeperceiver.bundle import Bundle, Thresholds
from edgeperceiver.errors import InputError, TargetError
from edgeperceiver.runtime.openvino import OpenVINOBackend, inference_precision_hint
from edgeperceiver.runtime.runner import load
from edgeperceiver.targets import compile_bundle
from edgeperceiver.types import Criterion, Precision, TargetName

SIZE, WIDTH = 16, 8
FAST = {"latency_runs": 3, "report_samples": 16, "threads": 1}


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy bundle compiled for OpenVINO fp32, bf16 and int8."""
    root = make_toy_bundle(tmp_path_factory.mktemp("ov") / "toy", size=SIZE, width=WIDTH)
    calib = toy_inputs(48, size=SIZE, seed=3)
    for p in (Precision.FP32, Precision.BF16, Precision.INT8):
        compile_bundle(root, TargetName.OPENVINO, p, calib_data=calib, options=FAST)
    return root


def test_entries_record_pinned_precision_and_report(compiled: Path) -> None:
    m = Bundle.open(compiled).manifest
    assert m.target("openvino-fp32").metadata["inference_precision"] == "f32"
    assert m.target("openvino-bf16").metadata["inference_precision"] == "bf16"
    int8 = m.target("openvino-int8")
    choice = int8.metadata.get("float_precision_choice")  # "auto": measured on this CPU
    if choice:  # the fastest of the candidates within the accuracy gate at every exit
        cands = choice["candidates"]
        ok = {n: sum(c["segment_ms"]) for n, c in cands.items() if all(c["within_gate"])}
        if ok:  # a tie within the tolerance goes to the smaller margin change (metadata rounds to us)
            best, tol = min(ok.values()), choice["tie_tolerance"]
            assert ok[choice["chosen"]] <= best * (1 + tol) + 4e-3
            change = max(cands[choice["chosen"]]["margin_change"])
            assert all(change <= max(cands[n]["margin_change"]) for n, t in ok.items() if t <= best * (1 + tol) - 4e-3)
        else:
            assert choice["chosen"] == "int8"
        assert int8.metadata["inference_precision"] == {"int8": "f32", "int8+bf16": "bf16"}[choice["chosen"]]
    else:
        assert int8.metadata["inference_precision"] == "f32"
    assert int8.metadata["method"] == "segment"
    rows = int8.metadata["agreement"]["exits"]
    assert [r["exit"] for r in rows] == [1, 2, 3]
    assert all(0.0 <= r["top1_agreement"] <= 1.0 and r["max_abs_logit_diff"] > 0 for r in rows)
    lat = int8.latency_ms
    assert len(lat) == 3 and all(b >= a > 0 for a, b in itertools.pairwise(lat))
    assert len(int8.metadata["segment_ms"]) == 3 and int8.metadata["monolithic_ms"] > 0
    # the FP32 segments timed in the same loop: INT8's speed-up to each exit, in the report
    fp32_cum, speedup = int8.metadata["fp32_cumulative_ms"], int8.metadata["speedup_vs_fp32"]
    assert len(fp32_cum) == len(speedup) == 3 and all(v > 0 for v in (*fp32_cum, *speedup))
    assert speedup[-1] == pytest.approx(fp32_cum[-1] / lat[-1], rel=0.01)
    assert "vs the FP32 segments (same loop)" in int8.metadata["report"]
    assert "speedup_vs_fp32" not in m.target("openvino-fp32").metadata
    for key in ("openvino-fp32", "openvino-bf16", "openvino-int8"):
        entry = m.target(key)
        assert entry.segments == tuple(f"{key}/seg{k}.xml" for k in (1, 2, 3))
        for rel in entry.segments:
            assert rel.replace(".xml", ".bin") in m.files  # weights are checksummed too


def test_fp32_matches_onnx_chain_and_int8_stays_close(compiled: Path) -> None:
    x = toy_inputs(7, size=SIZE, seed=11)
    ref = load(compiled, "onnxruntime-fp32").all_exits(x)
    fp32 = load(compiled, "openvino-fp32", threads=1).all_exits(x)
    bf16 = load(compiled, "openvino-bf16", threads=1).all_exits(x)
    int8 = load(compiled, "openvino-int8", threads=1).all_exits(x)
    for r, a, b, q in zip(ref, fp32, bf16, int8, strict=True):
        scale = float(np.abs(r).max())
        np.testing.assert_allclose(a, r, atol=1e-4 * max(1.0, scale))
        assert float(np.abs(b - r).max()) < 0.05 * scale  # bf16 really ran: not bit-equal, but close
        assert float(np.abs(q - r).max()) < 0.25 * scale
    assert any(float(np.abs(b - r).max()) > 1e-5 for b, r in zip(bf16, ref, strict=True))


def test_int8_early_exit_per_sample_equals_running_alone(compiled: Path) -> None:
    runner = load(compiled, "openvino-int8", threads=1)
    x = toy_inputs(9, size=SIZE, seed=12)
    probs = runner.all_exits(x)
    # a threshold between the samples' exit-1 confidences, so some leave early and some do not
    e = np.exp(probs[0] - probs[0].max(1, keepdims=True))
    conf1 = np.sort(e.max(1) / e.sum(1))
    th = Thresholds(Criterion.MAX_SOFTMAX, (float(conf1[len(conf1) // 2]), 0.0, None))
    batch = runner.predict(x, thresholds=th)
    assert len(set(batch.exits.tolist())) > 1
    for i in range(len(x)):
        alone = runner.predict(x[i : i + 1], thresholds=th)
        assert alone.exits[0] == batch.exits[i]
        assert alone.labels[0] == batch.labels[i]
        np.testing.assert_allclose(alone.confidences[0], batch.confidences[i], atol=1e-5)


@pytest.mark.parametrize("key", ["openvino-int8", "openvino-bf16"])
def test_bound_chain_equals_the_session_path_bit_for_bit(compiled: Path, key: str) -> None:
    """The zero-copy bound chain (carried tensors stay in the requests) vs plain session calls."""
    chained = load(compiled, key, threads=1)
    plain = load(compiled, key, threads=1)
    assert chained._chain is not None
    plain._chain = None  # every segment through OpenVINOSession.run, carried tensors via numpy
    x = toy_inputs(9, size=SIZE, seed=21)
    probs = plain.all_exits(x)
    e = np.exp(probs[0] - probs[0].max(1, keepdims=True))
    conf1 = np.sort(e.max(1) / e.sum(1))
    mixed = Thresholds(Criterion.MAX_SOFTMAX, (float(conf1[len(conf1) // 2]), 0.0, None))
    never = Thresholds(Criterion.MAX_SOFTMAX, (None, None, None))
    for th in (mixed, never, None):
        for batch in (x, x[:1]):
            a, b = chained.predict(batch, thresholds=th), plain.predict(batch, thresholds=th)
            assert np.array_equal(a.exits, b.exits) and np.array_equal(a.labels, b.labels)
            assert np.array_equal(a.confidences, b.confidences) and np.array_equal(a.scores, b.scores)
    forced = np.array([1, 2, 3, 3, 2, 1, 1, 3, 2])
    a, b = chained.predict(x, force_exits=forced), plain.predict(x, force_exits=forced)
    assert np.array_equal(a.exits, forced) and np.array_equal(a.scores, b.scores)


def test_session_compiles_one_static_model_per_batch_size_and_is_thread_safe(compiled: Path) -> None:
    b = Bundle.open(compiled)
    entry = b.manifest.target("openvino-fp32")
    backend = OpenVINOBackend(threads=1)
    seg = b.manifest.segments[0]
    sess = backend.open(b, entry, seg)
    x = toy_inputs(5, size=SIZE, seed=2)
    full = sess.run({seg.inputs[0].name: x})
    one = sess.run({seg.inputs[0].name: x[:3]})
    assert sorted(sess._compiled) == [3, 5]
    for cm in sess._compiled.values():  # static shapes, pinned precision
        assert cm.input(0).get_partial_shape().is_static
        assert str(cm.get_property("INFERENCE_PRECISION_HINT")) in ("f32", "<Type: 'float32'>", "float32")
    np.testing.assert_allclose(one["e1"], full["e1"][:3], atol=1e-5)

    results: list[np.ndarray] = []

    def work(i: int) -> None:
        for _ in range(5):
            results.append(sess.run({seg.inputs[0].name: x})["e1"])

    assert not run_in_threads(work, 4)
    assert len(results) == 20
    for r in results:
        np.testing.assert_array_equal(r, full["e1"])


def test_throughput_hint_splits_batches_asynchronously(compiled: Path) -> None:
    x = toy_inputs(11, size=SIZE, seed=4)
    lat = load(compiled, "openvino-fp32", threads=1).all_exits(x)
    thr = load(compiled, "openvino-fp32", hint="THROUGHPUT").all_exits(x)
    for a, b in zip(lat, thr, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_cache_dir_is_filled(compiled: Path, tmp_path: Path) -> None:
    cache = tmp_path / "ovcache"
    runner = load(compiled, "openvino-fp32", cache_dir=cache, threads=1)
    runner.all_exits(toy_inputs(2, size=SIZE))
    assert any(cache.iterdir())


def test_bad_options_are_input_errors(compiled: Path) -> None:
    with pytest.raises(InputError, match="hint"):
        OpenVINOBackend(hint="FASTEST")
    with pytest.raises(InputError, match="threads"):
        OpenVINOBackend(threads=0)
    with pytest.raises(InputError, match="OpenVINO: unknown option"):
        compile_bundle(compiled, TargetName.OPENVINO, Precision.FP32, options={"turbo": True})
    with pytest.raises(InputError, match="method"):
        compile_bundle(compiled, TargetName.OPENVINO, Precision.INT8, calib_data=toy_inputs(4, size=SIZE),
                       options={"method": "magic"})
    with pytest.raises(InputError, match="calibration"):
        compile_bundle(compiled, TargetName.OPENVINO, Precision.INT8,
                       calib_data=np.full((4, 3, SIZE, SIZE), np.nan, np.float32))
    with pytest.raises(InputError):
        compile_bundle(compiled, TargetName.OPENVINO, Precision.FP16)
    with pytest.raises(InputError, match="smooth_quant"):
        compile_bundle(compiled, TargetName.OPENVINO, Precision.FP32, options={"smooth_quant": "maybe"})
    with pytest.raises(InputError, match="float_precision"):
        compile_bundle(compiled, TargetName.OPENVINO, Precision.INT8, calib_data=toy_inputs(4, size=SIZE),
                       options={"float_precision": "fp8"})
    assert inference_precision_hint(Precision.INT8) == "f32"
    assert inference_precision_hint("bf16") == "bf16"


def test_session_rejects_wrong_inputs(compiled: Path) -> None:
    b = Bundle.open(compiled)
    sess = OpenVINOBackend(threads=1).open(b, b.manifest.target("openvino-fp32"), b.manifest.segments[1])
    with pytest.raises(InputError, match="needs inputs"):
        sess.run({"h1": np.zeros((1, WIDTH, SIZE, SIZE), np.float32)})
    with pytest.raises(InputError, match="shape"):
        sess.run({"h1": np.zeros((1, WIDTH, SIZE, SIZE + 1), np.float32), "e1": np.zeros((1, 5), np.float32)})
    with pytest.raises(InputError, match="batch"):
        sess.run({"h1": np.zeros((2, WIDTH, SIZE, SIZE), np.float32), "e1": np.zeros((1, 5), np.float32)})


def test_failed_compile_leaves_bundle_byte_identical(
    compiled: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edgeperceiver.targets.openvino as tov

    before = _tree_digest(compiled)

    def boom(*args: object, **kwargs: object) -> None:
        raise TargetError("simulated failure after the IR files were written")

    monkeypatch.setattr(tov, "_report", boom)
    with pytest.raises(TargetError, match="simulated"):
        compile_bundle(compiled, TargetName.OPENVINO, Precision.INT8, calib_data=toy_inputs(8, size=SIZE),
                       options=FAST)
    assert _tree_digest(compiled) == before
    # no staging leftovers (the ``.NAME.vN`` directories beside it are the bundle's published versions)
    assert not [p for p in compiled.parent.iterdir()
                if p.name.startswith(f".{compiled.name}.") and p.name.endswith(".staging")]


def test_qdq_method_runs_and_reports(tmp_path: Path) -> None:
    root = make_toy_bundle(tmp_path / "toy", size=SIZE, width=WIDTH)
    entry = compile_bundle(root, TargetName.OPENVINO, Precision.INT8, calib_data=toy_inputs(32, size=SIZE, seed=5),
                           options={"latency_runs": "3", "report_samples": "16", "threads": "1",  # CLI strings
                                    "method": "qdq", "float_precision": "f32", "smooth_quant": "false"})
    assert entry.metadata["method"] == "qdq" and entry.metadata["inference_precision"] == "f32"
    assert entry.metadata["quantization"]["smooth_quant"] is False and entry.metadata["latency_threads"] == 1
    assert "exit 1" in entry.metadata["report"]
    assert entry.monolithic == "openvino-int8/model.xml" and len(entry.metadata["agreement"]["exits"]) == 3
    x = toy_inputs(6, size=SIZE, seed=6)
    ref = load(root, "onnxruntime-fp32").all_exits(x)
    got = load(root, "openvino-int8", threads=1).all_exits(x)
    for r, q in zip(ref, got, strict=True):
        assert float(np.abs(q - r).max()) < 0.25 * float(np.abs(r).max())


def test_bf16_entry_carries_bfloat16_bits_across_the_cut(compiled: Path) -> None:
    from edgeperceiver.runtime.openvino import bf16_bits, bf16_to_float32

    b = Bundle.open(compiled)
    entry = b.manifest.target("openvino-bf16")
    assert entry.metadata["carried_dtype"] == "bfloat16"
    backend = OpenVINOBackend(threads=1)
    s1, s2 = b.manifest.segments[0], b.manifest.segments[1]
    seg1, seg2 = backend.open(b, entry, s1), backend.open(b, entry, s2)
    x = toy_inputs(3, size=SIZE, seed=21)
    out1 = seg1.run({"x": x})
    assert out1["h1"].dtype == np.uint16 and out1["e1"].dtype == np.float32  # exits stay float32
    via_bits = seg2.run({"h1": out1["h1"], "e1": out1["e1"]})
    via_floats = seg2.run({"h1": bf16_to_float32(out1["h1"]), "e1": out1["e1"]})  # floats are converted
    np.testing.assert_array_equal(via_bits["e2"], via_floats["e2"])
    v = np.array([1.0, -2.5, 3.14159, 1e-3], np.float32)
    np.testing.assert_allclose(bf16_to_float32(bf16_bits(v)), v, rtol=1e-2)


def test_session_outputs_are_caller_owned_across_calls(compiled: Path) -> None:
    """Outputs are written straight into fresh arrays: the next call must not overwrite them."""
    b = Bundle.open(compiled)
    for key in ("openvino-fp32", "openvino-bf16"):
        entry = b.manifest.target(key)
        backend = OpenVINOBackend(threads=1)
        seg = b.manifest.segments[0]
        sess = backend.open(b, entry, seg)
        x1, x2 = toy_inputs(2, size=SIZE, seed=31), toy_inputs(2, size=SIZE, seed=32)
        first = sess.run({seg.inputs[0].name: x1})
        kept = {n: v.copy() for n, v in first.items()}
        second = sess.run({seg.inputs[0].name: x2})
        for n in first:
            assert first[n].flags.owndata and first[n].flags.c_contiguous
            assert not np.shares_memory(first[n], second[n])
            np.testing.assert_array_equal(first[n], kept[n])  # untouched by the second call
        assert not np.array_equal(first[seg.exit], second[seg.exit])
        again = sess.run({seg.inputs[0].name: x1})
        for n in first:
            np.testing.assert_array_equal(again[n], kept[n])


def _run_f32(model: Any, feed: np.ndarray) -> Any:
    """``model``'s outputs on ``feed``, compiled for the CPU in f32 (no bf16 rounding)."""
    import openvino as ov

    return ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(feed)


def test_fuse_projections_merges_shared_input_matmuls_exactly() -> None:
    import openvino as ov

    from edgeperceiver.passes.openvino_fuse import fuse_projections

    ops = ov.opset13
    rng = np.random.default_rng(0)
    x = ops.parameter([1, 5, 8], np.float32, name="x")
    w = [rng.standard_normal(s).astype(np.float32) for s in ((8, 8), (8, 8), (6, 8), (8, 3))]
    b = [rng.standard_normal(n).astype(np.float32) for n in (8, 8, 6)]
    q = ops.add(ops.matmul(x, ops.constant(w[0]), False, False), ops.constant(b[0]))
    k = ops.add(ops.matmul(x, ops.constant(w[1]), False, False), ops.constant(b[1]))
    v = ops.add(ops.matmul(x, ops.constant(w[2]), False, True), ops.constant(b[2]))  # transposed weights too
    alone = ops.matmul(ops.relu(x), ops.constant(w[3]), False, False)  # other input: untouched
    out = ops.concat([ops.add(q, k), v], -1)
    head = ops.matmul(x, ops.constant(w[3]), False, False)  # feeds a Result directly: kept
    model = ov.Model([ops.result(out), ops.result(alone), ops.result(head)], [x])
    feed = rng.standard_normal((1, 5, 8)).astype(np.float32)
    before = _run_f32(model.clone(), feed)
    assert fuse_projections(model) == 1
    kinds = [op.get_type_name() for op in model.get_ordered_ops()]
    assert kinds.count("MatMul") == 3 and kinds.count("VariadicSplit") == 1
    assert kinds.count("Add") == 2  # the three biases are one Add before the split (plus q + k)
    after = _run_f32(model, feed)
    for i in range(3):
        np.testing.assert_allclose(after[i], before[i], rtol=1e-5, atol=1e-5)
    assert fuse_projections(model) == 0  # idempotent


def test_fold_norm_affine_moves_layernorm_scale_and_shift_into_the_projections() -> None:
    import openvino as ov

    from edgeperceiver.passes.openvino_norms import fold_norm_affine

    ops = ov.opset13
    rng = np.random.default_rng(1)
    x = ops.parameter([1, 5, 8], np.float32, name="x")

    def layer_norm(t: object) -> object:
        n = ops.mvn(t, ops.constant(np.array([-1], np.int64)), True, 1e-5, "inside_sqrt")
        g, b = rng.uniform(0.5, 2.0, 8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
        return ops.add(ops.multiply(n, ops.constant(g)), ops.constant(b))

    w = [rng.standard_normal(s).astype(np.float32) for s in ((8, 6), (4, 8), (8, 3))]
    ln = layer_norm(x)
    q = ops.matmul(ln, ops.constant(w[0]), False, False)
    k = ops.add(ops.matmul(ln, ops.constant(w[1]), False, True), ops.constant(np.ones(4, np.float32)))  # bias kept
    ln2 = layer_norm(x)  # also read by a residual add: left alone
    r = ops.add(ops.matmul(ln2, ops.constant(w[2]), False, False), ops.reduce_sum(ln2, np.int64(-1), True))
    model = ov.Model([ops.result(q), ops.result(k), ops.result(r)], [x])
    feed = rng.standard_normal((1, 5, 8)).astype(np.float32)
    before = _run_f32(model.clone(), feed)
    assert fold_norm_affine(model) == 1
    assert sum(op.get_type_name() == "Multiply" for op in model.get_ordered_ops()) == 1  # ln2's scale
    after = _run_f32(model, feed)
    for i in range(3):
        np.testing.assert_allclose(after[i], before[i], rtol=1e-5, atol=1e-5)
    assert fold_norm_affine(model) == 0  # idempotent


def test_compile_records_fused_projections(compiled: Path) -> None:
    for p in ("fp32", "bf16", "int8"):  # the toy has no shared-input projections
        meta = Bundle.open(compiled).manifest.target(f"openvino-{p}").metadata
        assert meta["fused_projections"] == 0 and meta["folded_norms"] == 0


def test_group_conv_weight_quantizers_become_per_channel_and_run_int8() -> None:
    import openvino as ov

    from edgeperceiver.passes.openvino_group_conv import per_channel_group_conv_weights

    ops = ov.opset13
    rng = np.random.default_rng(1)
    g, o, i, k = 4, 8, 8, 3  # 32 -> 32 channels in 4 groups
    x = ops.parameter([1, g * i, 14, 14], np.float32, name="x")
    hi = np.float32(4.0)
    xq = ops.fake_quantize(ops.relu(x), np.float32(0.0), hi, np.float32(0.0), hi, 256)
    w = rng.standard_normal((g, o, i, k, k)).astype(np.float32)
    col = np.abs(w).max(axis=(2, 3), keepdims=True)  # [G, O/G, 1, 1, kw]: NNCF 3.4's ranges
    wq = ops.fake_quantize(ops.constant(w), -col, col, -col, col, 255)
    conv = ops.group_convolution(xq, wq, [1, 1], [1, 1], [1, 1], [1, 1])
    model = ov.Model([ops.result(conv)], [x])
    assert per_channel_group_conv_weights(model) == 1
    fq = next(op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"
              and op.input_value(0).get_node().get_type_name() == "Constant")
    want = np.abs(w).max(axis=(2, 3, 4), keepdims=True)
    for port, sign in ((1, -1), (2, 1), (3, -1), (4, 1)):
        got = fq.input_value(port).get_node().get_data()
        assert got.shape == (g, o, 1, 1, 1)
        np.testing.assert_array_equal(got, sign * want)
    assert per_channel_group_conv_weights(model) == 0
    cm = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": "YES"})
    req = cm.create_infer_request()
    feed = np.abs(rng.standard_normal((1, g * i, 14, 14))).astype(np.float32)
    req.infer([feed])
    kinds = {p.exec_type for p in req.profiling_info if p.node_type == "GroupConvolution"}
    assert kinds and all("8" in k.lower() for k in kinds), kinds  # an int8 kernel (i8/u8/I8)


def test_request_buffers_stay_alive_after_the_caller_drops_the_outputs(compiled: Path) -> None:
    """The infer request keeps pointing at the last call's arrays; they must outlive the call."""
    import gc

    b = Bundle.open(compiled)
    entry = b.manifest.target("openvino-bf16")  # bf16 tensors do not own their arrays
    backend = OpenVINOBackend(threads=1)
    s1, s2 = b.manifest.segments[0], b.manifest.segments[1]
    seg1, seg2 = backend.open(b, entry, s1), backend.open(b, entry, s2)
    out1 = seg1.run({"x": toy_inputs(2, size=SIZE, seed=41)})
    want = seg2.run({"h1": out1["h1"].copy(), "e1": out1["e1"].copy()})["e2"]
    del out1
    gc.collect()
    slot = seg2._request(2)
    slot.request.infer()  # re-runs on the held buffers: no use-after-free
    np.testing.assert_array_equal(slot.held[1]["e2"], want)


def _benchmark_script(name: str) -> Any:
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_profile_script_reports_nodes_and_decomposes_the_cut(
    compiled: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prof = _benchmark_script("profile_openvino")
    assert prof.module("/self_att3/self_att3.1/mlp/fc1/MatMul") == "self_att3"
    assert prof.module("Multiply_123") == "(unnamed)"
    argv = [str(compiled), "--target", "openvino-int8", "--threads", "1", "--runs", "3", "--rounds", "2"]
    assert prof.main(argv) == 0
    out = capsys.readouterr().out
    nodes = int(out.split(" executed nodes")[0].rsplit(" ", 1)[-1])
    assert nodes > 0 and "monolithic model" in out
    for k in range(1, 4):  # the toy bundle has three segments
        assert f"segment {k} alone (warm)" in out and f"segment {k} inside the chain" in out
    assert "segments bound / monolithic" in out


@pytest.mark.parametrize("key", ["openvino-fp32", "openvino-int8"])
def test_cut_variants_script_checks_its_if_graph_and_times_every_contender(
    compiled: Path, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    variants = _benchmark_script("cut_variants_openvino")
    assert variants.main([str(compiled), "--target", key, "--threads", "1", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    # the If graph leaves at the exit its thresholds ask for, with that exit's logits
    for want in (3, 1, 2):
        assert f"if model: exit {want} (want {want})" in out
    diffs = [float(line.split("scale ")[1]) for line in out.splitlines() if line.startswith("if model")]
    assert max(diffs) < (1e-4 if key == "openvino-fp32" else 0.1)
    for row in ("monolithic", "runner", "chain", "nhwc", "if"):
        assert f"| {row} | " in out
    assert "CPU: " in out


def test_an_entry_checked_on_another_cpu_warns_where_it_runs(
    compiled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """INT8 and auto entries hold choices measured with one CPU's kernels: loading one on another
    CPU model says so (CLI and run.py print it as a warning line); FP32 and bf16 entries do not."""
    import dataclasses
    import shutil
    import warnings

    from edgeperceiver.bundle import edit_bundle
    from edgeperceiver.runtime.openvino_cpu import OtherCPUWarning

    root = tmp_path / "copy"
    shutil.copytree(compiled, root)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OtherCPUWarning)
        load(root, "openvino-int8", threads=1)  # compiled on this CPU: silent
    with edit_bundle(root) as w:
        m = w.manifest
        for key in ("openvino-int8", "openvino-bf16"):
            e = m.target(key)
            m = m.with_target(dataclasses.replace(e, metadata={**e.metadata, "cpu": "Some Other CPU @ 9 GHz"}))
        w.manifest = m
    with pytest.warns(OtherCPUWarning, match="openvino-int8 was compiled and checked .*'Some Other CPU @ 9 GHz'"):
        runner = load(root, "openvino-int8", threads=1)
    assert runner.all_exits(toy_inputs(2, size=SIZE, seed=1))[0].shape[0] == 2  # a warning, not an error
    from edgeperceiver.runtime.command import main

    np.save(tmp_path / "x.npy", toy_inputs(2, size=SIZE, seed=1))
    assert main([str(tmp_path / "x.npy"), "--entry", "openvino-int8"], bundle=str(root)) == 0  # bundle/run.py
    err = capsys.readouterr().err
    assert "warning: openvino-int8 was compiled and checked against FP32 on 'Some Other CPU @ 9 GHz'" in err
    with warnings.catch_warnings():
        warnings.simplefilter("error", OtherCPUWarning)
        load(root, "openvino-bf16", threads=1)
    # the same model name, other instruction sets (a VM may report one name for several CPUs)
    here = Bundle.open(compiled).manifest.target("openvino-int8").metadata
    with edit_bundle(root) as w:
        e = w.manifest.target("openvino-int8")
        w.manifest = w.manifest.with_target(dataclasses.replace(
            e, metadata={**e.metadata, "cpu": here["cpu"], "cpu_isa": [*here["cpu_isa"], "amx_tile"]}))
    if here["cpu_isa"] and "amx_tile" not in here["cpu_isa"]:
        with pytest.warns(OtherCPUWarning, match=r"with instruction sets \+amx_tile compared with this CPU"):
            load(root, "openvino-int8", threads=1)


def test_cpu_isa_reads_the_kernel_selecting_flags(tmp_path: Path) -> None:
    from edgeperceiver.runtime.openvino_cpu import cpu_isa

    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f amx_int8 amx_tile avx512_bf16 ht\n"
                    "processor : 1\nflags : fpu sse2 avx2\n")
    assert cpu_isa(info) == ("amx_int8", "amx_tile", "avx2", "avx512_bf16", "avx512f")
    assert cpu_isa(tmp_path / "missing") == ()
