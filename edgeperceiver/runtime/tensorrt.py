"""TensorRT runtime backend: one engine per segment, carried tensors kept on the GPU.

Design (the build side is ``targets/tensorrt.py``):

- **Device arrays.** Every tensor that flows between segments is a :class:`DeviceArray`
  (pointer, shape, dtype, and an owner that keeps the memory alive). Only what the runner
  asks for with :meth:`TensorRTBackend.to_host` (each exit's logits) comes back to the host.
- **Buffers allocated once.** A session reserves its output buffers for the engine's
  maximum batch when it is opened (see Memory below); inputs that are already device
  arrays are bound by pointer (zero copy), host inputs go through one staging buffer per
  input, allocated once for the maximum batch.
- **Compaction on the device.** :meth:`TensorRTBackend.take` gathers the surviving rows of
  a batch-major tensor with device-to-device copies, one per run of consecutive rows
  (:func:`gather_copy_plan`), into memory from a pooled allocator.
- **Checked before deserializing.** Engines are tied to one GPU and one TensorRT version;
  :func:`check_engine_compatible` compares the manifest's engine facts with this device and
  raises :class:`~edgeperceiver.errors.TargetError` (saying how to rebuild) before TensorRT
  ever sees the plan.

Memory: all device memory of a run comes from a caching pool (pycuda's
``DeviceMemoryPool``); output buffers are sized for the engine's max batch and reserved
when a session opens, so after the first batch no allocation reaches the CUDA driver, and
an array is never overwritten while someone still holds it. All work is issued on one
CUDA stream per backend (stream order makes pool reuse safe); ``to_host`` synchronizes it.
Sessions are not reentrant: the runner serialises ``run`` per segment. The device's primary
context (the one the CUDA runtime, hence TensorRT, uses) is made current in every thread
that calls the backend.

Only the standard library and numpy are imported at module import; ``tensorrt`` and
``pycuda`` are imported when a backend is created (``pip install 'edgeperceiver[tensorrt]'``).
"""

from __future__ import annotations

import platform
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np

from .._optional import require
from ..bundle import Bundle, SegmentSpec, TargetEntry
from ..errors import InputError, MissingDependencyError, TargetError
from ..types import TargetName

if TYPE_CHECKING:
    import tensorrt as trt

#: TensorRT logger severities (``trt.ILogger.Severity`` values) by name
SEVERITIES: Mapping[int, str] = {0: "INTERNAL_ERROR", 1: "ERROR", 2: "WARNING", 3: "INFO", 4: "VERBOSE"}

#: TensorRT ``DataType`` names -> numpy dtypes (the types an engine's I/O can have here)
_NP_DTYPES: Mapping[str, np.dtype[Any]] = {
    "FLOAT": np.dtype(np.float32),
    "HALF": np.dtype(np.float16),
    "INT8": np.dtype(np.int8),
    "UINT8": np.dtype(np.uint8),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
}

_ALIGN = 256  #: byte alignment of tensor addresses handed to TensorRT
_REBUILD = "edgeperceiver compile BUNDLE --target tensorrt --precision {precision}"


# --------------------------------------------------------------------------- imports


def import_tensorrt() -> ModuleType:
    """Import the real ``tensorrt`` module or raise :class:`MissingDependencyError`.

    Type stubs alone (the ``tensorrt-stubs`` package installs a bare ``tensorrt/`` folder
    that imports as an empty namespace package) count as missing.
    """
    mod = require("tensorrt", purpose="building or running TensorRT engines")
    if not hasattr(mod, "Builder") or not hasattr(mod, "__version__"):
        raise MissingDependencyError(
            "'tensorrt' is installed only as type stubs (no TensorRT library) (needed for building or "
            "running TensorRT engines). Install it with: pip install 'edgeperceiver[tensorrt]' "
            "(on Jetson, TensorRT comes with JetPack: see the Jetson section of the README)"
        )
    return mod


