"""OpenVINO runtime backend: one :class:`OpenVINOSession` per compiled segment (CPU).

Facts this module is built on (measured on the project's 2-core Zen4 CPU):

- a model compiled with a static batch runs 20-60% faster than one with a dynamic batch,
  so every session reshapes its model to each batch size it is actually called with and
  keeps one compiled model per batch size (compiled lazily, on first use);
- OpenVINO picks bf16 on CPUs that support it unless ``INFERENCE_PRECISION_HINT`` is
  pinned; the precision a target entry was compiled and calibrated for is stored in its
  metadata (``inference_precision``) and is the one pinned here;
- ``CACHE_DIR`` makes the second process start from OpenVINO's compiled-blob cache;
- a bf16 entry (and an INT8 one whose float parts run bf16) carries its inter-segment
  tensors in bfloat16: they travel between segments as numpy ``uint16`` bit patterns
  (:func:`bf16_to_float32` reads them); exits and the image stay float32.

Thread safety: a compiled model is shared; every thread gets its own infer request (one
per thread and compiled model), so concurrent ``run`` calls never share buffers. The
THROUGHPUT path (a batch split over several streams with an ``AsyncInferQueue``) holds a
per-session lock while it runs.

Only the standard library and numpy are imported at module import; ``openvino`` is
imported when the backend is created.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._optional import require
from ..bundle import BATCH, Bundle, SegmentSpec, TargetEntry
from ..errors import InputError, TargetError
from ..types import Precision
from .backend import HostArrays, SessionBase
from .openvino_chain import OpenVINOChain
from .openvino_cpu import OtherCPUWarning, check_cpu, cpu_isa, cpu_name
from .openvino_tensors import bf16_bits, bf16_to_float32, is_bf16, tensor_to_host

__all__ = [
    "OpenVINOBackend", "OpenVINOChain", "OpenVINOSession", "OtherCPUWarning", "bf16_bits", "bf16_to_float32",
    "cpu_isa", "cpu_name", "inference_precision_hint", "is_bf16", "tensor_to_host",
]

#: manifest precision -> OpenVINO INFERENCE_PRECISION_HINT for the float parts of a model
_FLOAT_HINT: Mapping[Precision, str] = {
    Precision.FP32: "f32",
    Precision.BF16: "bf16",
    Precision.FP16: "f16",
    Precision.INT8: "f32",  # quantized ops run int8; the rest stays exact unless asked
}
HINTS = ("LATENCY", "THROUGHPUT")


@dataclass(frozen=True)
class OpenVINOConfig:
    """Options of :class:`OpenVINOBackend` (validated once)."""

    threads: int | None = None  #: INFERENCE_NUM_THREADS; None = OpenVINO's choice
    hint: str = "LATENCY"  #: PERFORMANCE_HINT: LATENCY or THROUGHPUT
    cache_dir: str | None = None  #: CACHE_DIR for compiled blobs; None = no cache
    precision: str | None = None  #: INFERENCE_PRECISION_HINT override (f32, bf16, f16)
    device: str = "CPU"

    def compile_properties(self, inference_precision: str) -> dict[str, Any]:
        props: dict[str, Any] = {
            "PERFORMANCE_HINT": self.hint,
            "INFERENCE_PRECISION_HINT": inference_precision,
        }
        if self.threads is not None:
            props["INFERENCE_NUM_THREADS"] = self.threads
        return props


def inference_precision_hint(precision: Precision | str) -> str:
    """OpenVINO's ``INFERENCE_PRECISION_HINT`` value for a manifest precision or OV type name."""
    text = precision.value if isinstance(precision, Precision) else str(precision).lower()
    if text in ("f32", "bf16", "f16"):
        return text
    try:
        return _FLOAT_HINT[Precision(text)]
    except (ValueError, KeyError):
        raise InputError(f"unknown OpenVINO inference precision {precision!r} (use fp32, bf16 or f16)") from None


