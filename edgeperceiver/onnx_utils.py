"""ONNX graph helpers for export and the cut: probing, static-shape folding, MAC counting.

Everything here works on ``onnx.ModelProto`` objects and imports onnx / onnxruntime lazily
(``import edgeperceiver.onnx_utils`` is light). The models handled have one image input
whose first axis is the dynamic batch (``"batch"``) and static C, H, W.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._optional import require
from .bundle import BATCH
from .errors import ExportError, InputError

if TYPE_CHECKING:  # pragma: no cover
    import onnx

#: ops never folded into constants: folding them would erase the quantization of a QDQ graph
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
#: ops whose outputs depend on the data only through its shape
SHAPE_OPS = frozenset({"Shape", "Size"})
#: ops that are not deterministic functions of their inputs
RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"})


def _onnx() -> Any:
    return require("onnx", purpose="ONNX export")


def _ort() -> Any:
    return require("onnxruntime", purpose="verifying exported ONNX models")


# --------------------------------------------------------------------------- loading / graph facts


def load_model(path: str | Path) -> onnx.ModelProto:
    """Load an ONNX file (with external data beside it) or raise :class:`InputError`."""
    onnx = _onnx()
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such ONNX file")
    try:
        return onnx.load(str(p))
    except Exception as exc:  # protobuf raises its own DecodeError family
        raise InputError(f"{p}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc


def subgraph_inputs(node: onnx.NodeProto) -> list[str]:
    """Outer-scope tensor names read by the subgraphs (If/Loop/Scan bodies) of ``node``."""
    onnx = _onnx()
    names: list[str] = []
    for attr in node.attribute:
        graphs = []
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs = [attr.g]
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs = list(attr.graphs)
        for g in graphs:
            defined = {i.name for i in g.input} | {i.name for i in g.initializer}
            for n in g.node:
                for name in [*n.input, *subgraph_inputs(n)]:
                    if name and name not in defined and name not in names:
                        names.append(name)
                defined.update(n.output)
    return names


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor name ``node`` reads (its inputs and its subgraphs' outer-scope names)."""
    out = [n for n in node.input if n]
    for n in subgraph_inputs(node):
        if n not in out:
            out.append(n)
    return out


def check_topological(graph: onnx.GraphProto) -> None:
    """Raise :class:`ExportError` unless every node reads only tensors defined before it."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for node in graph.node:
        for name in node_reads(node):
            if name not in known:
                raise ExportError(
                    f"ONNX graph is not topologically sorted or reads an undefined tensor: node "
                    f"{node.name or node.op_type!r} reads {name!r} before it is produced"
                )
        known.update(o for o in node.output if o)


def static_tensors(graph: onnx.GraphProto) -> set[str]:
    """Tensors that do not depend on any graph input (initializers and their functions)."""
    static = {i.name for i in graph.initializer}
    for node in graph.node:
        if node.op_type in RANDOM_OPS:
            continue
        if all(n in static for n in node_reads(node)):
            static.update(o for o in node.output if o)
    return static


def np_dtype_name(elem_type: int) -> str:
    """numpy dtype name of an ONNX ``TensorProto`` element type."""
    onnx = _onnx()
    if elem_type == onnx.TensorProto.BFLOAT16:
        return "bfloat16"
    return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))


def elem_type(dtype: str) -> int:
    """ONNX element type of a numpy dtype name."""
    onnx = _onnx()
    if dtype == "bfloat16":
        return int(onnx.TensorProto.BFLOAT16)
    return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))


# --------------------------------------------------------------------------- running with ONNX Runtime


def ort_session(
    model: onnx.ModelProto | bytes | str | Path, *, threads: int | None = None, optimize: bool = True
) -> Any:
    """An ONNX Runtime CPU session (``threads`` intra-op threads; None = ORT's default).

    ``optimize=False`` disables ORT's graph rewrites (e.g. its QDQ fusions, which change
    the numerics of a quantized graph depending on where it was cut).
    """
    ort = _ort()
    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    data: Any = model
    if not isinstance(model, (bytes, str, Path)):
        data = model.SerializeToString()
    elif isinstance(model, Path):
        data = str(model)
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception classes
        raise ExportError(f"ONNX Runtime cannot load the model: {exc}") from exc


def probe(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    *,
    tensors: Iterable[str] = (),
    shapes_of: Iterable[str] = (),
    threads: int | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, ...]]]:
    """Run ``model`` in ONNX Runtime and return the values of ``tensors`` and the shapes of ``shapes_of``.

    The model is copied with the requested intermediate tensors (and a ``Shape`` node per
    tensor in ``shapes_of``) added as outputs, so nothing large is returned for shapes.
    """
    return probe_many(model, [feeds], tensors=tensors, shapes_of=shapes_of, threads=threads)[0]


def probe_many(
    model: onnx.ModelProto,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    tensors: Iterable[str] = (),
    shapes_of: Iterable[str] = (),
    threads: int | None = None,
) -> list[tuple[dict[str, np.ndarray], dict[str, tuple[int, ...]]]]:
    """:func:`probe` for several feeds (e.g. batch sizes) with one ONNX Runtime session.

    The session runs without graph optimizations: probing wants values, and building an
    optimized session of a large model costs more than the few unoptimized runs.
    """
    onnx = _onnx()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    existing = {o.name for o in g.output}
    want = [t for t in dict.fromkeys(tensors)]
    for t in want:
        if t not in existing:
            g.output.append(onnx.ValueInfoProto(name=t))
            existing.add(t)
    shape_out: dict[str, str] = {}
    for i, t in enumerate(dict.fromkeys(shapes_of)):
        out = f"__probe_shape_{i}"
        g.node.append(onnx.helper.make_node("Shape", [t], [out], name=f"__probe_shape_node_{i}"))
        g.output.append(onnx.ValueInfoProto(name=out))
        shape_out[t] = out
    # value_info entries would pin the symbolic dims of the probed tensors; ORT does not need them
    del g.value_info[:]
    sess = ort_session(m, threads=threads, optimize=False)
    names = [o.name for o in sess.get_outputs()]
    results = []
    for feed in feeds:
        try:
            got = dict(zip(names, sess.run(names, dict(feed)), strict=True))
        except Exception as exc:  # onnxruntime's own exception classes
            raise ExportError(f"ONNX Runtime failed to run the model: {exc}") from exc
        values = {t: got[t] for t in want}
        shapes = {t: tuple(int(d) for d in got[o]) for t, o in shape_out.items()}
        results.append((values, shapes))
    return results


def random_input(shape: Sequence[int], *, seed: int = 0, dtype: str = "float32") -> np.ndarray:
    """A seeded standard-normal batch (the verification and probing input)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(tuple(shape)).astype(dtype)


