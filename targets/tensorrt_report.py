"""Timing caches and the build report of a TensorRT compile."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeperceiver.bundle import BundleWriter
from edgeperceiver.fsutil import cache_root
from edgeperceiver.runtime.tensorrt_device import DeviceFacts
from edgeperceiver.runtime.tensorrt_log import BuildLog


def cache_file_name(facts: DeviceFacts) -> str:
    """Timing-cache file name for one GPU model and TensorRT version."""
    cc = f"sm{facts.compute_capability[0]}{facts.compute_capability[1]}"
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", facts.gpu_name).strip("-").lower() or "gpu"
    return f"{gpu}-{cc}-trt{facts.tensorrt_version}.cache"


def user_cache_dir(setting: str | None) -> Path | None:
    """The user timing-cache directory (None when disabled with ``timing_cache=none``).

    Default: ``tensorrt/`` under the one cache root (:func:`edgeperceiver.fsutil.cache_root`).
    """
    if setting is not None and setting.strip().lower() in ("none", "off", "false", "0", ""):
        return None
    if setting is not None:
        return Path(setting).expanduser()
    return cache_root() / "tensorrt"


def initial_cache(writer: BundleWriter, bundle_rel: str, user_cache: Path | None) -> bytes:
    """Timing-cache bytes to start from: the user cache for this GPU, else the bundle's."""
    for path in (user_cache, writer.dir / bundle_rel):
        if path is not None and path.is_file():
            try:
                return path.read_bytes()
            except OSError:
                continue
    return b""


def build_report(metadata: Mapping[str, Any], log: BuildLog, *, max_messages: int = 8) -> str:
    """A short human-readable summary of a build (printed by the CLI, kept in the manifest)."""
    lines = [
        f"TensorRT {metadata['tensorrt_version']} on {metadata['gpu_name']} (sm {metadata['compute_capability']}, "
        f"{metadata.get('platform') or 'unknown platform'}): {metadata['precision']} engines, "
        f"{metadata['typing']}ly typed, from {metadata['source']}",
        f"batch profile 1 / {metadata['opt_batch']} / {metadata['max_batch']}; timing cache "
        f"{metadata.get('timing_cache') or 'none'}; log {metadata['build_log']}",
    ]
    if metadata.get("dla_core") is not None:
        lines.append(f"DLA core {metadata['dla_core']} with GPU fallback")
    for k, (secs, fp32) in enumerate(zip(metadata["build_seconds"], metadata["fp32_layers"], strict=True), start=1):
        inputs = ", ".join(f"{n}{v['max'][1:]}" for n, v in metadata["profiles"][k - 1].items())
        extra = f", {fp32} layers pinned to fp32" if fp32 else ""
        lines.append(f"  segment {k}: {secs:.1f} s{extra}; inputs {inputs}")
    counts = metadata.get("log_counts") or {}
    if counts:
        lines.append("TensorRT messages: " + ", ".join(f"{n} {c}" for n, c in sorted(counts.items())))
    shown = [(sev, msg) for sev, msg in log.records if sev in ("WARNING", "ERROR", "INTERNAL_ERROR")]
    for sev, msg in shown[:max_messages]:
        lines.append(f"  [{sev}] {msg[:200]}")
    if len(shown) > max_messages:
        lines.append(f"  ... {len(shown) - max_messages} more in {metadata['build_log']}")
    return "\n".join(lines)
