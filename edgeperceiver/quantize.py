"""Shared INT8 post-training quantization (NNCF), calibrated on real images.

Two paths, both here so that every target quantizes the same way:

- :func:`quantize_qdq` quantizes the whole multi-exit ONNX graph once into a QDQ ONNX
  graph (NNCF's ONNX backend). The export engineer's cut then splits that graph into
  segments, so every exit and every target (OpenVINO, TensorRT, ONNX Runtime) consumes the
  same quantizers. :func:`split_shared_quantizers` makes every QuantizeLinear feed exactly
  one DequantizeLinear first, so a cut can never separate a Q from its DQ, and
  :func:`edgeperceiver.passes.qdq_check.check_qdq_segments` proves it on the segments.
- :func:`nncf_quantize` quantizes any model NNCF accepts (an ``openvino.Model`` segment
  with calibration feeds produced by running the earlier segments, for instance).

Heavy modules (onnx, nncf) are imported inside the functions.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ._optional import require
from .accuracy_gate import MAX_MARGIN_CHANGE, agreement, margin_changes
from .errors import InputError
from .options import parse_options
from .passes.qdq_check import check_qdq_segments
from .quant_ladder import check_float_ops, float_names, float_types

if TYPE_CHECKING:  # pragma: no cover
    from .bundle import Manifest

_QUANT_OPS = frozenset({"QuantizeLinear", "DynamicQuantizeLinear"})
#: :attr:`QuantizeConfig.activation_ranges` values (NNCF's ``RangeEstimatorParametersSet`` names, lower case)
ACTIVATION_RANGES = ("minmax", "mean_minmax", "histogram")


@dataclass(frozen=True)
class QuantizeConfig:
    """NNCF post-training quantization settings (defaults: what measured best, see docs).

    ``smooth_quant`` toggles SmoothQuant on the MatMuls (alpha 0.95, NNCF's transformer
    default) — only meaningful with ``transformer``. ``ignored_types`` / ``ignored_names``
    keep ops in float (names match the graph's node names).
    """

    #: "performance" (symmetric activations) or "mixed" (asymmetric). "performance" measured
    #: faster on OpenVINO: with "mixed", convolutions whose input can be negative (the
    #: stage inputs of Dyn-Perceiver, where z2x adds to the features) fall back to f32 kernels
    preset: str = "performance"
    transformer: bool = True  #: nncf.ModelType.TRANSFORMER: attention-aware quantizer placement
    #: how each per-tensor activation range is taken from the calibration images:
    #: "minmax" (their extremes), "mean_minmax" (NNCF's default: the mean over calibration
    #: steps of each step's extremes; steps are single images, so that range is the typical
    #: image's and clips the wider ones at every layer) or "histogram" (NNCF's histogram
    #: search). On the demo "minmax" cuts INT8's mean logit error at exit 4 eightfold
    #: (0.33 -> 0.04) and its held-out flips with it (docs/openvino.md)
    activation_ranges: str = "minmax"
    smooth_quant: bool = False
    subset_size: int = 300
    fast_bias_correction: bool = True
    #: NNCF's bias correction after quantization. It can cost accuracy on small models: on the
    #: demo model the corrected convolution biases alone cost exit 4 0.74 point (docs/tensorrt.md)
    bias_correction: bool = True
    ignored_types: tuple[str, ...] = ()
    ignored_names: tuple[str, ...] = ()
    #: keep each exit's classifier head (the last MatMul/Gemm before an exit output) in float:
    #: the heads make the logits that exit decisions and thresholds are taken on, and cost
    #: well under 1% of the MACs
    float_heads: bool = False
    #: scopes kept in float (:data:`edgeperceiver.quant_ladder.FLOAT_OPS`: heads, early_convs,
    #: grouped_convs, norms, convs), resolved on the graph being quantized
    float_ops: tuple[str, ...] = ()
    #: where a quantized candidate misses the accuracy gate on the calibration images, the
    #: float scopes added one per retry (:func:`edgeperceiver.quant_ladder.climb`); empty = no retry
    ladder: tuple[str, ...] = ("early_convs", "convs")
    #: the ladder's gate: points of top-1 disagreement with FP32 allowed per exit on the
    #: calibration images. Half the 0.5 point promise: those images are few and are the ones
    #: NNCF calibrated on, so they flatter the quantized graph (demo: 1 flip in 300 there,
    #: 3 in 539 held-out); the margin makes held-out accuracy hold, see docs/tensorrt.md
    ladder_gate: float = field(default=0.25, metadata={"min": 0.0, "max": 100.0})
    #: ... and the largest margin change per exit (:mod:`edgeperceiver.accuracy_gate`)
    ladder_max_margin_change: float = field(default=MAX_MARGIN_CHANGE, metadata={"min": 0.0})

    def __post_init__(self) -> None:
        if self.preset not in ("performance", "mixed"):
            raise InputError(f"quantization preset must be 'performance' or 'mixed', not {self.preset!r}")
        if self.activation_ranges not in ACTIVATION_RANGES:
            raise InputError(f"activation_ranges must be one of {ACTIVATION_RANGES}, not {self.activation_ranges!r}")

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for manifests and reports."""
        return {
            "preset": self.preset, "model_type": "transformer" if self.transformer else "cnn",
            "activation_ranges": self.activation_ranges,
            "smooth_quant": self.smooth_quant, "subset_size": self.subset_size,
            "fast_bias_correction": self.fast_bias_correction, "bias_correction": self.bias_correction,
            "ignored_types": list(self.ignored_types), "ignored_names": list(self.ignored_names),
            "float_heads": self.float_heads, "float_ops": list(self.float_ops), "ladder": list(self.ladder),
            "ladder_gate": self.ladder_gate, "ladder_max_margin_change": self.ladder_max_margin_change,
        }


def check_calibration(calib: np.ndarray, shape: Sequence[int | str] | None = None) -> np.ndarray:
    """Validate an (N, C, H, W) float32 batch of preprocessed images; return it contiguous."""
    if not isinstance(calib, np.ndarray):
        raise InputError(f"calibration data must be a numpy array, not {type(calib).__name__}")
    if calib.ndim != 4 or calib.shape[0] < 1:
        raise InputError(f"calibration data must be (N, C, H, W) with N >= 1, got shape {calib.shape}")
    if not np.issubdtype(calib.dtype, np.floating):
        raise InputError(f"calibration data must be float (preprocessed images), got {calib.dtype}")
    if not np.isfinite(calib).all():
        raise InputError("calibration data contains NaN or inf")
    if shape is not None:
        want = tuple(shape)[1:]
        pairs = zip(want, calib.shape[1:], strict=False)
        if len(want) != 3 or any(isinstance(w, int) and w > 0 and w != g for w, g in pairs):
            raise InputError(f"calibration images have shape {calib.shape[1:]}, the model expects {want}")
    return np.ascontiguousarray(calib, dtype=np.float32)


def nncf_quantize(
    model: Any,
    feeds: Sequence[Mapping[str, np.ndarray]],
    config: QuantizeConfig,
    *,
    exits: Sequence[str] = (),
) -> Any:
    """Quantize ``model`` (ONNX ModelProto or openvino.Model) with NNCF PTQ on ``feeds``.

    ``feeds`` is the calibration contract: one input dict per calibration step. ``exits``
    (output tensor names) locate the classifier heads kept in float with ``float_heads``
    (:func:`edgeperceiver.quant_ladder.head_nodes`).
    """
    nncf = require("nncf", purpose="INT8 quantization")
    if not feeds:
        raise InputError("no calibration samples")
    advanced = nncf.AdvancedQuantizationParameters(
        smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=0.95 if config.smooth_quant else -1.0),
        disable_bias_correction=not config.bias_correction,
        activations_range_estimator_params=getattr(
            nncf.quantization.range_estimator.RangeEstimatorParametersSet, config.activation_ranges.upper()),
    )
    check_float_ops(config.float_ops)
    ops = (*config.float_ops, *(("heads",) if config.float_heads else ()))
    names = list(dict.fromkeys([*config.ignored_names, *float_names(model, ops, exits)]))
    types = list(dict.fromkeys([*config.ignored_types, *float_types(ops)]))
    ignored = None
    if types or names:
        ignored = nncf.IgnoredScope(types=types, names=names, validate=False)
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(max(level, logging.WARNING))  # not one INFO line per op kept in float
    try:
        return nncf.quantize(
            model,
            nncf.Dataset(list(feeds)),
            preset=nncf.QuantizationPreset(config.preset),
            model_type=nncf.ModelType.TRANSFORMER if config.transformer else None,
            subset_size=min(config.subset_size, len(feeds)),
            fast_bias_correction=config.fast_bias_correction,
            ignored_scope=ignored,
            advanced_parameters=advanced,
        )
    finally:
        nncf_log.setLevel(level)


