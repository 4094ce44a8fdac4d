"""Raise a graph's default-domain opset (13..18 -> 19 or later), rewriting what changed.

Float16 Q/DQ needs opset 19. Between opset 13 and 19 the only change that breaks an
existing node is opset 18's: the Reduce ops (all but ReduceSum) take ``axes`` as an input
instead of an attribute. Every other change in 14..19 adds an optional attribute or type.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .._optional import require
from ..errors import TargetError

if TYPE_CHECKING:
    import onnx

#: ops whose ``axes`` attribute became an input in opset 18 (ReduceSum moved in opset 13)
AXES_TO_INPUT = frozenset({
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
})
_OLDEST = 13


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (``ai.onnx``) opset version (0 when absent)."""
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def upgrade_opset(model: onnx.ModelProto, version: int = 19) -> onnx.ModelProto:
    """A copy of ``model`` at default-domain opset ``version`` (unchanged copy if already there).

    Raises :class:`~edgeperceiver.errors.TargetError` below opset 13 or for a graph with
    subgraphs (control flow), which this pass does not rewrite.
    """
    onnx_mod: Any = require("onnx", purpose="rewriting ONNX graphs")
    out = onnx_mod.ModelProto()
    out.CopyFrom(model)
    have = default_opset(out)
    if have >= version:
        return out
    if have < _OLDEST:
        raise TargetError(f"the graph is opset {have}; re-export it at opset {_OLDEST} or later (17 is the default)")
    graph = out.graph
    if any(a.type in (onnx_mod.AttributeProto.GRAPH, onnx_mod.AttributeProto.GRAPHS)
           for n in graph.node for a in n.attribute):
        raise TargetError("the graph has control flow (subgraphs); its opset cannot be raised here")
    names = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
    if have < 18:
        for node in graph.node:
            if node.op_type not in AXES_TO_INPUT:
                continue
            axes = next((a for a in node.attribute if a.name == "axes"), None)
            if axes is None:
                continue
            base = f"{node.name or node.output[0]}__axes"
            name, k = base, 1
            while name in names:
                k += 1
                name = f"{base}{k}"
            names.add(name)
            graph.initializer.append(onnx_mod.numpy_helper.from_array(np.asarray(list(axes.ints), np.int64), name))
            kept = [a for a in node.attribute if a.name != "axes"]
            del node.attribute[:]
            node.attribute.extend(kept)
            node.input.append(name)
    for o in out.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = version
    return out
