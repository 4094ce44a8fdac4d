"""INT8 that keeps its accuracy promise: check every exit against FP32, and climb a ladder if not.

A quantized candidate is judged by the accuracy gate (:mod:`edgeperceiver.accuracy_gate`) on
the calibration images: top-1 agreement with FP32 at every exit and, where the caller measures
it, the change of FP32's top-1 margins. Where the candidate made with the configured settings
misses the gate at any exit, :func:`climb` quantizes again with more of the graph kept in
float, one rung of ``QuantizeConfig.ladder`` at a time (each rung adds one scope of
:data:`FLOAT_OPS` to ``float_ops``), and takes the first rung that passes; where none does,
the rung closest to the gate (:func:`~edgeperceiver.accuracy_gate.shortfall`, then the best
agreement summed over exits), marked as outside the gate. What was tried and chosen goes into
the metadata of the stage or entry.

The scopes are structural, so they apply to any exported model, ONNX or OpenVINO:

- ``heads``: each exit's classifier MatMul/Gemm (:func:`edgeperceiver.quantize.head_nodes`);
- ``early_convs``: the first third of the convolutions in graph order (the high-resolution
  layers, whose rounding errors every later layer and exit inherits);
- ``grouped_convs``: grouped and depthwise convolutions;
- ``norms``: LayerNormalization (MVN in OpenVINO);
- ``convs``: every convolution;
- ``attention``: the MatMuls whose two inputs are both activations (attention scores and
  their product with the values; in OpenVINO a quantized pair runs as a fused int8 MHA kernel).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from .accuracy_gate import passes, shortfall
from .errors import InputError

FLOAT_OPS = ("heads", "early_convs", "grouped_convs", "norms", "convs", "attention")
#: the share of the convolutions (in graph order) that ``early_convs`` keeps in float
EARLY_SHARE = 1 / 3

_TYPES = {
    "norms": ("LayerNormalization", "MVN"),
    "convs": ("Conv", "Convolution", "GroupConvolution"),
    "grouped_convs": ("GroupConvolution",),  # OpenVINO; ONNX Conv with group > 1 by name
}
_CONV = frozenset({"Conv", "Convolution", "GroupConvolution"})

T = TypeVar("T")


class LadderConfig(Protocol):
    """What the ladder reads of :class:`edgeperceiver.quantize.QuantizeConfig` (a dataclass)."""

    @property
    def float_ops(self) -> tuple[str, ...]: ...
    @property
    def ladder(self) -> tuple[str, ...]: ...


C = TypeVar("C", bound=LadderConfig)


def check_float_ops(ops: Sequence[str], what: str = "float_ops") -> None:
    bad = [o for o in ops if o not in FLOAT_OPS]
    if bad:
        raise InputError(f"{what}: unknown scope(s) {bad}; known: {', '.join(FLOAT_OPS)}")


def float_types(ops: Sequence[str]) -> list[str]:
    """Op types NNCF leaves in float for the scopes ``ops`` (ONNX and OpenVINO spellings)."""
    return sorted({t for o in ops for t in _TYPES.get(o, ())})


def float_names(model: Any, ops: Sequence[str], exits: Sequence[str]) -> list[str]:
    """Node names NNCF leaves in float for the scopes ``ops`` (ONNX ModelProto or openvino.Model)."""
    names: list[str] = []
    if "heads" in ops:
        names += head_nodes(model, exits)
    if "attention" in ops:
        names += attention_matmuls(model)
    if "early_convs" in ops or "grouped_convs" in ops:
        convs = _convs(model)  # (name, group > 1), in graph order
        if "grouped_convs" in ops:
            names += [n for n, grouped in convs if grouped]
        if "early_convs" in ops:
            names += [n for n, _ in convs[: math.ceil(len(convs) * EARLY_SHARE)]]
    return list(dict.fromkeys(names))


def _convs(model: Any) -> list[tuple[str, bool]]:
    if hasattr(model, "graph"):  # onnx.ModelProto
        return [(n.name, any(a.name == "group" and a.i > 1 for a in n.attribute))
                for n in model.graph.node if n.op_type == "Conv"]
    return [(op.get_friendly_name(), op.get_type_name() == "GroupConvolution")  # openvino.Model
            for op in model.get_ordered_ops() if op.get_type_name() in _CONV]


def attention_matmuls(model: Any) -> list[str]:
    """Names of the MatMuls that multiply two activations (no weight on either side)."""
    if hasattr(model, "graph"):  # onnx.ModelProto
        const = {i.name for i in model.graph.initializer}
        const |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
        producer = {o: n for n in model.graph.node for o in n.output}

        def weight(name: str) -> bool:
            node = producer.get(name)
            while node is not None and node.op_type in _WEIGHT_PASS:
                name = node.input[0]
                node = producer.get(name)
            return name in const

        return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(weight(i) for i in n.input)]
    out = []
    for op in model.get_ordered_ops():  # openvino.Model
        if op.get_type_name() != "MatMul":
            continue
        sources = [op.input(i).get_source_output().get_node() for i in range(2)]
        for k, node in enumerate(sources):
            while node.get_type_name() in _WEIGHT_PASS:
                node = node.input(0).get_source_output().get_node()
            sources[k] = node
        if not any(node.get_type_name() == "Constant" for node in sources):
            out.append(op.get_friendly_name())
    return out


#: ops that may stand between a weight and the MatMul reading it (dequantization, layout)
_WEIGHT_PASS = frozenset({"Convert", "Cast", "Reshape", "Transpose", "DequantizeLinear", "Identity"})

#: ops between a classifier's MatMul/Gemm and the exit output (bias, reshapes, casts)
_HEAD_PASS = frozenset({"Add", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Convert", "Cast"})


def head_nodes(model: Any, exits: Sequence[str]) -> list[str]:
    """Names of the MatMul/Gemm nodes that make the ``exits`` (ONNX or OpenVINO model).

    Walks back from each exit through bias adds and reshapes to the first matrix product.
    """
    found: list[str] = []
    if hasattr(model, "graph"):  # onnx.ModelProto
        producer = {o: n for n in model.graph.node for o in n.output}
        for e in exits:
            node = producer.get(e)
            while node is not None and node.op_type in _HEAD_PASS:
                node = producer.get(node.input[0])
            if node is not None and node.op_type in ("MatMul", "Gemm"):
                found.append(node.name)
        return found
    for result in model.get_results():  # openvino.Model
        source = result.input(0).get_source_output()
        if exits and not set(source.get_names()) & set(exits):
            continue
        op = source.get_node()
        while op.get_type_name() in {"Add", "Reshape", "Squeeze", "Unsqueeze", "Convert"} or (
            op.get_type_name() == "Multiply"  # Gemm's alpha
            and op.input(1).get_source_output().get_node().get_type_name() == "Constant"
        ):
            op = op.input(0).get_source_output().get_node()
        if op.get_type_name() == "MatMul":
            found.append(op.get_friendly_name())
    return found


def rungs(config: C) -> list[C]:
    """The configured settings, then one more float scope of ``config.ladder`` per rung."""
    check_float_ops(config.float_ops)
    check_float_ops(config.ladder, "ladder")
    out = [config]
    ops = list(config.float_ops)
    for step in config.ladder:
        if step in ops:
            continue
        ops.append(step)
        out.append(dataclasses.replace(config, float_ops=tuple(ops)))  # type: ignore[type-var]
    return out


@dataclass(frozen=True)
class Verdict:
    """A rung's per-exit top-1 agreement with FP32 and, where measured, margin change."""

    agreement: Sequence[float]
    margin_change: Sequence[float] | None = None


