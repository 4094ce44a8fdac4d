"""Choosing precisions by measurement: the accuracy gate (:mod:`edgeperceiver.accuracy_gate`),
then the fastest (numbers in, names out)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from edgeperceiver.accuracy_gate import GATE_POINTS, MAX_MARGIN_CHANGE, passes, shortfall

#: segment times within this fraction of the fastest count as equal: the interleaved loop's
#: run-to-run spread on a shared 2-core machine; among them the most accurate candidate wins
TIE_TOLERANCE = 0.05


def fastest(ms: Mapping[str, float], change: Mapping[str, float], tolerance: float = TIE_TOLERANCE) -> str:
    """The fastest name in ``ms``; names within ``tolerance`` of its time are a tie, won by the
    smallest ``change`` (margin change against FP32; 0 where not given), then by time.

    Top-1 agreement on calibration images (which the model usually classifies with wide
    margins) cannot tell a candidate that erodes FP32's margins five times more from one that
    does not, and such erosion is what flips held-out images.
    """
    best = min(ms.values())
    near = [n for n, t in ms.items() if t <= best * (1.0 + tolerance)]
    return min(near, key=lambda n: (change.get(n, 0.0), ms[n]))


def within_gate(
    segment_ms: Mapping[str, Sequence[float]],
    agreement: Mapping[str, Sequence[float]],
    change: Mapping[str, Sequence[float]],
    gate_points: float,
    max_change: float,
) -> dict[str, list[bool]]:
    """Per candidate, per exit: within the gate? (A candidate not checked counts as agreeing.)"""
    return {n: passes(agreement.get(n, [1.0] * len(ms)), gate_points, change.get(n), max_change)
            for n, ms in segment_ms.items()}


def fastest_passing(
    segment_ms: Mapping[str, Sequence[float]],
    agreement: Mapping[str, Sequence[float]],
    *,
    gate_points: float = GATE_POINTS,
    fallback: str,
    margin_change: Mapping[str, Sequence[float]] | None = None,
    max_change: float = MAX_MARGIN_CHANGE,
    tolerance: float = TIE_TOLERANCE,
) -> str:
    """The candidate whose whole chain is fastest among those within the gate at every exit
    (a tie within ``tolerance`` goes to the smallest largest ``margin_change``; see :func:`fastest`).

    Where none is (e.g. untrained weights, which nothing matches), the one closest to the gate
    (:func:`shortfall`), then the fastest; ``fallback`` where no candidate was checked.
    """
    change = margin_change or {}
    checked = [n for n in segment_ms if n in agreement]
    ok = [n for n, w in within_gate(segment_ms, agreement, change, gate_points, max_change).items() if all(w)]
    if not ok:
        if not checked:
            return fallback
        return min(checked, key=lambda n: (shortfall(agreement[n], change.get(n), gate_points, max_change),
                                           sum(segment_ms[n])))
    worst = {n: max(c, default=0.0) for n, c in change.items()}
    return fastest({n: sum(segment_ms[n]) for n in ok}, worst, tolerance)


def per_segment(
    segment_ms: Mapping[str, Sequence[float]],
    agreement: Mapping[str, Sequence[float]],
    *,
    gate_points: float = GATE_POINTS,
    fallback: str,
    margin_change: Mapping[str, Sequence[float]] | None = None,
    max_change: float = MAX_MARGIN_CHANGE,
    tolerance: float = TIE_TOLERANCE,
) -> list[str]:
    """Per segment, the fastest candidate that is within the gate at that segment's exit (a tie
    within ``tolerance`` goes to the smallest ``margin_change`` at that exit; see :func:`fastest`).

    Candidate ``c`` at segment ``k`` is judged by its own chain's agreement at exit ``k``
    (segments 1..k all in ``c``); the mixed chain is checked again after the choice (see
    :func:`edgeperceiver.targets.openvino_auto.choose_per_segment`). ``fallback`` (FP32, always
    within the gate) is taken where no candidate passes.
    """
    count = len(next(iter(segment_ms.values())))
    change = margin_change or {}
    within = within_gate(segment_ms, agreement, change, gate_points, max_change)
    choice = []
    for k in range(count):
        ok = [n for n, w in within.items() if w[k]]
        choice.append(fastest({n: segment_ms[n][k] for n in ok}, {n: change[n][k] for n in ok if n in change},
                              tolerance) if ok else fallback)
    return choice


def describe(
    segment_ms: Mapping[str, Sequence[float]], agreement: Mapping[str, Sequence[float]], gate_points: float,
    margin_change: Mapping[str, Sequence[float]] | None = None,
    max_change: float = MAX_MARGIN_CHANGE,
) -> dict[str, Any]:
    """The numbers a choice was made on, for the entry's metadata."""
    change = margin_change or {}
    within = within_gate(segment_ms, agreement, change, gate_points, max_change)
    out: dict[str, Any] = {
        "gate_points": gate_points,
        "candidates": {
            n: {"segment_ms": [round(v, 3) for v in segment_ms[n]],
                "top1_agreement": [round(a, 4) for a in agreement.get(n, [])], "within_gate": within[n]}
            for n in segment_ms
        },
    }
    for n, c in change.items():
        out["candidates"][n]["margin_change"] = [round(v, 4) for v in c]
    if change:
        out["max_margin_change"] = max_change
        out["tie_tolerance"] = TIE_TOLERANCE
    return out
