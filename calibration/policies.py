"""Threshold policies on recorded exit outputs (pure numpy: no bundle, no engine).

Conventions (the runtime's, see :mod:`edgeperceiver.runtime.criteria`):

* ``scores`` is (K, N): exit k's confidence for sample i, higher = more confident;
* a sample leaves at the first *enabled* exit k whose ``score >= threshold[k]``;
* the last enabled exit takes every sample still running, whatever its threshold;
* internally a threshold of ``+inf`` means "enabled but never fires"; when thresholds are
  written to a bundle such an exit is turned off (``None``), which is equivalent because a
  later exit still runs the segments before it.

``costs`` is (K,): the cumulative cost (latency in ms, or GFLOPs) to reach exit k, so a
sample that leaves at exit k costs ``costs[k]``.

Two searches over per-exit thresholds share one coordinate-descent engine
(:func:`search`): :func:`max_drop` (lowest expected cost whose accuracy stays within a
number of points of the final exit) and :func:`budget` (best accuracy whose expected cost
fits). Each coordinate step is exact: for exit k, with the other thresholds fixed, every
distinct threshold (midpoints between consecutive observed scores) is evaluated at once
from sorted cumulative sums, and the best is kept. Several starting points (never exit,
exit at once, and the paper's 33 budget mixes) guard against poor local optima.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edgeperceiver.errors import CalibrationError, InputError

from .paper import mix_thresholds, paper_mixes

#: a threshold vector as the policies use it: float per exit, None = disabled, +inf = never fires
ThresholdValues = tuple[float | None, ...]
#: cumulative cost to reach each exit
Costs = Sequence[float] | np.ndarray


@dataclass(frozen=True)
class OperatingPoint:
    """What a threshold vector does on a set of samples.

    ``accuracy`` and ``exit_accuracy`` are shares in [0, 1] (``None`` without labels, or for
    an exit no sample took); ``agreement`` is the share whose prediction equals the final
    (last enabled) exit's; ``cost`` the expected cost per sample; ``share`` the share of
    samples leaving at each exit.
    """

    thresholds: ThresholdValues
    n: int
    accuracy: float | None
    agreement: float
    cost: float
    share: tuple[float, ...]
    exit_accuracy: tuple[float | None, ...]


def enabled_exits(thresholds: Sequence[float | None]) -> list[int]:
    """0-based indices of the enabled exits (threshold not ``None``)."""
    idx = [k for k, t in enumerate(thresholds) if t is not None]
    if not idx:
        raise InputError("every exit is turned off: at least one exit must be enabled")
    return idx


def exit_taken(scores: np.ndarray, thresholds: Sequence[float | None]) -> np.ndarray:
    """(N,) 0-based index of the exit each sample leaves at."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or len(thresholds) != scores.shape[0]:
        raise InputError(f"{len(thresholds)} thresholds for scores of shape {scores.shape}")
    enabled = enabled_exits(thresholds)
    taken = np.full(scores.shape[1], enabled[-1], dtype=np.int64)
    undecided = np.ones(scores.shape[1], dtype=bool)
    for k in enabled[:-1]:
        t = thresholds[k]
        assert t is not None
        fire = undecided & (scores[k] >= t)
        taken[fire] = k
        undecided &= ~fire
    return taken


def evaluate(
    scores: np.ndarray,
    preds: np.ndarray,
    labels: np.ndarray | None,
    thresholds: Sequence[float | None],
    costs: Costs,
) -> OperatingPoint:
    """The :class:`OperatingPoint` of ``thresholds`` on these samples."""
    preds = np.asarray(preds)
    k_count, n = preds.shape
    if n == 0:
        raise CalibrationError("no samples to evaluate thresholds on")
    cost_arr = np.asarray(costs, dtype=np.float64)
    taken = exit_taken(scores, thresholds)
    final = enabled_exits(thresholds)[-1]
    rows = np.arange(n)
    pred = preds[taken, rows]
    counts = np.bincount(taken, minlength=k_count)
    accuracy: float | None = None
    exit_acc: tuple[float | None, ...] = (None,) * k_count
    if labels is not None:
        correct = pred == np.asarray(labels)
        accuracy = float(correct.mean())
        hits = np.bincount(taken, weights=correct.astype(np.float64), minlength=k_count)
        exit_acc = tuple(float(hits[k] / counts[k]) if counts[k] else None for k in range(k_count))
    return OperatingPoint(
        thresholds=tuple(thresholds),
        n=n,
        accuracy=accuracy,
        agreement=float((pred == preds[final]).mean()),
        cost=float(cost_arr[taken].mean()),
        share=tuple(float(c / n) for c in counts),
        exit_accuracy=exit_acc,
    )


