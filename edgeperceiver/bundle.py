"""The bundle: one directory that every step reads and writes, described by ``manifest.json``.

Layout::

    bundle/
      manifest.json          this schema (``SCHEMA``), with the sha256 of every other file
      model.onnx             the monolithic multi-exit model
      segments/seg1.onnx ... one segment per exit (segment k computes exit k)
      <target>-<precision>/  compiled artifacts of one target (``TargetEntry``)
      edgeperceiver/, run.py the standalone runtime (stdlib + numpy + one backend)

Writes are atomic: a new bundle is staged in a sibling temporary directory and renamed
into place; an edit (compile, calibrate) stages a hard-linked copy, so the original is
untouched until the new manifest is complete. Loading verifies the schema, that every
path stays inside the bundle, and every file's sha256.

Standard library only: this module ships inside standalone bundles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path, PurePosixPath
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

    @property
    def key(self) -> str:
        return target_key(self.target, self.precision)


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
        """A copy with ``entry`` added or replaced."""
        return dataclasses.replace(self, targets={**self.targets, entry.key: entry})

    def to_json(self) -> str:
        return json.dumps(_to_jsonable(self), indent=1, sort_keys=False)

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


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Bundle:
    """An opened, verified bundle directory."""

    root: Path
    manifest: Manifest

    def path(self, rel: str) -> Path:
        """Absolute path of a bundle file; refuses paths that leave the bundle."""
        return _inside(self.root, rel)

    @classmethod
    def open(cls, root: str | os.PathLike[str], *, verify: bool = True) -> Bundle:
        """Open ``root``; with ``verify`` check every listed file's presence and sha256."""
        root = Path(root)
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{root} is not a bundle: no {MANIFEST} (create one with 'edgeperceiver export')")
        try:
            data = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{mpath}: unreadable manifest ({exc})") from exc
        if not isinstance(data, dict):
            raise BundleError(f"{mpath}: manifest is not a JSON object")
        manifest = Manifest.from_dict(data)
        for rel in _referenced_paths(manifest):
            _inside(root, rel)
            if rel not in manifest.files:
                raise BundleError(f"{mpath}: {rel!r} is referenced but has no checksum in 'files'")
        bundle = cls(root, manifest)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Check that every file listed in the manifest exists with its sha256."""
        for rel, digest in self.manifest.files.items():
            p = self.path(rel)
            if not p.is_file():
                raise BundleError(f"bundle {self.root}: {rel} is missing (bundle truncated?)")
            got = sha256_file(p)
            if got != digest:
                raise BundleError(
                    f"bundle {self.root}: {rel} fails its checksum (tampered or corrupt): "
                    f"sha256 {got[:12]}... != manifest {digest[:12]}..."
                )


def _referenced_paths(m: Manifest) -> Iterator[str]:
    yield m.model_path
    for s in m.segments:
        yield s.path
    for t in m.targets.values():
        yield from t.segments
        if t.monolithic:
            yield t.monolithic


def _inside(root: Path, rel: str) -> Path:
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or not rel or "\\" in rel:
        raise BundleError(f"bundle path {rel!r} leaves the bundle directory; refusing it")
    resolved = (root / pure).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise BundleError(f"bundle path {rel!r} leaves the bundle directory; refusing it")
    return root / pure


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- writing


class BundleWriter:
    """A staging directory for a new or edited bundle (see :func:`write_bundle`, :func:`edit_bundle`).

    Write files under ``writer.dir`` (always new files: staged files may be hard links to
    the original bundle, so never modify one in place — use :meth:`replace_file` or write
    elsewhere and move). Set ``writer.manifest`` before the context exits.
    """

    def __init__(self, staging: Path, manifest: Manifest | None) -> None:
        self.dir = staging
        self.manifest = manifest

    def path(self, rel: str) -> Path:
        p = _inside(self.dir, rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def replace_file(self, rel: str, data: bytes) -> Path:
        """Write ``data`` to ``rel`` as a new inode (safe when ``rel`` is a hard link)."""
        p = self.path(rel)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, p)
        return p

    def _finish(self) -> None:
        if self.manifest is None:
            raise BundleError("internal: bundle writer closed without a manifest")
        files: dict[str, str] = {}
        for p in sorted(self.dir.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                rel = p.relative_to(self.dir).as_posix()
                files[rel] = sha256_file(p)
        manifest = dataclasses.replace(self.manifest, files=files)
        for rel in _referenced_paths(manifest):
            if rel not in files:
                raise BundleError(f"internal: manifest references {rel!r} but the bundle has no such file")
        tmp = self.dir / (MANIFEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(manifest.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / MANIFEST)
        self.manifest = manifest


def write_bundle(dest: str | os.PathLike[str], *, overwrite: bool = False) -> AbstractContextManager[BundleWriter]:
    """Stage a new bundle and rename it to ``dest`` only if the block succeeds."""
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise BundleError(f"{dest} already exists (pass overwrite / --force to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return _staged(dest, None)


def edit_bundle(root: str | os.PathLike[str]) -> AbstractContextManager[BundleWriter]:
    """Edit a bundle atomically: the original stays untouched unless the block succeeds."""
    bundle = Bundle.open(root)
    return _staged(bundle.root, bundle)


@contextmanager
def _staged(dest: Path, base: Bundle | None) -> Iterator[BundleWriter]:
    """A sibling staging directory (hard-linked copy of ``base``), swapped in on success."""
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".staging", dir=dest.parent))
    try:
        if base is not None:
            _link_files(base, staging)
        writer = BundleWriter(staging, None if base is None else base.manifest)
        yield writer
        writer._finish()
        _swap_into_place(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _link_files(bundle: Bundle, staging: Path) -> None:
    for rel in bundle.manifest.files:
        src, dst = bundle.root / rel, staging / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def _swap_into_place(staging: Path, dest: Path) -> None:
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        try:
            os.replace(staging, dest)
        except BaseException:
            os.replace(old, dest)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, dest)


# --------------------------------------------------------------------------- (de)serialisation


def _itemsize(dtype: str) -> int:
    sizes = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4,
             "int8": 1, "uint8": 1, "bool": 1}
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


def _manifest_from_dict(d: Mapping[str, Any]) -> Manifest:
    segments = tuple(
        SegmentSpec(
            index=int(s["index"]), path=str(s["path"]), exit=str(s["exit"]),
            inputs=_tensors(s["inputs"]), outputs=_tensors(s["outputs"]),
            live_after=tuple(str(x) for x in s["live_after"]),
            params=int(s.get("params", 0)), flops=int(s.get("flops", 0)),
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
        mean=tuple(float(x) for x in p["mean"]), std=tuple(float(x) for x in p["std"]),
        channels=int(p.get("channels", 3)), interpolation=str(p.get("interpolation", "bilinear")),
    )
    targets = {}
    for key, t in dict(d.get("targets", {})).items():
        entry = TargetEntry(
            target=TargetName(t["target"]), precision=Precision(t["precision"]),
            segments=tuple(str(x) for x in t["segments"]),
            monolithic=None if t.get("monolithic") is None else str(t["monolithic"]),
            metadata=dict(t.get("metadata", {})), thresholds=_thresholds(t.get("thresholds")),
            calibration=dict(t.get("calibration", {})),
            latency_ms=tuple(float(x) for x in t.get("latency_ms", ())),
        )
        if entry.key != key:
            raise ValueError(f"target key {key!r} does not match its entry {entry.key!r}")
        if len(entry.segments) != len(segments):
            raise ValueError(f"target {key!r} has {len(entry.segments)} segments, bundle has {len(segments)}")
        targets[key] = entry
    classes = d.get("classes")
    return Manifest(
        model_name=str(d["model_name"]), source=str(d["source"]), opset=int(d["opset"]),
        input=_tensor(d["input"]), num_classes=int(d["num_classes"]), preprocess=pre,
        segments=segments, model_path=str(d.get("model_path", "model.onnx")),
        classes=None if classes is None else tuple(str(c) for c in classes),
        targets=targets, files={str(k): str(v) for k, v in dict(d.get("files", {})).items()},
        extra=dict(d.get("extra", {})), schema=str(d["schema"]),
    )
