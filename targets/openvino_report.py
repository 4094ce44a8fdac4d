"""The OpenVINO compile report: per-exit agreement with FP32 and batch-1 latencies, through the runtime."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from edgeperceiver.bundle import Manifest
from edgeperceiver.quantize import agreement_lines, exit_agreement
from edgeperceiver.runtime.openvino import OpenVINOBackend

from .openvino_chains import Chain, time_chains


def agreement(fp32: Chain, built: Chain, images: np.ndarray, manifest: Manifest) -> list[dict[str, Any]]:
    """Per exit: top-1 agreement and max |logit diff| of ``built`` against ``fp32`` on ``images``."""
    return exit_agreement(fp32.exits(images), built.exits(images), manifest.exits)


def report(
    backend: OpenVINOBackend,
    manifest: Manifest,
    fp32: Chain,
    built: Chain,
    mono: Any,
    calib: np.ndarray | None,
    *,
    hint: str,
    label: str,
    report_samples: int,
    latency_runs: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Agreement with FP32 per exit (on the calibration images) and batch-1 latencies.

    ``built`` is the chain as shipped; ``fp32`` is the FP32 chain (the same object when the
    build is FP32); ``mono`` the monolithic model at ``hint`` (or None).
    """
    out: dict[str, Any] = {}
    same = built is fp32
    if calib is not None and report_samples > 0 and not same:
        images = calib[:report_samples]
        per_exit = agreement(fp32, built, images, manifest)
        for line in agreement_lines(per_exit):
            log(line)
        out["agreement"] = {"images": int(images.shape[0]), "reference": "openvino-f32", "exits": per_exit}
    if latency_runs <= 0:
        return out
    x = np.random.default_rng(0).standard_normal((1, *manifest.input.shape[1:])).astype(np.float32)  # type: ignore[arg-type]
    chains = {"build": built} if same else {"build": built, "fp32": fp32}
    mono_call = None
    if mono is not None:
        m = mono.clone()
        m.reshape({manifest.input.name: [1, *manifest.input.shape[1:]]})
        req = backend.core.compile_model(m, backend.config.device,
                                         backend.config.compile_properties(hint)).create_infer_request()
        mono_call = partial(req.infer, {manifest.input.name: x})
    seg_ms, mono_ms = time_chains(chains, x, runs=latency_runs, mono=mono_call)
    lat = seg_ms["build"]
    cumulative = list(np.cumsum(lat))
    out["segment_ms"] = [round(v, 3) for v in lat]
    out["cumulative_ms"] = [round(float(v), 3) for v in cumulative]
    for k, (s, c) in enumerate(zip(lat, cumulative, strict=True), start=1):
        log(f"  segment {k}: {s:.2f} ms (to exit {k}: {c:.2f} ms)")
    if mono_ms is not None:
        out["monolithic_ms"] = round(mono_ms, 3)
        out["cut_overhead"] = round(float(cumulative[-1]) / mono_ms - 1.0, 4)
        log(f"  monolithic: {mono_ms:.2f} ms; the segments back to back cost {out['cut_overhead']:+.1%}")
    if "fp32" in seg_ms:
        fp32_cum = np.cumsum(seg_ms["fp32"])
        out["fp32_cumulative_ms"] = [round(float(v), 3) for v in fp32_cum]
        out["speedup_vs_fp32"] = [round(float(r / c), 3) for r, c in zip(fp32_cum, cumulative, strict=True)]
        log(f"  vs the FP32 segments (same loop): {out['speedup_vs_fp32'][-1]:.2f}x to the last exit "
            f"({fp32_cum[-1]:.2f} vs {cumulative[-1]:.2f} ms), to each exit "
            + " / ".join(f"{v:.2f}x" for v in out["speedup_vs_fp32"]))
        slower = [str(k) for k, v in enumerate(out["speedup_vs_fp32"], start=1) if v < 1.0]
        if slower:
            where = "every exit" if len(slower) == len(cumulative) else "exit " + ", ".join(slower)
            if label == "auto":  # chosen segment by segment in an earlier loop: this one disagrees
                log(f"  note: this loop measured the chosen segments slower than FP32 to {where} (the two "
                    "loops differ by the machine's noise)")
            else:
                log(f"  note: {label} is slower than FP32 to {where} on this CPU (typical of small layers, where "
                    "per-node overhead outweighs the kernels); --precision fp32 or auto may serve better")
    out["latency_threads"] = backend.config.threads
    return out
