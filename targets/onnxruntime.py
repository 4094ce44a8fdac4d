"""Compile a bundle for ONNX Runtime (the portable reference): FP32 or INT8 (QDQ) segments.

- FP32: the bundle's raw segments (``segments/seg{k}.onnx``) are the artifacts; ONNX
  Runtime optimises them when a session opens (the runtime can cache that, see
  ``OrtBackend(cache_dir=...)``), so nothing is duplicated.
- INT8: the segments of the bundle's quantization stage
  (:func:`edgeperceiver.quant_stage.ensure_quantized`: the whole multi-exit graph quantized
  once with NNCF into QDQ, calibrated on ``calib`` images, then cut like the FP32 graph),
  made now or reused. TensorRT INT8 builds from the same stage.

The entry's metadata holds the compile report: per exit, top-1 agreement and max |logit
difference| against the FP32 segments on the calibration images (INT8), and each
segment's measured batch-1 latency.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from edgeperceiver._optional import require
from edgeperceiver.bundle import BundleWriter, Manifest, TargetEntry
from edgeperceiver.errors import InputError, TargetError
from edgeperceiver.progress import message
from edgeperceiver.quant_stage import ensure_quantized
from edgeperceiver.quantize import QuantizeConfig, agreement_lines, check_calibration, exit_agreement, options_to
from edgeperceiver.timing import recorder, take_turns
from edgeperceiver.types import Precision, TargetName


@dataclass(frozen=True)
class OrtOptions:
    """``compile --target onnxruntime`` options (``options`` dict keys = field names)."""

    quant: QuantizeConfig = field(default_factory=QuantizeConfig)
    threads: int | None = None  #: intra-op threads for the latency report
    latency_runs: int = field(default=30, metadata={"min": 0})  #: timed batch-1 runs per segment (0 = skip)
    report_samples: int = field(default=64, metadata={"min": 0})  #: images for the agreement report (0 = skip)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> OrtOptions:
        try:
            opts: OrtOptions = options_to(cls, options)
        except InputError as exc:
            raise InputError(f"ONNX Runtime: {exc}") from None
        return opts


def compile_target(
    writer: BundleWriter, precision: Precision, *, calib: np.ndarray | None, options: Mapping[str, Any]
) -> TargetEntry:
    """The ``onnxruntime-fp32`` (raw segments) or ``onnxruntime-int8`` (QDQ segments) entry."""
    ort = require("onnxruntime", purpose="compiling for ONNX Runtime")
    opts = OrtOptions.from_options(options)
    manifest = writer.manifest
    if manifest is None:
        raise TargetError("internal: compile_target needs a bundle with a manifest")
    metadata: dict[str, Any] = {"onnxruntime": ort.__version__, "providers": ["CPUExecutionProvider"]}
    lines: list[str] = []

    def log(msg: str) -> None:
        lines.append(msg.strip())
        _log(msg)

    fp32_paths = [writer.dir / s.path for s in manifest.segments]
    if precision is Precision.FP32:
        paths = tuple(s.path for s in manifest.segments)
        mono = manifest.model_path
        run_paths = fp32_paths
    elif precision is Precision.INT8:
        if calib is None:
            raise InputError("INT8 needs calibration images (--calib-data)")
        calib = check_calibration(calib, manifest.input.shape)
        t0 = time.perf_counter()
        stage = ensure_quantized(writer, calib, opts.quant, log=log)
        metadata["quantization"] = {**opts.quant.describe(), "calibration_images": int(calib.shape[0]),
                                    "format": stage.format, "stage": stage.model.rpartition("/")[0],
                                    "tool": stage.tool, "calibration_sha256": stage.calibration_sha256}
        metadata["quantize_seconds"] = round(time.perf_counter() - t0, 1)
        mono = stage.model
        paths = stage.segments
        run_paths = [writer.dir / r for r in paths]
    else:
        raise InputError(f"ONNX Runtime builds fp32 or int8, not {precision.value}")

    sessions = [_session(ort, str(p), opts.threads) for p in run_paths]
    if precision is Precision.INT8 and opts.report_samples > 0 and calib is not None:
        images = calib[: opts.report_samples]
        ref = _exits([_session(ort, str(p), opts.threads) for p in fp32_paths], manifest, images)
        got = _exits(sessions, manifest, images)
        rows = exit_agreement(ref, got, manifest.exits)
        metadata["agreement"] = {"images": int(images.shape[0]), "reference": "onnxruntime-fp32", "exits": rows}
        for line in agreement_lines(rows):
            log(line)
    latency: tuple[float, ...] = ()
    if opts.latency_runs > 0:
        seg_ms = _latency(sessions, manifest, opts.latency_runs)
        latency = tuple(round(float(x), 3) for x in np.cumsum(seg_ms))
        metadata["segment_ms"] = [round(x, 3) for x in seg_ms]
        metadata["latency_threads"] = opts.threads
        for k, (s, c) in enumerate(zip(seg_ms, latency, strict=True), start=1):
            log(f"  segment {k}: {s:.2f} ms (to exit {k}: {c:.2f} ms)")
    metadata["report"] = "\n".join(lines)
    return TargetEntry(
        target=TargetName.ONNXRUNTIME, precision=precision, segments=paths, monolithic=mono,
        metadata=metadata, latency_ms=latency,
    )


def _session(ort: Any, path: str, threads: int | None) -> Any:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception classes
        raise TargetError(f"ONNX Runtime cannot load {path}: {exc}") from exc


def _run_chain(sessions: Sequence[Any], manifest: Manifest, x: np.ndarray) -> dict[str, np.ndarray]:
    live: dict[str, np.ndarray] = {manifest.input.name: x}
    for sess, spec in zip(sessions, manifest.segments, strict=True):
        names = [o.name for o in sess.get_outputs()]
        try:
            got = sess.run(names, {t.name: live[t.name] for t in spec.inputs})
        except Exception as exc:  # onnxruntime raises its own exception classes
            raise TargetError(f"segment {spec.index} failed in ONNX Runtime: {exc}") from exc
        live.update(zip(names, got, strict=True))
    return live


def _exits(sessions: Sequence[Any], manifest: Manifest, images: np.ndarray, batch: int = 16) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in manifest.segments]
    for i in range(0, images.shape[0], batch):
        live = _run_chain(sessions, manifest, images[i : i + batch])
        for k, spec in enumerate(manifest.segments):
            parts[k].append(live[spec.exit])
    return [np.concatenate(p) for p in parts]


def _latency(sessions: Sequence[Any], manifest: Manifest, runs: int) -> list[float]:
    shape = tuple(int(d) for d in manifest.input.shape[1:])
    x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    live = _run_chain(sessions, manifest, x)
    feeds = [{t.name: live[t.name] for t in s.inputs} for s in manifest.segments]
    run_chain, times = recorder([partial(sess.run, None, f) for sess, f in zip(sessions, feeds, strict=True)])
    take_turns([run_chain], runs, warmup=3, min_seconds=0.5)  # a small model gets more calls
    return [statistics.median(t) * 1e3 for t in times]


def _log(msg: str) -> None:
    message(msg)
