"""OpenVINO pass: merge the projections that read one activation (q/k/v) into one MatMul."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._optional import require
from .openvino_matmul import bias_add, const_matmul, kn_weight


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
        if not const_matmul(op):
            continue
        if any(t.get_node().get_type_name() == "Result" for t in op.output(0).get_target_inputs()):
            continue  # a model output keeps its own node (and tensor names)
        src = op.input_value(0)
        groups.setdefault((id(src.get_node()), src.get_index()), []).append(op)
    fused = 0
    for mms in groups.values():
        if len(mms) < 2:
            continue
        ws = [kn_weight(mm) for mm in mms]
        if len({w.shape[0] for w in ws}) != 1 or len({w.dtype for w in ws}) != 1:
            continue
        merged = ops.matmul(mms[0].input_value(0), ops.constant(np.ascontiguousarray(np.concatenate(ws, axis=1))),
                            False, False)
        merged.set_friendly_name(mms[0].get_friendly_name() + f"/fused{len(mms)}")
        tails: list[Any] = list(mms)
        biases = [bias_add(mm, w.shape[1]) for mm, w in zip(mms, ws, strict=True)]
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
