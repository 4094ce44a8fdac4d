"""Pack a bundle into one archive for the device: plain files, verified, optionally trimmed.

A bundle path is a symlink to its current version (:mod:`edgeperceiver.versioned`), which
``cp -r``, ``rsync -a`` and ``tar`` copy as a link. :func:`pack_bundle` writes the current
version's files under one top-level directory named after the bundle, as plain files:
``tar xf`` on the device gives a bundle that ``python bundle/run.py`` and ``runtime.load``
open as they are. Every file is checked against the manifest's sha256 on the way in, and
the finished archive is read back and checked again before it replaces ``out`` (atomically).

``entries`` keeps only the named compiled entries: the others' directories
(``<entry>/``, ``reports/<entry>/``), the files only they reference and the shared quantized
graph (an input of ``compile``) unless a kept entry runs it are left out, and the manifest in
the archive lists what remains.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from .bundle import MANIFEST, Bundle, referenced_paths
from .errors import BundleError, InputError
from .fsutil import temp_name
from .manifest import Manifest

#: archive suffix -> tarfile write mode
FORMATS = {".tar": "w", ".tar.gz": "w:gz", ".tgz": "w:gz", ".tar.xz": "w:xz"}
_EXECUTABLE = frozenset({"run.py"})


@dataclasses.dataclass(frozen=True)
class PackReport:
    """What :func:`pack_bundle` wrote."""

    archive: Path
    top: str  #: the archive's top-level directory (the bundle's name)
    entries: tuple[str, ...]  #: the compiled entries the packed bundle holds
    files: int  #: files in the archive, the manifest included
    bytes_in: int  #: size of those files
    bytes_out: int  #: size of the archive


def archive_mode(out: Path) -> str:
    """The tarfile write mode for ``out``'s suffix; an :class:`InputError` for any other."""
    name = out.name.lower()
    for suffix, mode in FORMATS.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return mode
    raise InputError(f"{out}: the archive name must end in {', '.join(FORMATS)}")


def trimmed(manifest: Manifest, keep: Sequence[str]) -> Manifest:
    """``manifest`` with only the entries ``keep`` and the files they (or the bundle itself) need."""
    missing = [k for k in keep if k not in manifest.targets]
    if missing:
        have = ", ".join(sorted(manifest.targets)) or "none"
        raise InputError(f"no entry {', '.join(map(repr, missing))} in the bundle (its entries: {have})")
    kept = {k: manifest.targets[k] for k in manifest.targets if k in keep}
    quant = manifest.quantization
    runs = set(referenced_paths(dataclasses.replace(manifest, targets=kept, quantization=None)))
    if quant is not None and not runs & {quant.model, *quant.segments}:
        quant = None  # the shared quantized graph is an input of compiles, and no kept entry runs it
    needed = set(referenced_paths(dataclasses.replace(manifest, targets=kept, quantization=quant)))
    unneeded = set(referenced_paths(manifest)) - needed
    prefixes = tuple(p for k in manifest.targets if k not in kept for p in (f"{k}/", f"reports/{k}/"))
    files = {
        rel: digest for rel, digest in manifest.files.items()
        if rel in needed or not (rel in unneeded or rel.startswith(prefixes))
    }  # fmt: skip
    return dataclasses.replace(manifest, targets=kept, files=files, quantization=quant)


def pack_bundle(
    bundle: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    entries: Iterable[str] | None = None,
    overwrite: bool = False,
) -> PackReport:
    """Write ``bundle`` (its current version, verified) to the archive ``out``.

    ``entries``: keep only these compiled entries (default: all). ``overwrite`` replaces an
    existing ``out`` file. Raises :class:`InputError` for a bad name or destination and
    :class:`BundleError` when a file fails its checksum.
    """
    out = Path(out)
    mode = archive_mode(out)
    b = Bundle.open(bundle)
    keep = None if entries is None else tuple(dict.fromkeys(entries))
    manifest = b.manifest if keep is None else trimmed(b.manifest, keep)
    _check_out(out, b, overwrite)
    top = Path(bundle).name or "bundle"
    data = manifest.to_json().encode("utf-8") if keep is not None else (b.location / MANIFEST).read_bytes()
    tmp = temp_name(out)
    size_in = len(data)
    try:
        with open(tmp, "xb") as raw:
            with tarfile.open(fileobj=raw, mode=mode) as tar:  # type: ignore[call-overload]
                head = _member(f"{top}/{MANIFEST}", (b.location / MANIFEST).stat(), 0o644, len(data))
                tar.addfile(head, io.BytesIO(data))
                for rel in sorted(manifest.files):
                    size_in += _add(tar, b, top, rel, manifest.files[rel])
            raw.flush()
            os.fsync(raw.fileno())
        _check_archive(tmp, top, manifest)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return PackReport(out, top, tuple(manifest.targets), len(manifest.files) + 1, size_in, out.stat().st_size)


def _check_out(out: Path, b: Bundle, overwrite: bool) -> None:
    if out.is_dir():
        raise InputError(f"{out} is a directory; name the archive file to write")
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise InputError(f"{out}: directory {out.parent} does not exist")
    if out.parent.resolve().is_relative_to(b.location.resolve()):
        raise InputError(f"{out} is inside the bundle it packs; write it elsewhere")


def _member(name: str, st: os.stat_result, mode: int, size: int | None = None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = st.st_size if size is None else size
    info.mode = mode
    info.mtime = int(st.st_mtime)
    info.uname = info.gname = ""
    return info


def _add(tar: tarfile.TarFile, b: Bundle, top: str, rel: str, digest: str) -> int:
    """Add one bundle file, hashing the bytes that go in; returns its size."""
    path = b.path(rel)
    mode = 0o755 if rel in _EXECUTABLE else 0o644
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            reader = _Hashing(f)
            tar.addfile(_member(f"{top}/{rel}", st, mode), reader)
    except OSError as exc:
        raise BundleError(f"bundle {b.root}: cannot pack {rel} ({exc}); nothing written") from exc
    if reader.hash.hexdigest() != digest:
        raise BundleError(f"bundle {b.root}: {rel} fails its checksum (changed while packing?); nothing written")
    return st.st_size


class _Hashing:
    """A reader that hashes what it reads (tarfile copies from it block by block)."""

    def __init__(self, f: io.BufferedReader) -> None:
        self.f = f
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.hash.update(data)
        return data


def _check_archive(path: Path, top: str, manifest: Manifest) -> None:
    """Read the written archive back: every listed file present once, with its sha256."""
    seen: set[str] = set()
    with tarfile.open(path) as tar:
        for member in tar:
            rel = member.name.removeprefix(f"{top}/")
            f = tar.extractfile(member)
            if f is None or rel in seen:
                raise BundleError(f"{path}: archive member {member.name} is not a single file")
            seen.add(rel)
            if rel != MANIFEST and hashlib.sha256(f.read()).hexdigest() != manifest.files.get(rel):
                raise BundleError(f"{path}: {member.name} does not match the manifest after writing")
    if seen != {MANIFEST, *manifest.files}:
        raise BundleError(f"{path}: the archive lacks {sorted({MANIFEST, *manifest.files} - seen)[:3]}")
