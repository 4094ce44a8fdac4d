"""OpenVINO INT8: quantize every segment (NNCF per segment, or the shared QDQ graph cut into segments)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeperceiver._optional import require
from edgeperceiver.accuracy_gate import agreement, margin_changes
from edgeperceiver.bundle import BATCH, BundleWriter, Manifest, SegmentSpec
from edgeperceiver.passes.openvino_group_conv import per_channel_group_conv_weights
from edgeperceiver.quant_ladder import Verdict, climb
from edgeperceiver.quantize import QuantizeConfig, nncf_quantize
from edgeperceiver.runtime.openvino import OpenVINOBackend

from .openvino_chains import Candidate, Chain
from .openvino_ir import read


def qdq_models(
    core: Any, writer: BundleWriter, manifest: Manifest, calib: np.ndarray, config: QuantizeConfig
) -> tuple[list[Any], Any]:
    """Quantize model.onnx as one QDQ graph, cut it, and read every QDQ segment into OpenVINO."""
    from edgeperceiver.quantize import qdq_segments

    onnx = require("onnx", purpose="INT8 QDQ quantization")
    qmodel, segs = qdq_segments(writer.dir / manifest.model_path, manifest, calib, config)
    with tempfile.TemporaryDirectory(prefix="ep-ov-") as tmp:
        models = []
        for k, seg in enumerate(segs, start=1):
            p = Path(tmp) / f"seg{k}.onnx"
            onnx.save(seg, str(p))
            models.append(read(core, p))
        p = Path(tmp) / "model.onnx"
        onnx.save(qmodel, str(p))
        mono = read(core, p)
    return models, mono


def segment_quantize(
    backend: OpenVINOBackend,
    fp32_models: Sequence[Any],
    manifest: Manifest,
    calib: np.ndarray,
    config: QuantizeConfig,
    *,
    gate_images: np.ndarray | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[list[Any], dict[str, Any]]:
    """NNCF on each OpenVINO segment, calibrated on the inputs the earlier FP32 segments make
    (run through the runtime's sessions), kept within the accuracy gate by the ladder.

    The quantized chain runs on this CPU with f32 float parts, and every exit is compared
    with FP32 on ``gate_images`` (default: ``calib``); where an exit misses the gate
    (``config.ladder_gate`` points of agreement, ``config.ladder_max_margin_change``), NNCF runs again
    with more of each segment in float (:func:`edgeperceiver.quant_ladder.climb`). Returns the
    segments and the ladder's metadata.
    """
    n = len(fp32_models)
    fp32 = Chain(backend, manifest, Candidate("fp32", fp32_models, ["fp32"] * n, ["f32"] * n))
    per_image = fp32.carried(calib)
    images = calib if gate_images is None else gate_images
    reference = fp32.exits(images)

    def build(cfg: QuantizeConfig) -> tuple[list[Any], Verdict]:
        quantized = []
        for spec, model in zip(manifest.segments, fp32_models, strict=True):
            feeds = [{t.name: live[t.name] for t in spec.inputs} for live in per_image]
            q = nncf_quantize(reshaped(model, spec, 1), feeds, cfg, exits=(spec.exit,))
            per_channel_group_conv_weights(q)
            quantized.append(q)
        chain = Chain(backend, manifest, Candidate("int8", quantized, ["int8"] * n, ["f32"] * n))
        got = chain.exits(images)
        return quantized, Verdict(agreement(reference, got), margin_changes(reference, got))

    models, _, meta = climb(config, build, gate_points=config.ladder_gate, images=int(images.shape[0]),
                            max_margin_change=config.ladder_max_margin_change, log=log)
    return models, meta


def reshaped(model: Any, spec: SegmentSpec, batch: int) -> Any:
    m = model.clone()
    m.reshape({t.name: [batch if d == BATCH else int(d) for d in t.shape] for t in spec.inputs})
    return m