def entry_precision(entry: TargetEntry, index: int) -> str:
    """The ``INFERENCE_PRECISION_HINT`` segment ``index`` (1-based) of ``entry`` was compiled for.

    A ``--precision auto`` entry records one per segment (``segment_inference_precision``);
    others one for the whole entry (``inference_precision``), else the entry's precision's.
    """
    per_segment = entry.metadata.get("segment_inference_precision")
    if isinstance(per_segment, list) and len(per_segment) == len(entry.segments):
        return inference_precision_hint(str(per_segment[index - 1]))
    recorded = entry.metadata.get("inference_precision")
    if recorded:
        return inference_precision_hint(str(recorded))
    if entry.precision.value == "auto":
        raise TargetError(f"entry {entry.key} lacks its per-segment precisions (segment_inference_precision)")
    return inference_precision_hint(entry.precision)


class OpenVINOBackend(HostArrays):
    """Runs OpenVINO IR segments on the CPU; carried tensors stay numpy arrays on the host."""

    name = "openvino"
    thread_safe = True  #: one infer request per thread; compiled models are shared

    def __init__(
        self,
        *,
        threads: int | None = None,
        hint: str = "LATENCY",
        cache_dir: str | os.PathLike[str] | None = None,
        precision: str | Precision | None = None,
        device: str = "CPU",
    ) -> None:
        hint_u = str(hint).upper()
        if hint_u not in HINTS:
            raise InputError(f"OpenVINO hint must be one of {', '.join(HINTS)}, not {hint!r}")
        if threads is not None and (isinstance(threads, bool) or int(threads) < 1):
            raise InputError(f"threads must be a positive integer, not {threads!r}")
        prec = None if precision is None else inference_precision_hint(precision)
        self.config = OpenVINOConfig(
            threads=None if threads is None else int(threads),
            hint=hint_u,
            cache_dir=None if cache_dir is None else str(cache_dir),
            precision=prec,
            device=device,
        )
        ov = require("openvino", purpose="running a bundle on OpenVINO")
        self._ov = ov
        self.core = ov.Core()
        if self.config.cache_dir is not None:
            Path(self.config.cache_dir).mkdir(parents=True, exist_ok=True)
            self.core.set_property({"CACHE_DIR": self.config.cache_dir})

    def open(self, bundle: Bundle, entry: TargetEntry, segment: SegmentSpec) -> OpenVINOSession:
        """Read segment ``segment.index`` of ``entry`` (an IR ``.xml`` or an ONNX file)."""
        rel = entry.segments[segment.index - 1]
        path = bundle.path(rel)
        try:
            model = self.core.read_model(str(path))
        except RuntimeError as exc:
            raise TargetError(f"OpenVINO cannot read segment {segment.index} ({rel}): {exc}") from exc
        if segment.index == 1:
            check_cpu(entry, self.core)
        return self.session(model, segment, self.config.precision or entry_precision(entry, segment.index))

    def session(self, model: Any, segment: SegmentSpec, precision: str) -> OpenVINOSession:
        """A session over an in-memory OpenVINO ``model`` (``compile`` times and checks its
        candidates through these, as the runtime will run them)."""
        return OpenVINOSession(self.core, model, segment, self.config, precision)

    def chain(self, sessions: tuple[Any, ...], input_name: str) -> OpenVINOChain | None:
        """Zero-copy chaining of ``sessions`` (this backend's, in segment order) for the runner."""
        if not all(isinstance(s, OpenVINOSession) for s in sessions):
            return None
        return OpenVINOChain(tuple(sessions), input_name)


