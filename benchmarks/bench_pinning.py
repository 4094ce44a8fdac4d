#!/usr/bin/env python3
"""OpenVINO CPU pinning with two cores' models in one process: pinned against unpinned processes.

    .venv/bin/python benchmarks/bench_pinning.py BUNDLE [--target openvino-int8] [--threads 2]
                                                 [--processes 4] [--rounds 8]

Each trial is a fresh process holding what a real one often holds: the entry's monolithic
model and its ``Runner`` at never-exit, each from its own ``OpenVINOBackend`` (its own
``ov.Core``), timed interleaved. Trials alternate ``ENABLE_CPU_PINNING`` on (OpenVINO's
default on Linux) and off (the backend's default), so both see the same machine. Pinning is a
per-process fact, so the comparison is across processes: the table lists every process's
medians and the median over processes per setting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgeperceiver.machine import machine_line  # noqa: E402


def trial(bundle: Path, target: str, threads: int, pinning: bool, rounds: int) -> dict[str, float]:
    """One process: the monolithic model and the Runner, interleaved; medians in ms."""
    import numpy as np

    from edgeperceiver.bench import monolithic_session
    from edgeperceiver.bundle import Bundle
    from edgeperceiver.runtime.openvino import OpenVINOBackend
    from edgeperceiver.runtime.runner import load
    from edgeperceiver.timing import interleaved

    b = Bundle.open(bundle)
    entry = b.manifest.target(target)
    mono = monolithic_session(b, entry, OpenVINOBackend(threads=threads, pinning=pinning))
    if mono is None:
        raise SystemExit(f"{target} has no monolithic model")
    runner = load(b, target, threads=threads, thresholds=[None] * len(b.manifest.segments), pinning=pinning)
    shape = (1, *(int(d) for d in b.manifest.input.shape[1:]))
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    name = b.manifest.input.name
    jobs = {"monolithic": lambda: mono.run({name: x}), "runner": lambda: runner.predict(x)}
    times = interleaved(jobs, repeats=rounds * 5, block=5, settle=1, min_seconds=1.0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--target", default="openvino-int8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--processes", type=int, default=4, help="processes per setting")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--trial", choices=["on", "off"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trial is not None:
        print(json.dumps(trial(args.bundle, args.target, args.threads, args.trial == "on", args.rounds)))
        return 0
    rows: list[tuple[str, dict[str, float]]] = []
    for i in range(2 * args.processes):
        setting = "on" if i % 2 == 0 else "off"
        cmd = [sys.executable, __file__, str(args.bundle), "--target", args.target, "--threads", str(args.threads),
               "--rounds", str(args.rounds), "--trial", setting]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows.append((setting, json.loads(out)))
        print(f"process {i + 1}: pinning {setting}: {rows[-1][1]}", file=sys.stderr, flush=True)
    print(f"{args.target}, batch 1, {args.threads} threads; {machine_line()}")
    print("| process | pinning | monolithic ms | Runner never-exit ms | Runner / monolithic |")
    print("|---:|---|---:|---:|---:|")
    for i, (setting, m) in enumerate(rows, 1):
        print(f"| {i} | {setting} | {m['monolithic']:.2f} | {m['runner']:.2f} | {m['runner'] / m['monolithic']:.3f} |")
    for setting in ("on", "off"):
        ms = [m for s, m in rows if s == setting]
        mono = statistics.median(m["monolithic"] for m in ms)
        run = statistics.median(m["runner"] for m in ms)
        print(f"pinning {setting}: median over processes: monolithic {mono:.2f} ms, Runner {run:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
