"""The TensorRT target and runtime, everything that does not need TensorRT or a GPU.

Engine building and running are in ``test_tensorrt_gpu.py`` (marker ``gpu``); fp16
casting with fp32 islands in ``test_tensorrt_fp16.py``; static typing against the
TensorRT stubs in ``test_tensorrt_typing.py``; the session's bookkeeping against an
in-memory CUDA/TensorRT stand-in in ``test_tensorrt_standin.py``; the INT8 graph passes
and ``compile --check`` in ``test_tensorrt_int8.py``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeperceiver.bundle import (
    BATCH,
    BundleWriter,
    Manifest,
    Preprocess,
    QuantizedGraph,
    SegmentSpec,
    TargetEntry,
    TensorSpec,
)
from edgeperceiver.errors import InputError, MissingDependencyError, TargetError
from edgeperceiver.passes.qdq_check import qdq_problems
from edgeperceiver.runtime.tensorrt_device import (
    DeviceFacts,
    check_engine_compatible,
    engine_incompatibilities,
    host_platform,
    jetpack_of,
    jetson_module,
    parse_compute_capability,
    parse_tegra_release,
    strongly_typed_default,
)
from edgeperceiver.runtime.tensorrt_log import BuildLog, make_trt_logger
from edgeperceiver.runtime.tensorrt_memory import DeviceArray, dims_tuple, gather_copy_plan, numpy_dtype
from edgeperceiver.targets.tensorrt_build import onnx_nodes_of_layer
from edgeperceiver.targets.tensorrt_options import BuildOptions, profile_shapes
from edgeperceiver.targets.tensorrt_prepare import segment_sources
from edgeperceiver.targets.tensorrt_report import cache_file_name, user_cache_dir
from edgeperceiver.types import Precision, TargetName

ROOT = Path(__file__).resolve().parents[1]


def _real_tensorrt() -> bool:
    try:
        import tensorrt
    except ImportError:
        return False
    return hasattr(tensorrt, "Builder")


# --------------------------------------------------------------------------- lazy imports


def test_modules_import_without_tensorrt_or_pycuda() -> None:
    code = (
        "import sys; import edgeperceiver.targets.tensorrt, edgeperceiver.runtime.tensorrt; "
        "bad = [m for m in ('tensorrt', 'pycuda', 'onnx', 'torch', 'openvino') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(_real_tensorrt(), reason="TensorRT is installed here")
def test_backend_without_tensorrt_names_the_extra() -> None:
    from edgeperceiver.runtime.tensorrt import TensorRTBackend

    with pytest.raises(MissingDependencyError, match=r"edgeperceiver\[tensorrt\]"):
        TensorRTBackend()


@pytest.mark.skipif(_real_tensorrt(), reason="TensorRT is installed here")
def test_registry_backend_without_tensorrt_names_the_extra() -> None:
    from edgeperceiver.runtime.backends import create_backend

    with pytest.raises(MissingDependencyError, match=r"edgeperceiver\[tensorrt\]"):
        create_backend(TargetName.TENSORRT)


@pytest.mark.skipif(_real_tensorrt(), reason="TensorRT is installed here")
def test_compile_without_tensorrt_names_the_extra(tmp_path: Path) -> None:
    from edgeperceiver.targets.tensorrt import compile_target

    writer = BundleWriter(tmp_path, _manifest())
    with pytest.raises(MissingDependencyError, match=r"edgeperceiver\[tensorrt\]"):
        compile_target(writer, Precision.FP32, calib=None, options={})
    assert not any(tmp_path.iterdir()), "nothing is written when TensorRT is missing"


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None or _real_tensorrt(), reason="needs the stub-only tensorrt install"
)
def test_stub_only_tensorrt_counts_as_missing() -> None:
    """``tensorrt-stubs`` makes ``import tensorrt`` succeed as an empty namespace package."""
    from edgeperceiver.runtime.tensorrt_device import import_tensorrt

    with pytest.raises(MissingDependencyError, match="only as type stubs"):
        import_tensorrt()


# --------------------------------------------------------------------------- options, profiles


def test_build_options_defaults_and_cli_strings() -> None:
    opts = BuildOptions.from_mapping({})
    assert (opts.max_batch, opts.opt, opts.strongly_typed, opts.workspace_mb) == (32, 8, None, 1024)
    assert (opts.int8_fp16, opts.fp16_carried, opts.dla_core, opts.quant.preset) == (True, True, None, "performance")
    assert opts.quant.bias_correction is False  # TensorRT's INT8 default (docs/tensorrt.md)
    assert BuildOptions.from_mapping({"bias_correction": "true"}).quant.bias_correction is True
    assert BuildOptions.from_mapping({"dla_core": "1", "preset": "mixed"}).quant.preset == "mixed"
    opts = BuildOptions.from_mapping({"max_batch": "4", "strongly_typed": "true", "int8_fp16": "0"})
    assert (opts.max_batch, opts.opt, opts.strongly_typed, opts.int8_fp16) == (4, 4, True, False)
    assert BuildOptions.from_mapping({"max_batch": 16, "opt_batch": "2"}).opt == 2


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_bach": 8}, "unknown TensorRT option"),
        ({"max_batch": 0}, "max_batch"),
        ({"max_batch": 4, "opt_batch": 5}, "opt_batch"),
        ({"max_batch": "many"}, "integer"),
        ({"max_batch": True}, "integer"),
        ({"strongly_typed": "maybe"}, "true or false"),
        ({"optimization_level": 9}, "optimization_level"),
        ({"workspace_mb": 1}, "workspace_mb"),
        ({"dla_core": -1}, "dla_core"),
        ({"subset_size": "lots"}, "subset_size"),
    ],
)
def test_build_options_reject_bad_values(options: dict[str, Any], match: str) -> None:
    with pytest.raises(InputError, match=match):
        BuildOptions.from_mapping(options)


@pytest.mark.parametrize("batch_dim", [-1, "batch", "N", BATCH])
def test_profile_shapes_dynamic_batch(batch_dim: int | str) -> None:
    p = profile_shapes("x", (batch_dim, 3, 224, 224), opt_batch=8, max_batch=32)
    assert p.min == (1, 3, 224, 224)
    assert p.opt == (8, 3, 224, 224)
    assert p.max == (32, 3, 224, 224)
    assert p.to_json() == {"min": [1, 3, 224, 224], "opt": [8, 3, 224, 224], "max": [32, 3, 224, 224]}


def test_profile_shapes_carried_tensors_of_any_rank() -> None:
    assert profile_shapes("latent", (-1, 32, 144), opt_batch=1, max_batch=4).max == (4, 32, 144)
    assert profile_shapes("logits", ("batch", 1000), opt_batch=2, max_batch=2).opt == (2, 1000)


def test_profile_shapes_fixed_batch_one_only_for_batch_one_builds() -> None:
    p = profile_shapes("x", (1, 3, 8, 8), opt_batch=1, max_batch=1)
    assert p.min == p.opt == p.max == (1, 3, 8, 8)
    with pytest.raises(TargetError, match="fixed batch"):
        profile_shapes("x", (1, 3, 8, 8), opt_batch=1, max_batch=8)


@pytest.mark.parametrize("shape", [(-1, 3, -1, 224), ("batch", "c", 7, 7), (-1, 0, 4), ()])
def test_profile_shapes_refuse_other_dynamic_axes(shape: tuple[int | str, ...]) -> None:
    with pytest.raises(TargetError):
        profile_shapes("t", shape, opt_batch=1, max_batch=2)


# --------------------------------------------------------------------------- facts, compatibility


ORIN = DeviceFacts("10.3.0.30", "Orin", (8, 7), "L4T R36.3.0")


def _entry(meta: dict[str, Any] | None = None, precision: Precision = Precision.FP16) -> TargetEntry:
    base = {**ORIN.to_metadata(), "precision": precision.value, "max_batch": 8}
    return TargetEntry(TargetName.TENSORRT, precision, ("tensorrt-fp16/seg1.engine",), metadata=meta or base)


def test_device_facts_metadata_round_trip() -> None:
    meta = ORIN.to_metadata()
    assert meta["compute_capability"] == "8.7"
    assert DeviceFacts.from_metadata(meta) == ORIN


def test_parse_compute_capability() -> None:
    assert parse_compute_capability("8.7") == (8, 7)
    assert parse_compute_capability([9, 0]) == (9, 0)
    with pytest.raises(TargetError):
        parse_compute_capability("sm87")


def test_same_device_is_compatible() -> None:
    assert engine_incompatibilities(ORIN, ORIN) == []
    assert check_engine_compatible(_entry(), ORIN) == ORIN


def test_other_tensorrt_version_is_refused_with_rebuild_command() -> None:
    here = DeviceFacts("10.7.0.23", "Orin", (8, 7))
    with pytest.raises(TargetError) as info:
        check_engine_compatible(_entry(), here)
    msg = str(info.value)
    assert "TensorRT 10.3.0.30" in msg and "10.7.0.23" in msg
    assert "edgeperceiver compile BUNDLE --target tensorrt --precision fp16" in msg


def test_other_gpu_is_refused() -> None:
    h100 = DeviceFacts("10.3.0.30", "NVIDIA H100 80GB HBM3", (9, 0))
    problems = engine_incompatibilities(ORIN, h100)
    assert len(problems) == 1 and "compute capability 8.7" in problems[0] and "9.0" in problems[0]
    with pytest.raises(TargetError, match="rebuild them on this device"):
        check_engine_compatible(_entry(), h100)


def test_same_capability_other_model_needs_strict_device_off() -> None:
    a10 = DeviceFacts("10.3.0.30", "NVIDIA A10", (8, 6))
    a40 = DeviceFacts("10.3.0.30", "NVIDIA A40", (8, 6))
    assert engine_incompatibilities(a10, a40) == ["built on a NVIDIA A10, this GPU is a NVIDIA A40"]
    assert engine_incompatibilities(a10, a40, strict_device=False) == []
    entry = _entry({**a10.to_metadata(), "max_batch": 8})
    with pytest.raises(TargetError, match="strict_device=False"):
        check_engine_compatible(entry, a40)
    assert check_engine_compatible(entry, a40, strict_device=False) == a10


def test_entry_without_facts_or_of_another_target_is_refused() -> None:
    with pytest.raises(TargetError, match="does not record tensorrt_version"):
        check_engine_compatible(_entry({"gpu_name": "Orin", "compute_capability": "8.7"}), ORIN)
    ov = TargetEntry(TargetName.OPENVINO, Precision.FP32, ("ov/seg1.xml",))
    with pytest.raises(TargetError, match="not a TensorRT entry"):
        check_engine_compatible(ov, ORIN)


def test_parse_tegra_release() -> None:
    text = "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, DATE: Mon May  6 2024\n"
    assert parse_tegra_release(text) == "L4T R36.3.0"
    assert parse_tegra_release("Ubuntu 22.04") is None
    assert jetpack_of("L4T R36.3.0") == "6.0" and jetpack_of("L4T R35.4.1") == "5.1.2" and jetpack_of("x86_64") is None


def test_jetson_facts_from_a_device_tree(tmp_path: Path) -> None:
    """A Jetson is recognised by its release file; the module comes from the device tree."""
    assert jetson_module(tmp_path) == ""  # no /etc/nv_tegra_release: not a Jetson
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text(
        "# R36 (release), REVISION: 4.0, GCID: 1, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13 2024\n")
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\x00")
    assert host_platform(tmp_path) == "L4T R36.4.0"
    assert jetson_module(tmp_path) == "NVIDIA Jetson Orin Nano Developer Kit"


def test_orin_modules_are_told_apart_by_module_name() -> None:
    """Every Orin reports compute capability 8.7 and the GPU name "Orin"."""
    agx = DeviceFacts("10.3.0.30", "Orin", (8, 7), "L4T R36.3.0", "NVIDIA Jetson AGX Orin Developer Kit")
    nano = DeviceFacts("10.3.0.30", "Orin", (8, 7), "L4T R36.3.0", "NVIDIA Jetson Orin Nano Developer Kit")
    assert engine_incompatibilities(agx, nano) == [f"built on a {agx.module}, this GPU is a {nano.module}"]
    assert engine_incompatibilities(agx, nano, strict_device=False) == []
    assert engine_incompatibilities(agx, ORIN) == []  # a build that did not record its module
    assert DeviceFacts.from_metadata(agx.to_metadata()) == agx


@pytest.mark.parametrize(
    ("version", "requested", "strong"),
    [("10.3.0.30", None, False), ("10.11.0", None, False), ("10.12.0.36", None, True), ("10.13.3", None, True),
     ("11.0.0", None, True), ("10.3.0.30", True, True), ("10.13.0", False, False)],
)
def test_typing_follows_the_tensorrt_version(version: str, requested: bool | None, strong: bool) -> None:
    assert strongly_typed_default(version, requested) is strong


def test_tensorrt_11_refuses_weak_typing() -> None:
    with pytest.raises(InputError, match="strongly typed networks only"):
        strongly_typed_default("11.0.0", False)


# --------------------------------------------------------------------------- device arrays, compaction


def _apply_plan(src: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Run the copy plan on host bytes exactly as the backend runs it on device memory."""
    src_bytes = np.ascontiguousarray(src).view(np.uint8).reshape(-1)
    row_bytes = src.dtype.itemsize * int(np.prod(src.shape[1:], dtype=np.int64))
    out = np.full(len(rows) * row_bytes, 0xAB, np.uint8)
    for s, d, n in gather_copy_plan(rows, src.shape[0], row_bytes):
        assert s >= 0 and d >= 0
        assert s + n <= src_bytes.size and d + n <= out.size
        out[d : d + n] = src_bytes[s : s + n]
    return out.view(src.dtype).reshape((len(rows), *src.shape[1:]))


