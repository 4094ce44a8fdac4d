"""OpenVINO pass: per-output-channel ranges for NNCF's group-convolution weight quantizers."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._optional import require


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
