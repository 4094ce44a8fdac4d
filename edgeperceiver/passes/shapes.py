"""Static-shape passes on exported ONNX graphs: a dynamic batch axis, folding the shape
arithmetic the exporter emits for static C, H, W, dead-node elimination, output restriction.

onnx and onnxruntime are imported lazily (``import edgeperceiver.passes.shapes`` is light).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..bundle import BATCH
from ..errors import InputError
from ..onnx_utils import QDQ_OPS, RANDOM_OPS, SHAPE_OPS, _onnx, input_info, node_reads, probe_many, random_input

if TYPE_CHECKING:  # pragma: no cover
    import onnx


def make_batch_dynamic(model: onnx.ModelProto) -> None:
    """Name axis 0 of every graph input and output ``"batch"`` (in place) and drop value_info."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    for vi in [*[i for i in g.input if i.name not in inits], *g.output]:
        shape = vi.type.tensor_type.shape
        if len(shape.dim):
            shape.dim[0].Clear()
            shape.dim[0].dim_param = BATCH
    del g.value_info[:]


# --------------------------------------------------------------------------- folding static shape arithmetic


@dataclass(frozen=True)
class FoldStats:
    """What :func:`fold_static_shapes` did."""

    nodes_before: int
    nodes_after: int
    folded_tensors: int
    rewritten_reshapes: int


def fold_static_shapes(
    model: onnx.ModelProto, *, probe_batches: Sequence[int] = (1, 2, 3), seed: int = 0,
    threads: int | None = None,
) -> tuple[onnx.ModelProto, FoldStats]:
    """Fold shape arithmetic that only depends on the static C, H, W (and constants).

    The TorchScript exporter computes every ``reshape``/``flatten``/``expand`` target from
    ``Shape`` of a runtime tensor. With static C, H, W these values are constants except
    for the batch size. Each candidate value (a tensor computed from shapes and constants
    only) is evaluated at several batch sizes: values that never change become
    initializers; ``Reshape`` / ``Expand`` targets that change only along one axis become
    constants with ``0`` (copy the batch axis), ``-1`` or ``1`` there. Dead nodes are then
    removed. Quantize/DequantizeLinear nodes are never folded. Returns a new model.
    """
    onnx = _onnx()
    numpy_helper = onnx.numpy_helper
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    nodes_before = len(g.node)
    outputs = [o.name for o in g.output]

    # Constant nodes -> initializers (they are what the cut would otherwise duplicate)
    kept = []
    for node in g.node:
        if node.op_type == "Constant" and len(node.output) == 1 and not node.domain:
            value = _constant_value(node)
            if value is not None:
                g.initializer.append(numpy_helper.from_array(value, node.output[0]))
                continue
        kept.append(node)
    del g.node[:]
    g.node.extend(kept)

    inits = {i.name for i in g.initializer}
    derived: set[str] = set()  # depends on data only through shapes (or not at all)
    qdq_downstream: set[str] = set()
    for node in g.node:
        reads = node_reads(node)
        if node.op_type in QDQ_OPS or any(r in qdq_downstream for r in reads):
            qdq_downstream.update(node.output)
            continue
        if node.op_type in RANDOM_OPS:
            continue
        if node.op_type in SHAPE_OPS or all(r in inits or r in derived for r in reads):
            derived.update(o for o in node.output if o)
    candidates = [t for t in _in_order(g, derived) if t not in inits and t not in outputs]
    reshapes = [n for n in g.node if n.op_type == "Reshape" and len(n.input) > 1 and n.input[1] in derived]
    expands = [n for n in g.node if n.op_type == "Expand" and n.input[1] in derived and n.input[0] not in derived]
    if not candidates:
        return m, FoldStats(nodes_before, len(g.node), 0, 0)

    in_name, in_dtype, in_shape = input_info(m)
    shape_targets = [n.output[0] for n in reshapes] + [n.input[0] for n in reshapes]
    shape_targets += [n.output[0] for n in expands] + [n.input[0] for n in expands]
    feeds = [
        {in_name: random_input((b, *in_shape[1:]), seed=seed, dtype=in_dtype)}  # type: ignore[arg-type]
        for b in probe_batches
    ]
    runs = probe_many(m, feeds, tensors=candidates, shapes_of=shape_targets, threads=threads)

    # 1. values that do not change with the batch size become initializers
    constant: dict[str, np.ndarray] = {}
    for t in candidates:
        vals = [r[0][t] for r in runs]
        if all(v.shape == vals[0].shape and v.dtype == vals[0].dtype and np.array_equal(v, vals[0]) for v in vals):
            constant[t] = vals[0]
    # 2. Reshape / Expand targets that vary along one axis only
    new_shape_inputs: dict[tuple[int, int], np.ndarray] = {}
    rewritten = 0
    node_pos = {id(n): i for i, n in enumerate(g.node)}
    for n in reshapes:
        if n.input[1] in constant:
            continue
        allowzero = any(a.name == "allowzero" and a.i for a in n.attribute)
        outs = [r[1][n.output[0]] for r in runs]
        ins = [r[1][n.input[0]] for r in runs]
        target = _varying_target(outs, ins, probe_batches, allow_copy=not allowzero, copy_value=0)
        if target is not None:
            new_shape_inputs[(node_pos[id(n)], 1)] = target
            rewritten += 1
    for n in expands:
        if n.input[1] in constant:
            continue
        outs = [r[1][n.output[0]] for r in runs]
        ins = [r[1][n.input[0]] for r in runs]
        if len({len(s) for s in outs}) != 1 or len({len(s) for s in ins}) != 1 or len(ins[0]) != len(outs[0]):
            continue
        target = _varying_target(outs, ins, probe_batches, allow_copy=True, copy_value=1, allow_infer=False)
        if target is not None:
            new_shape_inputs[(node_pos[id(n)], 1)] = target
            rewritten += 1

    producers = {o: n for n in g.node for o in n.output}
    kept = []
    for i, node in enumerate(g.node):
        if node.output and all(o in constant or not o for o in node.output) and node.op_type not in QDQ_OPS:
            for o in node.output:
                if o:
                    g.initializer.append(numpy_helper.from_array(constant[o], o))
            continue
        for (pos, k), value in new_shape_inputs.items():
            if pos == i:
                name = f"{node.output[0]}__static_shape"
                g.initializer.append(numpy_helper.from_array(value.astype(np.int64), name))
                node.input[k] = name
        kept.append(node)
    del producers
    del g.node[:]
    g.node.extend(kept)
    eliminate_dead(m)
    return m, FoldStats(nodes_before, len(m.graph.node), len(constant), rewritten)


