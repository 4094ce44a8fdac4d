"""The bundle: one directory that every step reads and writes, described by ``manifest.json``.

Layout::

    bundle/
      manifest.json          this schema (``SCHEMA``), with the sha256 of every other file
      model.onnx             the monolithic multi-exit model
      segments/seg1.onnx ... one segment per exit (segment k computes exit k)
      <target>-<precision>/  compiled artifacts of one target (``TargetEntry``)
      edgeperceiver/, run.py the standalone runtime (stdlib + numpy + one backend)

Writes cannot lose data. Writers of one bundle take turns under an exclusive lock; each
stages the new bundle in a sibling directory (an edit such as compile or calibrate starts
from a hard-linked copy of the current version) and publishes it with one atomic rename of
a symlink (:mod:`edgeperceiver.versioned`): the bundle's path is always the old or the new
version, never absent or mixed, and a killed writer's leftovers are removed by the next
one. Overwriting replaces only a bundle; a read-only bundle is refused. Files follow the
user's umask. Loading verifies the schema, the ranges of its numbers, that every path
stays inside the bundle, every file's sha256, and that no unlisted file is present.

Standard library only: this module ships inside standalone bundles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Any

from . import versioned
from .errors import BundleError
from .fsutil import atomic_write
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


# --------------------------------------------------------------------------- loading

#: the largest manifest read (a bundle's manifest is a few hundred KiB at most)
MAX_MANIFEST_BYTES = 64 << 20
#: ``.pyc`` files Python may leave beside a bundle's shipped runtime (not bundle content)
_BYTECODE = re.compile(r"(?:.*/)?__pycache__/[^/]+\.pyc")


@dataclass(frozen=True)
class Bundle:
    """An opened, verified bundle directory.

    ``root`` is the path as given; ``dir`` the directory read (the version ``root`` linked to
    when it was opened, see :mod:`edgeperceiver.versioned`): every file comes from that one
    version even if a writer replaces the bundle meanwhile.
    """

    root: Path
    manifest: Manifest
    dir: Path | None = None

    @property
    def location(self) -> Path:
        """The directory this bundle's files are read from."""
        return self.root if self.dir is None else self.dir

    def path(self, rel: str) -> Path:
        """Absolute path of a bundle file; refuses paths that leave the bundle."""
        return _inside(self.location, rel)

    @classmethod
    def open(cls, root: str | os.PathLike[str], *, verify: bool = True) -> Bundle:
        """Open ``root``; with ``verify`` check every listed file's presence and sha256.

        A bundle replaced by a writer while it is being read is read again (its new version).
        """
        root = Path(root)
        with contextlib.suppress(OSError, BundleError):
            versioned.try_recover(versioned.real_path(root))
        for attempt in range(8):
            try:
                location = versioned.current(root)
            except OSError as exc:
                raise BundleError(f"{root}: cannot read the bundle ({exc.strerror})") from exc
            try:
                return cls._open_at(root, location, verify)
            except (BundleError, OSError) as exc:
                with contextlib.suppress(OSError, BundleError):
                    if attempt < 7 and versioned.current(root) != location:
                        continue  # replaced while reading: read the new version
                if isinstance(exc, OSError):
                    raise BundleError(f"{root}: cannot read the bundle ({exc})") from exc
                raise
        raise BundleError(f"{root}: replaced by writers too often while reading; try again")  # pragma: no cover

    @classmethod
    def _open_at(cls, root: Path, location: Path, verify: bool) -> Bundle:
        mpath = location / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{root} is not a bundle: no {MANIFEST} (create one with 'edgeperceiver export')")
        try:
            if mpath.stat().st_size > MAX_MANIFEST_BYTES:
                raise BundleError(f"{root / MANIFEST}: manifest is over {MAX_MANIFEST_BYTES >> 20} MiB; not a manifest")
            data = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{root / MANIFEST}: unreadable manifest ({exc})") from exc
        except RecursionError:
            raise BundleError(f"{root / MANIFEST}: manifest nests too deeply; not a valid manifest") from None
        if not isinstance(data, dict):
            raise BundleError(f"{root / MANIFEST}: manifest is not a JSON object")
        try:
            manifest = Manifest.from_dict(data)
        except BundleError as exc:
            raise BundleError(f"{root / MANIFEST}: {exc}") from exc
        for rel in _referenced_paths(manifest):
            _inside(location, rel)
            if rel not in manifest.files:
                raise BundleError(f"{root / MANIFEST}: {rel!r} is referenced but has no checksum in 'files'")
        bundle = cls(root, manifest, None if location == root else location)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Check that every file listed in the manifest exists with its sha256, and no other file exists.

        An unlisted file could be read without a checksum (e.g. an ONNX model's external
        data), so its presence is an error; only Python's ``__pycache__`` is tolerated.
        """
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
        for rel in _unlisted(self.location, self.manifest.files):
            raise BundleError(
                f"bundle {self.root}: {rel} is not listed in the manifest, so it has no checksum "
                "(added after the bundle was written?); remove it or re-export the bundle"
            )


def _unlisted(location: Path, files: Mapping[str, str]) -> Iterator[str]:
    for dirpath, _dirs, names in os.walk(location):
        for name in names:
            rel = Path(dirpath, name).relative_to(location).as_posix()
            if rel != MANIFEST and rel not in files and not _BYTECODE.fullmatch(rel):
                yield rel


def _referenced_paths(m: Manifest) -> Iterator[str]:
    yield m.model_path
    for s in m.segments:
        yield s.path
    for t in m.targets.values():
        yield from t.segments
        if t.monolithic:
            yield t.monolithic
    if m.quantization is not None:
        yield m.quantization.model
        yield from m.quantization.segments


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


def is_bundle_dir(path: Path) -> bool:
    """True when ``path`` is a directory holding an edgeperceiver manifest (any schema version)."""
    try:
        data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and str(data.get("schema", "")).startswith("edgeperceiver.bundle/")


# --------------------------------------------------------------------------- writing

#: seconds a writer waits for another writer of the same bundle (``$EDGEPERCEIVER_LOCK_TIMEOUT``)
LOCK_TIMEOUT_S = 600.0


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
        return atomic_write(self.path(rel), data)

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
        atomic_write(self.dir / MANIFEST, manifest.to_json().encode("utf-8"))
        self.manifest = manifest


def write_bundle(dest: str | os.PathLike[str], *, overwrite: bool = False) -> AbstractContextManager[BundleWriter]:
    """Stage a new bundle and publish it at ``dest`` only if the block succeeds.

    ``overwrite`` replaces an existing bundle (or an empty directory), never anything else.
    """
    return _transaction(Path(dest), edit=False, overwrite=overwrite)


def edit_bundle(root: str | os.PathLike[str]) -> AbstractContextManager[BundleWriter]:
    """Edit a bundle atomically: the original stays untouched unless the block succeeds.

    Writers of one bundle take turns (an exclusive lock), and the edit starts from the
    manifest as it is once the lock is held, so no writer's change is lost.
    """
    return _transaction(Path(root), edit=True, overwrite=False)


def _lock_timeout() -> float:
    raw = os.environ.get("EDGEPERCEIVER_LOCK_TIMEOUT")
    if raw is None:
        return LOCK_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise BundleError(f"$EDGEPERCEIVER_LOCK_TIMEOUT must be a number of seconds, got {raw!r}") from None
    return max(0.0, value)


def _writable(path: Path) -> bool:
    """Writable by us, and by someone at all (root ignores permission bits; a bundle made read-only stays so)."""
    try:
        st = path.stat()
    except OSError:
        return False
    return os.access(path, os.W_OK) and bool(st.st_mode & 0o222)


def check_destination(dest: str | os.PathLike[str], *, overwrite: bool = False, edit: bool = False) -> None:
    """Refuse, before any work, a destination :func:`write_bundle` (or :func:`edit_bundle`) would refuse.

    A new bundle needs a writable parent and a name that fits; an existing path is replaced
    only with ``overwrite``, and only when it is a bundle (or an empty directory) and not read-only.
    """
    _check_name(Path(dest))
    try:
        _check_destination(versioned.real_path(dest), edit=edit, overwrite=overwrite)
    except OSError as exc:
        raise BundleError(f"cannot write the bundle {dest}: {exc.strerror or exc}") from exc


def _check_name(dest: Path) -> None:
    name = Path(os.path.abspath(dest)).name
    if not name or len(os.fsencode(name)) > 255:
        raise BundleError(f"{dest}: not a usable bundle name (empty, or over 255 bytes)")


def _check_destination(dest: Path, *, edit: bool, overwrite: bool) -> None:
    _check_name(dest)
    cwd = Path.cwd().resolve()
    if dest.exists() and (cwd == dest.resolve() or cwd.is_relative_to(dest.resolve())):
        raise BundleError(f"{dest}: refusing to replace the current directory or one above it")
    if not dest.parent.is_dir():
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BundleError(f"cannot create {dest.parent} for the bundle: {exc.strerror}") from exc
    if not _writable(dest.parent):
        raise BundleError(f"cannot write the bundle {dest.name}: its directory {dest.parent} is not writable")
    if not dest.exists():
        if edit:
            raise BundleError(f"{dest} is not a bundle: no such directory (create one with 'edgeperceiver export')")
        return
    if not edit and not overwrite:
        raise BundleError(f"{dest} already exists (pass overwrite / --force to replace it)")
    location = versioned.current(dest)
    if not location.is_dir():
        raise BundleError(f"{dest} exists and is not a directory; refusing to replace it")
    if not edit and not is_bundle_dir(location):
        if any(location.iterdir()):
            raise BundleError(
                f"{dest} exists and is not an edgeperceiver bundle (no valid {MANIFEST}); "
                "--force only replaces a bundle: refusing to delete it"
            )
        return
    manifest = location / MANIFEST
    if not _writable(location) or (manifest.exists() and not _writable(manifest)):
        raise BundleError(f"bundle {dest} is read-only; refusing to replace it (make it writable first)")


@contextmanager
def _transaction(dest: Path, *, edit: bool, overwrite: bool) -> Iterator[BundleWriter]:
    """Lock, recover leftovers, stage (a hard-linked copy when editing), publish on success."""
    raw = dest
    _check_name(dest)
    try:
        dest = versioned.real_path(dest)
        _check_destination(dest, edit=edit, overwrite=overwrite)
        lock = versioned.lock(dest, timeout=_lock_timeout(), what=f"bundle {raw}")
    except OSError as exc:
        raise BundleError(f"cannot write the bundle {raw}: {exc.strerror or exc}") from exc
    with lock:
        try:
            versioned.recover(dest)
            _check_destination(dest, edit=edit, overwrite=overwrite)  # again, now that we hold the lock
            base = Bundle.open(dest) if edit else None
            staging = versioned.new_staging(dest)
        except OSError as exc:
            raise BundleError(f"cannot write the bundle {raw}: {exc.strerror or exc}") from exc
        try:
            if base is not None:
                _link_files(base, staging)
            writer = BundleWriter(staging, None if base is None else base.manifest)
            yield writer
            writer._finish()
            versioned.publish(dest, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        with contextlib.suppress(OSError):
            versioned.recover(dest)  # old versions past their grace period


def _link_files(bundle: Bundle, staging: Path) -> None:
    for rel in bundle.manifest.files:
        src, dst = bundle.path(rel), staging / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


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
        model=str(q["model"]), segments=tuple(str(x) for x in q["segments"]), tool=str(q["tool"]),
        preset=str(q["preset"]), calibration_sha256=str(q["calibration_sha256"]),
        calibration_images=int(q["calibration_images"]), config=dict(q.get("config", {})),
        format=str(q.get("format", "QDQ")),
    )
    if len(stage.segments) != num_segments:
        raise ValueError(f"the quantization stage has {len(stage.segments)} segments, bundle has {num_segments}")
    return stage


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
            compiled=int(t.get("compiled", 0)), calibrated=int(t.get("calibrated", 0)),
        )
        if entry.key != key:
            raise ValueError(f"target key {key!r} does not match its entry {entry.key!r}")
        if len(entry.segments) != len(segments):
            raise ValueError(f"target {key!r} has {len(entry.segments)} segments, bundle has {len(segments)}")
        targets[key] = entry
    classes = d.get("classes")
    manifest = Manifest(
        model_name=str(d["model_name"]), source=str(d["source"]), opset=int(d["opset"]),
        input=_tensor(d["input"]), num_classes=int(d["num_classes"]), preprocess=pre,
        segments=segments, model_path=str(d.get("model_path", "model.onnx")),
        classes=None if classes is None else tuple(str(c) for c in classes),
        targets=targets, files={str(k): str(v) for k, v in dict(d.get("files", {})).items()},
        extra=dict(d.get("extra", {})), schema=str(d["schema"]),
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
