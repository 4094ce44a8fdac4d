"""The Dynamic Perceiver paper's own budgeted-batch protocol (its ``adaptive_inference.py``).

The official evaluation does not search thresholds for a goal: it fixes *exit
proportions* p_1..p_K (the share of samples meant to leave at each exit) and derives the
thresholds from the validation set's max-softmax confidences, exit by exit:

1. at exit k (all but the last), walk the samples in decreasing confidence, skipping
   those an earlier exit already let go; the confidence of the ``floor(n * p_k)``-th such
   sample is exit k's threshold (no threshold, i.e. never fire, when that count is 0 or
   not reached);
2. every sample whose exit-k confidence is ``>=`` that threshold counts as gone (ties can
   let a few more than planned leave);
3. the last exit takes everything left.

Then a sample leaves at the first exit whose confidence is ``>=`` its threshold, and the
protocol reports accuracy (percent) and expected FLOPs on the test set. The sweep uses 33
mixes from a geometric family: for ratio r, ``p_k ∝ r**k`` (k = 1..4), then exits 1..3 are
scaled by 0.85, 1, 0.5 in turn, each time renormalising the later exits to fill the rest;
r runs over 4/20 .. 20/20 then 20/20 .. 20/5 (the official arithmetic is float32, and so
is :func:`paper_mixes`, so floors of ``n * p_k`` match).

This module is an independent re-implementation from that description.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from edgeperceiver.errors import InputError

#: the official per-exit scaling for Dyn-Perceiver's 4 exits (y_early3, y_att, y_cnn, y_merge)
OFFICIAL_SCALE = (0.85, 1.0, 0.5, 1.0)
#: how many budget mixes the official sweep evaluates
NUM_MIXES = 33


def _ratios() -> np.ndarray:
    r = np.zeros(34, dtype=np.float32)
    for i in range(17):
        r[i] = (i + 4) / 20
        r[33 - i] = 20 / (i + 4)
    return r


#: The official 33 mixes for 4 exits, bit for bit as the paper's code computes them in
#: PyTorch float32 (hex floats). :func:`geometric_mixes` computes the same family in numpy;
#: PyTorch's vectorised float32 exp/log differ from numpy's by an ulp or two in some entries, and
#: a few ulps are enough to move ``floor(n * p)`` for some n, so the protocol uses this table
#: (``tests/test_paper_protocol.py`` recomputes it with the official arithmetic).
_OFFICIAL_MIXES_HEX: tuple[tuple[str, str, str, str], ...] = (
    ('0x1.5cb7cc0000000p-1', '0x1.075bae0000000p-2', '0x1.a55f760000000p-6', '0x1.26f6000000000p-5'),
    ('0x1.47ae160000000p-1', '0x1.18de580000000p-2', '0x1.18de5a0000000p-5', '0x1.a54d800000000p-5'),
    ('0x1.3320b20000000p-1', '0x1.26c7c00000000p-2', '0x1.61bc7e0000000p-5', '0x1.1afd300000000p-4'),
    ('0x1.1f308e0000000p-1', '0x1.3158580000000p-2', '0x1.ab7bb20000000p-5', '0x1.6b5c500000000p-4'),
    ('0x1.0bfaf60000000p-1', '0x1.38d8820000000p-2', '0x1.f48d9c0000000p-5', '0x1.c27f700000000p-4'),
    ('0x1.f3309e0000000p-2', '0x1.3d95e40000000p-2', '0x1.1dd3b80000000p-4', '0x1.0f89200000000p-3'),
    ('0x1.d036a00000000p-2', '0x1.3fe0ca0000000p-2', '0x1.3fe0ca0000000p-4', '0x1.3fe0c80000000p-3'),
    ('0x1.af21980000000p-2', '0x1.4009820000000p-2', '0x1.600a760000000p-4', '0x1.71a4980000000p-3'),
    ('0x1.8ffffe0000000p-2', '0x1.3e5e080000000p-2', '0x1.7e0a760000000p-4', '0x1.a43eb80000000p-3'),
    ('0x1.72d6300000000p-2', '0x1.3b28420000000p-2', '0x1.99b4540000000p-4', '0x1.d728f80000000p-3'),
    ('0x1.579fca0000000p-2', '0x1.36ac860000000p-2', '0x1.b2f1840000000p-4', '0x1.04f7500000000p-2'),
    ('0x1.3e51560000000p-2', '0x1.3128ec0000000p-2', '0x1.c9bd6e0000000p-4', '0x1.1e16640000000p-2'),
    ('0x1.26d9d80000000p-2', '0x1.2ad4e00000000p-2', '0x1.de216a0000000p-4', '0x1.36c8ec0000000p-2'),
    ('0x1.1124440000000p-2', '0x1.23e0fc0000000p-2', '0x1.f031ac0000000p-4', '0x1.4eee540000000p-2'),
    ('0x1.fa31960000000p-3', '0x1.1c77520000000p-2', '0x1.0004fe0000000p-3', '0x1.666d640000000p-2'),
    ('0x1.d53bf20000000p-3', '0x1.14bbd60000000p-2', '0x1.06e5a20000000p-3', '0x1.7d33600000000p-2'),
    ('0x1.b333340000000p-3', '0x1.0cccce0000000p-2', '0x1.0ccccc0000000p-3', '0x1.9333300000000p-2'),
    ('0x1.b333340000000p-3', '0x1.0cccce0000000p-2', '0x1.0ccccc0000000p-3', '0x1.9333300000000p-2'),
    ('0x1.924f420000000p-3', '0x1.0456dc0000000p-2', '0x1.120a940000000p-3', '0x1.a97c380000000p-2'),
    ('0x1.7103e40000000p-3', '0x1.f5d6380000000p-3', '0x1.16cc560000000p-3', '0x1.c12cc80000000p-2'),
    ('0x1.4f7c780000000p-3', '0x1.e0f7e60000000p-3', '0x1.1aec300000000p-3', '0x1.da4fb80000000p-2'),
    ('0x1.2ded6a0000000p-3', '0x1.c9fc7e0000000p-3', '0x1.1e3dca0000000p-3', '0x1.f4ec2a0000000p-2'),
    ('0x1.0c94a00000000p-3', '0x1.b0d4f00000000p-3', '0x1.208df20000000p-3', '0x1.0882200000000p-1'),
    ('0x1.d773cc0000000p-4', '0x1.957c660000000p-3', '0x1.21a1fe0000000p-3', '0x1.1749ee0000000p-1'),
    ('0x1.975d320000000p-4', '0x1.77fb960000000p-3', '0x1.2137b20000000p-3', '0x1.26c7880000000p-1'),
    ('0x1.59999a0000000p-4', '0x1.586caa0000000p-3', '0x1.1f053a0000000p-3', '0x1.36f0540000000p-1'),
    ('0x1.1eeaf40000000p-4', '0x1.36ff760000000p-3', '0x1.1ab9b60000000p-3', '0x1.47b4560000000p-1'),
    ('0x1.d036a00000000p-5', '0x1.13fe0c0000000p-3', '0x1.13fe0c0000000p-3', '0x1.58fd900000000p-1'),
    ('0x1.6be8ce0000000p-5', '0x1.dfa2240000000p-4', '0x1.0a76880000000p-3', '0x1.6aaf8c0000000p-1'),
    ('0x1.12696e0000000p-5', '0x1.9607ba0000000p-4', '0x1.fb89a80000000p-4', '0x1.7ca73c0000000p-1'),
    ('0x1.8a06340000000p-6', '0x1.4c8f160000000p-4', '0x1.db158c0000000p-4', '0x1.8ebb3a0000000p-1'),
    ('0x1.095bbc0000000p-6', '0x1.04e9cc0000000p-4', '0x1.b2dafc0000000p-4', '0x1.a0bc880000000p-1'),
    ('0x1.47ae160000000p-7', '0x1.8231be0000000p-5', '0x1.8231bc0000000p-4', '0x1.b277f20000000p-1'),
)


def geometric_mixes(num_exits: int, scale: Sequence[float] | None = None) -> list[tuple[float, ...]]:
    """The sweep's geometric family in numpy float32: ``p_k ∝ r**k``, then optional per-exit scaling."""
    if num_exits < 1:
        raise InputError(f"num_exits must be >= 1, got {num_exits}")
    if scale is not None and len(scale) != num_exits:
        raise InputError(f"{len(scale)} scale factors for {num_exits} exits")
    powers = np.arange(1, num_exits + 1, dtype=np.float32)
    mixes: list[tuple[float, ...]] = []
    for r in _ratios()[:NUM_MIXES]:
        # log and exp correctly rounded to float32 (via float64)
        log_r = np.float32(np.log(np.float64(r)))
        probs = np.exp((log_r * powers).astype(np.float32).astype(np.float64)).astype(np.float32)
        probs = (probs / probs.sum(dtype=np.float32)).astype(np.float32)
        if scale is not None:
            for j in range(num_exits - 1):
                probs[j] = np.float32(probs[j] * np.float32(scale[j]))
                rest = probs[j + 1 :]
                left = np.float32(1) - probs[: j + 1].sum(dtype=np.float32)
                probs[j + 1 :] = (left * rest / rest.sum(dtype=np.float32)).astype(np.float32)
        mixes.append(tuple(float(p) for p in probs))
    return mixes


