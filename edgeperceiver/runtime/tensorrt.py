"""TensorRT runtime backend: one engine per segment, carried tensors kept on the GPU.

The build side is ``targets/tensorrt.py``; this module is the :class:`TensorRTBackend`.
Its parts live beside it: device facts and imports (``tensorrt_device``), the log
(``tensorrt_log``), GPU memory (``tensorrt_memory``) and the session (``tensorrt_session``).

- **Device arrays.** Every tensor that flows between segments is a
  :class:`~edgeperceiver.runtime.tensorrt_memory.DeviceArray`; only what the runner asks
  for with :meth:`TensorRTBackend.to_host` (each exit's logits) comes back to the host,
  through a pinned (page-locked) buffer; host inputs go in through another.
- **Memory.** Output buffers come from a caching pool (pycuda's ``DeviceMemoryPool``) and
  are sized for the engine's max batch, so after the first batch no allocation reaches the
  CUDA driver and an array is never overwritten while someone holds it. The execution
  contexts share one scratch allocation sized to the largest engine.
- **Checked before deserializing.** Engines are tied to one GPU and one TensorRT version;
  the manifest's engine facts are compared with this device first.
- **CUDA context and threads.** The device's primary context (the one the CUDA runtime,
  hence TensorRT, uses) is pushed around every call in the calling thread and popped
  after it, so any thread may use the backend. All work goes to one CUDA stream per
  backend (stream order makes pool reuse safe); the runner serialises each session's
  ``run`` (``thread_safe = False``); pinned buffers and the pool are guarded by a lock.
  :meth:`TensorRTBackend.close` synchronizes, releases the sessions, memory and the
  primary context; backends still open at interpreter exit are closed by an ``atexit``
  hook while CUDA is still alive.

Only the standard library and numpy are imported at module import; ``tensorrt`` and
``pycuda`` are imported when a backend is created (``pip install 'edgeperceiver[tensorrt]'``).
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._optional import require
from ..bundle import Bundle, SegmentSpec, TargetEntry
from ..errors import InputError, TargetError
from .backend import BackendBase
from .tensorrt_device import (
    REBUILD,
    CudaDriver,
    DeviceFacts,
    check_engine_compatible,
    current_device_facts,
    import_cuda,
    import_tensorrt,
)
from .tensorrt_log import BuildLog, make_trt_logger
from .tensorrt_memory import DeviceArray, PinnedBuffer, SharedScratch, gather_copy_plan
from .tensorrt_session import TensorRTSession

__all__ = ["Bindings", "DeviceArray", "DeviceFacts", "TensorRTBackend", "TensorRTSession", "default_bindings"]


@dataclass(frozen=True)
class Bindings:
    """The libraries a backend calls: ``tensorrt``, ``pycuda.driver`` and a device-memory pool factory.

    :func:`default_bindings` gives the real ones; tests pass an in-memory stand-in.
    """

    trt: Any
    cuda: CudaDriver
    memory_pool: Any  #: () -> an object with ``allocate(nbytes)``, ``free_held()``, ``stop_holding()``


def default_bindings() -> Bindings:
    """TensorRT, pycuda's driver and pycuda's ``DeviceMemoryPool`` (imported now)."""
    trt_mod = import_tensorrt()
    cuda = import_cuda()
    tools = require("pycuda.tools", purpose="pooled GPU memory")
    return Bindings(trt_mod, cuda, tools.DeviceMemoryPool)


_OPEN: weakref.WeakSet[TensorRTBackend] = weakref.WeakSet()
_HOOKED: list[bool] = []


def _close_open_backends() -> None:
    """Close what is still open while CUDA still works (no "dead context" errors at exit)."""
    for backend in list(_OPEN):
        with contextlib.suppress(Exception):  # nothing can be reported at interpreter exit
            backend.close()


def _track(backend: TensorRTBackend) -> None:
    """Remember an open backend; the exit hook is registered after pycuda's own (so it runs first)."""
    if not _HOOKED:
        atexit.register(_close_open_backends)
        _HOOKED.append(True)
    _OPEN.add(backend)


