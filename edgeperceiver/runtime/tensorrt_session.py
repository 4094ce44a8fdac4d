"""One TensorRT engine as a runtime session: bindings, shapes, addresses, CUDA graphs at batch 1.

A :class:`TensorRTSession` runs one segment's engine on its backend's stream. Inputs that
are device arrays are bound by pointer (zero copy); host inputs go through the backend's
pinned staging. Outputs are pooled device buffers sized for the session's maximum batch
(so the pool reuses them and no run reaches ``cudaMalloc`` after warm-up). Every
``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3`` result is checked.

At batch 1 a second execution context, with fixed input/output buffers, is captured into
a CUDA graph once, when the session opens (the runner opens its sessions one after another
in one thread, so no other work reaches the stream during a capture), and replayed:
launch overhead dominates small segments on Jetson. The inputs are copied into the fixed
buffers and the outputs out of them, on the same stream, so results never alias between
calls or threads. Where capture fails (an engine with host-side work, a pycuda without
graph support) the session runs plain ``execute_async_v3`` and says so in the backend's log.

Standard library and numpy at import time; the backend passes the TensorRT module in.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..bundle import SegmentSpec
from ..errors import InputError, TargetError
from .backend import SessionBase
from .tensorrt_device import CudaDriver
from .tensorrt_log import BuildLog
from .tensorrt_memory import ALIGN, DeviceArray, SharedScratch, dims_tuple, numpy_dtype

if TYPE_CHECKING:
    import tensorrt as trt


class SessionHost(Protocol):
    """What a session needs from its backend (:class:`~edgeperceiver.runtime.tensorrt.TensorRTBackend`)."""

    cuda: CudaDriver
    stream: Any
    scratch: SharedScratch
    log: BuildLog
    synchronous: bool
    max_batch: int | None

    def activated(self) -> AbstractContextManager[None]: ...
    def reserve(self, nbytes: int) -> Any: ...
    def allocate(self, nbytes: int) -> Any: ...
    def from_host(self, array: np.ndarray) -> DeviceArray: ...
    def take(self, array: Any, rows: np.ndarray) -> DeviceArray: ...


@dataclass(frozen=True)
class Binding:
    """One engine I/O tensor: name, numpy dtype, shape without the batch axis."""

    name: str
    dtype: np.dtype[Any]
    sample_shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.sample_shape, dtype=np.int64)) * self.dtype.itemsize


def checked(ok: Any, what: str) -> None:
    """Raise :class:`TargetError` when a TensorRT call that reports success returned False."""
    if ok is False or ok is None:
        raise TargetError(f"TensorRT refused {what}")


@dataclass
class _Graph:
    """A batch-1 CUDA graph: its execution context, fixed buffers and the instantiated graph."""

    context: Any
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    exec: Any


class TensorRTSession(SessionBase):
    """One deserialized engine with its execution context (see the module docstring)."""

    def __init__(
        self, host: SessionHost, engine: trt.ICudaEngine, segment: SegmentSpec, rel: str, trt_mod: Any, *,
        cuda_graphs: bool = True,
    ) -> None:
        self.host = host
        self.engine: trt.ICudaEngine | None = engine
        self.segment = segment
        self.rel = rel
        self._trt = trt_mod
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        ins = [n for n in names if engine.get_tensor_mode(n) == trt_mod.TensorIOMode.INPUT]
        outs = [n for n in names if engine.get_tensor_mode(n) == trt_mod.TensorIOMode.OUTPUT]
        want_in = [t.name for t in segment.inputs]
        want_out = [t.name for t in segment.outputs]
        if sorted(ins) != sorted(want_in) or sorted(outs) != sorted(want_out):
            raise TargetError(
                f"engine {rel} does not match segment {segment.index}: engine inputs {ins} / outputs {outs}, "
                f"manifest inputs {want_in} / outputs {want_out} (rebuild the engines)"
            )
        profile_max = min(int(engine.get_tensor_profile_shape(n, 0)[2][0]) for n in ins) if ins else 1
        cap = host.max_batch
        self.max_batch: int | None = profile_max if cap is None else min(cap, profile_max)
        self.inputs = tuple(self._binding(engine, n) for n in want_in)
        self.outputs = tuple(self._binding(engine, n) for n in want_out)
        self.scratch_bytes = int(engine.device_memory_size_v2)
        self.context = self._new_context()
        self._graphs = bool(cuda_graphs)
        self._graph: _Graph | None = None
        self._keep_alive: list[DeviceArray] = []
        host.scratch.need(self.scratch_bytes)
        host.scratch.subscribe(self._bind_scratch)
        # output buffers for the largest batch, reserved once so the pool holds them from now on
        reserved = [host.reserve(self.batch_cap * b.row_bytes) for b in self.outputs]
        del reserved
        if self._graphs:
            self._graph = self._capture()

    @property
    def batch_cap(self) -> int:
        return self.max_batch if self.max_batch is not None else 1

    def _new_context(self) -> Any:
        if self.engine is None:
            raise TargetError(f"the session of {self.rel} is closed")
        strategy = self._trt.ExecutionContextAllocationStrategy.USER_MANAGED
        context = self.engine.create_execution_context(strategy)
        if context is None:
            raise TargetError(f"TensorRT could not create an execution context for {self.rel} (out of GPU memory?)")
        return context

    def _bind_scratch(self, ptr: int, size: int) -> None:
        """Point the context at the shared scratch (again, after it grew; a captured graph keeps its own)."""
        self.context.set_device_memory(ptr, size)

    @staticmethod
    def _binding(engine: trt.ICudaEngine, name: str) -> Binding:
        dims = dims_tuple(engine.get_tensor_shape(name))
        if not dims or any(d < 0 for d in dims[1:]):
            raise TargetError(f"engine tensor {name!r} has shape {dims}: only the batch axis may be dynamic")
        return Binding(name, numpy_dtype(engine.get_tensor_dtype(name)), dims[1:])

    # ------------------------------------------------------------------ running
    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Enqueue the engine on ``feeds`` (DeviceArrays or numpy arrays) on the backend's stream.

        Returns new DeviceArrays (pooled max-batch buffers holding ``n`` rows). The caller
        (the runner) runs at most ``max_batch`` samples at a time.
        """
        if self.context is None:
            raise TargetError(f"the session of {self.rel} is closed")
        missing = [b.name for b in self.inputs if b.name not in feeds]
        if missing:
            raise InputError(f"segment {self.segment.index} needs inputs {missing}")
        batches = {_batch_of(feeds[b.name]) for b in self.inputs}
        if len(batches) != 1:
            raise InputError(f"segment {self.segment.index} inputs disagree on the batch size: {sorted(batches)}")
        n = batches.pop()
        if not 1 <= n <= self.batch_cap:
            raise InputError(
                f"batch {n} is outside this engine's range 1..{self.batch_cap} "
                "(rebuild with a larger --option max_batch, or run smaller batches)"
            )
        with self.host.activated():
            return self._run(n, feeds)

    def _run(self, n: int, feeds: Mapping[str, Any]) -> dict[str, Any]:
        self._keep_alive = []  # realigned inputs, alive until the next run
        ptrs = {b.name: self._input_pointer(b, feeds[b.name]) for b in self.inputs}
        if n == 1 and self._graphs:
            graph_out = self._run_graph(ptrs)
            if graph_out is not None:
                return graph_out
        ctx = self.context
        for b in self.inputs:
            checked(ctx.set_input_shape(b.name, (n, *b.sample_shape)), f"shape {(n, *b.sample_shape)} for {b.name!r}")
            checked(ctx.set_tensor_address(b.name, ptrs[b.name]), f"the address of input {b.name!r}")
        out: dict[str, Any] = {}
        for b in self.outputs:
            buf = self.host.reserve(self.batch_cap * b.row_bytes)
            checked(ctx.set_tensor_address(b.name, int(buf)), f"the address of output {b.name!r}")
            out[b.name] = DeviceArray(int(buf), (n, *b.sample_shape), b.dtype, buf)
        self._execute(ctx)
        return out

    def _execute(self, ctx: Any) -> None:
        if not ctx.execute_async_v3(self.host.stream.handle):
            raise TargetError(f"TensorRT failed to enqueue segment {self.segment.index}: "
                              + "; ".join(self.host.log.errors()[-3:]))
        if self.host.synchronous:
            self.host.stream.synchronize()

    def _input_pointer(self, b: Binding, value: Any) -> int:
        if isinstance(value, DeviceArray):
            if value.dtype != b.dtype or tuple(value.shape[1:]) != b.sample_shape:
                raise InputError(
                    f"input {b.name!r}: got {value.dtype}{list(value.shape)}, engine wants {b.dtype}[N, "
                    f"{', '.join(map(str, b.sample_shape))}]"
                )
            if value.ptr % ALIGN:  # a row view; TensorRT wants aligned tensor addresses
                value = self.host.take(value, np.arange(value.batch))
                self._keep_alive.append(value)
            return value.ptr
        host = np.ascontiguousarray(value, dtype=b.dtype)
        if tuple(host.shape[1:]) != b.sample_shape:
            raise InputError(f"input {b.name!r}: shape {host.shape}, engine wants (N, {b.sample_shape})")
        staged = self.host.from_host(host)
        self._keep_alive.append(staged)
        return staged.ptr

    # ------------------------------------------------------------------ CUDA graphs (batch 1)
    def _run_graph(self, ptrs: Mapping[str, int]) -> dict[str, Any] | None:
        graph = self._graph
        if graph is None:
            return None
        cuda, stream = self.host.cuda, self.host.stream
        for b in self.inputs:
            cuda.memcpy_dtod_async(int(graph.inputs[b.name]), ptrs[b.name], b.row_bytes, stream)
        graph.exec.launch(stream)
        out: dict[str, Any] = {}
        for b in self.outputs:
            buf = self.host.reserve(self.batch_cap * b.row_bytes)
            cuda.memcpy_dtod_async(int(buf), int(graph.outputs[b.name]), b.row_bytes, stream)
            out[b.name] = DeviceArray(int(buf), (1, *b.sample_shape), b.dtype, buf)
        if self.host.synchronous:
            stream.synchronize()
        return out

    def _capture(self) -> _Graph | None:
        """Capture the batch-1 context into a CUDA graph; None (and plain enqueues) where that fails."""
        stream = self.host.stream
        try:
            context = self._new_context()
            context.set_device_memory(self.host.scratch.ptr, self.host.scratch.size)
            ins = {b.name: self.host.allocate(b.row_bytes) for b in self.inputs}
            outs = {b.name: self.host.allocate(b.row_bytes) for b in self.outputs}
            for b in self.inputs:  # defined inputs for the warm-up run
                self.host.cuda.memcpy_htod_async(int(ins[b.name]), np.zeros(b.row_bytes, np.uint8), stream)
            for b in self.inputs:
                checked(context.set_input_shape(b.name, (1, *b.sample_shape)), f"shape 1 for {b.name!r}")
                checked(context.set_tensor_address(b.name, int(ins[b.name])), f"the address of {b.name!r}")
            for b in self.outputs:
                checked(context.set_tensor_address(b.name, int(outs[b.name])), f"the address of {b.name!r}")
            # one plain run first: TensorRT finishes deferred shape-dependent work outside the capture
            checked(context.execute_async_v3(stream.handle), "the warm-up run before graph capture")
            stream.synchronize()
            stream.begin_capture()
            try:
                ok = context.execute_async_v3(stream.handle)
            finally:
                captured = stream.end_capture()
            checked(ok, "execute_async_v3 under graph capture")
            graph = _Graph(context, ins, outs, captured.instantiate())
        except Exception as exc:  # pycuda/TensorRT errors without a common base; fall back for good
            self._graphs = False
            self.host.log.mark(f"segment {self.segment.index}: no CUDA graph at batch 1 ({exc}); plain enqueue")
            return None
        return graph

    def close(self) -> None:
        """Release the execution contexts, the graph and the engine (before the CUDA context goes)."""
        self.host.scratch.unsubscribe(self._bind_scratch)
        self._graph = None
        self._keep_alive = []
        self.context = None
        self.engine = None


def _batch_of(value: Any) -> int:
    shape = value.shape if isinstance(value, DeviceArray) else np.shape(value)
    if not shape:
        raise InputError("segment inputs must have a batch axis")
    return int(shape[0])
