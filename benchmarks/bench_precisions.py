#!/usr/bin/env python3
"""OpenVINO per precision: the Runner at never-exit against the monolithic model, and ``auto``.

    .venv/bin/python benchmarks/bench_precisions.py [--bundle DIR | --demo | --digits-checkpoint CKPT]
                                                    [--threads 2] [--rounds 8] [--block 5] [--calib 128]
                                                    [--json OUT]

Takes a bundle (``--bundle``; default: ``reg800m_perceiver_t128`` exported from the golden
checkpoint, INT8/auto calibrated on synthetic images), the demo model (``--demo``: the
shipped digits checkpoint) or a checkpoint ``scripts/train_digits.py`` trained on the digits
(``--digits-checkpoint``, e.g. reg800m at 224x224; exported to ``--bundle`` if given). Digits
models are calibrated on 300 training digits, and every entry's per-exit accuracy on the
held-out digits is printed against fp32's (the 0.5-point gate). Compiles the OpenVINO entries
fp32, bf16 (where the CPU has it), int8 and auto that are missing, then times at batch 1, all
contenders interleaved in blocks with medians (:mod:`edgeperceiver.timing`):

- per precision: the monolithic model and the ``Runner`` at never-exit (all samples reach
  the last exit, the carried tensors bound zero-copy);
- the ``auto`` entry through the ``Runner`` at never-exit;
- PyTorch eager fp32 (reg800m only; its own process).

Prints the CPU model, versions and date, the table, and the must-show ratios: Runner /
monolithic per precision, auto against the fastest single precision (both through the
Runner, to the last exit) and against PyTorch eager.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_onnxruntime import export_reg800m  # noqa: E402
from bench_openvino import GOLDEN, MODEL, monolithic, pytorch_eager, synthetic_images  # noqa: E402

from edgeperceiver.bundle import Bundle  # noqa: E402
from edgeperceiver.machine import cpu_model  # noqa: E402
from edgeperceiver.runtime.runner import load  # noqa: E402
from edgeperceiver.timing import interleaved  # noqa: E402
from edgeperceiver.types import Precision, TargetName  # noqa: E402

RunFn = Callable[[np.ndarray], object]


def never_exit(path: Path, key: str, threads: int) -> RunFn:
    """The Runner on ``key`` with every exit but the last disabled (all samples go on)."""
    r = load(path, key, threads=threads, thresholds=[None] * len(Bundle.open(path).manifest.exits))
    return r.predict


def compile_missing(bundle: Path, calib: np.ndarray, threads: int) -> list[str]:
    import openvino as ov

    from edgeperceiver.targets import compile_bundle
    from edgeperceiver.targets.openvino_ir import has_bf16

    precisions = [Precision.FP32, *([Precision.BF16] if has_bf16(ov.Core()) else []), Precision.INT8, Precision.AUTO]
    have = Bundle.open(bundle).manifest.targets
    for p in precisions:
        key = f"openvino-{p.value}"
        if key not in have:
            print(f"compiling {key} ...", file=sys.stderr, flush=True)
            compile_bundle(bundle, TargetName.OPENVINO, p,
                           calib_data=calib if p in (Precision.INT8, Precision.AUTO) else None,
                           options={"threads": threads, "latency_runs": 20})
    return [p.value for p in precisions if p is not Precision.AUTO]


def digits_bundle(dest: Path, checkpoint: Path, threads: int) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    """``checkpoint`` (trained on the digits) exported to ``dest`` unless there; 300 training
    digits for calibration, then the held-out digits and their labels, at its input size."""
    from edgeperceiver.datasets.digits import load_digits_split, to_model_input
    from edgeperceiver.export import export_checkpoint

    if not (dest / "manifest.json").is_file():
        export_checkpoint(checkpoint, dest, threads=threads)
    data = load_digits_split(int(Bundle.open(dest).manifest.input.shape[-1]))
    return dest, to_model_input(data.x_train[:300]), to_model_input(data.x_heldout), data.y_heldout


def accuracy_table(bundle: Path, keys: Sequence[str], x: np.ndarray, y: np.ndarray, threads: int) -> float:
    """Print each entry's held-out top-1 accuracy per exit; the largest drop below fp32, in points."""
    acc = {k: [float(np.mean(e.argmax(1) == y)) * 100 for e in load(bundle, k, threads=threads).all_exits(x)]
           for k in keys}
    n = len(acc[keys[0]])
    print(f"held-out top-1 accuracy, {len(y)} digits (%)")
    print("| entry | " + " | ".join(f"exit {i}" for i in range(1, n + 1)) + " |\n|---|" + "---:|" * n)
    for k, row in acc.items():
        print(f"| {k} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    ref = acc["openvino-fp32"]
    return max(r - v for k, row in acc.items() for r, v in zip(ref, row, strict=True))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=None, help="a bundle (compiled in place where entries are missing)")
    p.add_argument("--demo", action="store_true", help="the shipped demo model instead of reg800m")
    p.add_argument("--digits-checkpoint", type=Path, default=None,
                   help="a checkpoint scripts/train_digits.py wrote, instead of reg800m's untrained weights")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--calib", type=int, default=128, help="synthetic calibration images (reg800m)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: the process's CPU time (robust to other processes' load; with --threads 1)")
    p.add_argument("--no-eager", action="store_true", help="skip PyTorch eager")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    import onnxruntime
    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="ep-bench-prec-") as tmp:
        heldout: tuple[np.ndarray, np.ndarray] | None = None
        if args.demo or args.digits_checkpoint is not None:
            from edgeperceiver.models import demo_checkpoint

            ckpt = demo_checkpoint() if args.demo else args.digits_checkpoint
            bundle, calib, x_held, y_held = digits_bundle(args.bundle or Path(tmp) / "digits", ckpt, args.threads)
            heldout = (x_held, y_held)
            size = int(calib.shape[-1])
            name = f"{Bundle.open(bundle).manifest.model_name} trained on the digits, {size}x{size}"
        else:
            bundle = args.bundle or export_reg800m(Path(tmp) / "bundle", args.threads)
            calib = synthetic_images(args.calib, seed=1)
            name = f"{MODEL} 224x224"
        singles = compile_missing(bundle, calib, args.threads)
        manifest = Bundle.open(bundle).manifest
        x = np.ascontiguousarray(synthetic_images(1, size=int(manifest.input.shape[-1]), seed=7)
                                 if heldout is None else heldout[0][:1])
        rows: dict[str, RunFn] = {}
        for prec in singles:
            rows[f"{prec} monolithic"] = monolithic(f"openvino-{prec}", args.threads)(bundle)
            rows[f"{prec} Runner never-exit"] = never_exit(bundle, f"openvino-{prec}", args.threads)
        rows["auto Runner never-exit"] = never_exit(bundle, "openvino-auto", args.threads)
        if not args.demo and not args.no_eager and args.clock == "wall":  # eager runs in its own process
            eager = args.digits_checkpoint or GOLDEN / f"{MODEL}.fp16.pth"
            rows["PyTorch eager fp32"] = pytorch_eager(args.threads, eager if eager.is_file() else None, 1)(bundle)
        jobs = {n: (lambda f=f: f(x)) for n, f in rows.items()}
        print(f"timing {len(jobs)} contenders, {args.rounds} rounds x {args.block} calls ...", file=sys.stderr)
        times = interleaved(jobs, repeats=args.rounds * args.block, block=args.block, settle=1, min_seconds=1.0,
                            clock=args.clock)
        med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
        auto = manifest.target("openvino-auto").metadata.get("auto", {})
        drop = None
        if heldout is not None:
            keys = [f"openvino-{q}" for q in (*singles, "auto")]
            drop = accuracy_table(bundle, keys, *heldout, threads=args.threads)
        if args.bundle is None and args.json is not None:
            shutil.copytree(bundle, args.json.with_suffix(".bundle"), dirs_exist_ok=True)
    print(f"{name}, batch 1, {args.threads} threads, {args.clock} clock; CPU {cpu_model()}; "
          f"OpenVINO {ov.get_version()}, "
          f"onnxruntime {onnxruntime.__version__}, numpy {np.__version__}; {datetime.date.today().isoformat()}")
    print("| contender | median ms |\n|---|---:|")
    for n, v in med.items():
        print(f"| {n} | {v:.2f} |")
    summary: dict[str, Any] = {"auto_per_segment": auto.get("per_segment")}
    if drop is not None:
        summary["largest_drop_below_fp32_points"] = drop
    for prec in singles:
        summary[f"runner_vs_monolithic_{prec}"] = med[f"{prec} Runner never-exit"] / med[f"{prec} monolithic"]
    best = min(singles, key=lambda q: med[f"{q} Runner never-exit"])
    summary["best_single"] = best
    summary["auto_speedup_vs_best_single"] = med[f"{best} Runner never-exit"] / med["auto Runner never-exit"]
    summary["auto_speedup_vs_fp32"] = med["fp32 Runner never-exit"] / med["auto Runner never-exit"]
    if "PyTorch eager fp32" in med:
        summary["auto_speedup_vs_eager"] = med["PyTorch eager fp32"] / med["auto Runner never-exit"]
    print()
    for k, v in summary.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    if args.json is not None:
        args.json.write_text(json.dumps({"median_ms": med, **summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
