"""Export layout: the z->x cross-attention computed channels-first is the same function, minus the transposes."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeperceiver.models import EXIT_NAMES, create_model


@pytest.mark.parametrize(("heads", "qk", "rpb"), [(1, None, 0), (2, 8, 0), (2, 8, 7)])
def test_map_queries_are_tokens_channels_first(torch_threads: Any, heads: int, qk: int | None, rpb: int) -> None:
    torch = torch_threads
    from edgeperceiver.models.layers import CrossAttentionLayer

    torch.manual_seed(0)
    layer = CrossAttentionLayer(heads, 16, 24, qk, qk, widening_factor=2, rpb_tokens=rpb).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, 16, 5, 6)
    z = torch.randn(3, rpb or 9, 24)
    with torch.no_grad():
        tokens = layer(x.flatten(2).transpose(1, 2), z).transpose(1, 2).unflatten(2, (5, 6))
        mapped = layer(x, z)
    assert mapped.shape == x.shape
    assert float((tokens - mapped).abs().max()) < 1e-5


def test_export_layout_matches_and_restores(torch_threads: Any) -> None:
    torch = torch_threads
    torch.manual_seed(0)
    model = create_model("digits_perceiver_t32").eval()
    model.z2x_channels_first_min_pixels = 1  # its maps are 8x8 and less
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with model.export_layout():
            assert model.z2x_channels_first
            got = model(x)
        assert not model.z2x_channels_first
        with pytest.raises(RuntimeError), model.export_layout():
            raise RuntimeError("boom")
    assert not model.z2x_channels_first
    for r, g in zip(ref, got, strict=True):
        assert float((r - g).abs().max()) < 1e-5


def _transposes(model: Any, torch: Any, x: Any) -> int:
    onnx = pytest.importorskip("onnx")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.onnx"
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=list(EXIT_NAMES))
        return sum(n.op_type == "Transpose" for n in onnx.load(str(path)).graph.node)


def test_export_layout_drops_the_feature_map_transposes(torch_threads: Any) -> None:
    """Each z->x layer (3 between stages + the last one) loses its feature-map transposes."""
    torch = torch_threads
    model = create_model("digits_perceiver_t32").eval()
    x = torch.rand(1, 3, 32, 32)
    plain = _transposes(model, torch, x)
    with model.export_layout():
        assert _transposes(model, torch, x) == plain  # by default small maps keep the token layout
    model.z2x_channels_first_min_pixels = 1
    with model.export_layout():
        mapped = _transposes(model, torch, x)
    z2x = sum(1 for name, _ in model.named_children() if name.endswith("_z2x"))
    assert z2x == 4
    # per layer the token form transposes the map to tokens and back, q into heads, k (twice,
    # for q.kT) and the heads' output back (6 in this graph); channels-first transposes only
    # the small k and v token tensors (2)
    assert mapped == plain - 4 * z2x, (plain, mapped)


def test_export_module_traces_in_the_export_layout(torch_threads: Any, tmp_path: Path) -> None:
    """export_module verifies the channels-first graph against the module's normal forward."""
    torch = torch_threads
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from edgeperceiver.export import export_module

    torch.manual_seed(0)
    model = create_model("digits_perceiver_t32").eval()
    model.z2x_channels_first_min_pixels = 1
    report = export_module(model, (3, 32, 32), tmp_path / "b", threads=1)
    assert report.ok and not model.z2x_channels_first
    graph = onnx.load(str(tmp_path / "b" / "model.onnx")).graph
    assert not any(n.op_type == "Transpose" and "_z2x" not in n.name and
                   any("z2x" in i for i in n.input) for n in graph.node)
    assert np.isfinite([r.reference_vs_onnx or 0.0 for r in report.rows]).all()


@pytest.mark.parametrize(("size", "kernel"), [((14, 14), 7), ((28, 21), 7), ((12, 12), 3)])
def test_fold_dwc_pool_is_the_pool_of_the_conv(torch_threads: Any, size: tuple[int, int], kernel: int) -> None:
    torch = torch_threads
    from edgeperceiver.models.layers import fold_dwc_pool

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 5, kernel, padding=kernel // 2, groups=5)
    x = torch.randn(2, 5, *size)
    folded = fold_dwc_pool(conv, size, (7, 7) if size[0] % 7 == 0 else (4, 4))
    assert folded is not None
    w, b, stride, pad = folded
    with torch.no_grad():
        ref = torch.nn.functional.adaptive_avg_pool2d(conv(x) + x, (7, 7) if size[0] % 7 == 0 else (4, 4))
        got = torch.nn.functional.conv2d(x, w, b, stride=stride, padding=pad, groups=5)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) < 1e-5


def test_fold_dwc_pool_refuses_what_it_cannot_fold(torch_threads: Any) -> None:
    torch = torch_threads
    from edgeperceiver.models.layers import fold_dwc_pool

    dw = torch.nn.Conv2d(4, 4, 7, padding=3, groups=4)
    assert fold_dwc_pool(dw, (16, 16), (7, 7)) is None  # 16 px do not pool in whole 7-bin blocks
    assert fold_dwc_pool(torch.nn.Conv2d(4, 4, 7, padding=3), (14, 14), (7, 7)) is None  # not depthwise
    assert fold_dwc_pool(torch.nn.Conv2d(4, 4, 7, padding=2, groups=4), (14, 14), (7, 7)) is None  # not "same"
    assert fold_dwc_pool(torch.nn.Conv2d(4, 4, 7, padding=3, stride=2, groups=4), (14, 14), (7, 7)) is None


def test_export_layout_folds_the_pooled_dwc_at_224(torch_threads: Any) -> None:
    """reg400m at 224: every avg_pool(dwc(x) + x) folds; outputs match the normal forward."""
    torch = torch_threads
    torch.manual_seed(0)
    model = create_model("reg400m_perceiver_t32", num_classes=10).eval()
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
        with model.export_layout():
            assert sorted(model._pooled_dwc) == [1, 2, 3, 4]
            got = model(x)
    assert model._pooled_dwc == {}
    for r, g in zip(ref, got, strict=True):
        assert float((r - g).abs().max()) < 1e-4 * max(1.0, float(r.abs().max()))
