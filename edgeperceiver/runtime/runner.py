"""The early-exit runner: segment 1 for the whole batch, then only the samples still running.

For each segment k (in order) the runner feeds the live tensors the segment reads, keeps
its outputs, scores exit k's logits per sample, lets every sample whose score reaches
threshold k leave, drops the tensors no later segment reads, and compacts the rest to
the surviving samples with ``backend.take``. The last enabled exit takes everyone left,
and segments after it never run.

Standard library + numpy only; the backend is created through the lazy registry.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..bundle import Bundle, Manifest, SegmentSpec, TargetEntry, Thresholds
from ..errors import BundleError, InputError
from ..types import Criterion, TargetName
from .backend import Backend, Chain, Session
from .backends import create_backend
from .criteria import ThresholdsLike, criterion_of, evaluate, resolve_thresholds
from .entries import NoThresholdsWarning, choose_entry
from .preprocess import check_batch, iter_input_batches

DEFAULT_BATCH_SIZE = 16

_LOG = logging.getLogger("edgeperceiver.runtime")


@dataclass(frozen=True)
class Prediction:
    """Per-sample results (numpy arrays of length N)."""

    labels: np.ndarray  #: int64 class index (argmax of the exit taken)
    exits: np.ndarray  #: int64, 1-based exit each sample left at
    confidences: np.ndarray  #: float32 top-1 softmax probability at the exit taken
    scores: np.ndarray  #: float64 exit-criterion score at the exit taken

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @staticmethod
    def concat(parts: Sequence[Prediction]) -> Prediction:
        if not parts:
            return _empty_prediction()
        return Prediction(
            labels=np.concatenate([p.labels for p in parts]),
            exits=np.concatenate([p.exits for p in parts]),
            confidences=np.concatenate([p.confidences for p in parts]),
            scores=np.concatenate([p.scores for p in parts]),
        )


def _empty_prediction() -> Prediction:
    return Prediction(
        np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float64)
    )


def _live_plan(manifest: Manifest) -> list[frozenset[str]]:
    """Per segment k: the names any later segment reads (keep these after k ran)."""
    segs = manifest.segments
    produced = {manifest.input.name}
    for s in segs:
        missing = [t.name for t in s.inputs if t.name not in produced]
        if missing:
            raise BundleError(f"segment {s.index} reads {missing}, which no earlier segment produces")
        if s.exit not in {t.name for t in s.outputs}:
            raise BundleError(f"segment {s.index} does not output its exit {s.exit!r}")
        produced.update(t.name for t in s.outputs)
    plan = []
    for k in range(len(segs)):
        later = {t.name for s in segs[k + 1 :] for t in s.inputs}
        plan.append(frozenset(later))
    return plan


class Runner:
    """Runs a bundle's segments on one backend with per-sample early exit (thread-safe).

    Every batch is split to the sessions' ``max_batch`` (TensorRT engines have one), so
    ``batch_size`` is only a preference. ``close()`` (or ``with load(...) as runner:``)
    releases the sessions and the backend.
    """

    def __init__(
        self,
        bundle: Bundle,
        entry: TargetEntry,
        backend: Backend,
        *,
        thresholds: Thresholds | None = None,
        criterion: Criterion | str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if isinstance(batch_size, bool) or int(batch_size) < 1:
            raise InputError(f"batch_size must be a positive integer, not {batch_size!r}")
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.entry = entry
        self.backend = backend
        self.batch_size = int(batch_size)
        self.segments: tuple[SegmentSpec, ...] = self.manifest.segments
        if not self.segments:
            raise BundleError(f"bundle {bundle.root} has no segments")
        self._keep = _live_plan(self.manifest)
        self.thresholds = resolve_thresholds(thresholds, criterion, None, len(self.segments))
        self._criterion = (
            criterion_of(criterion) if criterion is not None
            else self.thresholds.criterion if self.thresholds is not None else Criterion.MAX_SOFTMAX
        )
        self.sessions: tuple[Session, ...] = tuple(backend.open(bundle, entry, s) for s in self.segments)
        # the largest batch every session accepts: every batch is split to it here
        limits = [s.max_batch for s in self.sessions if s.max_batch is not None]
        self.max_batch: int | None = min(limits) if limits else None
        # a backend may bind carried tensors between its own sessions (OpenVINO: zero-copy
        # between infer requests); the runner uses that while every sample goes on
        self._chain: Chain | None = backend.chain(self.sessions, self.manifest.input.name)
        self._locks: tuple[AbstractContextManager[Any], ...] = tuple(
            nullcontext() if backend.thread_safe else threading.Lock() for _ in self.segments
        )
        self._closed = False

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Release the sessions, then the backend (GPU memory and context for TensorRT); idempotent."""
        if self._closed:
            return
        self._closed = True
        for session in self.sessions:
            session.close()
        self.backend.close()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _step(self, batch_size: int | None = None) -> int:
        """Samples per engine call: the batch size, capped by the sessions' ``max_batch``."""
        bs = self.batch_size if batch_size is None else batch_size
        return bs if self.max_batch is None else min(bs, self.max_batch)

    # ------------------------------------------------------------------ properties
    @property
    def num_exits(self) -> int:
        return len(self.segments)

    @property
    def criterion(self) -> Criterion:
        """The exit criterion plain threshold sequences are read with."""
        return self._criterion

    @property
    def classes(self) -> tuple[str, ...] | None:
        return self.manifest.classes

    # ------------------------------------------------------------------ inputs
    def check_input(self, x: Any, names: Sequence[str] | None = None) -> np.ndarray:
        """``x`` checked against the bundle's input, as contiguous (N, C, H, W) (see :func:`check_batch`)."""
        return check_batch(self.manifest.input, x, names)

    # ------------------------------------------------------------------ running
    def run_segment(self, k: int, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run segment ``k`` (0-based) on backend arrays ``feeds``; every output by name."""
        with self._locks[k]:
            return self.sessions[k].run(feeds)

    def predict(
        self,
        x: np.ndarray,
        *,
        thresholds: ThresholdsLike | None = None,
        force_exits: Sequence[int] | np.ndarray | None = None,
    ) -> Prediction:
        """Classify ``x`` (N, C, H, W) with per-sample early exit, in batches of ``batch_size``.

        ``thresholds`` overrides the runner's for this call (a sequence takes the runner's
        criterion). ``force_exits`` (N,) makes sample i leave at exit ``force_exits[i]``
        (1-based) whatever its confidence: for measuring cost on untrained weights.
        """
        x = self.check_input(x)
        th = self._call_thresholds(thresholds)
        forced = self._check_forced(force_exits, x.shape[0])
        parts = []
        step = self._step()
        for s in range(0, x.shape[0], step):
            f = None if forced is None else forced[s : s + step]
            parts.append(self._predict_batch(x[s : s + step], th, f))
        return parts[0] if len(parts) == 1 else Prediction.concat(parts)

    def all_exits(self, x: np.ndarray) -> list[np.ndarray]:
        """Every exit's logits for every sample (no early exit): K arrays (N, classes)."""
        x = self.check_input(x)
        chunks: list[list[np.ndarray]] = [[] for _ in self.segments]
        step = self._step()
        for s in range(0, x.shape[0], step):
            live: dict[str, Any] = {self.manifest.input.name: self.backend.from_host(x[s : s + step])}
            for k, seg in enumerate(self.segments):
                outs = self.run_segment(k, {t.name: live[t.name] for t in seg.inputs})
                chunks[k].append(np.asarray(self.backend.to_host(outs[seg.exit])))
                live.update(outs)
                live = {n: v for n, v in live.items() if n in self._keep[k]}
        if x.shape[0] == 0:
            return [np.zeros((0, self.manifest.num_classes), np.float32) for _ in self.segments]
        return [np.concatenate(c) for c in chunks]

    def segment_feeds(self, x: np.ndarray) -> list[dict[str, Any]]:
        """The feeds (backend arrays) each segment receives when all of ``x`` runs every segment.

        For timing one segment in isolation (``run_segment(k, feeds[k])``); ``x`` is one batch,
        at most ``max_batch`` samples.
        """
        x = self.check_input(x)
        if self.max_batch is not None and x.shape[0] > self.max_batch:
            raise InputError(
                f"a batch of {x.shape[0]} exceeds the largest batch the {self.entry.key} engines accept "
                f"({self.max_batch}); time batches of at most {self.max_batch}"
            )
        live: dict[str, Any] = {self.manifest.input.name: self.backend.from_host(x)}
        feeds = []
        for k, seg in enumerate(self.segments):
            f = {t.name: live[t.name] for t in seg.inputs}
            feeds.append(f)
            live.update(self.run_segment(k, f))
            live = {n: v for n, v in live.items() if n in self._keep[k]}
        return feeds

    def predict_files(
        self,
        paths: Iterable[str | os.PathLike[str]],
        *,
        thresholds: ThresholdsLike | None = None,
        batch_size: int | None = None,
    ) -> tuple[tuple[str, ...], Prediction]:
        """Classify image files, image directories and ``.npy``/``.npz`` arrays.

        Returns one name per sample (the file, or ``file[i]`` for array rows) and the
        predictions, in input order; inputs are decoded ``batch_size`` at a time.
        """
        th = self._call_thresholds(thresholds)
        bs = self.batch_size if batch_size is None else batch_size
        if isinstance(bs, bool) or bs < 1:
            raise InputError(f"batch_size must be a positive integer, not {bs!r}")
        names: list[str] = []
        parts: list[Prediction] = []
        step = self._step(bs)
        for batch in iter_input_batches(paths, self.manifest.preprocess, bs):
            x = self.check_input(batch.x, batch.names)
            parts.extend(self._predict_batch(x[s : s + step], th, None) for s in range(0, x.shape[0], step))
            names.extend(batch.names)
        return tuple(names), parts[0] if len(parts) == 1 else Prediction.concat(parts)

    # ------------------------------------------------------------------ internals
    def _call_thresholds(self, thresholds: ThresholdsLike | None) -> Thresholds | None:
        if thresholds is None:
            return self.thresholds
        crit = None if isinstance(thresholds, Thresholds) else self.criterion
        return resolve_thresholds(thresholds, crit, None, self.num_exits)

    def _check_forced(self, force: Sequence[int] | np.ndarray | None, n: int) -> np.ndarray | None:
        if force is None:
            return None
        f = np.asarray(force)
        if f.shape != (n,) or not (np.issubdtype(f.dtype, np.integer) or f.size == 0):
            raise InputError(f"force_exits must be {n} integers (one per sample), got shape {f.shape} {f.dtype}")
        if f.size and (f.min() < 1 or f.max() > self.num_exits):
            raise InputError(f"force_exits must be in 1..{self.num_exits}, got {f.min()}..{f.max()}")
        return f.astype(np.int64)

    def _last_exit(self, th: Thresholds | None) -> int:
        """1-based index of the last exit that runs (the last enabled one)."""
        if th is None:
            return self.num_exits
        enabled = [k + 1 for k, v in enumerate(th.values) if v is not None]
        return enabled[-1] if enabled else self.num_exits

    def _predict_batch(self, x: np.ndarray, th: Thresholds | None, forced: np.ndarray | None) -> Prediction:
        n = x.shape[0]
        if n == 0:
            return _empty_prediction()
        crit = th.criterion if th is not None else self.criterion
        last = int(forced.max()) if forced is not None else self._last_exit(th)
        if (self._chain is not None and forced is None
                and (th is None or all(v is None for v in th.values[: last - 1]))):
            # nobody can leave before exit ``last``: its segments back to back, one evaluation
            chain = self._chain.start(x)
            if chain is not None:
                for k in range(last - 1):
                    chain.run(k, False)
                s, lab, c = evaluate(chain.run(last - 1), crit)
                return Prediction(lab.astype(np.int64, copy=False), np.full(n, last, np.int64),
                                  c.astype(np.float32, copy=False), s.astype(np.float64, copy=False))
        labels = np.zeros(n, np.int64)
        exits = np.zeros(n, np.int64)
        conf = np.zeros(n, np.float32)
        score = np.zeros(n, np.float64)
        active = np.arange(n)
        # bound chain: carried tensors stay in the engine until a compaction copies them out
        chain = self._chain.start(x) if self._chain is not None else None
        live: dict[str, Any] = {} if chain is not None else {self.manifest.input.name: self.backend.from_host(x)}
        outs: dict[str, Any] = {}
        for k, seg in enumerate(self.segments[:last]):
            if chain is not None:
                # exit k's logits are read when samples may leave there
                need = k + 1 == last or forced is not None or (th is not None and th.values[k] is not None)
                logits: np.ndarray | None = chain.run(k, need)
            else:
                outs = self.run_segment(k, {t.name: live[t.name] for t in seg.inputs})
                logits = None
            if k + 1 == last or forced is not None:
                if k + 1 == last:
                    leave = np.ones(active.shape[0], bool)
                else:
                    assert forced is not None
                    leave = forced[active] == k + 1
                if leave.any():
                    if logits is None:
                        logits = np.asarray(self.backend.to_host(outs[seg.exit]))
                    s, lab, c = evaluate(logits[leave], crit)
                    gone = active[leave]
                    labels[gone], conf[gone], score[gone], exits[gone] = lab, c, s, k + 1
            elif th is None or th.values[k] is None:
                leave = np.zeros(active.shape[0], bool)  # exit disabled: its logits never leave the engine
            else:
                if logits is None:
                    logits = np.asarray(self.backend.to_host(outs[seg.exit]))
                s, lab, c = evaluate(logits, crit)
                leave = s >= th.values[k]
                if leave.any():
                    gone = active[leave]
                    labels[gone], conf[gone], score[gone], exits[gone] = lab[leave], c[leave], s[leave], k + 1
            if leave.all():
                break
            if chain is not None:
                if not leave.any():
                    continue
                live = chain.live(self._keep[k], k)  # compaction: leave the chain
                chain = None
            else:
                live.update(outs)
                live = {name: v for name, v in live.items() if name in self._keep[k]}
            if leave.any():
                rows = np.flatnonzero(~leave).astype(np.int64)
                live = {name: self.backend.take(v, rows) for name, v in live.items()}
                active = active[rows]
        return Prediction(labels, exits, conf, score)


