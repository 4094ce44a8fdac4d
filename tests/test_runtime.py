"""The early-exit runtime on hand-made 3-exit bundles (ONNX Runtime backend)."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from bundles import make_toy_bundle, run_in_threads, toy_inputs

from edgeperceiver.bundle import Bundle, Thresholds
from edgeperceiver.errors import BundleError, InputError, MissingDependencyError, TargetError
from edgeperceiver.runtime import Runner, load, scores
from edgeperceiver.runtime.backend import BackendBase, SessionBase
from edgeperceiver.runtime.backends import create_backend
from edgeperceiver.runtime.cli_support import render_rows, run_inputs, to_rows
from edgeperceiver.runtime.criteria import evaluate
from edgeperceiver.types import Criterion

K = 3


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy_bundle(tmp_path_factory.mktemp("toy") / "bundle", logit_scale=4.0, classes=list("abcde"))


@pytest.fixture(scope="module")
def runner(toy: Path) -> Runner:
    return load(toy, threads=1, batch_size=16)


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return toy_inputs(64)


def _mono(toy: Path, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(toy / "model.onnx"), so, providers=["CPUExecutionProvider"])
    return [np.asarray(a) for a in sess.run(None, {"x": x})]


# ----------------------------------------------------------------------------- exits


def test_all_exits_match_monolithic_model(toy: Path, runner: Runner, x: np.ndarray) -> None:
    got = runner.all_exits(x)
    want = _mono(toy, x)
    assert len(got) == K
    for g, w in zip(got, want, strict=True):
        assert g.shape == (64, 5)
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)


def test_no_thresholds_means_last_exit(runner: Runner, x: np.ndarray) -> None:
    pred = runner.predict(x)
    assert runner.thresholds is None
    assert (pred.exits == K).all()
    np.testing.assert_array_equal(pred.labels, runner.all_exits(x)[-1].argmax(1))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_forcing_each_exit_returns_its_argmax(runner: Runner, x: np.ndarray, k: int) -> None:
    logits = runner.all_exits(x)[k - 1]
    # thresholds: exits before k disabled, exit k takes everyone (score >= 0 always)
    values = [None] * (k - 1) + [0.0] + [0.99] * (K - k)
    pred = runner.predict(x, thresholds=values)
    assert (pred.exits == k).all()
    np.testing.assert_array_equal(pred.labels, logits.argmax(1))
    np.testing.assert_allclose(pred.scores, scores(logits), rtol=0, atol=0)
    forced = runner.predict(x, force_exits=np.full(len(x), k))
    np.testing.assert_array_equal(forced.labels, logits.argmax(1))
    assert (forced.exits == k).all()


def test_mixed_exits_follow_scores(runner: Runner, x: np.ndarray) -> None:
    ex = runner.all_exits(x)
    s = [scores(e) for e in ex]
    t1, t2 = float(np.median(s[0])), float(np.median(s[1]))
    pred = runner.predict(x, thresholds=[t1, t2, 0.0])
    want_exit = np.where(s[0] >= t1, 1, np.where(s[1] >= t2, 2, 3))
    np.testing.assert_array_equal(pred.exits, want_exit)
    want_label = np.choose(want_exit - 1, [e.argmax(1) for e in ex])
    np.testing.assert_array_equal(pred.labels, want_label)
    assert set(np.unique(pred.exits)) == {1, 2, 3}


def test_disabled_exit_is_skipped_and_later_segments_do_not_run(toy: Path, x: np.ndarray) -> None:
    r = load(toy, threads=1)
    calls = [0] * K
    originals = r.sessions

    class Counting:
        def __init__(self, k: int) -> None:
            self.k = k

        def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
            calls[self.k] += 1
            return originals[self.k].run(feeds)

    r.sessions = tuple(Counting(k) for k in range(K))
    pred = r.predict(x[:8], thresholds=[None, 0.0, None])
    assert (pred.exits == 2).all() and calls == [1, 1, 0]
    pred = r.predict(x[:8], thresholds=[1.1, None, 1.1])  # nobody confident: all reach exit 3
    assert (pred.exits == 3).all() and calls == [2, 2, 1]
    pred = r.predict(x[:8], thresholds=[None, None, None])  # all disabled = never exit early
    assert (pred.exits == 3).all()


def test_bundle_thresholds_are_used_and_overridable(tmp_path: Path, x: np.ndarray) -> None:
    b = make_toy_bundle(tmp_path / "b", logit_scale=4.0, thresholds=[0.0, None, None])
    r = load(b, threads=1)
    assert r.thresholds is not None and r.thresholds.values == (0.0, None, None)
    assert (r.predict(x).exits == 1).all()
    assert (r.predict(x, thresholds=[None, None, 0.0]).exits == 3).all()
    assert (load(b, thresholds=[None, 0.0, None]).predict(x).exits == 2).all()


@pytest.mark.parametrize("criterion", list(Criterion))
def test_per_sample_exits_equal_running_each_sample_alone(
    toy: Path, x: np.ndarray, criterion: Criterion
) -> None:
    r = load(toy, threads=2, batch_size=64)
    ex = r.all_exits(x)
    s = [scores(e, criterion) for e in ex]
    # thresholds exactly at some samples' scores: the boundary case
    th = Thresholds(criterion, (float(np.sort(s[0])[40]), float(np.sort(s[1])[20]), 0.0))
    batch = r.predict(x, thresholds=th)
    assert len(set(batch.exits.tolist())) == 3
    alone = [r.predict(x[i : i + 1], thresholds=th) for i in range(len(x))]
    np.testing.assert_array_equal(batch.exits, [a.exits[0] for a in alone])
    np.testing.assert_array_equal(batch.labels, [a.labels[0] for a in alone])
    np.testing.assert_array_equal(batch.scores, [a.scores[0] for a in alone])
    # and in odd-sized chunks
    r.batch_size = 7
    chunked = r.predict(x, thresholds=th)
    np.testing.assert_array_equal(chunked.exits, batch.exits)
    np.testing.assert_array_equal(chunked.labels, batch.labels)


def test_criteria_scores() -> None:
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [100.0, -100.0, 0.0]], np.float32)
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(scores(logits, "max_softmax"), p.max(1), rtol=1e-6)
    srt = np.sort(p, 1)
    np.testing.assert_allclose(scores(logits, Criterion.MARGIN), srt[:, -1] - srt[:, -2], rtol=1e-6, atol=1e-12)
    ent = -np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-300)), 0), 1)
    np.testing.assert_allclose(scores(logits, Criterion.ENTROPY), -ent, rtol=1e-6, atol=1e-12)
    assert scores(logits, Criterion.ENTROPY)[1] == pytest.approx(-np.log(3))
    assert np.isfinite(scores(np.array([[1e30, -1e30]], np.float32))).all()


def test_scores_do_not_depend_on_the_batch() -> None:
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((37, 1000)) * 5).astype(np.float32)
    for crit in Criterion:
        full = scores(logits, crit)
        ev, labels, conf = evaluate(logits, crit)
        np.testing.assert_array_equal(ev, full)
        np.testing.assert_array_equal(labels, logits.argmax(1))
        if crit is Criterion.MAX_SOFTMAX:
            np.testing.assert_array_equal(conf, full.astype(np.float32))
        for i in (0, 5, 36):
            assert scores(logits[i : i + 1], crit)[0] == full[i]
            assert scores(logits[i:], crit)[0] == full[i]


# ----------------------------------------------------------------------------- inputs


def test_input_validation(runner: Runner, x: np.ndarray) -> None:
    with pytest.raises(InputError, match="channel"):
        runner.predict(np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(InputError, match="shape"):
        runner.predict(np.zeros((2, 3, 9, 8), np.float32))
    with pytest.raises(InputError, match="shape"):
        runner.predict(np.zeros((8, 8), np.float32))
    with pytest.raises(InputError, match="dtype"):
        runner.predict(np.zeros((2, 3, 8, 8), np.int64))
    with pytest.raises(InputError, match="numpy array"):
        runner.predict([[1.0]])  # type: ignore[arg-type]
    bad = x[:4].copy()
    bad[2, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="sample 2"):
        runner.predict(bad)
    bad[2, 0, 0, 0] = np.inf
    with pytest.raises(InputError, match="NaN or inf"):
        runner.all_exits(bad)
    huge = np.full((2, 3, 8, 8), 3e38, np.float32)  # finite, though its float32 sum is not
    assert len(runner.predict(huge)) == 2
    one = runner.predict(x[0])  # (C, H, W) = one sample
    assert len(one) == 1
    np.testing.assert_array_equal(runner.predict(x[:3].astype(np.float64)).labels, runner.predict(x[:3]).labels)
    empty = runner.predict(np.zeros((0, 3, 8, 8), np.float32))
    assert len(empty) == 0
    with pytest.raises(InputError, match="thresholds"):
        runner.predict(x, thresholds=[0.5, 0.5])
    with pytest.raises(InputError, match="NaN"):
        runner.predict(x, thresholds=[float("nan"), None, None])
    with pytest.raises(InputError, match="force_exits"):
        runner.predict(x[:2], force_exits=[1, 4])
    with pytest.raises(InputError, match="force_exits"):
        runner.predict(x[:2], force_exits=[1])


def test_criterion_mismatch_is_refused(tmp_path: Path) -> None:
    b = make_toy_bundle(tmp_path / "b", thresholds=[0.5, 0.5, None])
    with pytest.raises(InputError, match="criterion"):
        load(b, criterion="entropy")
    r = load(b, criterion="entropy", thresholds=[-0.1, None, None])
    assert r.criterion is Criterion.ENTROPY and r.thresholds is not None
    assert r.thresholds.criterion is Criterion.ENTROPY


def test_large_inputs_are_batched_without_dropping(toy: Path, x: np.ndarray) -> None:
    r = load(toy, threads=1, batch_size=5)
    big = np.concatenate([x, x[:3]])  # 67 samples: 13 full batches + 2
    pred = r.predict(big, thresholds=[0.6, 0.5, 0.0])
    assert len(pred) == 67
    ref = load(toy, threads=1, batch_size=67).predict(big, thresholds=[0.6, 0.5, 0.0])
    np.testing.assert_array_equal(pred.labels, ref.labels)
    np.testing.assert_array_equal(pred.exits, ref.exits)


def test_predict_files_arrays_images_and_dirs(tmp_path: Path, toy: Path, x: np.ndarray) -> None:
    from PIL import Image

    r = load(toy, threads=1, batch_size=3)
    np.save(tmp_path / "a.npy", x[:4])
    np.savez(tmp_path / "b.npz", x=x[4:9])
    np.save(tmp_path / "one.npy", x[9])  # (C, H, W)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(imgs / f"im{i}.png")
    names, pred = r.predict_files([tmp_path / "a.npy", tmp_path / "b.npz", tmp_path / "one.npy", imgs])
    assert len(names) == len(pred) == 4 + 5 + 1 + 3
    assert names[0] == f"{tmp_path / 'a.npy'}[0]" and names[-1] == str(imgs / "im2.png")
    want = r.predict(x[:10])
    np.testing.assert_array_equal(pred.labels[:10], want.labels)
    rows = run_inputs(r, [tmp_path / "a.npy"], batch_size=2)
    assert [row.class_name for row in rows] == ["abcde"[int(v)] for v in want.labels[:4]]

    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(InputError, match=r"broken\.png"):
        r.predict_files([imgs])
    with pytest.raises(InputError, match="no such file"):
        r.predict_files([tmp_path / "missing.png"])
    np.save(tmp_path / "bad.npy", x[:2, :1])
    with pytest.raises(InputError, match=r"bad\.npy"):
        r.predict_files([tmp_path / "bad.npy"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no images"):
        r.predict_files([empty])


def test_rows_render_as_table_and_json(runner: Runner, x: np.ndarray) -> None:
    pred = runner.predict(x[:3], thresholds=[0.0, None, None])
    rows = to_rows(["a", "b", "c"], pred, runner.classes)
    table = render_rows(rows)
    assert table.splitlines()[0].split() == ["file", "label", "class", "exit", "confidence"]
    assert "3 sample(s); exit 1: 3" in table
    lines = [json.loads(line) for line in render_rows(rows, as_json=True).splitlines()]
    assert [d["file"] for d in lines] == ["a", "b", "c"]
    assert lines[0]["exit"] == 1 and lines[0]["class_name"] == runner.classes[lines[0]["label"]]  # type: ignore[index]
    assert lines[0]["confidence"] == pytest.approx(float(pred.confidences[0]))


# ----------------------------------------------------------------------------- backends


def test_backend_registry_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TargetError, match="unknown target"):
        create_backend("cuda-magic")
    with pytest.raises(InputError, match="threads"):
        create_backend("onnxruntime", threads=0)
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes 'import openvino' fail
    with pytest.raises(MissingDependencyError, match=r"edgeperceiver\[openvino\]"):
        create_backend("openvino")


def test_missing_target_entry(toy: Path) -> None:
    with pytest.raises(BundleError, match="compile"):
        load(toy, "openvino-int8")


def test_ort_optimized_model_cache(tmp_path: Path, toy: Path, x: np.ndarray) -> None:
    cache = tmp_path / "cache"
    a = load(toy, threads=1, cache_dir=cache)
    files = sorted(cache.glob("*.onnx"))
    assert len(files) == K
    b = load(toy, threads=1, cache_dir=cache, spin=True)  # loads the cached models
    assert sorted(cache.glob("*.onnx")) == files
    for ea, eb in zip(a.all_exits(x), b.all_exits(x), strict=True):
        np.testing.assert_allclose(ea, eb, rtol=0, atol=1e-5)
    assert sorted(p.name for p in cache.iterdir()) == [f.name for f in files]  # no temporary left


def test_ort_cache_entry_cut_short_is_made_again(tmp_path: Path, toy: Path, x: np.ndarray) -> None:
    cache = tmp_path / "cache"
    want = load(toy, threads=1, cache_dir=cache).all_exits(x)
    files = sorted(cache.glob("*.onnx"))
    good = files[0].read_bytes()
    files[0].write_bytes(good[: len(good) // 3])  # what a crash before the data reached the disk leaves
    got = load(toy, threads=1, cache_dir=cache).all_exits(x)
    for ea, eb in zip(want, got, strict=True):
        np.testing.assert_allclose(ea, eb, rtol=0, atol=1e-5)
    assert files[0].read_bytes() == good and sorted(cache.iterdir()) == files


class _UnsafeBackend(BackendBase):
    """Wraps ORT sessions with a checker that fails if two threads run one session at once."""

    name = "unsafe"

    def __init__(self) -> None:
        self.inner = create_backend("onnxruntime", threads=1)
        self.overlaps = 0

    def open(self, bundle, entry, segment):
        sess = self.inner.open(bundle, entry, segment)
        outer = self
        busy = threading.Lock()

        class S(SessionBase):
            def run(self, feeds):
                if not busy.acquire(blocking=False):
                    outer.overlaps += 1
                    busy.acquire()
                try:
                    return sess.run(feeds)
                finally:
                    busy.release()

        return S()

    def from_host(self, a):
        return self.inner.from_host(a)

    def to_host(self, a):
        return self.inner.to_host(a)

    def take(self, a, rows):
        return self.inner.take(a, rows)


@pytest.mark.parametrize("unsafe", [False, True])
def test_threads_give_the_same_answers(toy: Path, x: np.ndarray, unsafe: bool) -> None:
    if unsafe:
        backend = _UnsafeBackend()
        b = Bundle.open(toy)
        r = Runner(b, b.manifest.target(), backend, batch_size=8)
    else:
        r = load(toy, threads=1, batch_size=8)
    th = [0.45, 0.4, 0.0]
    jobs = [(i % 17, 1 + (i * 7) % 23) for i in range(48)]
    want = [r.predict(x[s : s + n], thresholds=th) for s, n in jobs]
    got: list[object] = [None] * len(jobs)

    def worker(j0: int) -> None:
        for j in range(j0, len(jobs), 6):
            s, n = jobs[j]
            got[j] = r.predict(x[s : s + n], thresholds=th)

    errors = run_in_threads(worker, 6)
    assert not errors, errors
    for w, g in zip(want, got, strict=True):
        assert g is not None
        np.testing.assert_array_equal(w.labels, g.labels)  # type: ignore[attr-defined]
        np.testing.assert_array_equal(w.exits, g.exits)  # type: ignore[attr-defined]
        np.testing.assert_array_equal(w.scores, g.scores)  # type: ignore[attr-defined]
    if unsafe:
        assert backend.overlaps == 0


def test_command_main_prints_rows_and_maps_errors(
    tmp_path: Path, toy: Path, x: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgeperceiver.runtime.command import main

    np.save(tmp_path / "x.npy", x[:3])
    assert main([str(toy), str(tmp_path / "x.npy"), "--thresholds", "0,none,none", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 sample(s); exit 1: 3" in out
    assert main([str(toy), str(tmp_path / "x.npy"), "--json", "--batch-size", "2"]) == 0
    doc = json.loads(capsys.readouterr().out)  # one JSON document naming the entry that ran
    assert doc["entry"] == "onnxruntime-fp32" and doc["exit_counts"] == [0, 0, 3]
    assert [r["exit"] for r in doc["rows"]] == [3, 3, 3]
    assert main([str(toy), str(tmp_path / "missing.npy")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main([str(tmp_path / "not-a-bundle"), str(tmp_path / "x.npy")]) == 6
    assert main([str(toy), str(tmp_path / "x.npy"), "--thresholds", "0,x,1"]) == 2


def test_ort_session_options() -> None:
    from edgeperceiver.runtime.onnxruntime import OrtBackend

    so = OrtBackend(threads=2).session_options()
    assert so.intra_op_num_threads == 2
    # ORT's default spinning, stopped when each run returns (segments never spin against each other)
    assert so.get_session_config_entry("session.force_spinning_stop") == "1"
    with pytest.raises(RuntimeError, match="allow_spinning"):  # not set: ORT's default
        so.get_session_config_entry("session.intra_op.allow_spinning")
    off = OrtBackend(spin=False).session_options()
    assert off.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert OrtBackend(spin=True).session_options().get_session_config_entry("session.intra_op.allow_spinning") == "1"
    import onnxruntime as ort

    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with pytest.raises(TargetError, match="providers"):
        OrtBackend(providers=["NoSuchExecutionProvider"])
