"""Build TensorRT engines (one per segment) from a bundle's ONNX segments, on the target GPU.

``edgeperceiver compile BUNDLE --target tensorrt --precision {fp32,fp16,int8}`` ends here.
Engines are tied to one GPU and one TensorRT version, so this runs on the device itself
(a Jetson, a workstation GPU); the facts an engine depends on are written into the target
entry's metadata and checked by the runtime before it deserializes anything.

Precision, for TensorRT 10 (JetPack 6 ships 10.3) and TensorRT 11:

- **fp32**: the ONNX segments as they are.
- **fp16**: TensorRT 11 only builds strongly typed networks (no FP16 builder flag), so the
  segments are cast to fp16 here (:func:`cast_to_fp16`) with fp32 islands around
  LayerNorm, Softmax and variance computations, and fp32 graph inputs/outputs. On
  TensorRT 10 the default is the weakly typed path: the FP16 builder flag plus
  ``OBEY_PRECISION_CONSTRAINTS`` with fp32 layer precision on the same islands
  (``--option strongly_typed=true`` selects the cast path there too).
- **int8**: explicit quantization only: the QDQ segments of the bundle's
  ``onnxruntime-int8`` entry (the same quantized graph every target uses), checked for
  what TensorRT accepts (signed int8, zero point 0). TensorRT 10 weak typing adds the INT8
  flag; strongly typed networks take the Q/DQ types as they are.

Every segment gets one optimization profile (batch 1 / ``opt_batch`` / ``max_batch``); one
timing cache is shared by all segments and kept both in the target directory and in a
per-GPU user cache (``$XDG_CACHE_HOME/edgeperceiver/tensorrt``), so rebuilds are fast.
TensorRT's build log is captured into ``tensorrt-<precision>/build.log``.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeperceiver._optional import require
from edgeperceiver.bundle import BundleWriter, Manifest, TargetEntry, target_key
from edgeperceiver.errors import BundleError, InputError, TargetError
from edgeperceiver.runtime.tensorrt import (
    BuildLog,
    DeviceFacts,
    current_device_facts,
    dims_tuple,
    import_cuda,
    import_tensorrt,
    make_trt_logger,
)
from edgeperceiver.types import Precision, TargetName

if TYPE_CHECKING:
    import onnx
    import tensorrt as trt

#: ONNX op types computed in fp32 inside an fp16 engine (normalisation, softmax, variance)
DEFAULT_FP32_OPS: frozenset[str] = frozenset({
    "LayerNormalization", "Softmax", "LogSoftmax", "InstanceNormalization", "GroupNormalization",
    "RMSNormalization", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "Pow",
})
#: ops that continue a variance computation started by an island op (x², then mean, eps, sqrt)
_VARIANCE_CHAIN_OPS = frozenset({"ReduceMean", "ReduceSum", "Add", "Sqrt", "Reciprocal"})
#: ops whose float inputs may be of any type (no cast inserted in front of them)
_ANY_INPUT_OPS = frozenset({"Cast", "Shape", "Size", "CastLike"})
#: ops that make a float tensor of their own type (left as they are)
_SOURCE_OPS = frozenset({"Constant", "ConstantOfShape", "EyeLike", "RandomNormal", "RandomUniform",
                         "RandomNormalLike", "RandomUniformLike"})
#: float inputs the ONNX spec fixes to float32 whatever the data type
_FIXED_FP32_INPUTS: Mapping[str, frozenset[int]] = {"Resize": frozenset({2}), "Upsample": frozenset({1})}

_FLOAT, _FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT / FLOAT16
_INT8_SOURCE = target_key(TargetName.ONNXRUNTIME, Precision.INT8)
_FP16_MAX = float(np.finfo(np.float16).max)


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class BuildOptions:
    """``--option key=value`` settings of a TensorRT build (validated once)."""

    max_batch: int = 32  #: largest batch an engine accepts (profile max)
    opt_batch: int | None = None  #: batch TensorRT tunes for (profile opt); None = min(8, max_batch)
    workspace_mb: int = 1024  #: builder workspace limit (MiB); keep it small on Jetson
    optimization_level: int | None = None  #: builder optimization level 0-5 (None = TensorRT's 3)
    strongly_typed: bool | None = None  #: None = strongly typed on TensorRT >= 11, weak typing on 10
    timing_cache: str | None = None  #: user timing-cache dir; None = default, "none" = bundle only
    device: int = 0  #: CUDA ordinal to build on
    int8_fp16: bool = False  #: TensorRT 10 weak typing: let non-quantized layers run fp16 too
    verbose: bool = False  #: keep TensorRT's INFO messages in build.log too

    @property
    def opt(self) -> int:
        return self.opt_batch if self.opt_batch is not None else min(8, self.max_batch)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> BuildOptions:
        """Parse options (values may be strings from the CLI); unknown keys are an error."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise InputError(f"unknown TensorRT option(s) {', '.join(unknown)}; known: {', '.join(known)}")
        values: dict[str, Any] = {}
        for key, raw in options.items():
            if key in ("strongly_typed", "int8_fp16", "verbose"):
                values[key] = _parse_bool(key, raw)
            elif key == "timing_cache":
                values[key] = None if raw is None else str(raw)
            else:
                values[key] = None if raw is None else _parse_int(key, raw)
        opts = cls(**values)
        if opts.max_batch < 1:
            raise InputError(f"max_batch must be >= 1, got {opts.max_batch}")
        if not 1 <= opts.opt <= opts.max_batch:
            raise InputError(f"opt_batch must lie in 1..max_batch ({opts.max_batch}), got {opts.opt}")
        if opts.workspace_mb < 16:
            raise InputError(f"workspace_mb must be >= 16, got {opts.workspace_mb}")
        if opts.optimization_level is not None and not 0 <= opts.optimization_level <= 5:
            raise InputError(f"optimization_level must lie in 0..5, got {opts.optimization_level}")
        if opts.device < 0:
            raise InputError(f"device must be a CUDA ordinal, got {opts.device}")
        return opts


