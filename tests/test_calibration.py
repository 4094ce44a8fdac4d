"""calibrate / set_thresholds on a real (toy, ONNX Runtime) bundle: files, manifest, runtime agreement."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from bundles import make_toy_bundle, toy_inputs

import edgeperceiver.calibration as cal
from edgeperceiver.bundle import Bundle, edit_bundle
from edgeperceiver.calibration.collect import ExitRecord, cache_dir
from edgeperceiver.calibration.policies import exit_taken
from edgeperceiver.errors import CalibrationError, InputError
from edgeperceiver.runtime import load
from edgeperceiver.types import Criterion

N = 400


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPERCEIVER_CACHE", str(tmp_path / "cache"))


@pytest.fixture()
def toy(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """A 3-exit toy bundle and held-out data labelled by its last exit, with 10% label noise."""
    bundle = make_toy_bundle(tmp_path / "bundle", num_classes=5)
    x = toy_inputs(N, seed=3)
    y = load(bundle).all_exits(x)[-1].argmax(1)
    rng = np.random.default_rng(0)
    noisy = rng.random(N) < 0.1
    y[noisy] = rng.integers(0, 5, int(noisy.sum()))
    np.savez(tmp_path / "heldout.npz", x=x, y=y)
    return bundle, tmp_path / "heldout.npz", x


def _with_latency(bundle: Path, latency: tuple[float, ...]) -> None:
    with edit_bundle(bundle) as w:
        assert w.manifest is not None
        entry = w.manifest.target(None)
        w.manifest = w.manifest.with_target(dataclasses.replace(entry, latency_ms=latency))


def test_calibrate_writes_thresholds_summary_and_report(toy: tuple[Path, Path, np.ndarray]) -> None:
    bundle, data, _ = toy
    _with_latency(bundle, (1.0, 2.0, 3.0))
    stages: list[str] = []
    result = cal.calibrate(bundle, data, goal=cal.MaxDrop(5.0), progress=lambda s, d, t: stages.append(s))
    assert {"read", "run"} <= set(stages)
    assert result.costs.unit == "ms" and result.costs.values == (1.0, 2.0, 3.0)
    assert result.fit.n + result.check.n == N and abs(result.fit.n - result.check.n) <= 1
    b = Bundle.open(bundle)  # verifies every checksum, the report files included
    entry = b.manifest.target(None)
    assert entry.thresholds == result.thresholds
    assert entry.thresholds.goal == "max_drop=5" and entry.thresholds.criterion is Criterion.MAX_SOFTMAX
    assert entry.calibration["goal"] == "max_drop=5"
    assert entry.calibration["check"]["n"] == result.check.n
    json.dumps(dict(entry.calibration))  # the summary is plain JSON
    report = (bundle / "reports" / "onnxruntime-fp32" / "report.csv").read_text()
    assert report.splitlines()[0].startswith("kind,source,pareto,threshold_1")
    assert sum(line.startswith("curve,paper mix") for line in report.splitlines()) == 33
    assert (bundle / "reports" / "onnxruntime-fp32" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = result.render()
    assert "max_drop=5" in text and "check" in text and "report.csv" in text


def test_runtime_exits_match_the_calibration_simulation(toy: tuple[Path, Path, np.ndarray]) -> None:
    """What calibration predicted is what the runtime does with the written thresholds."""
    bundle, data, x = toy
    result = cal.calibrate(bundle, data, goal=cal.PaperMix((0.3, 0.3, 0.4)))
    record = ExitRecord.from_logits(load(bundle).all_exits(x))
    sim = exit_taken(record.scores[Criterion.MAX_SOFTMAX], [
        np.inf if v is None else v for v in result.thresholds.values
    ])
    pred = load(bundle, batch_size=7).predict(x)  # thresholds come from the bundle
    np.testing.assert_array_equal(pred.exits - 1, sim)
    np.testing.assert_array_equal(pred.labels, record.preds[sim, np.arange(N)])
    assert 0.0 < float(np.mean(sim == 0)) < 1.0  # samples really leave at exit 1, others do not


def test_outputs_are_cached_by_bundle_and_data(
    toy: tuple[Path, Path, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, data, _ = toy
    first = cal.calibrate(bundle, data, goal=cal.MaxDrop(2.0), write=False)
    assert len(list(cache_dir().glob("*.npz"))) == 1

    def no_engine(*args: object, **kwargs: object) -> None:
        raise AssertionError("the engine ran although the outputs are cached")

    monkeypatch.setattr("edgeperceiver.runtime.load", no_engine)
    again = cal.calibrate(bundle, data, goal=cal.MaxDrop(2.0), write=False)
    assert again.thresholds == first.thresholds
    # other data -> another key -> the engine must run
    other = data.with_name("other.npz")
    with np.load(data) as z:
        np.savez(other, x=z["x"][:100], y=z["y"][:100])
    with pytest.raises(AssertionError, match="engine ran"):
        cal.calibrate(bundle, other, goal=cal.MaxDrop(2.0), write=False)


def test_goals_and_their_errors(toy: tuple[Path, Path, np.ndarray], tmp_path: Path) -> None:
    bundle, data, x = toy
    with pytest.raises(CalibrationError, match="bench"):
        cal.calibrate(bundle, data, goal=cal.Budget(ms=2.0))
    _with_latency(bundle, (1.0, 2.0, 3.0))
    res = cal.calibrate(bundle, data, goal=cal.Budget(ms=2.0))
    assert res.fit.cost <= 2.0 and res.met == (res.check.cost <= 2.0)
    res = cal.calibrate(bundle, data, goal=cal.MaxDrop(3.0), exits=(1, 3))
    assert res.thresholds.values[1] is None and res.exits == (1, 3)
    # unlabeled data: accuracy goals refuse, the disagreement risk works
    np.savez(tmp_path / "unlabeled.npz", x=x)
    with pytest.raises(CalibrationError, match="labelled"):
        cal.calibrate(bundle, tmp_path / "unlabeled.npz", goal=cal.MaxDrop(1.0))
    risk = cal.calibrate(bundle, tmp_path / "unlabeled.npz", goal=cal.Risk(0.2, 0.1))
    assert risk.risk is not None and risk.check_risk is not None
    assert risk.fit.accuracy is None and 1 - risk.fit.agreement <= 0.2
    with pytest.raises(InputError, match="exits"):
        cal.calibrate(bundle, data, goal=cal.MaxDrop(1.0), exits=(4,))
    with pytest.raises(InputError):
        cal.MaxDrop(-1.0)
    with pytest.raises(InputError):
        cal.Budget(ms=1.0, gflops=1.0)
    np.savez(tmp_path / "badlabels.npz", x=x, y=np.full(N, 7))
    with pytest.raises(CalibrationError, match="5 classes"):
        cal.calibrate(bundle, tmp_path / "badlabels.npz")


def test_one_goal_from_the_command_line_options() -> None:
    assert cal.goal_from_options() == cal.MaxDrop(0.5)
    assert cal.goal_from_options(max_drop=1.0) == cal.MaxDrop(1.0)
    assert cal.goal_from_options(budget_ms=2.0) == cal.Budget(ms=2.0)
    assert cal.goal_from_options(budget_gflops=0.5) == cal.Budget(gflops=0.5)
    assert cal.goal_from_options(risk=0.1, delta=0.05) == cal.Risk(0.1, 0.05)
    assert cal.goal_from_options(paper_mix=(0.5, 0.5)) == cal.PaperMix((0.5, 0.5))
    with pytest.raises(InputError, match="choose one goal, got --max-drop, --risk"):
        cal.goal_from_options(max_drop=0.0, risk=0.1)


def test_set_thresholds_by_hand(toy: tuple[Path, Path, np.ndarray]) -> None:
    bundle, _, x = toy
    manual = cal.set_thresholds(bundle, "0.6,off,0", criterion="margin")
    entry = Bundle.open(bundle).manifest.target(None)
    assert entry.thresholds is not None
    assert entry.thresholds.values == (0.6, None, 0.0) and entry.thresholds.criterion is Criterion.MARGIN
    assert "off" in manual.render()
    cal.set_thresholds(bundle, [1.1, 0.5, 0.0])
    assert "never fires" in cal.set_thresholds(bundle, [1.1, 0.5, 0.0]).render()
    assert not np.any(load(bundle).predict(x).exits == 1)  # 1.1 > any max-softmax: exit 1 never fires
    with pytest.raises(InputError, match="3 exits"):
        cal.set_thresholds(bundle, [0.5, 0.5])
    with pytest.raises(InputError, match="at least one"):
        cal.set_thresholds(bundle, [None, None, None])
    with pytest.raises(InputError, match="neither a number"):
        cal.set_thresholds(bundle, "0.5,maybe,0")


@pytest.mark.slow
def test_int8_is_calibrated_on_its_own_outputs(toy: tuple[Path, Path, np.ndarray]) -> None:
    """compile INT8 with the held-out loader as calibration data, then calibrate on that precision."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from edgeperceiver.calibration.collect import collect
    from edgeperceiver.targets import compile_bundle
    from edgeperceiver.types import Precision, TargetName

    bundle, data, _ = toy
    entry = compile_bundle(bundle, TargetName.OPENVINO, Precision.INT8, calib_data=data, calib_samples=100)
    ds = cal.load_dataset(data, Bundle.open(bundle).manifest.preprocess)
    b = Bundle.open(bundle)
    int8 = collect(b, ds, target=entry.key)
    fp32 = collect(b, ds, target=None)
    assert int8.target == "openvino-int8" and fp32.target == "onnxruntime-fp32"
    # the INT8 engine's confidences are its own, not the fp32 ones
    assert not np.allclose(int8.scores[Criterion.MAX_SOFTMAX], fp32.scores[Criterion.MAX_SOFTMAX], atol=1e-4)
    result = cal.calibrate(bundle, data, target="openvino-int8", goal=cal.MaxDrop(1.0))
    assert result.costs.unit == "ms" and result.costs.values == entry.latency_ms
    after = Bundle.open(bundle).manifest
    assert after.target("openvino-int8").thresholds == result.thresholds
    assert after.target(None).thresholds is None  # only the calibrated target changed


