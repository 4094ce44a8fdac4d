"""One timing loop for every latency this project measures (numpy and the standard library only).

The machine a model is compiled or benchmarked on is often shared and drifts, so contenders
are never timed minutes apart: they take turns. Two ways to take turns, both here:

- ``block=1, settle=0`` (``edgeperceiver bench``): round-robin single calls. Each call starts
  after another contender ran, so it includes that contender's evictions (a cold start).
- ``block=n, settle=1`` (compile-time latencies, the benchmark scripts): ``n`` back-to-back
  timed calls, after one untimed call of the same contender. Alternating single calls of two
  models that share the caches made each evict the other's weights: the demo's OpenVINO INT8
  segments measured 2-3x their runtime latency that way. The untimed call also keeps one
  engine's spinning worker threads from being billed to the next.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TypeVar

import numpy as np

from .errors import InputError
from .progress import Progress

#: clocks a measurement can use: wall time, or the CPU time of the whole process (robust to
#: other processes competing for the CPU; with one thread it is the work actually done)
CLOCKS: Mapping[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}

Recorder = Callable[[bool], None]
K = TypeVar("K", bound=Hashable)


def take_turns(
    runs_of: Sequence[Recorder],
    runs: int,
    *,
    block: int = 1,
    settle: int = 0,
    warmup: int = 2,
    min_seconds: float = 0.0,
    shuffle: np.random.Generator | None = None,
    progress: Progress | None = None,
) -> None:
    """Call every ``run(record)`` at least ``runs`` times with ``record=True``, taking turns.

    ``warmup`` rounds of unrecorded calls come first. Then, in rounds (in ``shuffle``'s order
    if given), each contender makes ``settle`` unrecorded calls and ``block`` recorded ones.
    With ``min_seconds``, fast contenders get more calls (up to 20x ``runs``) so that the
    recorded calls span at least that long: 30 calls of a 1 ms model fit in one burst of a
    neighbour's load. ``progress(done, total)`` follows each recorded call.
    """
    if runs < 1 or block < 1:
        raise InputError(f"runs and block must be >= 1, got {runs} and {block}")
    if settle < 0 or warmup < 0:
        raise InputError(f"settle and warmup must be >= 0, got {settle} and {warmup}")
    t0 = time.perf_counter()
    for _ in range(warmup):
        for run in runs_of:
            run(False)
    if min_seconds > 0 and warmup > 0:
        per_round = (time.perf_counter() - t0) / warmup
        if per_round > 0:
            runs = min(max(runs, math.ceil(min_seconds / per_round)), 20 * runs)
    total, done = runs * len(runs_of), 0
    while done < total:
        n = min(block, runs - done // len(runs_of))
        order = shuffle.permutation(len(runs_of)) if shuffle is not None else range(len(runs_of))
        for i in order:
            run = runs_of[int(i)]
            for _ in range(settle):
                run(False)
            for _ in range(n):
                run(True)
                done += 1
                if progress is not None:
                    progress(done, total)


def recorder(calls: Sequence[Callable[[], object]], clock: str = "wall") -> tuple[Recorder, list[list[float]]]:
    """A ``run(record)`` that makes ``calls`` in order (a chain of segments), and the list its
    recorded calls fill: seconds per call, one list per entry of ``calls``."""
    if clock not in CLOCKS:
        raise InputError(f"clock must be one of {sorted(CLOCKS)}, not {clock!r}")
    now = CLOCKS[clock]
    times: list[list[float]] = [[] for _ in calls]

    def run(record: bool) -> None:
        for call, out in zip(calls, times, strict=True):
            t = now()
            call()
            if record:
                out.append(now() - t)

    return run, times


def interleaved(
    jobs: Mapping[K, Callable[[], object]],
    *,
    repeats: int,
    block: int = 1,
    settle: int = 0,
    warmup: int = 2,
    min_seconds: float = 0.0,
    progress: Progress | None = None,
    seed: int | None = 0,
    clock: str = "wall",
) -> dict[K, list[float]]:
    """Time every job at least ``repeats`` times with :func:`take_turns`; seconds per call.

    The order of the contenders is reshuffled every round (``seed=None``: fixed order).
    ``clock``: a key of :data:`CLOCKS`.
    """
    runs = {name: recorder([job], clock) for name, job in jobs.items()}
    take_turns([run for run, _ in runs.values()], repeats, block=block, settle=settle, warmup=warmup,
               min_seconds=min_seconds, shuffle=None if seed is None else np.random.default_rng(seed),
               progress=progress)
    return {name: times[0] for name, (_, times) in runs.items()}
