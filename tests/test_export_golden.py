"""Export the official golden Dyn-Perceiver checkpoints and check the cut against the fixtures.

Slow (one export per model, ~15-35 s each on 2 cores); skipped when the fixtures are absent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from edgeperceiver.bundle import Bundle  # noqa: E402
from edgeperceiver.cut import run_chain  # noqa: E402
from edgeperceiver.export import export_checkpoint  # noqa: E402
from edgeperceiver.macs import macs_tensors, node_macs  # noqa: E402
from edgeperceiver.onnx_utils import probe, static_tensors  # noqa: E402

pytestmark = pytest.mark.slow

MODELS = {  # name -> (checkpoint, io file, relative FLOPs tolerance vs the fixture's flops_g)
    "reg800m_perceiver_t128": ("reg800m_perceiver_t128.fp16.pth", "reg800m_perceiver_t128.fp16.io.npz", 0.01),
    "mobilenetV3_0x75_perceiver_t128": (
        "mobilenetV3_0x75_perceiver_t128.pth", "mobilenetV3_0x75_perceiver_t128.io.npz", 0.01,
    ),
    # fvcore (the fixture's counter for this one) also counts norms and pooling: ~2% more than Conv/Gemm/MatMul
    "resnet50_0375_perceiver_t128": (
        "resnet50_0375_perceiver_t128.fp16.pth", "resnet50_0375_perceiver_t128.fp16.io.npz", 0.03,
    ),
}


@pytest.fixture(scope="module", params=list(MODELS))
def exported(
    request: pytest.FixtureRequest, golden_dir: Path, tmp_path_factory: pytest.TempPathFactory, torch_threads: Any
) -> tuple[str, Bundle, Any]:
    name = request.param
    ckpt, io_file, _ = MODELS[name]
    out: Path | None = None
    if name == "mobilenetV3_0x75_perceiver_t128":  # conftest exports this one once per session
        try:
            out = Path(request.getfixturevalue("golden_mobilenet_bundle"))
        except pytest.FixtureLookupError:
            out = None
    if out is None:
        out = tmp_path_factory.mktemp(name) / "bundle"
        report = export_checkpoint(golden_dir / ckpt, out, verify_batch=2, threads=2)
        assert report.ok
    return name, Bundle.open(out), np.load(golden_dir / io_file)


def test_chained_segments_reproduce_the_fixture(exported: tuple[str, Bundle, Any]) -> None:
    name, bundle, io = exported
    m = bundle.manifest
    assert all(row["reference_vs_segments"] <= row["tolerance"] for row in m.extra["export"]["verification"])
    assert m.exits == ("y_early3", "y_att", "y_cnn", "y_merge")
    assert m.model_name == name and m.num_classes == 1000 and m.input.shape == ("batch", 3, 224, 224)
    got = run_chain([bundle.path(s.path) for s in m.segments], {m.input.name: io["input"]}, threads=2)
    for e in m.exits:
        ref = io[e]
        tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
        diff = float(np.abs(got[e] - ref).max())
        assert diff <= tol, f"{name} {e}: max abs diff {diff:.2e} > {tol:.1e}"
        assert (got[e].argmax(1) == ref.argmax(1)).all()


def test_segment_flops_add_up_and_match_the_fixture(
    exported: tuple[str, Bundle, Any], golden_dir: Path
) -> None:
    name, bundle, io = exported
    model = onnx.load(str(bundle.path(bundle.manifest.model_path)))
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    need = [t for t in macs_tensors(model.graph.node) if t not in inits]
    x = np.zeros((1, 3, 224, 224), np.float32)
    _, shapes = probe(model, {bundle.manifest.input.name: x}, shapes_of=need, threads=2)
    total = sum(node_macs(n, {**inits, **shapes}) for n in model.graph.node)
    segs = bundle.manifest.segments
    assert sum(s.flops for s in segs) == total
    # the export layout folds avg_pool(dwc(x) + x) into one strided conv: add back what it saves
    saved = _folded_pool_macs(name)
    assert saved[0] > 0
    cumulative = (np.cumsum([s.flops for s in segs]) + np.cumsum(saved)) / 1e9
    flops_g = np.asarray(io["flops_g"], dtype=np.float64)
    rel = np.abs(cumulative - flops_g) / flops_g
    assert (rel <= MODELS[name][2]).all(), f"{name}: GMACs {cumulative} vs fixture {flops_g}"


def _folded_pool_macs(name: str) -> list[int]:
    """Per segment, the MACs the export layout's pooled-dwc fold saves (x->z of stages 1-3: segment 1, 4: segment 2)."""
    from edgeperceiver.models import create_model
    from edgeperceiver.models.dynperceiver import _grid
    from edgeperceiver.models.layers import fold_dwc_pool

    model = create_model(name)
    saved = [0, 0, 0, 0]
    for k in range(1, 5):
        conv = getattr(model, f"dwc{k}_x2z")
        side = _grid(224, model._tap_halvings[k - 1])
        folded = fold_dwc_pool(conv, (side, side), (7, 7))
        assert folded is not None
        c, kernel = conv.in_channels, folded[0].shape[-1]
        saved[0 if k < 4 else 1] += c * side * side * conv.kernel_size[0] ** 2 - c * 49 * kernel**2
    return saved


