"""Compile a bundle's segments for OpenVINO (x86 CPU): FP32, BF16 or INT8 IR per segment.

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
  With ``monolithic`` the whole graph is quantized the same way as the cut's reference.

The entry's metadata holds a compile report: per exit, top-1 agreement and the max
absolute logit difference against FP32 on the calibration images, and each segment's
measured batch-1 latency (also the monolithic model's, and the cost of the cut).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from edgeperceiver._optional import require
from edgeperceiver.bundle import BATCH, BundleWriter, Manifest, SegmentSpec, TargetEntry
from edgeperceiver.errors import InputError, TargetError
from edgeperceiver.quantize import QuantizeConfig, check_calibration, exit_agreement, nncf_quantize, options_to
from edgeperceiver.runtime.openvino import is_bf16, tensor_to_host
from edgeperceiver.timing import interleaved, recorder, take_turns
from edgeperceiver.types import Precision, TargetName

METHODS = ("qdq", "segment")
_PRECISION_HINT = {Precision.FP32: "f32", Precision.BF16: "bf16", Precision.INT8: "f32"}


@dataclass(frozen=True)
class OpenVINOOptions:
    """``compile --target openvino`` options (``options`` dict keys = field names)."""

    #: INT8 method: "segment" (NNCF per OpenVINO segment; kept every demo exit within 0.5
    #: point) or "qdq" (the shared whole-graph QDQ, then cut; ~8% faster on reg800m)
    method: str = "segment"
    #: INT8 only: precision of the ops left in float: "f32", "bf16", or "auto" = bf16 if the
    #: CPU has native bf16 and the segments measure faster with it (reg800m: -11%), else f32
    float_precision: str = "auto"
    quant: QuantizeConfig = field(default_factory=QuantizeConfig)
    threads: int | None = None  #: threads for the latency report (None = OpenVINO's default)
    latency_runs: int = 30  #: timed batch-1 runs per segment for the report (0 = skip)
    report_samples: int = 64  #: calibration images used for the agreement report (0 = skip)
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
    """Convert (and for INT8 quantize) every segment to OpenVINO IR under ``openvino-<precision>/``."""
    ov = require("openvino", purpose="compiling for OpenVINO")
    if precision not in _PRECISION_HINT:
        raise InputError(f"OpenVINO builds fp32, bf16 or int8, not {precision.value}")
    opts = OpenVINOOptions.from_options(options)
    manifest = writer.manifest
    if manifest is None:
        raise TargetError("internal: compile_target needs a bundle with a manifest")
    out_dir = f"{TargetName.OPENVINO.value}-{precision.value}"
    hint = "f32" if precision is Precision.INT8 and opts.float_precision == "auto" else (
        opts.float_precision if precision is Precision.INT8 else _PRECISION_HINT[precision])
    core = ov.Core()
    log = _Log()
    read = [_read_fp32(core, writer.dir / s.path, opts) for s in manifest.segments]
    fp32_models = [m for m, _ in read]
    rewrites = {k: sum(r[k] for _, r in read) for k in ("folded_norms", "fused_projections")}
    metadata: dict[str, Any] = {
        "openvino": str(ov.get_version()),
        "inference_precision": hint,
        "device": "CPU",
        "cpu": _cpu_name(core),
        "weights": "fp32",
        # graph rewrites over all segments: LayerNorm affines folded into the projections
        # after them (fold_norm_affine), MatMul groups merged (fuse_projections)
        **rewrites,
    }
    mono_src: Any = None
    if precision is Precision.INT8:
        if calib is None:
            raise InputError("INT8 needs calibration images (--calib-data)")
        calib = check_calibration(calib, manifest.input.shape)
        metadata["method"] = opts.method
        metadata["quantization"] = {**opts.quant.describe(), "calibration_images": int(calib.shape[0])}
        log(f"quantizing INT8 ({opts.method}) on {calib.shape[0]} calibration images ...")
        t0 = time.perf_counter()
        if opts.method == "qdq":
            seg_models, mono_src = _qdq_models(core, writer, manifest, calib, opts.quant)
        else:
            seg_models = _segment_quantize(core, fp32_models, manifest, calib, opts.quant, opts.threads)
            mono_src = None
            if opts.monolithic:  # the same quantization of the whole graph: the cut's reference
                whole = _read_fp32(core, writer.dir / manifest.model_path, opts)[0]
                whole.reshape({manifest.input.name: [1, *manifest.input.shape[1:]]})
                feeds = [{manifest.input.name: calib[i : i + 1]} for i in range(calib.shape[0])]
                mono_src = nncf_quantize(whole, feeds, opts.quant, exits=manifest.exits)
                per_channel_group_conv_weights(mono_src)
        metadata["quantize_seconds"] = round(time.perf_counter() - t0, 1)
        if opts.float_precision == "auto":
            hint, choice = _pick_float_precision(core, seg_models, manifest, opts.threads)
            metadata["inference_precision"] = hint
            metadata["float_precision_choice"] = choice
            log(f"  float parts: {hint} (batch-1 segments back to back: "
                + ", ".join(f"{k} {v:.2f} ms" for k, v in choice.items()) + ")")
    else:
        seg_models = fp32_models
    if opts.monolithic and mono_src is None and precision is not Precision.INT8:
        mono_src = _read_fp32(core, writer.dir / manifest.model_path, opts)[0]

    metadata["carried_dtype"] = "float32"
    if hint == "bf16":
        seg_models = [carry_bf16(ov, m, s, manifest) for m, s in zip(seg_models, manifest.segments, strict=True)]
        metadata["carried_dtype"] = "bfloat16"  # numpy uint16 bit patterns in the runtime

    # staged files may be hard links to the live bundle: drop the old artifacts (links only)
    # and write every file as a new inode
    shutil.rmtree(writer.dir / out_dir, ignore_errors=True)
    paths = []
    for spec, model in zip(manifest.segments, seg_models, strict=True):
        _check_interface(model, spec)
        rel = f"{out_dir}/seg{spec.index}.xml"
        _save_ir(ov, model, writer, rel)
        paths.append(rel)
    mono_rel = None
    if opts.monolithic and mono_src is not None:
        mono_rel = f"{out_dir}/model.xml"
        _save_ir(ov, mono_src, writer, mono_rel)

    report = _report(core, manifest, fp32_models, seg_models, mono_src, calib, hint, opts, log, precision)
    metadata.update(report)
    metadata["report"] = "\n".join(log.lines)
    latency = tuple(report.get("cumulative_ms", ()))
    return TargetEntry(
        target=TargetName.OPENVINO, precision=precision, segments=tuple(paths),
        monolithic=mono_rel, metadata=metadata, latency_ms=latency,
    )


# --------------------------------------------------------------------------- INT8


def _qdq_models(
    core: Any, writer: BundleWriter, manifest: Manifest, calib: np.ndarray, config: QuantizeConfig
) -> tuple[list[Any], Any]:
    """Quantize model.onnx as one QDQ graph, cut it, and read every QDQ segment into OpenVINO."""
    from edgeperceiver.quantize import qdq_segments

    onnx = require("onnx", purpose="INT8 QDQ quantization")
    qmodel, segs = qdq_segments(writer.dir / manifest.model_path, manifest, calib, config)
    with tempfile.TemporaryDirectory(prefix="ep-ov-") as tmp:
        models = []
        for k, seg in enumerate(segs, start=1):
            p = Path(tmp) / f"seg{k}.onnx"
            onnx.save(seg, str(p))
            models.append(_read(core, p))
        p = Path(tmp) / "model.onnx"
        onnx.save(qmodel, str(p))
        mono = _read(core, p)
    return models, mono


def _segment_quantize(
    core: Any,
    fp32_models: Sequence[Any],
    manifest: Manifest,
    calib: np.ndarray,
    config: QuantizeConfig,
    threads: int | None,
) -> list[Any]:
    """NNCF on each OpenVINO segment, calibrated on the inputs the earlier FP32 segments make."""
    chain = _Chain(core, fp32_models, manifest.segments, "f32", threads)
    per_image = [chain.run_all({manifest.input.name: calib[i : i + 1]}) for i in range(calib.shape[0])]
    quantized = []
    for spec, model in zip(manifest.segments, fp32_models, strict=True):
        feeds = [{t.name: live[t.name] for t in spec.inputs} for live in per_image]
        static = _reshaped(model, spec, 1)
        q = nncf_quantize(static, feeds, config, exits=(spec.exit,))
        per_channel_group_conv_weights(q)
        quantized.append(q)
    return quantized


def _pick_float_precision(
    core: Any, models: Sequence[Any], manifest: Manifest, threads: int | None, rounds: int = 12
) -> tuple[str, dict[str, float]]:
    """f32 or bf16 for the float parts of INT8 segments: whichever runs the chain faster here."""
    try:
        caps = [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    except RuntimeError:
        caps = []
    if "BF16" not in caps:
        return "f32", {}
    x = np.zeros((1, *(int(d) for d in manifest.input.shape[1:])), np.float32)
    ov = require("openvino")
    chains = {}
    for hint in ("f32", "bf16"):
        try:
            cands = models if hint == "f32" else [
                carry_bf16(ov, m, s, manifest) for m, s in zip(models, manifest.segments, strict=True)]
            chains[hint] = _Chain(core, cands, manifest.segments, hint, threads).bound(x, manifest.input.name)
        except (TargetError, RuntimeError):
            continue
    if len(chains) < 2:
        return next(iter(chains), "f32"), {}

    def run_chain(chain: list[Any]) -> None:
        for req in chain:
            req.infer()

    # blocks, medians: the machine may be busy
    times = interleaved({h: partial(run_chain, c) for h, c in chains.items()}, repeats=rounds, block=5, settle=1,
                        min_seconds=0.5, seed=None)
    ms = {h: round(statistics.median(t) * 1e3, 3) for h, t in times.items()}
    return ("bf16" if ms["bf16"] < ms["f32"] else "f32"), ms


# --------------------------------------------------------------------------- report


def _report(
    core: Any,
    manifest: Manifest,
    fp32_models: Sequence[Any],
    models: Sequence[Any],
    mono: Any,
    calib: np.ndarray | None,
    hint: str,
    opts: OpenVINOOptions,
    log: Callable[[str], None],
    precision: Precision,
) -> dict[str, Any]:
    """Agreement with FP32 per exit (on the calibration images) and batch-1 latencies."""
    out: dict[str, Any] = {}
    exits = manifest.exits
    if calib is not None and opts.report_samples > 0 and precision is not Precision.FP32:
        images = calib[: opts.report_samples]
        ref = _Chain(core, fp32_models, manifest.segments, "f32", opts.threads).exits(images, manifest)
        got = _Chain(core, models, manifest.segments, hint, opts.threads).exits(images, manifest)
        per_exit = exit_agreement(ref, got, exits)
        for row in per_exit:
            log(f"  exit {row['exit']} ({row['name']}): top-1 agreement with fp32 {row['top1_agreement']:.2%}, "
                f"max |logit diff| {row['max_abs_logit_diff']:.4f}")
        out["agreement"] = {"images": int(images.shape[0]), "reference": "openvino-f32", "exits": per_exit}
    if opts.latency_runs > 0:
        lat = measure_latency(core, models, manifest.segments, mono, manifest, hint, threads=opts.threads,
                              runs=opts.latency_runs, fp32_models=None if precision is Precision.FP32 else fp32_models)
        cumulative = list(np.cumsum(lat.segment_ms))
        out["segment_ms"] = [round(x, 3) for x in lat.segment_ms]
        out["cumulative_ms"] = [round(float(x), 3) for x in cumulative]
        for k, (s, c) in enumerate(zip(lat.segment_ms, cumulative, strict=True), start=1):
            log(f"  segment {k}: {s:.2f} ms (to exit {k}: {c:.2f} ms)")
        if lat.monolithic_ms is not None:
            out["monolithic_ms"] = round(lat.monolithic_ms, 3)
            out["cut_overhead"] = round(float(cumulative[-1]) / lat.monolithic_ms - 1.0, 4)
            log(f"  monolithic: {lat.monolithic_ms:.2f} ms; the segments back to back cost "
                f"{out['cut_overhead']:+.1%}")
        if lat.fp32_segment_ms is not None:
            fp32_cum = np.cumsum(lat.fp32_segment_ms)
            out["fp32_cumulative_ms"] = [round(float(x), 3) for x in fp32_cum]
            out["speedup_vs_fp32"] = [round(float(r / c), 3) for r, c in zip(fp32_cum, cumulative, strict=True)]
            log(f"  vs the FP32 segments (same loop): {out['speedup_vs_fp32'][-1]:.2f}x to the last exit "
                f"({fp32_cum[-1]:.2f} vs {cumulative[-1]:.2f} ms), to each exit "
                + " / ".join(f"{v:.2f}x" for v in out["speedup_vs_fp32"]))
            slower = [str(k) for k, v in enumerate(out["speedup_vs_fp32"], start=1) if v < 1.0]
            if slower:
                where = "every exit" if len(slower) == len(cumulative) else "exit " + ", ".join(slower)
                log(f"  note: {precision.value} is slower than FP32 to {where} on this CPU (typical of small "
                    "layers, where per-node overhead outweighs the kernels); --precision fp32 may serve better")
        out["latency_threads"] = opts.threads
    return out


@dataclass(frozen=True)
class Latency:
    """Median batch-1 latencies (ms) measured in one loop at compile time."""

    segment_ms: tuple[float, ...]  #: each segment, run back to back
    monolithic_ms: float | None = None
    fp32_segment_ms: tuple[float, ...] | None = None  #: the FP32 segments, for comparison


def measure_latency(
    core: Any,
    models: Sequence[Any],
    specs: Sequence[SegmentSpec],
    mono: Any,
    manifest: Manifest,
    hint: str,
    *,
    fp32_models: Sequence[Any] | None = None,
    threads: int | None = None,
    runs: int = 30,
    block: int = 5,
) -> Latency:
    """Batch-1 latency of each segment run back to back, of the monolithic model, and (given
    ``fp32_models``) of the FP32 segments, all in one loop.

    The contenders take turns in blocks of ``block`` calls, each block after an untimed call
    (:func:`edgeperceiver.timing.take_turns`).
    """
    x = np.random.default_rng(0).standard_normal((1, *manifest.input.shape[1:])).astype(np.float32)  # type: ignore[arg-type]
    chains = [_Chain(core, models, specs, hint, threads)]
    if fp32_models is not None:
        chains.append(_Chain(core, fp32_models, specs, "f32", threads))
    runs_of, times = [], []
    for chain in chains:
        run, t = recorder([r.infer for r in chain.bound(x, manifest.input.name)])
        runs_of.append(run)
        times.append(t)
    mono_t: list[list[float]] = [[]]
    if mono is not None:
        m = mono.clone()
        m.reshape({manifest.input.name: [1, *manifest.input.shape[1:]]})
        mono_req = core.compile_model(m, "CPU", _props(hint, threads)).create_infer_request()
        run_mono, mono_t = recorder([partial(mono_req.infer, {manifest.input.name: x})])
        runs_of.append(run_mono)
    take_turns(runs_of, runs, block=block, settle=1, min_seconds=0.5)
    seg_ms = [tuple(statistics.median(t) * 1e3 for t in per_segment) for per_segment in times]
    return Latency(seg_ms[0], statistics.median(mono_t[0]) * 1e3 if mono_t[0] else None,
                   seg_ms[1] if len(seg_ms) > 1 else None)


# --------------------------------------------------------------------------- helpers


class _Chain:
    """Run OpenVINO segment models back to back (static shape per batch size)."""

    def __init__(
        self, core: Any, models: Sequence[Any], specs: Sequence[SegmentSpec], hint: str, threads: int | None
    ) -> None:
        self.core, self.models, self.specs, self.hint, self.threads = core, models, specs, hint, threads
        self._cache: dict[tuple[int, int], Any] = {}
        self._held: list[dict[str, np.ndarray]] = []

    def compiled(self, k: int, batch: int) -> Any:
        key = (k, batch)
        if key not in self._cache:
            model = _reshaped(self.models[k], self.specs[k], batch)
            try:
                self._cache[key] = self.core.compile_model(model, "CPU", _props(self.hint, self.threads))
            except RuntimeError as exc:
                raise TargetError(f"OpenVINO cannot compile segment {k + 1}: {exc}") from exc
        return self._cache[key]

    def feeds(self, k: int, batch: int, live: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Segment ``k``'s feeds from ``live``; bfloat16 inputs wrapped over their bits."""
        cm = self.compiled(k, batch)
        return _ov_feeds(cm, {t.name: live[t.name] for t in self.specs[k].inputs})

    def bound(self, x: np.ndarray, input_name: str) -> list[Any]:
        """One infer request per segment with its inputs for image ``x`` set once, zero-copy, as
        the runtime binds them: ``req.infer()`` in order runs the chain, ready to time."""
        ov = require("openvino")
        live = self.run_all({input_name: x})
        self._held.append(live)  # the requests' tensors share these arrays' memory
        batch = int(x.shape[0])
        requests = []
        for k in range(len(self.specs)):
            req = self.compiled(k, batch).create_infer_request()
            for name, v in self.feeds(k, batch, live).items():
                req.set_tensor(name, v if isinstance(v, ov.Tensor) else ov.Tensor(v, shared_memory=True))
            requests.append(req)
        return requests

    def run_all(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        live = dict(feeds)
        batch = int(next(iter(feeds.values())).shape[0])
        for k, spec in enumerate(self.specs):
            req = self.compiled(k, batch).create_infer_request()
            req.infer(self.feeds(k, batch, live))
            for t in spec.outputs:
                live[t.name] = tensor_to_host(req.get_tensor(t.name))
        return live

    def exits(self, images: np.ndarray, manifest: Manifest, batch: int = 16) -> list[np.ndarray]:
        parts: list[list[np.ndarray]] = [[] for _ in self.specs]
        for i in range(0, images.shape[0], batch):
            live = self.run_all({manifest.input.name: images[i : i + batch]})
            for k, spec in enumerate(self.specs):
                parts[k].append(live[spec.exit])
        return [np.concatenate(p) for p in parts]


def _ov_feeds(compiled: Any, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    ov = require("openvino")
    bf16 = {n for p in compiled.inputs if is_bf16(p) for n in p.get_names()}
    return {
        n: ov.Tensor(np.ascontiguousarray(a), shape=list(a.shape), type=ov.Type.bf16) if n in bf16 else a
        for n, a in arrays.items()
    }


def carry_bf16(ov: Any, model: Any, spec: SegmentSpec, manifest: Manifest) -> Any:
    """A copy of a segment whose carried inputs/outputs are bfloat16 (exits and image stay f32).

    With bf16 inference, f32 boundaries made OpenVINO keep whole residual streams in f32
    and add reorders at every cut (bf16 segments chained: +13% over the monolithic model;
    with bf16 carried tensors: +5%).
    """
    from openvino.preprocess import PrePostProcessor

    keep = set(manifest.exits) | {manifest.input.name}
    ppp = PrePostProcessor(model.clone())
    changed = False
    for t in spec.inputs:
        if t.name not in keep:
            ppp.input(t.name).tensor().set_element_type(ov.Type.bf16)
            changed = True
    for t in spec.outputs:
        if t.name not in keep:
            ppp.output(t.name).tensor().set_element_type(ov.Type.bf16)
            changed = True
    return ppp.build() if changed else model


def fold_norm_affine(model: Any) -> int:
    """Fold ``MVN -> * gamma -> + beta`` into the constant-weight MatMuls that read it.

    ``W (gamma * n + beta) = (gamma[:, None] * W) n + W beta``: each MatMul then reads the
    bare normalisation and gains a bias. In Dyn-Perceiver every LayerNorm feeds only
    projections (q/k/v, MLP fc1, token mixer/expander: 64 on reg800m), and on OpenVINO INT8
    the scale/shift/quantize subgraph after each MVN disappears (its quantizer fuses into
    the MVN). Only where *every* consumer is such a MatMul; equal in real arithmetic, float
    rounding aside. Edits ``model`` in place; returns the number of norms folded.
    """
    ov = require("openvino", purpose="compiling for OpenVINO")
    ops = ov.opset13
    folded = 0
    for mvn in model.get_ordered_ops():
        affine = _norm_affine(mvn)
        if affine is None:
            continue
        add, gamma, beta = affine
        users = list(add.output(0).get_target_inputs())
        if not users or not all(t.get_index() == 0 and _const_matmul(t.get_node()) for t in users):
            continue
        for mm in (t.get_node() for t in users):
            w = _kn_weight(mm).astype(np.float64)
            scaled = np.ascontiguousarray((gamma[:, None] * w).astype(np.float32))
            new = ops.matmul(mvn.output(0), ops.constant(scaled), False, False)
            new.set_friendly_name(mm.get_friendly_name())
            mm.output(0).replace(ops.add(new, ops.constant((beta @ w).astype(np.float32))).output(0))
        folded += 1
    if folded:
        model.validate_nodes_and_infer_types()
    return folded


def _norm_affine(mvn: Any) -> tuple[Any, np.ndarray, np.ndarray] | None:
    """``(add, gamma, beta)`` (float64, last axis) when ``mvn`` is an MVN followed only by ``* gamma + beta``."""
    if mvn.get_type_name() != "MVN" or not mvn.get_output_partial_shape(0)[-1].is_static:
        return None
    width = mvn.get_output_partial_shape(0)[-1].get_length()
    found = []
    node = mvn
    for kind in ("Multiply", "Add"):
        users = list(node.output(0).get_target_inputs())
        if len(users) != 1 or users[0].get_node().get_type_name() != kind:
            return None
        nxt = users[0].get_node()
        const = nxt.input_value(1 - users[0].get_index()).get_node()
        if const.get_type_name() != "Constant":
            return None
        data = const.get_data()
        if data.size != width or data.shape[-1] != width:
            return None  # a scale per token or a scalar: not a LayerNorm affine
        found.append(data.reshape(-1).astype(np.float64))
        node = nxt
    return node, found[0], found[1]


def _kn_weight(mm: Any) -> np.ndarray:
    """The constant weight of a :func:`_const_matmul` as (in features K, out features N)."""
    w: np.ndarray = mm.input_value(1).get_node().get_data()
    return w.T if mm.get_attributes().get("transpose_b") else w


def _const_matmul(mm: Any) -> bool:
    """``mm`` multiplies its first input (not transposed) by a constant 2-D weight."""
    if mm.get_type_name() != "MatMul" or mm.get_attributes().get("transpose_a"):
        return False
    weights = mm.input_value(1).get_node()
    return weights.get_type_name() == "Constant" and len(weights.get_output_partial_shape(0)) == 2


def fuse_projections(model: Any) -> int:
    """Merge the MatMuls that read one activation with constant 2-D weights into one MatMul.

    Dyn-Perceiver's attention projects the same normalised tokens with separate q/k/v (or
    k/v) Linear layers: 29 groups, 79 MatMuls on reg800m. Each becomes one FullyConnected
    node costing ~20 us at 16-128 tokens, mostly per-node overhead, so the group runs as
    one MatMul on the concatenated weights followed by a VariadicSplit on the last axis
    (bit-identical results in FP32; NNCF then quantizes the fused weights per channel, as
    it did each part). Edits ``model`` in place; returns the number of groups fused.
    """
    ov = require("openvino", purpose="compiling for OpenVINO")
    ops = ov.opset13
    groups: dict[tuple[int, int], list[Any]] = {}
    for op in model.get_ordered_ops():
        if not _const_matmul(op):
            continue
        if any(t.get_node().get_type_name() == "Result" for t in op.output(0).get_target_inputs()):
            continue  # a model output keeps its own node (and tensor names)
        src = op.input_value(0)
        groups.setdefault((id(src.get_node()), src.get_index()), []).append(op)
    fused = 0
    for mms in groups.values():
        if len(mms) < 2:
            continue
        ws = [_kn_weight(mm) for mm in mms]
        if len({w.shape[0] for w in ws}) != 1 or len({w.dtype for w in ws}) != 1:
            continue
        merged = ops.matmul(mms[0].input_value(0), ops.constant(np.ascontiguousarray(np.concatenate(ws, axis=1))),
                            False, False)
        merged.set_friendly_name(mms[0].get_friendly_name() + f"/fused{len(mms)}")
        tails: list[Any] = list(mms)
        biases = [_bias_add(mm, w.shape[1]) for mm, w in zip(mms, ws, strict=True)]
        leads = {b[1].shape[:-1] for b in biases if b is not None}
        if len(leads) == 1:
            # keep the constant adds (position embeddings, biases) next to the MatMul, where
            # OpenVINO fuses them into the FullyConnected node; a member without one adds 0
            lead = leads.pop()
            parts = [np.zeros((*lead, w.shape[1]), w.dtype) if b is None else b[1]
                     for b, w in zip(biases, ws, strict=True)]
            tails = [mm if b is None else b[0] for b, mm in zip(biases, mms, strict=True)]
            merged = ops.add(merged, ops.constant(np.ascontiguousarray(np.concatenate(parts, axis=-1))))
        split = ops.variadic_split(merged, ops.constant(np.int64(-1)),
                                   ops.constant(np.array([w.shape[1] for w in ws], np.int64)))
        for i, tail in enumerate(tails):
            tail.output(0).replace(split.output(i))
        fused += 1
    if fused:
        model.validate_nodes_and_infer_types()
    return fused


def per_channel_group_conv_weights(model: Any) -> int:
    """Give every GroupConvolution's weight FakeQuantize one range per output channel.

    NNCF 3.4 (OpenVINO backend) quantizes 5-D group-convolution weights ``[G, O/G, I/G,
    kh, kw]`` with ranges of shape ``[G, O/G, 1, 1, kw]`` (one per kernel column). The CPU
    plugin's low-precision pass cannot run such weights in int8, so all of Dyn-Perceiver's
    grouped 3x3 and depthwise 7x7 convolutions (18 on reg800m) ran in float behind
    FakeQuantize emulation. Widening each range to its output channel (min of the lows, max
    of the highs over the kernel axes: the usual per-channel quantizer) lets them run int8.
    Edits ``model`` in place; returns the number of quantizers changed.
    """
    ov = require("openvino", purpose="compiling for OpenVINO")
    changed = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "GroupConvolution":
            continue
        fq = op.input_value(1).get_node()
        if fq.get_type_name() != "FakeQuantize":
            continue
        consts = [fq.input_value(i).get_node() for i in range(1, 5)]
        if any(c.get_type_name() != "Constant" for c in consts):
            continue
        ranges = [c.get_data() for c in consts]
        if all(r.ndim < 3 or all(d == 1 for d in r.shape[2:]) for r in ranges):
            continue
        for i, r in enumerate(ranges, start=1):
            axes = tuple(range(2, r.ndim))
            wide = r.min(axis=axes, keepdims=True) if i % 2 else r.max(axis=axes, keepdims=True)  # lows, highs
            fq.input(i).replace_source_output(ov.opset13.constant(np.ascontiguousarray(wide)).output(0))
        changed += 1
    if changed:
        model.validate_nodes_and_infer_types()
    return changed


def _bias_add(mm: Any, width: int) -> tuple[Any, np.ndarray] | None:
    """``(add, constant)`` when ``mm``'s only consumer adds a constant with ``width`` values on the last axis.

    The constant comes back with the MatMul output's rank (leading 1s added).
    """
    users = list(mm.output(0).get_target_inputs())
    if len(users) != 1:
        return None
    add = users[0].get_node()
    if add.get_type_name() != "Add":
        return None
    other = add.input_value(1 - users[0].get_index()).get_node()
    if other.get_type_name() != "Constant" or any(t.get_node().get_type_name() == "Result"
                                                  for t in add.output(0).get_target_inputs()):
        return None
    bias = other.get_data()
    rank = len(mm.get_output_partial_shape(0))
    if bias.ndim > rank or bias.shape[-1:] != (width,):
        return None
    return add, bias.reshape((1,) * (rank - bias.ndim) + bias.shape)


def _props(hint: str, threads: int | None) -> dict[str, Any]:
    props: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint}
    if threads is not None:
        props["INFERENCE_NUM_THREADS"] = int(threads)
    return props


def _reshaped(model: Any, spec: SegmentSpec, batch: int) -> Any:
    m = model.clone()
    m.reshape({t.name: [batch if d == BATCH else int(d) for d in t.shape] for t in spec.inputs})
    return m


def _save_ir(ov: Any, model: Any, writer: BundleWriter, rel: str) -> None:
    """Write ``rel`` (.xml) and its .bin as new files (FP32 weights), then move them into place.

    Inputs get a dynamic batch axis again (NNCF quantized a batch-1 copy); the runtime
    reshapes to each batch size it uses.
    """
    shapes = {}
    for p in model.inputs:
        ps = p.get_partial_shape()
        if ps.rank.is_static and len(ps) > 0 and ps[0].is_static:
            ps[0] = ov.Dimension()
            shapes[p.get_any_name()] = ps
    if shapes:
        with contextlib.suppress(RuntimeError):  # a graph that cannot take one keeps its static batch
            model.reshape(shapes)
    dest = writer.path(rel)
    tmp = Path(tempfile.mkdtemp(prefix=".ir-", dir=dest.parent))
    try:
        ov.save_model(model, str(tmp / dest.name), compress_to_fp16=False)
        for p in tmp.iterdir():
            os.replace(p, dest.parent / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read(core: Any, path: Path) -> Any:
    try:
        return core.read_model(str(path))
    except RuntimeError as exc:
        raise TargetError(f"OpenVINO cannot read {path.name}: {exc}") from exc


def _read_fp32(core: Any, path: Path, opts: OpenVINOOptions) -> tuple[Any, dict[str, int]]:
    """An FP32 ONNX model as an OpenVINO model with the rewrites ``opts`` asks for (and their counts)."""
    model = _read(core, path)
    folded = fold_norm_affine(model) if opts.fold_norms else 0
    fused = fuse_projections(model) if opts.fuse_projections else 0
    return model, {"folded_norms": folded, "fused_projections": fused}


def _check_interface(model: Any, spec: SegmentSpec) -> None:
    have_in = {n for p in model.inputs for n in p.get_names()}
    have_out = {n for p in model.outputs for n in p.get_names()}
    missing = [t.name for t in spec.inputs if t.name not in have_in]
    missing += [t.name for t in spec.outputs if t.name not in have_out]
    if missing:
        raise TargetError(f"segment {spec.index}: the OpenVINO model lacks the bundle's tensors {missing}")


def _cpu_name(core: Any) -> str:
    try:
        return str(core.get_property("CPU", "FULL_DEVICE_NAME"))
    except RuntimeError:
        return "unknown"


class _Log:
    """Prints progress to stderr and keeps the lines (the entry's ``metadata["report"]``)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, msg: str) -> None:
        self.lines.append(msg.strip())
        print(msg, file=sys.stderr, flush=True)
