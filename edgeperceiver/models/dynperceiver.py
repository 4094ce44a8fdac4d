"""The Dynamic Perceiver (Han et al., ICCV 2023): a CNN branch and a latent (Perceiver) branch.

The latent branch reads the CNN before every stage (``x2z`` cross-attention, optional
depth-wise conv and 7x7 pooling), self-attends, and writes back into the CNN (``z2x``).
Four exits, in the official order:

1. ``y_early3`` — latent mean after stage 3,
2. ``y_att``    — latent mean after stage 4 (+ the ``isc3`` term from ``y_early3``),
3. ``y_cnn``    — the CNN classifier on the pooled stage-4 features,
4. ``y_merge``  — both branches after the last z->x cross-attention (+ ``isc4`` from ``y_att``).

This is an independent implementation that keeps the official state_dict key names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ModelError
from .backbones import build_backbone
from .config import BASE_SA_DEPTH, EXIT_NAMES, IMAGENET_MEAN, IMAGENET_STD, DynPerceiverConfig
from .layers import CrossAttentionLayer, SelfAttentionBlock, fold_dwc_pool

#: (map size, (weight, bias, stride, padding)) of a folded avg_pool(dwc(x) + x)
_FoldedPool = tuple[tuple[int, int], tuple[Tensor, Tensor | None, tuple[int, int], tuple[int, int]]]


def _grid(size: int, halvings: int) -> int:
    for _ in range(halvings):
        size = (size + 1) // 2
    return size


class DynPerceiver(nn.Module):
    """Dyn-Perceiver classifier; ``forward(x)`` returns ``(y_early3, y_att, y_cnn, y_merge)``.

    Attributes: ``exit_names``, ``input_size``, ``num_classes``, ``config``, ``model_name``.
    Construction has no side effects (no forward pass, no files, no prints).
    """

    exit_names: tuple[str, ...] = EXIT_NAMES
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875  #: evaluation transform: resize to input_size / crop_pct, centre-crop
    #: export layout: the smallest map (h * w) whose z->x attention runs channels-first. On
    #: OpenVINO the channels-first form won on reg800m's 56x56 and 28x28 maps, tied at 14x14
    #: and 7x7, and lost ~8% on the 32 px demo model (maps of 8x8 and less: the channel
    #: LayerNorm stays decomposed, see layer_norm_channels)
    z2x_channels_first_min_pixels: int = 784

    def __init__(self, config: DynPerceiverConfig, model_name: str = "") -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.model_name = model_name or config.backbone
        self.input_size = config.input_size
        self.num_classes = config.num_classes
        c = config
        bb = build_backbone(c.backbone, drop_path_rate=c.drop_path_rate)
        z_x = bb.stage_in  # CNN channels read by the latent branch before each stage
        c_lat = c.num_latent_channels or z_x[0]
        z_ch = (c_lat, z_x[1], z_x[2], z_x[3])  # latent channels per stage
        heads = tuple(int(h) for h in c.num_SA_heads)
        for k in range(4):
            if z_ch[k] % heads[k]:
                raise ModelError(
                    f"stage {k + 1}: {z_ch[k]} latent channels are not divisible by {heads[k]} heads "
                    f"(num_SA_heads={list(heads)})"
                )
        depth = tuple(b * int(f) for b, f in zip(BASE_SA_DEPTH, c.depth_factor, strict=True))
        n_lat = (c.num_latents, c.num_latents // 2, c.num_latents // 4, c.num_latents // 8)

        for attr, module in bb.attach.items():
            self.add_module(attr, module)
        # plain tuple, not registered again: the modules are already attached under official names
        self._cnn_parts: tuple[nn.Module, ...] = (bb.stem, *bb.stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.spatial_reduction = c.spatial_reduction
        self.ca_pooling = nn.AdaptiveAvgPool2d((7, 7)) if c.spatial_reduction else nn.Identity()
        self.latent = nn.Parameter(torch.empty(c.num_latents, c_lat))

        def kv_tokens(k: int) -> int:
            return 49 if c.spatial_reduction else _grid(c.input_size, bb.tap_halvings[k]) ** 2

        def x2z(k: int) -> CrossAttentionLayer:
            return CrossAttentionLayer(1, z_ch[k], z_x[k], dropout=c.dropout, rpb_tokens=kv_tokens(k))

        def z2x(ch_x: int, ch_z: int) -> CrossAttentionLayer:
            return CrossAttentionLayer(1, ch_x, ch_z, ch_x // 8, ch_x // 8, dropout=c.dropout)

        def sa(k: int) -> SelfAttentionBlock:
            return SelfAttentionBlock(depth[k], heads[k], z_ch[k], c.SA_widening_factor, c.dropout)

        self.with_x2z, self.with_z2x, self.with_dwc = c.with_x2z, c.with_z2x, c.with_dwc
        self.with_isc = c.with_isc
        #: z->x cross-attention computed channels-first (set by :meth:`export_layout`)
        self.z2x_channels_first = False
        #: stage k -> avg_pool(dwc(x) + x) folded for its map size (export layout)
        self._pooled_dwc: dict[int, _FoldedPool] = {}
        self._tap_halvings = bb.tap_halvings
        # official attribute names (state_dict keys); the order of registration does not matter
        if c.with_dwc:
            self.dwc1_x2z = nn.Conv2d(z_x[0], z_x[0], 7, padding=3, groups=z_x[0])
        self.cross_att1_x2z = x2z(0)
        self.self_att1 = sa(0)
        for k in (1, 2, 3):
            s = k + 1
            if c.with_x2z:
                if c.with_dwc:
                    self.add_module(f"dwc{s}_x2z", nn.Conv2d(z_x[k], z_x[k], 7, padding=3, groups=z_x[k]))
                self.add_module(f"cross_att{s}_x2z", x2z(k))
            if c.with_z2x:
                self.add_module(f"cross_att{s}_z2x", z2x(z_x[k], z_ch[k]))
            self.add_module(f"self_att{s}", sa(k))
        c4 = bb.out_channels
        self.last_cross_att_z2x = (
            CrossAttentionLayer(1, c4, z_ch[3], c4 // 8, c4 // 8, dropout=c.dropout) if c.with_last_CA else None
        )

        nc = c.num_classes
        cnn_head = self._head(bb.out_channels, nc, bb.head_hidden)
        self.classifier_cnn = cnn_head[0] if len(cnn_head) == 1 else nn.Sequential(*cnn_head)
        self.early_classifier3 = nn.Linear(z_ch[2], nc)
        merge_in = bb.out_channels + z_ch[3] * (2 if c.with_isc else 1)
        if c.with_isc:
            self.isc3 = nn.Sequential(nn.Linear(nc, z_ch[3]), nn.BatchNorm1d(z_ch[3]), nn.ReLU())
            self.classifier_att = nn.Linear(2 * z_ch[3], nc)
            self.isc4 = nn.Sequential(nn.Linear(nc, z_ch[3]), nn.BatchNorm1d(z_ch[3]), nn.ReLU())
        else:
            self.classifier_att = nn.Linear(z_ch[3], nc)
        self.classifier_merge = nn.Sequential(nn.BatchNorm1d(merge_in), *self._head(merge_in, nc, bb.head_hidden))
        self.token_expander = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(z_ch[k]), nn.Linear(z_ch[k], z_ch[k + 1])) for k in range(3)
        )
        self.token_mixer = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(n_lat[k]), nn.Linear(n_lat[k], n_lat[k + 1])) for k in range(3)
        )
        self.drop_rate = c.drop_rate
        with torch.no_grad():
            self.latent.normal_(0.0, 0.02).clamp_(-2.0, 2.0)

    @staticmethod
    def _head(c_in: int, nc: int, hidden: int | None) -> list[nn.Module]:
        """Linear (RegNet/ResNet) or Linear-Hardswish-Dropout(0.2)-Linear (MobileNet)."""
        if hidden is None:
            return [nn.Linear(c_in, nc)]
        return [nn.Linear(c_in, hidden), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(hidden, nc)]

    def exit_modules(self) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        """The module whose output is each exit's logits, in exit order."""
        return (self.early_classifier3, self.classifier_att, self.classifier_cnn, self.classifier_merge)

    def _sa(self, k: int) -> nn.Module:
        return self.get_submodule(f"self_att{k}")

    # -- the two cross-attention directions -----------------------------------------------
    def _x2z(self, k: int, x: Tensor, z: Tensor) -> Tensor:
        folded = self._pooled_dwc.get(k)
        if folded is not None and tuple(x.shape[-2:]) == folded[0]:
            # avg_pool(dwc(x) + x) as one strided depthwise conv (export layout)
            w, b, stride, pad = folded[1]
            kv = F.conv2d(x, w, b, stride=stride, padding=pad, groups=x.shape[1])
        else:
            kv = self.get_submodule(f"dwc{k}_x2z")(x) + x if self.with_dwc else x
            kv = self.ca_pooling(kv)
        kv = kv.flatten(2).transpose(1, 2)  # (b, tokens, c)
        return self.get_submodule(f"cross_att{k}_x2z")(z, kv)

    def _z2x(self, layer: CrossAttentionLayer, x: Tensor, z: Tensor) -> Tensor:
        if self.z2x_channels_first and x.shape[-2] * x.shape[-1] >= self.z2x_channels_first_min_pixels:
            return layer(x, z)  # the map's pixels are the queries, kept channels-first
        h, w = x.shape[-2], x.shape[-1]
        q = x.flatten(2).transpose(1, 2)  # (b, h*w, c)
        return layer(q, z).transpose(1, 2).unflatten(2, (h, w))

    @contextmanager
    def export_layout(self) -> Iterator[None]:
        """Within: the same function (to float rounding) in a form that deploys faster.

        - the z->x cross-attentions on maps of at least ``z2x_channels_first_min_pixels``
          run channels-first (a map as queries,
          :meth:`~edgeperceiver.models.layers.MultiHeadAttention.forward_map`): no transposes
          of the feature maps;
        - with spatial reduction, ``avg_pool(dwc(x) + x)`` before each x->z attention is one
          strided depthwise convolution (:func:`~edgeperceiver.models.layers.fold_dwc_pool`)
          where the stage's map (at ``input_size``) pools in whole blocks: ~2-6% of the MACs.

        ``export_module`` traces inside this and verifies against the normal forward.
        """
        before = self.z2x_channels_first
        self.z2x_channels_first = True
        if self.with_dwc and self.spatial_reduction:
            with torch.no_grad():
                for k in range(1, 5):
                    side = _grid(self.input_size, self._tap_halvings[k - 1])
                    conv = getattr(self, f"dwc{k}_x2z", None)  # absent for stages 2-4 without x2z
                    folded = fold_dwc_pool(conv, (side, side), (7, 7)) if isinstance(conv, nn.Conv2d) else None
                    if folded is not None:
                        self._pooled_dwc[k] = ((side, side), folded)
        try:
            yield
        finally:
            self.z2x_channels_first = before
            self._pooled_dwc = {}

    def _between(self, k: int, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """Between CNN stage k and k+1: mix tokens, widen channels, z->x, x->z (k = 1..3)."""
        z = self.token_mixer[k - 1](z.transpose(1, 2)).transpose(1, 2)
        z = self.token_expander[k - 1](z)
        s = k + 1
        if self.with_z2x:
            x = self._z2x(self.get_submodule(f"cross_att{s}_z2x"), x, z)  # type: ignore[arg-type]
        if self.with_x2z:
            z = self._x2z(s, x, z)
        return x, z

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        z = self.latent.expand(x.shape[0], -1, -1)
        stem, stage1, stage2, stage3, stage4 = self._cnn_parts
        x = stem(x)
        z = self._x2z(1, x, z)
        z = self.self_att1(z)
        x = stage1(x)
        x, z = self._between(1, x, z)
        z = self._sa(2)(z)
        x = stage2(x)
        x, z = self._between(2, x, z)
        z = self._sa(3)(z)
        y_early3 = self.early_classifier3(z.mean(dim=1))

        x = stage3(x)
        x, z = self._between(3, x, z)
        z = self._sa(4)(z)
        z_mean = z.mean(dim=1)
        if self.with_isc:
            y_att = self.classifier_att(torch.cat((z_mean, self.isc3(y_early3)), dim=1))
        else:
            y_att = self.classifier_att(z_mean)

        x = stage4(x)
        x_mean = self.avgpool(x).flatten(1)
        cnn_in = F.dropout(x_mean, self.drop_rate, self.training) if self.drop_rate > 0 else x_mean
        y_cnn = self.classifier_cnn(cnn_in)

        if self.last_cross_att_z2x is not None:
            x = self._z2x(self.last_cross_att_z2x, x, z)
            x_mean = self.avgpool(x).flatten(1)
        if self.with_isc:
            merged = torch.cat((x_mean, z_mean, self.isc4(y_att)), dim=1)
        else:
            merged = torch.cat((x_mean, z_mean), dim=1)
        y_merge = self.classifier_merge(merged)
        return y_early3, y_att, y_cnn, y_merge


def config_replace(config: DynPerceiverConfig, **changes: object) -> DynPerceiverConfig:
    """``dataclasses.replace`` for configs (kept here so callers need not import dataclasses)."""
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]
