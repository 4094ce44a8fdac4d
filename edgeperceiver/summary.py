"""A one-screen summary of a zoo model: flags, parameters and the cost of each exit."""

from __future__ import annotations


def summarize(name: str, *, input_size: int | None = None) -> str:
    """Parameters and cumulative multiply-accumulates to each exit of registry model ``name``."""
    from .models import count_flops, create_model, model_info

    info = model_info(name)
    flags = {"input_size": input_size} if input_size else {}
    model = create_model(name, **flags)
    size = input_size or info.input_size
    macs = count_flops(model, size)
    params = sum(p.numel() for p in model.parameters())
    lines = [
        f"{name}: {params / 1e6:.2f} M parameters, input 3x{size}x{size}, {info.num_classes} classes",
        "flags: " + ", ".join(f"{k}={v}" for k, v in info.flags.items()),
        f"{'exit':<6}{'output':<10}{'GMACs':>9}{'share':>8}",
    ]
    for k, (exit_name, m) in enumerate(zip(info.exit_names, macs, strict=True), start=1):
        lines.append(f"{k:<6}{exit_name:<10}{m / 1e9:>9.3f}{m / macs[-1]:>8.2f}")
    return "\n".join(lines)
