"""A directory whose path is never absent and never half written: versions behind a symlink.

A bundle at ``parent/NAME`` is stored as::

    parent/
      NAME -> .NAME.v7      the path users name: a relative symlink to the current version
      .NAME.v7/             the current version
      .NAME.v6/             the previous one (kept while readers may still read it)
      .NAME.lock            the writers' lock (present only while one writes)

A writer holds the lock (:func:`lock`), stages the new content in a fresh sibling directory
(:func:`new_staging`), and :func:`publish` fsyncs it, renames it to the next version, and
swaps the symlink with one ``rename`` of a temporary symlink over ``NAME``: at every instant
``NAME`` is the old or the new version. A directory made by an older release (a plain
directory at ``NAME``) is migrated on its first write with Linux's ``RENAME_EXCHANGE``, also
in one step. A writer killed at any point leaves at most a staging directory, an unpublished
version or a temporary link; :func:`recover` (run by the next writer, and by readers that
find leftovers and a free lock) removes them. Deleting ``NAME`` (``rm -r NAME`` removes the
link only) leaves its hidden versions, removed the same way the next time ``NAME`` is
opened or written.

Readers resolve ``NAME`` once (:func:`current`) and read that version's files, so a write
during a read cannot mix versions. Copying a bundle elsewhere follows the link:
``cp -rL``, ``tar -h``, ``rsync -L`` (or copy ``NAME/.`` ).

Standard library only: this module ships inside standalone bundles.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import time
from pathlib import Path

from .errors import BundleError
from .fsutil import FileLock, fsync_dir, make_dir

#: seconds a superseded version stays for readers that resolved the link just before a swap
GRACE_S = 30.0
_RENAME_EXCHANGE = 2
#: errno values of a file system that cannot make symlinks (EPERM, EOPNOTSUPP, ENOSYS)
_NO_SYMLINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS})


def prefix(path: Path) -> str:
    """The hidden name stem of ``path``'s siblings (hashed when the name is long)."""
    name = path.name
    if len(os.fsencode(name)) <= 200:
        return "." + name
    return "." + name[:40] + "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:16]


def _version_re(path: Path) -> re.Pattern[str]:
    return re.compile(re.escape(prefix(path)) + r"\.v(\d+)")