def test_text_progress_draws_one_bar_per_stage() -> None:
    import io

    out = io.StringIO()
    bar = cal.TextProgress(out, width=10)
    for i in range(3):
        bar("read", i, 2)
    bar("run", 1, 1)
    lines = out.getvalue().split("\n")
    assert lines[0].endswith("[##########] 2/2") and "reading held-out data" in lines[0]
    assert lines[1].endswith("[##########] 1/1") and "running every exit" in lines[1]


def test_costs_from_bench_flops_or_segments(toy: tuple[Path, Path, np.ndarray]) -> None:
    from edgeperceiver.calibration.goals import ExitCosts, exit_costs, monotone

    bundle, data, _ = toy
    res = cal.calibrate(bundle, data, goal=cal.MaxDrop(2.0), latency="bench", bench_repeats=3, write=False)
    assert res.costs.unit == "ms" and "bench" in res.costs.source
    assert all(b >= a for a, b in zip(res.costs.values, res.costs.values[1:], strict=False))
    m = Bundle.open(bundle).manifest
    assert exit_costs(m, m.target(None)).unit == "segments"  # the toy bundle records no FLOPs
    with pytest.raises(CalibrationError, match="FLOPs"):
        exit_costs(m, m.target(None), unit="GFLOPs")
    noisy = monotone(ExitCosts((1.0, 3.0, 2.5, 4.0), "ms", "x"))
    assert noisy.values == (1.0, 3.0, 3.0, 4.0) and "non-decreasing" in noisy.source
    with pytest.raises(InputError, match="latency"):
        cal.calibrate(bundle, data, latency="guess")
