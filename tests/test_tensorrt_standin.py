"""The TensorRT backend's bookkeeping, run against an in-memory STAND-IN for CUDA and TensorRT.

``tests/tensorrt_standin.py`` replaces pycuda and TensorRT's runtime with host memory and
ONNX Runtime: these tests check what *our* code does (batch splitting to the engines'
``max_batch``, pooled and pinned buffers, the shared scratch, copies, CUDA contexts per
thread, CUDA-graph capture and its fallback, closing), not what TensorRT does. The real
engines are exercised by ``test_tensorrt_gpu.py`` on a machine with a GPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from bundles import make_toy_bundle, run_in_threads, toy_inputs
from tensorrt_standin import StandInCuda, standin_bindings, standin_plan

import edgeperceiver.runtime.tensorrt as trt_runtime
from edgeperceiver.bundle import Bundle, TargetEntry, edit_bundle
from edgeperceiver.errors import InputError, TargetError
from edgeperceiver.runtime import load
from edgeperceiver.runtime.tensorrt_device import DeviceFacts, host_platform
from edgeperceiver.runtime.tensorrt_memory import DeviceArray
from edgeperceiver.targets.tensorrt_options import BuildOptions
from edgeperceiver.targets.tensorrt_prepare import prepare
from edgeperceiver.types import Precision, TargetName

MAX_BATCH = 8
THRESHOLDS = (0.6, 0.5, None)
FACTS = DeviceFacts("10.3.0.30", "Stand-in GPU", (8, 7), host_platform())


def add_standin_entry(bundle: Path, precision: Precision = Precision.FP32, *, max_batch: int = MAX_BATCH) -> str:
    """A ``tensorrt-<precision>`` entry whose "engines" are stand-in plans of the prepared graphs."""
    b = Bundle.open(bundle)
    prep = prepare(bundle, b.manifest, precision, BuildOptions.from_mapping({"max_batch": max_batch}),
                   strongly_typed=True)
    with edit_bundle(bundle) as w:
        assert w.manifest is not None
        rels = []
        for seg in prep.segments:
            rel = f"tensorrt-{precision.value}/seg{seg.index}.engine"
            w.replace_file(rel, standin_plan(seg.model.SerializeToString(), max_batch=max_batch,
                                             scratch=4096 * seg.index))
            rels.append(rel)
        meta = {**FACTS.to_metadata(), "precision": precision.value, "max_batch": max_batch}
        entry = TargetEntry(TargetName.TENSORRT, precision, tuple(rels), metadata=meta)
        w.manifest = w.manifest.with_target(entry)
    return entry.key


@pytest.fixture()
def standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Every TensorRT backend opened in the test runs on a fresh stand-in."""
    made: dict[str, Any] = {"backends": []}
    cuda_kind = {"graphs": True}

    def fake() -> Any:
        bindings, cuda, trt, pools = standin_bindings(StandInCuda(graphs=cuda_kind["graphs"]))
        made["backends"].append((cuda, trt, pools))
        return bindings

    monkeypatch.setattr(trt_runtime, "default_bindings", fake)
    made["kind"] = cuda_kind
    yield made


@pytest.fixture()
def toy(tmp_path: Path) -> Path:
    root = make_toy_bundle(tmp_path / "toy", num_classes=5, width=4, size=8)
    add_standin_entry(root)
    return root