@settings(max_examples=150, deadline=None)
@given(
    batch=st.integers(1, 40),
    inner=st.sampled_from([(), (3,), (2, 5), (4, 2, 2)]),
    dtype=st.sampled_from([np.float32, np.float16, np.int64, np.int8]),
    data=st.data(),
)
def test_copy_plan_gathers_like_numpy_take(batch: int, inner: tuple[int, ...], dtype: Any, data: Any) -> None:
    rows = np.array(data.draw(st.lists(st.integers(0, batch - 1), max_size=2 * batch)), dtype=np.int64)
    src = np.arange(batch * int(np.prod(inner, dtype=np.int64)), dtype=np.int64).reshape((batch, *inner)).astype(dtype)
    np.testing.assert_array_equal(_apply_plan(src, rows), src[rows])


def test_copy_plan_merges_runs_of_survivors() -> None:
    survivors = np.flatnonzero(np.array([0, 1, 1, 1, 0, 1, 1, 0, 0, 1], bool))  # [1 2 3] [5 6] [9]
    assert gather_copy_plan(survivors, 10, 8) == [(8, 0, 24), (40, 24, 16), (72, 40, 8)]
    assert gather_copy_plan(np.arange(10), 10, 4) == [(0, 0, 40)]  # nobody left: one copy
    assert gather_copy_plan(np.array([], np.int64), 10, 4) == []
    assert gather_copy_plan(np.array([3, 2]), 10, 4) == [(12, 0, 4), (8, 4, 4)]  # order is kept


