"""Compile a bundle's segments for OpenVINO (x86 CPU): FP32, BF16, INT8 or AUTO IR per segment.

Artifacts under ``openvino-<precision>/``: ``seg{k}.xml/.bin`` (one IR per segment, what
the runtime runs) and ``model.xml/.bin`` (the monolithic model at the same precision, for
benchmarks and the cut-cost report). Weights are stored in FP32 (``compress_to_fp16`` off):
the precision that runs is pinned at compile time in the runtime with
``INFERENCE_PRECISION_HINT`` and recorded in the entry's metadata
(``inference_precision``), because OpenVINO would otherwise pick bf16 on CPUs that have it.

INT8 (``calib`` = preprocessed real images), two methods (``options["method"]``):

- ``"qdq"``: the whole multi-exit graph is quantized once into a QDQ ONNX graph
  (:func:`edgeperceiver.quantize.quantize_qdq`), cut with the export's cut, and every QDQ
  segment is converted to IR (OpenVINO turns Q/DQ pairs into FakeQuantize and runs the
  quantized ops in int8). Every target consumes the same quantizers.
- ``"segment"`` (default): each FP32 segment is quantized on its own with NNCF's OpenVINO
  backend; its calibration inputs are made by running the earlier FP32 segments on the
  images. It kept every exit of the demo model within 0.5 point of FP32 (the QDQ path lost
  0.74 point on the last exit) at ~8% more latency on reg800m (see README.md, "OpenVINO").
  With ``monolithic``, ``model.xml`` is the quantized segments joined back into one model
  (:func:`edgeperceiver.passes.openvino_stitch.stitch_segments`): the cut's exact reference.

AUTO (``--precision auto``, calibration images required): the candidates fp32, bf16 (where
the CPU has it), int8 and int8 with bf16 float parts are compiled, timed per segment in one
interleaved loop and checked for per-exit top-1 agreement with FP32 on the calibration
images; each segment takes the fastest candidate within the gate (``gate_points``, 0.25 by
default). The metadata records per segment the precision (``segment_precisions``), the
float hint (``segment_inference_precision``) and the timings and agreements that chose
them (``auto``). Carried tensors are bfloat16 only between segments that both run bf16.

The entry's metadata holds a compile report: per exit, top-1 agreement and the max
absolute logit difference against FP32 on the calibration images, and each segment's
measured batch-1 latency (also the monolithic model's, and the cost of the cut).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeperceiver._optional import require
from edgeperceiver.accuracy_gate import GATE_POINTS, MAX_MARGIN_CHANGE
from edgeperceiver.bundle import BundleWriter, TargetEntry
from edgeperceiver.errors import InputError, TargetError
from edgeperceiver.passes.openvino_bf16 import carry_bf16
from edgeperceiver.passes.openvino_fuse import fuse_projections
from edgeperceiver.passes.openvino_group_conv import per_channel_group_conv_weights
from edgeperceiver.passes.openvino_norms import fold_norm_affine
from edgeperceiver.passes.openvino_stitch import stitch_segments
from edgeperceiver.quantize import QuantizeConfig, check_calibration, options_to
from edgeperceiver.runtime.openvino import OpenVINOBackend, cpu_isa, cpu_name
from edgeperceiver.types import Precision, TargetName

from . import openvino_auto as auto
from .openvino_chains import Candidate, Chain, bf16_carried, shipped_models
from .openvino_ir import Log, check_interface, has_bf16, read_fp32, save_ir
from .openvino_quantize import qdq_models, segment_quantize
from .openvino_report import report as _report

__all__ = [
    "OpenVINOOptions", "carry_bf16", "compile_target", "fold_norm_affine", "fuse_projections",
    "per_channel_group_conv_weights",
]

METHODS = ("qdq", "segment")
_BUILDS = (Precision.FP32, Precision.BF16, Precision.INT8, Precision.AUTO)


@dataclass(frozen=True)
class OpenVINOOptions:
    """``compile --target openvino`` options (``options`` dict keys = field names)."""

    #: INT8 method: "segment" (NNCF per OpenVINO segment; kept every demo exit within 0.5
    #: point) or "qdq" (the shared whole-graph QDQ, then cut; ~8% faster on reg800m)
    method: str = "segment"
    #: INT8 only: precision of the ops left in float: "f32", "bf16", or "auto" = bf16 if the
    #: CPU has native bf16, every exit stays within the gate of FP32 on the calibration
    #: images with it, and the segments measure faster with it (reg800m: -11%), else f32
    float_precision: str = "auto"
    #: accuracy gate of the automatic choices: points of top-1 agreement with FP32 per exit
    #: on the calibration images; half the 0.5-point promise, as for the INT8 ladder, since
    #: those images flatter every candidate (held-out images drift further)
    gate_points: float = field(default=GATE_POINTS / 2, metadata={"min": 0.0, "max": 100.0})
    #: ... and the largest mean relative change of FP32's top-1 margins per exit (``margin_change``)
    max_margin_change: float = field(default=MAX_MARGIN_CHANGE, metadata={"min": 0.0})
    #: calibration images the automatic choices check agreement on (0 = all)
    gate_samples: int = field(default=0, metadata={"min": 0})
    #: the accuracy ladder: first the attention products in float (OpenVINO's fused int8
    #: attention kernel, with f32 float parts, changed the demo's exit-2 margins by 40%), then the
    #: early convolutions. It stops there: OpenVINO 2026.4's CPU plugin crashed (SIGSEGV)
    #: releasing demo segments with every convolution in float (docs/openvino.md)
    quant: QuantizeConfig = field(default_factory=lambda: QuantizeConfig(ladder=("attention", "early_convs")))
    threads: int | None = None  #: threads for the latency report (None = OpenVINO's default)
    latency_runs: int = field(default=30, metadata={"min": 0})  #: timed batch-1 runs per segment (0 = skip)
    report_samples: int = field(default=64, metadata={"min": 0})  #: images for the agreement report (0 = skip)
    monolithic: bool = True  #: also write the monolithic model (benchmarks, cut cost)
    #: merge the q/k/v (k/v) projections that read the same tokens into one MatMul
    #: (:func:`fuse_projections`; every precision, before quantization)
    fuse_projections: bool = True
    #: fold each LayerNorm's scale and shift into the MatMuls that read it
    #: (:func:`fold_norm_affine`; every precision, before quantization). Off by default:
    #: INT8 reg800m -3.5%, but on the demo one calibration subset in three lost 3 held-out
    #: images at exit 4 instead of 1 (0.56 pt, over the 0.5 pt gate); see the README
    fold_norms: bool = False

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> OpenVINOOptions:
        """Build from the CLI's option dict; unknown keys are an :class:`InputError`."""
        try:
            opts: OpenVINOOptions = options_to(cls, options)
        except InputError as exc:
            raise InputError(f"OpenVINO: {exc}") from None
        if opts.method not in METHODS:
            raise InputError(f"OpenVINO INT8 method must be one of {METHODS}, not {opts.method!r}")
        if opts.float_precision not in ("auto", "f32", "bf16"):
            raise InputError(f"float_precision must be 'auto', 'f32' or 'bf16', not {opts.float_precision!r}")
        return opts




