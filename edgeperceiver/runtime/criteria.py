"""Exit criteria: a confidence score per sample from exit logits (numpy only).

Every score is computed row by row in float64, each row copied into its own fresh array
first, so a sample's score (and hence its exit) is bit-for-bit the same whichever other
samples share its batch (vectorised math kernels may treat an element differently by its
position: SIMD body vs scalar tail, alignment peeling). Higher means
more confident; a sample leaves at exit k when ``score >= threshold[k]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..bundle import Thresholds
from ..errors import InputError
from ..types import Criterion

#: thresholds as a user may give them: a ``Thresholds`` or one value (or ``None``) per exit
ThresholdsLike = Thresholds | Sequence[float | None]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, stable (the row maximum is subtracted first)."""
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise InputError(f"exit logits must be (N, classes), got shape {logits.shape}")
    out = np.empty(logits.shape, dtype=np.float64)
    for i in range(logits.shape[0]):
        out[i] = _softmax_row(np.array(logits[i], dtype=np.float64, copy=True))
    return out


def _softmax_row(z: np.ndarray) -> np.ndarray:
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def scores(logits: np.ndarray, criterion: Criterion | str = Criterion.MAX_SOFTMAX) -> np.ndarray:
    """Per-sample confidence score (N,) float64 under ``criterion``.

    - ``max_softmax``: the top-1 softmax probability (the paper's criterion);
    - ``entropy``: minus the softmax entropy in nats (0 = certain);
    - ``margin``: top-1 minus top-2 softmax probability.
    """
    crit = criterion_of(criterion)
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise InputError(f"exit logits must be (N, classes), got shape {logits.shape}")
    out = np.empty(logits.shape[0], dtype=np.float64)
    for i in range(logits.shape[0]):
        p = _softmax_row(np.array(logits[i], dtype=np.float64, copy=True))
        out[i] = _score_row(p, crit)
    return out


def evaluate(
    logits: np.ndarray, criterion: Criterion | str = Criterion.MAX_SOFTMAX
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores float64, labels int64, top-1 probability float32) per row, one softmax per row.

    The scores are bit-for-bit those of :func:`scores`.
    """
    crit = criterion_of(criterion)
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise InputError(f"exit logits must be (N, classes), got shape {logits.shape}")
    n = logits.shape[0]
    out, conf = np.empty(n, np.float64), np.empty(n, np.float32)
    labels = logits.argmax(axis=1).astype(np.int64)
    for i in range(n):
        p = _softmax_row(np.array(logits[i], dtype=np.float64, copy=True))
        out[i] = _score_row(p, crit)
        conf[i] = p[labels[i]]
    return out, labels, conf


def _score_row(p: np.ndarray, crit: Criterion) -> float:
    if crit is Criterion.MAX_SOFTMAX:
        return float(p.max())
    if crit is Criterion.ENTROPY:
        nz = p[p > 0]
        return float(np.sum(nz * np.log(nz)))
    if p.size < 2:
        return 1.0
    top2 = np.partition(p, p.size - 2)[-2:]
    return float(top2[1] - top2[0])


def parse_thresholds(text: str) -> tuple[float | None, ...]:
    """``"0.9,off,1.1,0"`` -> one threshold per exit; ``off``/``none``/``-`` turn an exit off."""
    out: list[float | None] = []
    for raw in text.split(","):
        token = raw.strip().lower()
        if token in ("off", "none", "-"):
            out.append(None)
            continue
        try:
            out.append(float(token))
        except ValueError:
            raise InputError(f"threshold {raw.strip()!r} is neither a number nor 'off'") from None
    return tuple(out)


def resolve_thresholds(
    thresholds: ThresholdsLike | None,
    criterion: Criterion | str | None,
    default: Thresholds | None,
    num_exits: int,
) -> Thresholds | None:
    """The thresholds to use: ``thresholds`` if given (with ``criterion``), else ``default``.

    A plain sequence of values takes ``criterion``, else the default's criterion, else
    max-softmax. Values must be one per exit, each a number (NaN refused) or ``None``.
    """
    crit = None if criterion is None else criterion_of(criterion)
    if thresholds is None:
        if default is not None and crit is not None and crit is not default.criterion:
            raise InputError(
                f"the bundle's thresholds are for criterion {default.criterion.value!r}; "
                f"pass thresholds for {crit.value!r} as well"
            )
        th = default
    elif isinstance(thresholds, Thresholds):
        if crit is not None and crit is not thresholds.criterion:
            raise InputError(
                f"thresholds are for criterion {thresholds.criterion.value!r}, not {crit.value!r}"
            )
        th = thresholds
    else:
        if isinstance(thresholds, (str, bytes)):
            raise InputError(f"thresholds must be a sequence of numbers, not {thresholds!r}")
        if crit is None:
            crit = default.criterion if default is not None else Criterion.MAX_SOFTMAX
        values: list[float | None] = []
        for v in thresholds:
            if v is None:
                values.append(None)
                continue
            try:
                values.append(float(v))
            except (TypeError, ValueError):
                raise InputError(f"threshold {v!r} is not a number") from None
        th = Thresholds(crit, tuple(values), "override")
    if th is None:
        return None
    if len(th.values) != num_exits:
        raise InputError(f"got {len(th.values)} thresholds for a model with {num_exits} exits")
    if any(v is not None and v != v for v in th.values):
        raise InputError(f"thresholds contain NaN: {th.values}")
    return th


def criterion_of(c: Criterion | str) -> Criterion:
    """``c`` as a :class:`Criterion`, or an :class:`InputError` naming the choices."""
    try:
        return Criterion(c)
    except ValueError:
        have = ", ".join(x.value for x in Criterion)
        raise InputError(f"unknown exit criterion {c!r} (use one of: {have})") from None
