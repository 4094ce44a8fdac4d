"""The Q/DQ check: is a quantized segment cut soundly, and would TensorRT build it?

Two kinds of problems, one check (:func:`check_qdq_segments`):

- **the cut** (:func:`cut_problems`): a segment may neither receive nor produce an integer
  tensor made by a QuantizeLinear, and no DequantizeLinear may read a tensor from another
  segment (a Q and its DQ always land in one segment);
- **TensorRT** (:func:`qdq_problems`, with ``tensorrt=True``): explicit quantization takes
  signed INT8 (or FP8) quantizers with a zero point of 0; UINT8 or asymmetric quantizers
  and dynamic quantization are refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._optional import require
from ..errors import ExportError, TargetError

if TYPE_CHECKING:
    import onnx


def _onnx() -> Any:
    return require("onnx", purpose="checking Q/DQ graphs")


def cut_problems(segment: onnx.ModelProto) -> list[str]:
    """Where a cut separated a QuantizeLinear from its DequantizeLinear (empty: none)."""
    onnx_mod = _onnx()
    int_types = {onnx_mod.TensorProto.INT8, onnx_mod.TensorProto.UINT8}
    graph = segment.graph
    inits = {i.name for i in graph.initializer}
    problems = [
        f"{vi.name!r} crosses the cut as an integer tensor (a QuantizeLinear and its DequantizeLinear were split)"
        for vi in list(graph.input) + list(graph.output)
        if vi.name not in inits and vi.type.tensor_type.elem_type in int_types
    ]
    produced = {o for n in graph.node for o in n.output} | inits
    problems += [
        f"DequantizeLinear {node.name!r} reads a tensor from another segment"
        for node in graph.node
        if node.op_type == "DequantizeLinear" and node.input[0] not in produced
    ]
    return problems


def qdq_problems(model: onnx.ModelProto) -> list[str]:
    """Why TensorRT would reject the Q/DQ nodes of ``model`` (empty list: it accepts them).

    TensorRT's explicit quantization takes signed int8 (or fp8) quantizers with a zero point
    of 0 (symmetric); uint8 / asymmetric quantizers (ONNX Runtime's and NNCF's "mixed"
    default for activations) and dynamic quantization are refused. UINT8 quantizers with
    a zero point of 0 are converted by :func:`edgeperceiver.passes.qdq_signed.unsigned_to_signed`
    before this check runs on a TensorRT-bound graph.
    """
    onnx_mod = _onnx()
    numpy_helper = onnx_mod.numpy_helper
    consts: dict[str, Any] = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                consts[node.output[0]] = value
    allowed = {onnx_mod.TensorProto.INT8}
    for fp8 in ("FLOAT8E4M3FN",):
        if hasattr(onnx_mod.TensorProto, fp8):
            allowed.add(getattr(onnx_mod.TensorProto, fp8))
    problems: list[str] = []
    for node in model.graph.node:
        label = node.name or node.output[0]
        if node.op_type == "DynamicQuantizeLinear":
            problems.append(f"{label}: DynamicQuantizeLinear (dynamic quantization) is not supported")
            continue
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp_name = node.input[2] if len(node.input) > 2 else ""
        if node.op_type == "DequantizeLinear" and node.input[0] in consts:
            zp_type = consts[node.input[0]].data_type
        elif zp_name and zp_name in consts:
            zp_type = consts[zp_name].data_type
        elif zp_name:
            problems.append(f"{label}: zero point {zp_name!r} is not a constant")
            continue
        else:
            zp_type = onnx_mod.TensorProto.UINT8  # the ONNX default without a zero point
        nonzero = bool(zp_name and zp_name in consts and np.any(numpy_helper.to_array(consts[zp_name]) != 0))
        if zp_type not in allowed:
            type_name = onnx_mod.TensorProto.DataType.Name(zp_type)
            kind = "asymmetric, non-zero zero point" if nonzero else "zero point 0"
            problems.append(f"{label}: {type_name} quantization ({kind}); TensorRT needs signed INT8")
            continue
        if nonzero:
            problems.append(f"{label}: non-zero zero point (asymmetric); TensorRT needs symmetric quantizers")
    return problems


def check_qdq_segments(
    segments: Iterable[onnx.ModelProto], *, labels: Sequence[str] | None = None, tensorrt: bool = False
) -> None:
    """Raise if a segment's Q/DQ nodes were cut apart, or (``tensorrt``) TensorRT would refuse them.

    A bad cut raises :class:`~edgeperceiver.errors.ExportError`; quantizers TensorRT cannot
    build raise :class:`~edgeperceiver.errors.TargetError`. ``labels`` name the segments'
    files in the messages.
    """
    for k, seg in enumerate(segments, start=1):
        where = f"{labels[k - 1]} (segment {k})" if labels is not None else f"segment {k}"
        cut = cut_problems(seg)
        if cut:
            raise ExportError(f"{where}: {cut[0]}")
        if tensorrt:
            problems = qdq_problems(seg)
            if problems:
                raise TargetError(f"{where} has quantizers TensorRT cannot build: {summarize(problems)}")


def summarize(problems: Sequence[str], shown: int = 3) -> str:
    """The first ``shown`` problems, and how many more."""
    more = f" (+{len(problems) - shown} more)" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more