class _CudaDriver(Protocol):
    """The part of ``pycuda.driver`` this module uses (pycuda ships no type information)."""

    def init(self) -> None: ...
    def Device(self, ordinal: int) -> Any: ...  # pycuda's names
    def Stream(self) -> Any: ...
    def mem_alloc(self, nbytes: int) -> Any: ...
    def memcpy_htod_async(self, dest: int, src: np.ndarray, stream: Any) -> None: ...
    def memcpy_dtoh(self, dest: np.ndarray, src: int) -> None: ...
    def memcpy_dtod_async(self, dest: int, src: int, size: int, stream: Any) -> None: ...
    def get_version(self) -> tuple[int, ...]: ...
    def get_driver_version(self) -> int: ...


def import_cuda() -> _CudaDriver:
    """``pycuda.driver``, initialised, or :class:`MissingDependencyError` naming the extra."""
    drv = cast(_CudaDriver, require("pycuda.driver", purpose="GPU memory for TensorRT engines"))
    try:
        drv.init()
    except Exception as exc:  # pycuda raises its own error types (no common base to name)
        raise TargetError(f"CUDA could not be initialised (no NVIDIA GPU or driver?): {exc}") from exc
    return drv


# --------------------------------------------------------------------------- build/run logs


@dataclass
class BuildLog:
    """Messages TensorRT logged (through :func:`make_trt_logger`), kept for the report.

    ``min_severity`` is the least severe level kept (2 = WARNING, 3 = INFO, 4 = VERBOSE).
    """

    min_severity: int = 2
    records: list[tuple[str, str]] = field(default_factory=list)
    echo: Callable[[str, str], None] | None = None

    def add(self, severity: int, message: str) -> None:
        """Record one message (called by TensorRT from its logger callback)."""
        level = int(severity)
        if level > self.min_severity:
            return
        name = SEVERITIES.get(level, str(level))
        text = str(message).rstrip()
        self.records.append((name, text))
        if self.echo is not None:
            self.echo(name, text)

    def counts(self) -> dict[str, int]:
        """Number of kept messages per severity name."""
        out: dict[str, int] = {}
        for name, _ in self.records:
            out[name] = out.get(name, 0) + 1
        return out

    def errors(self) -> list[str]:
        """Messages of severity ERROR or INTERNAL_ERROR."""
        return [m for s, m in self.records if s in ("ERROR", "INTERNAL_ERROR")]

    def text(self) -> str:
        """The log as text, one ``[SEVERITY] message`` per line."""
        return "".join(f"[{s}] {m}\n" for s, m in self.records)

    def mark(self, title: str) -> None:
        """Insert a section header (e.g. the segment being built) into the log."""
        self.records.append(("SECTION", title))


def make_trt_logger(log: BuildLog, *, module: Any = None) -> trt.ILogger:
    """A ``trt.ILogger`` subclass instance that forwards every message into ``log``.

    ``module`` is the tensorrt module (imported when None); any module with an ``ILogger``
    base class works, which is how this is tested without TensorRT.
    """
    if module is None:
        module = import_tensorrt()
    base: Any = module.ILogger

    def __init__(self: Any) -> None:
        # TensorRT requires the base initialiser on Python subclasses
        base.__init__(self)

    def log_message(self: Any, severity: Any, msg: str) -> None:
        log.add(int(severity), msg)

    cls = type("CollectingLogger", (base,), {"__init__": __init__, "log": log_message})
    return cast("trt.ILogger", cls())


# --------------------------------------------------------------------------- engine facts