def paper_mixes(num_exits: int = 4) -> list[tuple[float, ...]]:
    """The official sweep's 33 exit-proportion mixes (for 4 exits exactly the paper's).

    For another number of exits: the same geometric family without the 4-exit scaling.
    """
    if num_exits == 4:
        return [tuple(float.fromhex(v) for v in row) for row in _OFFICIAL_MIXES_HEX]
    return geometric_mixes(num_exits)


def _check_mix(mix: Sequence[float], k_count: int) -> None:
    if len(mix) != k_count:
        raise InputError(f"exit mix has {len(mix)} proportions for {k_count} exits")
    if any(not (0.0 <= p <= 1.0) for p in mix):
        raise InputError(f"exit proportions must be in [0, 1], got {tuple(mix)}")
    if sum(mix) > 1.0 + 1e-4:
        raise InputError(f"exit proportions must sum to at most 1, got {sum(mix):.4f}")


def mix_thresholds(scores: np.ndarray, mix: Sequence[float]) -> tuple[float, ...]:
    """Per-exit thresholds from exit proportions, as the official budgeted evaluation sets them.

    ``scores`` is (K, N) confidence (max-softmax in the paper); ``+inf`` means the exit never
    fires, the last exit gets ``-inf`` (it takes all).
    """
    scores = np.asarray(scores)
    k_count, n = scores.shape
    _check_mix(mix, k_count)
    gone = np.zeros(n, dtype=bool)
    out = [math.inf] * k_count
    for k in range(k_count - 1):
        quota = math.floor(np.float32(n) * np.float32(mix[k]))
        order = np.argsort(-scores[k], kind="stable")
        waiting = order[~gone[order]]
        if 1 <= quota <= len(waiting):
            out[k] = float(scores[k, waiting[quota - 1]])
        gone |= scores[k] >= out[k]
    out[-1] = -math.inf
    return tuple(out)
