"""CNN backbones of the Dyn-Perceiver zoo: RegNetY, ResNet (timm-style) and MobileNetV3-Large.

Each builder returns a :class:`Backbone`: the modules to attach to the Dyn-Perceiver under
their official attribute names (``cnn_stem``/``cnn_body`` for RegNet, ``cnn_stem``/
``cnn_body_stage1..4`` for ResNet and MobileNet), the four stages in order, the channel
counts at the four points where the latent branch reads the CNN, and the CNN classifier
and merge-head layouts. No torchvision/timm dependency.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import Tensor, nn

from .layers import DropPath, SqueezeExcitation, conv_norm_act, make_divisible


class SequentialList(nn.ModuleList):
    """A ModuleList that runs its members in order (keeps ``<i>.`` state_dict keys)."""

    def forward(self, x: Tensor) -> Tensor:
        for m in self:
            x = m(x)
        return x


@dataclass
class Backbone:
    """What the Dyn-Perceiver needs from a CNN (mutable: it holds modules)."""

    attach: dict[str, nn.Module]  #: attribute name on the model -> module
    stem: nn.Module
    stages: tuple[nn.Module, nn.Module, nn.Module, nn.Module]
    stage_in: tuple[int, int, int, int]  #: channels of x read by the latent branch before stage k
    out_channels: int  #: channels after stage 4
    tap_halvings: tuple[int, int, int, int]  #: stride-2 steps applied to the image before stage k
    head_hidden: int | None  #: MobileNet heads: Linear-Hardswish-Dropout-Linear hidden width


# --------------------------------------------------------------------------- RegNetY

#: RegNetY design points (depth, width per stage, group width), SE ratio 0.25, bottleneck 1.
REGNET_Y: dict[str, tuple[tuple[int, ...], tuple[int, ...], int]] = {
    "regnet_y_400mf": ((1, 3, 6, 6), (48, 104, 208, 440), 8),
    "regnet_y_800mf": ((1, 3, 8, 2), (64, 144, 320, 784), 16),
    "regnet_y_1_6gf": ((2, 6, 17, 2), (48, 120, 336, 888), 24),
    "regnet_y_3_2gf": ((2, 5, 13, 1), (72, 216, 576, 1512), 24),
}


class RegNetBlock(nn.Module):
    """RegNetY residual bottleneck: ``relu(proj(x) + c(se(b(a(x)))))``."""

    def __init__(self, c_in: int, c_out: int, stride: int, group_width: int, se_ratio: float) -> None:
        super().__init__()
        bn = partial(nn.BatchNorm2d, eps=1e-5, momentum=0.1)
        self.proj = conv_norm_act(c_in, c_out, 1, stride, norm=bn, act=None) if (c_in != c_out or stride != 1) else None
        f: OrderedDict[str, nn.Module] = OrderedDict()
        f["a"] = conv_norm_act(c_in, c_out, 1, norm=bn, act=nn.ReLU)
        f["b"] = conv_norm_act(c_out, c_out, 3, stride, groups=c_out // group_width, norm=bn, act=nn.ReLU)
        if se_ratio:
            f["se"] = SqueezeExcitation(c_out, round(se_ratio * c_in))
        f["c"] = conv_norm_act(c_out, c_out, 1, norm=bn, act=None)
        self.f = nn.Sequential(f)
        self.activation = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.activation(self.f(x) + shortcut)


def regnet(depths: tuple[int, ...], widths: tuple[int, ...], group_width: int, stem_width: int = 32) -> Backbone:
    """A RegNetY trunk: 3x3/2 stem, four stages of :class:`RegNetBlock` (first block strided)."""
    bn = partial(nn.BatchNorm2d, eps=1e-5, momentum=0.1)
    stem = conv_norm_act(3, stem_width, 3, 2, norm=bn, act=nn.ReLU)
    stages: list[nn.Module] = []
    c = stem_width
    body: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (d, w) in enumerate(zip(depths, widths, strict=True), start=1):
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        for j in range(d):
            blocks[f"block{i}-{j}"] = RegNetBlock(c if j == 0 else w, w, 2 if j == 0 else 1, group_width, 0.25)
        stage = nn.Sequential(blocks)
        body[f"block{i}"] = stage
        stages.append(stage)
        c = w
    ins = (stem_width, *widths[:3])
    return Backbone(
        attach={"cnn_stem": stem, "cnn_body": nn.Sequential(body)},
        stem=stem,
        stages=(stages[0], stages[1], stages[2], stages[3]),
        stage_in=(ins[0], ins[1], ins[2], ins[3]),
        out_channels=widths[3],
        tap_halvings=(1, 2, 3, 4),
        head_hidden=None,
    )


# --------------------------------------------------------------------------- ResNet

#: name -> (block kind, blocks per stage, channel multiplier)
RESNETS: dict[str, tuple[str, tuple[int, ...], float]] = {
    "resnet18": ("basic", (2, 2, 2, 2), 1.0),
    "resnet34": ("basic", (3, 4, 6, 3), 1.0),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1.0),
    "resnet50_0375": ("bottleneck", (3, 4, 6, 3), 0.375),
    "resnet50_050": ("bottleneck", (3, 4, 6, 3), 0.5),
    "resnet50_0625": ("bottleneck", (3, 4, 6, 3), 0.625),
    "resnet50_075": ("bottleneck", (3, 4, 6, 3), 0.75),
}


def _downsample(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual (ResNet-18/34)."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int, downsample: nn.Module | None, drop_path: float):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU()
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        if self.drop_path is not None:
            y = self.drop_path(y)
        return self.act2(y + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand x4, with a residual (ResNet-50 family)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int, downsample: nn.Module | None, drop_path: float):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.act3 = nn.ReLU()
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.act2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        if self.drop_path is not None:
            y = self.drop_path(y)
        return self.act3(y + shortcut)


def resnet(kind: str, layers: tuple[int, ...], multiplier: float, drop_path_rate: float = 0.0) -> Backbone:
    """A ResNet trunk (7x7/2 stem + 3x3/2 max-pool), widths scaled by ``multiplier``."""
    block: type[BasicBlock] | type[Bottleneck] = BasicBlock if kind == "basic" else Bottleneck
    stem_w = int(multiplier * 64)
    stem = nn.Sequential(
        nn.Conv2d(3, stem_w, 7, 2, 3, bias=False),
        nn.BatchNorm2d(stem_w),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    )
    total = sum(layers)
    idx = 0
    c = stem_w
    stages: list[nn.Module] = []
    ins: list[int] = []
    for s, (base, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
        planes = int(multiplier * base)
        stride = 1 if s == 0 else 2
        ins.append(c)
        blocks: list[nn.Module] = []
        for j in range(n):
            ds = None
            if j == 0 and (stride != 1 or c != planes * block.expansion):
                ds = _downsample(c, planes * block.expansion, stride)
            dpr = drop_path_rate * idx / max(total - 1, 1)
            blocks.append(block(c, planes, stride if j == 0 else 1, ds, dpr))
            c = planes * block.expansion
            idx += 1
        stages.append(nn.Sequential(*blocks))
    attach: dict[str, nn.Module] = {"cnn_stem": stem}
    for s, st in enumerate(stages, start=1):
        attach[f"cnn_body_stage{s}"] = st
    return Backbone(
        attach=attach,
        stem=stem,
        stages=(stages[0], stages[1], stages[2], stages[3]),
        stage_in=(ins[0], ins[1], ins[2], ins[3]),
        out_channels=c,
        tap_halvings=(2, 2, 3, 4),
        head_hidden=None,
    )


# --------------------------------------------------------------------------- MobileNetV3

#: MobileNetV3-Large inverted residuals: (in, kernel, expanded, out, SE, hard-swish, stride)
_MBV3_LARGE: tuple[tuple[int, int, int, int, bool, bool, int], ...] = (
    (16, 3, 16, 16, False, False, 1),
    (16, 3, 64, 24, False, False, 2),
    (24, 3, 72, 24, False, False, 1),
    (24, 5, 72, 40, True, False, 2),
    (40, 5, 120, 40, True, False, 1),
    (40, 5, 120, 40, True, False, 1),
    (40, 3, 240, 80, False, True, 2),
    (80, 3, 200, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 480, 112, True, True, 1),
    (112, 3, 672, 112, True, True, 1),
    (112, 5, 672, 160, True, True, 2),
    (160, 5, 960, 160, True, True, 1),
    (160, 5, 960, 160, True, True, 1),
)

MOBILENETS: dict[str, float] = {
    "mobilenet_v3_large": 1.0,
    "mobilenet_v3_large_0x5": 0.5,
    "mobilenet_v3_large_0x75": 0.75,
    "mobilenet_v3_large_1x25": 1.25,
    "mobilenet_v3_large_1x5": 1.5,
    "mobilenet_v3_large_2x0": 2.0,
}


class InvertedResidual(nn.Module):
    """MobileNetV3 block: [1x1 expand], kxk depthwise, [SE], 1x1 project; residual if shapes allow."""

    def __init__(
        self,
        c_in: int,
        kernel: int,
        expanded: int,
        c_out: int,
        use_se: bool,
        norm: Callable[[int], nn.Module],
        act: Callable[[], nn.Module],
        stride: int,
    ) -> None:
        super().__init__()
        self.c_in = c_in
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expanded != c_in:
            layers.append(conv_norm_act(c_in, expanded, 1, norm=norm, act=act))
        layers.append(conv_norm_act(expanded, expanded, kernel, stride, groups=expanded, norm=norm, act=act))
        if use_se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4, 8), gate=nn.Hardsigmoid))
        layers.append(conv_norm_act(expanded, c_out, 1, norm=norm, act=None))
        self.block = SequentialList(layers)

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return y + x if self.use_res_connect else y


def mobilenet_v3_large(width: float) -> Backbone:
    """MobileNetV3-Large at a width multiplier, split into stem + four Dyn-Perceiver stages."""
    norm = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)

    def ch(c: int) -> int:
        return make_divisible(c * width, 8)

    features: list[nn.Module] = [conv_norm_act(3, ch(16), 3, 2, norm=norm, act=nn.Hardswish)]
    for c_in, k, exp, c_out, se, hs, s in _MBV3_LARGE:
        features.append(InvertedResidual(ch(c_in), k, ch(exp), ch(c_out), se, norm, nn.Hardswish if hs else nn.ReLU, s))
    last_in = ch(160)
    features.append(conv_norm_act(last_in, 6 * last_in, 1, norm=norm, act=nn.Hardswish))
    bounds = ((0, 3), (3, 5), (5, 8), (8, 14), (14, 17))
    parts = [SequentialList(features[a:b]) for a, b in bounds]
    attach: dict[str, nn.Module] = {"cnn_stem": parts[0]}
    for s in range(1, 5):
        attach[f"cnn_body_stage{s}"] = parts[s]
    return Backbone(
        attach=attach,
        stem=parts[0],
        stages=(parts[1], parts[2], parts[3], parts[4]),
        stage_in=(ch(24), ch(40), ch(80), ch(160)),
        out_channels=6 * last_in,
        tap_halvings=(2, 3, 4, 5),
        head_hidden=ch(1280),
    )


BACKBONES: tuple[str, ...] = (*REGNET_Y, *RESNETS, *MOBILENETS)


def build_backbone(name: str, *, drop_path_rate: float = 0.0) -> Backbone:
    """Build a backbone by its official name (``regnet_y_800mf``, ``resnet50_0375`` ...)."""
    if name in REGNET_Y:
        return regnet(*REGNET_Y[name])
    if name in RESNETS:
        return resnet(*RESNETS[name], drop_path_rate=drop_path_rate)
    if name in MOBILENETS:
        return mobilenet_v3_large(MOBILENETS[name])
    if name.startswith("regnet_custom:"):
        return _custom_regnet(name)
    raise ValueError(f"unknown backbone {name!r}")


def _custom_regnet(spec: str) -> Backbone:
    """``regnet_custom:<stem>:<d1>x<w1>,<d2>x<w2>,<d3>x<w3>,<d4>x<w4>:<group width>`` (demo models)."""
    _, stem, stages, gw = spec.split(":")
    pairs = [p.split("x") for p in stages.split(",")]
    return regnet(tuple(int(d) for d, _ in pairs), tuple(int(w) for _, w in pairs), int(gw), stem_width=int(stem))
