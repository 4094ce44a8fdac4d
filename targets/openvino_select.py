"""Choosing precisions by measurement: the accuracy gate, then the fastest (numbers in, names out).

A candidate passes the gate at exit k when its top-1 agreement with FP32 on the calibration
images is at least ``1 - gate_points / 100``: then it cannot lose more than ``gate_points``
of accuracy there on those images, whatever their labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: the accuracy gate, in points of top-1 agreement with FP32 (the demo's INT8 promise)
GATE_POINTS = 0.5


def passes(agreement: Sequence[float], gate_points: float = GATE_POINTS) -> list[bool]:
    """Per exit: is the agreement with FP32 within the gate?"""
    floor = 1.0 - gate_points / 100.0
    return [a >= floor - 1e-12 for a in agreement]


def fastest_passing(
    segment_ms: Mapping[str, Sequence[float]],
    agreement: Mapping[str, Sequence[float]],
    *,
    gate_points: float = GATE_POINTS,
    fallback: str,
) -> str:
    """The candidate whose whole chain is fastest among those within the gate at every exit.

    Where none is (a build that cannot match FP32 at all, e.g. untrained weights), the gate
    is taken relative to ``fallback``: the fastest candidate that agrees with FP32 at every
    exit at most ``gate_points`` less than ``fallback`` does.
    """
    ok = [n for n in segment_ms if all(passes(agreement.get(n, [1.0] * len(segment_ms[n])), gate_points))]
    if not ok:
        ref = agreement.get(fallback)
        if ref is None:
            return fallback
        floor = [r - gate_points / 100.0 - 1e-12 for r in ref]
        ok = [n for n in segment_ms if n in agreement and all(a >= f for a, f in zip(agreement[n], floor, strict=True))]
        if fallback not in ok:
            ok.append(fallback)
    return min(ok, key=lambda n: sum(segment_ms[n]))


def per_segment(
    segment_ms: Mapping[str, Sequence[float]],
    agreement: Mapping[str, Sequence[float]],
    *,
    gate_points: float = GATE_POINTS,
    fallback: str,
) -> list[str]:
    """Per segment, the fastest candidate that is within the gate at that segment's exit.

    Candidate ``c`` at segment ``k`` is judged by its own chain's agreement at exit ``k``
    (segments 1..k all in ``c``); the mixed chain is checked again after the choice (see
    :func:`edgeperceiver.targets.openvino_auto.compile_auto`). ``fallback`` (FP32, always
    within the gate) is taken where no candidate passes.
    """
    count = len(next(iter(segment_ms.values())))
    choice = []
    for k in range(count):
        ok = [n for n in segment_ms if passes(agreement.get(n, [1.0] * count), gate_points)[k]]
        choice.append(min(ok, key=lambda n: segment_ms[n][k]) if ok else fallback)
    return choice


def describe(
    segment_ms: Mapping[str, Sequence[float]], agreement: Mapping[str, Sequence[float]], gate_points: float
) -> dict[str, Any]:
    """The numbers a choice was made on, for the entry's metadata."""
    return {
        "gate_points": gate_points,
        "candidates": {
            n: {"segment_ms": [round(v, 3) for v in segment_ms[n]],
                "top1_agreement": [round(a, 4) for a in agreement.get(n, [])],
                "within_gate": passes(agreement.get(n, [1.0] * len(segment_ms[n])), gate_points)}
            for n in segment_ms
        },
    }