def load(
    bundle: str | os.PathLike[str] | Bundle,
    target: str | TargetName | None = None,
    *,
    thresholds: ThresholdsLike | None = None,
    criterion: Criterion | str | None = None,
    threads: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    verify: bool = True,
    **backend_options: Any,
) -> Runner:
    """Open ``bundle`` on entry ``target`` (default: the entry calibrated last, else compiled last).

    Thresholds come from the target entry unless ``thresholds`` (a :class:`Thresholds`
    or one value per exit, ``None`` = exit disabled) overrides them; with none at all,
    every sample takes the last exit (a :class:`NoThresholdsWarning` when no entry was
    named). ``runner.entry.key`` names the entry. ``threads`` and ``backend_options`` go to
    the backend.
    """
    b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, verify=verify)
    choice = choose_entry(b.manifest, target)
    entry = choice.entry
    _LOG.info("loading %s from %s", choice.describe(), b.root)
    if target is None and thresholds is None and choice.warning is not None:
        warnings.warn(choice.warning, NoThresholdsWarning, stacklevel=2)
    th = resolve_thresholds(thresholds, criterion, entry.thresholds, len(b.manifest.segments))
    backend = create_backend(entry.target, threads=threads, **backend_options)
    return Runner(b, entry, backend, thresholds=th, criterion=criterion, batch_size=batch_size)
