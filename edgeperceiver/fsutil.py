"""Files that are never half written: atomic writes, an exclusive lock, strict JSON, the cache root.

* :func:`atomic_write` writes a sibling temporary file, fsyncs it, renames it over the
  destination and fsyncs the directory: a reader sees the old or the new content, never a
  mix, even after a crash. New files and directories follow the user's umask
  (:func:`make_dir` too), so a service running as another user can read what was written.
* :class:`FileLock` is an exclusive ``flock`` on a lock file; a second holder waits up to a
  timeout, then fails with a :class:`~edgeperceiver.errors.BundleError` naming the holder
  (pid and command). The kernel drops the lock when its process dies, so a crash never
  leaves a stale lock.
* :func:`cache_root` is the one root of every cache: ``$EDGEPERCEIVER_CACHE``, else
  ``$XDG_CACHE_HOME/edgeperceiver``, else ``~/.cache/edgeperceiver``.

Standard library only: this module ships inside standalone bundles.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

from .errors import BundleError

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory entry (a rename or a new file in it) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def make_dir(path: str | os.PathLike[str]) -> Path:
    """Create one new directory (not its parents) with mode 0777 minus the umask."""
    os.mkdir(path, 0o777)
    return Path(path)


def temp_name(path: Path, tag: str = "tmp") -> Path:
    """A fresh hidden sibling name of ``path`` that fits the file-name limit."""
    stem = path.name if len(path.name) <= 180 else path.name[:180]
    return path.with_name(f".{stem}.{os.getpid()}-{secrets.token_hex(4)}.{tag}")


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, fsync of the directory).

    The file gets 0666 minus the umask, or ``mode`` minus the umask (e.g. 0o755 for a
    script). The parent directory must exist. An existing ``path`` is replaced by a new
    inode, so a hard link to the old file keeps the old content.
    """
    path = Path(path)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def cache_root() -> Path:
    """The root of every edgeperceiver cache (calibration records, TensorRT timing caches).

    ``$EDGEPERCEIVER_CACHE`` when set, else ``$XDG_CACHE_HOME/edgeperceiver``, else
    ``~/.cache/edgeperceiver``. Each cache uses its own subdirectory of it.
    """
    own = os.environ.get("EDGEPERCEIVER_CACHE")
    if own:
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "edgeperceiver"


# --------------------------------------------------------------------------- locking


def _holder_text() -> str:
    argv = " ".join(sys.argv) if sys.argv else sys.executable
    return f"pid {os.getpid()}: {argv[:300]}"


class FileLock:
    """An exclusive advisory lock (``flock``) on ``path``, created if missing.

    ``timeout`` seconds to wait for another holder (0: fail at once); on timeout a
    :class:`BundleError` names the holder from the lock file's content. ``what`` names the
    protected thing in messages. Re-entrant within one process is not supported.
    With ``remove`` the holder deletes the lock file on release; a waiter that then gets
    the lock on the deleted file notices (its inode is no longer at ``path``) and retries.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, timeout: float = 600.0, what: str = "", remove: bool = False
    ) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.what = what or str(self.path)
        self.remove = remove
        self._fd: int | None = None

    def holder(self) -> str:
        """Who holds (or last held) the lock, as written in the lock file."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            return "unknown"
        return text or "unknown"

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no locking
            return
        deadline = time.monotonic() + self.timeout
        delay = 0.01
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise BundleError(f"cannot create the lock file {self.path} for {self.what}: {exc.strerror}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    raise BundleError(
                        f"{self.what} is being written by another process ({self.holder()}); "
                        f"waited {self.timeout:g} s. Retry when it has finished"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
                continue
            except OSError as exc:
                os.close(fd)
                raise BundleError(f"cannot lock {self.path} for {self.what}: {exc.strerror}") from exc
            if self._same_file(fd):
                break
            os.close(fd)  # locked a lock file its last holder had already removed: try again
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, (_holder_text() + "\n").encode("utf-8", "replace"), 0)
        self._fd = fd

    def _same_file(self, fd: int) -> bool:
        try:
            here, there = os.fstat(fd), os.stat(self.path)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            with contextlib.suppress(OSError):
                if self.remove:
                    os.unlink(self.path)
                else:
                    os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