def _parse_bool(key: str, raw: Any) -> bool | None:
    if raw is None or isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    if text in ("auto", "none", ""):
        return None
    raise InputError(f"option {key} must be true or false, not {raw!r}")


def _parse_int(key: str, raw: Any) -> int:
    if isinstance(raw, bool):
        raise InputError(f"option {key} must be an integer, not {raw!r}")
    try:
        return int(str(raw).strip()) if not isinstance(raw, int) else raw
    except ValueError:
        raise InputError(f"option {key} must be an integer, not {raw!r}") from None


# --------------------------------------------------------------------------- profiles


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


# --------------------------------------------------------------------------- fp16 casting


@dataclass(frozen=True)
class Fp16Report:
    """What :func:`cast_to_fp16` did to one model."""

    fp32_nodes: tuple[str, ...]  #: names (or op types) of the nodes kept in fp32
    casts_inserted: int
    initializers_converted: int
    clipped_values: int  #: initializer values beyond the fp16 range, clipped to +-65504


def _onnx() -> Any:
    return require("onnx", purpose="preparing ONNX segments for TensorRT")


def fp32_island_nodes(
    model: onnx.ModelProto, *, keep_ops: Iterable[str] = DEFAULT_FP32_OPS, keep_names: Iterable[str] = ()
) -> set[int]:
    """Indices of the nodes an fp16 engine must compute in fp32.

    Every node whose op type is in ``keep_ops`` or whose name is in ``keep_names``, plus the
    rest of a variance computation started by one (a decomposed LayerNorm's ``Pow`` is
    followed by ``ReduceMean``, ``Add`` eps, ``Sqrt``: x² overflows fp16 from |x| > 256).
    """
    ops, names = frozenset(keep_ops), frozenset(keep_names)
    nodes = list(model.graph.node)
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for t in node.input:
            consumers.setdefault(t, []).append(i)
    island = {i for i, n in enumerate(nodes) if n.op_type in ops or (n.name and n.name in names)}
    todo = [i for i in island if nodes[i].op_type in ("Pow", "ReduceSumSquare")]
    while todo:
        i = todo.pop()
        for out in nodes[i].output:
            for j in consumers.get(out, []):
                if j not in island and nodes[j].op_type in _VARIANCE_CHAIN_OPS:
                    island.add(j)
                    todo.append(j)
    return island