def _varying_target(
    outs: Sequence[tuple[int, ...]],
    ins: Sequence[tuple[int, ...]],
    batches: Sequence[int],
    *,
    allow_copy: bool,
    copy_value: int,
    allow_infer: bool = True,
) -> np.ndarray | None:
    """A constant shape for a Reshape/Expand whose output varies with the batch along one axis."""
    if len({len(s) for s in outs}) != 1:
        return None
    first = np.array(outs[0], dtype=np.int64)
    varying = [i for i in range(len(first)) if len({s[i] for s in outs}) > 1]
    if not varying:
        return first
    if len(varying) != 1:
        return None
    ax = varying[0]
    target = first.copy()
    in_follows = (
        all(len(s) > ax for s in ins) and all(s[ax] == o[ax] for s, o in zip(ins, outs, strict=True))
    )
    if allow_copy and in_follows:
        target[ax] = copy_value
        return target
    if allow_infer:
        target[ax] = -1
        return target
    return None


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    onnx = _onnx()
    for a in node.attribute:
        if a.name == "value":
            return np.asarray(onnx.numpy_helper.to_array(a.t))
        if a.name in ("value_float",):
            return np.asarray(a.f, dtype=np.float32)
        if a.name in ("value_int",):
            return np.asarray(a.i, dtype=np.int64)
        if a.name in ("value_floats",):
            return np.asarray(list(a.floats), dtype=np.float32)
        if a.name in ("value_ints",):
            return np.asarray(list(a.ints), dtype=np.int64)
    return None


def _in_order(g: onnx.GraphProto, names: set[str]) -> list[str]:
    out: list[str] = []
    for node in g.node:
        out.extend(o for o in node.output if o in names)
    return out


def eliminate_dead(model: onnx.ModelProto) -> int:
    """Remove nodes and initializers no graph output depends on (in place); return nodes removed."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node_reads(node))
    removed = len(g.node) - len(keep)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    graph_inputs = {i.name for i in g.input}
    vis = [v for v in g.value_info if v.name in needed and v.name not in graph_inputs]
    del g.value_info[:]
    g.value_info.extend(vis)
    return removed


def restrict_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs are exactly ``names`` (in order), dead nodes removed."""
    onnx = _onnx()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    by_name = {o.name: o for o in m.graph.output}
    missing = [n for n in names if n not in by_name]
    if missing:
        have = ", ".join(by_name) or "none"
        raise InputError(f"the ONNX model has no output(s) {missing}; its outputs are: {have}")
    outs = [by_name[n] for n in names]
    copies = []
    for o in outs:
        c = onnx.ValueInfoProto()
        c.CopyFrom(o)
        copies.append(c)
    del m.graph.output[:]
    m.graph.output.extend(copies)
    eliminate_dead(m)
    return m
