"""The bundle: one directory that every step reads and writes, described by ``manifest.json``.

Layout::

    bundle/
      manifest.json          the schema of :mod:`edgeperceiver.manifest`, with every other file's sha256
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
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from . import versioned
from .errors import BundleError
from .fsutil import atomic_write
from .manifest import (
    BATCH,
    MANIFEST,
    SCHEMA,
    Dim,
    Manifest,
    Preprocess,
    QuantizedGraph,
    SegmentSpec,
    TargetEntry,
    TensorSpec,
    Thresholds,
    target_key,
)

__all__ = [
    "BATCH",
    "MANIFEST",
    "SCHEMA",
    "Bundle",
    "BundleWriter",
    "Dim",
    "Manifest",
    "Preprocess",
    "QuantizedGraph",
    "SegmentSpec",
    "TargetEntry",
    "TensorSpec",
    "Thresholds",
    "check_destination",
    "edit_bundle",
    "is_bundle_dir",
    "sha256_file",
    "target_key",
    "write_bundle",
]


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
        for rel in referenced_paths(manifest):
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


def referenced_paths(m: Manifest) -> Iterator[str]:
    """Every bundle file the manifest names (model, segments, entries' files, quantization stage)."""
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
        for rel in referenced_paths(manifest):
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
