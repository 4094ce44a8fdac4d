#!/usr/bin/env python3
"""OpenVINO on reg800m_perceiver_t128, 224x224: every contender timed in one interleaved run.

    .venv/bin/python benchmarks/bench_openvino.py [--threads 2] [--rounds 8] [--block 6] [--batch 1]
                                                  [--bundle DIR] [--calib 128] [--json OUT]

Exports the golden checkpoint (or reuses ``--bundle``), compiles it for OpenVINO fp32,
bf16 and int8 (INT8 calibrated on synthetic smooth images: the golden weights are
untrained, so no real data set means anything to them), then times, round-robin with
medians (the 2-core machine is shared and drifts):

- PyTorch eager fp32, ONNX Runtime fp32 (monolithic);
- OpenVINO fp32 with a dynamic batch, fp32 / bf16 / int8 static (monolithic models);
- the INT8 segments run back to back (each an ``OpenVINOSession``, same call path as the
  monolithic row), as the runtime's zero-copy bound chain, and through the runtime's
  ``Runner`` (never exit), fp32 segments too;
- the monolithic INT8 model compiled with the opt-in ``fold_norms`` (skip: ``--no-fold-norms``).

Printed: the table, the must-show ratios (INT8 vs PyTorch eager and vs OpenVINO fp32, the
cut's price at fp32 and int8) and the INT8 compile report (per exit agreement with fp32).
``openvino_contenders()`` gives ``benchmarks/bench.py`` the same rows as ``Contender``\\ s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgeperceiver.bench import monolithic_session  # noqa: E402
from edgeperceiver.bundle import Bundle, TargetEntry  # noqa: E402
from edgeperceiver.machine import machine_line  # noqa: E402
from edgeperceiver.runtime.openvino import OpenVINOBackend  # noqa: E402
from edgeperceiver.runtime.runner import load  # noqa: E402
from edgeperceiver.timing import interleaved  # noqa: E402
from edgeperceiver.types import Precision, TargetName  # noqa: E402

MODEL = "reg800m_perceiver_t128"
GOLDEN = REPO.parent / "shared" / "fixtures" / "dynperceiver"
RunFn = Callable[[np.ndarray], object]


def synthetic_images(n: int, size: int = 224, *, seed: int = 0) -> np.ndarray:
    """``n`` smooth random RGB images (low-frequency colour fields plus texture), ImageNet-normalised."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), np.float32)
    grid = np.linspace(0.0, 1.0, size, dtype=np.float32)
    for i in range(n):
        cells = int(rng.integers(2, 9))
        coarse = rng.random((3, cells, cells), dtype=np.float32)
        idx = np.minimum((grid * cells).astype(int), cells - 1)
        img = coarse[:, idx][:, :, idx]
        img = 0.7 * img + 0.3 * rng.random((3, size, size), dtype=np.float32) * rng.random()
        out[i] = img
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    return (out - mean) / std


def compile_all(bundle: Path, calib: np.ndarray, threads: int, int8_options: Mapping[str, Any]) -> None:
    """Compile ``bundle`` for OpenVINO fp32, bf16 and int8 (skipping entries already there)."""
    from edgeperceiver.targets import compile_bundle

    have = Bundle.open(bundle).manifest.targets
    for p in (Precision.FP32, Precision.BF16, Precision.INT8):
        if f"openvino-{p.value}" in have:
            continue
        opts: dict[str, Any] = {"threads": threads, "latency_runs": 20}
        if p is Precision.INT8:
            opts.update(int8_options)
        compile_bundle(bundle, TargetName.OPENVINO, p, calib_data=calib if p is Precision.INT8 else None,
                       options=opts)


def monolithic(key: str, threads: int, *, dynamic: bool = False) -> Callable[[Path], RunFn]:
    """The target's monolithic model as one OpenVINO session (static shape per batch size)."""

    def build(path: Path) -> RunFn:
        b = Bundle.open(path)
        entry = b.manifest.target(key)
        backend = OpenVINOBackend(threads=threads)
        if dynamic:
            return _dynamic(b, entry, backend)
        sess = monolithic_session(b, entry, backend)
        if sess is None:
            raise ValueError(f"{key} has no monolithic model")
        name = b.manifest.input.name
        return lambda x: sess.run({name: x})

    return build


