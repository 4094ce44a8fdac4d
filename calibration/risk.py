"""Risk control: thresholds with a finite-sample guarantee (Learn then Test, fixed sequence).

The goal ``Risk(eps, delta)`` asks for thresholds such that, with probability at least
``1 - delta`` over the held-out samples used to choose them, the early-exit model's risk
on new data from the same distribution is at most ``eps``. The risk is the expected
per-sample loss against the *final* (last enabled) exit, as in "Fast yet Safe:
Early-Exiting with Risk Control" (Jazbec et al., 2024):

* ``disagreement``: 1 when the exit taken predicts another class than the final exit
  (needs no labels);
* ``accuracy``: 1 when the final exit is right and the exit taken is wrong (a bound on
  the accuracy lost; needs labels).

Method (Angelopoulos et al., "Learn then Test", 2021): a 1-D family of thresholds fixed
before looking at the data, ordered from conservative (nothing leaves early, risk 0) to
aggressive: every enabled exit but the last uses the same threshold on the uncertainty
``u`` (1 - max-softmax, 1 - margin, or the entropy), a sample leaves when ``u <= tau``,
for ``tau`` = 0 and then a geometric grid from 1e-6 to the largest possible ``u``. For
each ``tau`` in that order the null hypothesis "risk(tau) > eps" is tested with a
p-value from the losses on the ``n`` fitting samples, and testing stops at the first
``tau`` not rejected (fixed-sequence testing controls the family-wise error at ``delta``
without any monotonicity assumption). The most aggressive rejected ``tau`` is returned.

P-values (losses are 0/1, so the loss count is Binomial(n, risk)):

* ``binomial`` (default): exact, ``P(Binomial(n, eps) <= observed count)``;
* ``hoeffding_bentkus``: ``min(exp(-n h(min(R, eps), eps)), e * P(Binomial(n, eps) <= ceil(n R)))``
  with ``h(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b))`` (Bates et al., 2021), valid for
  any loss in [0, 1] and slightly more conservative here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

from edgeperceiver.errors import CalibrationError, InputError
from edgeperceiver.types import Criterion

GRID_SIZE = 400
TAU_MIN = 1e-6


class RiskLoss(str, Enum):
    """What counts as a loss against the final exit."""

    DISAGREEMENT = "disagreement"
    ACCURACY = "accuracy"


class Bound(str, Enum):
    """How a p-value for "risk > eps" is computed."""

    BINOMIAL = "binomial"
    HOEFFDING_BENTKUS = "hoeffding_bentkus"


@dataclass(frozen=True)
class RiskFit:
    """The outcome of a risk-control fit on ``n`` samples.

    ``tau`` is the certified uncertainty level (``None``: none certified, nothing leaves
    early); ``empirical_risk`` the loss share at that level on the fitting samples;
    ``p_value`` its p-value; ``certified`` how many grid levels were rejected in sequence.
    """

    thresholds: tuple[float | None, ...]
    tau: float | None
    empirical_risk: float
    p_value: float
    certified: int
    n: int
    min_samples: int  #: fewest samples with which even "nothing leaves early" is certified


def tau_grid(criterion: Criterion, num_classes: int, size: int = GRID_SIZE) -> np.ndarray:
    """The data-independent family, conservative first: 0, then geometric up to the largest ``u``."""
    top = math.log(num_classes) if criterion is Criterion.ENTROPY else 1.0
    top = max(top, TAU_MIN * 10)
    return np.r_[0.0, np.geomspace(TAU_MIN, top, size - 1)]


def threshold_of(tau: float, criterion: Criterion) -> float:
    """The score threshold equivalent to "uncertainty <= tau"."""
    if criterion is Criterion.ENTROPY:
        return -tau  # score = -entropy
    return 1.0 - tau


def _log_binom_cdf_table(n: int, p: float) -> np.ndarray:
    """log P(Binomial(n, p) <= k) for k = 0..n."""
    k = np.arange(n + 1, dtype=np.float64)
    lgam = np.vectorize(math.lgamma, otypes=[np.float64])
    logpmf = lgam(n + 1.0) - lgam(k + 1.0) - lgam(n - k + 1.0) + k * math.log(p) + (n - k) * math.log1p(-p)
    return np.logaddexp.accumulate(logpmf)


def p_values(loss_counts: np.ndarray, n: int, eps: float, bound: Bound = Bound.BINOMIAL) -> np.ndarray:
    """P-values of "risk > eps" for each observed loss count (0/1 losses over ``n`` samples)."""
    counts = np.asarray(loss_counts, dtype=np.int64)
    table = _log_binom_cdf_table(n, eps)
    binom = np.exp(np.minimum(table[counts], 0.0))
    if bound is Bound.BINOMIAL:
        return binom
    r = np.minimum(counts / n, eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(r > 0, r * np.log(r / eps), 0.0)
        b = np.where(r < 1, (1 - r) * np.log((1 - r) / (1 - eps)), 0.0)
    hoeffding = np.exp(-n * (a + b))
    return np.minimum(np.minimum(hoeffding, math.e * binom), 1.0)


def losses(
    scores: np.ndarray,
    preds: np.ndarray,
    labels: np.ndarray | None,
    allowed: Sequence[int],
    thresholds: Sequence[float],
    loss: RiskLoss,
) -> np.ndarray:
    """(L, N) 0/1 losses for L candidate shared thresholds (``+inf`` = nothing leaves early)."""
    final = allowed[-1]
    n = scores.shape[1]
    rows = np.arange(n)
    if loss is RiskLoss.ACCURACY:
        if labels is None:
            raise CalibrationError("the 'accuracy' risk needs labelled held-out data (use 'disagreement')")
        wrong = preds != np.asarray(labels)[None, :]
        per_exit = wrong & ~wrong[final][None, :]
    else:
        per_exit = preds != preds[final][None, :]
    # with one shared threshold t, a sample leaves at the first early exit whose score >= t, i.e. at
    # position #{j : running max of its scores up to early exit j < t} (the running max only grows)
    early = list(allowed[:-1])
    order = np.array([*early, final], dtype=np.int64)
    running = np.maximum.accumulate(scores[early], axis=0) if early else np.zeros((0, n))  # (E, N)
    t = np.asarray(thresholds, dtype=np.float64)
    out = np.zeros((len(t), n), dtype=bool)
    for start in range(0, len(t), 64):  # chunks bound the (L, E, N) temporary
        chunk = t[start : start + 64]
        pos = (running[None, :, :] < chunk[:, None, None]).sum(axis=1)
        out[start : start + 64] = per_exit[order[pos], rows[None, :]]
    return out


def risk_control(
    scores: np.ndarray,
    preds: np.ndarray,
    labels: np.ndarray | None,
    *,
    eps: float,
    delta: float,
    criterion: Criterion,
    num_classes: int,
    allowed: Sequence[int] | None = None,
    loss: RiskLoss = RiskLoss.DISAGREEMENT,
    bound: Bound = Bound.BINOMIAL,
) -> RiskFit:
    """Thresholds whose risk against the final exit is <= ``eps`` with probability >= 1 - ``delta``."""
    if not 0.0 < eps < 1.0:
        raise InputError(f"risk eps must be in (0, 1), got {eps}")
    if not 0.0 < delta < 1.0:
        raise InputError(f"risk delta must be in (0, 1), got {delta}")
    scores = np.asarray(scores, dtype=np.float64)
    preds = np.asarray(preds)
    k_count, n = scores.shape
    allowed = list(range(k_count)) if allowed is None else sorted(allowed)
    if n == 0:
        raise CalibrationError("no samples to fit risk-controlling thresholds on")
    taus = tau_grid(criterion, num_classes)
    # tau = 0 still lets exactly-certain samples (u == 0) leave; +inf first = nothing leaves early
    candidates = [math.inf] + [threshold_of(float(t), criterion) for t in taus]
    counts = losses(scores, preds, labels, allowed, candidates, loss).sum(axis=1)
    pv = p_values(counts, n, eps, bound)
    rejected = pv <= delta
    certified = int(np.argmin(rejected)) if not rejected.all() else len(rejected)
    min_samples = math.ceil(math.log(delta) / math.log1p(-eps))
    if bound is Bound.HOEFFDING_BENTKUS:
        min_samples = math.ceil(math.log(delta / math.e) / math.log1p(-eps))
    thresholds: list[float | None] = [None] * k_count
    if certified == 0:
        # not even "nothing leaves early" is certified: too few samples for eps/delta
        for k in allowed[:-1]:
            thresholds[k] = math.inf
        thresholds[allowed[-1]] = 0.0
        return RiskFit(tuple(thresholds), None, float(counts[0] / n), float(pv[0]), 0, n, min_samples)
    best = certified - 1
    t = candidates[best]
    for k in allowed[:-1]:
        thresholds[k] = t
    thresholds[allowed[-1]] = 0.0
    tau = None if best == 0 else float(taus[best - 1])
    return RiskFit(tuple(thresholds), tau, float(counts[best] / n), float(pv[best]), certified, n, min_samples)
