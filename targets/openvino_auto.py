"""Precision chosen by measurement on the target: the gate on every exit's agreement with FP32, then speed.

Used twice: for an INT8 build's float parts (``float_precision="auto"``: f32 or bf16 for the
whole chain) and for ``--precision auto`` (per segment the fastest of fp32 / bf16 / int8 /
int8 with bf16 float parts). Every candidate runs through the runtime's own sessions
(:class:`~targets.openvino_chains.Chain`): its agreement with FP32 on the calibration images
and, in one interleaved loop, its batch-1 time per segment.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeperceiver.bundle import Manifest
from edgeperceiver.runtime.openvino import OpenVINOBackend

from . import openvino_select as select
from .openvino_chains import Candidate, Chain, time_chains


@dataclass
class Choice:
    """What was chosen, the chains built on the way (reusable by the report), and why."""

    candidate: Candidate
    chain: Chain
    metadata: dict[str, Any]


def measure(
    backend: OpenVINOBackend,
    manifest: Manifest,
    fp32: Chain,
    candidates: Mapping[str, Candidate],
    images: np.ndarray,
    *,
    runs: int,
) -> tuple[dict[str, Chain], dict[str, tuple[float, ...]], dict[str, list[float]], list[np.ndarray]]:
    """Every candidate's chain, its median ms per segment (one loop), its per-exit agreement, and
    FP32's logits on ``images``."""
    ref = fp32.exits(images)
    chains: dict[str, Chain] = {}
    agree: dict[str, list[float]] = {}
    for name, cand in candidates.items():
        chains[name] = fp32 if cand is fp32.candidate else Chain(backend, manifest, cand)
        got = ref if chains[name] is fp32 else chains[name].exits(images)
        agree[name] = [float(np.mean(r.argmax(1) == g.argmax(1))) for r, g in zip(ref, got, strict=True)]
    x = np.random.default_rng(0).standard_normal((1, *manifest.input.shape[1:])).astype(np.float32)  # type: ignore[arg-type]
    seg_ms, _ = time_chains(chains, x, runs=runs)
    return chains, seg_ms, agree, ref


def choose_uniform(
    backend: OpenVINOBackend,
    manifest: Manifest,
    fp32: Chain,
    candidates: Mapping[str, Candidate],
    images: np.ndarray,
    *,
    fallback: str,
    runs: int = 12,
    gate_points: float = select.GATE_POINTS,
    log: Callable[[str], None],
) -> Choice:
    """The fastest whole chain among ``candidates`` within the gate at every exit."""
    chains, seg_ms, agree, _ = measure(backend, manifest, fp32, candidates, images, runs=runs)
    name = select.fastest_passing(seg_ms, agree, gate_points=gate_points, fallback=fallback)
    _log_table(log, seg_ms, agree, gate_points, images.shape[0])
    log(f"  chosen: {name}")
    meta = {**select.describe(seg_ms, agree, gate_points), "images": int(images.shape[0]), "chosen": name}
    return Choice(candidates[name], chains[name], meta)


def choose_per_segment(
    backend: OpenVINOBackend,
    manifest: Manifest,
    fp32: Chain,
    candidates: Mapping[str, Candidate],
    images: np.ndarray,
    *,
    runs: int = 12,
    gate_points: float = select.GATE_POINTS,
    log: Callable[[str], None],
) -> Choice:
    """Per segment the fastest candidate within the gate; the mixed chain is checked again on
    every exit, and the fastest uniform chain within the gate replaces it if it fails."""
    chains, seg_ms, agree, ref = measure(backend, manifest, fp32, candidates, images, runs=runs)
    _log_table(log, seg_ms, agree, gate_points, images.shape[0])
    picks = select.per_segment(seg_ms, agree, gate_points=gate_points, fallback="fp32")
    meta: dict[str, Any] = {**select.describe(seg_ms, agree, gate_points), "images": int(images.shape[0]),
                            "per_segment": picks}
    if len(set(picks)) == 1:
        chosen, chain = candidates[picks[0]], chains[picks[0]]
    else:
        chosen = fp32.candidate.pick("auto", candidates, picks)
        chain = Chain(backend, manifest, chosen)
        got = chain.exits(images)
        mixed = [float(np.mean(r.argmax(1) == g.argmax(1))) for r, g in zip(ref, got, strict=True)]
        meta["mixed_top1_agreement"] = [round(a, 4) for a in mixed]
        if not all(select.passes(mixed, gate_points)):
            name = select.fastest_passing(seg_ms, agree, gate_points=gate_points, fallback="fp32")
            log(f"  the mixed chain {picks} leaves the gate ({mixed}); taking {name} for every segment")
            picks = [name] * len(picks)
            chosen, chain = candidates[name], chains[name]
            meta["per_segment"] = picks
    # from the recorded (rounded) segment times, so the metadata adds up as it reads
    est = sum(meta["candidates"][p]["segment_ms"][k] for k, p in enumerate(picks))
    meta["estimated_ms"] = round(est, 3)
    log(f"  chosen per segment: {' / '.join(picks)} (~{est:.2f} ms from the loop above; fp32 "
        f"{sum(seg_ms['fp32']):.2f} ms)" if "fp32" in seg_ms else f"  chosen per segment: {' / '.join(picks)}")
    return Choice(chosen, chain, meta)


def _log_table(
    log: Callable[[str], None], seg_ms: Mapping[str, tuple[float, ...]], agree: Mapping[str, list[float]],
    gate_points: float, images: int,
) -> None:
    log(f"  candidates (batch-1 ms per segment, one interleaved loop; top-1 agreement with fp32 per exit on "
        f"{images} calibration images, gate {gate_points} points):")
    for name, ms in seg_ms.items():
        ok = select.passes(agree[name], gate_points)
        log(f"    {name:10s} " + " / ".join(f"{v:.2f}" for v in ms) + f" = {sum(ms):.2f} ms; agreement "
            + " / ".join(f"{a:.1%}{'' if o else '!'}" for a, o in zip(agree[name], ok, strict=True)))
