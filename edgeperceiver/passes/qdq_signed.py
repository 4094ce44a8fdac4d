"""Turn unsigned zero-point-0 activation quantizers into signed INT8 ones (scale doubled).

NNCF's symmetric ("performance") preset quantizes non-negative activations (after ReLU,
Sigmoid, Softmax) as UINT8 with zero point 0: levels 0..255 at scale ``s``. TensorRT
takes signed INT8 Q/DQ only. The same range in signed INT8 is levels 0..127 at scale
``2 s`` (what a symmetric signed quantizer calibrated on that tensor would choose), so
each such Q->DQ pair gets an INT8 zero point of 0 and its scale doubled: one bit of
resolution less on those activations, no change anywhere else. Weight quantizers and
asymmetric (non-zero zero point) quantizers are left as they are; the Q/DQ check reports
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .._optional import require

if TYPE_CHECKING:
    import onnx


@dataclass(frozen=True)
class SignedReport:
    """What :func:`unsigned_to_signed` changed."""

    quantizers: int  #: QuantizeLinear nodes converted
    dequantizers: int  #: DequantizeLinear nodes converted


def unsigned_to_signed(model: onnx.ModelProto) -> tuple[onnx.ModelProto, SignedReport]:
    """A copy of ``model`` whose UINT8 zero-point-0 activation Q/DQ pairs are signed INT8.

    A QuantizeLinear is converted when its zero point is a UINT8 constant of zeros; every
    DequantizeLinear that reads a converted quantizer is converted with it (a cut never
    separates them: see :func:`edgeperceiver.quantize.split_shared_quantizers`).
    """
    onnx_mod: Any = require("onnx", purpose="rewriting Q/DQ graphs")
    numpy_helper = onnx_mod.numpy_helper
    out = onnx_mod.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    consts: dict[str, Any] = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                consts[node.output[0]] = value
    taken = set(consts) | {o for n in graph.node for o in n.output}
    made: dict[tuple[str, str], str] = {}  # (kind, source name) -> new initializer name

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}{k}"
        taken.add(name)
        return name

    def derived(kind: str, source: str) -> str:
        key = (kind, source)
        if key not in made:
            arr = numpy_helper.to_array(consts[source])
            new = (arr.astype(np.float64) * 2).astype(arr.dtype) if kind == "x2" else np.zeros(arr.shape, np.int8)
            name = fresh(f"{source}__{'x2' if kind == 'x2' else 's8'}")
            graph.initializer.append(numpy_helper.from_array(new, name))
            made[key] = name
        return made[key]

    def unsigned_zero(node: Any) -> bool:
        if len(node.input) < 3 or node.input[2] not in consts or node.input[1] not in consts:
            return False
        zp = consts[node.input[2]]
        return bool(zp.data_type == onnx_mod.TensorProto.UINT8 and not np.any(numpy_helper.to_array(zp)))

    converted: set[str] = set()  # outputs of converted quantizers
    n_q = n_dq = 0
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and unsigned_zero(node) and node.input[0] not in consts:
            node.input[1] = derived("x2", node.input[1])
            node.input[2] = derived("s8", node.input[2])
            converted.add(node.output[0])
            n_q += 1
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in converted and unsigned_zero(node):
            node.input[1] = derived("x2", node.input[1])
            node.input[2] = derived("s8", node.input[2])
            n_dq += 1
    del graph.value_info[:]  # the integer types changed; consumers infer them again
    return out, SignedReport(n_q, n_dq)
