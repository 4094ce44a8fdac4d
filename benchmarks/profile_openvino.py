#!/usr/bin/env python3
"""Where an OpenVINO bundle's time goes: per-node perf counters, and the cut's price decomposed.

    .venv/bin/python benchmarks/profile_openvino.py BUNDLE [--target openvino-int8] [--threads 2]
                                                    [--runs 40] [--rounds 12] [--top 20]

1. **Nodes.** The monolithic model (the segments back to back if the entry has none) under
   OpenVINO's ``PERF_COUNT``: wall time against summed node time, executed nodes, node time by
   (layer type, kernel), by top-level module (the first part of the node name) and the
   slowest nodes.
2. **The cut.** The executed nodes the segments add or drop against the monolithic model,
   then one interleaved timing (medians) of the monolithic model, the segments bound to each
   other zero-copy, each segment alone run back to back ("warm") and each segment's own time
   inside the chain. A warm segment keeps its weights in cache; inside the chain it starts
   cold, which is most of what the cut costs on a CPU whose caches hold less than the model.

Perf counters cost time themselves: compare their rows with each other, not with the timing.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgeperceiver.bench import monolithic_session  # noqa: E402
from edgeperceiver.bundle import Bundle  # noqa: E402
from edgeperceiver.runtime.openvino import OpenVINOBackend  # noqa: E402
from edgeperceiver.timing import interleaved, recorder  # noqa: E402


@dataclass(frozen=True)
class NodeTime:
    """One executed node of a compiled model: median time over the profiled runs."""

    name: str
    layer: str  #: OpenVINO layer type (Convolution, FullyConnected, Subgraph, ...)
    kernel: str  #: implementation (brgconv_avx512_1x1_I8, jit_avx512_bf16, ...)
    ms: float


class Chain:
    """A bundle entry's segments as the runtime runs them: batch-1 infer requests, carried tensors
    bound output -> input (``OpenVINOBackend.chain``), the image bound once."""

    def __init__(self, bundle: Bundle, key: str, threads: int | None, *, perf_count: bool = False) -> None:
        self.bundle, self.entry = bundle, bundle.manifest.target(key)
        self.backend = OpenVINOBackend(threads=threads)
        if perf_count:  # for every model compiled on this core
            self.backend.core.set_property("CPU", {"PERF_COUNT": "YES"})
        shape = (1, *(int(d) for d in bundle.manifest.input.shape[1:]))
        self.image = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        self._states: list[Any] = []  # keep each chain (and the image it binds) alive
        self.requests = self._bound(tuple(self.backend.open(bundle, self.entry, s) for s in bundle.manifest.segments))

    def _bound(self, sessions: tuple[Any, ...]) -> list[Any]:
        chain = self.backend.chain(sessions, self.bundle.manifest.input.name)
        assert chain is not None
        state = chain.start(self.image)
        assert state is not None
        self._states.append((chain, state))
        return list(state.requests)

    def monolithic(self) -> Any | None:
        """A bound request for the entry's monolithic model, or None."""
        session = monolithic_session(self.bundle, self.entry, self.backend)
        return None if session is None else self._bound((session,))[0]

    def run(self) -> None:
        for req in self.requests:
            req.infer()


def executed(requests: Sequence[Any]) -> list[NodeTime]:
    """The executed nodes of the requests' last inference."""
    return [NodeTime(p.node_name, p.node_type, p.exec_type, p.real_time.total_seconds() * 1e3)
            for req in requests for p in req.profiling_info if p.status == p.Status.EXECUTED]


def profile(run: Callable[[], object], requests: Sequence[Any], runs: int) -> tuple[float, list[NodeTime]]:
    """Median wall ms of ``run`` and each node's median time over ``runs`` profiled calls."""
    run()
    walls, per_node = [], defaultdict(list)
    meta: dict[str, NodeTime] = {}
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        walls.append((time.perf_counter() - t0) * 1e3)
        for i, node in enumerate(executed(requests)):
            key = f"{i}:{node.name}"  # segments may reuse a node name
            per_node[key].append(node.ms)
            meta[key] = node
    nodes = [NodeTime(meta[k].name, meta[k].layer, meta[k].kernel, statistics.median(v)) for k, v in per_node.items()]
    return statistics.median(walls), nodes


def module(name: str) -> str:
    """Top-level module of an exported node name (``/self_att3/self_att3.1/...`` -> ``self_att3``)."""
    head = name.lstrip("/").split("/")[0] if "/" in name else "(unnamed)"
    return re.sub(r"\.\d+$", "", head)


