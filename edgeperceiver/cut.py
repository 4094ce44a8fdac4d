"""The cut: split a multi-exit ONNX graph into one segment per exit.

With exits E1..EK in order, segment k holds the nodes E_k needs minus those already in
segments 1..k-1. Its inputs are the tensors its nodes read that an earlier segment made
(or the graph input); its outputs are E_k plus whatever a later segment reads. Nodes that
depend on no graph input (constants, DequantizeLinear of a quantized weight) are copied
into every segment that needs them instead of being carried; initializers go with every
segment that reads them. A QuantizeLinear output is never carried: its DequantizeLinear is
moved into the Q's segment, so the carried tensor is the DQ output (if that DQ is itself a later
exit, the Q is recomputed in the exit's segment from its float input instead).

This is a pure graph algorithm: it knows nothing about Dyn-Perceiver.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ._optional import require
from .bundle import BATCH, TensorSpec
from .errors import ExportError, InputError
from .onnx_utils import check_topological, node_reads, ort_session, static_tensors

if TYPE_CHECKING:  # pragma: no cover
    import onnx


@dataclass(frozen=True)
class SegmentPlan:
    """One segment of a cut: node indices into the source graph and its boundary tensors."""

    index: int  #: 1-based
    exit: str
    nodes: tuple[int, ...]  #: indices of the source graph's nodes, in topological order
    #: nodes copied into this segment: static (input-independent) nodes, and a QuantizeLinear
    #: recomputed where its DequantizeLinear is a later exit (so no quantized tensor is carried)
    shared: tuple[int, ...]
    inputs: tuple[str, ...]  #: graph input and/or tensors made by earlier segments
    outputs: tuple[str, ...]  #: the exit first, then tensors later segments read
    live_after: tuple[str, ...]  #: tensors (graph input or carried) a later segment still reads
    initializers: tuple[str, ...]  #: initializers the segment's nodes read

    @property
    def carried(self) -> tuple[str, ...]:
        """Outputs other than the exit (tensors handed to later segments)."""
        return tuple(o for o in self.outputs if o != self.exit)


@dataclass(frozen=True)
class CutPlan:
    """A whole cut: the segments of ``exits`` over one source graph."""

    exits: tuple[str, ...]
    graph_inputs: tuple[str, ...]
    segments: tuple[SegmentPlan, ...]
    moved_dq: tuple[str, ...] = ()  #: DequantizeLinear nodes moved next to their QuantizeLinear


def plan_cut(model: onnx.ModelProto, exits: Sequence[str]) -> CutPlan:
    """Plan the segments of ``model`` for ``exits`` (graph output or intermediate tensor names, in order)."""
    g = model.graph
    check_topological(g)
    exits = tuple(exits)
    if not exits:
        raise InputError("at least one exit is needed")
    dup = sorted({e for e in exits if exits.count(e) > 1})
    if dup:
        raise InputError(f"exit(s) listed more than once: {dup}")
    inits = {i.name for i in g.initializer}
    graph_inputs = tuple(i.name for i in g.input if i.name not in inits)
    producer: dict[str, int] = {}
    for i, node in enumerate(g.node):
        for o in node.output:
            if o:
                producer[o] = i
    for e in exits:
        if e not in producer:
            known = [o.name for o in g.output]
            hint = f"graph outputs: {', '.join(known)}" if known else "the graph has no outputs"
            raise InputError(f"exit {e!r} is not produced by any node of the ONNX graph ({hint})")
    static = static_tensors(g)
    is_static_node = [bool(n.output) and all(o in static for o in n.output if o) for n in g.node]
    reads = [node_reads(n) for n in g.node]

    # 1. ownership: the first exit that needs a (non-static) node owns it
    owner: dict[int, int] = {}
    shared: list[set[int]] = []
    for k, e in enumerate(exits):
        need_shared: set[int] = set()
        stack = [producer[e]]
        seen: set[int] = set()
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            if is_static_node[i]:
                need_shared.add(i)
            elif i in owner:
                continue  # made by an earlier segment: a boundary, not a dependency to follow
            else:
                owner[i] = k
            for r in reads[i]:
                if r in producer:
                    stack.append(producer[r])
        if owner.get(producer[e]) != k:
            prev = owner.get(producer[e])
            raise ExportError(
                f"exit {k + 1} ({e!r}) is already computed by the segment of exit "
                f"{(prev or 0) + 1} ({exits[prev or 0]!r}): an exit cannot be an input of an earlier exit; "
                "reorder or drop it"
                if prev is not None
                else f"exit {k + 1} ({e!r}) does not depend on the model input; it cannot be an exit"
            )
        shared.append(need_shared)

    # 2. never carry a QuantizeLinear output: move its DequantizeLinear consumers into the Q's segment
    moved: list[str] = []
    consumers: dict[str, list[int]] = {}
    for i, rs in enumerate(reads):
        for r in rs:
            consumers.setdefault(r, []).append(i)
    changed = True
    while changed:
        changed = False
        for i, node in enumerate(g.node):
            if node.op_type != "QuantizeLinear" or i not in owner:
                continue
            for c in consumers.get(node.output[0], []):
                if c not in owner or owner[c] <= owner[i] or g.node[c].op_type != "DequantizeLinear":
                    continue
                if i in shared[owner[c]]:
                    continue
                movable = g.node[c].output[0] not in exits and all(
                    r in static or r == node.output[0] or owner.get(producer.get(r, -1), 0) <= owner[i]
                    for r in reads[c]
                )
                if movable:
                    owner[c] = owner[i]
                    moved.append(g.node[c].name or g.node[c].output[0])
                else:  # the DQ is a later exit itself: recompute the (deterministic) Q in its segment
                    shared[owner[c]].add(i)
                changed = True

    # 3. boundaries
    nseg = len(exits)
    seg_nodes: list[list[int]] = [[] for _ in range(nseg)]
    for i in range(len(g.node)):
        if i in owner:
            seg_nodes[owner[i]].append(i)
    made_in: dict[str, int] = {}
    for i, k in owner.items():
        for o in g.node[i].output:
            if o:
                made_in[o] = k
    static_outputs = {o for i, s in enumerate(is_static_node) if s for o in g.node[i].output}
    seg_inputs: list[list[str]] = [[] for _ in range(nseg)]
    for k in range(nseg):
        local = {o for i in shared[k] for o in g.node[i].output}  # made by nodes copied into segment k
        for i in sorted(set(seg_nodes[k]) | shared[k]):
            for r in reads[i]:
                if r in inits or r in static_outputs or r in local:
                    continue
                if r in graph_inputs or made_in.get(r, k) < k:
                    if r not in seg_inputs[k]:
                        seg_inputs[k].append(r)
                elif r not in made_in:
                    raise ExportError(f"tensor {r!r} is read but never produced")
    read_later: dict[str, int] = {}  # tensor -> last segment that reads it
    for k in range(nseg):
        for r in seg_inputs[k]:
            read_later[r] = max(read_later.get(r, -1), k)
    ordered = [*graph_inputs, *sorted((t for t in read_later if t in made_in), key=lambda t: producer[t])]
    segments = []
    for k in range(nseg):
        outs = [exits[k]]
        for i in seg_nodes[k]:
            for o in g.node[i].output:
                if o and o != exits[k] and read_later.get(o, -1) > k:
                    outs.append(o)
        live = [
            t for t in ordered
            if read_later.get(t, -1) > k and (t in graph_inputs or made_in.get(t, nseg) <= k)
        ]
        all_nodes = sorted(set(seg_nodes[k]) | shared[k])
        seg_inits = []
        for i in all_nodes:
            for r in reads[i]:
                if r in inits and r not in seg_inits:
                    seg_inits.append(r)
        segments.append(
            SegmentPlan(
                index=k + 1, exit=exits[k], nodes=tuple(seg_nodes[k]), shared=tuple(sorted(shared[k])),
                inputs=tuple(seg_inputs[k]), outputs=tuple(outs), live_after=tuple(live),
                initializers=tuple(seg_inits),
            )
        )
    return CutPlan(exits=exits, graph_inputs=graph_inputs, segments=tuple(segments), moved_dq=tuple(moved))


def build_segment(
    model: onnx.ModelProto,
    plan: CutPlan,
    seg: SegmentPlan,
    specs: Mapping[str, TensorSpec],
) -> onnx.ModelProto:
    """The standalone ONNX model of one planned segment; ``specs`` gives boundary dtypes/shapes."""
    onnx = require("onnx", purpose="cutting ONNX models")
    helper = onnx.helper
    g = model.graph
    idx = sorted(set(seg.nodes) | set(seg.shared))
    nodes = []
    for i in idx:
        n = onnx.NodeProto()
        n.CopyFrom(g.node[i])
        nodes.append(n)
    init_by_name = {t.name: t for t in g.initializer}
    inits = []
    for name in seg.initializers:
        t = onnx.TensorProto()
        t.CopyFrom(init_by_name[name])
        inits.append(t)

    def vinfo(name: str) -> Any:
        if name not in specs:
            raise ExportError(f"internal: no dtype/shape known for boundary tensor {name!r}")
        s = specs[name]
        from .onnx_utils import elem_type

        return helper.make_tensor_value_info(name, elem_type(s.dtype), list(s.shape))

    graph = helper.make_graph(
        nodes, f"{g.name or 'model'}_seg{seg.index}", [vinfo(n) for n in seg.inputs],
        [vinfo(n) for n in seg.outputs], initializer=inits,
    )
    m = helper.make_model(graph, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    m.producer_name = "edgeperceiver"
    if model.functions:
        m.functions.extend(model.functions)
    return m


def tensor_specs(
    model: onnx.ModelProto,
    names: Sequence[str],
    input_name: str,
    input_shape: Sequence[int | str],
    *,
    dtype: str = "float32",
    batches: Sequence[int] = (2, 3),
    seed: int = 0,
    threads: int | None = None,
) -> dict[str, TensorSpec]:
    """Dtype and shape (batch axis as ``"batch"``) of ``names``, measured by running the model.

    Every boundary tensor must carry the batch on axis 0 (the runtime compacts along it);
    otherwise :class:`ExportError`.
    """
    from .onnx_utils import probe_many, random_input

    wanted = [n for n in names if n != input_name]
    feeds = [
        {input_name: random_input((b, *[int(d) for d in input_shape[1:]]), seed=seed, dtype=dtype)} for b in batches
    ]
    runs = [values for values, _ in probe_many(model, feeds, tensors=wanted, threads=threads)]
    specs = {input_name: TensorSpec(input_name, dtype, (BATCH, *[int(d) for d in input_shape[1:]]))}
    for n in wanted:
        shapes = [r[n].shape for r in runs]
        if len({len(s) for s in shapes}) != 1 or not shapes[0]:
            raise ExportError(f"tensor {n!r} changes rank with the batch size or is a scalar; it cannot cross a cut")
        dims: list[int | str] = []
        for ax in range(len(shapes[0])):
            vals = [s[ax] for s in shapes]
            if ax == 0 and vals == list(batches):
                dims.append(BATCH)
            elif len(set(vals)) == 1 and ax > 0:
                dims.append(int(vals[0]))
            else:
                raise ExportError(
                    f"tensor {n!r} crosses a cut but its shape {shapes[0]} does not have the batch on axis 0 "
                    f"(axis {ax} is {vals} at batch sizes {list(batches)}); the runtime compacts carried "
                    "tensors along axis 0"
                )
        specs[n] = TensorSpec(n, str(runs[0][n].dtype), tuple(dims))
    return specs


def cut_model(
    model: onnx.ModelProto, exits: Sequence[str], *, seed: int = 0, threads: int | None = None
) -> tuple[CutPlan, list[onnx.ModelProto], dict[str, TensorSpec]]:
    """Plan the cut of ``model`` for ``exits`` and build every segment model."""
    from .onnx_utils import input_info

    plan = plan_cut(model, exits)
    in_name, in_dtype, in_shape = input_info(model)
    names = list(dict.fromkeys(n for s in plan.segments for n in (*s.inputs, *s.outputs)))
    specs = tensor_specs(model, names, in_name, in_shape, dtype=in_dtype, seed=seed, threads=threads)
    return plan, [build_segment(model, plan, s, specs) for s in plan.segments], specs


def run_chain(
    segments: Sequence[Any],
    feeds: Mapping[str, np.ndarray],
    *,
    threads: int | None = None,
    optimize: bool = True,
) -> dict[str, np.ndarray]:
    """Run segments (ModelProtos, paths or ORT sessions) back to back; return every tensor made.

    A reference executor for verification: it keeps all tensors (no early exit, no compaction).
    """
    live: dict[str, np.ndarray] = dict(feeds)
    for k, seg in enumerate(segments, start=1):
        sess = seg if hasattr(seg, "get_inputs") else ort_session(seg, threads=threads, optimize=optimize)
        names = [i.name for i in sess.get_inputs()]
        missing = [n for n in names if n not in live]
        if missing:
            raise ExportError(f"segment {k} needs {missing}, which no earlier segment produced")
        outs = [o.name for o in sess.get_outputs()]
        try:
            got = sess.run(outs, {n: live[n] for n in names})
        except Exception as exc:  # onnxruntime's own exception classes
            raise ExportError(f"segment {k} failed in ONNX Runtime: {exc}") from exc
        live.update(zip(outs, got, strict=True))
    return live