def cast_to_fp16(
    model: onnx.ModelProto, *, keep_ops: Iterable[str] = DEFAULT_FP32_OPS, keep_names: Iterable[str] = ()
) -> tuple[onnx.ModelProto, Fp16Report]:
    """An fp16 copy of ``model`` with fp32 islands, for TensorRT's strongly typed networks.

    Nodes that read activations compute in float16, except the nodes
    :func:`fp32_island_nodes` picks; constant and shape arithmetic stays float32;
    ``Cast`` nodes are inserted at every type boundary, float32 initializers read by fp16
    nodes are stored as float16 copies, graph inputs and outputs keep their float32 type
    (so the engine's carried tensors match the manifest). The input model is not modified.
    """
    onnx_mod = _onnx()
    helper, numpy_helper = onnx_mod.helper, onnx_mod.numpy_helper
    src = onnx_mod.ModelProto()
    src.CopyFrom(model)
    graph = src.graph
    for node in graph.node:
        if any(a.type in (onnx_mod.AttributeProto.GRAPH, onnx_mod.AttributeProto.GRAPHS) for a in node.attribute):
            raise TargetError(
                f"node {node.name or node.op_type!r} has a subgraph ({node.op_type}); fp16 casting supports "
                "graphs without control flow only"
            )
    try:
        inferred = onnx_mod.shape_inference.infer_shapes(src)
    except Exception as exc:  # onnx raises InferenceError and C++ errors without a common base
        raise TargetError(f"ONNX type inference failed, cannot cast to fp16: {exc}") from exc
    elem: dict[str, int] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.HasField("tensor_type"):
            elem[vi.name] = vi.type.tensor_type.elem_type
    inits = {i.name: i for i in graph.initializer}
    for name, init in inits.items():
        elem[name] = init.data_type
    island = fp32_island_nodes(src, keep_ops=keep_ops, keep_names=keep_names)

    cur: dict[str, int] = {n: t for n, t in elem.items() if t in (_FLOAT, _FLOAT16)}  # type of each tensor now
    converted: dict[tuple[str, int], str] = {}  # (tensor, dtype) -> name of its converted copy
    new_inits: list[Any] = []
    new_nodes: list[Any] = []
    casts = clipped = n_inits = 0
    used: set[str] = set()

    def as_type(name: str, want: int) -> str:
        nonlocal casts, clipped, n_inits
        key = (name, want)
        if key in converted:
            return converted[key]
        suffix = "fp16" if want == _FLOAT16 else "fp32"
        out = _fresh(f"{name}__{suffix}", elem)
        if name in inits and want == _FLOAT16:
            arr = numpy_helper.to_array(inits[name]).astype(np.float64)
            over = np.abs(arr) > _FP16_MAX
            clipped += int(over.sum())
            half = np.clip(arr, -_FP16_MAX, _FP16_MAX).astype(np.float16)
            new_inits.append(numpy_helper.from_array(half, out))
            n_inits += 1
        else:
            new_nodes.append(helper.make_node("Cast", [name], [out], to=want, name=_fresh(f"{out}__cast", elem)))
            casts += 1
        elem[out] = want
        cur[out] = want
        converted[key] = out
        return out

    # Only nodes that read activations (float tensors computed from the float graph inputs)
    # run in fp16; constant and shape arithmetic (folded by TensorRT) stays exact in fp32.
    inits_set = set(inits)
    active: set[str] = {i.name for i in graph.input if i.name not in inits_set and cur.get(i.name) is not None}
    for i, node in enumerate(graph.node):
        reads_activation = any(name in active for name in node.input)
        if reads_activation:
            active.update(o for o in node.output if elem.get(o) in (_FLOAT, _FLOAT16))
        want = _FLOAT if i in island or not reads_activation else _FLOAT16
        op = node.op_type
        if op not in _ANY_INPUT_OPS and op not in _SOURCE_OPS:
            fixed = _FIXED_FP32_INPUTS.get(op, frozenset())
            for pos, name in enumerate(node.input):
                have = cur.get(name)
                if not name or have is None:
                    continue
                target = _FLOAT if pos in fixed else want
                if have != target:
                    node.input[pos] = as_type(name, target)
        if op == "Cast":
            to = next((a for a in node.attribute if a.name == "to"), None)
            if to is not None and to.i == _FLOAT and want == _FLOAT16:
                to.i = _FLOAT16
        for out in node.output:
            if elem.get(out) not in (_FLOAT, _FLOAT16):
                continue
            if op == "Cast":
                to = next((a for a in node.attribute if a.name == "to"), None)
                cur[out] = to.i if to is not None else elem[out]
            elif op in _SOURCE_OPS:
                cur[out] = elem[out]
            else:
                cur[out] = want
        new_nodes.append(node)
        used.update(node.input)

    # graph outputs keep their declared float32 type
    tail: list[Any] = []
    for out in graph.output:
        declared = out.type.tensor_type.elem_type
        have = cur.get(out.name)
        if have is None or have == declared or declared not in (_FLOAT, _FLOAT16):
            continue
        inner = _fresh(f"{out.name}__{'fp16' if have == _FLOAT16 else 'fp32'}", elem)
        elem[inner] = have
        for node in new_nodes:
            for k, name in enumerate(node.output):
                if name == out.name:
                    node.output[k] = inner
            for k, name in enumerate(node.input):
                if name == out.name:
                    node.input[k] = inner
        tail.append(helper.make_node("Cast", [inner], [out.name], to=declared, name=_fresh(f"{out.name}__cast", elem)))
        casts += 1
    used.update(t for n in new_nodes + tail for t in n.input)

    used.update(o.name for o in graph.output)
    keep_inits = [init for init in graph.initializer if init.name in used]
    del graph.node[:]
    graph.node.extend(new_nodes + tail)
    del graph.initializer[:]
    graph.initializer.extend(keep_inits + new_inits)
    del graph.value_info[:]  # the float types changed; let consumers infer them again
    report = Fp16Report(
        fp32_nodes=tuple(n.name or n.op_type for i, n in enumerate(model.graph.node) if i in island),
        casts_inserted=casts, initializers_converted=n_inits, clipped_values=clipped,
    )
    return src, report