@dataclass(frozen=True)
class DeviceFacts:
    """What a TensorRT engine is tied to: TensorRT version, GPU model, compute capability."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    platform: str = ""  #: "L4T R36.3.0" on Jetson, else the machine architecture

    def to_metadata(self) -> dict[str, Any]:
        return {
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": f"{self.compute_capability[0]}.{self.compute_capability[1]}",
            "platform": self.platform,
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> DeviceFacts:
        """Read the facts a build recorded; :class:`TargetError` if they are missing."""
        missing = [k for k in ("tensorrt_version", "gpu_name", "compute_capability") if not meta.get(k)]
        if missing:
            raise TargetError(
                f"the TensorRT target entry does not record {', '.join(missing)}; the engines cannot be "
                "checked against this device. Rebuild them here: "
                + _REBUILD.format(precision=meta.get("precision", "fp16"))
            )
        return cls(
            tensorrt_version=str(meta["tensorrt_version"]),
            gpu_name=str(meta["gpu_name"]),
            compute_capability=parse_compute_capability(meta["compute_capability"]),
            platform=str(meta.get("platform", "")),
        )


def parse_compute_capability(value: Any) -> tuple[int, int]:
    """``"8.7"``, ``(8, 7)`` or ``[8, 7]`` -> ``(8, 7)``."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", value)
        if m:
            return int(m.group(1)), int(m.group(2))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise TargetError(f"bad compute capability {value!r} in the manifest (expected 'MAJOR.MINOR')")


def engine_incompatibilities(built: DeviceFacts, here: DeviceFacts, *, strict_device: bool = True) -> list[str]:
    """Why engines built on ``built`` cannot be deserialized on ``here`` (empty if they can).

    A plan is only valid for the exact TensorRT version and GPU compute capability it was
    built with; with ``strict_device`` a different GPU model of the same capability is
    refused too (TensorRT's tactics are tuned per model and it only warns).
    """
    problems = []
    if built.tensorrt_version != here.tensorrt_version:
        problems.append(f"built with TensorRT {built.tensorrt_version}, this machine has {here.tensorrt_version}")
    if built.compute_capability != here.compute_capability:
        b, h = built.compute_capability, here.compute_capability
        problems.append(
            f"built for compute capability {b[0]}.{b[1]} ({built.gpu_name}), "
            f"this GPU is {h[0]}.{h[1]} ({here.gpu_name})"
        )
    elif strict_device and built.gpu_name != here.gpu_name:
        problems.append(f"built on a {built.gpu_name}, this GPU is a {here.gpu_name}")
    return problems


def check_engine_compatible(
    entry: TargetEntry, here: DeviceFacts, *, strict_device: bool = True
) -> DeviceFacts:
    """Raise :class:`TargetError` (with the rebuild command) unless ``entry`` runs on ``here``."""
    if entry.target is not TargetName.TENSORRT:
        raise TargetError(f"target entry {entry.key!r} is not a TensorRT entry")
    built = DeviceFacts.from_metadata({**entry.metadata, "precision": entry.precision.value})
    problems = engine_incompatibilities(built, here, strict_device=strict_device)
    if problems:
        raise TargetError(
            f"the bundle's TensorRT {entry.precision.value} engines do not fit this machine: "
            + "; ".join(problems)
            + ". TensorRT engines are tied to one GPU and TensorRT version; rebuild them on this device "
            "from the bundle's ONNX segments: " + _REBUILD.format(precision=entry.precision.value)
            + (" (or open the backend with strict_device=False to accept another GPU model of the same "
               "compute capability)" if strict_device and all("this GPU is a" in p for p in problems) else "")
        )
    return built


def parse_tegra_release(text: str) -> str | None:
    """``/etc/nv_tegra_release`` -> ``"L4T R36.3.0"`` (the JetPack's L4T release), else None."""
    m = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    if not m:
        return None
    return f"L4T R{m.group(1)}.{m.group(2)}"


