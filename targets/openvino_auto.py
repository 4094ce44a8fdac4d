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

from edgeperceiver.accuracy_gate import GATE_POINTS, MAX_MARGIN_CHANGE, agreement, margin_changes, passes
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


@dataclass
class Measured:
    """Every candidate's chain, median ms per segment (one loop), per-exit top-1 agreement and
    margin change against FP32, and FP32's logits on the calibration images."""

    chains: dict[str, Chain]
    seg_ms: dict[str, tuple[float, ...]]
    agree: dict[str, list[float]]
    margin_change: dict[str, list[float]]
    ref: list[np.ndarray]


def measure(
    backend: OpenVINOBackend,
    manifest: Manifest,
    fp32: Chain,
    candidates: Mapping[str, Candidate],
    images: np.ndarray,
    *,
    runs: int,
) -> Measured:
    """Build, check and time every candidate (see :class:`Measured`)."""
    ref = fp32.exits(images)
    chains: dict[str, Chain] = {}
    agree: dict[str, list[float]] = {}
    change: dict[str, list[float]] = {}
    for name, cand in candidates.items():
        chains[name] = fp32 if cand is fp32.candidate else Chain(backend, manifest, cand)
        got = ref if chains[name] is fp32 else chains[name].exits(images)
        agree[name], change[name] = agreement(ref, got), margin_changes(ref, got)
    x = np.random.default_rng(0).standard_normal((1, *manifest.input.shape[1:])).astype(np.float32)  # type: ignore[arg-type]
    seg_ms, _ = time_chains(chains, x, runs=runs)
    return Measured(chains, seg_ms, agree, change, ref)


def choose_uniform(
    backend: OpenVINOBackend,
    manifest: Manifest,
    fp32: Chain,
    candidates: Mapping[str, Candidate],
    images: np.ndarray,
    *,
    fallback: str,
    runs: int = 12,
    gate_points: float = GATE_POINTS,
    max_margin_change: float = MAX_MARGIN_CHANGE,
    log: Callable[[str], None],
) -> Choice:
    """The fastest whole chain among ``candidates`` within the gate at every exit (ties: see
    :func:`~targets.openvino_select.fastest`)."""
    got = measure(backend, manifest, fp32, candidates, images, runs=runs)
    chains, seg_ms, agree = got.chains, got.seg_ms, got.agree
    name = select.fastest_passing(seg_ms, agree, gate_points=gate_points, fallback=fallback,
                                  margin_change=got.margin_change, max_change=max_margin_change)
    _log_table(log, got, gate_points, max_margin_change, images.shape[0])
    log(f"  chosen: {name}")
    meta = {**select.describe(seg_ms, agree, gate_points, got.margin_change, max_margin_change),
            "images": int(images.shape[0]), "chosen": name}
    return Choice(candidates[name], chains[name], meta)


def choose_per_segment(
    backend: OpenVINOBackend,
    manifest: Manifest,
    fp32: Chain,
    candidates: Mapping[str, Candidate],
    images: np.ndarray,
    *,
    runs: int = 12,
    gate_points: float = GATE_POINTS,
    max_margin_change: float = MAX_MARGIN_CHANGE,
    log: Callable[[str], None],
) -> Choice:
    """Per segment the fastest candidate within the gate (of those tied on time, the one that
    changes FP32's margins least); the mixed chain is checked again on every exit, and the
    fastest uniform chain within the gate replaces it if it fails."""
    got = measure(backend, manifest, fp32, candidates, images, runs=runs)
    chains, seg_ms, agree, ref = got.chains, got.seg_ms, got.agree, got.ref
    _log_table(log, got, gate_points, max_margin_change, images.shape[0])
    picks = select.per_segment(seg_ms, agree, gate_points=gate_points, fallback="fp32",
                               margin_change=got.margin_change, max_change=max_margin_change)
    meta: dict[str, Any] = {**select.describe(seg_ms, agree, gate_points, got.margin_change, max_margin_change),
                            "images": int(images.shape[0]), "per_segment": picks}
    if len(set(picks)) == 1:
        chosen, chain = candidates[picks[0]], chains[picks[0]]
    else:
        chosen = fp32.candidate.pick("auto", candidates, picks)
        chain = Chain(backend, manifest, chosen)
        logits = chain.exits(images)
        mixed, change = agreement(ref, logits), margin_changes(ref, logits)
        meta["mixed_top1_agreement"] = [round(a, 4) for a in mixed]
        meta["mixed_margin_change"] = [round(c, 4) for c in change]
        if not all(passes(mixed, gate_points, change, max_margin_change)):
            name = select.fastest_passing(seg_ms, agree, gate_points=gate_points, fallback="fp32",
                                          margin_change=got.margin_change, max_change=max_margin_change)
            shown = " / ".join(f"{a:.1%} {c:.3f}" for a, c in zip(mixed, change, strict=True))
            log(f"  the mixed chain {' / '.join(picks)} leaves the gate (agreement and margin change per exit "
                f"{shown}); taking {name} for every segment")
            picks = [name] * len(picks)
            chosen, chain = candidates[name], chains[name]
            meta["per_segment"] = picks
    # from the recorded (rounded) segment times, so the metadata adds up as it reads
    est = sum(meta["candidates"][p]["segment_ms"][k] for k, p in enumerate(picks))
    meta["estimated_ms"] = round(est, 3)
    log(f"  chosen per segment: {' / '.join(picks)} (~{est:.2f} ms from the loop above; fp32 "
        f"{sum(seg_ms['fp32']):.2f} ms)" if "fp32" in seg_ms else f"  chosen per segment: {' / '.join(picks)}")
    return Choice(chosen, chain, meta)


def _log_table(log: Callable[[str], None], got: Measured, gate_points: float, max_change: float, images: int) -> None:
    log(f"  candidates (batch-1 ms per segment, one interleaved loop; top-1 agreement with fp32 and margin "
        f"change per exit on {images} calibration images, gate {gate_points} points and {max_change}):")
    for name, ms in got.seg_ms.items():
        agree, change = got.agree[name], got.margin_change[name]
        ok = passes(agree, gate_points, change, max_change)
        log(f"    {name:10s} " + " / ".join(f"{v:.2f}" for v in ms) + f" = {sum(ms):.2f} ms; agreement "
            + " / ".join(f"{a:.1%} {c:.3f}{'' if o else '!'}" for a, c, o in zip(agree, change, ok, strict=True)))