def _fresh(base: str, taken: Mapping[str, Any]) -> str:
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}{k}"
    return name


# --------------------------------------------------------------------------- QDQ checks


def qdq_problems(model: onnx.ModelProto) -> list[str]:
    """Why TensorRT would reject the Q/DQ nodes of ``model`` (empty list: it accepts them).

    TensorRT's explicit quantization takes signed int8 (or fp8) quantizers with a zero point
    of 0 (symmetric); uint8 / asymmetric quantizers (ONNX Runtime's and NNCF's "mixed"
    default for activations) and dynamic quantization are refused.
    """
    onnx_mod = _onnx()
    numpy_helper = onnx_mod.numpy_helper
    consts: dict[str, Any] = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                consts[node.output[0]] = value
    allowed = {onnx_mod.TensorProto.INT8}
    for fp8 in ("FLOAT8E4M3FN",):
        if hasattr(onnx_mod.TensorProto, fp8):
            allowed.add(getattr(onnx_mod.TensorProto, fp8))
    problems: list[str] = []
    for node in model.graph.node:
        label = node.name or node.output[0]
        if node.op_type == "DynamicQuantizeLinear":
            problems.append(f"{label}: DynamicQuantizeLinear (dynamic quantization) is not supported")
            continue
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp_name = node.input[2] if len(node.input) > 2 else ""
        if node.op_type == "DequantizeLinear" and node.input[0] in consts:
            zp_type = consts[node.input[0]].data_type
        elif zp_name and zp_name in consts:
            zp_type = consts[zp_name].data_type
        elif zp_name:
            problems.append(f"{label}: zero point {zp_name!r} is not a constant")
            continue
        else:
            zp_type = onnx_mod.TensorProto.UINT8  # the ONNX default without a zero point
        if zp_type not in allowed:
            type_name = onnx_mod.TensorProto.DataType.Name(zp_type)
            problems.append(f"{label}: {type_name} quantization (TensorRT needs signed INT8)")
            continue
        if zp_name and zp_name in consts and np.any(numpy_helper.to_array(consts[zp_name]) != 0):
            problems.append(f"{label}: non-zero zero point (asymmetric); TensorRT needs symmetric quantizers")
    return problems


