"""An in-memory STAND-IN for the CUDA (pycuda) and TensorRT runtime calls our TensorRT session makes.

It is not TensorRT and proves nothing about TensorRT: it lets the tests check *our*
bookkeeping -- which buffers the backend allocates and when, which copies it issues in
which order, that the CUDA context is current in every thread that calls CUDA, that
addresses are aligned, that every call's result is checked, CUDA-graph capture and
fallback, closing. Device memory is one numpy byte array addressed by integer
"pointers"; a stand-in "engine" is a bundle's ONNX segment run by ONNX Runtime on the
bytes at the bound addresses; stream work runs at once (or is recorded while a stream
captures a graph).
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from edgeperceiver.runtime.tensorrt import Bindings

ALIGN = 256
MAGIC = b"STANDIN-PLAN\n"
_ONNX_TO_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
_NP_TO_TRT = {np.dtype(np.float32): "FLOAT", np.dtype(np.float16): "HALF", np.dtype(np.int64): "INT64"}


def standin_plan(onnx_bytes: bytes, *, max_batch: int, opt_batch: int = 1, scratch: int = 4096) -> bytes:
    """A stand-in "engine plan": a small header and the ONNX graph it runs."""
    head = json.dumps({"max_batch": max_batch, "opt_batch": opt_batch, "scratch": scratch}).encode()
    return MAGIC + len(head).to_bytes(4, "little") + head + onnx_bytes


# --------------------------------------------------------------------------- CUDA stand-in


class StandInCuda:
    """Stand-in for ``pycuda.driver``: device memory, streams, events, contexts, pinned memory."""

    def __init__(self, heap_mb: int = 64, *, graphs: bool = True) -> None:
        self.heap = np.zeros(heap_mb << 20, np.uint8)
        self._next = ALIGN
        self._lock = threading.Lock()
        self.calls: list[tuple[str, Any]] = []  #: every memory operation, in order
        self.counts: Counter[str] = Counter()
        self.pinned: list[np.ndarray] = []
        self.graphs = graphs
        self._stacks = threading.local()
        self.streams: dict[int, StandInStream] = {}
        self.contexts: list[StandInContext] = []

    # -- what pycuda.driver offers
    def init(self) -> None:
        self.counts["init"] += 1

    def Device(self, ordinal: int) -> StandInDevice:
        if ordinal != 0:
            raise RuntimeError(f"invalid device ordinal {ordinal}")
        return StandInDevice(self)

    def Stream(self) -> StandInStream:
        self.need_context("Stream")
        s = StandInStream(self, len(self.streams) + 1)
        self.streams[s.handle] = s
        return s

    def Event(self) -> StandInEvent:
        self.need_context("Event")
        return StandInEvent()

    def mem_alloc(self, nbytes: int) -> StandInAllocation:
        self.need_context("mem_alloc")
        self.counts["mem_alloc"] += 1
        return StandInAllocation(self.bump(nbytes), nbytes)

    def pagelocked_empty(self, shape: Any, dtype: Any) -> np.ndarray:
        self.need_context("pagelocked_empty")
        self.counts["pagelocked_empty"] += 1
        arr = np.empty(shape, dtype)
        self.pinned.append(arr)
        return arr

    def memcpy_htod_async(self, dest: int, src: np.ndarray, stream: StandInStream) -> None:
        self.need_context("memcpy_htod_async")
        self.calls.append(("htod", (dest, src.nbytes, self.is_pinned(src))))
        data = np.ascontiguousarray(src).view(np.uint8).reshape(-1).copy()
        stream.submit(lambda: self.write(dest, data))

    def memcpy_dtoh_async(self, dest: np.ndarray, src: int, stream: StandInStream) -> None:
        self.need_context("memcpy_dtoh_async")
        self.calls.append(("dtoh", (src, dest.nbytes, self.is_pinned(dest))))
        stream.submit(lambda: dest.reshape(-1).view(np.uint8).__setitem__(slice(None), self.read(src, dest.nbytes)))

    def memcpy_dtod_async(self, dest: int, src: int, size: int, stream: StandInStream) -> None:
        self.need_context("memcpy_dtod_async")
        self.calls.append(("dtod", (dest, src, size)))
        stream.submit(lambda: self.write(dest, self.read(src, size).copy()))

    # -- helpers
    def bump(self, nbytes: int) -> int:
        with self._lock:
            ptr = self._next
            self._next += -(-max(nbytes, 1) // ALIGN) * ALIGN
            if self._next > self.heap.size:
                raise MemoryError("stand-in device memory exhausted")
            return ptr

    def read(self, ptr: int, nbytes: int) -> np.ndarray:
        assert ptr > 0 and ptr + nbytes <= self.heap.size, (ptr, nbytes)
        return self.heap[ptr : ptr + nbytes]

    def write(self, ptr: int, data: np.ndarray) -> None:
        assert ptr > 0 and ptr + data.size <= self.heap.size, (ptr, data.size)
        self.heap[ptr : ptr + data.size] = data

    def is_pinned(self, arr: np.ndarray) -> bool:
        return any(np.shares_memory(arr, p) for p in self.pinned)

    def stack(self) -> list[StandInContext]:
        if not hasattr(self._stacks, "stack"):
            self._stacks.stack = []
        stack: list[StandInContext] = self._stacks.stack
        return stack

    def need_context(self, what: str) -> None:
        """CUDA calls fail without a current context in the calling thread."""
        if not self.stack():
            self.counts["no_context"] += 1
            raise RuntimeError(f"stand-in CUDA: {what} without a current context in this thread")


@dataclass
class StandInDevice:
    cuda: StandInCuda

    def name(self) -> str:
        return "Stand-in GPU"

    def compute_capability(self) -> tuple[int, int]:
        return (8, 7)

    def retain_primary_context(self) -> StandInContext:
        ctx = StandInContext(self.cuda)
        self.cuda.contexts.append(ctx)
        return ctx


@dataclass(eq=False)
class StandInContext:
    cuda: StandInCuda
    retained: int = 1
    pushes: int = 0

    def push(self) -> None:
        self.pushes += 1
        self.cuda.stack().append(self)

    def pop(self) -> None:
        stack = self.cuda.stack()
        assert stack and stack[-1] is self, "popped a context that is not current in this thread"
        stack.pop()

    def detach(self) -> None:
        assert self.retained > 0, "detached twice"
        self.retained -= 1


class StandInStream:
    def __init__(self, cuda: StandInCuda, handle: int) -> None:
        self.cuda = cuda
        self.handle = handle
        self.capturing: list[Any] | None = None
        self.syncs = 0

    def submit(self, op: Any) -> None:
        if self.capturing is not None:
            self.capturing.append(op)
        else:
            op()

    def synchronize(self) -> None:
        self.cuda.need_context("synchronize")
        assert self.capturing is None, "synchronize during capture"
        self.syncs += 1

    def begin_capture(self) -> None:
        if not self.cuda.graphs:
            raise RuntimeError("stand-in: this driver cannot capture graphs")
        self.cuda.counts["begin_capture"] += 1
        self.capturing = []

    def end_capture(self) -> StandInGraph:
        ops, self.capturing = self.capturing or [], None
        return StandInGraph(ops)


@dataclass
class StandInGraph:
    ops: list[Any]

    def instantiate(self) -> StandInGraph:
        return self

    def launch(self, stream: StandInStream) -> None:
        stream.cuda.counts["graph_launch"] += 1
        for op in self.ops:
            stream.submit(op)


class StandInEvent:
    def record(self, stream: StandInStream) -> None:
        self.recorded = True

    def synchronize(self) -> None:
        return None


@dataclass(eq=False)
class StandInAllocation:
    ptr: int
    nbytes: int
    freed: bool = False

    def __int__(self) -> int:
        return self.ptr

    def free(self) -> None:
        self.freed = True


class StandInPool:
    """Stand-in for pycuda's ``DeviceMemoryPool``: blocks come back when their holder is garbage."""

    def __init__(self, cuda: StandInCuda) -> None:
        self.cuda = cuda
        self.free: dict[int, list[int]] = {}
        self.misses = 0  #: allocations that had to reach the "driver"
        self.stopped = False

    def allocate(self, nbytes: int) -> StandInAllocation:
        self.cuda.need_context("pool.allocate")
        size = -(-nbytes // ALIGN) * ALIGN
        bucket = self.free.setdefault(size, [])
        if bucket:
            ptr = bucket.pop()
        else:
            self.misses += 1
            ptr = self.cuda.bump(size)
        alloc = StandInAllocation(ptr, size)
        weakref.finalize(alloc, bucket.append, ptr)
        return alloc

    def free_held(self) -> None:
        self.free.clear()

    def stop_holding(self) -> None:
        self.stopped = True
        self.free.clear()


# --------------------------------------------------------------------------- TensorRT stand-in


class _Enum:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


class StandInTRT:
    """Stand-in for the ``tensorrt`` module's runtime side."""

    __version__ = "10.3.0.30"

    class TensorIOMode:
        INPUT = _Enum("INPUT")
        OUTPUT = _Enum("OUTPUT")

    class ExecutionContextAllocationStrategy:
        USER_MANAGED = _Enum("USER_MANAGED")

    class ILogger:
        def __init__(self) -> None:
            pass

    def __init__(self, cuda: StandInCuda, *, refuse_shapes: bool = False) -> None:
        self.cuda = cuda
        self.refuse_shapes = refuse_shapes
        self.engines: list[StandInEngine] = []

    def Runtime(self, logger: Any) -> StandInRuntime:
        return StandInRuntime(self)


@dataclass
class StandInRuntime:
    trt: StandInTRT
    DLA_core: int = -1

    def deserialize_cuda_engine(self, plan: bytes) -> StandInEngine | None:
        if not plan.startswith(MAGIC):
            return None
        n = int.from_bytes(plan[len(MAGIC) : len(MAGIC) + 4], "little")
        head = json.loads(plan[len(MAGIC) + 4 : len(MAGIC) + 4 + n])
        engine = StandInEngine(self.trt, plan[len(MAGIC) + 4 + n :], **head)
        self.trt.engines.append(engine)
        return engine


class StandInEngine:
    def __init__(self, trt: StandInTRT, onnx_bytes: bytes, max_batch: int, opt_batch: int, scratch: int) -> None:
        self.trt = trt
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_bytes, sess_options=so, providers=["CPUExecutionProvider"])
        self.max_batch, self.opt_batch = max_batch, opt_batch
        self.device_memory_size_v2 = scratch
        self.io: dict[str, tuple[_Enum, np.dtype[Any], tuple[int, ...]]] = {}
        for t in self.session.get_inputs():
            self.io[t.name] = (StandInTRT.TensorIOMode.INPUT, np.dtype(_ONNX_TO_NP[t.type]), tuple(t.shape[1:]))
        for t in self.session.get_outputs():
            self.io[t.name] = (StandInTRT.TensorIOMode.OUTPUT, np.dtype(_ONNX_TO_NP[t.type]), tuple(t.shape[1:]))
        self.names = list(self.io)
        self.contexts: list[StandInExecutionContext] = []

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> _Enum:
        return self.io[name][0]

    def get_tensor_shape(self, name: str) -> list[int]:
        return [-1, *self.io[name][2]]

    def get_tensor_dtype(self, name: str) -> _Enum:
        return _Enum(_NP_TO_TRT[self.io[name][1]])

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        rest = self.io[name][2]
        return [(1, *rest), (self.opt_batch, *rest), (self.max_batch, *rest)]

    def create_execution_context(self, strategy: Any) -> StandInExecutionContext:
        assert strategy is StandInTRT.ExecutionContextAllocationStrategy.USER_MANAGED
        ctx = StandInExecutionContext(self)
        self.contexts.append(ctx)
        return ctx


