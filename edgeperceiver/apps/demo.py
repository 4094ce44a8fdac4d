"""``edgeperceiver demo``: the whole toolchain on a Dyn-Perceiver trained on real digits.

export the shipped checkpoint -> compile for ONNX Runtime (FP32) and OpenVINO (INT8) ->
calibrate each for ``max_drop`` -> run the held-out images at batch 1 with early exit, timed
against always running to the last exit -> one table, a Pareto plot per target.

Accuracy and exit shares are reported on the calibration's *checking* split (images the
thresholds were not fitted on); latency is measured on those same images at batch 1: the
median over interleaved passes of the mean time per image. Every engine runs on
``DEMO_THREADS`` thread(s), for the compile-time latencies (the calibration's costs) and the
measured runs alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from edgeperceiver.errors import CalibrationError
from edgeperceiver.progress import Progress, StageProgress
from edgeperceiver.timing import interleaved
from edgeperceiver.types import Precision, TargetName

Echo = Callable[[str], None]

#: (target, precision) compiled and compared by the demo
DEMO_TARGETS: tuple[tuple[TargetName, Precision], ...] = (
    (TargetName.ONNXRUNTIME, Precision.FP32),
    (TargetName.OPENVINO, Precision.INT8),
)

#: engine threads in the demo. A 32x32 model at batch 1 has layers too small to split: on
#: this 2-core machine one thread measured ~30% faster than two on both engines (OpenVINO
#: INT8 1.05 vs 1.52 ms, ONNX Runtime 1.48 vs 2.11 ms per image), and a thread that waits
#: for no other is far less sensitive to a busy machine
DEMO_THREADS = 1


@dataclass(frozen=True)
class DemoRow:
    """One target under one policy, measured on the checking split."""

    target: str
    policy: str  #: "last exit" or the calibrated goal
    accuracy: float  #: top-1, in [0, 1]
    latency_ms: float  #: mean measured latency per image, batch 1
    share: tuple[float, ...]  #: share of images leaving at each exit
    thresholds: tuple[float | None, ...]


@dataclass(frozen=True)
class DemoReport:
    """What the demo measured: per-exit accuracy, and one row per target and policy."""

    exit_accuracy: Sequence[tuple[str, tuple[float, ...]]]  #: per target, accuracy of each exit alone
    rows: tuple[DemoRow, ...]
    plots: tuple[Path, ...]
    n_check: int
    seconds: float
    threads: int = DEMO_THREADS

    def render(self) -> str:
        k = len(self.rows[0].share)
        head = f"{'target':<18}{'policy':<16}{'top-1':>7}{'ms/image':>10}{'speedup':>9}  " + " ".join(
            f"{'exit' + str(i + 1):>6}" for i in range(k)
        )
        lines = [
            f"held-out digits, checking split ({self.n_check} images), batch 1, {self.threads} thread(s) "
            "per engine, measured:",
            head,
            "-" * len(head),
        ]
        base: dict[str, float] = {r.target: r.latency_ms for r in self.rows if r.policy == "last exit"}
        for r in self.rows:
            shares = " ".join(f"{s:>6.0%}" for s in r.share)
            speedup = base[r.target] / r.latency_ms if r.latency_ms > 0 else float("nan")
            lines.append(
                f"{r.target:<18}{r.policy:<16}{r.accuracy:>7.1%}{r.latency_ms:>10.3f}{speedup:>8.2f}x  {shares}"
            )
        lines.append("")
        lines.append("accuracy of each exit alone (checking split):")
        for target, accs in self.exit_accuracy:
            lines.append(f"  {target:<18}" + "  ".join(f"exit{i + 1} {a:.1%}" for i, a in enumerate(accs)))
        lines.append("")
        lines.extend(f"Pareto plot: {p}" for p in self.plots)
        lines.append(f"demo finished in {self.seconds:.0f} s")
        return "\n".join(lines)


def run_demo(
    out: str | Path,
    *,
    echo: Echo = print,
    max_drop: float = 0.5,
    seed: int = 0,
    rounds: int = 5,
    threads: int = DEMO_THREADS,
    progress: StageProgress | None = None,
) -> DemoReport:
    """Run the demo in ``out`` (created; its bundle is replaced) and return its report.

    ``echo`` gets the step lines and tables; ``progress(stage, done, total)`` the progress of
    the long steps (threshold collection per target, the timed runs).
    """
    import edgeperceiver.calibration as cal
    from edgeperceiver.bundle import Bundle
    from edgeperceiver.data import split_fit_check
    from edgeperceiver.datasets.digits import load_digits_split, write_imagefolder
    from edgeperceiver.export import export_checkpoint
    from edgeperceiver.models import DEMO_MODEL, demo_checkpoint, model_info
    from edgeperceiver.targets import compile_bundle

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = model_info(DEMO_MODEL).input_size

    echo(f"[1/5] data: scikit-learn digits, upsampled to {size}x{size}")
    split = load_digits_split(size)
    heldout_dir, calib_dir = out / "heldout", out / "calib"
    write_imagefolder(split.x_heldout, split.y_heldout, split.classes, heldout_dir)
    write_imagefolder(split.x_train, split.y_train, split.classes, calib_dir)
    echo(f"      {len(split.y_train)} training images (INT8 calibration: {calib_dir}),")
    echo(f"      {len(split.y_heldout)} held-out images ({heldout_dir})")

    echo(f"[2/5] export {demo_checkpoint().name} -> {out / 'bundle'}")
    bundle_dir = out / "bundle"
    export = export_checkpoint(demo_checkpoint(), bundle_dir, labels=list(split.classes), overwrite=True)
    echo(_indent(export.render()))

    echo("[3/5] compile: " + ", ".join(f"{t.value} {p.value}" for t, p in DEMO_TARGETS))
    keys = []
    for target, precision in DEMO_TARGETS:
        calib = calib_dir if precision is Precision.INT8 else None
        entry = compile_bundle(bundle_dir, target, precision, calib_data=calib, calib_samples=300,
                               options={"threads": threads})
        keys.append(entry.key)
        report = entry.metadata.get("report")
        if report:
            echo(_indent(str(report)))

    echo(f"[4/5] calibrate each target for max-drop {max_drop} points")
    results = []
    for key in keys:
        stages = None if progress is None else partial(_prefixed, progress, key)
        result = cal.calibrate(bundle_dir, heldout_dir, target=key, goal=cal.MaxDrop(max_drop), seed=seed,
                               progress=stages)  # fmt: skip
        results.append(result)
        echo(_indent(result.render()))

    echo(f"[5/5] run the checking split at batch 1 ({threads} thread(s) per engine), early exit vs always "
         "the last exit, every target and policy interleaved")
    data = cal.load_dataset(heldout_dir, Bundle.open(bundle_dir).manifest.preprocess)
    if data.y is None:
        raise CalibrationError(f"{heldout_dir} lost its class folders")
    _, check = split_fit_check(data.y, len(data), 0.5, seed)
    x, y = data.x[check], data.y[check]
    goal = f"max-drop {max_drop}"
    timing = None if progress is None else partial(progress, "timed runs")
    rows = _measure(bundle_dir, {k: r.thresholds.values for k, r in zip(keys, results, strict=True)}, x, y, goal,
                    rounds, threads, progress=timing)  # fmt: skip
    exit_accuracy: list[tuple[str, tuple[float, ...]]] = []
    plots: list[Path] = []
    for key, result in zip(keys, results, strict=True):
        logits = _all_exits(bundle_dir, key, x)
        exit_accuracy.append((key, tuple(float(np.mean(z.argmax(1) == y)) for z in logits)))
        plots.extend(bundle_dir / f for f in result.report_files if f.endswith(".png"))
    report = DemoReport(tuple(exit_accuracy), tuple(rows), tuple(plots), len(check), time.perf_counter() - t_start,
                        threads)
    echo("")
    echo(report.render())
    return report


def _all_exits(bundle: Path, key: str, x: np.ndarray) -> list[np.ndarray]:
    from edgeperceiver.runtime import load

    return load(bundle, key).all_exits(x)


def _measure(
    bundle: Path,
    thresholds: Mapping[str, Sequence[float | None]],
    x: np.ndarray,
    y: np.ndarray,
    goal: str,
    rounds: int = 5,
    threads: int = DEMO_THREADS,
    *,
    progress: Progress | None = None,
) -> list[DemoRow]:
    """Mean latency per image at batch 1, per target (``thresholds``' keys) under both policies.

    ``rounds`` timed passes over every image; in each round every (target, policy) makes one
    pass, in an order reshuffled every round (:func:`~edgeperceiver.timing.interleaved`), so that
    the machine's drift reaches all rows alike (the 2-core machine is shared and noisy). Median
    of the passes.
    """
    from edgeperceiver.runtime import load

    jobs = {}
    for key, th in thresholds.items():
        runner = load(bundle, key, batch_size=1, threads=threads)
        k = runner.num_exits
        jobs[(key, "last exit")] = (runner, (*([None] * (k - 1)), 0.0))
        jobs[(key, goal)] = (runner, tuple(th))
    preds = {job: runner.predict(x, thresholds=th) for job, (runner, th) in jobs.items()}  # also warms up

    def one_pass(runner: Any, th: tuple[float | None, ...]) -> None:
        for i in range(x.shape[0]):
            runner.predict(x[i : i + 1], thresholds=th)

    passes = interleaved(
        {job: partial(one_pass, *jobs[job]) for job in jobs}, repeats=rounds, warmup=0, progress=progress
    )
    rows = []
    for (key, policy), (runner, th) in jobs.items():
        exits = preds[(key, policy)].exits
        share = tuple(float(np.mean(exits == e)) for e in range(1, runner.num_exits + 1))
        accuracy = float(np.mean(preds[(key, policy)].labels == y))
        ms = 1e3 * statistics.median(passes[(key, policy)]) / x.shape[0]  # per image
        rows.append(DemoRow(key, policy, accuracy, ms, share, th))
    return rows


def _indent(text: str) -> str:
    return "\n".join("      " + line for line in text.splitlines())


def _prefixed(progress: StageProgress, prefix: str, stage: str, done: int, total: int) -> None:
    """Report ``stage`` of one target as ``"<prefix>: <stage>"``."""
    progress(f"{prefix}: {stage}", done, total)