def test_no_node_in_two_segments(exported: tuple[str, Bundle, Any]) -> None:
    _, bundle, _ = exported
    model = onnx.load(str(bundle.path(bundle.manifest.model_path)))
    static = static_tensors(model.graph)
    seen: dict[str, int] = {}
    total = 0
    for s in bundle.manifest.segments:
        seg = onnx.load(str(bundle.path(s.path)))
        for node in seg.graph.node:
            out = node.output[0]
            if out in static:
                continue  # constants may be copied into several segments
            assert out not in seen, f"{out} computed by segments {seen[out]} and {s.index}"
            seen[out] = s.index
            total += 1
    assert total == sum(1 for n in model.graph.node if n.output[0] not in static)


def test_boundaries_carry_exactly_what_the_architecture_needs(
    exported: tuple[str, Bundle, Any],
) -> None:
    name, bundle, _ = exported
    s1, s2, s3, s4 = bundle.manifest.segments

    def shapes(tensors: Any) -> list[tuple[Any, ...]]:
        return sorted((tuple(t.shape[1:]) for t in tensors), key=str)

    logits = (1000,)
    # 1|2: CNN features + latent (32 tokens) + exit-1 logits (CNN block 3 is not needed by exit 1)
    assert shapes(s1.outputs) == shapes(s2.inputs)
    maps = [x for x in shapes(s2.inputs) if len(x) == 3]
    lat1 = [x for x in shapes(s2.inputs) if len(x) == 2]
    assert len(maps) == 1 and len(lat1) == 1 and lat1[0][0] == 32
    assert shapes(s2.inputs) == sorted([maps[0], lat1[0], logits], key=str)
    # 2|3: CNN map + latent (16 tokens) + latent mean + exit-2 logits; exit 3 reads only the CNN map
    cnn4 = [x for x in shapes(s2.outputs) if len(x) == 3]
    assert len(cnn4) == 1 and len(s2.outputs) == 4
    lat = [x for x in shapes(s2.outputs) if len(x) == 2]
    assert len(lat) == 1 and lat[0][0] == 16
    assert shapes(s2.outputs) == sorted([cnn4[0], lat[0], (lat[0][1],), logits], key=str)
    assert shapes(s3.inputs) == cnn4
    assert set(s2.live_after) == {t.name for t in s2.outputs}
    # 3|4: block-4 output (7x7) from segment 3 + latent + latent mean + exit-2 logits from segment 2
    assert len(s3.outputs) == 2 and tuple(s3.outputs[1].shape[2:]) == (7, 7)
    assert {t.name for t in s4.inputs} == {s3.outputs[1].name} | {t.name for t in s2.outputs} - {s3.inputs[0].name}
    assert {t.name for t in s4.inputs} == set(s3.live_after)
    assert s4.live_after == ()
    if name == "reg800m_perceiver_t128":  # the numbers DESIGN.md lists
        assert shapes(s2.inputs) == sorted([(144, 28, 28), (32, 144), logits], key=str)
        assert s1.carried_bytes == (144 * 28 * 28 + 32 * 144 + 1000) * 4 == 474_016
        assert shapes(s3.inputs) == [(320, 14, 14)] and lat[0] == (16, 320)
        assert shapes(s4.inputs) == sorted([(784, 7, 7), (16, 320), (320,), logits], key=str)