def host_platform() -> str:
    """The L4T release on a Jetson, else the machine architecture (e.g. ``x86_64``)."""
    tegra = Path("/etc/nv_tegra_release")
    if tegra.is_file():
        try:
            found = parse_tegra_release(tegra.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            found = None
        if found:
            return found
    return platform.machine()


def current_device_facts(device: int = 0) -> DeviceFacts:
    """The facts of GPU ``device`` and the installed TensorRT (needs tensorrt and pycuda)."""
    trt_mod = import_tensorrt()
    cuda = import_cuda()
    try:
        dev = cuda.Device(device)
        name = str(dev.name())
        cc = tuple(int(v) for v in dev.compute_capability())
    except Exception as exc:  # pycuda's LogicError / RuntimeError for a bad ordinal
        raise InputError(f"CUDA device {device} is not available: {exc}") from exc
    return DeviceFacts(str(trt_mod.__version__), name, (cc[0], cc[1]), host_platform())


# --------------------------------------------------------------------------- device arrays


@dataclass(frozen=True, eq=False)
class DeviceArray:
    """A dense, C-contiguous, batch-major tensor in GPU memory.

    ``owner`` keeps the underlying allocation alive (a pycuda allocation or a session's
    buffer). Exposes ``__cuda_array_interface__`` so CuPy / PyTorch / Numba can wrap it.
    """

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    owner: Any = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def batch(self) -> int:
        return self.shape[0]

    @property
    def row_bytes(self) -> int:
        """Bytes of one sample (one row along the batch axis)."""
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def rows(self, start: int, stop: int) -> DeviceArray:
        """A view of rows ``start:stop`` (no copy; the same owner)."""
        if not 0 <= start <= stop <= self.batch:
            raise InputError(f"rows {start}:{stop} out of range for a batch of {self.batch}")
        return DeviceArray(self.ptr + start * self.row_bytes, (stop - start, *self.shape[1:]), self.dtype, self)

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False), "version": 3,
                "strides": None}

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, ptr=0x{self.ptr:x})"


def gather_copy_plan(rows: np.ndarray, batch: int, row_bytes: int) -> list[tuple[int, int, int]]:
    """Byte copies ``(src_offset, dst_offset, nbytes)`` that gather ``rows`` of a batch-major tensor.

    Row ``rows[j]`` of the source becomes row ``j`` of the destination; runs of consecutive
    source rows are merged into one copy, so keeping a contiguous block of survivors costs a
    single ``cudaMemcpyAsync``. Rows may repeat or come in any order.
    """
    idx = np.asarray(rows)
    if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
        raise InputError(f"rows must be a 1-D integer array, got shape {idx.shape} dtype {idx.dtype}")
    if row_bytes < 0 or batch < 0:
        raise InputError("batch and row_bytes must be non-negative")
    if idx.size == 0 or row_bytes == 0:
        return []
    idx = idx.astype(np.int64, copy=False)
    if idx.min() < 0 or idx.max() >= batch:
        raise InputError(f"row indices must lie in [0, {batch}), got {idx.min()}..{idx.max()}")
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [idx.size]))
    return [
        (int(idx[s]) * row_bytes, int(s) * row_bytes, int(e - s) * row_bytes)
        for s, e in zip(starts, ends, strict=True)
    ]