@pytest.mark.parametrize(
    "rows", [np.array([0, 10]), np.array([-1]), np.array([[0, 1]]), np.array([0.0, 1.0])]
)
def test_copy_plan_refuses_bad_rows(rows: np.ndarray) -> None:
    with pytest.raises(InputError):
        gather_copy_plan(rows, 10, 4)


def test_device_array_geometry_and_interface() -> None:
    a = DeviceArray(0x10000, (8, 32, 144), np.dtype(np.float32), owner="alloc")
    assert a.nbytes == 8 * 32 * 144 * 4 and a.row_bytes == 32 * 144 * 4 and a.batch == 8
    v = a.rows(2, 5)
    assert v.ptr == 0x10000 + 2 * a.row_bytes and v.shape == (3, 32, 144) and v.owner is a
    cai = v.__cuda_array_interface__
    assert cai["shape"] == (3, 32, 144) and cai["typestr"] == "<f4" and cai["data"] == (v.ptr, False)
    with pytest.raises(InputError):
        a.rows(5, 9)


def test_dims_and_dtype_helpers() -> None:
    class FakeDims:
        def __init__(self, d: list[int]) -> None:
            self.d = d

        def __len__(self) -> int:
            return len(self.d)

        def __getitem__(self, i: int) -> int:
            return self.d[i]

    class FakeType:
        def __init__(self, name: str) -> None:
            self.name = name

    assert dims_tuple(FakeDims([-1, 3, 224, 224])) == (-1, 3, 224, 224)
    assert numpy_dtype(FakeType("HALF")) == np.float16 and numpy_dtype(FakeType("FLOAT")) == np.float32
    with pytest.raises(TargetError, match="FP8"):
        numpy_dtype(FakeType("FP8"))


