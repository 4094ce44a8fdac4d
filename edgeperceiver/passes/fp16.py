"""Cast an ONNX graph to float16 with float32 islands, for TensorRT's strongly typed networks.

Nodes that compute on activations run in float16, except normalisation, softmax and
variance computations (:func:`fp32_island_nodes`); constant and shape arithmetic stays
float32; Cast nodes go in at every type boundary and graph inputs/outputs keep their
declared types. With ``qdq=True`` the pass also moves explicit quantization to float16:
every Q/DQ scale becomes float16 (so DequantizeLinear makes float16 and a strongly typed
TensorRT engine runs the layers between the quantized ones in float16, not float32),
which needs opset 19 (:func:`edgeperceiver.passes.opset.upgrade_opset`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .._optional import require
from ..errors import TargetError

if TYPE_CHECKING:
    import onnx

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
_FP16_MAX = float(np.finfo(np.float16).max)


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
    model: onnx.ModelProto,
    *,
    keep_ops: Iterable[str] = DEFAULT_FP32_OPS,
    keep_names: Iterable[str] = (),
    qdq: bool = False,
    fp16_io: Iterable[str] = (),
) -> tuple[onnx.ModelProto, Fp16Report]:
    """An fp16 copy of ``model`` with fp32 islands, for TensorRT's strongly typed networks.

    Nodes that read activations compute in float16, except the nodes
    :func:`fp32_island_nodes` picks; constant and shape arithmetic stays float32;
    ``Cast`` nodes are inserted at every type boundary, float32 initializers read by fp16
    nodes are stored as float16 copies, graph inputs and outputs keep their float32 type
    (so the engine's carried tensors match the manifest). The input model is not modified.

    ``qdq``: every DequantizeLinear computes in float16 (its scale stored as float16, so
    it makes float16) and counts as an activation, QuantizeLinear reads float16; the
    model must be opset 19 or later (float16 Q/DQ). ``fp16_io``: graph inputs and outputs
    (by name) typed float16 instead (tensors carried between fp16 engines).
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
    half_io = frozenset(fp16_io)
    for vi in graph.input:
        if vi.name in half_io and vi.type.tensor_type.elem_type == _FLOAT:
            vi.type.tensor_type.elem_type = _FLOAT16
            elem[vi.name] = _FLOAT16
    for vi in graph.output:
        if vi.name in half_io and vi.type.tensor_type.elem_type == _FLOAT:
            vi.type.tensor_type.elem_type = _FLOAT16

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
    if qdq:
        opset = next((o.version for o in src.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < 19:
            raise TargetError(f"float16 Q/DQ needs opset 19 or later, the model is opset {opset}")
    for i, node in enumerate(graph.node):
        dequant = qdq and node.op_type == "DequantizeLinear"
        reads_activation = dequant or any(name in active for name in node.input)
        if reads_activation:
            active.update(o for o in node.output if elem.get(o) in (_FLOAT, _FLOAT16))
        want = _FLOAT if (i in island and not dequant) or not reads_activation else _FLOAT16
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


