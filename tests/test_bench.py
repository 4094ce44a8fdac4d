"""``edgeperceiver bench`` on a hand-made bundle: what is measured and how it is reported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from bundles import make_toy_bundle, toy_inputs

from edgeperceiver.bench import bench, mix_counts, mix_schedule
from edgeperceiver.errors import InputError


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy_bundle(tmp_path_factory.mktemp("bench") / "b", logit_scale=4.0, thresholds=[0.6, 0.5, None])


def test_mix_counts_and_schedule() -> None:
    assert mix_counts([0.5, 0.3, 0.1, 0.1], 8) == [4, 2, 1, 1]
    for n in (1, 7, 20, 101):
        c = mix_counts([0.4, 0.3, 0.2, 0.1], n)
        assert sum(c) == n
        assert all(abs(ci - p * n) < 1 for ci, p in zip(c, [0.4, 0.3, 0.2, 0.1], strict=True))
    assert mix_counts([1, 0, 0], 5) == [5, 0, 0]
    s = mix_schedule([0.5, 0.5], 10, seed=1)
    assert sorted(s.tolist()) == [1] * 5 + [2] * 5
    np.testing.assert_array_equal(s, mix_schedule([0.5, 0.5], 10, seed=1))


def test_bench_reports_every_measurement(toy: Path) -> None:
    progress: list[tuple[int, int]] = []
    data = toy_inputs(12)
    report = bench(toy, batch_sizes=(1, 4), exit_mix=(0.5, 0.3, 0.2), data=data, repeats=3, warmup=1, threads=1,
                   mix_round=5, progress=lambda d, t: progress.append((d, t)))
    assert report.target == "onnxruntime-fp32" and report.backend == "onnxruntime"
    assert report.exits == ("e1", "e2", "e3") and [b.batch for b in report.batches] == [1, 4]
    for b in report.batches:
        assert len(b.segment_ms) == len(b.cumulative_ms) == 3
        assert all(v > 0 for v in (*b.segment_ms, *b.cumulative_ms))
        assert b.monolithic_ms is not None and b.cut_price is not None and b.cut_price > 0
        assert b.mix_ideal_ms is not None and b.mix_measured_ms is not None and b.mix_ratio is not None
        assert b.thresholds_expected_ms is not None and b.thresholds_ratio is not None
    b1, b4 = report.batch(1), report.batch(4)
    # ideal = sum p_k * latency to exit k: at batch 1 from rounds of single samples (like the
    # measured rounds), at batch 4 from the integer counts of the batch actually run
    assert b1.round_ms is not None and len(b1.round_ms) == 3 and b4.round_ms is None
    assert b1.mix_ideal_ms == pytest.approx(float(np.dot([0.5, 0.3, 0.2], b1.round_ms)))
    assert b4.mix_ideal_ms == pytest.approx(float(np.dot([2 / 4, 1 / 4, 1 / 4], b4.cumulative_ms)))
    # the data's exits follow the bundle's thresholds, as the runtime computes them
    from edgeperceiver.runtime import load

    exits = load(toy, threads=1).predict(data).exits
    assert report.data_exit_share == pytest.approx(tuple(float(np.mean(exits == k)) for k in (1, 2, 3)))
    n_jobs = 2 * (3 + 3 + 1 + 1 + 1) + 3  # per batch size: segments, exits, mono, mix, data; + rounds
    assert progress[-1] == (3 * n_jobs, 3 * n_jobs)
    d = json.loads(report.to_json())
    assert d["batches"][0]["cut_price"] == pytest.approx(b1.cut_price)
    text = report.render()
    for needle in ("segment 3 alone", "to exit 2 e2", "chained / monolithic", "measured / ideal", "thresholds, 12",
                   "to exit 3, rounds of 5 singles", "repeats of single calls in turn (cold caches"):
        assert needle in text


def test_bench_rejects_bad_options(toy: Path) -> None:
    with pytest.raises(InputError, match="exit mix"):
        bench(toy, exit_mix=(0.5, 0.5), repeats=1)
    with pytest.raises(InputError, match="exit mix"):
        bench(toy, exit_mix=(0.5, -0.5, 1.0), repeats=1)
    with pytest.raises(InputError, match="batch sizes"):
        bench(toy, batch_sizes=(0,), repeats=1)


def test_bench_in_blocks_times_steady_state_calls(toy: Path) -> None:
    report = bench(toy, batch_sizes=(1,), repeats=4, warmup=0, block=2, threads=1)
    assert report.block == 2 and json.loads(report.to_json())["block"] == 2
    assert "interleaved repeats in blocks of 2" in report.render()
    assert all(v > 0 for v in report.batch(1).cumulative_ms)


def test_report_json_is_strict(toy: Path) -> None:
    """--json documents are strict JSON: a non-finite value becomes null, never NaN/Infinity."""
    import dataclasses

    report = bench(toy, batch_sizes=(1,), repeats=2, warmup=1, threads=1)
    report = dataclasses.replace(report, extra_ms={"broken": float("nan"), "forever": float("inf")})

    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    doc = json.loads(report.to_json(), parse_constant=refuse)
    assert doc["extra_ms"] == {"broken": None, "forever": None}
    assert doc["target"] == "onnxruntime-fp32" and doc["batches"][0]["cut_price"] > 0
