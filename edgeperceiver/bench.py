"""``edgeperceiver bench``: what early exit costs and saves on one target, measured.

Everything is timed in one interleaved loop (:func:`edgeperceiver.timing.interleaved`:
round-robin over all measurements, one repeat of each per round) and reported as medians,
because the machine is noisy and drifts: comparing numbers taken minutes apart measures the
drift, not the engines.

Measured, at each batch size:

- each segment alone (fed with the tensors the earlier segments made);
- the cumulative latency to exit k through the runtime (every sample forced to leave at k);
- the monolithic model (the target entry's ``monolithic``, one session on the same backend),
  so ``cumulative[K] / monolithic`` is the price of the cut at "never exit";
- with ``exit_mix`` (p1..pK), a batch (or, at batch 1, a round of single samples) whose
  samples are forced to leave in those proportions, vs the ideal ``sum_k p_k * cumulative_k``;
- with ``data``, the latency per sample under the bundle's thresholds, vs the expected
  ``mean_i cumulative[exit_i]`` from the exits the samples actually take.

Forced exits make cost measurable on untrained weights (whose confidences say nothing).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle, SegmentSpec, TargetEntry
from .errors import InputError
from .machine import machine_line
from .runtime.backend import Backend, Session
from .runtime.cli_support import dumps_json
from .runtime.runner import Runner, load
from .timing import Progress, interleaved
from .types import TargetName

# --------------------------------------------------------------------------- helpers


def median_ms(samples: Sequence[float], per: int = 1) -> float:
    """Median of ``samples`` (seconds) in milliseconds, divided by ``per``."""
    return 1000.0 * statistics.median(samples) / per


def mix_counts(mix: Sequence[float], n: int) -> list[int]:
    """Split ``n`` samples over exits in proportions ``mix`` (largest remainder, sums to ``n``)."""
    p = np.asarray(mix, dtype=np.float64)
    raw = p / p.sum() * n
    counts = np.floor(raw).astype(int)
    order = np.argsort(-(raw - counts), kind="stable")
    for i in order[: n - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


def mix_schedule(mix: Sequence[float], n: int, seed: int = 0) -> np.ndarray:
    """``n`` 1-based exits in proportions ``mix``, in a seeded random order."""
    exits = np.concatenate([np.full(c, k + 1, np.int64) for k, c in enumerate(mix_counts(mix, n))])
    return np.random.default_rng(seed).permutation(exits)


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class BatchResult:
    """Medians (ms per call) at one batch size."""

    batch: int
    segment_ms: tuple[float, ...]  #: each segment alone
    cumulative_ms: tuple[float, ...]  #: through the runtime, every sample leaving at exit k
    monolithic_ms: float | None  #: the monolithic model on the same backend
    mix_ideal_ms: float | None = None  #: sum_k p_k * cumulative_ms[k] (per batch of this size)
    mix_measured_ms: float | None = None  #: forced exit mix, per batch of this size
    thresholds_expected_ms: float | None = None  #: per sample: mean_i cumulative[exit_i] / batch
    thresholds_measured_ms: float | None = None  #: per sample, running ``data`` in batches
    #: batch 1 only: per-sample latency to each exit in rounds of single samples, the
    #: reference of the exit-mix ideal and the thresholds' expectation (like with like)
    round_ms: tuple[float, ...] | None = None

    @property
    def cut_price(self) -> float | None:
        """Chained segments at "never exit" / the monolithic model."""
        if self.monolithic_ms is None or not self.cumulative_ms:
            return None
        return self.cumulative_ms[-1] / self.monolithic_ms

    @property
    def segments_sum_ms(self) -> float:
        """Sum of the segments timed alone (the engine's share of the chained latency)."""
        return float(sum(self.segment_ms))

    @property
    def runtime_overhead_ms(self) -> float | None:
        """Chained latency through the runtime minus the segments alone (bookkeeping, copies)."""
        return self.cumulative_ms[-1] - self.segments_sum_ms if self.cumulative_ms else None

    @property
    def mix_ratio(self) -> float | None:
        if self.mix_ideal_ms is None or self.mix_measured_ms is None:
            return None
        return self.mix_measured_ms / self.mix_ideal_ms

    @property
    def thresholds_ratio(self) -> float | None:
        if self.thresholds_expected_ms is None or self.thresholds_measured_ms is None:
            return None
        return self.thresholds_measured_ms / self.thresholds_expected_ms


@dataclass(frozen=True)
class BenchReport:
    """What :func:`bench` measured (all times are medians in milliseconds)."""

    model: str
    target: str
    backend: str
    threads: int | None
    repeats: int
    warmup: int
    exits: tuple[str, ...]
    batches: tuple[BatchResult, ...]
    exit_mix: tuple[float, ...] | None = None
    thresholds: tuple[float | None, ...] | None = None
    data_samples: int = 0
    data_exit_share: tuple[float, ...] | None = None  #: share of data samples leaving at each exit
    extra_ms: Mapping[str, float] = field(default_factory=dict)  #: medians of ``extra_jobs``, by name
    clock: str = "wall"  #: "wall" time or process "cpu" time
    block: int = 1  #: timed calls in a row per measurement and round (after one untimed call when > 1)
    info: Mapping[str, Any] = field(default_factory=dict)

    def batch(self, n: int) -> BatchResult:
        for b in self.batches:
            if b.batch == n:
                return b
        raise KeyError(n)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for b, row in zip(self.batches, d["batches"], strict=True):
            row.update(cut_price=b.cut_price, mix_ratio=b.mix_ratio, thresholds_ratio=b.thresholds_ratio,
                       segments_sum_ms=b.segments_sum_ms, runtime_overhead_ms=b.runtime_overhead_ms)
        return d

    def to_json(self) -> str:
        """Strict JSON (a value that is not finite becomes null)."""
        return dumps_json(self.to_dict())

    def render(self) -> str:
        """A text table: one column per batch size."""
        k = len(self.exits)
        head = [f"batch {b.batch}" for b in self.batches]
        rows: list[tuple[str, list[str]]] = []

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        def ratio(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}x"

        for i in range(k):
            rows.append((f"segment {i + 1} alone (ms)", [ms(b.segment_ms[i]) for b in self.batches]))
        for i in range(k):
            rows.append((f"to exit {i + 1} {self.exits[i]} (ms)", [ms(b.cumulative_ms[i]) for b in self.batches]))
        if any(b.round_ms is not None for b in self.batches):
            for i in range(k):
                rows.append(
                    (f"to exit {i + 1}, rounds of {self.info.get('mix_round', '?')} singles (ms/sample)",
                     [ms(None if b.round_ms is None else b.round_ms[i]) for b in self.batches])
                )
        rows.append(("sum of segments alone (ms)", [ms(b.segments_sum_ms) for b in self.batches]))
        rows.append(("runtime overhead (ms)", [ms(b.runtime_overhead_ms) for b in self.batches]))
        rows.append(("monolithic model (ms)", [ms(b.monolithic_ms) for b in self.batches]))
        rows.append(("chained / monolithic", [ratio(b.cut_price) for b in self.batches]))
        if self.exit_mix is not None:
            mix = ",".join(f"{p:g}" for p in self.exit_mix)
            rows.append((f"exit mix {mix}: ideal (ms)", [ms(b.mix_ideal_ms) for b in self.batches]))
            rows.append(("  measured (ms)", [ms(b.mix_measured_ms) for b in self.batches]))
            rows.append(("  measured / ideal", [ratio(b.mix_ratio) for b in self.batches]))
        if self.data_samples:
            rows.append(
                (f"thresholds, {self.data_samples} samples: expected (ms/sample)",
                 [ms(b.thresholds_expected_ms) for b in self.batches])
            )
            rows.append(("  measured (ms/sample)", [ms(b.thresholds_measured_ms) for b in self.batches]))
            rows.append(("  measured / expected", [ratio(b.thresholds_ratio) for b in self.batches]))
        w0 = max(len(r[0]) for r in rows)
        widths = [max(len(h), *(len(r[1][j]) for r in rows)) for j, h in enumerate(head)]
        threads = "default" if self.threads is None else str(self.threads)
        lines = [
            f"{self.model} on {self.target} ({self.backend}, threads {threads}): medians of {self.repeats} "
            f"interleaved repeats"
            + (f" in blocks of {self.block}" if self.block > 1 else " of single calls in turn (cold caches; "
               "--block N: steady state)")
            + f" after {self.warmup} warm-up rounds, {self.clock} clock; {self.info.get('machine', machine_line())}",
            " " * w0 + "  " + "  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)),
        ]
        for label, cells in rows:
            lines.append(label.ljust(w0) + "  " + "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
        if self.data_exit_share is not None:
            share = ", ".join(f"exit {i + 1}: {s:.0%}" for i, s in enumerate(self.data_exit_share))
            lines.append(f"exits taken by the data under thresholds {list(self.thresholds or ())}: {share}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- bench


def monolithic_session(bundle: Bundle, entry: TargetEntry, backend: Backend) -> Session | None:
    """A session of ``entry``'s monolithic model on ``backend`` (input: the image; outputs: the
    exits), or None if the entry has none."""
    if not entry.monolithic:
        return None
    m = bundle.manifest
    outputs = tuple(next(t for t in s.outputs if t.name == s.exit) for s in m.segments)
    spec = SegmentSpec(1, entry.monolithic, m.exits[-1], (m.input,), outputs, ())
    return backend.open(bundle, dataclasses.replace(entry, segments=(entry.monolithic,)), spec)


def open_monolithic(runner: Runner) -> Callable[[Any], dict[str, Any]] | None:
    """A callable running the target's monolithic model on backend feeds, or None if it has none."""
    session = monolithic_session(runner.bundle, runner.entry, runner.backend)
    if session is None:
        return None
    name = runner.manifest.input.name
    return lambda x: session.run({name: x})


def _round_of_singles(runner: Runner, x: np.ndarray, exits: np.ndarray) -> None:
    """Predict the samples of ``x`` one at a time, sample j forced to leave at ``exits[j]``."""
    for j in range(len(exits)):
        runner.predict(x[j : j + 1], force_exits=exits[j : j + 1])


def _load_data(data: str | os.PathLike[str] | np.ndarray | None, runner: Runner, limit: int) -> np.ndarray | None:
    if data is None:
        return None
    if isinstance(data, np.ndarray):
        return runner.check_input(data)[:limit]
    from .runtime.preprocess import iter_input_batches

    parts: list[np.ndarray] = []
    n = 0
    for batch in iter_input_batches([Path(data)], runner.manifest.preprocess, 64):
        parts.append(runner.check_input(batch.x, batch.names))
        n += len(batch.names)
        if n >= limit:
            break
    return np.concatenate(parts)[:limit]


def bench(
    bundle: str | os.PathLike[str] | Bundle,
    target: str | TargetName | None = None,
    *,
    batch_sizes: Sequence[int] = (1, 8),
    exit_mix: Sequence[float] | None = None,
    data: str | os.PathLike[str] | np.ndarray | None = None,
    data_limit: int = 64,
    repeats: int = 30,
    warmup: int = 3,
    block: int = 1,
    threads: int | None = None,
    mix_round: int = 20,
    progress: Progress | None = None,
    seed: int = 0,
    extra_jobs: Callable[[Runner], Mapping[str, Callable[[], object]]] | None = None,
    clock: str = "wall",
    **backend_options: Any,
) -> BenchReport:
    """Measure segment, per-exit, monolithic, exit-mix and threshold latency on ``target``.

    ``exit_mix``: one proportion per exit (normalised), e.g. ``(0.5, 0.3, 0.1, 0.1)``; at
    batch 1 each timed call is a round of ``mix_round`` single samples following a
    seeded schedule, and its ideal comes from rounds of single samples forced to each
    exit. ``data`` (an (N, C, H, W) array, an image directory or an ``.npy``/``.npz``;
    at most ``data_limit`` samples) measures latency under the bundle's thresholds.
    ``extra_jobs(runner)`` may add more callables (e.g. other engines on the same model)
    to the same interleaved loop; their medians land in ``extra_ms``.
    ``clock="cpu"`` times process CPU time instead of wall time (for a machine shared with
    other work; meaningful for the work done with ``threads=1``). ``block=1`` (default) times
    single calls round-robin, each one right after another measurement ran (cold caches);
    ``block=n`` times ``n`` calls in a row after one untimed call of the same measurement
    (steady state, as the compile-time latencies are measured).
    """
    sizes = tuple(int(b) for b in batch_sizes)
    if not sizes or any(b < 1 for b in sizes):
        raise InputError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    runner = load(bundle, target, threads=threads, batch_size=max(sizes), **backend_options)
    k = runner.num_exits
    mix: tuple[float, ...] | None = None
    if exit_mix is not None:
        mix = tuple(float(p) for p in exit_mix)
        if len(mix) != k or any(p < 0 or p != p for p in mix) or sum(mix) <= 0:
            raise InputError(f"exit mix needs {k} non-negative proportions (not all 0), got {list(exit_mix)}")
    if mix_round < 1:
        raise InputError(f"mix_round must be >= 1, got {mix_round}")
    spec = runner.manifest.input
    shape = tuple(int(d) for d in spec.shape[1:])
    rng = np.random.default_rng(seed)
    x_all = rng.standard_normal((max(sizes), *shape)).astype(np.float32)
    xdata = _load_data(data, runner, data_limit)
    mono = open_monolithic(runner)
    backend = runner.backend

    jobs: dict[str, Callable[[], object]] = {}
    for b in sizes:
        x = x_all[:b]
        xb = backend.from_host(x)
        feeds = runner.segment_feeds(x)
        for i in range(k):
            jobs[f"seg{i + 1}@{b}"] = partial(runner.run_segment, i, feeds[i])
            force = np.full(b, i + 1, np.int64)
            jobs[f"exit{i + 1}@{b}"] = partial(runner.predict, x, force_exits=force)
        if mono is not None:
            jobs[f"mono@{b}"] = partial(mono, xb)
        if b == 1 and (mix is not None or xdata is not None):
            # loops of single samples are compared with loops of single samples: a round
            # of calls catches scheduler stalls that the median of one call skips
            xr = rng.standard_normal((mix_round, *shape)).astype(np.float32)
            for i in range(k):
                jobs[f"round{i + 1}@1"] = partial(_round_of_singles, runner, xr, np.full(mix_round, i + 1))
        if mix is not None:
            if b == 1:
                jobs["mix@1"] = partial(_round_of_singles, runner, xr, mix_schedule(mix, mix_round, seed))
            else:
                sched = mix_schedule(mix, b, seed)
                jobs[f"mix@{b}"] = partial(runner.predict, x, force_exits=sched)
        if xdata is not None:
            # batch 1: a round of mix_round samples (the data repeated or cut to that
            # length), like the per-exit reference rounds; batch b: all the data, b at a time
            xd = xdata[np.arange(mix_round) % xdata.shape[0]] if b == 1 else xdata

            def run_data(b: int = b, xd: np.ndarray = xd) -> None:
                for s in range(0, xd.shape[0], b):
                    runner.predict(xd[s : s + b])

            jobs[f"data@{b}"] = run_data

    extra = dict(extra_jobs(runner)) if extra_jobs is not None else {}
    clash = sorted(set(extra) & set(jobs))
    if clash:
        raise InputError(f"extra jobs reuse built-in names: {clash}")
    jobs.update(extra)
    times = interleaved(jobs, repeats=repeats, block=block, settle=int(block > 1), warmup=warmup, progress=progress,
                        seed=seed, clock=clock)

    data_exits = None if xdata is None else runner.predict(xdata).exits
    results = []
    for b in sizes:
        seg = tuple(median_ms(times[f"seg{i + 1}@{b}"]) for i in range(k))
        cum = tuple(median_ms(times[f"exit{i + 1}@{b}"]) for i in range(k))
        res = BatchResult(b, seg, cum, None if mono is None else median_ms(times[f"mono@{b}"]))
        ref = cum  # latency to each exit, per call of this batch size
        if f"round1@{b}" in times:
            ref = tuple(median_ms(times[f"round{i + 1}@{b}"], per=mix_round) for i in range(k))
            res = dataclasses.replace(res, round_ms=ref)
        if mix is not None:
            p = np.asarray(mix) / sum(mix)
            ideal = float(np.dot(p, ref))
            measured = median_ms(times[f"mix@{b}"], per=mix_round if b == 1 else 1)
            if b > 1:  # the ideal of the batch actually run (its integer counts)
                ideal = float(np.dot(np.asarray(mix_counts(mix, b)) / b, ref))
            res = dataclasses.replace(res, mix_ideal_ms=ideal, mix_measured_ms=measured)
        if xdata is not None and data_exits is not None:
            used = data_exits[np.arange(mix_round) % len(data_exits)] if b == 1 else data_exits
            n = len(used)
            expected = float(np.mean([ref[e - 1] for e in used])) / b
            measured = median_ms(times[f"data@{b}"], per=n)
            res = dataclasses.replace(res, thresholds_expected_ms=expected, thresholds_measured_ms=measured)
        results.append(res)

    share = None
    if data_exits is not None and len(data_exits):
        share = tuple(float(np.mean(data_exits == i + 1)) for i in range(k))
    th = runner.thresholds
    return BenchReport(
        model=runner.manifest.model_name,
        target=runner.entry.key,
        backend=backend.name,
        threads=threads,
        repeats=repeats,
        warmup=warmup,
        block=block,
        exits=runner.manifest.exits,
        batches=tuple(results),
        exit_mix=mix,
        thresholds=None if th is None else th.values,
        data_samples=0 if xdata is None else int(xdata.shape[0]),
        data_exit_share=share,
        extra_ms={n: median_ms(times[n]) for n in extra},
        clock=clock,
        info={"criterion": runner.criterion.value, "mix_round": mix_round, "seed": seed, "machine": machine_line()},
    )
