"""The demo model on its held-out digits: max_drop 0.5 holds on the checking part and early exit
cuts the mean latency that ``bench`` measures, versus always running to the last exit."""

from __future__ import annotations

from pathlib import Path

import pytest

import edgeperceiver.calibration as cal
from edgeperceiver.bundle import Bundle
from edgeperceiver.errors import CheckpointError


@pytest.mark.slow
def test_max_drop_on_the_demo_digits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    from edgeperceiver.bench import bench
    from edgeperceiver.datasets import load_digits_split, write_imagefolder
    from edgeperceiver.export import export_checkpoint
    from edgeperceiver.models import demo_checkpoint

    monkeypatch.setenv("EDGEPERCEIVER_CACHE", str(tmp_path / "cache"))
    try:
        ckpt = demo_checkpoint()
    except CheckpointError as exc:
        pytest.skip(str(exc))
    bundle = tmp_path / "digits"
    export_checkpoint(ckpt, bundle, threads=2)
    manifest = Bundle.open(bundle).manifest
    size = manifest.preprocess.size[0]
    split = load_digits_split(size)
    # the held-out digits as an ImageFolder of PNGs, read with the bundle's own preprocessing
    heldout = write_imagefolder(split.x_heldout, split.y_heldout, split.classes, tmp_path / "heldout")
    data = cal.load_dataset(heldout, manifest.preprocess)
    assert data.y is not None and len(data) == len(split.y_heldout) and data.skipped == ()
    # cost per exit: batch-1 latency through the runtime, measured on the target by bench
    result = cal.calibrate(bundle, heldout, goal=cal.MaxDrop(0.5), seed=0, latency="bench",
                           bench_threads=1, bench_clock="cpu")
    print(result.render())
    assert result.costs.unit == "ms" and len(result.costs.values) == len(manifest.segments)
    assert result.check.accuracy is not None and result.final_check.accuracy is not None
    assert result.met, "max_drop 0.5 must hold on the checking part"
    assert result.check.accuracy >= result.final_check.accuracy - 0.005
    assert result.check.share[-1] < 0.9, "early exits must take a real share of the samples"

    # latency measured by bench, per sample at batch 1: thresholds vs always the last exit
    _, check_idx = cal.split_fit_check(data.y, len(data), 0.5, 0)  # the checking part calibrate used
    report = bench(bundle, None, batch_sizes=(1,), data=data.x[check_idx], data_limit=len(check_idx), repeats=5,
                   warmup=1, threads=1, clock="cpu")
    b1 = report.batch(1)
    assert b1.thresholds_measured_ms is not None
    print(f"bench batch 1: early exit {b1.thresholds_measured_ms:.3f} ms/sample vs last exit "
          f"{b1.cumulative_ms[-1]:.3f} ms (to each exit: {', '.join(f'{v:.3f}' for v in b1.cumulative_ms)})")
    # same bench run, interleaved timings, process CPU time (the machine is shared); most samples leave
    # at exit 1 (about half the model here), so the saving is well beyond timing noise
    assert b1.thresholds_measured_ms < 0.95 * b1.cumulative_ms[-1]