def _dynamic(b: Bundle, entry: TargetEntry, backend: OpenVINOBackend) -> RunFn:
    assert entry.monolithic is not None
    model = backend.core.read_model(str(b.path(entry.monolithic)))
    cm = backend.core.compile_model(model, "CPU", backend.config.compile_properties(
        str(entry.metadata.get("inference_precision", "f32"))))
    req = cm.create_infer_request()
    return lambda x: req.infer([x])


def chained(key: str, threads: int) -> Callable[[Path], RunFn]:
    """The target's segments back to back (every exit computed), one session per segment."""

    def build(path: Path) -> RunFn:
        b = Bundle.open(path)
        entry = b.manifest.target(key)
        backend = OpenVINOBackend(threads=threads)
        sessions = [backend.open(b, entry, s) for s in b.manifest.segments]
        specs = b.manifest.segments
        name = b.manifest.input.name

        def run(x: np.ndarray) -> object:
            live: dict[str, Any] = {name: x}
            for sess, spec in zip(sessions, specs, strict=True):
                live.update(sess.run({t.name: live[t.name] for t in spec.inputs}))
            return live

        return run

    return build


def bound(key: str, threads: int) -> Callable[[Path], RunFn]:
    """The target's segments back to back as the runtime's zero-copy chain (every exit computed).

    Each segment's carried inputs are bound once to the producing request's output tensors
    (``OpenVINOBackend.chain``): the image goes in, each exit's logits come out, no numpy
    in between. This is what the ``Runner`` runs while every sample goes on.
    """

    def build(path: Path) -> RunFn:
        b = Bundle.open(path)
        entry = b.manifest.target(key)
        backend = OpenVINOBackend(threads=threads)
        sessions = tuple(backend.open(b, entry, s) for s in b.manifest.segments)
        chain = backend.chain(sessions, b.manifest.input.name)
        assert chain is not None

        def run(x: np.ndarray) -> object:
            state = chain.start(x)
            assert state is not None
            return [state.run(k) for k in range(len(sessions))]  # every exit's logits

        return run

    return build


def runner(key: str, threads: int) -> Callable[[Path], RunFn]:
    """The runtime's Runner on ``key`` (thresholds off: every sample takes the last exit)."""

    def build(path: Path) -> RunFn:
        r = load(path, key, threads=threads)
        return lambda x: r.predict(x, thresholds=None)

    return build


def onnxruntime_mono(threads: int) -> Callable[[Path], RunFn]:
    def build(path: Path) -> RunFn:
        import onnxruntime as ort

        b = Bundle.open(path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(b.path(b.manifest.model_path)), so, providers=["CPUExecutionProvider"])
        name = b.manifest.input.name
        return lambda x: sess.run(None, {name: x})

    return build


def _torch_worker(conn: Any, threads: int, checkpoint: str | None, batch: int) -> None:
    """Child process: build the PyTorch model, then run one forward per request on the pipe."""
    import torch

    from edgeperceiver.models import create_model, load_checkpoint

    torch.set_num_threads(threads)
    model = load_checkpoint(checkpoint) if checkpoint is not None else create_model(MODEL)
    model.eval()
    x = torch.from_numpy(synthetic_images(batch, seed=7))
    conn.send("ready")
    try:
        while conn.recv():
            with torch.inference_mode():
                model(x)
            conn.send(True)
    except EOFError:  # the benchmark finished and closed the pipe
        return


