"""Every step before a TensorRT engine build, runnable without TensorRT (``compile --check``).

For each segment: pick its ONNX source (the raw segments, or for INT8 the bundle's
quantization stage), make the quantizers signed INT8 (:mod:`edgeperceiver.passes.qdq_signed`),
check the Q/DQ nodes (:mod:`edgeperceiver.passes.qdq_check`), and for strongly typed
fp16/int8 builds cast the graph to fp16 outside the fp32 islands and the Q/DQ pairs
(:mod:`edgeperceiver.passes.fp16`, opset raised to 19 for float16 Q/DQ first); weakly typed
builds keep the graph and pin the island layers to fp32 at build time instead. The
optimization profiles come from the graphs' inputs.

:func:`check` runs all of that for both typings and then runs the prepared graphs, chained
like the runtime chains the engines, in ONNX Runtime at batch 1 and 2: the graphs TensorRT
will receive load, agree on their carried tensors' types and give finite exits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeperceiver._optional import require
from edgeperceiver.bundle import Manifest
from edgeperceiver.errors import EdgePerceiverError
from edgeperceiver.passes.fp16 import cast_to_fp16, fp32_island_nodes
from edgeperceiver.passes.opset import upgrade_opset
from edgeperceiver.passes.qdq_check import check_qdq_segments
from edgeperceiver.passes.qdq_signed import unsigned_to_signed
from edgeperceiver.quant_stage import require_stage
from edgeperceiver.types import Precision

from .tensorrt_options import BuildOptions, Profile, profile_shapes

if TYPE_CHECKING:
    import onnx


@dataclass
class PreparedSegment:
    """One segment's graph as TensorRT will parse it, with what the build needs beside it."""

    index: int
    source: str  #: bundle-relative ONNX file it came from
    model: Any  #: onnx.ModelProto (cast/converted as described in ``notes``)
    islands: frozenset[str]  #: weak typing: ONNX node names whose layers are pinned to fp32
    profiles: dict[str, Profile]
    fp16_io: frozenset[str]  #: graph inputs/outputs that are fp16 (carried tensors)
    notes: list[str] = field(default_factory=list)


@dataclass
class Preparation:
    """All segments of one build, prepared."""

    source: str  #: "segments" or the quantization stage's folder
    strongly_typed: bool
    segments: list[PreparedSegment]


def _onnx() -> Any:
    return require("onnx", purpose="preparing ONNX segments for TensorRT")


def segment_sources(manifest: Manifest, precision: Precision) -> tuple[str, tuple[str, ...]]:
    """``(source label, ONNX path of every segment)`` the engines of ``precision`` are built from."""
    if precision is not Precision.INT8:
        return "segments", tuple(s.path for s in manifest.segments)
    stage = require_stage(manifest, for_what="TensorRT INT8 (explicit quantization)")
    return stage.model.rpartition("/")[0], stage.segments


def carried_tensors(manifest: Manifest) -> frozenset[str]:
    """Tensors that flow between segments and are not exits (kept fp16 between fp16 engines)."""
    made = {t.name for s in manifest.segments for t in s.outputs}
    return frozenset(made - set(manifest.exits) - {manifest.input.name})


def uses_fp16(precision: Precision, opts: BuildOptions) -> bool:
    """Whether the layers outside Q/DQ and the fp32 islands run in fp16."""
    return precision is Precision.FP16 or (precision is Precision.INT8 and opts.int8_fp16)


def prepare(
    bundle_dir: Path, manifest: Manifest, precision: Precision, opts: BuildOptions, *, strongly_typed: bool
) -> Preparation:
    """Prepare every segment's graph for a TensorRT build (raises with the reason when one cannot be)."""
    onnx_mod = _onnx()
    source, paths = segment_sources(manifest, precision)
    fp16 = uses_fp16(precision, opts)
    half_io = carried_tensors(manifest) if fp16 and opts.fp16_carried else frozenset()
    out = []
    for spec, rel in zip(manifest.segments, paths, strict=True):
        model = onnx_mod.load(str(bundle_dir / rel))
        notes: list[str] = []
        if precision is Precision.INT8:
            model, signed = unsigned_to_signed(model)
            if signed.quantizers:
                notes.append(f"{signed.quantizers} UINT8 quantizers made signed INT8 (scale x2)")
            check_qdq_segments([model], labels=[rel], tensorrt=True)
            notes.append(f"{sum(n.op_type == 'QuantizeLinear' for n in model.graph.node)} Q/DQ pairs pass the check")
        seg_io = frozenset(n for n in half_io if n in {t.name for t in (*spec.inputs, *spec.outputs)})
        islands: frozenset[str] = frozenset()
        if fp16 and strongly_typed:
            if precision is Precision.INT8:
                model = upgrade_opset(model, 19)
            model, rep = cast_to_fp16(model, qdq=precision is Precision.INT8, fp16_io=seg_io)
            notes.append(f"fp16 cast: {len(rep.fp32_nodes)} fp32 nodes, {rep.casts_inserted} casts, "
                         f"{rep.clipped_values} clipped weights")
        elif fp16:
            nodes = list(model.graph.node)
            islands = frozenset(nodes[i].name for i in fp32_island_nodes(model) if nodes[i].name)
            notes.append(f"weak typing: {len(islands)} nodes pinned to fp32")
        profiles = {
            vi.name: profile_shapes(vi.name, _dims(vi), opt_batch=opts.opt, max_batch=opts.max_batch)
            for vi in model.graph.input
            if vi.name not in {i.name for i in model.graph.initializer}
        }
        if seg_io:
            notes.append(f"{len(seg_io)} carried tensors in fp16")
        out.append(PreparedSegment(spec.index, rel, model, islands, profiles, seg_io, notes))
    return Preparation(source, strongly_typed, out)


