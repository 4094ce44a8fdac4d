"""ONNX Runtime backend: one ``InferenceSession`` per segment, tensors stay in host memory.

Session options: graph optimisation level ALL, sequential execution, and optionally a cache
of ORT-optimised models (``cache_dir``, keyed by the artifact's sha256, the ORT version and
the providers; level-ALL models may be specific to the CPU they were optimised on, so keep
the cache on the device).

Intra-op threads (``pool``):

- ``"session"`` (default): each segment session owns a pool of ``threads`` threads. Its idle
  threads spin as in ONNX Runtime's defaults, but stop spinning when a ``run`` returns
  (``session.force_spinning_stop``), so one segment's spinning threads never compete with
  the next segment's. ``spin=False`` turns spinning off altogether (a CPU shared with other
  busy processes); ``spin=True`` keeps ORT's plain spinning, which makes the segments
  compete.
- ``"shared"``: one process-wide intra-op pool of ``threads`` threads that every segment
  session uses (``set_global_thread_pool_sizes`` before ONNX Runtime's environment exists,
  ``use_per_session_threads = False``). Once it exists, every ONNX Runtime session the
  process opens afterwards must use it (ONNX Runtime refuses a per-session pool next to a
  global one, in this package and in any other code of the process), so it suits a process
  that only serves bundles. Asking for it with another size, or after other code made
  ONNX Runtime's global pool, is a :class:`~edgeperceiver.errors.TargetError` naming the
  cause. Spinning follows ONNX Runtime's defaults (on).
- ``"auto"``: ``"shared"`` when this process already has the global pool, else ``"session"``.

Backend arrays are plain numpy arrays: ``InferenceSession.run`` takes and returns them.
Keeping the carried tensors as ``OrtValue``s (``run_with_ort_values``) measured slower:
wrapping and unwrapping costs ~50 us per segment call, more than it saves in copies.

``onnxruntime`` is imported when the backend is created, never at module import.
ORT sessions are safe to ``run`` from several threads at once (``thread_safe = True``).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._optional import require
from ..bundle import Bundle, SegmentSpec, TargetEntry
from ..errors import InputError, TargetError
from ..fsutil import fsync_dir, temp_name
from .backend import BackendBase, SessionBase


@dataclass(frozen=True)
class OrtConfig:
    """Options of :class:`OrtBackend`."""

    threads: int | None = None  #: intra-op threads; None = ONNX Runtime's default (all cores)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    cache_dir: str | None = None  #: where ORT-optimised models are kept; None = no cache
    #: idle intra-op threads busy-wait: None = ORT's default (on; per-session pools stop
    #: after each run), False = never, True = always (per-session pools then compete)
    spin: bool | None = None
    pool: str = "session"  #: "session" (one pool per segment session) or "shared" (one per process)


POOLS = ("auto", "session", "shared")
_GLOBAL_LOCK = threading.Lock()
_global_pool: int | None = None  #: intra-op size of the process-wide pool this module made (0 = ORT's default)


def shared_pool_size() -> int | None:
    """The intra-op size of the process-wide pool made here (0 = ORT's default), or None."""
    return _global_pool


def _ensure_shared_pool(threads: int | None) -> None:
    """Make ONNX Runtime's process-wide intra-op pool of ``threads`` (once), or say why it cannot be."""
    global _global_pool
    size = 0 if threads is None else int(threads)
    with _GLOBAL_LOCK:
        if _global_pool is not None:
            if _global_pool != size:
                raise TargetError(
                    f"ONNX Runtime's shared thread pool already has {_global_pool or 'the default number of'} "
                    f"threads in this process and cannot change; threads={threads} needs a process of its own")
            return
        from onnxruntime.capi import _pybind_state

        try:
            _pybind_state.set_global_thread_pool_sizes(size, 1)
        except Exception as exc:  # ORT's Fail: the global pools exist already (made elsewhere)
            raise TargetError("ONNX Runtime's global thread pool was made outside edgeperceiver in this process "
                              f"and its size cannot change ({exc}); open the bundle in a process of its own") from exc
        _global_pool = size


class OrtBackend(BackendBase):
    """Runs ONNX segments with ONNX Runtime (CPU by default; any installed provider).

    Backend arrays are numpy arrays.
    """

    name = "onnxruntime"
    thread_safe = True

    def __init__(
        self,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        spin: bool | None = None,
        pool: str = "session",
    ) -> None:
        if threads is not None and (isinstance(threads, bool) or int(threads) < 1):
            raise InputError(f"threads must be a positive integer, not {threads!r}")
        if pool not in POOLS:
            raise InputError(f"ONNX Runtime pool must be one of {', '.join(POOLS)}, not {pool!r}")
        self.ort = require("onnxruntime", purpose="running a bundle on ONNX Runtime")
        available = tuple(self.ort.get_available_providers())
        chosen = tuple(providers) if providers else ("CPUExecutionProvider",)
        missing = [p for p in chosen if p not in available]
        if missing:
            raise TargetError(f"ONNX Runtime providers {missing} are not available here (have: {list(available)})")
        self.config = OrtConfig(
            threads=None if threads is None else int(threads),
            providers=chosen,
            cache_dir=None if cache_dir is None else str(cache_dir),
            spin=None if spin is None else bool(spin),
            pool="shared" if pool == "shared" or (pool == "auto" and _global_pool is not None) else "session",
        )
        if self.config.pool == "shared":
            _ensure_shared_pool(self.config.threads)
        elif _global_pool is not None:
            raise TargetError("this process has ONNX Runtime's shared thread pool, and ONNX Runtime opens no "
                              "session with a pool of its own next to it: use pool='shared' or 'auto'")

    def from_host(self, array: np.ndarray) -> Any:
        return array

    def to_host(self, array: Any) -> np.ndarray:
        """``array`` as numpy (it is one already)."""
        return np.asarray(array)

    def take(self, array: Any, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` of ``array`` along the batch axis, as a new contiguous numpy array."""
        return np.ascontiguousarray(array[rows])

    def session_options(self) -> Any:
        """The ``SessionOptions`` every segment is opened with."""
        so = self.ort.SessionOptions()
        so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
        if self.config.pool == "shared":
            so.use_per_session_threads = False
        elif self.config.threads is not None:
            so.intra_op_num_threads = self.config.threads
            so.inter_op_num_threads = 1
        spin = self.config.spin
        if spin is not None:
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        if spin is None and self.config.pool == "session":
            so.add_session_config_entry("session.force_spinning_stop", "1")
        so.log_severity_level = 3
        return so

    def open(self, bundle: Bundle, entry: TargetEntry, segment: SegmentSpec) -> OrtSession:
        """Open artifact ``entry.segments[segment.index - 1]`` of ``bundle``.

        With ``cache_dir``, the graph ONNX Runtime optimized is saved there (written under a
        unique name, fsynced, then renamed into place) and later sessions load it instead; a
        cached file that no longer loads is deleted and made again from the bundle's file.
        """
        rel = entry.segments[segment.index - 1]
        path = bundle.path(rel)
        if self.config.cache_dir is None:
            return OrtSession(self._session(path, self.session_options(), segment, rel), segment)
        cached = self._cached_path(path, bundle.manifest.files.get(rel))
        if cached.is_file():
            try:
                return OrtSession(self._session(cached, self.session_options(), segment, rel), segment)
            except TargetError:
                cached.unlink(missing_ok=True)  # damaged (e.g. cut short by a crash): made again below
        cached.parent.mkdir(parents=True, exist_ok=True)
        so = self.session_options()
        tmp = temp_name(cached)  # ORT writes the file itself
        so.optimized_model_filepath = str(tmp)
        try:
            sess = self._session(path, so, segment, rel)
            if tmp.is_file():
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, cached)
                fsync_dir(cached.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return OrtSession(sess, segment)

    def _session(self, model: Path, so: Any, segment: SegmentSpec, rel: str) -> Any:
        try:
            return self.ort.InferenceSession(str(model), sess_options=so, providers=list(self.config.providers))
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise TargetError(f"ONNX Runtime cannot load segment {segment.index} ({rel}): {exc}") from exc

    def _cached_path(self, path: Path, digest: str | None) -> Path:
        if digest is None:  # not listed in the manifest: hash it here
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            digest = h.hexdigest()
        key = f"{digest[:24]}-ort{self.ort.__version__}-{'_'.join(self.config.providers)}"
        return Path(str(self.config.cache_dir)) / f"{key}.onnx"


class OrtSession(SessionBase):
    """One segment's ``InferenceSession``; returns every output by name, as numpy arrays."""

    def __init__(self, session: Any, segment: SegmentSpec) -> None:
        self.session = session
        self.segment = segment
        self.output_names = [o.name for o in session.get_outputs()]
        have = {i.name for i in session.get_inputs()}
        missing = [t.name for t in segment.inputs if t.name not in have]
        if missing:
            raise TargetError(f"segment {segment.index}: the ONNX model lacks inputs {missing} (has {sorted(have)})")
        self.input_names = [t.name for t in segment.inputs]

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        try:
            values = {n: np.ascontiguousarray(feeds[n]) for n in self.input_names}
            outs = self.session.run(self.output_names, values)
        except KeyError as exc:
            raise InputError(f"segment {self.segment.index} needs input {exc.args[0]!r}") from None
        except Exception as exc:  # onnxruntime's own error types
            raise TargetError(f"ONNX Runtime failed in segment {self.segment.index}: {exc}") from exc
        return dict(zip(self.output_names, outs, strict=True))

