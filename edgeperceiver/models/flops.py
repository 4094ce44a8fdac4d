"""Per-exit cost: cumulative multiply-accumulates (MACs) per sample to reach each exit.

Counted with forward hooks during one batch-1 forward pass, in program order:

* ``Conv2d``: output elements x (input channels / groups) x kernel area;
* ``Linear``: output elements x input features (token mixers, projections, heads);
* attention products (``BatchedMatMul``): ``q @ k^T`` and ``attn @ v``;
* ``AdaptiveAvgPool2d``: one add per input element (the official counter does the same).

Normalisation, activations, softmax and element-wise adds are not counted. Exit ``k``'s figure
is the running total when its head produced its logits, i.e. everything computed before it —
which, for the Dyn-Perceiver's program order, is exactly what exits ``1..k`` need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._optional import require
from ..errors import ModelError

if TYPE_CHECKING:
    from torch import nn


def count_flops(model: nn.Module, input_size: int | None = None) -> tuple[int, ...]:
    """Cumulative MACs per sample to reach each exit of ``model`` (exits in order).

    ``model`` must expose ``exit_modules()`` (every registry model does). ``input_size``
    defaults to ``model.input_size``.
    """
    torch = require("torch", purpose="counting FLOPs")
    from torch import nn as tnn

    from .layers import BatchedMatMul

    exits_fn = getattr(model, "exit_modules", None)
    if exits_fn is None:
        raise ModelError(f"{type(model).__name__} has no exit_modules(); cannot attribute FLOPs to exits")
    size = int(input_size) if input_size else int(getattr(model, "input_size", 224))
    exit_mods = list(exits_fn())
    total = [0]
    marks: dict[int, int] = {}

    def conv_hook(m: Any, inp: Any, out: Any) -> None:
        total[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m: Any, inp: Any, out: Any) -> None:
        total[0] += out.numel() * m.in_features

    def matmul_hook(m: Any, inp: Any, out: Any) -> None:
        total[0] += out.numel() * inp[0].shape[-1]

    def pool_hook(m: Any, inp: Any, out: Any) -> None:
        total[0] += inp[0].numel()

    def exit_hook(idx: int) -> Any:
        def hook(m: Any, inp: Any, out: Any) -> None:
            marks.setdefault(idx, total[0])

        return hook

    handles = []
    for m in model.modules():
        if isinstance(m, tnn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, tnn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, BatchedMatMul):
            handles.append(m.register_forward_hook(matmul_hook))
        elif isinstance(m, tnn.AdaptiveAvgPool2d):
            handles.append(m.register_forward_hook(pool_hook))
    # exit hooks are registered last so they run after the head's own Linear hooks
    for i, m in enumerate(exit_mods):
        handles.append(m.register_forward_hook(exit_hook(i)))
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, dtype=param.dtype, device=param.device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if len(marks) != len(exit_mods):
        raise ModelError("not every exit head ran during the FLOPs pass")
    return tuple(marks[i] for i in range(len(exit_mods)))
