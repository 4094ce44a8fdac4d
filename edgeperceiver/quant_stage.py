"""The quantization stage of a bundle: one QDQ multi-exit graph, cut like the FP32 segments.

Every target that consumes explicit quantization reads the same stage (ONNX Runtime INT8
runs its segments, TensorRT INT8 builds engines from them after the signed-INT8 pass), so
all of them see the same quantizers. :func:`ensure_quantized` makes the stage (NNCF on the
whole graph, see :func:`edgeperceiver.quantize.qdq_segments`) or reuses the one the bundle
has when the quantizer settings and calibration images are the same; it is recorded in the
manifest as :class:`~edgeperceiver.bundle.QuantizedGraph` with the tool, preset, settings
and the sha256 of the calibration images.

Before it is kept, every exit of each graph the consumers run (the stage as ONNX Runtime
runs it, its signed-INT8 form with fp32 outside Q/DQ as weakly typed TensorRT builds it,
and with fp16 outside Q/DQ as strongly typed TensorRT builds it) is checked against FP32
on the calibration images; where one misses the gate, NNCF runs again with more of the
graph in float (:func:`edgeperceiver.quant_ladder.climb`). The attempts and the chosen
rung are recorded under ``config["gate"]``. Files go to ``quantized-<key>/`` (the key hashes
the settings, the images and the FP32 graph), so a new stage never overwrites files an
existing target entry still reads.

The other branch: OpenVINO INT8 by default quantizes each OpenVINO segment with NNCF on
calibration inputs made by the earlier segments (``targets/openvino_quantize.py``,
``method=segment``); its ``method=qdq`` quantizes the whole graph the same way
(:func:`edgeperceiver.quantize.qdq_segments`) but does not record it as this stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import numpy as np

from ._optional import require
from .accuracy_gate import agreement, margin_changes
from .bundle import BundleWriter, Manifest, QuantizedGraph, sha256_file
from .errors import BundleError, EdgePerceiverError, TargetError
from .quant_ladder import Verdict, climb
from .quantize import QuantizeConfig, check_calibration, qdq_segments

STAGE_PREFIX = "quantized-"


def calibration_sha256(calib: np.ndarray) -> str:
    """sha256 of the calibration images (shape, dtype and float32 bytes)."""
    x = np.ascontiguousarray(calib, dtype=np.float32)
    h = hashlib.sha256(f"{x.shape}|float32|".encode())
    h.update(x.tobytes())
    return h.hexdigest()


def stage_key(config: QuantizeConfig, calib_sha: str, model_sha: str) -> str:
    """The stage's identity: quantizer settings, calibration images and FP32 graph."""
    text = json.dumps({"config": config.describe(), "calib": calib_sha, "model": model_sha}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def ensure_quantized(
    writer: BundleWriter,
    calib: np.ndarray,
    config: QuantizeConfig,
    *,
    log: Callable[[str], None] | None = None,
) -> QuantizedGraph:
    """The bundle's quantization stage for ``config`` and ``calib``, made now unless already there.

    Sets ``writer.manifest`` to a manifest that records the stage (the staged bundle is
    only swapped in when the whole edit succeeds).
    """
    manifest = writer.manifest
    if manifest is None:
        raise BundleError("internal: the quantization stage needs the bundle's manifest")
    calib = check_calibration(calib, manifest.input.shape)
    calib_sha = calibration_sha256(calib)
    model_sha = sha256_file(writer.dir / manifest.model_path)
    key = stage_key(config, calib_sha, model_sha)
    folder = f"{STAGE_PREFIX}{key}"
    have = manifest.quantization
    if have is not None and have.model == f"{folder}/model.onnx" and (writer.dir / have.model).is_file():
        if log is not None:
            log(f"quantization stage {folder} reused (same settings and calibration images)")
        return have
    if log is not None:
        log(f"quantizing INT8 (QDQ, whole graph, NNCF preset {config.preset}) on {calib.shape[0]} images ...")
    model_path = writer.dir / manifest.model_path
    exits = list(manifest.exits)
    reference = run_exits(_load(model_path), calib, manifest.input.name, exits)

    def build(cfg: QuantizeConfig) -> tuple[tuple[Any, list[Any]], Verdict]:
        qmodel, segs = qdq_segments(model_path, manifest, calib, cfg)
        runs = [run_exits(g, calib, manifest.input.name, exits) for g in consumer_graphs(qmodel)]
        agree = [min(a) for a in zip(*(agreement(reference, r) for r in runs), strict=True)]
        change = [max(c) for c in zip(*(margin_changes(reference, r) for r in runs), strict=True)]
        return (qmodel, segs), Verdict(agree, change)

    (qmodel, segs), chosen, gate = climb(config, build, gate_points=config.ladder_gate, images=int(calib.shape[0]),
                                         max_margin_change=config.ladder_max_margin_change, log=log)
    rels = []
    for k, seg in enumerate(segs, start=1):
        rel = f"{folder}/seg{k}.onnx"
        writer.replace_file(rel, seg.SerializeToString())
        rels.append(rel)
    writer.replace_file(f"{folder}/model.onnx", qmodel.SerializeToString())
    nncf = require("nncf", purpose="INT8 quantization")
    stage = QuantizedGraph(
        model=f"{folder}/model.onnx", segments=tuple(rels), tool=f"nncf {nncf.__version__}",
        preset=config.preset, calibration_sha256=calib_sha, calibration_images=int(calib.shape[0]),
        config={**chosen.describe(), "gate": gate},
    )
    writer.manifest = dataclasses.replace(manifest, quantization=stage)
    return stage


def consumer_graphs(qmodel: Any) -> list[Any]:
    """The graphs the stage's consumers run: as is (ONNX Runtime), signed INT8 with fp32 outside
    Q/DQ (weakly typed TensorRT) and with fp16 outside Q/DQ (strongly typed TensorRT)."""
    from .passes.fp16 import cast_to_fp16
    from .passes.opset import upgrade_opset
    from .passes.qdq_signed import unsigned_to_signed

    signed, _ = unsigned_to_signed(qmodel)
    graphs = [qmodel, signed]
    # an opset too old for float16 Q/DQ: TensorRT's preparation refuses it with a clear message
    with contextlib.suppress(EdgePerceiverError):
        graphs.append(cast_to_fp16(upgrade_opset(signed, 19), qdq=True)[0])
    return graphs


def _load(path: Any) -> Any:
    from .onnx_utils import load_model

    return load_model(str(path))


def run_exits(model: Any, x: np.ndarray, input_name: str, exits: list[str], batch: int = 64) -> list[np.ndarray]:
    """``model``'s exits on ``x`` in ONNX Runtime (CPU)."""
    ort = require("onnxruntime", purpose="checking the INT8 graph against FP32")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    parts = [sess.run(exits, {input_name: x[i : i + batch]}) for i in range(0, x.shape[0], batch)]
    return [np.concatenate([np.asarray(p[k], dtype=np.float32) for p in parts]) for k in range(len(exits))]


def require_stage(manifest: Manifest, *, for_what: str) -> QuantizedGraph:
    """The bundle's quantization stage, or :class:`TargetError` saying how to make it."""
    if manifest.quantization is None:
        raise TargetError(
            f"{for_what} is built from the bundle's quantized (QDQ) graph, and this bundle has none yet. "
            "Pass INT8 calibration images to make it: edgeperceiver compile BUNDLE --target tensorrt "
            "--precision int8 --calib-data DIR (or quantize once with --target onnxruntime --precision int8 "
            "--calib-data DIR; every Q/DQ target then reads the same graph)"
        )
    return manifest.quantization
