"""Simplify an exported graph: onnxslim when installed, else ONNX Runtime's basic rewrites."""

from __future__ import annotations

import importlib
import importlib.util
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .._optional import require
from ..errors import ExportError
from .shapes import eliminate_dead, make_batch_dynamic

if TYPE_CHECKING:  # pragma: no cover
    import onnx


def simplify_graph(model: onnx.ModelProto, *, threads: int | None) -> tuple[onnx.ModelProto, str]:
    """onnxslim when installed, else ONNX Runtime's provider-independent (basic) offline rewrites."""
    onnx = require("onnx", purpose="ONNX export")
    if importlib.util.find_spec("onnxslim") is not None:
        onnxslim = importlib.import_module("onnxslim")
        try:
            slim = onnxslim.slim(model)
        except Exception as exc:  # a third-party simplifier
            raise ExportError(f"onnxslim failed: {type(exc).__name__}: {exc}") from exc
        return slim, f"onnxslim {getattr(onnxslim, '__version__', '')}".strip()
    ort = require("onnxruntime", purpose="simplifying ONNX models")
    with tempfile.TemporaryDirectory(prefix="edgeperceiver-simplify-") as tmp:
        path = Path(tmp) / "basic.onnx"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(path)
        if threads:
            opts.intra_op_num_threads = threads
        try:
            ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own exception classes
            raise ExportError(f"ONNX Runtime could not simplify the model: {exc}") from exc
        slim = onnx.load(str(path))
    make_batch_dynamic(slim)
    eliminate_dead(slim)
    return slim, f"onnxruntime {ort.__version__} basic graph rewrites"
