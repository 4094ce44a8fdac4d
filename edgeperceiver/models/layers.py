"""Building blocks of the Dyn-Perceiver: attention layers, conv-norm-activation, squeeze-excitation.

Module and parameter names follow the official implementation so that official checkpoints
load with strict key matching (``cross_attn.attention.q_proj.weight``, ``mlp.fc1.weight``,
``self_attn.norm.weight`` ...). Everything here is written to export to ONNX with a dynamic
batch axis: no Python integers taken from the batch size, no squeeze of non-unit axes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv1x1(x: Tensor, linear: nn.Linear) -> Tensor:
    """``linear`` applied to every pixel of a (b, c, h, w) map, as a 1x1 convolution."""
    return F.conv2d(x, linear.weight[:, :, None, None], linear.bias)


def layer_norm_channels(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    """``norm`` (a LayerNorm over c) applied to every pixel of a (b, c, h, w) map, channels-first."""
    d = x - x.mean(1, keepdim=True)
    y = d / torch.sqrt(d.pow(2).mean(1, keepdim=True) + norm.eps)
    return y * norm.weight[:, None, None] + norm.bias[:, None, None]


def fold_dwc_pool(
    conv: nn.Conv2d, size: tuple[int, int], pooled: tuple[int, int]
) -> tuple[Tensor, Tensor | None, tuple[int, int], tuple[int, int]] | None:
    """``avg_pool(conv(x) + x)`` to ``pooled`` bins as one depthwise conv: ``(weight, bias, stride, padding)``.

    ``conv`` must be depthwise, stride 1, odd kernel, "same" zero padding, and ``size``
    must pool in whole blocks (``size`` a multiple of ``pooled``); else None. The pool of
    the conv is the conv with the box filter convolved into its kernel, the pool of ``x``
    a box at the kernel's centre; both read the padded map with the pool's stride.
    """
    (h, w), (ph, pw) = size, pooled
    c, per_group, kh, kw = conv.weight.shape
    if (conv.groups != c or conv.in_channels != c or per_group != 1 or conv.stride != (1, 1)
            or conv.dilation != (1, 1) or conv.padding != (kh // 2, kw // 2) or kh % 2 == 0 or kw % 2 == 0
            or conv.padding_mode != "zeros" or h % ph or w % pw):
        return None
    sh, sw = h // ph, w // pw
    weight = conv.weight.detach()
    box = torch.ones(1, 1, sh, sw, dtype=weight.dtype)
    kernel = F.conv2d(F.pad(weight, (sw - 1, sw - 1, sh - 1, sh - 1)), box)  # (c, 1, kh + sh - 1, kw + sw - 1)
    kernel[:, :, kh // 2 : kh // 2 + sh, kw // 2 : kw // 2 + sw] += 1.0  # the identity branch
    bias = None if conv.bias is None else conv.bias.detach().clone()
    return kernel / (sh * sw), bias, (sh, sw), (kh // 2, kw // 2)


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

    def _keys(self, x_kv: Tensor) -> Tensor:
        """Projected keys (plus the position bias), split into heads: (b, h, m, c)."""
        k = self.k_proj(x_kv)
        if self.rpb:
            k = k + self.relative_position_bias
        return self._heads(k)

    def forward(self, x_q: Tensor, x_kv: Tensor) -> Tensor:
        """Tokens (b, n, c) attend to ``x_kv`` (b, m, c'); a (b, c, h, w) map: see :meth:`forward_map`."""
        if x_q.ndim == 4:
            return self.forward_map(x_q, x_kv)
        q, k, v = self._heads(self.q_proj(x_q)), self._keys(x_kv), self._heads(self.v_proj(x_kv))
        attn = self.qk_matmul(q, k.transpose(-2, -1)) * self.scale
        attn = self.dropout(attn.softmax(dim=-1))
        o = self.av_matmul(attn, v)  # (b, h, n, c)
        o = o.transpose(1, 2).flatten(2)
        return self.o_proj(o)

    def forward_map(self, q_map: Tensor, x_kv: Tensor) -> Tensor:
        """Attention with the queries as the pixels of a (b, c, h, w) map, kept channels-first.

        Same math as ``forward(q_map.flatten(2).transpose(1, 2), x_kv)`` reshaped back to a map,
        computed without moving the map's channels last: q/o projections are 1x1
        convolutions and the attention is taken as (keys x queries), softmax over the keys
        axis. Exported graphs then have no feature-map transposes (INT8 OpenVINO reg800m: -5.5%).
        """
        h, w = q_map.shape[-2], q_map.shape[-1]
        q = conv1x1(q_map, self.q_proj).flatten(2).unflatten(1, (self.num_heads, -1))  # (b, h, c, n)
        k = self._keys(x_kv)  # (b, h, m, c)
        v = self.v_proj(x_kv).unflatten(-1, (self.num_heads, -1)).permute(0, 2, 3, 1)  # (b, h, c, m)
        attn = self.qk_matmul(k, q) * self.scale  # (b, h, m, n)
        attn = self.dropout(attn.softmax(dim=2))
        o = self.av_matmul(v, attn)  # (b, h, c, n)
        return conv1x1(o.flatten(1, 2).unflatten(2, (h, w)), self.o_proj)


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
        """Queries are tokens (b, n, c) or the pixels of a (b, c, h, w) map (kept channels-first)."""
        q = layer_norm_channels(x_q, self.q_norm) if x_q.ndim == 4 else self.q_norm(x_q)
        return self.attention(q, self.kv_norm(x_kv))


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
        """Tokens (b, n, c), or every pixel of a (b, c, h, w) map channels-first (1x1 convolutions)."""
        if x.ndim == 4:
            return conv1x1(self.gelu(conv1x1(layer_norm_channels(x, self.layernorm), self.fc1)), self.fc2)
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
        """Queries as tokens (b, n, c), or as a (b, c, h, w) map computed channels-first
        (same function on the map's pixels, to float rounding; see
        :meth:`MultiHeadAttention.forward_map`)."""
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
