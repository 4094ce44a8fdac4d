"""End to end on an official golden fixture: export -> bundle -> runtime (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

MODEL = "mobilenetV3_0x75_perceiver_t128"


@pytest.fixture(scope="module")
def golden_bundle(golden_dir: Path, tmp_path_factory: pytest.TempPathFactory, torch_threads: object) -> Path:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from edgeperceiver.export import export_checkpoint

    out = tmp_path_factory.mktemp("golden") / MODEL
    export_checkpoint(golden_dir / f"{MODEL}.pth", out, threads=2)
    return out


@pytest.fixture(scope="module")
def io(golden_dir: Path) -> dict[str, np.ndarray]:
    with np.load(golden_dir / f"{MODEL}.io.npz") as z:
        return {k: z[k] for k in z.files}


def test_all_exits_equal_the_official_outputs(golden_bundle: Path, io: dict[str, np.ndarray]) -> None:
    from edgeperceiver.runtime import load

    r = load(golden_bundle, threads=2)
    assert r.manifest.exits == ("y_early3", "y_att", "y_cnn", "y_merge")
    got = r.all_exits(io["input"])
    for k, name in enumerate(r.manifest.exits):
        np.testing.assert_allclose(got[k], io[name], rtol=0, atol=1e-4, err_msg=name)
    for k, name in enumerate(r.manifest.exits, start=1):
        values = [None] * (k - 1) + [0.0] + [None] * (4 - k)
        pred = r.predict(io["input"], thresholds=values)
        assert (pred.exits == k).all()
        np.testing.assert_array_equal(pred.labels, io[name].argmax(1))


def _gap_threshold(s: np.ndarray, index: int, margin: float) -> float:
    """A threshold near the ``index``-th smallest score, at least ``margin`` from every score."""
    srt = np.sort(s)
    for d in range(len(srt)):
        for j in (index + d, index - d):
            if 0 <= j < len(srt) - 1 and srt[j + 1] - srt[j] > 2 * margin:
                return float(srt[j] + srt[j + 1]) / 2
    raise AssertionError("no gap between scores")


def test_batch_exits_equal_single_sample_exits(golden_bundle: Path, io: dict[str, np.ndarray]) -> None:
    """ONNX Runtime's logits for a batch of 1 differ from those in a batch of >= 2 by up to ~1e-5
    (MLAS uses another GEMM kernel for M = 1), so thresholds are kept 1e-5 away from every score:
    the exit decisions themselves are per sample, and must then agree exactly."""
    from edgeperceiver.runtime import load, scores

    r = load(golden_bundle, threads=2, batch_size=16)
    x = np.concatenate([io["input"], np.random.default_rng(0).standard_normal((14, 3, 224, 224)).astype(np.float32)])
    ex = r.all_exits(x)
    s = [scores(e) for e in ex]
    th = [_gap_threshold(s[0], 11, 1e-5), _gap_threshold(s[1], 8, 1e-5), _gap_threshold(s[2], 6, 1e-5), 0.0]
    batch = r.predict(x, thresholds=th)
    assert len(set(batch.exits.tolist())) >= 3, batch.exits
    alone = [r.predict(x[i : i + 1], thresholds=th) for i in range(len(x))]
    np.testing.assert_array_equal(batch.exits, [a.exits[0] for a in alone])
    np.testing.assert_array_equal(batch.labels, [a.labels[0] for a in alone])


def test_standalone_run_py_on_images(golden_bundle: Path, tmp_path: Path) -> None:
    from PIL import Image

    from edgeperceiver.runtime import load

    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate([(300, 400), (256, 256), (500, 240)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.jpg")
    assert (golden_bundle / "run.py").is_file()
    proc = subprocess.run([sys.executable, "-I", str(golden_bundle / "run.py"), str(tmp_path), "--json",
                           "--threads", "2"], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # one JSON document
    assert doc["entry"] == "onnxruntime-fp32"
    rows = doc["rows"]
    names, pred = load(golden_bundle, threads=2).predict_files([tmp_path])
    assert [r["file"] for r in rows] == list(names)
    assert [r["label"] for r in rows] == pred.labels.tolist()
    assert all(r["exit"] == 4 for r in rows)  # no thresholds in a fresh export: never exit early