def exit_accuracies(preds: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(K,) accuracy of every exit on all samples (as if it took them all)."""
    return (np.asarray(preds) == np.asarray(labels)[None, :]).mean(axis=1)


# --------------------------------------------------------------------------- the search engine

#: key(metric_sums (M, C), cost_sums (C,)) -> lexicographic tuple of (C,) arrays; smaller is better
Key = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, ...]]


def _check_inputs(scores: np.ndarray, preds: np.ndarray, costs: Costs, allowed: Sequence[int]) -> None:
    if scores.shape != preds.shape or scores.ndim != 2:
        raise InputError(f"scores {scores.shape} and predictions {preds.shape} must both be (exits, samples)")
    if len(costs) != scores.shape[0]:
        raise InputError(f"{len(costs)} exit costs for {scores.shape[0]} exits")
    if not allowed:
        raise InputError("at least one exit must be enabled")
    if any(not 0 <= k < scores.shape[0] for k in allowed):
        raise InputError(f"exit indices {list(allowed)} out of range for {scores.shape[0]} exits")
    if scores.shape[1] == 0:
        raise CalibrationError("no samples to fit thresholds on")


def _decisions(scores: np.ndarray, allowed: Sequence[int], t: np.ndarray) -> np.ndarray:
    """Exit index per sample for internal thresholds ``t`` (K,) over the ``allowed`` exits."""
    taken = np.full(scores.shape[1], allowed[-1], dtype=np.int64)
    undecided = np.ones(scores.shape[1], dtype=bool)
    for k in allowed[:-1]:
        fire = undecided & (scores[k] >= t[k])
        taken[fire] = k
        undecided &= ~fire
    return taken


def _coordinate_step(
    scores: np.ndarray,
    value: np.ndarray,
    costs: np.ndarray,
    allowed: Sequence[int],
    t: np.ndarray,
    pos: int,
    key: Key,
) -> float:
    """The best threshold for exit ``allowed[pos]`` with the others fixed (exact over all cuts)."""
    k = allowed[pos]
    n = scores.shape[1]
    rows = np.arange(n)
    before = np.zeros(n, dtype=bool)
    before_exit = np.zeros(n, dtype=np.int64)
    for j in allowed[:pos]:
        fire = ~before & (scores[j] >= t[j])
        before_exit[fire] = j
        before |= fire
    after_exit = np.full(n, allowed[-1], dtype=np.int64)
    undecided = np.ones(n, dtype=bool)
    for j in allowed[pos + 1 : -1]:
        fire = undecided & (scores[j] >= t[j])
        after_exit[fire] = j
        undecided &= ~fire
    base_value = value[:, before_exit[before], rows[before]].sum(axis=1)
    base_value = base_value + value[:, after_exit[~before], rows[~before]].sum(axis=1)
    base_cost = costs[before_exit[before]].sum() + costs[after_exit[~before]].sum()
    rest = np.flatnonzero(~before)
    s = scores[k, rest]
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    r_sorted = rest[order]
    gain_value = value[:, k, r_sorted] - value[:, after_exit[r_sorted], r_sorted]
    gain_cost = costs[k] - costs[after_exit[r_sorted]]
    # a cut after position j (0-based) lets the j+1 highest scores leave; only cut between distinct scores
    ends = np.flatnonzero(np.r_[s_sorted[1:] < s_sorted[:-1], True]) if len(s_sorted) else np.zeros(0, np.int64)
    zero = np.zeros((value.shape[0], 1))
    cand_value = np.concatenate([zero, np.cumsum(gain_value, axis=1)[:, ends]], axis=1) + base_value[:, None]
    cand_cost = np.r_[0.0, np.cumsum(gain_cost)[ends]] + base_cost
    next_lower = np.r_[s_sorted[ends[:-1] + 1], -np.inf] if len(ends) else np.zeros(0)
    cut_at = s_sorted[ends] if len(ends) else np.zeros(0)
    mid = np.where(np.isfinite(next_lower), (cut_at + next_lower) / 2.0, cut_at)
    # guard: the midpoint must stay strictly above the next lower score and <= the cut score
    mid = np.where((mid > next_lower) & (mid <= cut_at), mid, cut_at)
    cand_t = np.r_[np.inf, mid]
    keys = key(cand_value, cand_cost)
    # lexsort: last key is primary; among exact ties prefer the most conservative (highest) threshold
    best = int(np.lexsort((np.arange(len(cand_t)), *reversed(keys)))[0])
    return float(cand_t[best])


def search(
    scores: np.ndarray,
    value: np.ndarray,
    costs: Costs,
    allowed: Sequence[int],
    key: Key,
    starts: Sequence[np.ndarray],
    max_rounds: int = 30,
) -> np.ndarray:
    """Coordinate descent over per-exit thresholds from several starts; the best end point.

    ``value`` is (M, K, N): M per-sample metrics of leaving at each exit (e.g. 1 = correct);
    ``key`` ranks candidates by their (M,) metric sums and cost sum, smaller first. Returns internal thresholds
    (K,) (+inf = never fires; entries of exits not allowed are ignored).
    """
    cost_arr = np.asarray(costs, dtype=np.float64)
    rows = np.arange(scores.shape[1])
    best_t: np.ndarray | None = None
    best_key: tuple[float, ...] | None = None
    for start in starts:
        t = np.array(start, dtype=np.float64)
        for _ in range(max_rounds):
            before = t.copy()
            for pos in range(len(allowed) - 1):
                t[allowed[pos]] = _coordinate_step(scores, value, cost_arr, allowed, t, pos, key)
            if np.array_equal(before, t):
                break
        taken = _decisions(scores, allowed, t)
        v = value[:, taken, rows].sum(axis=1)[:, None]
        c = np.array([cost_arr[taken].sum()])
        k = tuple(float(a[0]) for a in key(v, c))
        if best_key is None or k < best_key:
            best_key, best_t = k, t
    assert best_t is not None
    return best_t


def starting_points(scores: np.ndarray, allowed: Sequence[int]) -> list[np.ndarray]:
    """Never exit early, exit at the first allowed exit, and the paper's mixes on these scores."""
    k_count = scores.shape[0]
    never = np.full(k_count, np.inf)
    at_once = np.full(k_count, np.inf)
    at_once[allowed[0]] = -np.inf
    starts = [never, at_once]
    sub = scores[list(allowed)]
    for mix in paper_mixes(len(allowed)):
        t = np.full(k_count, np.inf)
        for pos, v in enumerate(mix_thresholds(sub, mix)[:-1]):
            t[allowed[pos]] = v
        starts.append(t)
    return starts


def finalize(t: Sequence[float] | np.ndarray, allowed: Sequence[int], k_count: int) -> ThresholdValues:
    """Public threshold values: ``None`` for exits not allowed, the search's values otherwise.

    The last allowed exit gets ``-inf`` replaced by its own value (it takes all anyway).
    """
    out: list[float | None] = [None] * k_count
    for pos, k in enumerate(allowed):
        v = float(t[k])
        if pos == len(allowed) - 1:
            v = 0.0 if not math.isfinite(v) else v
        out[k] = v
    return tuple(out)


# --------------------------------------------------------------------------- policies


def max_drop(
    scores: np.ndarray,
    preds: np.ndarray,
    labels: np.ndarray,
    costs: Costs,
    points: float,
    allowed: Sequence[int] | None = None,
    z: float = 0.0,
    gains: bool = True,
) -> ThresholdValues:
    """Lowest expected cost whose accuracy is >= the last allowed exit's minus ``points`` (percent).

    With ``gains=False`` samples an early exit gets right and the final exit wrong do not
    offset losses: the constraint is on the share the final exit gets right and the exit
    taken wrong (an upper bound on the drop, less prone to fitting the fitting part's luck).

    With ``z > 0`` the accuracy drop must hold with a margin: ``mean(d) + z * sd(d) / sqrt(n)
    <= points / 100``, where ``d_i`` = (final exit right) - (exit taken right) is the paired
    per-sample drop, i.e. a one-sided normal upper confidence bound on the drop (``z`` = 1.28
    for 90 %). Returns thresholds over all K exits (``None`` = not allowed, ``inf`` = never fires).
    """
    scores, preds = np.asarray(scores, dtype=np.float64), np.asarray(preds)
    allowed = list(range(scores.shape[0])) if allowed is None else sorted(allowed)
    _check_inputs(scores, preds, costs, allowed)
    if not (points >= 0 and math.isfinite(points)):
        raise InputError(f"max_drop must be a finite number of points >= 0, got {points}")
    if not (z >= 0 and math.isfinite(z)):
        raise InputError(f"z must be a finite number >= 0, got {z}")
    correct = (preds == np.asarray(labels)[None, :]).astype(np.float64)
    changed = (correct != correct[allowed[-1]][None, :]).astype(np.float64)
    lost = changed * correct[allowed[-1]][None, :]
    n = scores.shape[1]
    final = correct[allowed[-1]].sum()
    bound = points / 100.0

    def key(v: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, ...]:
        if gains:
            mean = (final - v[0]) / n  # paired drop d_i in {-1, 0, 1}; d_i**2 = changed_i
            var = np.maximum(v[1] / n - mean**2, 0.0)
        else:
            mean = v[2] / n  # d_i = lost_i in {0, 1}
            var = mean * (1.0 - mean)
        upper = mean + z * np.sqrt(var / n)
        return (np.maximum(0.0, np.round(upper - bound, 12)), np.round(c, 9), -v[0])

    t = search(scores, np.stack([correct, changed, lost]), costs, allowed, key, starting_points(scores, allowed))
    return finalize(_inf_last(t, allowed), allowed, scores.shape[0])


def budget(
    scores: np.ndarray,
    preds: np.ndarray,
    labels: np.ndarray,
    costs: Costs,
    limit: float,
    allowed: Sequence[int] | None = None,
) -> ThresholdValues:
    """Best accuracy whose expected cost per sample is <= ``limit`` (same units as ``costs``).

    Raises :class:`CalibrationError` when even leaving every sample at the first allowed
    exit costs more than ``limit``.
    """
    scores, preds = np.asarray(scores, dtype=np.float64), np.asarray(preds)
    allowed = list(range(scores.shape[0])) if allowed is None else sorted(allowed)
    _check_inputs(scores, preds, costs, allowed)
    cheapest = float(np.asarray(costs, dtype=np.float64)[allowed[0]])
    if not limit >= cheapest:
        raise CalibrationError(
            f"budget {limit:g} is below the cost of the earliest allowed exit ({cheapest:.4g}): no thresholds fit"
        )
    correct = (preds == np.asarray(labels)[None, :]).astype(np.float64)
    total = limit * scores.shape[1] + 1e-9

    def key(v: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, ...]:
        return (np.maximum(0.0, c - total), -v[0], np.round(c, 9))

    t = search(scores, correct[None], costs, allowed, key, starting_points(scores, allowed))
    return finalize(_inf_last(t, allowed), allowed, scores.shape[0])


def _inf_last(t: np.ndarray, allowed: Sequence[int]) -> np.ndarray:
    t = t.copy()
    t[allowed[-1]] = 0.0
    return t


def single_exit(k: int, k_count: int) -> ThresholdValues:
    """Thresholds that send every sample to exit ``k`` (0-based)."""
    return tuple(0.0 if j == k else None for j in range(k_count))


def mix_evaluate(
    scores: np.ndarray, preds: np.ndarray, labels: np.ndarray, thresholds: Sequence[float], flops: Sequence[float]
) -> tuple[float, float, tuple[float | None, ...]]:
    """The official figures of thresholds on a set: (accuracy %, expected FLOPs, accuracy per exit)."""
    point = evaluate(scores, preds, labels, thresholds, flops)
    assert point.accuracy is not None
    return 100.0 * point.accuracy, point.cost, point.exit_accuracy