# --------------------------------------------------------------------------- build log


class _FakeSeverity:
    def __init__(self, value: int) -> None:
        self.value = value

    def __int__(self) -> int:
        return self.value


class _FakeILogger:
    """Stands in for ``trt.ILogger``: TensorRT requires the base initialiser to run."""

    def __init__(self) -> None:
        self.base_initialised = True


def test_trt_logger_collects_messages_into_the_build_log() -> None:
    log = BuildLog(min_severity=2)
    fake = type("FakeTRT", (), {"ILogger": _FakeILogger})
    logger: Any = make_trt_logger(log, module=fake)
    assert _FakeILogger in type(logger).__mro__ and logger.base_initialised
    logger.log(_FakeSeverity(3), "Loaded engine size: 12 MiB")  # INFO: below the threshold
    logger.log(_FakeSeverity(2), "Weights [name=conv1] had the following issues")
    logger.log(_FakeSeverity(1), "1: [network.cpp] Error Code 1: Internal Error")
    log.mark("segment 2: segments/seg2.onnx")
    assert log.counts() == {"WARNING": 1, "ERROR": 1, "SECTION": 1}
    assert log.errors() == ["1: [network.cpp] Error Code 1: Internal Error"]
    assert log.text().splitlines() == [
        "[WARNING] Weights [name=conv1] had the following issues",
        "[ERROR] 1: [network.cpp] Error Code 1: Internal Error",
        "[SECTION] segment 2: segments/seg2.onnx",
    ]


