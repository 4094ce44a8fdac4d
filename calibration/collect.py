"""Collect every exit's prediction and confidence once, on the deployed target and precision.

The compiled segments of the bundle's target entry (e.g. ``openvino-int8``) run every
held-out sample to every exit (``Runner.all_exits``); the logits are reduced at once to
what the policies need (the predicted class and the score under each criterion, computed
by the runtime's own :func:`~edgeperceiver.runtime.criteria.scores`, so the thresholds
mean on device what they meant here). The record is cached in
``calibration/`` under the cache root (:func:`edgeperceiver.fsutil.cache_root`:
``$EDGEPERCEIVER_CACHE``, else ``$XDG_CACHE_HOME/edgeperceiver``, else
``~/.cache/edgeperceiver``), keyed by the sha256 of the target's segment artifacts and of
the data; a truncated or corrupt cache file is ignored and rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeperceiver.bundle import Bundle
from edgeperceiver.data import Dataset
from edgeperceiver.errors import CalibrationError
from edgeperceiver.fsutil import atomic_write, cache_root
from edgeperceiver.progress import Progress
from edgeperceiver.types import Criterion

CACHE_VERSION = "edgeperceiver.calibration.record/1"


@dataclass(frozen=True)
class ExitRecord:
    """Per-exit outputs of N samples on one target.

    ``preds`` is (K, N) int64 (argmax of each exit's logits), ``scores[criterion]`` (K, N)
    float64 for every :class:`Criterion`; ``labels`` (N,) or ``None``.
    """

    preds: np.ndarray
    scores: dict[Criterion, np.ndarray]
    labels: np.ndarray | None
    num_classes: int
    target: str = ""

    @property
    def num_exits(self) -> int:
        return int(self.preds.shape[0])

    def __len__(self) -> int:
        return int(self.preds.shape[1])

    @classmethod
    def from_logits(
        cls, logits: Sequence[np.ndarray], labels: np.ndarray | None = None, target: str = ""
    ) -> ExitRecord:
        """Reduce K (N, C) logit arrays to predictions and every criterion's scores."""
        from edgeperceiver.runtime.criteria import scores as criterion_scores

        if not logits:
            raise CalibrationError("no exit outputs to record")
        shapes = {np.shape(z) for z in logits}
        if len(shapes) != 1:
            raise CalibrationError(f"exit logits have different shapes: {sorted(shapes)}")
        preds = np.stack([np.asarray(z).argmax(axis=1) for z in logits]).astype(np.int64)
        scores = {c: np.stack([criterion_scores(np.asarray(z), c) for z in logits]) for c in Criterion}
        if labels is not None and np.shape(labels) != (preds.shape[1],):
            raise CalibrationError(f"{np.shape(labels)} labels for {preds.shape[1]} samples")
        y = None if labels is None else np.asarray(labels, dtype=np.int64)
        return cls(preds, scores, y, int(np.shape(logits[0])[1]), target)

    def subset(self, index: np.ndarray) -> ExitRecord:
        """The samples at ``index``."""
        return ExitRecord(
            preds=self.preds[:, index],
            scores={c: s[:, index] for c, s in self.scores.items()},
            labels=None if self.labels is None else self.labels[index],
            num_classes=self.num_classes,
            target=self.target,
        )

    def save(self, path: Path) -> None:
        """Write as ``.npz`` atomically."""
        arrays: dict[str, Any] = {"preds": self.preds, **{f"score_{c.value}": s for c, s in self.scores.items()}}
        if self.labels is not None:
            arrays["labels"] = self.labels
        meta = json.dumps({"version": CACHE_VERSION, "num_classes": self.num_classes, "target": self.target})
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(meta), **arrays)
        atomic_write(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> ExitRecord | None:
        """A cached record, or ``None`` when missing, unreadable or of another version."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("version") != CACHE_VERSION:
                    return None
                scores = {c: np.asarray(z[f"score_{c.value}"]) for c in Criterion}
                labels = np.asarray(z["labels"]) if "labels" in z.files else None
                return cls(np.asarray(z["preds"]), scores, labels, int(meta["num_classes"]), str(meta["target"]))
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error):
            return None  # missing, truncated or corrupt: rebuilt and saved again


def cache_dir() -> Path:
    """``calibration/`` under the one cache root (:func:`edgeperceiver.fsutil.cache_root`)."""
    return cache_root() / "calibration"


def cache_key(bundle: Bundle, target_key: str, data: Dataset) -> str:
    """sha256 over the target's segment artifacts (from the manifest) and the data's bytes."""
    m = bundle.manifest
    entry = m.target(target_key)
    h = hashlib.sha256()
    h.update(CACHE_VERSION.encode())
    h.update(entry.key.encode())
    for rel in (*(s.path for s in m.segments), *entry.segments):
        h.update(rel.encode())
        h.update(m.files.get(rel, "").encode())
    h.update(json.dumps([s.exit for s in m.segments]).encode())
    x = np.ascontiguousarray(data.x)
    h.update(str(x.shape).encode() + str(x.dtype).encode())
    h.update(hashlib.sha256(x.tobytes()).digest())
    if data.y is not None:
        h.update(hashlib.sha256(np.ascontiguousarray(data.y, dtype=np.int64).tobytes()).digest())
    return h.hexdigest()


def collect(
    bundle: Bundle,
    data: Dataset,
    *,
    target: str | None = None,
    batch_size: int = 32,
    cache: bool = True,
    progress: Progress | None = None,
) -> ExitRecord:
    """Run ``data`` through every exit of ``target`` (the compiled precision) and record the outputs."""
    entry = bundle.manifest.target(target)
    key = cache_key(bundle, entry.key, data)
    path = cache_dir() / f"{key}.npz"
    if cache:
        cached = ExitRecord.load(path)
        if cached is not None and len(cached) == len(data):
            if progress is not None:
                progress(len(data), len(data))
            return cached
    from edgeperceiver.runtime import load

    runner = load(bundle, entry.key, batch_size=batch_size)
    n = len(data)
    if n == 0:
        raise CalibrationError("no held-out samples to run")
    # reduce each batch at once (argmax + scores): the logits of a large set need not fit in memory
    parts: list[ExitRecord] = []
    for start in range(0, n, batch_size):
        outs = runner.all_exits(data.x[start : start + batch_size])
        parts.append(ExitRecord.from_logits(outs, None, entry.key))
        if progress is not None:
            progress(min(start + batch_size, n), n)
    record = ExitRecord(
        preds=np.concatenate([p.preds for p in parts], axis=1),
        scores={c: np.concatenate([p.scores[c] for p in parts], axis=1) for c in Criterion},
        labels=None if data.y is None else np.asarray(data.y, dtype=np.int64),
        num_classes=parts[0].num_classes,
        target=entry.key,
    )
    if cache:
        # a read-only cache is no reason to fail; the record is still returned
        with contextlib.suppress(OSError):
            record.save(path)
    return record