def real_path(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute; a symlink that is not one of ours is followed (a user's alias)."""
    p = Path(os.path.abspath(path))
    for _ in range(40):
        if not p.is_symlink():
            return p
        target = os.readlink(p)
        if _version_re(p).fullmatch(target):
            return p
        p = Path(os.path.abspath(p.parent / target))
    raise BundleError(f"{path}: too many levels of symbolic links")


def linked_version(path: Path) -> int | None:
    """The version number ``path`` links to, or ``None`` when it is not one of our links."""
    if not path.is_symlink():
        return None
    m = _version_re(path).fullmatch(os.readlink(path))
    return None if m is None else int(m.group(1))


def current(path: str | os.PathLike[str]) -> Path:
    """The directory to read now: the version ``path`` links to, or ``path`` itself."""
    p = real_path(path)
    n = linked_version(p)
    return p if n is None else p.with_name(f"{prefix(p)}.v{n}")


def lock(path: Path, *, timeout: float, what: str) -> FileLock:
    """The writers' lock of ``path`` (not yet acquired)."""
    return FileLock(path.with_name(prefix(path) + ".lock"), timeout=timeout, what=what, remove=True)


def new_staging(path: Path) -> Path:
    """A fresh, empty staging directory beside ``path`` (mode 0777 minus the umask)."""
    return make_dir(_aside(path, "staging"))


def _versions(path: Path) -> dict[int, Path]:
    pattern = _version_re(path)
    found: dict[int, Path] = {}
    with os.scandir(path.parent) as it:
        for e in it:
            m = pattern.fullmatch(e.name)
            if m is not None and e.is_dir(follow_symlinks=False):
                found[int(m.group(1))] = Path(e.path)
    return found


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(dirpath)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two names (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish(path: Path, staging: Path) -> Path:
    """Make ``staging`` the content of ``path`` in one atomic step; return the directory now read.

    Call with the lock held. The previous content stays readable as the previous version.
    Where the file system has no symlinks, ``path`` stays a plain directory, replaced by
    two renames (see :func:`_publish_without_links`).
    """
    _fsync_tree(staging)
    versions = _versions(path)
    old = linked_version(path)
    n = max([*versions, old or 0]) + 1
    version = path.with_name(f"{prefix(path)}.v{n}")
    os.rename(staging, version)
    link = _new_link(path, version)
    if link is None:
        _publish_without_links(path, version)
        return path
    fsync_dir(path.parent)
    plain = path.is_dir() and not path.is_symlink()
    if not plain:
        os.replace(link, path)  # one rename: NAME is the old link or the new one, never absent
    elif _exchange(link, path):
        # a plain directory of an older release: swapped for the link in one step; it is now
        # the previous version
        os.rename(link, path.with_name(f"{prefix(path)}.v0"))
    else:  # pragma: no cover - no RENAME_EXCHANGE (not Linux): two renames, repaired by recover()
        os.rename(path, path.with_name(f"{prefix(path)}.v0"))
        os.replace(link, path)
    fsync_dir(path.parent)
    if old is not None and old in versions:
        with contextlib.suppress(OSError):
            os.utime(versions[old])  # superseded now: its grace period starts
    return version


def _aside(path: Path, tag: str) -> Path:
    return path.with_name(f"{prefix(path)}.{os.getpid()}-{secrets.token_hex(4)}.{tag}")


def _new_link(path: Path, version: Path) -> Path | None:
    """A fresh temporary symlink beside ``path`` to ``version``; None where symlinks are unsupported."""
    link = _aside(path, "link")
    try:
        os.symlink(version.name, link)
    except OSError as exc:
        if exc.errno not in _NO_SYMLINKS:
            raise
        return None
    return link


def _publish_without_links(path: Path, version: Path) -> None:
    """On a file system without symlinks (FAT, some network mounts): two renames.

    Between them the path is briefly absent; a crash there is repaired by :func:`recover`
    (the new version is renamed into place).
    """
    if path.exists():
        os.rename(path, _aside(path, "link"))  # removed by recover() as a leftover
    os.rename(version, path)
    fsync_dir(path.parent)


def _relink(path: Path, version: Path) -> None:
    """Point ``path`` at ``version`` (or move it there where symlinks are not supported)."""
    link = _new_link(path, version)
    if link is None:
        os.rename(version, path)
    else:
        os.replace(link, path)
    fsync_dir(path.parent)


def _moved_aside(path: Path) -> bool:
    """True when an old plain directory sits at a temporary name (see :func:`_publish_without_links`)."""
    pattern = re.compile(re.escape(prefix(path)) + r"\.\d+-[0-9a-f]{8}\.link")
    with os.scandir(path.parent) as it:
        return any(pattern.fullmatch(e.name) and e.is_dir(follow_symlinks=False) for e in it)


def leftovers(path: Path) -> list[Path]:
    """Staging directories, temporary links and versions that :func:`recover` would remove now."""
    p = prefix(path)
    cur = linked_version(path)
    versions = _versions(path)
    keep = {cur}
    older = [n for n in versions if cur is not None and n < cur]
    if older:
        keep.add(max(older))
    now = time.time()
    out: list[Path] = []
    for n, d in versions.items():
        if n in keep:
            continue
        with contextlib.suppress(OSError):
            if cur is None or n > cur or now - d.stat().st_mtime > GRACE_S:
                out.append(d)
    with os.scandir(path.parent) as it:
        for e in it:
            if e.name.startswith(p + ".") and (e.name.endswith(".staging") or e.name.endswith(".link")):
                rest = e.name[len(p) + 1 :]
                if re.fullmatch(r"\d+-[0-9a-f]{8}\.(staging|link)", rest):
                    out.append(Path(e.path))
    return out


def recover(path: Path) -> None:
    """Undo what a killed writer left (call with the lock held): restore the link, remove leftovers."""
    if not path.exists() and not path.is_symlink() and _moved_aside(path):
        # killed between the two renames of a file system without symlinks: the newest
        # version is complete, put it in place (a path absent for any other reason was
        # deleted on purpose, and its hidden versions are removed below)
        versions = _versions(path)
        if versions:
            _relink(path, versions[max(versions)])
    for leftover in leftovers(path):
        if leftover.is_symlink() or leftover.is_file():
            with contextlib.suppress(OSError):
                leftover.unlink()
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def try_recover(path: Path) -> None:
    """:func:`recover` if leftovers exist and no writer holds the lock; never raises."""
    try:
        if not leftovers(path):
            return
        held = lock(path, timeout=0, what=str(path))
        held.acquire()
    except (OSError, BundleError):
        return
    try:
        with contextlib.suppress(OSError):
            recover(path)
    finally:
        held.release()
