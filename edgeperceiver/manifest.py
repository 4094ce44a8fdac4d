"""The bundle's manifest schema: what a bundle is, as frozen dataclasses, and its JSON form.

``manifest.json`` (schema ``SCHEMA``) lists the model's input and preprocessing, the
segments (one per exit, their tensors and costs), the class names, every compiled target
entry (artifacts, thresholds, calibration summary, measured latency), the quantized
graph, and the sha256 of every other file. Reading checks types and ranges (a number no
real model has is a :class:`~edgeperceiver.errors.BundleError` blaming the manifest);
writing is strict JSON. Opening, verifying and writing bundles is :mod:`edgeperceiver.bundle`.

Standard library only: this module ships inside standalone bundles.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .errors import BundleError
from .types import Criterion, Precision, TargetName

SCHEMA = "edgeperceiver.bundle/1"
MANIFEST = "manifest.json"
BATCH = "batch"  #: the symbolic batch dimension in tensor shapes

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor; ``shape`` uses ``"batch"`` for the dynamic batch axis."""

    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    shape: tuple[Dim, ...]

    def per_sample_bytes(self) -> int:
        """Bytes of one sample of this tensor (the batch axis counted as 1)."""
        n = 1
        for d in self.shape:
            if isinstance(d, int):
                n *= d
        return n * _itemsize(self.dtype)