def image_feeds(calib: np.ndarray, input_name: str, batch: int = 1) -> list[dict[str, np.ndarray]]:
    """Split preprocessed images into feed dicts of ``batch`` samples (the calibration contract)."""
    return [{input_name: calib[i : i + batch]} for i in range(0, calib.shape[0], batch)]


def quantize_qdq(
    model: Any,
    calib: np.ndarray,
    *,
    config: QuantizeConfig | None = None,
    input_name: str | None = None,
) -> Any:
    """Quantize a whole (multi-exit) ONNX graph to QDQ INT8, calibrated on ``calib`` images.

    Returns a new ``onnx.ModelProto`` in which every QuantizeLinear feeds exactly one
    DequantizeLinear (see :func:`split_shared_quantizers`), ready to be cut into segments.
    """
    onnx = require("onnx", purpose="INT8 QDQ quantization")
    config = config or QuantizeConfig()
    if not isinstance(model, onnx.ModelProto):
        raise InputError(f"quantize_qdq needs an onnx.ModelProto, not {type(model).__name__}")
    inits = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in inits]
    if input_name is None:
        if len(graph_inputs) != 1:
            raise InputError(f"model has {len(graph_inputs)} inputs; name the image input")
        input_name = graph_inputs[0].name
    dims = next((i.type.tensor_type.shape.dim for i in graph_inputs if i.name == input_name), None)
    if dims is None:
        raise InputError(f"model has no input {input_name!r}")
    shape = [d.dim_param if d.dim_param else d.dim_value for d in dims]
    calib = check_calibration(calib, shape)
    exits = [o.name for o in model.graph.output]
    quantized = nncf_quantize(model, image_feeds(calib, input_name), config, exits=exits)
    return split_shared_quantizers(quantized)


