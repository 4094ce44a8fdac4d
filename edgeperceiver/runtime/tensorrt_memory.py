"""GPU memory for the TensorRT runtime: device arrays, the compaction copy plan, pinned staging, scratch.

- :class:`DeviceArray`: a batch-major tensor in GPU memory (pointer, shape, dtype, owner).
- :func:`gather_copy_plan`: the device-to-device copies that gather surviving rows.
- :class:`PinnedBuffer`: a grow-only page-locked host buffer, so host<->device copies are
  truly asynchronous DMA (pageable memory is staged by the driver first).
- :class:`SharedScratch`: one device allocation for the execution contexts' own scratch
  memory, sized to the largest engine (TensorRT's user-managed context memory); the
  segments run one after another on one stream, so they never use it at the same time.

Standard library and numpy only; the CUDA calls go through a :class:`CudaDriver`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError, TargetError
from .tensorrt_device import CudaDriver

#: TensorRT ``DataType`` names -> numpy dtypes (the types an engine's I/O can have here)
_NP_DTYPES: dict[str, np.dtype[Any]] = {
    "FLOAT": np.dtype(np.float32),
    "HALF": np.dtype(np.float16),
    "INT8": np.dtype(np.int8),
    "UINT8": np.dtype(np.uint8),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
}

ALIGN = 256  #: byte alignment of tensor addresses handed to TensorRT


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


class PinnedBuffer:
    """A grow-only page-locked host buffer (``cuda.pagelocked_empty``) viewed as any array."""

    def __init__(self, cuda: CudaDriver) -> None:
        self._cuda = cuda
        self._buf: np.ndarray | None = None

    @property
    def capacity(self) -> int:
        return 0 if self._buf is None else int(self._buf.nbytes)

    def view(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        """A ``shape``/``dtype`` view of the buffer, reallocated (larger) when it does not fit."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if self._buf is None or self._buf.nbytes < nbytes:
            self._buf = self._cuda.pagelocked_empty((max(nbytes, 1),), np.uint8)
        return self._buf[:nbytes].view(dtype).reshape(shape)

    def release(self) -> None:
        self._buf = None


class SharedScratch:
    """One device allocation used as every execution context's scratch memory.

    ``need(n)`` grows it to at least ``n`` bytes: a larger allocation replaces the old one
    and the subscribed callbacks rebind the contexts to it. Replaced allocations stay alive
    until :meth:`release` (a CUDA graph captured earlier still points at them).
    """

    def __init__(self, allocate: Callable[[int], Any]) -> None:
        self._allocate = allocate
        self._alloc: Any = None
        self.size = 0
        self._retired: list[Any] = []
        self._listeners: list[Callable[[int, int], None]] = []

    @property
    def ptr(self) -> int:
        return 0 if self._alloc is None else int(self._alloc)

    def need(self, nbytes: int) -> None:
        if nbytes <= self.size:
            return
        if self._alloc is not None:
            self._retired.append(self._alloc)
        self._alloc = self._allocate(int(nbytes))
        self.size = int(nbytes)
        for listener in self._listeners:
            listener(self.ptr, self.size)

    def subscribe(self, listener: Callable[[int, int], None]) -> None:
        """Call ``listener(ptr, size)`` now (when allocated) and after every reallocation."""
        self._listeners.append(listener)
        if self._alloc is not None:
            listener(self.ptr, self.size)

    def unsubscribe(self, listener: Callable[[int, int], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def release(self) -> None:
        self._listeners.clear()
        for alloc in [*self._retired, self._alloc]:
            if alloc is not None and hasattr(alloc, "free"):
                alloc.free()
        self._retired.clear()
        self._alloc = None
        self.size = 0
