"""``--option key=value`` settings of a TensorRT build, and the optimization profiles they imply."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeperceiver.errors import InputError, TargetError
from edgeperceiver.options import parse_options
from edgeperceiver.quantize import QuantizeConfig


@dataclass(frozen=True)
class BuildOptions:
    """``--option key=value`` settings of a TensorRT build (validated once).

    The quantizer settings (``preset``, ``subset_size``, ...) are accepted too: they make
    the bundle's quantization stage when INT8 is built with ``--calib-data``.
    """

    max_batch: int = field(default=32, metadata={"min": 1})  #: largest batch an engine accepts (profile max)
    #: batch TensorRT tunes for (profile opt); None = min(8, max_batch)
    opt_batch: int | None = field(default=None, metadata={"min": 1})
    workspace_mb: int = field(default=1024, metadata={"min": 16})  #: builder workspace limit; keep it small on Jetson
    #: builder optimization level 0-5 (None = TensorRT's 3)
    optimization_level: int | None = field(default=None, metadata={"min": 0, "max": 5})
    #: None = strongly typed from TensorRT 10.12 (and on 11), weak typing with precision constraints before
    strongly_typed: bool | None = None
    timing_cache: str | None = None  #: user timing-cache dir; None = default, "none" = bundle only
    device: int = field(default=0, metadata={"min": 0})  #: CUDA ordinal to build on
    #: INT8: the layers outside Q/DQ run in fp16 (strong typing: cast in the graph; weak: the FP16 flag)
    int8_fp16: bool = True
    #: fp16 and int8 builds: tensors carried between segments stay fp16 (exit logits stay fp32)
    fp16_carried: bool = True
    dla_core: int | None = field(default=None, metadata={"min": 0})  #: Jetson DLA core (GPU fallback on)
    verbose: bool = False  #: keep TensorRT's INFO messages in build.log too
    #: the quantization stage's settings when INT8 is built with --calib-data. NNCF's bias
    #: correction is off by default here: on the demo model it alone cost exit 4 0.74 point
    quant: QuantizeConfig = field(default_factory=lambda: QuantizeConfig(bias_correction=False))

    @property
    def opt(self) -> int:
        return self.opt_batch if self.opt_batch is not None else min(8, self.max_batch)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> BuildOptions:
        """Parse options (values may be strings from the CLI); unknown keys are an error."""
        opts = parse_options(cls, options, what="TensorRT", nested="quant")
        if not 1 <= opts.opt <= opts.max_batch:
            raise InputError(f"opt_batch must lie in 1..max_batch ({opts.max_batch}), got {opts.opt}")
        return opts


@dataclass(frozen=True)
class Profile:
    """Min / opt / max shapes of one dynamic-batch input."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_json(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def profile_shapes(name: str, shape: Sequence[int | str], *, opt_batch: int, max_batch: int) -> Profile:
    """The optimization profile of input ``name``: batch 1 / ``opt_batch`` / ``max_batch``.

    ``shape`` comes from the ONNX/TensorRT network (``-1`` or a name for the dynamic batch
    axis) or from the manifest (``"batch"``). Every other axis must be static.
    """
    if not shape:
        raise TargetError(f"input {name!r} is a scalar; segment inputs need a batch axis")
    if not 1 <= opt_batch <= max_batch:
        raise InputError(f"need 1 <= opt_batch <= max_batch, got {opt_batch} and {max_batch}")
    head, rest = shape[0], list(shape[1:])
    bad = [d for d in rest if not isinstance(d, int) or d < 1]
    if bad:
        raise TargetError(
            f"input {name!r} has shape {list(shape)}: only the batch axis may be dynamic for TensorRT "
            "(re-export the model with a fixed image size)"
        )
    dims = tuple(int(d) for d in rest)
    if isinstance(head, int) and head >= 1:
        if head != 1 or max_batch != 1:
            raise TargetError(
                f"input {name!r} has a fixed batch of {head}; re-export the model with a dynamic batch axis "
                "(or build with --option max_batch=1 for a batch-1 model)"
            )
        one = (1, *dims)
        return Profile(one, one, one)
    if not (head == -1 or (isinstance(head, str) and head)):
        raise TargetError(f"input {name!r} has an invalid batch dimension {head!r}")
    return Profile((1, *dims), (opt_batch, *dims), (max_batch, *dims))