@dataclass(frozen=True)
class SegmentSpec:
    """Segment k (1-based ``index``) computes exit k from the image and earlier tensors.

    ``inputs`` are the model input and/or tensors made by earlier segments; ``outputs``
    are the exit logits (``exit``) plus every tensor a later segment reads. ``live_after``
    names the carried tensors still needed after this segment ran (from any segment so
    far), so the runtime can drop the rest.
    """

    index: int
    path: str
    exit: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    live_after: tuple[str, ...]
    params: int = 0
    flops: int = 0  #: multiply-accumulates per sample for this segment alone
    carried_bytes: int = 0  #: per-sample bytes of this segment's outputs read later


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes the model input (resize, centre crop, normalise)."""

    size: tuple[int, int]  #: (height, width) of the model input
    resize: int | None = None  #: shorter side before the centre crop; None = resize to size
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    channels: int = 3  #: 3 = RGB, 1 = grayscale
    interpolation: str = "bilinear"


@dataclass(frozen=True)
class Thresholds:
    """Per-exit thresholds on a :class:`Criterion` score; ``None`` disables an exit.

    The last enabled exit always takes every remaining sample, whatever its value.
    """

    criterion: Criterion
    values: tuple[float | None, ...]
    goal: str = "manual"  #: how they were chosen, e.g. "max_drop=0.5"


@dataclass(frozen=True)
class TargetEntry:
    """Artifacts of one compiled target/precision, keyed ``"<target>-<precision>"``.

    ``segments`` maps to one artifact path per segment (same order as the bundle's
    segments); ``metadata`` holds backend facts (versions, device, options);
    ``thresholds`` and ``calibration`` are filled by ``calibrate`` for this precision.
    """

    target: TargetName
    precision: Precision
    segments: tuple[str, ...]
    monolithic: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    thresholds: Thresholds | None = None
    calibration: Mapping[str, Any] = field(default_factory=dict)
    latency_ms: tuple[float, ...] = ()  #: measured cumulative latency to each exit, batch 1
    compiled: int = 0  #: manifest edit number of the compile that made it (0: made by export)
    calibrated: int = 0  #: edit number of its last calibration (0: never)

    @property
    def key(self) -> str:
        return target_key(self.target, self.precision)


@dataclass(frozen=True)
class QuantizedGraph:
    """The quantization stage: one quantized (QDQ) multi-exit graph and its cut segments.

    Every target that consumes explicit Q/DQ (ONNX Runtime INT8, TensorRT INT8) reads
    these files; ``tool``/``preset``/``config`` say how it was made and
    ``calibration_sha256`` which calibration images it saw.
    """

    model: str  #: the quantized monolithic graph
    segments: tuple[str, ...]  #: its cut, one per bundle segment
    tool: str  #: e.g. "nncf 2.19.0"
    preset: str  #: NNCF preset ("performance": symmetric activations)
    calibration_sha256: str
    calibration_images: int
    config: Mapping[str, Any] = field(default_factory=dict)  #: every quantizer setting
    format: str = "QDQ"


@dataclass(frozen=True)
class Manifest:
    """Everything a bundle is; ``files`` maps every relative path to its sha256."""

    model_name: str
    source: str  #: "checkpoint", "module" or "onnx"
    opset: int
    input: TensorSpec
    num_classes: int
    preprocess: Preprocess
    segments: tuple[SegmentSpec, ...]
    model_path: str = "model.onnx"
    classes: tuple[str, ...] | None = None
    targets: Mapping[str, TargetEntry] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA
    quantization: QuantizedGraph | None = None  #: the quantization stage, once made

    @property
    def exits(self) -> tuple[str, ...]:
        """Exit output names in order (exit k is made by segment k)."""
        return tuple(s.exit for s in self.segments)

    def target(self, name: str | TargetName | None = None) -> TargetEntry:
        """The target entry named ``"openvino-int8"``, or the only one of ``"openvino"``.

        ``None`` means the ONNX Runtime fp32 reference (the raw segments).
        """
        if name is None:
            name = target_key(TargetName.ONNXRUNTIME, Precision.FP32)
        name = name.value if isinstance(name, TargetName) else str(name)
        if name in self.targets:
            return self.targets[name]
        matches = [e for e in self.targets.values() if e.target.value == name]
        if len(matches) == 1:
            return matches[0]
        have = ", ".join(sorted(self.targets)) or "none"
        if not matches:
            raise BundleError(
                f"bundle has no target {name!r} (compiled targets: {have}); "
                f"run 'edgeperceiver compile BUNDLE --target {name.split('-')[0]}' first"
            )
        raise BundleError(f"target {name!r} is ambiguous, name one of: {have}")

    def with_target(self, entry: TargetEntry) -> Manifest:
        """A copy with ``entry`` added or replaced, stamped with the next edit number.

        An entry with thresholds records a calibration (``calibrated``), one without a compile
        (``compiled``): the runtime's default entry is the one calibrated last, else compiled last.
        """
        seq = 1 + max((max(e.compiled, e.calibrated) for e in self.targets.values()), default=0)
        if entry.thresholds is not None:
            entry = dataclasses.replace(entry, calibrated=seq)
        else:
            entry = dataclasses.replace(entry, compiled=seq, calibrated=0)
        return dataclasses.replace(self, targets={**self.targets, entry.key: entry})

    def to_json(self) -> str:
        """Strict JSON: infinities are written as the largest finite floats, NaN is refused."""
        try:
            return json.dumps(_to_jsonable(self), indent=1, sort_keys=False, allow_nan=False)
        except ValueError as exc:
            raise BundleError(f"manifest of {self.model_name!r} holds NaN, which JSON cannot hold ({exc})") from exc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        schema = data.get("schema")
        if schema != SCHEMA:
            raise BundleError(f"manifest schema {schema!r} is not supported (expected {SCHEMA!r})")
        try:
            return _manifest_from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"manifest is malformed: {type(exc).__name__}: {exc}") from exc


def target_key(target: TargetName, precision: Precision) -> str:
    return f"{target.value}-{precision.value}"


# --------------------------------------------------------------------------- (de)serialisation


def _itemsize(dtype: str) -> int:
    sizes = {
        "float32": 4,
        "float16": 2,
        "bfloat16": 2,
        "float64": 8,
        "int64": 8,
        "int32": 4,
        "int8": 1,
        "uint8": 1,
        "bool": 1,
    }
    if dtype not in sizes:
        raise BundleError(f"unsupported tensor dtype {dtype!r}")
    return sizes[dtype]


def _to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, Mapping):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, float) and math.isinf(obj):
        # no score reaches (or misses) the largest float: same behaviour as an infinite threshold
        return math.copysign(sys.float_info.max, obj)
    return obj


def _tensor(d: Mapping[str, Any]) -> TensorSpec:
    return TensorSpec(str(d["name"]), str(d["dtype"]), tuple(_dim(x) for x in d["shape"]))


def _dim(x: Any) -> Dim:
    if isinstance(x, bool) or not isinstance(x, (int, str)):
        raise ValueError(f"bad dimension {x!r}")
    return x


def _tensors(seq: Sequence[Mapping[str, Any]]) -> tuple[TensorSpec, ...]:
    return tuple(_tensor(t) for t in seq)


def _thresholds(d: Mapping[str, Any] | None) -> Thresholds | None:
    if d is None:
        return None
    values = tuple(None if v is None else float(v) for v in d["values"])
    return Thresholds(Criterion(d["criterion"]), values, str(d.get("goal", "manual")))


def _quantized(q: Mapping[str, Any] | None, num_segments: int) -> QuantizedGraph | None:
    if q is None:
        return None
    stage = QuantizedGraph(
        model=str(q["model"]),
        segments=tuple(str(x) for x in q["segments"]),
        tool=str(q["tool"]),
        preset=str(q["preset"]),
        calibration_sha256=str(q["calibration_sha256"]),
        calibration_images=int(q["calibration_images"]),
        config=dict(q.get("config", {})),
        format=str(q.get("format", "QDQ")),
    )
    if len(stage.segments) != num_segments:
        raise ValueError(f"the quantization stage has {len(stage.segments)} segments, bundle has {num_segments}")
    return stage


def _manifest_from_dict(d: Mapping[str, Any]) -> Manifest:
    segments = tuple(
        SegmentSpec(
            index=int(s["index"]),
            path=str(s["path"]),
            exit=str(s["exit"]),
            inputs=_tensors(s["inputs"]),
            outputs=_tensors(s["outputs"]),
            live_after=tuple(str(x) for x in s["live_after"]),
            params=int(s.get("params", 0)),
            flops=int(s.get("flops", 0)),
            carried_bytes=int(s.get("carried_bytes", 0)),
        )
        for s in d["segments"]
    )
    if [s.index for s in segments] != list(range(1, len(segments) + 1)):
        raise ValueError("segment indices must be 1..K in order")
    p = d["preprocess"]
    pre = Preprocess(
        size=(int(p["size"][0]), int(p["size"][1])),
        resize=None if p.get("resize") is None else int(p["resize"]),
        mean=tuple(float(x) for x in p["mean"]),
        std=tuple(float(x) for x in p["std"]),
        channels=int(p.get("channels", 3)),
        interpolation=str(p.get("interpolation", "bilinear")),
    )
    targets = {}
    for key, t in dict(d.get("targets", {})).items():
        entry = TargetEntry(
            target=TargetName(t["target"]),
            precision=Precision(t["precision"]),
            segments=tuple(str(x) for x in t["segments"]),
            monolithic=None if t.get("monolithic") is None else str(t["monolithic"]),
            metadata=dict(t.get("metadata", {})),
            thresholds=_thresholds(t.get("thresholds")),
            calibration=dict(t.get("calibration", {})),
            latency_ms=tuple(float(x) for x in t.get("latency_ms", ())),
            compiled=int(t.get("compiled", 0)),
            calibrated=int(t.get("calibrated", 0)),
        )
        if entry.key != key:
            raise ValueError(f"target key {key!r} does not match its entry {entry.key!r}")
        if len(entry.segments) != len(segments):
            raise ValueError(f"target {key!r} has {len(entry.segments)} segments, bundle has {len(segments)}")
        targets[key] = entry
    classes = d.get("classes")
    manifest = Manifest(
        model_name=str(d["model_name"]),
        source=str(d["source"]),
        opset=int(d["opset"]),
        input=_tensor(d["input"]),
        num_classes=int(d["num_classes"]),
        preprocess=pre,
        segments=segments,
        model_path=str(d.get("model_path", "model.onnx")),
        classes=None if classes is None else tuple(str(c) for c in classes),
        targets=targets,
        files={str(k): str(v) for k, v in dict(d.get("files", {})).items()},
        extra=dict(d.get("extra", {})),
        schema=str(d["schema"]),
        quantization=_quantized(d.get("quantization"), len(segments)),
    )
    _check_ranges(manifest)
    return manifest


#: bounds of the numbers a manifest may hold (beyond them a manifest is broken, not a model)
MAX_SIDE = 16384  #: pixels per side of the model input and of the resize
MAX_CLASSES = 1_000_000
MAX_DIM = 1 << 24  #: any fixed tensor dimension


def _in_range(what: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValueError(f"{what} = {value} is out of range [{low}, {high}]")


def _check_ranges(m: Manifest) -> None:
    """Refuse numbers no real model has, before anything allocates or divides by them."""
    _in_range("num_classes", m.num_classes, 1, MAX_CLASSES)
    pre = m.preprocess
    _in_range("preprocess.size[0] (height)", pre.size[0], 1, MAX_SIDE)
    _in_range("preprocess.size[1] (width)", pre.size[1], 1, MAX_SIDE)
    if pre.resize is not None:
        _in_range("preprocess.resize", pre.resize, 1, MAX_SIDE)
    if pre.channels not in (1, 3):
        raise ValueError(f"preprocess.channels = {pre.channels} must be 1 or 3")
    for what, values in (("mean", pre.mean), ("std", pre.std)):
        if len(values) not in (1, pre.channels) or not all(math.isfinite(v) for v in values):
            raise ValueError(f"preprocess.{what} = {list(values)} needs 1 or {pre.channels} finite values")
    if any(v == 0 for v in pre.std):
        raise ValueError(f"preprocess.std = {list(pre.std)} holds a zero")
    if m.classes is not None and len(m.classes) > MAX_CLASSES:
        raise ValueError(f"classes lists {len(m.classes)} names, more than {MAX_CLASSES}")
    if not m.segments:
        raise ValueError("segments is empty")
    tensors = [m.input, *(t for s in m.segments for t in (*s.inputs, *s.outputs))]
    for t in tensors:
        _itemsize(t.dtype)
        for dim in t.shape:
            if isinstance(dim, int):
                _in_range(f"a dimension of tensor {t.name!r}", dim, 0, MAX_DIM)
