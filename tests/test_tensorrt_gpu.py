"""TensorRT end to end: build engines from a bundle, run them with early exit on the GPU.

Runs wherever ``tensorrt`` (the real library, not only its stubs), ``pycuda`` and an NVIDIA
GPU are present; skips with that reason elsewhere (development and CI machines).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundles import make_toy_bundle, toy_inputs

from edgeperceiver.bundle import Bundle, TargetEntry, edit_bundle
from edgeperceiver.errors import InputError, TargetError
from edgeperceiver.types import Precision, TargetName


def _gpu_ready() -> str | None:
    """None when TensorRT and a GPU are usable, else the reason to skip."""
    try:
        import tensorrt
    except ImportError:
        return "TensorRT is not installed (pip install 'edgeperceiver[tensorrt]')"
    if not hasattr(tensorrt, "Builder"):
        return "only the TensorRT type stubs are installed, not TensorRT"
    try:
        import pycuda.driver as cuda
    except ImportError:
        return "pycuda is not installed (pip install 'edgeperceiver[tensorrt]')"
    try:
        cuda.init()
        if cuda.Device.count() < 1:
            return "no NVIDIA GPU"
    except Exception as exc:  # pycuda's own errors when there is no driver
        return f"CUDA is not usable: {exc}"
    return None


_REASON = _gpu_ready()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


@pytest.fixture(scope="module")
def backend() -> Any:
    from edgeperceiver.runtime.tensorrt import TensorRTBackend

    b = TensorRTBackend(device=0)
    yield b
    b.close()


@pytest.fixture()
def toy(tmp_path: Path) -> Path:
    return make_toy_bundle(tmp_path / "toy", num_classes=5, width=4, size=8)


def _compile(bundle: Path, precision: Precision, tmp_path: Path, **options: Any) -> TargetEntry:
    from edgeperceiver.targets import compile_bundle

    calib = toy_inputs(16) if precision is Precision.INT8 else None
    opts = {"max_batch": 8, "opt_batch": 4, "timing_cache": str(tmp_path / "cache"), **options}
    return compile_bundle(bundle, TargetName.TENSORRT, precision, calib_data=calib, options=opts)


def _reference(bundle: Path, x: np.ndarray) -> list[np.ndarray]:
    from edgeperceiver.runtime.runner import load

    return load(bundle, "onnxruntime-fp32", threads=1).all_exits(x)


def test_fp32_engines_match_onnxruntime(toy: Path, tmp_path: Path, backend: Any) -> None:
    entry = _compile(toy, Precision.FP32, tmp_path)
    b = Bundle.open(toy)
    meta = entry.metadata
    assert entry.segments == tuple(f"tensorrt-fp32/seg{k}.engine" for k in (1, 2, 3))
    assert meta["tensorrt_version"] == backend.facts.tensorrt_version
    assert meta["gpu_name"] == backend.facts.gpu_name
    assert meta["profiles"][0]["x"] == {"min": [1, 3, 8, 8], "opt": [4, 3, 8, 8], "max": [8, 3, 8, 8]}
    assert set(meta["profiles"][1]) == {"h1", "e1"}
    assert b.path("tensorrt-fp32/timing.cache").stat().st_size > 0
    assert b.path("tensorrt-fp32/build.log").is_file()
    assert list((tmp_path / "cache").glob("*.cache")), "the user timing cache is written"

    from edgeperceiver.runtime.runner import Runner

    x = toy_inputs(7)
    runner = Runner(b, b.manifest.target("tensorrt-fp32"), backend)
    got = runner.all_exits(x)
    for g, r in zip(got, _reference(toy, x), strict=True):
        np.testing.assert_allclose(g, r, atol=1e-3, rtol=1e-3)


def test_early_exit_compacts_on_the_device(toy: Path, tmp_path: Path, backend: Any) -> None:
    from edgeperceiver.runtime.runner import Runner, load

    _compile(toy, Precision.FP32, tmp_path)
    b = Bundle.open(toy)
    x = toy_inputs(8, seed=3)
    trt_runner = Runner(b, b.manifest.target("tensorrt-fp32"), backend, thresholds=[0.5, 0.6, None])
    ort_runner = load(toy, "onnxruntime-fp32", thresholds=[0.5, 0.6, None], threads=1)
    p_trt, p_ort = trt_runner.predict(x), ort_runner.predict(x)
    np.testing.assert_array_equal(p_trt.exits, p_ort.exits)
    np.testing.assert_array_equal(p_trt.labels, p_ort.labels)
    forced = np.array([1, 2, 3, 1, 3, 2, 2, 1])
    np.testing.assert_array_equal(trt_runner.predict(x, force_exits=forced).exits, forced)


def test_device_take_from_host_to_host(backend: Any) -> None:
    from edgeperceiver.runtime.tensorrt import DeviceArray

    a = np.arange(10 * 3 * 4, dtype=np.float32).reshape(10, 3, 4)
    d = backend.from_host(a)
    assert isinstance(d, DeviceArray) and d.shape == a.shape
    for rows in ([1, 2, 3, 7, 9], [9, 0], [], list(range(10))):
        idx = np.array(rows, np.int64)
        np.testing.assert_array_equal(backend.to_host(backend.take(d, idx)), a[idx])
    np.testing.assert_array_equal(backend.to_host(d.rows(2, 5)), a[2:5])


def test_fp16_engines_are_close_to_fp32(toy: Path, tmp_path: Path, backend: Any) -> None:
    from edgeperceiver.runtime.runner import Runner

    x = toy_inputs(6)
    ref = _reference(toy, x)
    for typed in (None, True):  # the version default, and the strongly typed cast path
        entry = _compile(toy, Precision.FP16, tmp_path, strongly_typed=typed)
        assert entry.metadata["typing"] in ("strong", "weak")
        b = Bundle.open(toy)
        got = Runner(b, b.manifest.target("tensorrt-fp16"), backend).all_exits(x)
        for g, r in zip(got, ref, strict=True):
            assert np.abs(g - r).max() <= 2e-2 * max(1.0, float(np.abs(r).max()))


def test_int8_needs_the_quantization_stage(toy: Path) -> None:
    from edgeperceiver.targets import compile_bundle

    with pytest.raises(TargetError, match="--target onnxruntime --precision int8"):
        compile_bundle(toy, TargetName.TENSORRT, Precision.INT8, options={"max_batch": 8})


def test_int8_engines_from_the_quantization_stage(toy: Path, tmp_path: Path, backend: Any) -> None:
    from edgeperceiver.runtime.runner import Runner

    entry = _compile(toy, Precision.INT8, tmp_path, subset_size=16)  # NNCF on the toy images: the stage
    assert entry.metadata["source"].startswith("quantized-")
    b = Bundle.open(toy)
    assert b.manifest.quantization is not None
    x = toy_inputs(16)
    got = Runner(b, b.manifest.target("tensorrt-int8"), backend).all_exits(x)
    for g, r in zip(got, _reference(toy, x), strict=True):
        assert np.corrcoef(g.ravel(), r.ravel())[0, 1] > 0.95
        assert np.abs(g - r).max() <= 0.25 * max(1.0, float(np.abs(r).max()))


def test_runner_splits_batches_and_replays_graphs_on_the_gpu(toy: Path, tmp_path: Path, backend: Any) -> None:
    """More samples than the engines' max_batch; batch 1 through CUDA graphs; several threads."""
    from bundles import run_in_threads

    from edgeperceiver.runtime.runner import Runner

    _compile(toy, Precision.FP16, tmp_path)
    b = Bundle.open(toy)
    x = toy_inputs(21, seed=4)
    ref = _reference(toy, x)
    batched = Runner(b, b.manifest.target("tensorrt-fp16"), backend, batch_size=32)
    single = Runner(b, b.manifest.target("tensorrt-fp16"), backend, batch_size=1)
    assert batched.max_batch == 8
    for got in (batched.all_exits(x), single.all_exits(x)):
        for g, r in zip(got, ref, strict=True):
            assert np.abs(g - r).max() <= 2e-2 * max(1.0, float(np.abs(r).max()))
    want = batched.predict(x)

    def work(i: int) -> None:
        np.testing.assert_array_equal(batched.predict(x).labels, want.labels)

    assert run_in_threads(work, 4) == []