def dims_tuple(dims: Any) -> tuple[int, ...]:
    """A TensorRT ``Dims`` (or any sequence) as a tuple of ints (``-1`` = dynamic)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


def numpy_dtype(trt_dtype: Any) -> np.dtype[Any]:
    """numpy dtype of a TensorRT ``DataType`` (by its name, so it works on TensorRT 10 and 11)."""
    name = getattr(trt_dtype, "name", str(trt_dtype)).split(".")[-1]
    if name not in _NP_DTYPES:
        raise TargetError(f"TensorRT engine tensor type {name} is not supported by this runtime")
    return _NP_DTYPES[name]


# --------------------------------------------------------------------------- backend


class TensorRTBackend:
    """Runs TensorRT engines on one GPU; carried tensors stay on the device.

    ``device``: CUDA ordinal. ``max_batch``: cap the batch the sessions allocate for
    (default: each engine's profile maximum). ``strict_device``: refuse engines built on
    another GPU model of the same compute capability. ``synchronous``: ``Session.run``
    waits for the GPU before returning (so timing a ``run`` measures the work, not only its
    enqueue; the runner needs each exit's logits right away anyway); ``False`` leaves the
    stream running until the next ``to_host``.
    """

    name = "tensorrt"
    thread_safe = False  #: the runner serialises each segment's session

    def __init__(
        self, *, device: int = 0, max_batch: int | None = None, strict_device: bool = True, synchronous: bool = True
    ) -> None:
        if isinstance(device, bool) or not isinstance(device, int) or device < 0:
            raise InputError(f"device must be a CUDA ordinal (0, 1, ...), not {device!r}")
        if max_batch is not None and (isinstance(max_batch, bool) or int(max_batch) < 1):
            raise InputError(f"max_batch must be a positive integer, not {max_batch!r}")
        self.device = device
        self.max_batch = None if max_batch is None else int(max_batch)
        self.strict_device = bool(strict_device)
        self.synchronous = bool(synchronous)
        trt_mod = import_tensorrt()
        self._cuda = import_cuda()
        try:
            self._ctx = self._cuda.Device(device).retain_primary_context()
        except Exception as exc:  # pycuda.driver.LogicError for a bad ordinal
            raise InputError(f"CUDA device {device} is not available: {exc}") from exc
        # TensorRT uses the CUDA runtime, which works in the device's primary context; it is
        # made current in every thread that uses this backend (see _ensure_context).
        self._threads = threading.local()
        self._ensure_context()
        self._closed = False
        self.facts = current_device_facts(device)
        self.stream = self._cuda.Stream()
        tools = require("pycuda.tools", purpose="pooled GPU memory")
        self._pool = tools.DeviceMemoryPool()
        self.log = BuildLog(min_severity=2)
        self._runtime = trt_mod.Runtime(make_trt_logger(self.log, module=trt_mod))

    def _ensure_context(self) -> None:
        """Make the device's primary context current in the calling thread (once per thread)."""
        if not getattr(self._threads, "pushed", False):
            self._ctx.push()
            self._threads.pushed = True

    # -- Backend protocol

    def open(self, bundle: Bundle, entry: TargetEntry, segment: SegmentSpec) -> TensorRTSession:
        """Check the engine facts against this GPU, then deserialize segment ``segment.index``."""
        check_engine_compatible(entry, self.facts, strict_device=self.strict_device)
        self._ensure_context()
        rel = entry.segments[segment.index - 1]
        try:
            plan = bundle.path(rel).read_bytes()
        except OSError as exc:
            raise TargetError(f"cannot read TensorRT engine {rel}: {exc}") from exc
        before = len(self.log.records)
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            said = "; ".join(m for _, m in self.log.records[before:]) or "no message"
            raise TargetError(
                f"TensorRT could not deserialize {rel} ({said}). Rebuild the engines on this device: "
                + _REBUILD.format(precision=entry.precision.value)
            )
        return TensorRTSession(self, engine, segment, rel)

    def from_host(self, array: np.ndarray) -> DeviceArray:
        """Copy a host array to a new (pooled) device array."""
        self._ensure_context()
        host = np.ascontiguousarray(array)
        if host.ndim == 0:
            raise InputError("cannot move a 0-d array to the GPU as a batch")
        dev = self.empty(host.shape, host.dtype)
        if host.nbytes:
            self._cuda.memcpy_htod_async(dev.ptr, host, self.stream)
        return dev

    def to_host(self, array: Any) -> np.ndarray:
        """Wait for the stream, then copy a device array into a new numpy array."""
        if isinstance(array, np.ndarray):
            return array
        if not isinstance(array, DeviceArray):
            raise InputError(f"to_host expects a DeviceArray, not {type(array).__name__}")
        self._ensure_context()
        out = np.empty(array.shape, dtype=array.dtype)
        self.stream.synchronize()
        if out.nbytes:
            self._cuda.memcpy_dtoh(out, array.ptr)
        return out

    def take(self, array: Any, rows: np.ndarray) -> DeviceArray:
        """Rows ``rows`` of ``array`` gathered on the device into a new array."""
        if isinstance(array, np.ndarray):
            array = self.from_host(array)
        if not isinstance(array, DeviceArray):
            raise InputError(f"take expects a DeviceArray, not {type(array).__name__}")
        self._ensure_context()
        idx = np.asarray(rows)
        plan = gather_copy_plan(idx, array.batch, array.row_bytes)
        out = self.empty((int(idx.size), *array.shape[1:]), array.dtype)
        for src, dst, nbytes in plan:
            self._cuda.memcpy_dtod_async(out.ptr + dst, array.ptr + src, nbytes, self.stream)
        return out

    # -- helpers

    def empty(self, shape: Sequence[int], dtype: Any) -> DeviceArray:
        """An uninitialised device array from the memory pool (freed back when unreferenced)."""
        dt = np.dtype(dtype)
        nbytes = int(np.prod(tuple(shape), dtype=np.int64)) * dt.itemsize
        alloc = self.reserve(nbytes)
        return DeviceArray(int(alloc), tuple(int(s) for s in shape), dt, alloc)

    def reserve(self, nbytes: int) -> Any:
        """``nbytes`` of device memory from the caching pool (returned to it when unreferenced)."""
        return self._pool.allocate(max(int(nbytes), 1))

    def allocate(self, nbytes: int) -> Any:
        """A dedicated (non-pooled) device allocation of ``nbytes``, freed with its owner."""
        return self._cuda.mem_alloc(max(int(nbytes), 1))

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        """Finish pending work and release the CUDA context (sessions must not be used after)."""
        if self._closed:
            return
        self._closed = True
        self.stream.synchronize()
        self._pool.free_held()
        if getattr(self._threads, "pushed", False):
            self._ctx.pop()
            self._threads.pushed = False


@dataclass(frozen=True)
class _Binding:
    name: str
    dtype: np.dtype[Any]
    sample_shape: tuple[int, ...]  #: shape without the batch axis

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.sample_shape, dtype=np.int64)) * self.dtype.itemsize


