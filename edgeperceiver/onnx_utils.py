"""ONNX graph facts and probing for export and the cut (rewrites live in :mod:`edgeperceiver.passes`).

Everything here works on ``onnx.ModelProto`` objects and imports onnx / onnxruntime lazily
(``import edgeperceiver.onnx_utils`` is light). The models handled have one image input
whose first axis is the dynamic batch (``"batch"``) and static C, H, W.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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
