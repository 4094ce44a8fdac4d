"""What an export did: verification per exit, size and cost per segment, as a text table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .bundle import BATCH, TensorSpec
from .cut import CutPlan
from .macs import macs_tensors, node_macs, numel
from .onnx_utils import input_info, np_dtype_name, probe, random_input
from .passes.shapes import FoldStats

if TYPE_CHECKING:  # pragma: no cover
    import onnx

#: initializer dtypes counted as parameters (others are indices and literals)
PARAM_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64", "int8", "uint8"})


@dataclass(frozen=True)
class VerifyRow:
    """Verification of one exit: max abs differences and top-1 agreement on the verify batch."""

    exit: str
    reference_vs_onnx: float | None  #: None when the reference *is* the ONNX model
    onnx_vs_segments: float
    reference_vs_segments: float | None
    top1_agreement: float  #: share of samples where reference and chained segments agree on top-1
    tolerance: float

    @property
    def ok(self) -> bool:
        all_diffs = (self.reference_vs_onnx, self.onnx_vs_segments, self.reference_vs_segments)
        diffs = [d for d in all_diffs if d is not None]
        return all(np.isfinite(d) and d <= self.tolerance for d in diffs)


@dataclass(frozen=True)
class SegmentStat:
    """Size and cost of one segment (per sample)."""

    index: int
    exit: str
    nodes: int
    params: int  #: elements of the weight initializers (not 0-d literals) this segment is first to use
    flops: int  #: multiply-accumulates of Conv/Gemm/MatMul per sample
    inputs: tuple[str, ...]
    carried: tuple[TensorSpec, ...]  #: outputs a later segment reads
    carried_bytes: int


@dataclass(frozen=True)
class ExportReport:
    """What an export did; ``render()`` is the text table the CLI prints."""

    out: Path
    model_name: str
    source: str
    reference: str  #: "torch" or "source" (the ONNX file as given)
    exits: tuple[str, ...]
    verify_batch: int
    seed: int
    rows: tuple[VerifyRow, ...]
    segments: tuple[SegmentStat, ...]
    fold: FoldStats | None = None
    simplified: str | None = None  #: the simplifier used, if any
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def total_flops(self) -> int:
        return sum(s.flops for s in self.segments)

    @property
    def total_params(self) -> int:
        return sum(s.params for s in self.segments)

    def cumulative_flops(self) -> tuple[int, ...]:
        """MACs per sample to reach each exit."""
        out, acc = [], 0
        for s in self.segments:
            acc += s.flops
            out.append(acc)
        return tuple(out)

    def render(self) -> str:
        ref = self.reference
        lines = [
            f"{self.model_name} ({self.source}) -> {self.out}",
            f"verification on a seeded random batch of {self.verify_batch} (seed {self.seed}), ONNX Runtime CPU:",
        ]
        head = ("exit", "name", f"{ref} vs onnx", "onnx vs segments", f"{ref} vs segments", "top-1 agree", "tol", "ok")
        rows = []
        for k, r in enumerate(self.rows, 1):
            rows.append((
                str(k), r.exit, _fmt(r.reference_vs_onnx), _fmt(r.onnx_vs_segments), _fmt(r.reference_vs_segments),
                f"{r.top1_agreement:.0%}", f"{r.tolerance:.1e}", "yes" if r.ok else "NO",
            ))
        lines += _table(head, rows)
        lines.append("segments (per sample):")
        head2 = ("seg", "exit", "nodes", "params", "MMACs", "cum. MMACs", "carried out", "carried KB")
        rows2 = []
        for s, cum in zip(self.segments, self.cumulative_flops(), strict=True):
            rows2.append((
                str(s.index), s.exit, str(s.nodes), f"{s.params:,}", f"{s.flops / 1e6:.1f}", f"{cum / 1e6:.1f}",
                ", ".join(_short(t) for t in s.carried) or "-", f"{s.carried_bytes / 1024:.1f}",
            ))
        lines += _table(head2, rows2)
        if self.fold is not None:
            lines.append(
                f"graph: {self.fold.nodes_before} -> {self.fold.nodes_after} nodes after folding static shapes"
                + (f", simplified with {self.simplified}" if self.simplified else "")
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _short(t: TensorSpec) -> str:
    dims = "x".join(str(d) for d in t.shape if d != BATCH)
    return f"[{dims}]"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*head), *(fmt.format(*r) for r in rows)]


def segment_stats(
    model: onnx.ModelProto, plan: CutPlan, segments: Sequence[onnx.ModelProto], specs: Mapping[str, TensorSpec],
    in_name: str, in_shape: Sequence[int | str], *, threads: int | None,
) -> tuple[SegmentStat, ...]:
    """Parameters, MACs at batch 1 and carried tensors of each segment of ``plan``."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    # concrete shapes at batch 1 for the nodes whose MACs are counted
    nodes = [g.node[i] for s in plan.segments for i in s.nodes]
    need = macs_tensors(nodes)
    shapes: dict[str, tuple[int, ...]] = {n: tuple(int(d) for d in inits[n].dims) for n in need if n in inits}
    todo = [n for n in need if n not in shapes]
    if todo:
        _, dtype, _ = input_info(model)
        x = random_input((1, *[int(d) for d in in_shape[1:]]), dtype=dtype)
        _, got = probe(model, {in_name: x}, shapes_of=todo, threads=threads)
        shapes.update(got)
    seen_inits: set[str] = set()
    stats = []
    for s in plan.segments:
        params = 0
        for name in s.initializers:
            t = inits[name]
            if name in seen_inits:
                continue
            seen_inits.add(name)
            if np_dtype_name(t.data_type) in PARAM_DTYPES and len(t.dims) > 0:  # 0-d: literals, not weights
                params += numel(tuple(t.dims))
        flops = sum(node_macs(g.node[i], shapes) for i in s.nodes)
        carried = tuple(specs[o] for o in s.outputs if any(o in later.inputs for later in plan.segments[s.index:]))
        stats.append(SegmentStat(
            index=s.index, exit=s.exit, nodes=len(s.nodes) + len(s.shared), params=params, flops=int(flops),
            inputs=s.inputs, carried=carried, carried_bytes=sum(t.per_sample_bytes() for t in carried),
        ))
    return tuple(stats)
