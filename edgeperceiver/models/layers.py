"""Building blocks of the Dyn-Perceiver: attention layers, conv-norm-activation, squeeze-excitation.

Module and parameter names follow the official implementation so that official checkpoints
load with strict key matching (``cross_attn.attention.q_proj.weight``, ``mlp.fc1.weight``,
``self_attn.norm.weight`` ...). Everything here is written to export to ONNX with a dynamic
batch axis: no Python integers taken from the batch size, no squeeze of non-unit axes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class BatchedMatMul(nn.Module):
    """``a @ b``; a module only so that :func:`~edgeperceiver.models.flops.count_flops` can hook it."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.matmul(a, b)


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention with separate q/k/v/o projections.

    ``rpb_tokens`` > 0 adds a learned relative position bias of shape
    ``(1, rpb_tokens, qk_channels)`` to the projected keys (official Dyn-Perceiver detail: keys
    only, after ``k_proj``), so the key/value input must then have exactly ``rpb_tokens`` tokens.
    """

    def __init__(
        self,
        num_heads: int,
        q_channels: int,
        kv_channels: int,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        out_channels: int | None = None,
        dropout: float = 0.0,
        rpb_tokens: int = 0,
    ) -> None:
        super().__init__()
        qk = q_channels if qk_channels is None else qk_channels
        v = qk if v_channels is None else v_channels
        out = q_channels if out_channels is None else out_channels
        if qk % num_heads or v % num_heads:
            raise ValueError(f"attention channels (qk={qk}, v={v}) must be divisible by the head count {num_heads}")
        self.num_heads = num_heads
        self.scale = (qk // num_heads) ** -0.5
        self.rpb = rpb_tokens > 0
        if self.rpb:
            self.relative_position_bias = nn.Parameter(torch.zeros(1, rpb_tokens, qk))
        self.q_proj = nn.Linear(q_channels, qk, bias=False)
        self.k_proj = nn.Linear(kv_channels, qk, bias=False)
        self.v_proj = nn.Linear(kv_channels, v, bias=False)
        self.o_proj = nn.Linear(v, out)
        self.dropout = nn.Dropout(dropout)
        self.qk_matmul = BatchedMatMul()
        self.av_matmul = BatchedMatMul()

    def _heads(self, t: Tensor) -> Tensor:
        # (b, n, h*c) -> (b, h, n, c)
        return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, x_q: Tensor, x_kv: Tensor) -> Tensor:
        q = self.q_proj(x_q)
        k = self.k_proj(x_kv)
        v = self.v_proj(x_kv)
        if self.rpb:
            k = k + self.relative_position_bias
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        attn = self.qk_matmul(q, k.transpose(-2, -1)) * self.scale
        attn = self.dropout(attn.softmax(dim=-1))
        o = self.av_matmul(attn, v)  # (b, h, n, c)
        o = o.transpose(1, 2).flatten(2)
        return self.o_proj(o)


class CrossAttention(nn.Module):
    """Layer-normalised queries and keys/values, then :class:`MultiHeadAttention`."""

    def __init__(
        self,
        num_heads: int,
        q_channels: int,
        kv_channels: int,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        dropout: float = 0.0,
        rpb_tokens: int = 0,
    ) -> None:
        super().__init__()
        self.q_norm = nn.LayerNorm(q_channels)
        self.kv_norm = nn.LayerNorm(kv_channels)
        self.attention = MultiHeadAttention(
            num_heads, q_channels, kv_channels, qk_channels, v_channels, dropout=dropout, rpb_tokens=rpb_tokens
        )

    def forward(self, x_q: Tensor, x_kv: Tensor) -> Tensor:
        return self.attention(self.q_norm(x_q), self.kv_norm(x_kv))


class SelfAttention(nn.Module):
    """One layer norm shared by queries and keys/values, then :class:`MultiHeadAttention`."""

    def __init__(
        self,
        num_heads: int,
        channels: int,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attention = MultiHeadAttention(num_heads, channels, channels, qk_channels, v_channels, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        return self.attention(x, x)


class MLP(nn.Module):
    """Pre-norm feed-forward: LayerNorm, Linear (x widening), exact GELU, Linear."""

    def __init__(self, channels: int, widening_factor: int) -> None:
        super().__init__()
        self.layernorm = nn.LayerNorm(channels)
        self.fc1 = nn.Linear(channels, widening_factor * channels)
        self.gelu = nn.GELU()
        self.fc2 = nn.Linear(widening_factor * channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.gelu(self.fc1(self.layernorm(x))))


class CrossAttentionLayer(nn.Module):
    """``out = x_q + attn(x_q, x_kv)``; ``out = out + mlp(out)``."""

    def __init__(
        self,
        num_heads: int,
        q_channels: int,
        kv_channels: int,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        widening_factor: int = 1,
        dropout: float = 0.0,
        rpb_tokens: int = 0,
    ) -> None:
        super().__init__()
        self.cross_attn = CrossAttention(
            num_heads, q_channels, kv_channels, qk_channels, v_channels, dropout=dropout, rpb_tokens=rpb_tokens
        )
        self.mlp = MLP(q_channels, widening_factor)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_q: Tensor, x_kv: Tensor) -> Tensor:
        out = x_q + self.dropout(self.cross_attn(x_q, x_kv))
        return out + self.dropout(self.mlp(out))


class SelfAttentionLayer(nn.Module):
    """``out = x + attn(x)``; ``out = out + mlp(out)``."""

    def __init__(self, num_heads: int, channels: int, widening_factor: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = SelfAttention(num_heads, channels, dropout=dropout)
        self.mlp = MLP(channels, widening_factor)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        out = x + self.dropout(self.self_attn(x))
        return out + self.dropout(self.mlp(out))


class SelfAttentionBlock(nn.ModuleList):
    """A stack of :class:`SelfAttentionLayer` (state_dict keys ``<i>.self_attn...``)."""

    def __init__(
        self, num_layers: int, num_heads: int, channels: int, widening_factor: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__(SelfAttentionLayer(num_heads, channels, widening_factor, dropout) for _ in range(num_layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self:
            x = layer(x)
        return x


def conv_norm_act(
    c_in: int,
    c_out: int,
    kernel_size: int = 3,
    stride: int = 1,
    groups: int = 1,
    *,
    norm: Callable[[int], nn.Module],
    act: Callable[[], nn.Module] | None,
) -> nn.Sequential:
    """``Sequential(conv (no bias, 'same' padding), norm, [act])`` — keys ``0.weight``, ``1.*``."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel_size, stride, padding=(kernel_size - 1) // 2, groups=groups, bias=False),
        norm(c_out),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """Channel gating: global average pool, 1x1 conv, activation, 1x1 conv, gate, scale."""

    def __init__(
        self,
        channels: int,
        squeeze_channels: int,
        act: Callable[[], nn.Module] = nn.ReLU,
        gate: Callable[[], nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.activation = act()
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.scale_activation = gate()

    def forward(self, x: Tensor) -> Tensor:
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * s


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to a multiple of ``divisor``, never more than 10% below it (MobileNet rule)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new