def input_info(model: onnx.ModelProto) -> tuple[str, str, tuple[int | str, ...]]:
    """(name, dtype, shape) of the single non-initializer graph input; batch axis named ``"batch"``."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1:
        raise InputError(
            f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
            "an image classifier needs exactly one"
        )
    vi = inputs[0]
    tt = vi.type.tensor_type
    dims: list[int | str] = []
    for i, d in enumerate(tt.shape.dim):
        if i == 0:
            dims.append(BATCH)
        elif d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            raise InputError(
                f"input {vi.name!r} has a dynamic axis {i} ({d.dim_param or '?'}); only the batch "
                "axis (0) may be dynamic"
            )
    if len(dims) < 2:
        raise InputError(f"input {vi.name!r} needs a batch axis and at least one more axis")
    return vi.name, np_dtype_name(tt.elem_type), tuple(dims)


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


# --------------------------------------------------------------------------- counting


#: ops whose multiply-accumulates are counted (the same ops the usual PyTorch counters count)
MAC_OPS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul",
})


def node_macs(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Multiply-accumulates of one node given concrete tensor shapes (0 for uncounted ops)."""
    op = node.op_type
    if op not in MAC_OPS:
        return 0
    if op in ("Conv", "ConvInteger", "QLinearConv", "ConvTranspose"):
        w_name = node.input[3] if op == "QLinearConv" else node.input[1]
        w = shapes[w_name]
        if op == "ConvTranspose":
            x = shapes[node.input[0]]
            # every input element is multiplied into C_out/group * kernel outputs
            return int(np.prod(x)) * int(np.prod(w[1:]))
        out = shapes[node.output[0]]
        return int(np.prod(out)) * int(np.prod(w[1:]))
    if op == "Gemm":
        a = shapes[node.input[0]]
        trans_a = any(at.name == "transA" and at.i for at in node.attribute)
        out = shapes[node.output[0]]
        k = a[0] if trans_a else a[1]
        return int(np.prod(out)) * int(k)
    a_name = node.input[0]
    a = shapes[a_name]
    out = shapes[node.output[0]]
    k = a[-1] if len(a) >= 1 else 1
    return int(np.prod(out)) * int(k)


def macs_tensors(nodes: Iterable[onnx.NodeProto]) -> list[str]:
    """The tensors whose shapes :func:`node_macs` needs for ``nodes``."""
    need: list[str] = []
    for n in nodes:
        if n.op_type not in MAC_OPS:
            continue
        if n.op_type == "QLinearConv":
            need += [n.input[0], n.input[3]]
        else:
            need += [n.input[0], n.input[1]]
        need.append(n.output[0])
    return list(dict.fromkeys(need))


def numel(shape: Sequence[int]) -> int:
    return int(np.prod(shape)) if len(shape) else 1