def climb(
    config: C,
    build: Callable[[C], tuple[T, Verdict]],
    *,
    gate_points: float,
    images: int,
    max_margin_change: float | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[T, C, dict[str, Any]]:
    """Quantize with each rung until one is within the gate at every exit.

    ``build(config)`` quantizes and returns ``(result, verdict)``; the margin change is part of
    the gate where ``max_margin_change`` is given. Returns the chosen result, its settings, and
    metadata listing every attempt.
    """
    attempts: list[dict[str, Any]] = []
    best: tuple[tuple[float, float], int, T, C] | None = None
    for k, cfg in enumerate(rungs(config)):
        result, got = build(cfg)
        agree = list(got.agreement)
        change = None if got.margin_change is None or max_margin_change is None else list(got.margin_change)
        ok = all(passes(agree, gate_points, change, max_margin_change))
        attempt: dict[str, Any] = {"float_ops": list(cfg.float_ops), "top1_agreement": [round(a, 4) for a in agree]}
        if change is not None:
            attempt["margin_change"] = [round(c, 4) for c in change]
        attempts.append({**attempt, "within_gate": ok})
        if log is not None:
            shown = " / ".join(f"{100 * a:.2f}" for a in agree)
            shown += "" if change is None else " %, margin change " + " / ".join(f"{c:.3f}" for c in change)
            log(f"INT8 rung {k} (float: {', '.join(cfg.float_ops) or 'none'}): agreement with FP32 "
                f"per exit {shown} -> {'within' if ok else 'outside'} the gate ({gate_points} points"
                + ("" if change is None else f", margin change {max_margin_change}") + ")")
        score = (-shortfall(agree, change, gate_points, max_margin_change), sum(agree))
        if best is None or ok or score > best[0]:
            best = (score, k, result, cfg)
        if ok:
            break
    assert best is not None  # rungs() has at least the configured settings
    _, chosen, result, cfg = best
    meta = {"gate_points": gate_points, "images": images, "attempts": attempts, "chosen": chosen,
            "float_ops": list(cfg.float_ops), "within_gate": attempts[chosen]["within_gate"]}
    if max_margin_change is not None:
        meta["max_margin_change"] = max_margin_change
    if log is not None and not meta["within_gate"]:
        log(f"warning: no INT8 rung is within the gate on the calibration images; rung {chosen} "
            "is closest to it and is used")
    return result, cfg, meta
