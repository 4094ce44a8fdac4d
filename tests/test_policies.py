"""Threshold policies on exit outputs: exit semantics, max_drop and budget searches vs brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeperceiver.calibration.paper import mix_thresholds, paper_mixes
from edgeperceiver.calibration.policies import budget, evaluate, exit_taken, max_drop
from edgeperceiver.errors import CalibrationError, InputError


def problem(n: int, seed: int, k: int = 3, classes: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Max-softmax scores, predictions and labels of K exits that get better with depth."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    scores, preds = [], []
    for j in range(k):
        z = rng.normal(size=(n, classes))
        z[np.arange(n), y] += rng.gamma(2.0, 0.5 + 0.5 * j, n)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        scores.append(p.max(1))
        preds.append(z.argmax(1))
    return np.array(scores), np.array(preds), y


def _candidates(s: np.ndarray) -> np.ndarray:
    u = np.unique(s)
    return np.r_[np.inf, (u[1:] + u[:-1]) / 2, u[0]]


# ----------------------------------------------------------------------------- semantics


def test_first_enabled_exit_reaching_its_threshold_takes_the_sample() -> None:
    scores = np.array([[0.9, 0.5, 0.5, 0.2], [0.1, 0.8, 0.5, 0.3], [0.0, 0.0, 0.0, 0.0]])
    assert exit_taken(scores, (0.9, 0.8, 0.0)).tolist() == [0, 1, 2, 2]
    # off exits never take anyone; the last enabled one takes everyone left whatever its value
    assert exit_taken(scores, (None, 0.8, 123.0)).tolist() == [2, 1, 2, 2]
    assert exit_taken(scores, (0.5, None, None)).tolist() == [0, 0, 0, 0]
    assert exit_taken(scores, (0.6, 0.8, None)).tolist() == [0, 1, 1, 1]
    with pytest.raises(InputError, match="at least one exit"):
        exit_taken(scores, (None, None, None))


def test_evaluate_counts_share_accuracy_cost_and_agreement() -> None:
    scores = np.array([[0.9, 0.2, 0.2, 0.2], [0.0, 0.9, 0.1, 0.1], [0.0] * 4])
    preds = np.array([[1, 0, 0, 0], [0, 2, 0, 0], [1, 2, 3, 0]])
    labels = np.array([1, 0, 3, 1])
    p = evaluate(scores, preds, labels, (0.5, 0.5, 0.0), (1.0, 2.0, 4.0))
    assert p.share == (0.25, 0.25, 0.5)
    assert p.accuracy == 0.5  # sample 0 right at exit 1, sample 1 wrong at exit 2, 2 right, 3 wrong
    assert p.exit_accuracy == (1.0, 0.0, 0.5)
    assert p.cost == pytest.approx((1 + 2 + 4 + 4) / 4)
    assert p.agreement == 1.0  # exit 1 and 2 agree with exit 3 on samples 0 and 1
    unlabeled = evaluate(scores, preds, None, (0.5, 0.5, 0.0), (1.0, 2.0, 4.0))
    assert unlabeled.accuracy is None and unlabeled.exit_accuracy == (None, None, None)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 40), st.integers(2, 4), st.integers(0, 2**31 - 1),
    st.lists(st.one_of(st.none(), st.floats(0, 1)), min_size=4, max_size=4),
)
def test_evaluate_invariants(n: int, k: int, seed: int, raw: list[float | None]) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.random((k, n))
    preds = rng.integers(0, 3, (k, n))
    th = tuple(raw[:k])
    if all(t is None for t in th):
        th = (*th[:-1], 0.0)
    costs = np.cumsum(rng.random(k) + 0.1)
    p = evaluate(scores, preds, rng.integers(0, 3, n), th, costs)
    assert sum(p.share) == pytest.approx(1.0)
    assert all(p.share[j] == 0 for j, t in enumerate(th) if t is None)
    assert min(costs) - 1e-12 <= p.cost <= max(costs) + 1e-12
    taken = exit_taken(scores, th)
    for i in range(n):  # nobody passed an enabled exit they could have taken
        for j in range(taken[i]):
            assert th[j] is None or scores[j, i] < th[j]


# ----------------------------------------------------------------------------- max_drop


@pytest.mark.parametrize("seed", range(5))
def test_max_drop_meets_the_bound_and_matches_brute_force(seed: int) -> None:
    scores, preds, y = problem(60, seed)
    costs = (1.0, 2.0, 3.0)
    th = max_drop(scores, preds, y, costs, points=2.0)
    got = evaluate(scores, preds, y, th, costs)
    final = float((preds[-1] == y).mean())
    assert got.accuracy is not None and got.accuracy >= final - 0.02 - 1e-12
    best = math.inf
    for a in _candidates(scores[0]):
        for b in _candidates(scores[1]):
            q = evaluate(scores, preds, y, (a, b, 0.0), costs)
            assert q.accuracy is not None
            if q.accuracy >= final - 0.02 - 1e-12:
                best = min(best, q.cost)
    assert got.cost <= best * 1.01 + 1e-12  # coordinate descent: optimal or within 1% here
    assert got.cost < 3.0  # it does exit early


def test_max_drop_beats_every_feasible_paper_mix() -> None:
    scores, preds, y = problem(800, 11, k=4)
    costs = (0.4, 0.85, 0.97, 1.0)
    final = float((preds[-1] == y).mean())
    th = max_drop(scores, preds, y, costs, points=1.0)
    got = evaluate(scores, preds, y, th, costs)
    feasible = []
    for mix in paper_mixes(4):
        p = evaluate(scores, preds, y, mix_thresholds(scores, mix), costs)
        assert p.accuracy is not None
        if p.accuracy >= final - 0.01:
            feasible.append(p.cost)
    assert feasible and got.cost <= min(feasible) + 1e-12
    assert got.cost < min(feasible) - 0.01  # per-exit search finds strictly cheaper points than the mixes


def test_max_drop_zero_points_and_margin() -> None:
    scores, preds, y = problem(600, 3)
    costs = (1.0, 2.0, 3.0)
    final = float((preds[-1] == y).mean())
    plain = evaluate(scores, preds, y, max_drop(scores, preds, y, costs, 1.0), costs)
    careful_th = max_drop(scores, preds, y, costs, 1.0, z=1.645)
    careful = evaluate(scores, preds, y, careful_th, costs)
    assert careful.cost >= plain.cost
    # with the margin the drop's upper confidence bound holds, not just the estimate
    taken = exit_taken(scores, careful_th)
    d = (preds[-1] == y).astype(float) - (preds[taken, np.arange(len(y))] == y)
    assert d.mean() + 1.645 * d.std() / np.sqrt(len(d)) <= 0.01 + 1e-12
    zero = evaluate(scores, preds, y, max_drop(scores, preds, y, costs, 0.0), costs)
    assert zero.accuracy is not None and zero.accuracy >= final - 1e-12


def test_allowed_exits_are_respected() -> None:
    scores, preds, y = problem(300, 5, k=4)
    costs = (1.0, 2.0, 3.0, 4.0)
    th = max_drop(scores, preds, y, costs, 3.0, allowed=[0, 2])
    assert th[1] is None and th[3] is None and th[0] is not None and th[2] is not None
    p = evaluate(scores, preds, y, th, costs)
    assert p.share[1] == 0 and p.share[3] == 0
    final = float((preds[2] == y).mean())  # the last allowed exit is the reference
    assert p.accuracy is not None and p.accuracy >= final - 0.03 - 1e-12


# ----------------------------------------------------------------------------- budget


@pytest.mark.parametrize("limit", [1.3, 1.8, 2.5])
def test_budget_fits_and_matches_brute_force(limit: float) -> None:
    scores, preds, y = problem(60, 7)
    costs = (1.0, 2.0, 3.0)
    th = budget(scores, preds, y, costs, limit)
    got = evaluate(scores, preds, y, th, costs)
    assert got.cost <= limit + 1e-12
    best = 0.0
    for a in _candidates(scores[0]):
        for b in _candidates(scores[1]):
            q = evaluate(scores, preds, y, (a, b, 0.0), costs)
            assert q.accuracy is not None
            if q.cost <= limit + 1e-12:
                best = max(best, q.accuracy)
    assert got.accuracy is not None and got.accuracy >= best - 1 / 60 - 1e-12  # optimal or one sample off


def test_budget_below_the_first_exit_is_infeasible() -> None:
    scores, preds, y = problem(50, 1)
    with pytest.raises(CalibrationError, match="below the cost of the earliest"):
        budget(scores, preds, y, (1.0, 2.0, 3.0), 0.5)
    with pytest.raises(InputError, match="exit costs"):
        budget(scores, preds, y, (1.0, 2.0), 2.0)


def test_max_drop_without_gains_bounds_the_losses() -> None:
    scores, preds, y = problem(600, 8)
    costs = (1.0, 2.0, 3.0)
    th = max_drop(scores, preds, y, costs, 1.0, gains=False)
    taken = exit_taken(scores, th)
    right_final = preds[-1] == y
    right_taken = preds[taken, np.arange(len(y))] == y
    assert np.mean(right_final & ~right_taken) <= 0.01 + 1e-12  # losses alone, not net of gains
    net = evaluate(scores, preds, y, max_drop(scores, preds, y, costs, 1.0, gains=True), costs)
    assert evaluate(scores, preds, y, th, costs).cost >= net.cost  # the stricter constraint costs more