# --------------------------------------------------------------------------- layer precision (TRT 10, weak)


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


# --------------------------------------------------------------------------- sources, caches


def segment_sources(manifest: Manifest, precision: Precision) -> tuple[str, tuple[str, ...]]:
    """``(source label, ONNX path of every segment)`` the engines of ``precision`` are built from."""
    if precision is not Precision.INT8:
        return "segments", tuple(s.path for s in manifest.segments)
    entry = manifest.targets.get(_INT8_SOURCE)
    if entry is None:
        raise TargetError(
            "TensorRT INT8 is built from the bundle's QDQ-quantized ONNX segments (explicit quantization; "
            "TensorRT 11 has no implicit INT8 calibration), and this bundle has none. Quantize first, with "
            "symmetric quantizers as TensorRT requires: edgeperceiver compile BUNDLE --target onnxruntime "
            "--precision int8 --calib-data DIR --option preset=performance, then compile for tensorrt "
            "--precision int8 again"
        )
    if any(not p.endswith(".onnx") for p in entry.segments):
        raise TargetError(f"the {_INT8_SOURCE} entry's segments are not ONNX files: {list(entry.segments)}")
    return _INT8_SOURCE, tuple(entry.segments)


def cache_file_name(facts: DeviceFacts) -> str:
    """Timing-cache file name for one GPU model and TensorRT version."""
    cc = f"sm{facts.compute_capability[0]}{facts.compute_capability[1]}"
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", facts.gpu_name).strip("-").lower() or "gpu"
    return f"{gpu}-{cc}-trt{facts.tensorrt_version}.cache"


def user_cache_dir(setting: str | None) -> Path | None:
    """The user timing-cache directory (None when disabled with ``timing_cache=none``)."""
    if setting is not None and setting.strip().lower() in ("none", "off", "false", "0", ""):
        return None
    if setting is not None:
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeperceiver" / "tensorrt"


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- build


@dataclass
class _BuildState:
    """What one compile collects across segments."""

    log: BuildLog
    profiles: list[dict[str, Any]] = field(default_factory=list)
    fp32_layers: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    cache: Any = None  #: the ITimingCache shared by every segment


def compile_target(
    writer: BundleWriter, precision: Precision, *, calib: np.ndarray | None, options: dict[str, Any]
) -> TargetEntry:
    """Build one TensorRT engine per segment of the bundle staged in ``writer``.

    ``calib`` is unused (INT8 comes from the QDQ segments). Writes
    ``tensorrt-<precision>/seg<k>.engine``, ``timing.cache`` and ``build.log``.
    """
    del calib  # explicit quantization: the scales are already in the QDQ graph
    opts = BuildOptions.from_mapping(options)
    manifest = writer.manifest
    if manifest is None:
        raise BundleError("internal: compile_target needs the bundle's manifest")
    if precision not in (Precision.FP32, Precision.FP16, Precision.INT8):
        raise InputError(f"TensorRT builds fp32, fp16 or int8 engines, not {precision.value}")
    source, paths = segment_sources(manifest, precision)
    if precision is Precision.INT8:
        check_qdq_segments(writer, paths)

    import_tensorrt()
    facts = current_device_facts(opts.device)
    # build on the chosen GPU: TensorRT (CUDA runtime) uses the context current in this thread
    device_ctx = import_cuda().Device(opts.device).retain_primary_context()
    device_ctx.push()
    try:
        return _compile(writer, manifest, precision, opts, source, paths, facts)
    finally:
        device_ctx.pop()


