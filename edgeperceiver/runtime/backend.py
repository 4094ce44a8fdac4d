"""The one small interface every runtime backend implements (build lives in ``targets/``).

A :class:`Backend` opens one :class:`Session` per segment and owns the arrays that flow
between segments. For host backends (ONNX Runtime, OpenVINO) those are numpy arrays; the
TensorRT backend keeps them on the GPU, so the runner never touches carried tensors
itself: it only asks the backend to ``take`` rows (compaction of surviving samples) and
to bring exit logits back with ``to_host``.

Standard library + numpy only; a backend module imports its engine lazily.

Concurrency: a backend whose sessions may ``run`` from several threads at once sets the
class attribute ``thread_safe = True``; without it the runner serialises the calls to
each session with a lock.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from ..bundle import Bundle, SegmentSpec, TargetEntry


class Session(Protocol):
    """One compiled segment, ready to run."""

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run on ``feeds`` (backend arrays by input name); return every output by name."""
        ...


class Backend(Protocol):
    """Opens segments of one target and moves arrays between host and engine."""

    name: str

    def open(self, bundle: Bundle, entry: TargetEntry, segment: SegmentSpec) -> Session:
        """Open the compiled artifact of ``segment`` for ``entry``."""
        ...

    def from_host(self, array: np.ndarray) -> Any:
        """Turn a host array into the backend's array type (identity for host backends)."""
        ...

    def to_host(self, array: Any) -> np.ndarray:
        """Bring a backend array back as numpy (identity for host backends)."""
        ...

    def take(self, array: Any, rows: np.ndarray) -> Any:
        """Rows ``rows`` (int64 indices) of ``array`` along the batch axis, on the backend."""
        ...


class HostArrays:
    """Array moves for backends whose tensors live in host memory as numpy arrays."""

    def from_host(self, array: np.ndarray) -> np.ndarray:
        return array

    def to_host(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array)

    def take(self, array: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array[rows])