class OpenVINOSession(SessionBase):
    """One segment; compiles a static-shape model per batch size on first use."""

    def __init__(
        self, core: Any, model: Any, segment: SegmentSpec, config: OpenVINOConfig, precision: str
    ) -> None:
        self.core = core
        self.model = model
        self.segment = segment
        self.config = config
        self.precision = precision
        self.hint = config.hint
        self.input_names = tuple(t.name for t in segment.inputs)
        self.output_names = tuple(t.name for t in segment.outputs)
        model_inputs = {n for p in model.inputs for n in p.get_names()}
        missing = [n for n in self.input_names if n not in model_inputs]
        if missing:
            raise TargetError(f"segment {segment.index}: compiled model lacks inputs {missing}")
        #: carried tensors a bf16 entry keeps in bfloat16 across the cut (as uint16 bits)
        self.bf16_inputs = frozenset(n for p in model.inputs if is_bf16(p) for n in p.get_names())
        self._ov = require("openvino")
        self._compiled: dict[int, Any] = {}
        self._lock = threading.Lock()  # guards _compiled and the async queues
        self._local = threading.local()
        self._queues: dict[int, Any] = {}

    # ------------------------------------------------------------------ compile per batch
    def compiled(self, batch: int) -> Any:
        """The compiled model for ``batch`` samples (reshaped to a static shape, cached)."""
        cm = self._compiled.get(batch)
        if cm is not None:
            return cm
        with self._lock:
            cm = self._compiled.get(batch)
            if cm is None:
                cm = self._compile(batch)
                self._compiled[batch] = cm
        return cm

    def _compile(self, batch: int) -> Any:
        model = self.model.clone()
        shapes = {}
        for spec in self.segment.inputs:
            shapes[spec.name] = [batch if d == BATCH else int(d) for d in spec.shape]
        try:
            model.reshape(shapes)
            return self.core.compile_model(
                model, self.config.device, self.config.compile_properties(self.precision)
            )
        except RuntimeError as exc:
            raise TargetError(
                f"OpenVINO failed to compile segment {self.segment.index} for batch {batch}: {exc}"
            ) from exc

    def _request(self, batch: int) -> _Slot:
        """This thread's infer request for ``batch`` (with its ports resolved once)."""
        slots: dict[int, _Slot] | None = getattr(self._local, "slots", None)
        if slots is None:
            slots = {}
            self._local.slots = slots
        slot = slots.get(batch)
        if slot is None:
            slot = _Slot.make(self.compiled(batch), self.input_names, self.output_names)
            slots[batch] = slot
        return slot

    # ------------------------------------------------------------------ run
    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run the segment on ``feeds`` (numpy arrays by input name); return every output."""
        arrays = self._check(feeds)
        batch = int(next(iter(arrays.values())).shape[0])
        if self.config.hint == "THROUGHPUT" and batch > 1:
            return self._run_async(arrays, batch)
        slot = self._request(batch)
        req = slot.request
        for index, name, bf in slot.inputs:
            req.set_input_tensor(index, self._wrap(arrays[name], bf))
        # outputs land straight in fresh numpy arrays the caller owns (no copy, and no
        # aliasing of the request's buffers across calls)
        outputs: dict[str, np.ndarray] = {}
        for index, name, dtype, bf in slot.outputs:
            out = outputs[name] = np.empty(slot.output_shapes[index], dtype)
            req.set_output_tensor(index, self._wrap(out, bf))
        # the request keeps pointing at these buffers after the call (a bf16 tensor does not
        # own a reference to its array): keep them alive until the next call replaces them
        slot.held = (arrays, outputs)
        try:
            # not infer(): it also copies every output into new numpy arrays (the carried maps
            # included) and wraps them in a dict, which nobody reads here
            req.start_async()
            req.wait()
        except RuntimeError as exc:
            raise TargetError(f"OpenVINO inference failed in segment {self.segment.index}: {exc}") from exc
        return outputs

    def _wrap(self, a: np.ndarray, bf16: bool) -> Any:
        """An OpenVINO tensor over ``a``'s memory (uint16 bits typed bf16 when ``bf16``)."""
        if bf16:
            return self._ov.Tensor(a, list(a.shape), self._ov.Type.bf16)
        return self._ov.Tensor(a, shared_memory=True)

    def _tensors(self, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Feeds for OpenVINO: bfloat16 inputs wrapped as bf16 tensors over their bits."""
        if not self.bf16_inputs:
            return dict(arrays)
        out: dict[str, Any] = {}
        for n, a in arrays.items():
            if n in self.bf16_inputs:
                out[n] = self._ov.Tensor(a, shape=list(a.shape), type=self._ov.Type.bf16)
            else:
                out[n] = a
        return out

    def _run_async(self, arrays: dict[str, np.ndarray], batch: int) -> dict[str, Any]:
        """Split the batch over the streams OpenVINO chose and run the chunks asynchronously."""
        ov = require("openvino")
        streams = max(1, int(self.compiled(1).get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        chunk = max(1, math.ceil(batch / streams))
        starts = list(range(0, batch, chunk))
        outputs: dict[str, list[np.ndarray]] = {n: [] for n in self.output_names}
        slots: list[dict[str, np.ndarray]] = [{} for _ in starts]
        with self._lock:
            try:
                used: dict[int, Any] = {}
                for slot, s in enumerate(starts):
                    size = min(chunk, batch - s)
                    queue = self._queues.get(size)
                    if queue is None:
                        cm = self._compiled.get(size)
                        if cm is None:
                            cm = self._compiled[size] = self._compile(size)
                        queue = ov.AsyncInferQueue(cm, streams)
                        queue.set_callback(_collect)
                        self._queues[size] = queue
                    used[size] = queue
                    part = self._tensors({k: np.ascontiguousarray(v[s : s + size]) for k, v in arrays.items()})
                    queue.start_async(part, (slots[slot], self.output_names))
                for queue in used.values():
                    queue.wait_all()
            except RuntimeError as exc:
                raise TargetError(
                    f"OpenVINO inference failed in segment {self.segment.index}: {exc}"
                ) from exc
        for got in slots:
            for n in self.output_names:
                outputs[n].append(got[n])
        return {n: np.concatenate(parts, axis=0) for n, parts in outputs.items()}

    def _check(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise InputError(f"segment {self.segment.index} needs inputs {missing}, got {sorted(feeds)}")
        arrays: dict[str, np.ndarray] = {}
        batch: int | None = None
        for spec in self.segment.inputs:
            raw = feeds[spec.name]
            if spec.name in self.bf16_inputs:  # bf16 bits from the previous segment, or floats
                arr = np.asarray(raw)
                a = np.ascontiguousarray(arr) if arr.dtype == np.uint16 else bf16_bits(arr)
            else:
                a = np.ascontiguousarray(raw, dtype=np.dtype(spec.dtype))
            if a.ndim != len(spec.shape):
                raise InputError(f"input {spec.name!r}: expected {len(spec.shape)} dims, got shape {a.shape}")
            for got, want in zip(a.shape[1:], spec.shape[1:], strict=True):
                if want != BATCH and got != want:
                    raise InputError(f"input {spec.name!r}: expected shape {spec.shape}, got {a.shape}")
            if batch is None:
                batch = a.shape[0]
            elif a.shape[0] != batch:
                raise InputError(f"inputs of segment {self.segment.index} disagree on the batch size")
            arrays[spec.name] = a
        if not batch:
            raise InputError(f"segment {self.segment.index}: empty batch")
        return arrays


@dataclass
class _Slot:
    """One thread's infer request for one compiled model, with port indices looked up once."""

    request: Any
    inputs: tuple[tuple[int, str, bool], ...]  #: (port index, name, bf16?)
    outputs: tuple[tuple[int, str, np.dtype[Any], bool], ...]  #: (port index, name, host dtype, bf16?)
    output_shapes: dict[int, tuple[int, ...]]
    held: tuple[Any, ...] = ()  #: the arrays the request's tensors point at (kept alive)

    @staticmethod
    def make(compiled: Any, input_names: tuple[str, ...], output_names: tuple[str, ...]) -> _Slot:
        def index(ports: Any, name: str) -> int:
            for i, port in enumerate(ports):
                if name in port.get_names():
                    return i
            raise TargetError(f"compiled model has no port named {name!r}")

        ins = tuple((index(compiled.inputs, n), n, is_bf16(compiled.inputs[index(compiled.inputs, n)]))
                    for n in input_names)
        outs = []
        shapes = {}
        for n in output_names:
            i = index(compiled.outputs, n)
            port = compiled.outputs[i]
            bf = is_bf16(port)
            dtype = np.dtype(np.uint16) if bf else np.dtype(port.get_element_type().to_dtype())
            outs.append((i, n, dtype, bf))
            shapes[i] = tuple(int(d) for d in port.get_shape())
        return _Slot(compiled.create_infer_request(), ins, tuple(outs), shapes)


def _collect(request: Any, userdata: tuple[dict[str, np.ndarray], tuple[str, ...]]) -> None:
    """AsyncInferQueue callback: copy the outputs of a finished request into its slot."""
    slot, names = userdata
    for n in names:
        slot[n] = tensor_to_host(request.get_tensor(n))
