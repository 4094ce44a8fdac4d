"""OpenVINO IR files of a bundle: read (with the graph rewrites), save, check against the manifest."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgeperceiver._optional import require
from edgeperceiver.bundle import BundleWriter, SegmentSpec
from edgeperceiver.errors import TargetError
from edgeperceiver.passes.openvino_fuse import fuse_projections
from edgeperceiver.passes.openvino_norms import fold_norm_affine
from edgeperceiver.progress import message


def read(core: Any, path: Path) -> Any:
    try:
        return core.read_model(str(path))
    except RuntimeError as exc:
        raise TargetError(f"OpenVINO cannot read {path.name}: {exc}") from exc


def read_fp32(core: Any, path: Path, *, fold_norms: bool, fuse: bool) -> tuple[Any, dict[str, int]]:
    """An FP32 ONNX model as an OpenVINO model with the rewrites asked for (and their counts)."""
    model = read(core, path)
    folded = fold_norm_affine(model) if fold_norms else 0
    fused = fuse_projections(model) if fuse else 0
    return model, {"folded_norms": folded, "fused_projections": fused}


def save_ir(model: Any, writer: BundleWriter, rel: str) -> None:
    """Write ``rel`` (.xml) and its .bin as new files (FP32 weights), then move them into place.

    Inputs get a dynamic batch axis again (NNCF quantized a batch-1 copy); the runtime
    reshapes to each batch size it uses.
    """
    ov = require("openvino", purpose="compiling for OpenVINO")
    shapes = {}
    for p in model.inputs:
        ps = p.get_partial_shape()
        if ps.rank.is_static and len(ps) > 0 and ps[0].is_static:
            ps[0] = ov.Dimension()
            shapes[p.get_any_name()] = ps
    if shapes:
        with contextlib.suppress(RuntimeError):  # a graph that cannot take one keeps its static batch
            model.reshape(shapes)
    dest = writer.path(rel)
    tmp = Path(tempfile.mkdtemp(prefix=".ir-", dir=dest.parent))
    try:
        ov.save_model(model, str(tmp / dest.name), compress_to_fp16=False)
        for p in tmp.iterdir():
            os.replace(p, dest.parent / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_interface(model: Any, spec: SegmentSpec) -> None:
    have_in = {n for p in model.inputs for n in p.get_names()}
    have_out = {n for p in model.outputs for n in p.get_names()}
    missing = [t.name for t in spec.inputs if t.name not in have_in]
    missing += [t.name for t in spec.outputs if t.name not in have_out]
    if missing:
        raise TargetError(f"segment {spec.index}: the OpenVINO model lacks the bundle's tensors {missing}")


def has_bf16(core: Any) -> bool:
    """Does the CPU run bf16 natively (OpenVINO's ``OPTIMIZATION_CAPABILITIES``)?"""
    try:
        return "BF16" in [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    except RuntimeError:
        return False


class Log:
    """Keeps the report lines (the entry's ``metadata["report"]``) and reports each as it comes."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, msg: str) -> None:
        self.lines.append(msg.strip())
        message(msg)
