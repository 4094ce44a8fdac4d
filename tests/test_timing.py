"""The one timing loop: who is timed when, how many times, and with which clock."""

from __future__ import annotations

import time

import numpy as np
import pytest

from edgeperceiver.errors import InputError
from edgeperceiver.timing import interleaved, recorder, take_turns


def test_interleaved_is_round_robin() -> None:
    calls: list[str] = []
    jobs = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    seen: list[tuple[int, int]] = []
    times = interleaved(jobs, repeats=4, warmup=1, progress=lambda d, t: seen.append((d, t)))
    assert calls[:3] == ["a", "b", "c"]  # warm-up round
    rounds = [sorted(calls[3 + 3 * r : 6 + 3 * r]) for r in range(4)]
    assert rounds == [["a", "b", "c"]] * 4
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert seen[-1] == (12, 12) and len(seen) == 12
    with pytest.raises(InputError):
        interleaved(jobs, repeats=0)
    with pytest.raises(InputError, match="clock"):
        interleaved(jobs, repeats=1, clock="sundial")
    busy = interleaved({"spin": lambda: sum(range(200_000)), "idle": lambda: None}, repeats=3, clock="cpu")
    assert min(busy["spin"]) > max(busy["idle"])


def test_blocks_start_after_an_untimed_call_of_their_own_contender() -> None:
    calls: list[tuple[str, bool]] = []
    take_turns([lambda rec: calls.append(("chain", rec)), lambda rec: calls.append(("mono", rec))], 7,
               block=3, settle=1)
    recorded = [name for name, rec in calls if rec]
    assert recorded.count("chain") == 7 and recorded.count("mono") == 7
    # blocks of 3, 3, 1 recorded calls, in turn
    assert recorded == ["chain"] * 3 + ["mono"] * 3 + ["chain"] * 3 + ["mono"] * 3 + ["chain", "mono"]
    for i, (name, rec) in enumerate(calls):
        if rec and (i == 0 or calls[i - 1][0] != name):
            raise AssertionError(f"call {i} ({name}) is timed right after another contender ran")


def test_shuffled_blocks_keep_each_block_together() -> None:
    calls: list[tuple[str, bool]] = []
    runs = [lambda rec, n=n: calls.append((n, rec)) for n in "abcd"]
    take_turns(runs, 6, block=2, settle=1, warmup=0, shuffle=np.random.default_rng(3))
    timed = [n for n, rec in calls if rec]
    assert sorted(timed) == sorted("abcd" * 6)
    blocks = [timed[i : i + 2] for i in range(0, len(timed), 2)]
    assert all(b[0] == b[1] for b in blocks)
    assert len({tuple(b[0] for b in blocks[r * 4 : r * 4 + 4]) for r in range(3)}) > 1  # reshuffled


def test_fast_contenders_get_calls_until_min_seconds() -> None:
    # judged on the pace the calls actually had (a loaded machine stretches a 2 ms sleep), not
    # on this machine's sleep being 2 ms
    durations: list[float] = []

    def run(record: bool) -> None:
        t = time.perf_counter()
        time.sleep(0.002)
        if record:
            durations.append(time.perf_counter() - t)

    take_turns([run], 3, min_seconds=0.2)
    assert 3 < len(durations) <= 60  # more than the asked runs; never more than 20 x them
    assert len(durations) == 60 or sum(durations) >= 0.1  # about min_seconds of recorded calls
    with pytest.raises(InputError):
        take_turns([run], 3, block=0)


def test_recorder_times_each_call_of_a_chain() -> None:
    order: list[int] = []
    run, times = recorder([lambda: order.append(0), lambda: (order.append(1), time.sleep(0.003))])
    run(False)
    assert times == [[], []] and order == [0, 1]
    run(True)
    run(True)
    assert [len(t) for t in times] == [2, 2] and min(times[1]) > max(times[0])
