#!/usr/bin/env python3
"""ONNX Runtime: the runtime's segment chain at never-exit vs one default ``InferenceSession``.

    .venv/bin/python benchmarks/bench_onnxruntime.py [--bundle DIR] [--threads 2] [--rounds 10] [--block 5]

Exports ``reg800m_perceiver_t128`` from the golden checkpoint (or takes ``--bundle``, any
exported bundle) and times, interleaved in blocks with medians (:mod:`edgeperceiver.timing`),
at batch 1:

- in one process: a default ``InferenceSession`` on the monolithic model (ORT's defaults,
  ``intra_op_num_threads`` set), the same with spinning off, and the ``Runner`` at
  never-exit with per-session pools (the default: spinning until each run returns), with
  spinning off, and with ORT's plain spinning;
- in a second process (a process-wide pool must exist before the first session): the
  monolithic model and the ``Runner`` both on one shared intra-op pool (``pool="shared"``).

Prints the CPU model, versions and one table per process; ``--json`` writes the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgeperceiver.bundle import Bundle  # noqa: E402
from edgeperceiver.machine import cpu_model  # noqa: E402
from edgeperceiver.runtime.runner import load  # noqa: E402
from edgeperceiver.timing import interleaved  # noqa: E402

MODEL = "reg800m_perceiver_t128"
GOLDEN = REPO.parent / "shared" / "fixtures" / "dynperceiver"


def export_reg800m(dest: Path, threads: int) -> Path:
    from edgeperceiver.export import export_checkpoint, export_module

    ckpt = GOLDEN / f"{MODEL}.fp16.pth"
    if ckpt.is_file():
        export_checkpoint(ckpt, dest, threads=threads)
    else:  # seeded random weights from the model registry
        import torch

        from edgeperceiver.models import create_model

        torch.manual_seed(0)
        export_module(create_model(MODEL), (3, 224, 224), dest, name=MODEL, threads=threads)
    return dest


def _mono(bundle: Path, threads: int, *, spin: bool | None, shared: bool) -> Callable[[np.ndarray], object]:
    import onnxruntime as ort

    b = Bundle.open(bundle)
    so = ort.SessionOptions()
    if shared:
        so.use_per_session_threads = False
    else:
        so.intra_op_num_threads = threads
    if spin is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    sess = ort.InferenceSession(str(b.path(b.manifest.model_path)), so, providers=["CPUExecutionProvider"])
    name = b.manifest.input.name
    return lambda x: sess.run(None, {name: x})


def _runner(bundle: Path, threads: int, **options: Any) -> Callable[[np.ndarray], object]:
    r = load(bundle, "onnxruntime-fp32", threads=threads, thresholds=[None] * len(Bundle.open(bundle).manifest.exits),
             **options)
    return r.predict


def contenders(bundle: Path, threads: int, shared: bool) -> dict[str, Callable[[np.ndarray], object]]:
    if shared:  # the pool first: every session of this process uses it
        runner = _runner(bundle, threads, pool="shared")
        return {"ORT InferenceSession, monolithic, shared pool": _mono(bundle, threads, spin=None, shared=True),
                "Runner never-exit, pool=shared": runner}
    return {
        "ORT InferenceSession, monolithic (ORT defaults)": _mono(bundle, threads, spin=None, shared=False),
        "ORT InferenceSession, monolithic, spinning off": _mono(bundle, threads, spin=False, shared=False),
        "Runner never-exit, pool=session (default)": _runner(bundle, threads),
        "Runner never-exit, pool=session, spin=False": _runner(bundle, threads, spin=False),
        "Runner never-exit, pool=session, spin=True": _runner(bundle, threads, spin=True),
    }


def measure(bundle: Path, threads: int, rounds: int, block: int, shared: bool) -> dict[str, float]:
    b = Bundle.open(bundle)
    shape = (1, *(int(d) for d in b.manifest.input.shape[1:]))
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    jobs = contenders(bundle, threads, shared)
    times = interleaved({n: (lambda f=f: f(x)) for n, f in jobs.items()}, repeats=rounds * block, block=block,
                        settle=1, min_seconds=2.0, seed=0)
    return {n: statistics.median(t) * 1e3 for n, t in times.items()}


def table(ms: dict[str, float], ref: str) -> str:
    lines = ["| contender | median ms | vs " + ref.split(",")[0] + " |", "|---|---:|---:|"]
    lines += [f"| {n} | {v:.2f} | {v / ms[ref]:.3f}x |" for n, v in ms.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--shared-only", action="store_true", help=argparse.SUPPRESS)  # the second process
    args = p.parse_args(argv)
    if args.shared_only:
        print(json.dumps(measure(args.bundle, args.threads, args.rounds, args.block, True)))
        return 0
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="ep-bench-ort-") as tmp:
        bundle = args.bundle or export_reg800m(Path(tmp) / "bundle", args.threads)
        per_session = measure(bundle, args.threads, args.rounds, args.block, False)
        out = subprocess.run([sys.executable, __file__, "--shared-only", "--bundle", str(bundle), "--threads",
                              str(args.threads), "--rounds", str(args.rounds), "--block", str(args.block)],
                             capture_output=True, text=True, check=True)
        shared = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"CPU: {cpu_model()}; onnxruntime {ort.__version__}; numpy {np.__version__}; batch 1, "
          f"{args.threads} threads; bundle {bundle.name if args.bundle else MODEL}")
    print("\nper-session pools (one process):\n")
    print(table(per_session, "ORT InferenceSession, monolithic (ORT defaults)"))
    print("\none shared pool (a second process):\n")
    print(table(shared, "ORT InferenceSession, monolithic, shared pool"))
    if args.json is not None:
        args.json.write_text(json.dumps({"per_session": per_session, "shared": shared}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