@dataclass(eq=False)
class StandInExecutionContext:
    engine: StandInEngine
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    addresses: dict[str, int] = field(default_factory=dict)
    device_memory: tuple[int, int] | None = None
    runs: int = 0

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        if self.engine.trt.refuse_shapes or not 1 <= shape[0] <= self.engine.max_batch:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if ptr % ALIGN or name not in self.engine.io:
            return False
        self.addresses[name] = int(ptr)
        return True

    def set_device_memory(self, ptr: int, size: int) -> None:
        assert size >= self.engine.device_memory_size_v2, "scratch smaller than the engine needs"
        self.device_memory = (ptr, size)

    def execute_async_v3(self, stream_handle: int) -> bool:
        cuda = self.engine.trt.cuda
        cuda.need_context("execute_async_v3")
        assert self.device_memory is not None, "user-managed context without device memory"
        stream = cuda.streams[stream_handle]
        shapes, addresses = dict(self.shapes), dict(self.addresses)
        stream.submit(lambda: self._run(shapes, addresses))
        return True

    def _run(self, shapes: dict[str, tuple[int, ...]], addresses: dict[str, int]) -> None:
        cuda = self.engine.trt.cuda
        self.runs += 1
        feeds = {}
        n = 0
        for name, (mode, dtype, _rest) in self.engine.io.items():
            if mode is StandInTRT.TensorIOMode.INPUT:
                n = shapes[name][0]
                nbytes = int(np.prod(shapes[name])) * dtype.itemsize
                feeds[name] = cuda.read(addresses[name], nbytes).copy().view(dtype).reshape(shapes[name])
        outs = self.engine.session.run(None, feeds)
        for t, value in zip(self.engine.session.get_outputs(), outs, strict=True):
            assert value.shape[0] == n
            cuda.write(addresses[t.name], np.ascontiguousarray(value).view(np.uint8).reshape(-1))


def standin_bindings(cuda: StandInCuda | None = None, **trt_options: Any) -> tuple[Bindings, StandInCuda,
                                                                                   StandInTRT, list[StandInPool]]:
    """Bindings of a TensorRT backend onto the stand-in, and the stand-in parts to inspect."""
    cuda = cuda or StandInCuda()
    trt = StandInTRT(cuda, **trt_options)
    pools: list[StandInPool] = []

    def pool() -> StandInPool:
        p = StandInPool(cuda)
        pools.append(p)
        return p

    return Bindings(trt, cuda, pool), cuda, trt, pools
