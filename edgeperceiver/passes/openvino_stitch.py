"""OpenVINO pass: the segments joined back into one model, each carried input wired to its producer.

The result computes exactly what the chained segments compute (the same quantizers, the same
bf16 conversions at the boundaries) in one compiled model: the reference that isolates what
the cut itself costs, and the monolithic model of an entry whose segments were quantized one
by one or chosen per segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._optional import require


def _names(port: Any) -> set[str]:
    return set(port.get_names())


def stitch_segments(models: Sequence[Any], input_name: str, exits: Sequence[str]) -> Any:
    """One model from ``models`` (segment order): image ``input_name`` in, the ``exits`` out.

    Every Parameter other than the image is replaced by the output of the earlier segment
    that produces the tensor of that name. The segment models are cloned, never edited.
    """
    ov = require("openvino", purpose="compiling for OpenVINO")
    produced: dict[str, Any] = {}
    image: Any = None
    results: dict[str, Any] = {}
    for model in (m.clone() for m in models):
        for param in model.get_parameters():
            names = _names(param.output(0))
            if input_name in names:
                if image is None:
                    image = param
                else:
                    param.output(0).replace(image.output(0))
                continue
            source = next((produced[n] for n in names if n in produced), None)
            if source is None:
                raise ValueError(f"no earlier segment produces {sorted(names)}")
            param.output(0).replace(source)
        for result in model.get_results():
            source = result.input_value(0)
            for n in _names(result.output(0)) | _names(source):
                produced.setdefault(n, source)
                if n in exits:
                    results.setdefault(n, result)
    missing = [e for e in exits if e not in results]
    if image is None or missing:
        raise ValueError(f"the segments lack the image {input_name!r} or the exits {missing}")
    return ov.Model([results[e] for e in exits], [image], "stitched")
