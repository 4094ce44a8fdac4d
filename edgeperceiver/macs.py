"""Multiply-accumulate counting on ONNX nodes (the ops the usual PyTorch counters count)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import onnx

#: ops whose multiply-accumulates are counted (the same ops the usual PyTorch counters count)
MAC_OPS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul",
})


def node_macs(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Multiply-accumulates of one node given concrete tensor shapes (0 for uncounted ops)."""
    op = node.op_type
    if op not in MAC_OPS:
        return 0
    if op in ("Conv", "ConvInteger", "QLinearConv", "ConvTranspose"):
        w_name = node.input[3] if op == "QLinearConv" else node.input[1]
        w = shapes[w_name]
        if op == "ConvTranspose":
            x = shapes[node.input[0]]
            # every input element is multiplied into C_out/group * kernel outputs
            return int(np.prod(x)) * int(np.prod(w[1:]))
        out = shapes[node.output[0]]
        return int(np.prod(out)) * int(np.prod(w[1:]))
    if op == "Gemm":
        a = shapes[node.input[0]]
        trans_a = any(at.name == "transA" and at.i for at in node.attribute)
        out = shapes[node.output[0]]
        k = a[0] if trans_a else a[1]
        return int(np.prod(out)) * int(k)
    a_name = node.input[0]
    a = shapes[a_name]
    out = shapes[node.output[0]]
    k = a[-1] if len(a) >= 1 else 1
    return int(np.prod(out)) * int(k)


def macs_tensors(nodes: Iterable[onnx.NodeProto]) -> list[str]:
    """The tensors whose shapes :func:`node_macs` needs for ``nodes``."""
    need: list[str] = []
    for n in nodes:
        if n.op_type not in MAC_OPS:
            continue
        if n.op_type == "QLinearConv":
            need += [n.input[0], n.input[3]]
        else:
            need += [n.input[0], n.input[1]]
        need.append(n.output[0])
    return list(dict.fromkeys(need))


def numel(shape: Sequence[int]) -> int:
    return int(np.prod(shape)) if len(shape) else 1
