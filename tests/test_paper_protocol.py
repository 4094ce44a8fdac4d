"""The paper's budgeted-batch protocol, checked against a straight reference of the published algorithm.

The reference below follows the official evaluation (``adaptive_inference.py``) step by
step as published: plain loops over samples in decreasing confidence, a running count of
samples not yet filtered, ``T[k] = 1e8`` when the quota is 0 or not reached, ``filtered``
growing by ``confidence >= T[k]``, the last exit at ``-1e8``, then a per-sample walk
that stops at the first exit whose confidence reaches its threshold.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeperceiver.calibration.paper import NUM_MIXES, geometric_mixes, mix_thresholds, paper_mixes
from edgeperceiver.calibration.policies import evaluate, mix_evaluate
from edgeperceiver.runtime.criteria import scores as criterion_scores

# ----------------------------------------------------------------------------- reference


def ref_find_threshold(max_preds: np.ndarray, p: list[float]) -> list[float]:
    n_stage, n_sample = max_preds.shape
    sorted_idx = [sorted(range(n_sample), key=lambda i: -max_preds[k][i]) for k in range(n_stage)]
    filtered = [0] * n_sample
    T = [1e8] * n_stage
    for k in range(n_stage - 1):
        count = 0
        out_n = math.floor(np.float32(n_sample) * np.float32(p[k]))  # the official product is float32
        for i in range(n_sample):
            ori_idx = sorted_idx[k][i]
            if filtered[ori_idx] == 0:
                count += 1
                if count == out_n:
                    T[k] = float(max_preds[k][ori_idx])
                    break
        for i in range(n_sample):
            filtered[i] += int(max_preds[k][i] >= T[k])
    T[n_stage - 1] = -1e8
    return T


def ref_evaluate(
    max_preds: np.ndarray, argmax_preds: np.ndarray, targets: np.ndarray, flops: list[float], T: list[float]
) -> tuple[float, float, list[float]]:
    n_stage, n_sample = max_preds.shape
    acc_rec = [0] * n_stage
    exp = [0] * n_stage
    acc = 0
    for i in range(n_sample):
        for k in range(n_stage):
            if max_preds[k][i] >= T[k]:
                if int(targets[i]) == int(argmax_preds[k][i]):
                    acc += 1
                    acc_rec[k] += 1
                exp[k] += 1
                break
    expected = sum(exp[k] / n_sample * flops[k] for k in range(n_stage))
    per_exit = [acc_rec[k] / exp[k] if exp[k] else float("nan") for k in range(n_stage)]
    return acc * 100.0 / n_sample, expected, per_exit


def _same_threshold(ours: float, ref: float) -> bool:
    if ref == 1e8:
        return ours == math.inf
    if ref == -1e8:
        return ours == -math.inf
    return ours == ref


# ----------------------------------------------------------------------------- data

FLOPS = [0.098, 0.182, 0.207, 0.266]  # mobilenetV3_0x75 GFLOPs per exit (fixtures README)


def _logits(n: int, seed: int, classes: int = 10, k: int = 4) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    out = []
    for j in range(k):
        z = rng.normal(size=(n, classes)) * (1 + 0.5 * j)
        z[np.arange(n), y] += rng.gamma(2.0, 0.6 + 0.4 * j, n)
        out.append(z.astype(np.float32))
    return out, y


def _confidence(logits: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([criterion_scores(z) for z in logits]), np.stack([z.argmax(1) for z in logits])


# ----------------------------------------------------------------------------- tests


#: validation-set sizes the protocol runs on: ImageNet val, CIFAR test, the demo's held-out digits
SIZES_THAT_OCCUR = (50_000, 10_000, 539)


def _official_mixes_here() -> np.ndarray:
    """The 33 mixes as the official code computes them, in PyTorch float32 on this CPU."""
    torch = pytest.importorskip("torch")
    p_list = torch.zeros(34)
    for i in range(17):
        p_list[i] = (i + 4) / 20
        p_list[33 - i] = 20 / (i + 4)
    k = [0.85, 1, 0.5, 1]
    rows = []
    for i in range(33):
        probs = torch.exp(torch.log(p_list[i]) * torch.arange(1, 5, dtype=torch.float32))
        probs /= probs.sum()
        for j in range(3):
            probs[j] *= k[j]
            probs[j + 1 : 4] = (1 - probs[0 : j + 1].sum()) * probs[j + 1 : 4] / probs[j + 1 : 4].sum()
        rows.append(probs.numpy().copy())
    return np.stack(rows).astype(np.float32)


def test_mix_table_is_the_official_float32_arithmetic() -> None:
    # PyTorch's vectorised float32 exp/log differ between CPUs by a few ulps (4 between Zen 4
    # and a Xeon with AVX-512 FP16): the table is one fixed run of the official arithmetic, so
    # compare what matters, not bits. The same mixes to float32 rounding (a wrong factor or
    # exponent would be off by far more than 1e-5) ...
    here = _official_mixes_here()
    mixes = paper_mixes(4)
    assert len(mixes) == NUM_MIXES == 33
    table = np.array(mixes, dtype=np.float32)
    np.testing.assert_allclose(table, here, rtol=1e-5, atol=0)
    # ... and the protocol uses each p only through the quota floor(float32(n) * float32(p)):
    # for the set sizes that occur, the table's quotas are the official arithmetic's here
    for n in SIZES_THAT_OCCUR:
        ours = np.floor(np.float32(n) * table[:, :3])
        official = np.floor(np.float32(n) * here[:, :3])
        bad = np.argwhere(ours != official)
        assert bad.size == 0, f"n={n}: quotas differ at (mix, exit) {bad.tolist()}"


def test_numpy_family_matches_the_table_to_a_few_ulps() -> None:
    table = np.array(paper_mixes(4), dtype=np.float32)
    computed = np.array(geometric_mixes(4, (0.85, 1.0, 0.5, 1.0)), dtype=np.float32)
    np.testing.assert_allclose(computed, table, rtol=1e-6, atol=0)  # at most a few float32 ulps
    np.testing.assert_allclose(table.sum(axis=1), 1.0, atol=1e-6)
    # the sweep runs from "most samples leave at exit 1" to "most reach the last exit"
    assert table[0, 0] > 0.6 and table[-1, -1] > 0.8
    assert np.allclose(table[16], [0.2125, 0.2625, 0.13125, 0.39375], atol=1e-6)  # r = 1: uniform, then scaled


@pytest.mark.parametrize("seed", range(6))
def test_thresholds_and_figures_match_the_reference_on_random_logits(seed: int) -> None:
    n = [37, 200, 513, 700, 64, 333][seed]
    logits, y = _logits(n, seed)
    conf, preds = _confidence(logits)
    if seed == 4:
        conf = np.round(conf, 2)  # many ties: ">=" lets several tied samples leave together
    for mix in paper_mixes(4):
        ours = mix_thresholds(conf, mix)
        ref = ref_find_threshold(conf, list(mix))
        assert all(_same_threshold(a, b) for a, b in zip(ours, ref, strict=True)), (mix, ours, ref)
        acc, flops, per_exit = mix_evaluate(conf, preds, y, ours, FLOPS)
        racc, rflops, rper = ref_evaluate(conf, preds, y, FLOPS, ref)
        assert acc == pytest.approx(racc, abs=1e-9)
        assert flops == pytest.approx(rflops, rel=1e-12)
        for a, b in zip(per_exit, rper, strict=True):
            assert (a is None and math.isnan(b)) or a == pytest.approx(b)


def test_hand_checked_case() -> None:
    # 10 samples, 3 exits, mix (0.3, 0.3, 0.4): floor(10*0.3) = 3 leave at exit 1 (the 3 most
    # confident), then exit 2's threshold is the 3rd most confident among the other 7.
    conf = np.array([
        [0.95, 0.90, 0.85, 0.80, 0.75, 0.70, 0.65, 0.60, 0.55, 0.50],
        [0.10, 0.20, 0.99, 0.30, 0.98, 0.40, 0.97, 0.96, 0.50, 0.60],
        [0.50] * 10,
    ])
    t = mix_thresholds(conf, (0.3, 0.3, 0.4))
    assert t[0] == 0.85 and t[2] == -math.inf
    # exit 2 candidates (not gone at exit 1): samples 3..9, scores .30 .98 .40 .97 .96 .50 .60 -> 3rd = 0.96
    assert t[1] == 0.96
    taken = [int(np.argmax([conf[k, i] >= t[k] for k in range(3)])) for i in range(10)]
    assert taken == [0, 0, 0, 2, 1, 2, 1, 1, 2, 2]
    # a quota of 0 never fires; so does one that cannot be reached
    t0 = mix_thresholds(conf, (0.0, 0.05, 0.95))
    assert t0[0] == math.inf and t0[1] == math.inf
    point = evaluate(conf, np.zeros((3, 10), np.int64), np.zeros(10, np.int64), t, [1.0, 2.0, 3.0])
    assert point.share == (0.3, 0.3, 0.4)
    assert point.cost == pytest.approx(0.3 * 1 + 0.3 * 2 + 0.4 * 3)


def test_ties_let_more_samples_leave_than_the_quota() -> None:
    conf = np.array([[0.9, 0.9, 0.9, 0.1], [0.5, 0.5, 0.5, 0.5]])
    t = mix_thresholds(conf, (0.25, 0.75))
    assert t[0] == 0.9  # quota 1, but all three tied samples leave
    assert evaluate(conf, np.zeros((2, 4), np.int64), None, t, [1, 2]).share == (0.75, 0.25)


def test_other_exit_counts_use_the_plain_geometric_family() -> None:
    mixes = paper_mixes(3)
    assert len(mixes) == 33
    r = 4 / 20
    expected = np.array([r, r**2, r**3]) / (r + r**2 + r**3)
    np.testing.assert_allclose(mixes[0], expected, rtol=1e-6)
