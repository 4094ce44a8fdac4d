"""Exit criteria: a confidence score per sample from exit logits (numpy only).

Every score is computed row by row in float64, each row copied into its own fresh array
first, so a sample's score (and hence its exit) is bit-for-bit the same whichever other
samples share its batch (vectorised math kernels may treat an element differently by its
position: SIMD body vs scalar tail, alignment peeling). Higher means
more confident; a sample leaves at exit k when ``score >= threshold[k]``.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..types import Criterion


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
    crit = Criterion(criterion)
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
    crit = Criterion(criterion)
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