class TensorRTSession:
    """One deserialized engine with an execution context and max-batch output buffers."""

    def __init__(self, backend: TensorRTBackend, engine: trt.ICudaEngine, segment: SegmentSpec, rel: str) -> None:
        import tensorrt as trt  # imported (and checked) by the backend already

        self.backend = backend
        self.engine = engine
        self.segment = segment
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        want_in = [t.name for t in segment.inputs]
        want_out = [t.name for t in segment.outputs]
        if sorted(ins) != sorted(want_in) or sorted(outs) != sorted(want_out):
            raise TargetError(
                f"engine {rel} does not match segment {segment.index}: engine inputs {ins} / outputs {outs}, "
                f"manifest inputs {want_in} / outputs {want_out} (rebuild the engines)"
            )
        profile_max = min(int(engine.get_tensor_profile_shape(n, 0)[2][0]) for n in ins) if ins else 1
        cap = backend.max_batch
        self.max_batch = profile_max if cap is None else min(cap, profile_max)
        self.inputs = tuple(self._binding(engine, n) for n in want_in)
        self.outputs = tuple(self._binding(engine, n) for n in want_out)
        self.context = engine.create_execution_context()
        if self.context is None:
            raise TargetError(f"TensorRT could not create an execution context for {rel} (out of GPU memory?)")
        # Output buffers are sized for the largest batch and come from the backend's caching
        # pool: reserved here once, handed out again on every run (no cudaMalloc after this),
        # so arrays a caller still holds are never overwritten by a later run.
        self._staging: dict[str, Any] = {}
        reserved = [backend.reserve(self.max_batch * b.row_bytes) for b in self.outputs]
        del reserved  # back to the pool, ready for the first run

    @staticmethod
    def _binding(engine: trt.ICudaEngine, name: str) -> _Binding:
        dims = dims_tuple(engine.get_tensor_shape(name))
        if not dims or any(d < 0 for d in dims[1:]):
            raise TargetError(f"engine tensor {name!r} has shape {dims}: only the batch axis may be dynamic")
        return _Binding(name, numpy_dtype(engine.get_tensor_dtype(name)), dims[1:])

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Enqueue the engine on ``feeds`` (DeviceArrays or numpy arrays) on the backend's stream.

        Returns new DeviceArrays (max-batch buffers from the pool, holding ``n`` rows).
        """
        missing = [b.name for b in self.inputs if b.name not in feeds]
        if missing:
            raise InputError(f"segment {self.segment.index} needs inputs {missing}")
        batches = {_batch_of(feeds[b.name]) for b in self.inputs}
        if len(batches) != 1:
            raise InputError(f"segment {self.segment.index} inputs disagree on the batch size: {sorted(batches)}")
        n = batches.pop()
        if not 1 <= n <= self.max_batch:
            raise InputError(
                f"batch {n} is outside this engine's range 1..{self.max_batch} "
                "(rebuild with a larger --option max_batch, or run smaller batches)"
            )
        self.backend._ensure_context()
        ctx = self.context
        self._keep_alive: list[DeviceArray] = []  # realigned inputs, alive until the next run
        for b in self.inputs:
            ptr = self._input_pointer(b, feeds[b.name], n)
            if not ctx.set_input_shape(b.name, (n, *b.sample_shape)):
                raise TargetError(f"TensorRT refused shape {(n, *b.sample_shape)} for input {b.name!r}")
            ctx.set_tensor_address(b.name, ptr)
        out: dict[str, Any] = {}
        for b in self.outputs:
            buf = self.backend.reserve(self.max_batch * b.row_bytes)
            ctx.set_tensor_address(b.name, int(buf))
            out[b.name] = DeviceArray(int(buf), (n, *b.sample_shape), b.dtype, buf)
        if not ctx.execute_async_v3(self.backend.stream.handle):
            raise TargetError(f"TensorRT failed to enqueue segment {self.segment.index}: "
                              + "; ".join(self.backend.log.errors()[-3:]))
        if self.backend.synchronous:
            self.backend.stream.synchronize()
        return out

    def _input_pointer(self, b: _Binding, value: Any, n: int) -> int:
        if isinstance(value, DeviceArray):
            if value.dtype != b.dtype or tuple(value.shape[1:]) != b.sample_shape:
                raise InputError(
                    f"input {b.name!r}: got {value.dtype}{list(value.shape)}, engine wants {b.dtype}[N, "
                    f"{', '.join(map(str, b.sample_shape))}]"
                )
            if value.ptr % _ALIGN:  # a row view; TensorRT wants aligned tensor addresses
                value = self.backend.take(value, np.arange(value.batch))
                self._keep_alive.append(value)
            return value.ptr
        host = np.ascontiguousarray(value, dtype=b.dtype)
        if tuple(host.shape[1:]) != b.sample_shape:
            raise InputError(f"input {b.name!r}: shape {host.shape}, engine wants (N, {b.sample_shape})")
        if b.name not in self._staging:
            self._staging[b.name] = self.backend.allocate(self.max_batch * b.row_bytes)
        ptr = int(self._staging[b.name])
        self.backend._cuda.memcpy_htod_async(ptr, host, self.backend.stream)
        return ptr


def _batch_of(value: Any) -> int:
    shape = value.shape if isinstance(value, DeviceArray) else np.shape(value)
    if not shape:
        raise InputError("segment inputs must have a batch axis")
    return int(shape[0])