def test_verbose_build_log_keeps_info_and_echoes() -> None:
    seen: list[tuple[str, str]] = []
    log = BuildLog(min_severity=3, echo=lambda s, m: seen.append((s, m)))
    log.add(3, "Total Host Persistent Memory: 100\n")
    log.add(4, "verbose chatter")
    assert seen == [("INFO", "Total Host Persistent Memory: 100")]


# --------------------------------------------------------------------------- layers, sources, caches


def test_onnx_nodes_of_layer_reads_parser_metadata() -> None:
    meta = "[ONNX Layer: /blocks.0/norm/LayerNormalization]\x1f[ONNX Layer: /blocks.0/Add]"
    assert onnx_nodes_of_layer("fused", meta) == ["/blocks.0/norm/LayerNormalization", "/blocks.0/Add"]
    assert onnx_nodes_of_layer("/attn/Softmax", "") == ["/attn/Softmax"]


def _manifest(targets: dict[str, TargetEntry] | None = None) -> Manifest:
    x = TensorSpec("x", "float32", (BATCH, 3, 8, 8))
    seg1 = SegmentSpec(1, "segments/seg1.onnx", "e1", (x,), (TensorSpec("e1", "float32", (BATCH, 10)),), ())
    seg2 = SegmentSpec(2, "segments/seg2.onnx", "e2", (x,), (TensorSpec("e2", "float32", (BATCH, 10)),), ())
    return Manifest("toy", "onnx", 17, x, 10, Preprocess((8, 8)), (seg1, seg2), targets=targets or {})


def _stage(folder: str = "quantized-0123456789ab") -> QuantizedGraph:
    return QuantizedGraph(f"{folder}/model.onnx", (f"{folder}/seg1.onnx", f"{folder}/seg2.onnx"), "nncf 3.4.0",
                          "performance", "0" * 64, 300)


def test_segment_sources_fp_and_int8() -> None:
    """INT8 reads the bundle's quantization stage, never another target's entry."""
    m = _manifest()
    assert segment_sources(m, Precision.FP16) == ("segments", ("segments/seg1.onnx", "segments/seg2.onnx"))
    with pytest.raises(TargetError, match="--target tensorrt --precision int8 --calib-data"):
        segment_sources(m, Precision.INT8)
    rels = ("onnxruntime-int8/seg1.onnx", "onnxruntime-int8/seg2.onnx")
    qdq = TargetEntry(TargetName.ONNXRUNTIME, Precision.INT8, rels)
    with pytest.raises(TargetError, match="--target onnxruntime --precision int8"):
        segment_sources(_manifest({qdq.key: qdq}), Precision.INT8)
    m = dataclasses.replace(_manifest({qdq.key: qdq}), quantization=_stage())
    assert segment_sources(m, Precision.INT8) == ("quantized-0123456789ab", _stage().segments)