class TensorRTBackend(BackendBase):
    """Runs TensorRT engines on one GPU; carried tensors stay on the device.

    ``device``: CUDA ordinal. ``max_batch``: cap the batch each session accepts (default:
    each engine's profile maximum; the runner splits larger batches). ``strict_device``:
    refuse engines built on another GPU model of the same compute capability.
    ``synchronous``: ``Session.run`` waits for the GPU before returning (timing a ``run``
    measures the work, not its enqueue); ``False`` leaves the stream running until the
    next ``to_host``. ``cuda_graphs``: replay each segment at batch 1 as a CUDA graph.
    ``bindings``: the libraries to call (default: :func:`default_bindings`).
    """

    name = "tensorrt"
    thread_safe = False  #: the runner serialises each segment's session

    def __init__(
        self,
        *,
        device: int = 0,
        max_batch: int | None = None,
        strict_device: bool = True,
        synchronous: bool = True,
        cuda_graphs: bool = True,
        bindings: Bindings | None = None,
    ) -> None:
        if isinstance(device, bool) or not isinstance(device, int) or device < 0:
            raise InputError(f"device must be a CUDA ordinal (0, 1, ...), not {device!r}")
        if max_batch is not None and (isinstance(max_batch, bool) or int(max_batch) < 1):
            raise InputError(f"max_batch must be a positive integer, not {max_batch!r}")
        self.device = device
        self.max_batch = None if max_batch is None else int(max_batch)
        self.strict_device = bool(strict_device)
        self.synchronous = bool(synchronous)
        self.cuda_graphs = bool(cuda_graphs)
        libs = bindings if bindings is not None else default_bindings()
        self._trt = libs.trt
        self.cuda = libs.cuda
        try:
            self._ctx = self.cuda.Device(device).retain_primary_context()
        except Exception as exc:  # pycuda.driver.LogicError for a bad ordinal
            raise InputError(f"CUDA device {device} is not available: {exc}") from exc
        self._tls = threading.local()
        self._lock = threading.RLock()  #: pinned buffers, the pool, the session list
        self._closed = False
        self._sessions: list[TensorRTSession] = []
        with self.activated():
            self.facts = current_device_facts(device, cuda=self.cuda, trt_module=self._trt)
            self.stream = self.cuda.Stream()
            self._pool = libs.memory_pool()
            self.scratch = SharedScratch(self.allocate)
            self._pinned_in = PinnedBuffer(self.cuda)
            self._pinned_out = PinnedBuffer(self.cuda)
            self._staged = self.cuda.Event()  #: recorded after the last copy out of the input pinned buffer
            self.log = BuildLog(min_severity=2)
            self._runtime: Any = self._trt.Runtime(make_trt_logger(self.log, module=self._trt))
        _track(self)

    # -- CUDA context

    @contextmanager
    def activated(self) -> Iterator[None]:
        """The device's primary context, current in the calling thread for the block (re-entrant)."""
        if self._closed_flag():
            raise TargetError("this TensorRT backend is closed")
        depth = getattr(self._tls, "depth", 0)
        if depth == 0:
            self._ctx.push()
        self._tls.depth = depth + 1
        try:
            yield
        finally:
            self._tls.depth -= 1
            if self._tls.depth == 0:
                self._ctx.pop()

    def _closed_flag(self) -> bool:
        return getattr(self, "_closed", False)

    # -- Backend protocol

    def open(self, bundle: Bundle, entry: TargetEntry, segment: SegmentSpec) -> TensorRTSession:
        """Check the engine facts against this GPU, then deserialize segment ``segment.index``."""
        check_engine_compatible(entry, self.facts, strict_device=self.strict_device)
        rel = entry.segments[segment.index - 1]
        try:
            plan = bundle.path(rel).read_bytes()
        except OSError as exc:
            raise TargetError(f"cannot read TensorRT engine {rel}: {exc}") from exc
        with self.activated(), self._lock:
            before = len(self.log.records)
            dla = entry.metadata.get("dla_core")
            if dla is not None:  # a DLA engine deserializes onto the core it was built for
                self._runtime.DLA_core = int(dla)
            engine = self._runtime.deserialize_cuda_engine(plan)
            if engine is None:
                said = "; ".join(m for _, m in self.log.records[before:]) or "no message"
                raise TargetError(
                    f"TensorRT could not deserialize {rel} ({said}). Rebuild the engines on this device: "
                    + REBUILD.format(precision=entry.precision.value)
                )
            session = TensorRTSession(self, engine, segment, rel, self._trt, cuda_graphs=self.cuda_graphs)
            self._sessions.append(session)
        return session

    def from_host(self, array: np.ndarray) -> DeviceArray:
        """Copy a host array to a new (pooled) device array, through the pinned input buffer."""
        host = np.ascontiguousarray(array)
        if host.ndim == 0:
            raise InputError("cannot move a 0-d array to the GPU as a batch")
        with self.activated(), self._lock:
            dev = self.empty(host.shape, host.dtype)
            if host.nbytes:
                self._staged.synchronize()  # the previous copy out of the pinned buffer is done
                pinned = self._pinned_in.view(host.shape, host.dtype)
                pinned[...] = host
                self.cuda.memcpy_htod_async(dev.ptr, pinned, self.stream)
                self._staged.record(self.stream)
        return dev

    def to_host(self, array: Any) -> np.ndarray:
        """Copy a device array into a new numpy array (through the pinned output buffer; waits)."""
        if isinstance(array, np.ndarray):
            return array
        if not isinstance(array, DeviceArray):
            raise InputError(f"to_host expects a DeviceArray, not {type(array).__name__}")
        with self.activated(), self._lock:
            if not array.nbytes:
                self.stream.synchronize()
                return np.empty(array.shape, dtype=array.dtype)
            pinned = self._pinned_out.view(array.shape, array.dtype)
            self.cuda.memcpy_dtoh_async(pinned, array.ptr, self.stream)
            self.stream.synchronize()
            return pinned.copy()

    def take(self, array: Any, rows: np.ndarray) -> DeviceArray:
        """Rows ``rows`` of ``array`` gathered on the device into a new array."""
        if isinstance(array, np.ndarray):
            array = self.from_host(array)
        if not isinstance(array, DeviceArray):
            raise InputError(f"take expects a DeviceArray, not {type(array).__name__}")
        idx = np.asarray(rows)
        plan = gather_copy_plan(idx, array.batch, array.row_bytes)
        with self.activated(), self._lock:
            out = self.empty((int(idx.size), *array.shape[1:]), array.dtype)
            for src, dst, nbytes in plan:
                self.cuda.memcpy_dtod_async(out.ptr + dst, array.ptr + src, nbytes, self.stream)
        return out

    def chain(self, sessions: tuple[Any, ...], input_name: str) -> None:
        """No bound chain: carried tensors already stay on the device between sessions."""
        return None

    # -- memory

    def empty(self, shape: Sequence[int], dtype: Any) -> DeviceArray:
        """An uninitialised device array from the memory pool (freed back when unreferenced)."""
        dt = np.dtype(dtype)
        nbytes = int(np.prod(tuple(shape), dtype=np.int64)) * dt.itemsize
        alloc = self.reserve(nbytes)
        return DeviceArray(int(alloc), tuple(int(s) for s in shape), dt, alloc)

    def reserve(self, nbytes: int) -> Any:
        """``nbytes`` of device memory from the caching pool (returned to it when unreferenced)."""
        with self._lock:
            return self._pool.allocate(max(int(nbytes), 1))

    def allocate(self, nbytes: int) -> Any:
        """A dedicated (non-pooled) device allocation of ``nbytes``, freed with its owner."""
        return self.cuda.mem_alloc(max(int(nbytes), 1))

    def synchronize(self) -> None:
        with self.activated():
            self.stream.synchronize()

    def close(self) -> None:
        """Finish pending work; release sessions, memory and the CUDA context (idempotent).

        Device arrays handed out earlier must not be used afterwards.
        """
        if self._closed_flag():
            return
        with self.activated(), self._lock:
            self.stream.synchronize()
            for session in self._sessions:
                session.close()
            self._sessions.clear()
            self.scratch.release()
            self._pinned_in.release()
            self._pinned_out.release()
            self._pool.stop_holding()
            self._runtime = None
        self._closed = True
        _OPEN.discard(self)
        self._ctx.detach()