def _same(a: Any, b: Any) -> None:
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.exits, b.exits)
    np.testing.assert_allclose(a.confidences, b.confidences, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- batches


def test_runner_splits_every_batch_to_the_engines_max_batch(toy: Path, standin: dict[str, Any]) -> None:
    x = toy_inputs(100, seed=5)
    ref = load(toy, "onnxruntime-fp32", threads=1)
    with load(toy, "tensorrt-fp32", batch_size=32) as runner:
        assert runner.max_batch == MAX_BATCH  # the stand-in refuses shapes beyond it
        _same(runner.predict(x, thresholds=THRESHOLDS), ref.predict(x, thresholds=THRESHOLDS))
        got = runner.all_exits(x)
        for g, r in zip(got, ref.all_exits(x), strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
        with pytest.raises(InputError, match="exceeds the largest batch"):
            runner.segment_feeds(x[:16])
        feeds = runner.segment_feeds(x[:8])
        assert all(isinstance(v, DeviceArray) for f in feeds[1:] for v in f.values())
    with load(toy, "tensorrt-fp32", max_batch=4) as small:
        assert small.max_batch == 4
        _same(small.predict(x[:9], thresholds=THRESHOLDS), ref.predict(x[:9], thresholds=THRESHOLDS))
    _cuda, trt, _ = standin["backends"][0]
    runs = [c.runs for e in trt.engines for c in e.contexts]
    assert sum(runs) > 0


def test_run_calibrate_and_bench_with_100_images(toy: Path, tmp_path: Path, standin: dict[str, Any]) -> None:
    from edgeperceiver.bench import bench
    from edgeperceiver.calibration import MaxDrop, calibrate
    from edgeperceiver.runtime.cli_support import run_inputs

    x = toy_inputs(100, seed=6)
    y = load(toy, "onnxruntime-fp32", threads=1).predict(x).labels  # labels the final exit agrees with
    np.save(tmp_path / "images.npy", x)
    with load(toy, "tensorrt-fp32", batch_size=64) as runner:  # `edgeperceiver run` reads files this way
        rows = run_inputs(runner, [tmp_path / "images.npy"], batch_size=50)
    assert len(rows) == 100
    np.savez(tmp_path / "heldout.npz", x=x, y=y)
    result = calibrate(toy, tmp_path / "heldout.npz", target="tensorrt-fp32", goal=MaxDrop(0.5), cache=False,
                       batch_size=32)
    assert len(result.thresholds.values) == 3
    report = bench(toy, "tensorrt-fp32", batch_sizes=(1, MAX_BATCH), data=x, data_limit=100, repeats=2, warmup=1)
    assert report is not None
    with pytest.raises(InputError, match="exceeds the largest batch"):
        bench(toy, "tensorrt-fp32", batch_sizes=(16,), repeats=1, warmup=0)


# --------------------------------------------------------------------------- memory, copies


def test_buffers_are_pooled_pinned_and_scratch_is_shared(toy: Path, standin: dict[str, Any]) -> None:
    x = toy_inputs(24, seed=7)
    with load(toy, "tensorrt-fp32", batch_size=8) as runner:
        cuda, trt, pools = standin["backends"][0]
        opened = len(cuda.calls)  # opening zero-fills the batch-1 graph inputs once
        runner.predict(x, thresholds=THRESHOLDS)  # warm-up: the pool fills
        misses, allocs = pools[0].misses, cuda.counts["mem_alloc"]
        runner.predict(x, thresholds=THRESHOLDS)
        assert pools[0].misses == misses, "a warm run allocated device memory from the driver"
        assert cuda.counts["mem_alloc"] == allocs
        copies = [c for c in cuda.calls[opened:] if c[0] in ("htod", "dtoh")]
        assert copies and all(pinned for _, (_, _, pinned) in copies), "a host copy used pageable memory"
        scratch = {e.contexts[0].device_memory for e in trt.engines}  # [1]: the batch-1 graph's context
        assert len(scratch) == 1  # one allocation for every execution context...
        assert next(iter(scratch))[1] == max(e.device_memory_size_v2 for e in trt.engines)  # ...sized to the largest
        assert cuda.counts["no_context"] == 0


def test_compaction_gathers_rows_with_one_copy_per_run(toy: Path, standin: dict[str, Any]) -> None:
    x = toy_inputs(8, seed=8)
    with load(toy, "tensorrt-fp32") as runner:
        backend = runner.backend
        dev = backend.from_host(x)
        cuda = standin["backends"][0][0]
        before = len(cuda.calls)
        rows = np.array([0, 1, 2, 5, 6], np.int64)
        out = backend.take(dev, rows)
        assert [c[0] for c in cuda.calls[before:]] == ["dtod", "dtod"]  # [0 1 2] and [5 6]
        np.testing.assert_array_equal(backend.to_host(out), x[rows])


# --------------------------------------------------------------------------- threads, lifetime


def test_threads_share_a_runner(toy: Path, standin: dict[str, Any]) -> None:
    xs = [toy_inputs(20, seed=s) for s in range(4)]
    runner = load(toy, "tensorrt-fp32", batch_size=8)
    want = [runner.predict(x, thresholds=THRESHOLDS) for x in xs]
    cuda = standin["backends"][0][0]
    left: list[int] = []

    def work(i: int) -> None:
        for _ in range(3):
            _same(runner.predict(xs[i], thresholds=THRESHOLDS), want[i])
        left.append(len(cuda.stack()))  # every push was popped in this thread

    assert run_in_threads(work, 4) == []
    assert left == [0, 0, 0, 0] and cuda.counts["no_context"] == 0
    runner.close()


def test_close_releases_everything_once(toy: Path, standin: dict[str, Any]) -> None:
    with load(toy, "tensorrt-fp32") as runner:
        runner.predict(toy_inputs(3))
        backend = runner.backend
    cuda, _trt, pools = standin["backends"][0]
    assert [c.retained for c in cuda.contexts] == [0]  # the primary context released
    assert pools[0].stopped and all(s.context is None for s in runner.sessions)
    assert cuda.stack() == []
    runner.close()  # idempotent
    with pytest.raises(TargetError, match="closed"):
        backend.from_host(toy_inputs(1))


# --------------------------------------------------------------------------- CUDA graphs, typing


def test_batch_one_replays_a_cuda_graph(toy: Path, standin: dict[str, Any]) -> None:
    x = toy_inputs(6, seed=9)
    ref = load(toy, "onnxruntime-fp32", threads=1).predict(x)
    with load(toy, "tensorrt-fp32", batch_size=1) as runner:
        cuda = standin["backends"][0][0]
        assert cuda.counts["begin_capture"] == 3  # once per segment, when it opens (one thread)
        _same(runner.predict(x), ref)
        assert cuda.counts["begin_capture"] == 3 and cuda.counts["graph_launch"] == 3 * 6  # replayed


def test_graph_capture_failure_falls_back(toy: Path, standin: dict[str, Any]) -> None:
    standin["kind"]["graphs"] = False
    x = toy_inputs(4, seed=10)
    ref = load(toy, "onnxruntime-fp32", threads=1).predict(x)
    with load(toy, "tensorrt-fp32", batch_size=1) as runner:
        _same(runner.predict(x), ref)
        assert any("no CUDA graph" in m for s, m in runner.backend.log.records if s == "SECTION")


def test_refused_shapes_are_target_errors(toy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindings, *_ = standin_bindings(refuse_shapes=True)
    monkeypatch.setattr(trt_runtime, "default_bindings", lambda: bindings)
    with load(toy, "tensorrt-fp32", batch_size=4, cuda_graphs=False) as runner, \
            pytest.raises(TargetError, match="TensorRT refused shape"):
        runner.predict(toy_inputs(4))


def test_fp16_engines_carry_fp16_tensors_and_return_fp32_exits(toy: Path, standin: dict[str, Any]) -> None:
    add_standin_entry(toy, Precision.FP16)
    x = toy_inputs(10, seed=11)
    ref = load(toy, "onnxruntime-fp32", threads=1).all_exits(x)
    with load(toy, "tensorrt-fp16") as runner:
        out = runner.run_segment(0, {"x": runner.backend.from_host(x[:4])})
        assert out["h1"].dtype == np.float16 and out["e1"].dtype == np.float32  # exits stay fp32
        for g, r in zip(runner.all_exits(x), ref, strict=True):
            assert g.dtype == np.float32
            assert np.abs(g - r).max() <= 2e-2 * max(1.0, float(np.abs(r).max()))


def test_engines_of_another_gpu_are_refused(toy: Path, standin: dict[str, Any]) -> None:
    with edit_bundle(toy) as w:
        assert w.manifest is not None
        entry = w.manifest.targets["tensorrt-fp32"]
        meta = {**entry.metadata, "tensorrt_version": "10.13.0.35"}
        w.manifest = w.manifest.with_target(dataclasses.replace(entry, metadata=meta))
    with pytest.raises(TargetError, match=r"built with TensorRT 10\.13\.0\.35"):
        load(toy, "tensorrt-fp32")


def test_backends_left_open_are_closed_by_the_exit_hook(toy: Path, standin: dict[str, Any]) -> None:
    """What ``atexit`` runs: every backend still open is closed while CUDA still works."""
    runner = load(toy, "tensorrt-fp32")
    runner.predict(toy_inputs(2))
    cuda, _, pools = standin["backends"][0]
    assert trt_runtime._HOOKED and runner.backend in set(trt_runtime._OPEN)
    trt_runtime._close_open_backends()
    assert [c.retained for c in cuda.contexts] == [0] and pools[0].stopped
    assert runner.backend not in set(trt_runtime._OPEN)
