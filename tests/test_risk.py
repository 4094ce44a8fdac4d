"""Risk control: p-values, fixed-sequence testing, and the guarantee holding over random splits."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from edgeperceiver.calibration.risk import Bound, RiskLoss, losses, p_values, risk_control, tau_grid, threshold_of
from edgeperceiver.errors import CalibrationError, InputError
from edgeperceiver.runtime.criteria import scores as criterion_scores
from edgeperceiver.types import Criterion


@functools.cache
def population(
    n: int, seed: int, k: int = 4, classes: int = 10, criterion: Criterion = Criterion.MAX_SOFTMAX
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic exits with a known structure: each sample has an ease; deeper exits see it better."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    ease = rng.gamma(2.0, 1.0, n)
    scores, preds = [], []
    for j in range(k):
        z = rng.normal(size=(n, classes))
        z[np.arange(n), y] += (1 + j) * 0.8 * ease
        z *= 1 + 0.3 * j
        scores.append(criterion_scores(z, criterion))
        preds.append(z.argmax(1))
    return np.array(scores), np.array(preds), y


def test_binomial_p_values_are_exact() -> None:
    # P(Binomial(20, 0.1) <= 0) = 0.9**20; <= 2 by hand
    pv = p_values(np.array([0, 2, 20]), 20, 0.1)
    assert pv[0] == pytest.approx(0.9**20)
    by_hand = sum(math.comb(20, i) * 0.1**i * 0.9 ** (20 - i) for i in range(3))
    assert pv[1] == pytest.approx(by_hand)
    assert pv[2] == pytest.approx(1.0)
    hb = p_values(np.array([0, 2, 20]), 20, 0.1, Bound.HOEFFDING_BENTKUS)
    assert np.all(hb >= pv - 1e-12)  # HB is the more conservative bound here
    assert hb[0] == pytest.approx(min(math.exp(-20 * math.log(1 / 0.9)), math.e * 0.9**20))


def test_grid_runs_from_conservative_to_aggressive() -> None:
    g = tau_grid(Criterion.MAX_SOFTMAX, 10)
    assert g[0] == 0 and np.all(np.diff(g) > 0) and g[-1] == pytest.approx(1.0)
    assert tau_grid(Criterion.ENTROPY, 10)[-1] == pytest.approx(math.log(10))
    assert threshold_of(0.1, Criterion.MAX_SOFTMAX) == pytest.approx(0.9)
    assert threshold_of(0.1, Criterion.ENTROPY) == pytest.approx(-0.1)


@pytest.mark.parametrize("loss", list(RiskLoss))
@pytest.mark.parametrize(
    "bound", [Bound.BINOMIAL, pytest.param(Bound.HOEFFDING_BENTKUS, marks=pytest.mark.slow)]
)
def test_guarantee_holds_over_random_splits(loss: RiskLoss, bound: Bound) -> None:
    """Over many fitting sets drawn from a population, P(population risk > eps) <= delta."""
    scores, preds, y = population(20_000, seed=1)
    eps, delta, n, trials = 0.05, 0.1, 800, 120
    grid = [math.inf] + [threshold_of(float(t), Criterion.MAX_SOFTMAX) for t in tau_grid(Criterion.MAX_SOFTMAX, 10)]
    true_risk = dict(zip(grid, losses(scores, preds, y, [0, 1, 2, 3], grid, loss).mean(axis=1), strict=True))
    rng = np.random.default_rng(0)
    violations = naive_violations = 0
    exits_early = 0.0
    for _ in range(trials):
        idx = rng.integers(0, len(y), n)
        fit = risk_control(
            scores[:, idx], preds[:, idx], y[idx], eps=eps, delta=delta, criterion=Criterion.MAX_SOFTMAX,
            num_classes=10, loss=loss, bound=bound,
        )
        t = fit.thresholds[0]
        assert t is not None and all(v == t for v in fit.thresholds[:3])
        violations += true_risk[t] > eps
        exits_early += float((scores[0] >= t).mean())
        # the naive choice (most aggressive level whose *empirical* risk is <= eps) overfits
        emp = losses(scores[:, idx], preds[:, idx], y[idx], [0, 1, 2, 3], grid, loss).mean(axis=1)
        ok = np.flatnonzero(emp <= eps)
        naive_violations += true_risk[grid[int(ok[-1])]] > eps
    rate, naive = violations / trials, naive_violations / trials
    print(f"{loss.value}/{bound.value}: violation rate {rate:.3f} (naive {naive:.3f})")
    assert violations / trials <= delta
    assert naive_violations / trials > 2 * delta  # the test can fail: the naive rule does
    assert exits_early / trials > 0.05  # and it is not vacuous: samples do leave at exit 1


def test_too_few_samples_certify_nothing() -> None:
    scores, preds, y = population(30, seed=2)
    fit = risk_control(scores, preds, y, eps=0.01, delta=0.05, criterion=Criterion.MAX_SOFTMAX, num_classes=10)
    assert fit.certified == 0 and fit.tau is None
    assert fit.thresholds[:3] == (math.inf,) * 3
    assert fit.min_samples == math.ceil(math.log(0.05) / math.log(0.99))


def test_disagreement_needs_no_labels_accuracy_does() -> None:
    scores, preds, _ = population(500, seed=3, criterion=Criterion.ENTROPY)
    fit = risk_control(scores, preds, None, eps=0.1, delta=0.1, criterion=Criterion.ENTROPY, num_classes=10)
    assert fit.certified > 1 and fit.empirical_risk <= 0.1
    with pytest.raises(CalibrationError, match="labelled"):
        risk_control(scores, preds, None, eps=0.1, delta=0.1, criterion=Criterion.MAX_SOFTMAX, num_classes=10,
                     loss=RiskLoss.ACCURACY)
    with pytest.raises(InputError):
        risk_control(scores, preds, None, eps=1.5, delta=0.1, criterion=Criterion.MAX_SOFTMAX, num_classes=10)


def test_allowed_exits_share_one_threshold_and_others_are_off() -> None:
    scores, preds, y = population(2000, seed=4, criterion=Criterion.MARGIN)
    fit = risk_control(scores, preds, y, eps=0.05, delta=0.1, criterion=Criterion.MARGIN, num_classes=10,
                       allowed=[1, 3])
    assert fit.thresholds[0] is None and fit.thresholds[2] is None
    assert fit.thresholds[1] is not None and fit.thresholds[3] == 0.0
