"""What one deployment of a bundle is: the bundle, its entry and thresholds, batching, limits."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgeperceiver.bundle import Bundle
from edgeperceiver.errors import InputError
from edgeperceiver.runtime import resolve_thresholds

MiB = 1 << 20


@dataclass(frozen=True)
class ServeConfig:
    """Options of one served bundle (shared by every replica; picklable).

    ``bundle`` must be readable at the same path on every node that runs a replica.
    ``entry`` / ``thresholds`` default to what :func:`edgeperceiver.runtime.load` picks
    (the bundle's calibrated thresholds); ``thresholds`` has one value per exit, ``None``
    turns an exit off (all ``None``: every sample runs to the last exit).
    """

    bundle: str
    entry: str | None = None
    thresholds: tuple[float | None, ...] | None = None
    replicas: int = 1
    max_batch: int = 16  #: requests per batch formed by Ray Serve
    batch_wait_ms: float = 2.0  #: how long a batch waits to fill once its first request came
    threads: int = 1  #: engine threads per replica
    replica_cpus: float = 1.0  #: Ray CPUs reserved per replica (placement)
    max_body_bytes: int = 8 * MiB
    max_samples: int = 256  #: samples per request (JSON / .npy bodies)
    name: str = "edgeperceiver"  #: Ray Serve application name
    route_prefix: str = "/"
    access_log: bool = False  #: Ray Serve's per-request log lines
    #: benchmarking only: each sample leaves at an exit drawn with these proportions, whatever
    #: its confidence (the cost of an exit mix on untrained weights; answers are meaningless)
    exit_mix: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for field, value, low in (
            ("replicas", self.replicas, 1),
            ("max_batch", self.max_batch, 1),
            ("threads", self.threads, 1),
            ("max_body_bytes", self.max_body_bytes, 1),
            ("max_samples", self.max_samples, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"{field} must be an integer >= {low}, got {value!r}")
        if not self.batch_wait_ms >= 0:
            raise InputError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms!r}")
        if not self.replica_cpus >= 0:
            raise InputError(f"replica_cpus must be >= 0, got {self.replica_cpus!r}")
        if self.exit_mix is not None and (
            any(not p >= 0 for p in self.exit_mix) or abs(sum(self.exit_mix) - 1.0) > 1e-6
        ):
            raise InputError(f"exit_mix must be proportions >= 0 that sum to 1, got {self.exit_mix}")
        if not self.route_prefix.startswith("/"):
            raise InputError(f"route_prefix must start with '/', got {self.route_prefix!r}")

    @classmethod
    def for_bundle(cls, bundle: str | os.PathLike[str], **options: object) -> ServeConfig:
        """A config for ``bundle`` (made absolute), checked against it before anything starts.

        A missing or broken bundle, an unknown entry or thresholds of the wrong length are
        reported here, in the caller's process, not by a replica that fails to start.
        """
        path = Path(bundle).resolve()
        config = cls(str(path), **options)  # type: ignore[arg-type]
        b = Bundle.open(path)
        # with no entry named the runtime picks one; only a named entry is checked here
        default = None if config.entry is None else b.manifest.target(config.entry).thresholds
        num_exits = len(b.manifest.segments)
        resolve_thresholds(config.thresholds, None, default, num_exits)
        if config.exit_mix is not None and len(config.exit_mix) != num_exits:
            raise InputError(f"exit_mix has {len(config.exit_mix)} proportions for a model with {num_exits} exits")
        return config
