"""Build TensorRT engines (one per segment) from a bundle's ONNX segments, on the target GPU.

``edgeperceiver compile BUNDLE --target tensorrt --precision {fp32,fp16,int8}`` ends here;
``--check`` runs every step before the build, without TensorRT (:func:`check_target`).
Engines are tied to one GPU and one TensorRT version, so the build runs on the device itself
(a Jetson, a workstation GPU); the facts an engine depends on (TensorRT version, GPU,
compute capability, L4T release and Jetson module) are written into the target entry's
metadata and checked by the runtime before it deserializes anything.

Typing: strongly typed networks from TensorRT 10.12 on (weak typing is deprecated there)
and on TensorRT 11 (the only kind); weak typing with precision constraints before (JetPack
6 ships 10.3). ``--option strongly_typed=true|false`` overrides where the version allows.

Precision:

- **fp32**: the ONNX segments as they are.
- **fp16**: strong typing: the graph cast to fp16 with fp32 islands around normalisation,
  softmax and variance computations; weak typing: the FP16 builder flag with those
  layers pinned to fp32. Carried tensors stay fp16 between the engines, exits are fp32.
- **int8**: explicit quantization only, from the bundle's quantization stage (made here
  from ``--calib-data`` when the bundle has none, or reused): unsigned quantizers made
  signed, the Q/DQ check, and the layers outside Q/DQ in fp16 (``int8_fp16``, default on).

Every segment gets one optimization profile (batch 1 / ``opt_batch`` / ``max_batch``); one
timing cache is shared by all segments and kept both in the target directory and in a
per-GPU user cache (``tensorrt/`` under the cache root), so rebuilds are fast. TensorRT's
build log is captured into ``tensorrt-<precision>/build.log``. ``--option dla_core=N``
(``--dla-core N``) builds for a Jetson DLA core with GPU fallback.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgeperceiver.bundle import BundleWriter, Manifest, TargetEntry
from edgeperceiver.errors import BundleError, InputError
from edgeperceiver.fsutil import atomic_write
from edgeperceiver.progress import message
from edgeperceiver.quant_stage import ensure_quantized
from edgeperceiver.runtime.tensorrt_device import (
    DeviceFacts,
    current_device_facts,
    import_cuda,
    import_tensorrt,
    jetpack_of,
    strongly_typed_default,
)
from edgeperceiver.runtime.tensorrt_log import BuildLog, make_trt_logger
from edgeperceiver.types import Precision, TargetName

from .tensorrt_build import BuildState, build_segment
from .tensorrt_options import BuildOptions
from .tensorrt_prepare import CheckReport, check, prepare
from .tensorrt_report import build_report, cache_file_name, initial_cache, user_cache_dir

PRECISIONS = (Precision.FP32, Precision.FP16, Precision.INT8)


def _start(writer: BundleWriter, precision: Precision, calib: np.ndarray | None, options: dict[str, Any]
           ) -> tuple[Manifest, BuildOptions]:
    """Options parsed; for INT8 the quantization stage made from ``calib`` (or reused)."""
    opts = BuildOptions.from_mapping(options)
    if writer.manifest is None:
        raise BundleError("internal: compiling for TensorRT needs the bundle's manifest")
    if precision not in PRECISIONS:
        raise InputError(f"TensorRT builds fp32, fp16 or int8 engines, not {precision.value}")
    if precision is Precision.INT8 and calib is not None:
        ensure_quantized(writer, calib, opts.quant)
    assert writer.manifest is not None
    return writer.manifest, opts


def check_target(
    writer: BundleWriter, precision: Precision, *, calib: np.ndarray | None, options: dict[str, Any]
) -> CheckReport:
    """Every pre-build step for both typings (or the one ``strongly_typed`` names), without TensorRT."""
    manifest, opts = _start(writer, precision, calib, options)
    typings = (True, False) if opts.strongly_typed is None else (opts.strongly_typed,)
    return check(writer.dir, manifest, precision, opts, typings=typings)


def compile_target(
    writer: BundleWriter, precision: Precision, *, calib: np.ndarray | None, options: dict[str, Any]
) -> TargetEntry:
    """Build one TensorRT engine per segment of the bundle staged in ``writer``.

    Writes ``tensorrt-<precision>/seg<k>.engine``, ``timing.cache`` and ``build.log``.
    """
    manifest, opts = _start(writer, precision, calib, options)
    if precision is Precision.INT8:  # the INT8 source and Q/DQ checks fail before TensorRT is imported
        prepare(writer.dir, manifest, precision, opts, strongly_typed=False)
    trt_mod = import_tensorrt()
    strongly = strongly_typed_default(str(trt_mod.__version__), opts.strongly_typed)
    prep = prepare(writer.dir, manifest, precision, opts, strongly_typed=strongly)
    cuda = import_cuda()
    facts = current_device_facts(opts.device, cuda=cuda, trt_module=trt_mod)
    # build on the chosen GPU: TensorRT (CUDA runtime) uses the context current in this thread
    device_ctx = cuda.Device(opts.device).retain_primary_context()
    device_ctx.push()
    try:
        return _compile(writer, precision, opts, prep, facts, trt_mod)
    finally:
        device_ctx.pop()
        device_ctx.detach()


def _compile(writer: BundleWriter, precision: Precision, opts: BuildOptions, prep: Any, facts: DeviceFacts,
             trt_mod: Any) -> TargetEntry:
    folder = f"tensorrt-{precision.value}"
    log = BuildLog(min_severity=3 if opts.verbose else 2)
    logger = make_trt_logger(log, module=trt_mod)
    builder = trt_mod.Builder(logger)
    state = BuildState(log)
    cache_dir = user_cache_dir(opts.timing_cache)
    user_cache = cache_dir / cache_file_name(facts) if cache_dir is not None else None
    bundle_cache = f"{folder}/timing.cache"
    seed = initial_cache(writer, bundle_cache, user_cache)

    engines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="edgeperceiver-trt-") as tmp:
        for seg in prep.segments:
            message(f"building segment {seg.index} of {len(prep.segments)} ({precision.value})")
            log.mark(f"segment {seg.index}: {seg.source}; " + "; ".join(seg.notes))
            onnx_path = Path(tmp) / f"seg{seg.index}.onnx"
            onnx_path.write_bytes(seg.model.SerializeToString())
            plan = build_segment(builder, logger, seg, onnx_path, precision, opts, prep.strongly_typed, seed, state)
            out_rel = f"{folder}/seg{seg.index}.engine"
            writer.replace_file(out_rel, plan)
            engines.append(out_rel)

    cache_bytes = bytes(state.cache.serialize()) if state.cache is not None else b""
    if cache_bytes:
        writer.replace_file(bundle_cache, cache_bytes)
        if user_cache is not None:
            try:
                user_cache.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(user_cache, cache_bytes)
            except OSError as exc:
                log.mark(f"could not update the user timing cache {user_cache}: {exc}")
    writer.replace_file(f"{folder}/build.log", log.text().encode("utf-8"))
    metadata: dict[str, Any] = {
        **facts.to_metadata(),
        "jetpack": jetpack_of(facts.platform),
        "precision": precision.value,
        "typing": "strong" if prep.strongly_typed else "weak",
        "source": prep.source,
        "max_batch": opts.max_batch,
        "opt_batch": opts.opt,
        "profiles": state.profiles,
        "fp32_layers": state.fp32_layers,
        "fp16_carried": sorted({n for s in prep.segments for n in s.fp16_io}),
        "dla_core": opts.dla_core,
        "build_seconds": [round(s, 2) for s in state.seconds],
        "workspace_mb": opts.workspace_mb,
        "optimization_level": opts.optimization_level,
        "timing_cache": bundle_cache if cache_bytes else None,
        "build_log": f"{folder}/build.log",
        "log_counts": {k: v for k, v in log.counts().items() if k != "SECTION"},
    }
    metadata["report"] = build_report(metadata, log)
    return TargetEntry(target=TargetName.TENSORRT, precision=precision, segments=tuple(engines), metadata=metadata)