def compile_target(
    writer: BundleWriter, precision: Precision, *, calib: np.ndarray | None, options: Mapping[str, Any]
) -> TargetEntry:
    """Convert (and for INT8/AUTO quantize) every segment to OpenVINO IR under ``openvino-<precision>/``."""
    ov = require("openvino", purpose="compiling for OpenVINO")
    if precision not in _BUILDS:
        raise InputError(f"OpenVINO builds fp32, bf16, int8 or auto, not {precision.value}")
    opts = OpenVINOOptions.from_options(options)
    manifest = writer.manifest
    if manifest is None:
        raise TargetError("internal: compile_target needs a bundle with a manifest")
    if precision in (Precision.INT8, Precision.AUTO):
        if calib is None:
            raise InputError(f"{precision.value.upper()} needs calibration images (--calib-data)")
        calib = check_calibration(calib, manifest.input.shape)
    backend = OpenVINOBackend(threads=opts.threads)
    core = backend.core
    log = Log()
    n = len(manifest.segments)
    read = [read_fp32(core, writer.dir / s.path, fold_norms=opts.fold_norms, fuse=opts.fuse_projections)
            for s in manifest.segments]
    fp32 = Candidate("fp32", [m for m, _ in read], ["fp32"] * n, ["f32"] * n)
    metadata: dict[str, Any] = {
        "openvino": str(ov.get_version()),
        "device": "CPU",
        "cpu": cpu_name(core),
        "cpu_isa": list(cpu_isa()),  # the instruction sets that chose its kernels (runtime: OtherCPUWarning)
        "weights": "fp32",
        # graph rewrites over all segments: LayerNorm affines folded into the projections
        # after them (fold_norm_affine), MatMul groups merged (fuse_projections)
        **{k: sum(r[k] for _, r in read) for k in ("folded_norms", "fused_projections")},
    }
    fp32_chain = Chain(backend, manifest, fp32)
    mono_src: Any = None
    built: Chain | None = None
    if precision is Precision.FP32:
        cand, built = fp32, fp32_chain
    elif precision is Precision.BF16:
        cand = Candidate("bf16", fp32.models, ["bf16"] * n, ["bf16"] * n)
    else:
        assert calib is not None
        metadata["method"] = opts.method
        metadata["quantization"] = {**opts.quant.describe(), "calibration_images": int(calib.shape[0])}
        log(f"quantizing INT8 ({opts.method}) on {calib.shape[0]} calibration images ...")
        t0 = time.perf_counter()
        images = calib[: opts.gate_samples] if opts.gate_samples else calib
        if opts.method == "qdq":
            q_models, mono_src = qdq_models(core, writer, manifest, calib, opts.quant)
        else:
            q_models, metadata["int8_gate"] = segment_quantize(backend, fp32.models, manifest, calib, opts.quant,
                                                               gate_images=images, log=log)
        metadata["quantize_seconds"] = round(time.perf_counter() - t0, 1)
        int8 = {"int8": Candidate("int8", q_models, ["int8"] * n, ["f32"] * n),
                "int8+bf16": Candidate("int8+bf16", q_models, ["int8"] * n, ["bf16"] * n)}
        bf16_ok = has_bf16(core)
        if precision is Precision.AUTO:
            cands = {"fp32": fp32, **({"bf16": Candidate("bf16", fp32.models, ["bf16"] * n, ["bf16"] * n)}
                                      if bf16_ok else {}), "int8": int8["int8"]}
            if bf16_ok:
                cands["int8+bf16"] = int8["int8+bf16"]
            log("choosing a precision per segment ...")
            choice = auto.choose_per_segment(backend, manifest, fp32_chain, cands, images,
                                             runs=max(opts.latency_runs // 2, 12), gate_points=opts.gate_points,
                                             max_margin_change=opts.max_margin_change,
                                             log=log)
            cand, built = choice.candidate, choice.chain
            metadata["auto"] = choice.metadata
            mono_src = None  # the reference is the chosen segments joined (below), not the QDQ graph
        elif opts.float_precision == "auto" and bf16_ok:
            log("choosing the float parts' precision ...")
            choice = auto.choose_uniform(backend, manifest, fp32_chain, int8, images, fallback="int8",
                                         gate_points=opts.gate_points, max_margin_change=opts.max_margin_change,
                                         log=log)
            cand, built = choice.candidate, choice.chain
            metadata["float_precision_choice"] = choice.metadata
        else:
            cand = int8["int8+bf16" if opts.float_precision == "bf16" else "int8"]
    if opts.monolithic and mono_src is None and precision in (Precision.FP32, Precision.BF16):
        mono_src = read_fp32(core, writer.dir / manifest.model_path,
                             fold_norms=opts.fold_norms, fuse=opts.fuse_projections)[0]
    hints = list(cand.hints)
    if len(set(hints)) == 1:
        metadata["inference_precision"] = hints[0]
    if precision is Precision.AUTO:
        metadata["segment_precisions"] = list(cand.precisions)
        metadata["segment_inference_precision"] = hints
    carried = bf16_carried(manifest, hints)
    metadata["carried_dtype"] = "bfloat16" if carried else "float32"  # numpy uint16 bit patterns in the runtime
    if carried and len(set(hints)) > 1:
        metadata["carried_bf16"] = sorted(carried)

    models = shipped_models(manifest, cand)
    if opts.monolithic and mono_src is None and len(set(hints)) == 1:
        # segments quantized one by one (or chosen one by one): the monolithic reference is
        # the same segments joined into one model, so the cut's price is the cut's alone
        mono_src = stitch_segments(models, manifest.input.name, manifest.exits)
    if built is None:
        built = Chain(backend, manifest, cand, models)
    # staged files may be hard links to the live bundle: drop the old artifacts (links only)
    # and write every file as a new inode
    out_dir = f"{TargetName.OPENVINO.value}-{precision.value}"
    shutil.rmtree(writer.dir / out_dir, ignore_errors=True)
    paths = []
    for spec, model in zip(manifest.segments, models, strict=True):
        check_interface(model, spec)
        rel = f"{out_dir}/seg{spec.index}.xml"
        save_ir(model, writer, rel)
        paths.append(rel)
    mono_rel = None
    if opts.monolithic and mono_src is not None:
        mono_rel = f"{out_dir}/model.xml"
        save_ir(mono_src, writer, mono_rel)

    metadata.update(_report(backend, manifest, fp32_chain, built, mono_src, calib, hint=hints[0],
                            label=precision.value, report_samples=opts.report_samples,
                            latency_runs=opts.latency_runs, log=log))
    metadata["report"] = "\n".join(log.lines)
    return TargetEntry(
        target=TargetName.OPENVINO, precision=precision, segments=tuple(paths),
        monolithic=mono_rel, metadata=metadata, latency_ms=tuple(metadata.get("cumulative_ms", ())),
    )