def grouped(nodes: Sequence[NodeTime], key: Callable[[NodeTime], str]) -> list[tuple[str, float, int]]:
    """(group, total ms, node count), slowest group first."""
    ms: dict[str, float] = defaultdict(float)
    count: Counter[str] = Counter()
    for n in nodes:
        ms[key(n)] += n.ms
        count[key(n)] += 1
    return sorted(((k, ms[k], count[k]) for k in ms), key=lambda r: -r[1])


def node_diff(mono: Sequence[NodeTime], segments: Sequence[NodeTime]) -> list[tuple[str, int, int]]:
    """(layer/kernel, monolithic count, segments count) where the two differ."""
    a = Counter(f"{n.layer} {n.kernel}" for n in mono)
    b = Counter(f"{n.layer} {n.kernel}" for n in segments)
    return sorted(((k, a[k], b[k]) for k in set(a) | set(b) if a[k] != b[k]), key=lambda r: r[2] - r[1], reverse=True)


def cut_timing(chain: Chain, mono: Any, rounds: int, block: int = 6) -> dict[str, float]:
    """Interleaved medians (ms): monolithic, bound chain, each segment warm, each segment inside the chain."""
    run_chain, inside = recorder([req.infer for req in chain.requests])
    jobs: dict[str, Callable[[], object]] = {"monolithic": mono.infer, "segments bound": partial(run_chain, True)}
    jobs.update({f"segment {k + 1} alone (warm)": req.infer for k, req in enumerate(chain.requests)})
    times = interleaved(jobs, repeats=rounds * block, block=block, settle=1, warmup=0)
    out = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    out.update({f"segment {k + 1} inside the chain": statistics.median(t) * 1e3 for k, t in enumerate(inside)})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--target", default="openvino-int8", help="bundle entry (default openvino-int8)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=40, help="profiled calls (perf counters)")
    p.add_argument("--rounds", type=int, default=12, help="interleaved timing rounds for the cut")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args(argv)

    bundle = Bundle.open(args.bundle)
    prof = Chain(bundle, args.target, args.threads, perf_count=True)
    mono = prof.monolithic()
    what, run, reqs = ("monolithic model", mono.infer, [mono]) if mono is not None else (
        "segments back to back", prof.run, prof.requests)
    wall, nodes = profile(run, reqs, args.runs)
    total = sum(n.ms for n in nodes)
    print(f"== {bundle.manifest.model_name} {args.target}, {what}, {args.threads} threads, batch 1, "
          f"perf counters, medians of {args.runs} ==")
    print(f"wall {wall:.3f} ms, node time {total:.3f} ms (sum of per-node medians), {len(nodes)} executed nodes")
    for title, key in (("layer, kernel", lambda n: f"{n.layer} {n.kernel}"), ("module", lambda n: module(n.name))):
        print(f"\n{title:56s} {'ms':>7} {'nodes':>6}")
        for k, ms, count in grouped(nodes, key)[: args.top]:
            print(f"{k[:56]:56s} {ms:7.3f} {count:6d}")
    print(f"\nslowest nodes{'':43s} {'ms':>7}")
    for n in sorted(nodes, key=lambda n: -n.ms)[: args.top]:
        print(f"{n.name[-56:]:56s} {n.ms:7.3f}  {n.layer} {n.kernel}")

    if mono is None or len(prof.requests) < 2:
        return 0
    _, seg_nodes = profile(prof.run, prof.requests, max(3, args.runs // 4))
    print(f"\n== the cut: executed nodes, monolithic {len(nodes)} vs segments {len(seg_nodes)} ==")
    for k, a, b in node_diff(nodes, seg_nodes):
        print(f"{k[:56]:56s} {a:4d} -> {b:4d}")
    timing = Chain(bundle, args.target, args.threads)
    mono_t = timing.monolithic()
    assert mono_t is not None
    t = cut_timing(timing, mono_t, args.rounds)
    n_seg = len(timing.requests)
    warm = sum(t[f"segment {k + 1} alone (warm)"] for k in range(n_seg))
    inside = sum(t[f"segment {k + 1} inside the chain"] for k in range(n_seg))
    print(f"\n== the cut: timing, medians of {args.rounds} interleaved rounds (no perf counters) ==")
    for name, ms in t.items():
        print(f"{name:56s} {ms:8.3f} ms")
    print(f"segments bound / monolithic {t['segments bound'] / t['monolithic']:.3f}x; "
          f"sum of warm segments / monolithic {warm / t['monolithic']:.3f}x; "
          f"sum inside the chain / warm sum {inside / warm:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