def split_shared_quantizers(model: Any) -> Any:
    """Give every consumer of a quantized activation its own QuantizeLinear -> DequantizeLinear.

    NNCF quantizes an activation once and lets the DQ output fan out. A cut would then
    either separate a Q from its DQ or carry the DQ output (a new name) across the
    boundary. With a private Q->DQ pair per consumer, the pair always lands in its
    consumer's segment, no integer tensor ever crosses a cut, and the carried tensors keep
    the float graph's names (so the QDQ segments have exactly the FP32 segments'
    interfaces). OpenVINO merges identical quantizers of one tensor inside a segment
    again. Weight quantizers (DQ of an initializer) are left alone. Returns a new model.
    """
    onnx = require("onnx", purpose="INT8 QDQ quantization")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {i.name for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    extra: dict[int, list[Any]] = {}  # id(Q node) -> cloned Q/DQ nodes to insert after it
    for dq in list(graph.node):
        if dq.op_type != "DequantizeLinear" or dq.input[0] in inits:
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or dq.output[0] in graph_outputs:
            continue
        users = list({id(u): u for u in consumers.get(dq.output[0], [])}.values())
        for j, user in enumerate(users[1:], start=1):
            base = dq.output[0]
            q2, dq2 = onnx.NodeProto(), onnx.NodeProto()
            q2.CopyFrom(q)
            dq2.CopyFrom(dq)
            q2.name = f"{q.name or q.output[0]}__c{j}"
            q2.output[0] = f"{q.output[0]}__c{j}"
            dq2.name = f"{dq.name or base}__c{j}"
            dq2.input[0] = q2.output[0]
            dq2.output[0] = f"{base}__c{j}"
            for k, name in enumerate(user.input):
                if name == base:
                    user.input[k] = dq2.output[0]
            extra.setdefault(id(dq), []).extend([q2, dq2])
    copies = []
    for node in graph.node:
        for n in [node, *extra.get(id(node), [])]:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            copies.append(c)
    del graph.node[:]
    graph.node.extend(copies)
    return out


def quantized_op_count(model: Any) -> int:
    """Number of QuantizeLinear nodes in an ONNX model (0 = not quantized)."""
    return sum(1 for n in model.graph.node if n.op_type in _QUANT_OPS)


def qdq_segments(
    model_path: str | os.PathLike[str],
    manifest: Manifest,
    calib: np.ndarray,
    config: QuantizeConfig | None = None,
) -> tuple[Any, list[Any]]:
    """Quantize a bundle's monolithic ONNX model once and cut it like the FP32 segments.

    Returns ``(qdq_model, qdq_segments)``. Raises :class:`~edgeperceiver.errors.ExportError`
    if a cut would split a Q from its DQ or a QDQ segment's interface (input and output
    names) differs from the bundle's FP32 segment (the runtime feeds tensors by name).
    """
    from .cut import cut_model
    from .errors import ExportError
    from .onnx_utils import load_model

    model = load_model(os.fspath(model_path))
    qmodel = quantize_qdq(model, calib, config=config, input_name=manifest.input.name)
    plan, segments, _ = cut_model(qmodel, manifest.exits)
    check_qdq_segments(segments)
    for spec, seg in zip(manifest.segments, plan.segments, strict=True):
        want = ({t.name for t in spec.inputs}, {t.name for t in spec.outputs})
        got = (set(seg.inputs), set(seg.outputs))
        if want != got:
            raise ExportError(
                f"segment {spec.index}: the quantized graph cuts at different tensors "
                f"(inputs {sorted(got[0])}, outputs {sorted(got[1])}) than the bundle "
                f"(inputs {sorted(want[0])}, outputs {sorted(want[1])})"
            )
    return qmodel, segments


def exit_agreement(
    reference: Sequence[np.ndarray], quantized: Sequence[np.ndarray], exits: Sequence[str]
) -> list[dict[str, Any]]:
    """Per exit: top-1 agreement, margin change and max |logit difference| of ``quantized`` vs
    ``reference`` (:mod:`edgeperceiver.accuracy_gate`)."""
    agree, change = agreement(reference, quantized), margin_changes(reference, quantized)
    return [{"exit": k, "name": exits[k - 1], "top1_agreement": round(agree[k - 1], 4),
             "margin_change": round(change[k - 1], 4), "max_abs_logit_diff": round(float(np.max(np.abs(a - b))), 5)}
            for k, (a, b) in enumerate(zip(reference, quantized, strict=True), start=1)]


def agreement_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """:func:`exit_agreement`'s rows as report lines."""
    return [f"  exit {r['exit']} ({r['name']}): top-1 agreement with fp32 {r['top1_agreement']:.2%}, margin change "
            f"{r['margin_change']:.3f}, max |logit diff| {r['max_abs_logit_diff']:.4f}" for r in rows]


def options_to(cls: Any, options: Mapping[str, Any], *, nested: str = "quant") -> Any:
    """A target's options dataclass ``cls`` with a :class:`QuantizeConfig` field ``nested``.

    Parsed by the one option parser (:func:`edgeperceiver.options.parse_options`); a
    ``threads`` option must be a positive integer.
    """
    threads = options.get("threads")
    if isinstance(threads, bool):
        raise InputError(f"threads must be a positive integer, not {threads!r}")
    out = parse_options(cls, options, nested=nested)
    count = getattr(out, "threads", None)
    if count is not None and int(count) < 1:
        raise InputError(f"threads must be a positive integer, not {threads!r}")
    return out
