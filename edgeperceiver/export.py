"""Export a multi-exit classifier to a bundle: one ONNX model, cut into one segment per exit, verified.

Three sources, one pipeline (:func:`_export_graph`):

* :func:`export_checkpoint` — an official Dyn-Perceiver checkpoint (``edgeperceiver.models``);
* :func:`export_module` — any ``torch.nn.Module`` returning its exit logits in order;
* :func:`export_onnx` — an ONNX model whose outputs (named by ``exits``) are the exits.

PyTorch models go through the TorchScript exporter (``dynamo=False``; torch 2.13's dynamo
exporter writes a Squeeze ONNX Runtime refuses) with a dynamic ``batch`` axis. The shape
arithmetic it emits is folded for the static C, H, W (:func:`~edgeperceiver.passes.shapes.fold_static_shapes`),
then the graph is cut (:mod:`edgeperceiver.cut`) and verified in ONNX Runtime: reference
(PyTorch or the source ONNX) vs monolithic ONNX vs chained segments, per exit, on a seeded
random batch. A disagreement beyond tolerance raises :class:`ExportError`; nothing is written.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._optional import require
from .bundle import (
    Manifest,
    Preprocess,
    SegmentSpec,
    TargetEntry,
    check_destination,
    write_bundle,
)
from .cut import cut_model, run_chain
from .errors import CheckpointError, ExportError, InputError
from .export_report import ExportReport, VerifyRow, segment_stats
from .export_torch import INPUT_NAME, exit_tensors, torch_to_onnx
from .export_torch import load_module_factory as load_module_factory  # public API
from .onnx_utils import input_info, load_model, ort_session, random_input
from .passes.shapes import fold_static_shapes, make_batch_dynamic, restrict_outputs
from .passes.simplify import simplify_graph
from .progress import message
from .types import Precision, TargetName

if TYPE_CHECKING:  # pragma: no cover
    import onnx
    import torch

#: absolute tolerance per unit of output magnitude: tol = ATOL * max(1, max |reference|)
ATOL = 1e-4

Reference = Callable[[np.ndarray], Mapping[str, np.ndarray]]


# --------------------------------------------------------------------------- public API


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    arch: str | None = None,
    exits: Sequence[int] | None = None,
    labels: str | os.PathLike[str] | Sequence[str] | None = None,
    simplify: bool = False,
    opset: int = 17,
    overwrite: bool = False,
    verify_batch: int = 2,
    seed: int = 0,
    threads: int | None = None,
) -> ExportReport:
    """Export an official Dyn-Perceiver checkpoint (architecture from its ``args`` or ``arch``)."""
    try:
        models = importlib.import_module("edgeperceiver.models")
    except ImportError as exc:
        raise ExportError(f"the model zoo (edgeperceiver.models) is not available: {exc}") from exc
    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        raise CheckpointError(f"{ckpt}: no such checkpoint file")
    module = models.load_checkpoint(ckpt, name=arch)
    size = getattr(module, "input_size", 224)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mean = tuple(float(v) for v in getattr(module, "mean", (0.485, 0.456, 0.406)))
    std = tuple(float(v) for v in getattr(module, "std", (0.229, 0.224, 0.225)))
    channels = int(getattr(module, "in_chans", None) or len(mean))
    crop_pct = float(getattr(module, "crop_pct", 0.875))  # the model's evaluation transform
    resize = None if crop_pct >= 1.0 else round(min(h, w) / crop_pct)
    pre = Preprocess(size=(h, w), resize=resize, mean=mean, std=std, channels=channels)
    name = str(getattr(module, "model_name", None) or arch or type(module).__name__)
    return export_module(
        module, (channels, h, w), out, exit_names=getattr(module, "exit_names", None), preprocess=pre, name=name,
        exits=exits, labels=labels, simplify=simplify, opset=opset, overwrite=overwrite,
        verify_batch=verify_batch, seed=seed, threads=threads, _source="checkpoint",
        _extra={"checkpoint": ckpt.name},
    )


def export_module(
    module: torch.nn.Module,
    input_shape: tuple[int, int, int],
    out: str | os.PathLike[str],
    *,
    exit_names: Sequence[str] | None = None,
    preprocess: Preprocess | None = None,
    name: str | None = None,
    exits: Sequence[int] | None = None,
    labels: str | os.PathLike[str] | Sequence[str] | None = None,
    simplify: bool = False,
    opset: int = 17,
    overwrite: bool = False,
    verify_batch: int = 2,
    seed: int = 0,
    threads: int | None = None,
    _source: str = "module",
    _extra: Mapping[str, Any] | None = None,
) -> ExportReport:
    """Export a PyTorch module whose forward returns its exit logits (a tuple/list, in exit order).

    ``input_shape`` is (C, H, W); the batch axis is dynamic. ``exit_names`` default to the
    module's ``exit_names`` attribute, else ``exit1..exitK``. The module is put in eval mode.
    Raises :class:`ExportError` when the module does not return a tuple/list of 2-D logits or
    when verification disagrees, :class:`InputError` for bad options; nothing is written then.
    """
    torch = require("torch", purpose="exporting PyTorch models")
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"expected a torch.nn.Module, got {type(module).__name__}")
    chw = _check_shape(input_shape)
    _check_verify(verify_batch, opset)
    module.eval()
    # the verification batch doubles as the tracing input (batch >= 2: nothing specialises on 1)
    first_np = random_input((max(2, verify_batch), *chw), seed=seed)
    probe_x = torch.from_numpy(first_np)
    with torch.no_grad():
        outs = exit_tensors(module(probe_x), torch)
    names = tuple(exit_names if exit_names is not None else getattr(module, "exit_names", None) or
                  [f"exit{k}" for k in range(1, len(outs) + 1)])
    if len(names) != len(outs):
        raise InputError(f"{len(names)} exit names given for a module that returns {len(outs)} exits")
    if len(set(names)) != len(names) or INPUT_NAME in names:
        raise InputError(f"exit names must be distinct and not {INPUT_NAME!r}: {list(names)}")

    first = {n: t.detach().cpu().numpy() for n, t in zip(names, outs, strict=True)}

    def reference(x: np.ndarray) -> dict[str, np.ndarray]:
        if x.shape == first_np.shape and np.array_equal(x, first_np):
            return first  # the forward above ran on this very batch
        with torch.no_grad():
            got = exit_tensors(module(torch.from_numpy(x)), torch)
        return {n: t.detach().cpu().numpy() for n, t in zip(names, got, strict=True)}

    model = torch_to_onnx(module, probe_x, names, opset, torch)
    pre = preprocess or Preprocess(
        size=(chw[1], chw[2]), channels=chw[0],
        mean=(0.485, 0.456, 0.406) if chw[0] == 3 else (0.5,) * chw[0],
        std=(0.229, 0.224, 0.225) if chw[0] == 3 else (0.5,) * chw[0],
    )
    extra = {"exporter": f"torch {torch.__version__} TorchScript (dynamo=False)", **(_extra or {})}
    return _export_graph(
        model, names, out, name=name or type(module).__name__, source=_source, reference=reference,
        reference_kind="torch", preprocess=pre, keep=exits, labels=labels, simplify=simplify,
        overwrite=overwrite, verify_batch=verify_batch, seed=seed, threads=threads, extra=extra,
    )


def export_onnx(
    onnx_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    exits: Sequence[str],
    keep: Sequence[int] | None = None,
    labels: str | os.PathLike[str] | Sequence[str] | None = None,
    preprocess: Preprocess | None = None,
    name: str | None = None,
    simplify: bool = False,
    opset: int = 17,
    overwrite: bool = False,
    verify_batch: int = 2,
    seed: int = 0,
    threads: int | None = None,
) -> ExportReport:
    """Export an existing ONNX model; ``exits`` names its exit outputs in order (``keep``: 1-based subset).

    ``opset`` is not used for conversion: the model keeps its own opset.
    """
    path = Path(onnx_path)
    model = load_model(path)
    _check_verify(verify_batch, opset)
    exits = tuple(exits)
    if not exits:
        raise InputError("name the exit outputs of the ONNX model, in order")
    outputs = [o.name for o in model.graph.output]
    missing = [e for e in exits if e not in outputs]
    if missing:
        raise InputError(
            f"{path.name}: exit(s) {missing} are not outputs of the model (its outputs: {', '.join(outputs)})"
        )
    in_name, _, in_shape = input_info(model)
    original = ort_session(restrict_outputs(model, exits), threads=threads)
    dim0 = next(i for i in model.graph.input if i.name == in_name).type.tensor_type.shape.dim[0]
    chunk = int(dim0.dim_value) if dim0.HasField("dim_value") and dim0.dim_value > 0 else verify_batch
    if verify_batch % chunk:
        raise InputError(f"{path.name} has a fixed batch of {chunk}; use a verify batch that is a multiple of it")

    def reference(x: np.ndarray) -> dict[str, np.ndarray]:
        parts = []
        for i in range(0, len(x), chunk):  # a source with a fixed batch runs chunk by chunk
            try:
                parts.append(original.run(list(exits), {in_name: x[i : i + chunk]}))
            except Exception as exc:  # onnxruntime's own exception classes
                raise ExportError(f"the source model failed in ONNX Runtime: {exc}") from exc
        return {e: np.concatenate([p[k] for p in parts]) for k, e in enumerate(exits)}

    work = restrict_outputs(model, exits)
    make_batch_dynamic(work)
    chw = tuple(int(d) for d in in_shape[1:])
    pre = preprocess or Preprocess(size=(chw[-2], chw[-1]), channels=chw[0] if len(chw) == 3 else 1)
    return _export_graph(
        work, exits, out, name=name or path.stem, source="onnx", reference=reference, reference_kind="source",
        preprocess=pre, keep=keep, labels=labels, simplify=simplify, overwrite=overwrite,
        verify_batch=verify_batch, seed=seed, threads=threads, extra={"source_file": path.name},
    )


# --------------------------------------------------------------------------- the pipeline


def _export_graph(
    model: onnx.ModelProto,
    exit_names: Sequence[str],
    out: str | os.PathLike[str],
    *,
    name: str,
    source: str,
    reference: Reference,
    reference_kind: str,
    preprocess: Preprocess,
    keep: Sequence[int] | None,
    labels: str | os.PathLike[str] | Sequence[str] | None,
    simplify: bool,
    overwrite: bool,
    verify_batch: int,
    seed: int,
    threads: int | None,
    extra: Mapping[str, Any],
) -> ExportReport:
    onnx = require("onnx", purpose="ONNX export")
    out = Path(out)
    if os.path.lexists(out) and not overwrite:
        raise ExportError(f"{out} already exists (pass overwrite / --force to replace it)")
    check_destination(out, overwrite=overwrite)  # refuse a non-bundle, read-only or unwritable place now
    names_given = _read_labels(labels)  # read early: a bad labels file should not cost an export
    kept_idx = _kept(keep, len(exit_names))
    exits = tuple(exit_names[i] for i in kept_idx)
    model = restrict_outputs(model, exits)
    message("folding static shapes")
    model, fold = fold_static_shapes(model, threads=threads, seed=seed)
    simplified = None
    if simplify:
        model, simplified = simplify_graph(model, threads=threads)
    in_name, in_dtype, in_shape = input_info(model)
    message(f"cutting into {len(exits)} segments")
    plan, segments, specs = cut_model(model, exits, seed=seed, threads=threads)

    # verification: reference vs monolithic ONNX vs chained segments
    message("verifying the segments against the reference")
    x = random_input((verify_batch, *[int(d) for d in in_shape[1:]]), seed=seed, dtype=in_dtype)
    ref = {k: np.asarray(v) for k, v in reference(x).items()}
    mono = dict(zip(exits, ort_session(model, threads=threads).run(list(exits), {in_name: x}), strict=True))
    chain = run_chain(segments, {in_name: x}, threads=threads)
    rows = []
    num_classes = None
    for e in exits:
        r, m, c = ref[e], mono[e], chain[e]
        if r.shape != m.shape or m.shape != c.shape:
            raise ExportError(f"exit {e!r}: shapes differ (reference {r.shape}, onnx {m.shape}, segments {c.shape})")
        if r.ndim != 2:
            raise ExportError(f"exit {e!r} has shape {r.shape}; exits must be logits of shape [batch, classes]")
        if num_classes is None:
            num_classes = int(r.shape[1])
        elif r.shape[1] != num_classes:
            raise ExportError(f"exit {e!r} has {r.shape[1]} classes, the first exit {num_classes}")
        tol = ATOL * max(1.0, float(np.max(np.abs(r))) if r.size else 1.0)
        rows.append(VerifyRow(
            exit=e,
            reference_vs_onnx=_maxdiff(r, m),
            onnx_vs_segments=_maxdiff(m, c),
            reference_vs_segments=_maxdiff(r, c),
            top1_agreement=float(np.mean(np.argmax(r, 1) == np.argmax(c, 1))) if r.size else 1.0,
            tolerance=tol,
        ))
    stats = segment_stats(model, plan, segments, specs, in_name, in_shape, threads=threads)
    classes = _check_labels(names_given, num_classes or 0)
    report = ExportReport(
        out=out, model_name=name, source=source, reference=reference_kind, exits=exits,
        verify_batch=verify_batch, seed=seed, rows=tuple(rows), segments=stats, fold=fold,
        simplified=simplified, extra={"kept_exits": [i + 1 for i in kept_idx], "all_exits": list(exit_names)},
    )
    if not report.ok:
        raise ExportError("export verification failed (nothing written):\n" + report.render())

    seg_specs = []
    for s, st in zip(plan.segments, stats, strict=True):
        seg_specs.append(SegmentSpec(
            index=s.index, path=f"segments/seg{s.index}.onnx", exit=s.exit,
            inputs=tuple(specs[n] for n in s.inputs), outputs=tuple(specs[n] for n in s.outputs),
            live_after=s.live_after, params=st.params, flops=st.flops, carried_bytes=st.carried_bytes,
        ))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    entry = TargetEntry(
        target=TargetName.ONNXRUNTIME, precision=Precision.FP32, segments=tuple(s.path for s in seg_specs),
        monolithic="model.onnx", metadata={"onnxruntime": require("onnxruntime").__version__},
    )
    manifest = Manifest(
        model_name=name, source=source, opset=int(opset), input=specs[in_name],
        num_classes=int(num_classes or 0), preprocess=preprocess, segments=tuple(seg_specs),
        classes=classes, targets={entry.key: entry},
        extra={
            "export": {
                **dict(extra), **dict(report.extra), "onnx": onnx.__version__,
                "simplified": simplified, "verify_batch": verify_batch, "seed": seed,
                "nodes": len(model.graph.node), "moved_dq": list(plan.moved_dq),
                "flops_cumulative": list(report.cumulative_flops()),
                "verification": [dataclasses.asdict(r) for r in rows],
            }
        },
    )
    _write(out, overwrite, model, segments, manifest)
    return report


def _write(out: Path, overwrite: bool, model: onnx.ModelProto, segments: Sequence[onnx.ModelProto],
           manifest: Manifest) -> None:
    for m, what in [(model, "model.onnx"), *[(s, f"segment {i}") for i, s in enumerate(segments, 1)]]:
        if m.ByteSize() >= 2**31 - 1:
            raise ExportError(f"{what} is larger than 2 GB; ONNX external data is not supported by export yet")
    with write_bundle(out, overwrite=overwrite) as w:
        w.path(manifest.model_path).write_bytes(model.SerializeToString())
        for spec, seg in zip(manifest.segments, segments, strict=True):
            w.path(spec.path).write_bytes(seg.SerializeToString())
        if importlib.util.find_spec("edgeperceiver.runtime.standalone") is not None:
            standalone = importlib.import_module("edgeperceiver.runtime.standalone")
            standalone.install_standalone(w.dir)
        w.manifest = manifest


# --------------------------------------------------------------------------- helpers


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3 or any(not isinstance(d, (int, np.integer)) or d <= 0 for d in shape):
        raise InputError(f"input shape must be (C, H, W) positive integers, got {tuple(shape)}")
    return int(shape[0]), int(shape[1]), int(shape[2])


def _check_verify(verify_batch: int, opset: int) -> None:
    if verify_batch < 1:
        raise InputError(f"verify_batch must be >= 1, got {verify_batch}")
    if opset < 13:
        raise InputError(f"opset {opset} is too old: use 17 or newer (LayerNormalization needs 17)")


def _kept(keep: Sequence[int] | None, n: int) -> list[int]:
    if keep is None:
        return list(range(n))
    idx = [int(k) for k in keep]
    if not idx:
        raise InputError("exits: keep at least one exit")
    bad = [k for k in idx if not 1 <= k <= n]
    if bad:
        raise InputError(f"exits {bad} out of range: the model has exits 1..{n}")
    if any(b <= a for a, b in itertools.pairwise(idx)):
        raise InputError(f"exits must be strictly increasing, got {idx}")
    return [k - 1 for k in idx]


def _read_labels(labels: str | os.PathLike[str] | Sequence[str] | None) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, (str, os.PathLike)):
        p = Path(labels)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"labels file {p}: {exc}") from exc
        names = [line.strip() for line in text.splitlines()]
        while names and not names[-1]:
            names.pop()
    else:
        names = [str(x) for x in labels]
    return names


def _check_labels(names: list[str] | None, num_classes: int) -> tuple[str, ...] | None:
    if names is None:
        return None
    if len(names) != num_classes:
        raise InputError(f"labels: {len(names)} class names for a model with {num_classes} classes")
    return tuple(names)


def _maxdiff(a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0:
        return 0.0
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(np.max(np.where(np.isnan(d), np.inf, d)))
