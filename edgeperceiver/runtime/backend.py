"""The one small interface every runtime backend implements (build lives in ``targets/``).

A :class:`Backend` opens one :class:`Session` per segment and owns the arrays that flow
between segments. For host backends (ONNX Runtime, OpenVINO) those are numpy arrays; the
TensorRT backend keeps them on the GPU, so the runner never touches carried tensors
itself: it only asks the backend to ``take`` rows (compaction of surviving samples) and
to bring exit logits back with ``to_host``.

What the runner uses beyond that, each with a default in :class:`BackendBase` /
:class:`SessionBase`:

- ``Session.max_batch``: the largest batch one ``run`` accepts (``None`` = any); the
  runner splits every batch to it, so callers never see an engine's limit;
- ``Backend.chain(sessions, input_name)``: an optional fast path that binds carried
  tensors between the backend's own sessions (OpenVINO); ``None`` = run session by session;
- ``close()`` on both: release engine and device resources (the runner's ``close`` and
  ``with load(...) as runner:`` call them).

Concurrency: a backend whose sessions may ``run`` from several threads at once sets the
class attribute ``thread_safe = True``; without it the runner serialises the calls to
each session with a lock.

Standard library + numpy only; a backend module imports its engine lazily.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, TypeVar

import numpy as np

from ..bundle import Bundle, SegmentSpec, TargetEntry


class ChainRun(Protocol):
    """One batch bound to a backend's chain of sessions (see :meth:`Backend.chain`)."""

    def run(self, k: int, logits: bool = True) -> Any:
        """Run segment ``k`` (0-based); exit ``k``'s logits as numpy when ``logits`` (else None)."""
        ...

    def live(self, names: frozenset[str], k: int) -> dict[str, Any]:
        """The carried tensors ``names`` after segment ``k``, as backend arrays (leaves the chain)."""
        ...


class Chain(Protocol):
    """Sessions bound together by their backend; ``start`` binds one input batch."""

    def start(self, x: np.ndarray) -> ChainRun | None:
        """Bind ``x``; ``None`` where the chain does not apply to this batch."""
        ...


class Session(Protocol):
    """One compiled segment, ready to run."""

    #: largest batch one ``run`` accepts (``None``: no limit)
    max_batch: int | None

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run on ``feeds`` (backend arrays by input name); return every output by name."""
        ...

    def close(self) -> None:
        """Release the session's engine resources (it is not used afterwards)."""
        ...


class Backend(Protocol):
    """Opens segments of one target and moves arrays between host and engine."""

    name: str
    thread_safe: bool

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

    def chain(self, sessions: tuple[Any, ...], input_name: str) -> Chain | None:
        """Sessions bound into a chain for the all-samples-go-on case, or ``None``."""
        ...

    def close(self) -> None:
        """Release the backend (after its sessions are closed)."""
        ...


_B = TypeVar("_B", bound="BackendBase")


class SessionBase:
    """Defaults of the :class:`Session` protocol: no batch limit, nothing to release."""

    max_batch: int | None = None

    def close(self) -> None:
        return None


class BackendBase:
    """Defaults of the :class:`Backend` protocol: not thread-safe, no chain, nothing to release.

    A backend is also a context manager (``with create_backend(...) as backend:`` closes it).
    """

    thread_safe = False

    def chain(self, sessions: tuple[Any, ...], input_name: str) -> Chain | None:
        return None

    def close(self) -> None:
        return None

    def __enter__(self: _B) -> _B:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HostArrays(BackendBase):
    """Array moves for backends whose tensors live in host memory as numpy arrays."""

    def from_host(self, array: np.ndarray) -> np.ndarray:
        return array

    def to_host(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array)

    def take(self, array: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array[rows])
