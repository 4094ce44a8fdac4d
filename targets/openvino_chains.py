"""Candidate OpenVINO segment chains at compile time, run through the runtime's own sessions.

Everything ``compile`` measures or feeds forward (per-exit agreement with FP32, calibration
inputs for the per-segment quantizer, batch-1 latencies) goes through
:class:`~edgeperceiver.runtime.openvino.OpenVINOSession` and
:class:`~edgeperceiver.runtime.openvino_chain.OpenVINOChain`, the objects the
:class:`~edgeperceiver.runtime.runner.Runner` runs, with the same compile properties: what
compile measures is what ships.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from edgeperceiver.bundle import Manifest
from edgeperceiver.passes.openvino_bf16 import carry_bf16
from edgeperceiver.runtime.openvino import OpenVINOBackend, OpenVINOChain
from edgeperceiver.timing import recorder, take_turns


@dataclass
class Candidate:
    """One way to build every segment: per segment the model, its precision and float hint."""

    name: str  #: e.g. "fp32", "bf16", "int8", "int8+bf16", "auto"
    models: Sequence[Any]  #: OpenVINO models, one per segment (carried tensors still f32)
    precisions: Sequence[str]  #: per segment: fp32, bf16 or int8 (what the manifest records)
    hints: Sequence[str]  #: per segment INFERENCE_PRECISION_HINT: f32 or bf16

    def pick(self, name: str, others: Mapping[str, Candidate], choice: Sequence[str]) -> Candidate:
        """A chain taking segment k from candidate ``choice[k]``."""
        parts = [others[c] for c in choice]
        return Candidate(name, [p.models[k] for k, p in enumerate(parts)],
                         [p.precisions[k] for k, p in enumerate(parts)], [p.hints[k] for k, p in enumerate(parts)])


def bf16_carried(manifest: Manifest, hints: Sequence[str]) -> frozenset[str]:
    """Carried tensors kept in bfloat16: made and read only by segments whose float parts run bf16.

    Exits and the image stay float32; a tensor crossing between precisions stays float32
    (OpenVINO converts inside the bf16 segment, at the boundary only).
    """
    keep = set(manifest.exits) | {manifest.input.name}
    users: dict[str, list[int]] = {}
    for k, spec in enumerate(manifest.segments):
        for t in spec.inputs:
            users.setdefault(t.name, []).append(k)
    out = set()
    for k, spec in enumerate(manifest.segments):
        for t in spec.outputs:
            if t.name in keep or t.name not in users:
                continue
            if hints[k] == "bf16" and all(hints[j] == "bf16" for j in users[t.name]):
                out.add(t.name)
    return frozenset(out)


def shipped_models(manifest: Manifest, cand: Candidate) -> list[Any]:
    """The segment models as they are saved: carried tensors in bf16 where :func:`bf16_carried` says."""
    names = bf16_carried(manifest, cand.hints)
    return [carry_bf16(m, names) for m in cand.models]


class Chain:
    """A candidate's segments as runtime sessions, chained as the runner chains them."""

    def __init__(self, backend: OpenVINOBackend, manifest: Manifest, cand: Candidate,
                 models: Sequence[Any] | None = None) -> None:
        self.manifest = manifest
        self.candidate = cand
        ready = shipped_models(manifest, cand) if models is None else list(models)
        self.sessions = tuple(backend.session(m, spec, h)
                              for m, spec, h in zip(ready, manifest.segments, cand.hints, strict=True))
        self.chain = OpenVINOChain(self.sessions, manifest.input.name)

    def exits(self, images: np.ndarray, batch: int = 16) -> list[np.ndarray]:
        """Every exit's float32 logits for ``images``."""
        parts: list[list[np.ndarray]] = [[] for _ in self.sessions]
        for i in range(0, images.shape[0], batch):
            state = self.chain.start(np.ascontiguousarray(images[i : i + batch], dtype=np.float32))
            assert state is not None
            for k in range(len(self.sessions)):
                logits = state.run(k)
                assert logits is not None
                parts[k].append(logits)
        return [np.concatenate(p) for p in parts]

    def carried(self, images: np.ndarray, batch: int = 16) -> list[dict[str, np.ndarray]]:
        """Per image (batch 1): every tensor the segments read, as the chain makes them."""
        names = frozenset(t.name for s in self.manifest.segments for t in s.inputs)
        last = len(self.sessions) - 1
        out: list[dict[str, np.ndarray]] = []
        for i in range(0, images.shape[0], batch):
            x = np.ascontiguousarray(images[i : i + batch], dtype=np.float32)
            state = self.chain.start(x)
            assert state is not None
            for k in range(len(self.sessions)):
                state.run(k, False)
            live = state.live(names, last)
            out.extend({n: np.array(v[j : j + 1]) for n, v in live.items()} for j in range(x.shape[0]))
        return out

    def timed(self, x: np.ndarray) -> tuple[Any, list[list[float]]]:
        """A ``run(record)`` for :func:`~edgeperceiver.timing.take_turns` over this chain at ``x``
        (each segment as the runner calls it at never-exit), and its per-segment times."""
        state = self.chain.start(x)
        assert state is not None
        last = len(self.sessions) - 1
        return recorder([partial(state.run, k, k == last) for k in range(len(self.sessions))])


def time_chains(
    chains: Mapping[str, Chain], x: np.ndarray, *, runs: int, mono: Any = None, block: int = 5
) -> tuple[dict[str, tuple[float, ...]], float | None]:
    """Median batch-1 ms per segment of every chain (and of ``mono()``), all in one loop.

    The contenders take turns in blocks of ``block`` calls, each block after an untimed
    call of its own (:func:`edgeperceiver.timing.take_turns`).
    """
    runs_of, times = [], {}
    for name, chain in chains.items():
        run, t = chain.timed(x)
        runs_of.append(run)
        times[name] = t
    mono_t: list[list[float]] = [[]]
    if mono is not None:
        run_mono, mono_t = recorder([mono])
        runs_of.append(run_mono)
    take_turns(runs_of, runs, block=block, settle=1, min_seconds=0.5)
    seg_ms = {n: tuple(statistics.median(s) * 1e3 for s in t) for n, t in times.items()}
    return seg_ms, (statistics.median(mono_t[0]) * 1e3 if mono_t[0] else None)
