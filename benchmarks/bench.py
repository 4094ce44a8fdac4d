#!/usr/bin/env python3
"""Benchmark the runtime on one Dyn-Perceiver, everything measured in one interleaved run.

    .venv/bin/python benchmarks/bench.py [--threads 2] [--repeats 20] [--batch-sizes 1,8]
                                         [--exit-mix 0.4,0.3,0.2,0.1] [--bundle DIR] [--json OUT]

Model: ``reg800m_perceiver_t128`` with the golden fixture's weights (``shared/fixtures``),
or the model zoo's with seeded random weights when the fixtures are absent; exported to a
temporary bundle unless ``--bundle`` names one. Printed:

1. engines on the whole model ("never exit"): every contender in ``CONTENDERS`` plus the
   runtime's ORT monolithic model and chained segments, with ratios to ORT monolithic;
2. the price of the cut: chained segments / monolithic model, per batch size;
3. a forced exit mix: measured latency vs the ideal ``sum_k p_k * latency to exit k``;
4. the full ``edgeperceiver bench`` table (segments, exits) of the same run.

Medians; all measurements interleave round-robin, so drift hits every row alike.

Adding a contender (e.g. OpenVINO FP32/INT8): append a :class:`Contender` whose ``build``
returns ``run(x)`` for an (N, C, H, W) float32 batch, or raises :class:`Unavailable` with
the reason (printed, row skipped). :func:`runtime_contender` wraps any compiled target of
the bundle through the runtime.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgeperceiver.bench import BenchReport, bench  # noqa: E402
from edgeperceiver.errors import EdgePerceiverError  # noqa: E402
from edgeperceiver.machine import machine_line  # noqa: E402
from edgeperceiver.runtime import Runner, load  # noqa: E402

MODEL = "reg800m_perceiver_t128"
GOLDEN = REPO.parent / "shared" / "fixtures" / "dynperceiver"


class Unavailable(Exception):
    """A contender that cannot run here (missing engine, target not compiled...)."""


@dataclass(frozen=True)
class Context:
    """What a contender may use to build itself."""

    bundle: Path
    runner: Runner  #: the ONNX Runtime fp32 runner the benchmark drives
    threads: int
    model_name: str
    checkpoint: Path | None  #: the golden checkpoint, or None (zoo model, seeded weights)
    seed: int


RunFn = Callable[[np.ndarray], object]


@dataclass(frozen=True)
class Contender:
    """One engine running the whole model (all exits, no early exit)."""

    name: str
    build: Callable[[Context], RunFn]


def _torch_model(ctx: Context) -> Any:
    import torch

    from edgeperceiver.models import create_model, load_checkpoint

    torch.set_num_threads(ctx.threads)
    if ctx.checkpoint is not None:
        model = load_checkpoint(ctx.checkpoint)
    else:
        torch.manual_seed(ctx.seed)
        model = create_model(ctx.model_name)
    return model.eval()


def pytorch_eager(ctx: Context) -> RunFn:
    try:
        import torch
    except ImportError as exc:
        raise Unavailable(f"torch is not installed ({exc})") from exc
    model = _torch_model(ctx)

    def run(x: np.ndarray) -> object:
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    return run


def runtime_contender(target: str, **options: Any) -> Callable[[Context], RunFn]:
    """A contender running the bundle's compiled ``target`` through the runtime (never exit)."""

    def build(ctx: Context) -> RunFn:
        try:
            runner = load(ctx.bundle, target, threads=ctx.threads, **options)
        except EdgePerceiverError as exc:
            raise Unavailable(str(exc)) from exc
        return partial(runner.predict, thresholds=None)

    return build


#: engines compared with the runtime on the same model; extend this list
CONTENDERS: list[Contender] = [
    Contender("PyTorch eager fp32", pytorch_eager),
]