def _compile(
    writer: BundleWriter,
    manifest: Manifest,
    precision: Precision,
    opts: BuildOptions,
    source: str,
    paths: tuple[str, ...],
    facts: DeviceFacts,
) -> TargetEntry:
    trt_mod = import_tensorrt()
    import tensorrt as trt

    major = int(str(trt_mod.__version__).split(".")[0])
    strongly = opts.strongly_typed if opts.strongly_typed is not None else major >= 11
    if major >= 11 and not strongly:
        raise InputError("TensorRT 11 builds strongly typed networks only; drop --option strongly_typed=false")

    onnx_mod = _onnx() if precision is Precision.FP16 else None  # fp32/int8 builds need no onnx here

    folder = f"tensorrt-{precision.value}"
    log = BuildLog(min_severity=3 if opts.verbose else 2)
    logger = make_trt_logger(log, module=trt_mod)
    builder = trt.Builder(logger)
    state = _BuildState(log)
    cache_dir = user_cache_dir(opts.timing_cache)
    user_cache = cache_dir / cache_file_name(facts) if cache_dir is not None else None
    bundle_cache = f"{folder}/timing.cache"
    seed = _initial_cache(writer, bundle_cache, user_cache)

    engines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="edgeperceiver-trt-") as tmp:
        for seg, rel in zip(manifest.segments, paths, strict=True):
            log.mark(f"segment {seg.index}: {rel}")
            onnx_path = writer.path(rel)
            islands: frozenset[str] = frozenset()
            if onnx_mod is not None:
                model = onnx_mod.load(str(onnx_path))
                if strongly:
                    cast_model, report = cast_to_fp16(model)
                    onnx_path = Path(tmp) / f"seg{seg.index}.fp16.onnx"
                    onnx_mod.save(cast_model, str(onnx_path))
                    log.mark(f"fp16 cast: {len(report.fp32_nodes)} fp32 nodes, {report.casts_inserted} casts, "
                             f"{report.clipped_values} clipped weights")
                else:
                    nodes = list(model.graph.node)
                    islands = frozenset(nodes[i].name for i in fp32_island_nodes(model) if nodes[i].name)
            plan = _build_segment(builder, logger, onnx_path, precision, opts, strongly, islands, seed, state)
            out_rel = f"{folder}/seg{seg.index}.engine"
            writer.replace_file(out_rel, plan)
            engines.append(out_rel)

    cache_bytes = bytes(state.cache.serialize()) if state.cache is not None else b""
    if cache_bytes:
        writer.replace_file(bundle_cache, cache_bytes)
        if user_cache is not None:
            try:
                _atomic_write(user_cache, cache_bytes)
            except OSError as exc:
                log.mark(f"could not update the user timing cache {user_cache}: {exc}")
    writer.replace_file(f"{folder}/build.log", log.text().encode("utf-8"))
    metadata: dict[str, Any] = {
        **facts.to_metadata(),
        "precision": precision.value,
        "typing": "strong" if strongly else "weak",
        "source": source,
        "max_batch": opts.max_batch,
        "opt_batch": opts.opt,
        "profiles": state.profiles,
        "fp32_layers": state.fp32_layers,
        "build_seconds": [round(s, 2) for s in state.seconds],
        "workspace_mb": opts.workspace_mb,
        "optimization_level": opts.optimization_level,
        "timing_cache": bundle_cache if cache_bytes else None,
        "build_log": f"{folder}/build.log",
        "log_counts": {k: v for k, v in log.counts().items() if k != "SECTION"},
    }
    metadata["report"] = build_report(metadata, log)
    return TargetEntry(target=TargetName.TENSORRT, precision=precision, segments=tuple(engines), metadata=metadata)


def check_qdq_segments(writer: BundleWriter, paths: Sequence[str]) -> None:
    """Raise :class:`TargetError` if a QDQ segment has quantizers TensorRT cannot build."""
    onnx_mod = _onnx()
    for k, rel in enumerate(paths, start=1):
        problems = qdq_problems(onnx_mod.load(str(writer.path(rel)), load_external_data=False))
        if problems:
            more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
            raise TargetError(
                f"{rel} (segment {k}) has quantizers TensorRT cannot build: {'; '.join(problems[:3])}{more}. "
                "Re-quantize with symmetric signed INT8 quantizers: edgeperceiver compile BUNDLE --target "
                "onnxruntime --precision int8 --calib-data DIR --option preset=performance (NNCF's default "
                "'mixed' preset makes asymmetric activation quantizers)"
            )


