"""OpenVINO segments chained zero-copy: each segment's inputs bound to the outputs that make them.

What the runner runs for its common case (every sample goes on) and what ``compile`` times:
:class:`OpenVINOChain` over :class:`~edgeperceiver.runtime.openvino.OpenVINOSession` objects.
Only numpy is imported here; the sessions bring ``openvino``.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

import numpy as np

from .._optional import require
from ..bundle import SegmentSpec
from ..errors import TargetError
from .openvino_tensors import bf16_to_float32, is_bf16, tensor_to_host


class ChainSession(Protocol):
    """What the chain needs of a segment session (:class:`~edgeperceiver.runtime.openvino.OpenVINOSession`)."""

    segment: SegmentSpec
    hint: str  #: PERFORMANCE_HINT the session compiles with

    def compiled(self, batch: int) -> Any:
        """The compiled model for ``batch`` samples."""
        ...


class OpenVINOChain:
    """A bundle's segments with their carried tensors bound zero-copy between infer requests.

    For the runner's common case (every sample goes on): per thread and batch size, one
    infer request per segment whose inputs are, once and for all, the output tensors of
    the requests that produce them, so nothing between segments crosses into numpy. Only
    the image goes in and the exit logits come out; :meth:`ChainState.live` copies the
    carried tensors out when the runner has to compact the batch (and leaves the chain).
    Used by :class:`~edgeperceiver.runtime.runner.Runner` through ``backend.chain``.
    """

    def __init__(self, sessions: tuple[ChainSession, ...], input_name: str) -> None:
        self.sessions = sessions
        self.input_name = input_name
        self.hint = sessions[0].hint if sessions else "LATENCY"
        self._local = threading.local()

    def start(self, x: np.ndarray) -> ChainState | None:
        """Bind ``x`` (contiguous, validated) to segment 1; None where the chain does not apply."""
        batch = int(x.shape[0])
        if batch == 0 or (self.hint == "THROUGHPUT" and batch > 1):
            return None
        states: dict[int, ChainState] | None = getattr(self._local, "states", None)
        if states is None:
            states = self._local.states = {}
        state = states.get(batch)
        if state is None:
            state = states[batch] = ChainState.make(self.sessions, self.input_name, batch)
        state.bind(x)
        return state


class ChainState:
    """One thread's bound infer requests for one batch size (see :class:`OpenVINOChain`)."""

    def __init__(
        self,
        ov: Any,
        requests: list[Any],
        image: list[tuple[int, int]],
        exits: list[tuple[int, bool]],
        carried: dict[str, tuple[int, int, bool]],
        input_name: str,
        segment_index: list[int],
    ) -> None:
        self._ov = ov
        self.requests = requests
        self._image = image  #: (segment, input port) pairs that read the image
        self._exits = exits  #: per segment: (output port of its exit, bf16?)
        self._carried = carried  #: name -> (producing segment, output port, bf16?)
        self.input_name = input_name
        self._segment_index = segment_index
        self._x: np.ndarray | None = None

    @staticmethod
    def make(sessions: tuple[ChainSession, ...], input_name: str, batch: int) -> ChainState:
        def port(ports: Any, name: str) -> int:
            for i, p in enumerate(ports):
                if name in p.get_names():
                    return i
            raise TargetError(f"compiled model has no port named {name!r}")

        ov = require("openvino")
        requests: list[Any] = []
        image: list[tuple[int, int]] = []
        exits: list[tuple[int, bool]] = []
        carried: dict[str, tuple[int, int, bool]] = {}
        for k, sess in enumerate(sessions):
            cm = sess.compiled(batch)
            req = cm.create_infer_request()
            for spec in sess.segment.inputs:
                i = port(cm.inputs, spec.name)
                if spec.name == input_name:
                    image.append((k, i))
                    continue
                made = carried.get(spec.name)
                if made is None:
                    raise TargetError(f"segment {sess.segment.index} reads {spec.name!r}, which no earlier "
                                      "segment produces")
                req.set_input_tensor(i, requests[made[0]].get_output_tensor(made[1]))
            for spec in sess.segment.outputs:
                j = port(cm.outputs, spec.name)
                carried[spec.name] = (k, j, is_bf16(cm.outputs[j]))
            j = port(cm.outputs, sess.segment.exit)
            exits.append((j, is_bf16(cm.outputs[j])))
            requests.append(req)
        return ChainState(ov, requests, image, exits, carried, input_name,
                          [s.segment.index for s in sessions])

    def bind(self, x: np.ndarray) -> None:
        """Point every request that reads the image at ``x``'s memory (kept alive here).

        Re-binding the buffer already bound (same address and shape: held here, so it
        cannot have been freed and reused) is skipped; the requests read it afresh anyway.
        """
        old = self._x
        if (old is not None and old.shape == x.shape and old.dtype == x.dtype
                and old.__array_interface__["data"][0] == x.__array_interface__["data"][0]):
            return
        self._x = x
        tensor = self._ov.Tensor(x, shared_memory=True)
        for k, i in self._image:
            self.requests[k].set_input_tensor(i, tensor)

    def run(self, k: int, logits: bool = True) -> np.ndarray | None:
        """Run segment ``k`` (0-based); a host copy of its exit logits (float32), if ``logits``."""
        req = self.requests[k]
        try:
            # not infer(): it also copies every output into new numpy arrays (the carried maps
            # included) and wraps them in a dict, which nobody reads here
            req.start_async()
            req.wait()
        except RuntimeError as exc:
            raise TargetError(f"OpenVINO inference failed in segment {self._segment_index[k]}: {exc}") from exc
        if not logits:
            return None
        j, bf = self._exits[k]
        if bf:
            return bf16_to_float32(tensor_to_host(req.get_output_tensor(j)))
        return np.array(req.get_output_tensor(j).data, copy=True)

    def live(self, names: frozenset[str], k: int) -> dict[str, np.ndarray]:
        """Host copies of the named tensors segments 0..``k`` produced (bf16 ones as uint16 bits)."""
        out: dict[str, np.ndarray] = {}
        for name in names:
            if name == self.input_name:
                assert self._x is not None
                out[name] = self._x
                continue
            made = self._carried.get(name)
            if made is not None and made[0] <= k:
                out[name] = tensor_to_host(self.requests[made[0]].get_output_tensor(made[1]))
        return out