def test_engines_of_another_gpu_are_refused_before_deserializing(toy: Path, tmp_path: Path, backend: Any) -> None:
    _compile(toy, Precision.FP32, tmp_path)
    with edit_bundle(toy) as w:
        assert w.manifest is not None
        entry = w.manifest.targets["tensorrt-fp32"]
        w.replace_file(entry.segments[0], b"not an engine")  # would crash TensorRT if it got that far
        meta = {**entry.metadata, "gpu_name": "Some Other GPU", "compute_capability": "1.0"}
        w.manifest = w.manifest.with_target(dataclasses.replace(entry, metadata=meta))
    b = Bundle.open(toy)
    with pytest.raises(TargetError, match="rebuild them on this device"):
        backend.open(b, b.manifest.target("tensorrt-fp32"), b.manifest.segments[0])


def test_batch_beyond_the_profile_is_an_input_error(toy: Path, tmp_path: Path, backend: Any) -> None:
    _compile(toy, Precision.FP32, tmp_path, max_batch=2, opt_batch=1)
    b = Bundle.open(toy)
    session = backend.open(b, b.manifest.target("tensorrt-fp32"), b.manifest.segments[0])
    with pytest.raises(InputError, match="outside this engine's range"):
        session.run({"x": toy_inputs(3)})