def _dims(vi: Any) -> tuple[int | str, ...]:
    return tuple(d.dim_param if d.dim_param else (d.dim_value if d.dim_value else -1)
                 for d in vi.type.tensor_type.shape.dim)


# --------------------------------------------------------------------------- --check


@dataclass
class CheckReport:
    """What ``compile --check`` found: ready or not, and why."""

    precision: Precision
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return not self.problems

    def render(self) -> str:
        head = (f"TensorRT {self.precision.value}: READY (every pre-build step passes)" if self.ready
                else f"TensorRT {self.precision.value}: NOT READY")
        body = [f"  {line}" for line in self.lines] + [f"  problem: {p}" for p in self.problems]
        return "\n".join([head, *body])


def run_chain(prep: Preparation, manifest: Manifest, x: np.ndarray) -> dict[str, np.ndarray]:
    """Run the prepared graphs in ONNX Runtime, chained by tensor name; every tensor made."""
    ort = require("onnxruntime", purpose="checking prepared TensorRT graphs")
    live: dict[str, np.ndarray] = {manifest.input.name: x}
    for seg in prep.segments:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(seg.model.SerializeToString(), sess_options=so,
                                    providers=["CPUExecutionProvider"])
        feeds = {i.name: live[i.name] for i in sess.get_inputs()}
        names = [o.name for o in sess.get_outputs()]
        live.update(zip(names, sess.run(names, feeds), strict=True))
    return live


def check(
    bundle_dir: Path, manifest: Manifest, precision: Precision, opts: BuildOptions, *,
    typings: Sequence[bool] = (True, False),
) -> CheckReport:
    """Run every pre-build step for each typing in ``typings`` (strong, weak) and the prepared graphs in ORT."""
    report = CheckReport(precision)
    shape = tuple(int(d) for d in manifest.input.shape[1:])
    x = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)
    for strongly in typings:
        label = "strongly typed (TensorRT >= 10.12, 11)" if strongly else "weakly typed (TensorRT 10.3..10.11)"
        try:
            prep = prepare(bundle_dir, manifest, precision, opts, strongly_typed=strongly)
        except EdgePerceiverError as exc:
            report.problems.append(f"{label}: {exc}")
            continue
        report.lines.append(f"{label}, from {prep.source}:")
        for seg in prep.segments:
            inputs = ", ".join(f"{n}{list(p.max)}" for n, p in seg.profiles.items())
            report.lines.append(f"  segment {seg.index} ({seg.source}): profile max {inputs}; " + "; ".join(seg.notes))
        for batch in (1, 2):
            try:
                live = run_chain(prep, manifest, x[:batch])
            except Exception as exc:  # onnxruntime's own error types
                report.problems.append(f"{label}: the prepared graphs do not run in ONNX Runtime at batch {batch}: "
                                       f"{str(exc)[:300]}")
                break
            bad = [e for e in manifest.exits if not np.isfinite(live[e]).all()]
            wrong = [e for e in manifest.exits if live[e].shape != (batch, manifest.num_classes)]
            if bad or wrong:
                report.problems.append(f"{label}: exits {bad + wrong} are not finite/(batch, classes) at batch {batch}")
                break
        else:
            report.lines.append("  prepared graphs run chained in ONNX Runtime at batch 1 and 2 with finite exits")
    return report


def to_bytes(model: onnx.ModelProto) -> bytes:
    """Serialized model (what TensorRT's parser reads)."""
    data: bytes = model.SerializeToString()
    return data