def export_bundle(out: Path, threads: int, seed: int) -> tuple[Path, Path | None]:
    """Export the golden checkpoint (or the zoo model with seeded weights) to ``out``."""
    from edgeperceiver.export import export_checkpoint, export_module

    ckpt = GOLDEN / f"{MODEL}.fp16.pth"
    if ckpt.is_file():
        export_checkpoint(ckpt, out, threads=threads)
        return out, ckpt
    import torch

    from edgeperceiver.models import create_model

    torch.manual_seed(seed)
    export_module(create_model(MODEL), (3, 224, 224), out, name=MODEL, threads=threads)
    return out, None


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def render(report: BenchReport, names: Sequence[str], skipped: dict[str, str]) -> str:
    sizes = [b.batch for b in report.batches]
    rows: list[tuple[str, list[float | None]]] = []
    for n in names:
        rows.append((n, [report.extra_ms.get(f"{n}@{b}") for b in sizes]))
    rows.append(("ORT fp32 monolithic model", [b.monolithic_ms for b in report.batches]))
    rows.append(("ORT fp32 runtime, chained segments", [b.cumulative_ms[-1] for b in report.batches]))
    mono = [b.monolithic_ms for b in report.batches]
    w0 = max(len(r[0]) for r in rows) + 2
    head = "engine (never exit)".ljust(w0) + "".join(f"{f'batch {b} ms':>14}{'vs ORT mono':>13}" for b in sizes)
    out = [head]
    for name, vals in rows:
        cells = ""
        for v, m in zip(vals, mono, strict=True):
            cells += f"{'-' if v is None else f'{v:.2f}':>14}"
            cells += f"{'-' if v is None or not m else f'{v / m:.2f}x':>13}"
        out.append(name.ljust(w0) + cells)
    for n, why in skipped.items():
        out.append(f"(skipped {n}: {why})")
    out.append("")
    out.append("price of the cut (chained segments / monolithic, never exit): " + ", ".join(
        f"batch {b.batch} {b.cut_price:.3f}x" for b in report.batches if b.cut_price is not None))
    if report.exit_mix is not None:
        mix = ",".join(f"{p:g}" for p in report.exit_mix)
        out.append(f"forced exit mix {mix}: " + "; ".join(
            f"batch {b.batch}: ideal {b.mix_ideal_ms:.2f} ms, measured {b.mix_measured_ms:.2f} ms "
            f"({b.mix_ratio:.3f}x)"
            for b in report.batches if b.mix_ratio is not None and b.mix_ideal_ms is not None
            and b.mix_measured_ms is not None))
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-sizes", type=_ints, default=(1, 8))
    p.add_argument("--exit-mix", type=_floats, default=(0.4, 0.3, 0.2, 0.1))
    p.add_argument("--mix-round", type=int, default=20, help="single samples per timed exit-mix round at batch 1")
    p.add_argument("--bundle", type=Path, default=None, help="an exported bundle to reuse (default: export now)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw report here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or process CPU time (robust on a shared machine; use with --threads 1)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="edgeperceiver-bench-") as tmp:
        bundle: Path
        ckpt: Path | None
        if args.bundle is not None:
            golden = GOLDEN / f"{MODEL}.fp16.pth"
            bundle, ckpt = args.bundle, (golden if golden.is_file() else None)
        else:
            print(f"exporting {MODEL} ...", file=sys.stderr)
            bundle, ckpt = export_bundle(Path(tmp) / "bundle", args.threads, args.seed)
        skipped: dict[str, str] = {}
        names: list[str] = []

        def extra(runner: Runner) -> dict[str, Callable[[], object]]:
            ctx = Context(bundle, runner, args.threads, runner.manifest.model_name if ckpt else MODEL, ckpt, args.seed)
            shape = tuple(int(d) for d in runner.manifest.input.shape[1:])
            x = np.random.default_rng(args.seed + 1).standard_normal((max(args.batch_sizes), *shape))
            x = x.astype(np.float32)
            jobs: dict[str, Callable[[], object]] = {}
            for c in CONTENDERS:
                try:
                    run = c.build(ctx)
                except Unavailable as exc:
                    skipped[c.name] = str(exc)
                    continue
                names.append(c.name)
                for b in args.batch_sizes:
                    jobs[f"{c.name}@{b}"] = partial(run, x[:b])
            return jobs

        def progress(done: int, total: int) -> None:
            if done % max(1, total // 10) == 0 or done == total:
                print(f"  timed {done}/{total}", file=sys.stderr)

        report = bench(bundle, None, batch_sizes=args.batch_sizes, exit_mix=args.exit_mix, repeats=args.repeats,
                       warmup=args.warmup, threads=args.threads, mix_round=args.mix_round, progress=progress,
                       seed=args.seed, extra_jobs=extra, clock=args.clock)
        weights = "golden fixture weights" if ckpt else "seeded random weights"
        print(f"== {MODEL} ({weights}), {args.threads} threads, medians of {args.repeats} interleaved repeats, "
              f"{args.clock} clock; {machine_line()} ==")
        print(render(report, names, skipped))
        print()
        print(report.render())
        if args.json is not None:
            args.json.write_text(json.dumps({"report": report.to_dict(), "skipped": skipped}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
