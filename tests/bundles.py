"""Small hand-made multi-exit bundles for runtime tests (independent of the exporter).

The toy model has three exits and the same cut structure as Dyn-Perceiver: exit 2 reads
exit 1's logits, and segment 3 reads a tensor made by segment 1 (not only segment 2)::

    seg1: h1 = relu(conv(x));           e1 = gemm(gap(h1))
    seg2: h2 = relu(conv(h1));          e2 = gemm(gap(h2)) + e1 @ B
    seg3: h3 = relu(conv(h2)) + h1;     e3 = gemm(gap(h3))

Also written: ``model.onnx`` (all three in one graph) as the target's monolithic model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeperceiver.bundle import (
    BATCH,
    Manifest,
    Preprocess,
    SegmentSpec,
    TargetEntry,
    TensorSpec,
    Thresholds,
    write_bundle,
)
from edgeperceiver.runtime.standalone import install_standalone
from edgeperceiver.types import Criterion, Precision, TargetName

OPSET = 17


def _toy_graphs(
    num_classes: int, channels: int, size: int, width: int, seed: int, logit_scale: float
) -> tuple[list[Any], object]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def w(name: str, *shape: int, scale: float = 0.5) -> Any:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    def conv(name: str, src: str, out: str, cin: int) -> tuple[list[Any], list[Any]]:
        inits = [w(f"{name}_w", width, cin, 3, 3, scale=1.0 / np.sqrt(cin * 9)), w(f"{name}_b", width, scale=0.1)]
        nodes = [
            helper.make_node("Conv", [src, f"{name}_w", f"{name}_b"], [f"{name}_c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"{name}_c"], [out]),
        ]
        return nodes, inits

    def head(name: str, src: str, out: str) -> tuple[list[Any], list[Any]]:
        inits = [w(f"{name}_w", width, num_classes, scale=logit_scale), w(f"{name}_b", num_classes, scale=0.1)]
        nodes = [
            helper.make_node("GlobalAveragePool", [src], [f"{name}_p"]),
            helper.make_node("Flatten", [f"{name}_p"], [f"{name}_f"], axis=1),
            helper.make_node("Gemm", [f"{name}_f", f"{name}_w", f"{name}_b"], [out]),
        ]
        return nodes, inits

    n1, i1 = conv("c1", "x", "h1", channels)
    h1n, h1i = head("e1h", "h1", "e1")
    n2, i2 = conv("c2", "h1", "h2", width)
    h2n, h2i = head("e2h", "h2", "e2a")
    mix = [
        helper.make_node("MatMul", ["e1", "mix_b"], ["e1m"]),
        helper.make_node("Add", ["e2a", "e1m"], ["e2"]),
    ]
    mix_i = [w("mix_b", num_classes, num_classes, scale=0.3)]
    n3, i3 = conv("c3", "h2", "h3a", width)
    res = [helper.make_node("Add", ["h3a", "h1"], ["h3"])]
    h3n, h3i = head("e3h", "h3", "e3")

    def vi(name: str, *shape: int | str) -> Any:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))

    x = vi("x", "batch", channels, size, size)
    h1, h2 = vi("h1", "batch", width, size, size), vi("h2", "batch", width, size, size)
    e = [vi(f"e{k}", "batch", num_classes) for k in (1, 2, 3)]

    def model(nodes: list[Any], inits: list[Any], ins: list[Any], outs: list[Any]) -> Any:
        g = helper.make_graph(nodes, "toy", ins, outs, initializer=inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m

    seg1 = model(n1 + h1n, i1 + h1i, [x], [e[0], h1])
    seg2 = model(n2 + h2n + mix, i2 + h2i + mix_i, [h1, e[0]], [e[1], h2])
    seg3 = model(n3 + res + h3n, i3 + h3i, [h2, h1], [e[2]])
    mono = model(
        n1 + h1n + n2 + h2n + mix + n3 + res + h3n, i1 + h1i + i2 + h2i + mix_i + i3 + h3i, [x], e
    )
    return [seg1, seg2, seg3], mono


def make_toy_bundle(
    dest: Path,
    *,
    num_classes: int = 5,
    channels: int = 3,
    size: int = 8,
    width: int = 4,
    seed: int = 0,
    logit_scale: float = 2.0,
    thresholds: Sequence[float | None] | None = None,
    classes: Sequence[str] | None = None,
    resize: int | None = None,
    standalone: bool = False,
) -> Path:
    """Write a 3-exit toy bundle at ``dest`` (an ``onnxruntime-fp32`` target, optional thresholds)."""
    import onnx

    segs: list[Any]
    mono: Any
    segs, mono = _toy_graphs(num_classes, channels, size, width, seed, logit_scale)

    def t(name: str, *shape: int | str) -> TensorSpec:
        return TensorSpec(name, "float32", tuple(shape))

    x = t("x", BATCH, channels, size, size)
    h1, h2 = t("h1", BATCH, width, size, size), t("h2", BATCH, width, size, size)
    e1, e2, e3 = (t(f"e{k}", BATCH, num_classes) for k in (1, 2, 3))
    specs = (
        SegmentSpec(1, "segments/seg1.onnx", "e1", (x,), (e1, h1), ("e1", "h1")),
        SegmentSpec(2, "segments/seg2.onnx", "e2", (h1, e1), (e2, h2), ("h1", "h2")),
        SegmentSpec(3, "segments/seg3.onnx", "e3", (h2, h1), (e3,), ()),
    )
    th = None if thresholds is None else Thresholds(Criterion.MAX_SOFTMAX, tuple(thresholds))
    entry = TargetEntry(
        TargetName.ONNXRUNTIME, Precision.FP32, tuple(s.path for s in specs), monolithic="model.onnx", thresholds=th
    )
    mean = (0.5,) * channels
    std = (0.25,) * channels
    manifest = Manifest(
        model_name="toy3",
        source="onnx",
        opset=OPSET,
        input=x,
        num_classes=num_classes,
        preprocess=Preprocess(size=(size, size), resize=resize, mean=mean, std=std, channels=channels),
        segments=specs,
        classes=None if classes is None else tuple(classes),
        targets={entry.key: entry},
    )
    with write_bundle(dest) as writer:
        onnx.save(mono, str(writer.path("model.onnx")))
        for s, m in zip(specs, segs, strict=True):
            onnx.save(m, str(writer.path(s.path)))
        if standalone:
            install_standalone(writer.dir)
        writer.manifest = manifest
    return dest


def toy_inputs(n: int, *, channels: int = 3, size: int = 8, seed: int = 1) -> np.ndarray:
    """Random preprocessed inputs for the toy bundle."""
    return np.random.default_rng(seed).standard_normal((n, channels, size, size)).astype(np.float32)


def run_in_threads(work: Callable[[int], None], n: int) -> list[BaseException]:
    """Run ``work(i)`` for i in 0..n-1, one thread each, all at once; what they raised.

    Tests assert on the returned list in the main thread (an exception in a thread would
    otherwise only be printed).
    """
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
