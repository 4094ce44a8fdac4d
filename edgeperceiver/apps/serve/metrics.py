"""The service's Prometheus metrics (Ray Serve's metrics API), mirrored in a per-replica summary.

Ray exports each metric with a ``ray_`` prefix (counters also with ``_total``) from every
node's metrics agent; Serve adds the ``deployment``, ``replica``, ``application`` and
``route`` tags. The same numbers, for this replica only, are kept in plain Python so that
``GET /stats`` can show them without a Prometheus server.
"""

from __future__ import annotations

import threading
from collections import Counter as _Tally
from typing import Any

#: metric names, as defined here (Prometheus shows them as ``ray_<name>[_total]``)
REQUESTS = "edgeperceiver_requests"
ERRORS = "edgeperceiver_errors"
BATCH_SIZE = "edgeperceiver_batch_size"
BATCH_SECONDS = "edgeperceiver_batch_seconds"
EXIT_SAMPLES = "edgeperceiver_exit_samples"

BATCH_SIZE_BUCKETS: list[float] = [1, 2, 4, 8, 16, 32, 64, 128, 256]
BATCH_SECONDS_BUCKETS: list[float] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]


def _keys(*names: str) -> Any:
    """Tag keys (Ray annotates them as a 1-tuple; any tuple of names is meant)."""
    return names


class ServeMetrics:
    """Counters and histograms of one replica: requests, errors, batch sizes, samples per exit."""

    def __init__(self, entry: str) -> None:
        from ray.serve import metrics

        self._requests = metrics.Counter(
            REQUESTS, description="Prediction requests answered, by HTTP status.", tag_keys=_keys("entry", "status")
        )
        self._errors = metrics.Counter(
            ERRORS, description="Requests refused or failed, by error kind.", tag_keys=_keys("entry", "kind")
        )
        self._batch_size = metrics.Histogram(
            BATCH_SIZE, description="Samples per batch the runner ran.", boundaries=BATCH_SIZE_BUCKETS,
            tag_keys=_keys("entry"),
        )  # fmt: skip
        self._batch_seconds = metrics.Histogram(
            BATCH_SECONDS, description="Seconds the runner took per batch (early exit included).",
            boundaries=BATCH_SECONDS_BUCKETS, tag_keys=_keys("entry"),
        )  # fmt: skip
        self._exit_samples = metrics.Counter(
            EXIT_SAMPLES, description="Samples that left at each exit (1-based).", tag_keys=_keys("entry", "exit")
        )
        self.entry = entry
        self._lock = threading.Lock()
        self._status: _Tally[int] = _Tally()
        self._kinds: _Tally[str] = _Tally()
        self._exits: _Tally[int] = _Tally()
        self._batch_sizes: _Tally[int] = _Tally()
        self._batches = 0
        self._batch_time = 0.0

    def request(self, status: int, kind: str | None = None) -> None:
        """One request answered with ``status``; ``kind`` names the error when it is one."""
        self._requests.inc(1, tags={"entry": self.entry, "status": str(status)})
        if kind is not None:
            self._errors.inc(1, tags={"entry": self.entry, "kind": kind})
        with self._lock:
            self._status[status] += 1
            if kind is not None:
                self._kinds[kind] += 1

    def batch(self, exits: Any, seconds: float) -> None:
        """One batch ran: ``exits`` is the 1-based exit of each of its samples."""
        n = len(exits)
        self._batch_size.observe(n, tags={"entry": self.entry})
        self._batch_seconds.observe(seconds, tags={"entry": self.entry})
        per_exit = _Tally(int(e) for e in exits)
        for e, count in per_exit.items():
            self._exit_samples.inc(count, tags={"entry": self.entry, "exit": str(e)})
        with self._lock:
            self._exits.update(per_exit)
            self._batch_sizes[n] += 1
            self._batches += 1
            self._batch_time += seconds

    def summary(self) -> dict[str, Any]:
        """This replica's totals since it started (JSON-ready)."""
        with self._lock:
            return {
                "requests": {str(k): v for k, v in sorted(self._status.items())},
                "errors": dict(sorted(self._kinds.items())),
                "exit_samples": {str(k): v for k, v in sorted(self._exits.items())},
                "batches": self._batches,
                "batch_sizes": {str(k): v for k, v in sorted(self._batch_sizes.items())},
                "batch_seconds": round(self._batch_time, 6),
            }
