"""A one-screen summary of a zoo model: flags, parameters and the cost of each exit."""

from __future__ import annotations

from typing import Any


def model_summary(name: str, *, input_size: int | None = None) -> dict[str, Any]:
    """Parameters and cumulative multiply-accumulates to each exit of registry model ``name``."""
    from .models import count_flops, create_model, model_info

    info = model_info(name)
    flags = {"input_size": input_size} if input_size else {}
    model = create_model(name, **flags)
    size = input_size or info.input_size
    macs = count_flops(model, size)
    return {
        "model": name,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "input_size": int(size),
        "num_classes": int(info.num_classes),
        "flags": dict(info.flags),
        "exits": [
            {"exit": k, "output": exit_name, "gmacs": m / 1e9, "share": m / macs[-1]}
            for k, (exit_name, m) in enumerate(zip(info.exit_names, macs, strict=True), start=1)
        ],
    }


def summarize(name: str, *, input_size: int | None = None) -> str:
    """:func:`model_summary` as text."""
    s = model_summary(name, input_size=input_size)
    size = s["input_size"]
    lines = [
        f"{name}: {s['parameters'] / 1e6:.2f} M parameters, input 3x{size}x{size}, {s['num_classes']} classes",
        "flags: " + ", ".join(f"{k}={v}" for k, v in s["flags"].items()),
        f"{'exit':<6}{'output':<10}{'GMACs':>9}{'share':>8}",
    ]
    for e in s["exits"]:
        lines.append(f"{e['exit']:<6}{e['output']:<10}{e['gmacs']:>9.3f}{e['share']:>8.2f}")
    return "\n".join(lines)