def test_timing_cache_locations(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("EDGEPERCEIVER_CACHE", raising=False)
    assert cache_file_name(ORIN) == "orin-sm87-trt10.3.0.30.cache"
    assert cache_file_name(DeviceFacts("10.7.0", "NVIDIA GeForce RTX 4090", (8, 9))) == (
        "nvidia-geforce-rtx-4090-sm89-trt10.7.0.cache"
    )
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert user_cache_dir(None) == tmp_path / "edgeperceiver" / "tensorrt"
    assert user_cache_dir("none") is None
    assert user_cache_dir(os.fspath(tmp_path / "c")) == tmp_path / "c"
    monkeypatch.setenv("EDGEPERCEIVER_CACHE", str(tmp_path / "root"))  # the one cache root
    assert user_cache_dir(None) == tmp_path / "root" / "tensorrt"


# --------------------------------------------------------------------------- QDQ compatibility


def _quantized(tmp_path: Path, *, symmetric: bool) -> Any:
    """A small conv net quantized by ONNX Runtime's static quantizer (real QDQ output)."""
    onnx = pytest.importorskip("onnx")
    quant = pytest.importorskip("onnxruntime.quantization")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32) * 0.3, "w2")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
            helper.make_node("Flatten", ["p"], ["f"], name="flat"),
            helper.make_node("MatMul", ["f", "w2"], ["y"], name="fc"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    src, dst = tmp_path / "f.onnx", tmp_path / f"q{int(symmetric)}.onnx"
    onnx.save(model, str(src))

    class Reader:  # ONNX Runtime's CalibrationDataReader contract
        def __init__(self) -> None:
            self.items = iter([{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    act = quant.QuantType.QInt8 if symmetric else quant.QuantType.QUInt8
    quant.quantize_static(
        str(src), str(dst), Reader(), quant_format=quant.QuantFormat.QDQ, activation_type=act,
        weight_type=quant.QuantType.QInt8, extra_options={"ActivationSymmetric": symmetric},
    )
    return onnx.load(str(dst))


def test_qdq_symmetric_int8_is_accepted(tmp_path: Path) -> None:
    model = _quantized(tmp_path, symmetric=True)
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) > 0
    assert qdq_problems(model) == []


def test_qdq_asymmetric_uint8_is_refused(tmp_path: Path) -> None:
    problems = qdq_problems(_quantized(tmp_path, symmetric=False))
    assert problems and any("UINT8" in p for p in problems)


def test_compile_int8_refuses_asymmetric_qdq_before_touching_tensorrt(tmp_path: Path) -> None:
    import onnx

    from edgeperceiver.targets.tensorrt import compile_target

    (tmp_path / "q").mkdir()
    model = _quantized(tmp_path / "q", symmetric=False)
    staging = tmp_path / "stage"
    stage = _stage()
    for rel in stage.segments:
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(staging / rel))
    writer = BundleWriter(staging, dataclasses.replace(_manifest(), quantization=stage))
    with pytest.raises(TargetError, match=r"quantized-0123456789ab/seg1.onnx \(segment 1\).*UINT8.*TensorRT needs"):
        compile_target(writer, Precision.INT8, calib=None, options={})


def test_build_report_summarises_the_build_and_its_log() -> None:
    from edgeperceiver.targets.tensorrt_report import build_report

    log = BuildLog()
    log.mark("segment 1: segments/seg1.onnx")
    for i in range(10):
        log.add(2, f"warning {i}")
    meta = {
        **ORIN.to_metadata(), "precision": "fp16", "typing": "weak", "source": "segments", "opt_batch": 8,
        "max_batch": 32, "timing_cache": "tensorrt-fp16/timing.cache", "build_log": "tensorrt-fp16/build.log",
        "build_seconds": [12.5, 3.25], "fp32_layers": [40, 0],
        "profiles": [{"x": {"min": [1, 3, 224, 224], "opt": [8, 3, 224, 224], "max": [32, 3, 224, 224]}},
                     {"h": {"min": [1, 144], "opt": [8, 144], "max": [32, 144]}, "e1": {"min": [1, 10],
                      "opt": [8, 10], "max": [32, 10]}}],
        "log_counts": {"WARNING": 10},
    }
    text = build_report(meta, log, max_messages=3)
    assert "TensorRT 10.3.0.30 on Orin (sm 8.7, L4T R36.3.0): fp16 engines, weakly typed" in text
    assert "segment 1: 12.5 s, 40 layers pinned to fp32; inputs x[3, 224, 224]" in text
    assert "segment 2: 3.2 s; inputs h[144], e1[10]" in text
    assert "[WARNING] warning 2" in text and "warning 3" not in text and "7 more in tensorrt-fp16/build.log" in text