def build_report(metadata: Mapping[str, Any], log: BuildLog, *, max_messages: int = 8) -> str:
    """A short human-readable summary of a build (printed by the CLI, kept in the manifest)."""
    lines = [
        f"TensorRT {metadata['tensorrt_version']} on {metadata['gpu_name']} (sm {metadata['compute_capability']}, "
        f"{metadata.get('platform') or 'unknown platform'}): {metadata['precision']} engines, "
        f"{metadata['typing']}ly typed, from {metadata['source']}",
        f"batch profile 1 / {metadata['opt_batch']} / {metadata['max_batch']}; timing cache "
        f"{metadata.get('timing_cache') or 'none'}; log {metadata['build_log']}",
    ]
    for k, (secs, fp32) in enumerate(zip(metadata["build_seconds"], metadata["fp32_layers"], strict=True), start=1):
        inputs = ", ".join(f"{n}{v['max'][1:]}" for n, v in metadata["profiles"][k - 1].items())
        extra = f", {fp32} layers pinned to fp32" if fp32 else ""
        lines.append(f"  segment {k}: {secs:.1f} s{extra}; inputs {inputs}")
    counts = metadata.get("log_counts") or {}
    if counts:
        lines.append("TensorRT messages: " + ", ".join(f"{n} {c}" for n, c in sorted(counts.items())))
    shown = [(sev, msg) for sev, msg in log.records if sev in ("WARNING", "ERROR", "INTERNAL_ERROR")]
    for sev, msg in shown[:max_messages]:
        lines.append(f"  [{sev}] {msg[:200]}")
    if len(shown) > max_messages:
        lines.append(f"  ... {len(shown) - max_messages} more in {metadata['build_log']}")
    return "\n".join(lines)


def _initial_cache(writer: BundleWriter, bundle_rel: str, user_cache: Path | None) -> bytes:
    """Timing-cache bytes to start from: the user cache for this GPU, else the bundle's."""
    for path in (user_cache, writer.dir / bundle_rel):
        if path is not None and path.is_file():
            try:
                return path.read_bytes()
            except OSError:
                continue
    return b""


def _build_segment(
    builder: trt.Builder,
    logger: trt.ILogger,
    onnx_path: Path,
    precision: Precision,
    opts: BuildOptions,
    strongly: bool,
    islands: frozenset[str],
    seed: bytes,
    state: _BuildState,
) -> bytes:
    import tensorrt as trt

    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TargetError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {'; '.join(errors[:5])}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mb << 20)
    if opts.optimization_level is not None:
        config.builder_optimization_level = opts.optimization_level
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

    fp32_layers = 0
    if not strongly:  # TensorRT 10 weak typing: precision comes from builder flags
        if precision is Precision.FP16:
            config.set_flag(trt.BuilderFlag.FP16)
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            fp32_layers = constrain_fp32_layers(network, islands)
        elif precision is Precision.INT8:
            config.set_flag(trt.BuilderFlag.INT8)
            if opts.int8_fp16:
                config.set_flag(trt.BuilderFlag.FP16)
    state.fp32_layers.append(fp32_layers)

    profile = builder.create_optimization_profile()
    shapes: dict[str, Any] = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        p = profile_shapes(tensor.name, dims_tuple(tensor.shape), opt_batch=opts.opt, max_batch=opts.max_batch)
        profile.set_shape(tensor.name, trt.Dims(list(p.min)), trt.Dims(list(p.opt)), trt.Dims(list(p.max)))
        shapes[tensor.name] = p.to_json()
    config.add_optimization_profile(profile)
    state.profiles.append(shapes)

    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    state.seconds.append(time.perf_counter() - start)
    if plan is None:
        said = "; ".join(state.log.errors()[-5:]) or "see build.log"
        raise TargetError(f"TensorRT could not build an engine from {onnx_path.name}: {said}")
    return bytes(plan)