def pytorch_eager(threads: int, checkpoint: Path | None, batch: int) -> Callable[[Path], RunFn]:
    """PyTorch eager in its own process (one pipe round trip, ~0.1 ms, per call).

    In-process, PyTorch's OpenMP team and OpenVINO's/ONNX Runtime's thread pools share the
    2 cores and PyTorch's many small parallel regions measured 5-10x slower than alone.
    """

    def build(path: Path) -> RunFn:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_torch_worker, args=(child, threads, None if checkpoint is None else str(checkpoint),
                                                       batch), daemon=True)
        proc.start()
        if parent.recv() != "ready":
            raise RuntimeError("the PyTorch worker did not start")

        def run(x: np.ndarray) -> object:
            parent.send(True)
            return parent.recv()

        return run

    return build


def _on(path: Path, build: Callable[[Path], RunFn]) -> Callable[[Path], RunFn]:
    """``build`` applied to ``path`` whatever bundle it is given (a contender on another bundle)."""

    def on(_bundle: Path) -> RunFn:
        return build(path)

    return on


def openvino_contenders(threads: int) -> list[tuple[str, Callable[[Path], RunFn]]]:
    """(name, build(bundle) -> run(x)) for every OpenVINO row; needs the openvino-* entries."""
    return [
        ("OpenVINO fp32 dynamic batch", monolithic("openvino-fp32", threads, dynamic=True)),
        ("OpenVINO fp32", monolithic("openvino-fp32", threads)),
        ("OpenVINO bf16", monolithic("openvino-bf16", threads)),
        ("OpenVINO int8", monolithic("openvino-int8", threads)),
        ("OpenVINO fp32 segments chained", chained("openvino-fp32", threads)),
        ("OpenVINO int8 segments chained", chained("openvino-int8", threads)),
        ("OpenVINO int8 segments bound", bound("openvino-int8", threads)),
        ("OpenVINO int8 runtime Runner", runner("openvino-int8", threads)),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds")
    p.add_argument("--block", type=int, default=6, help="timed back-to-back calls per contender per round")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--calib", type=int, default=128, help="synthetic calibration images for INT8")
    p.add_argument("--bundle", type=Path, default=None, help="an exported bundle (copied, then compiled)")
    p.add_argument("--int8-options", type=json.loads, default={}, help='JSON, e.g. {"preset": "performance"}')
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--keep", type=Path, default=None, help="copy the compiled bundle here (reuse with --bundle)")
    p.add_argument("--no-fold-norms", action="store_true", help="skip the opt-in fold_norms INT8 row")
    args = p.parse_args(argv)

    ckpt = GOLDEN / f"{MODEL}.fp16.pth"
    checkpoint = ckpt if ckpt.is_file() else None
    with tempfile.TemporaryDirectory(prefix="ep-bench-ov-") as tmp:
        bundle = Path(tmp) / "bundle"
        if args.bundle is not None:
            shutil.copytree(args.bundle, bundle)
        else:
            from edgeperceiver.export import export_checkpoint, export_module

            print(f"exporting {MODEL} ...", file=sys.stderr)
            if checkpoint is not None:
                export_checkpoint(checkpoint, bundle, threads=args.threads)
            else:
                from edgeperceiver.models import create_model

                export_module(create_model(MODEL), (3, 224, 224), bundle, name=MODEL, threads=args.threads)
        calib = synthetic_images(args.calib, seed=1)
        compile_all(bundle, calib, args.threads, args.int8_options)
        rows: list[tuple[str, Callable[[Path], RunFn]]] = [
            ("PyTorch eager fp32", pytorch_eager(args.threads, checkpoint, args.batch)),
            ("PyTorch eager fp32, 1 thread", pytorch_eager(1, checkpoint, args.batch)),
            ("ONNX Runtime fp32", onnxruntime_mono(args.threads)),
            *openvino_contenders(args.threads),
        ]
        if not args.no_fold_norms:  # the opt-in LayerNorm fold, timed in the same run
            folded = Path(tmp) / "bundle-fold-norms"
            shutil.copytree(bundle, folded)
            from edgeperceiver.targets import compile_bundle

            compile_bundle(folded, TargetName.OPENVINO, Precision.INT8, calib_data=calib,
                           options={"threads": args.threads, "latency_runs": 20, **args.int8_options,
                                    "fold_norms": True})
            rows.append(("OpenVINO int8, fold_norms", _on(folded, monolithic("openvino-int8", args.threads))))
        x = synthetic_images(args.batch, seed=7)
        jobs = {}
        for name, build in rows:
            run = build(bundle)
            jobs[name] = (lambda run=run: run(x))
        print(f"timing {len(jobs)} contenders, {args.rounds} rounds x {args.block} calls ...", file=sys.stderr)
        # blocks of back-to-back calls, each after an untimed one; the order reshuffled every round
        times = interleaved(jobs, repeats=args.rounds * args.block, block=args.block, settle=1, warmup=0)
        med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
        q1 = {n: float(np.percentile(t, 25)) * 1e3 for n, t in times.items()}
        q3 = {n: float(np.percentile(t, 75)) * 1e3 for n, t in times.items()}
        # under contention PyTorch's 2-thread OpenMP team can be far slower than 1 thread:
        # compare against PyTorch's best configuration, never its pathological one
        eager = min(med["PyTorch eager fp32"], med["PyTorch eager fp32, 1 thread"])
        w = max(len(n) for n in med) + 2
        print(f"== {MODEL} 224x224, batch {args.batch}, {args.threads} threads, "
              f"medians of {args.rounds} interleaved rounds x {args.block} calls; {machine_line()} ==")
        print("engine".ljust(w) + f"{'median ms':>11}{'p25':>9}{'p75':>9}{'vs eager*':>10}")
        for n in med:
            print(n.ljust(w) + f"{med[n]:11.2f}{q1[n]:9.2f}{q3[n]:9.2f}{eager / med[n]:9.2f}x")
        int8, fp32 = med["OpenVINO int8"], med["OpenVINO fp32"]
        summary = {
            "int8_vs_eager": eager / int8,
            "int8_vs_openvino_fp32": fp32 / int8,
            "cut_price_int8": med["OpenVINO int8 segments chained"] / int8 - 1.0,
            "cut_price_fp32": med["OpenVINO fp32 segments chained"] / fp32 - 1.0,
            "cut_price_int8_bound": med["OpenVINO int8 segments bound"] / int8 - 1.0,
            "cut_price_int8_runner": med["OpenVINO int8 runtime Runner"] / int8 - 1.0,
        }
        if "OpenVINO int8, fold_norms" in med:
            fold = med["OpenVINO int8, fold_norms"]
            summary.update(fold_norms_vs_eager=eager / fold, fold_norms_vs_openvino_fp32=fp32 / fold)
        print()
        print(f"OpenVINO int8 is {summary['int8_vs_eager']:.2f}x faster than PyTorch eager fp32 (its faster thread "
              "setting) "
              f"and {summary['int8_vs_openvino_fp32']:.2f}x faster than OpenVINO fp32")
        print(f"price of the cut (segments chained / monolithic): int8 {summary['cut_price_int8']:+.1%}, "
              f"fp32 {summary['cut_price_fp32']:+.1%}; int8 bound zero-copy {summary['cut_price_int8_bound']:+.1%}, "
              f"through the Runner {summary['cut_price_int8_runner']:+.1%}")
        if "fold_norms_vs_eager" in summary:
            print(f"opt-in fold_norms: OpenVINO int8 {summary['fold_norms_vs_eager']:.2f}x faster than PyTorch eager "
                  f"and {summary['fold_norms_vs_openvino_fp32']:.2f}x faster than OpenVINO fp32")
        entry = Bundle.open(bundle).manifest.target("openvino-int8")
        print("INT8 compile report:", json.dumps({k: entry.metadata.get(k) for k in
                                                   ("method", "quantization", "agreement", "segment_ms",
                                                    "monolithic_ms", "cut_overhead")}, indent=1))
        if args.keep is not None:
            shutil.copytree(bundle, args.keep, dirs_exist_ok=False)
        if args.json is not None:
            args.json.write_text(json.dumps({"median_ms": med, "p25_ms": q1, "p75_ms": q3, **summary,
                                             "int8_entry": dict(entry.metadata)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
