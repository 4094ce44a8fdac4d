"""OpenVINO pass: fold each LayerNorm's scale and shift into the projections that read it."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._optional import require
from .openvino_matmul import const_matmul, kn_weight


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
        if not users or not all(t.get_index() == 0 and const_matmul(t.get_node()) for t in users):
            continue
        for mm in (t.get_node() for t in users):
            w = kn_weight(mm).astype(np.float64)
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
