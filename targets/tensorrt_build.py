"""The TensorRT engine build itself (needs TensorRT and a GPU): network, config, profile, plan.

Input: the graphs :mod:`targets.tensorrt_prepare` made. Strongly typed networks take every
type from the graph; weakly typed ones (TensorRT 10.3 .. 10.11) get the FP16/INT8 builder
flags with ``OBEY_PRECISION_CONSTRAINTS`` and the fp32 islands pinned layer by layer, and
the carried tensors typed fp16 at the network's inputs and outputs.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeperceiver.errors import InputError, TargetError
from edgeperceiver.runtime.tensorrt_log import BuildLog
from edgeperceiver.types import Precision

from .tensorrt_options import BuildOptions
from .tensorrt_prepare import PreparedSegment, uses_fp16

if TYPE_CHECKING:
    import tensorrt as trt

_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")


def onnx_nodes_of_layer(name: str, metadata: str) -> list[str]:
    """ONNX node names a TensorRT network layer came from (its metadata, else its name)."""
    found = _ONNX_LAYER.findall(metadata or "")
    return found if found else [name]


def constrain_fp32_layers(network: trt.INetworkDefinition, island_names: frozenset[str]) -> int:
    """Pin layers from the fp32 islands (and every normalization/softmax layer) to fp32.

    For the TensorRT 10 weakly typed FP16 build (with ``OBEY_PRECISION_CONSTRAINTS``).
    Returns how many layers were constrained.
    """
    import tensorrt as trt

    always = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX}
    floats = {trt.DataType.FLOAT, trt.DataType.HALF}
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not outs or any(t.dtype not in floats for t in outs):
            continue
        from_island = any(n in island_names for n in onnx_nodes_of_layer(layer.name, layer.metadata))
        if layer.type in always or from_island:
            layer.precision = trt.DataType.FLOAT
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.DataType.FLOAT)
            count += 1
    return count


def type_fp16_io(network: trt.INetworkDefinition, names: frozenset[str]) -> int:
    """Weak typing: make the network inputs/outputs named in ``names`` fp16; how many were."""
    import tensorrt as trt

    count = 0
    tensors = [network.get_input(i) for i in range(network.num_inputs)]
    tensors += [network.get_output(i) for i in range(network.num_outputs)]
    for tensor in tensors:
        if tensor.name in names and tensor.dtype == trt.DataType.FLOAT:
            tensor.dtype = trt.DataType.HALF
            count += 1
    return count


@dataclass
class BuildState:
    """What one compile collects across segments."""

    log: BuildLog
    profiles: list[dict[str, Any]] = field(default_factory=list)
    fp32_layers: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    cache: Any = None  #: the ITimingCache shared by every segment


def build_segment(
    builder: trt.Builder,
    logger: trt.ILogger,
    seg: PreparedSegment,
    onnx_path: Path,
    precision: Precision,
    opts: BuildOptions,
    strongly: bool,
    seed: bytes,
    state: BuildState,
) -> bytes:
    """Parse ``onnx_path`` (the prepared graph of ``seg``) and build its serialized engine."""
    import tensorrt as trt

    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TargetError(f"TensorRT's ONNX parser rejected {seg.source}: {'; '.join(errors[:5])}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mb << 20)
    if opts.optimization_level is not None:
        config.builder_optimization_level = opts.optimization_level
    _timing_cache(config, seed, state)

    fp32_layers = 0
    if not strongly:  # TensorRT 10 weak typing: precision comes from builder flags
        if uses_fp16(precision, opts):
            config.set_flag(trt.BuilderFlag.FP16)
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            fp32_layers = constrain_fp32_layers(network, seg.islands)
            type_fp16_io(network, seg.fp16_io)
        if precision is Precision.INT8:
            config.set_flag(trt.BuilderFlag.INT8)
    state.fp32_layers.append(fp32_layers)
    if opts.dla_core is not None:
        _use_dla(builder, config, precision, opts.dla_core)

    profile = builder.create_optimization_profile()
    shapes: dict[str, Any] = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        p = seg.profiles.get(tensor.name)
        if p is None:
            raise TargetError(f"{seg.source}: TensorRT sees an input {tensor.name!r} the graph does not declare")
        profile.set_shape(tensor.name, trt.Dims(list(p.min)), trt.Dims(list(p.opt)), trt.Dims(list(p.max)))
        shapes[tensor.name] = p.to_json()
    if config.add_optimization_profile(profile) < 0:
        raise TargetError(f"TensorRT refused the optimization profile of {seg.source}: {shapes}")
    state.profiles.append(shapes)

    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    state.seconds.append(time.perf_counter() - start)
    if plan is None:
        said = "; ".join(state.log.errors()[-5:]) or "see build.log"
        raise TargetError(f"TensorRT could not build an engine from {seg.source}: {said}")
    return bytes(plan)


def _timing_cache(config: trt.IBuilderConfig, seed: bytes, state: BuildState) -> None:
    if state.cache is None:
        state.cache = config.create_timing_cache(seed)
        if state.cache is None:  # unreadable bytes
            state.log.mark("the stored timing cache is unreadable; starting a new one")
            state.cache = config.create_timing_cache(b"")
        elif seed and not config.set_timing_cache(state.cache, False):
            state.log.mark("the stored timing cache does not match this GPU/TensorRT; starting a new one")
            state.cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(state.cache, False):
        raise TargetError("TensorRT refused the timing cache created for this build")


def _use_dla(builder: trt.Builder, config: trt.IBuilderConfig, precision: Precision, core: int) -> None:
    """Default every layer to DLA core ``core``; layers DLA cannot run fall back to the GPU."""
    import tensorrt as trt

    if precision is Precision.FP32:
        raise InputError("DLA runs fp16 or int8 layers only; build --precision fp16 or int8 with --dla-core")
    cores = int(builder.num_DLA_cores)
    if not 0 <= core < cores:
        raise InputError(f"DLA core {core} does not exist here ({cores} DLA cores; Orin AGX/NX have 2, Orin Nano 0)")
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = core
    config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
