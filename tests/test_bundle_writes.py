"""Bundle writes cannot lose data: the lock, the atomic swap, crash recovery, --force, modes, permissions.

The fault-injection tests stop a writer at every file-system call it makes (an exception in
process, and a real ``os._exit`` in a subprocess) and check that the bundle at its path is
then the old or the new version, whole, never absent or a mix.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_bundle import _write  # the toy bundle: model.onnx + two segments (bytes b"m", b"s1", b"s2")

from edgeperceiver import versioned
from edgeperceiver.bundle import MANIFEST, Bundle, check_destination, edit_bundle, write_bundle
from edgeperceiver.errors import BundleError

#: file-system calls a writer makes; the fault injection stops it at each one in turn
CALLS = ("mkdir", "link", "rename", "replace", "symlink", "fsync", "utime", "unlink", "open")


def _edit(root: Path, tag: str) -> None:
    with edit_bundle(root) as w:
        w.replace_file("segments/seg1.onnx", tag.encode())
        assert w.manifest is not None
        w.manifest = dataclasses.replace(w.manifest, extra={**w.manifest.extra, "tag": tag})


def _state(root: Path) -> str:
    """The version at ``root``, checked whole: its tag, and seg1 holds the same tag."""
    assert (root / MANIFEST).is_file(), f"{root} is absent"
    b = Bundle.open(root)  # verifies every checksum: a mix of versions would fail here
    tag = str(b.manifest.extra.get("tag", "old"))
    assert b.path("segments/seg1.onnx").read_bytes() == (b"s1" if tag == "old" else tag.encode())
    return tag


def _siblings(root: Path) -> list[str]:
    return sorted(p.name for p in root.parent.iterdir() if p.name != root.name)


def _plain(tmp_path: Path, name: str = "b") -> Path:
    """A bundle as an older release wrote it: a plain directory."""
    _write(tmp_path / "made")
    shutil.copytree(tmp_path / "made", tmp_path / name)
    shutil.rmtree(versioned.current(tmp_path / "made"))
    (tmp_path / "made").unlink()
    return tmp_path / name


# --------------------------------------------------------------------------- the swap


def test_a_bundle_is_a_link_to_its_current_version(tmp_path: Path) -> None:
    root = tmp_path / "b"
    _write(root)
    assert root.is_symlink() and os.readlink(root) == ".b.v1"
    _edit(root, "new")
    assert os.readlink(root) == ".b.v2" and _state(root) == "new"
    assert _siblings(root) == [".b.v1", ".b.v2"]  # the previous version stays for readers
    b = Bundle.open(root)
    assert b.root == root and b.location == tmp_path / ".b.v2"


def test_a_plain_directory_bundle_is_migrated_on_its_first_write(tmp_path: Path) -> None:
    root = _plain(tmp_path)
    assert _state(root) == "old"
    _edit(root, "new")
    assert root.is_symlink() and _state(root) == "new"
    assert _siblings(root) == [".b.v0", ".b.v1"]


class _Crash(BaseException):
    pass


def _crash_at(m: pytest.MonkeyPatch, k: int) -> None:
    """Make the k-th file-system call of the writer raise :class:`_Crash`."""
    count = [0]

    def step() -> None:
        count[0] += 1
        if count[0] == k:
            raise _Crash

    for name in CALLS:
        real = getattr(os, name)

        def fail(*a: Any, _real: Any = real, **kw: Any) -> Any:
            step()
            return _real(*a, **kw)

        m.setattr(os, name, fail)
    real_exchange = versioned._exchange

    def fail_exchange(a: Path, b: Path) -> bool:
        step()
        return real_exchange(a, b)

    m.setattr(versioned, "_exchange", fail_exchange)


@pytest.mark.parametrize("plain", [False, True], ids=["linked", "plain-directory"])
def test_an_exception_at_any_step_leaves_the_old_or_the_new_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plain: bool
) -> None:
    outcomes: list[str] = []
    k = 0
    while True:
        k += 1
        work = tmp_path / f"k{k}"
        work.mkdir()
        root = _plain(work) if plain else work / "b"
        if not plain:
            _write(root)
        with monkeypatch.context() as m:
            _crash_at(m, k)
            try:
                _edit(root, "new")
                done = True
            except _Crash:
                done = False
        outcomes.append(_state(root))
        _edit(root, "after")  # the next writer recovers whatever was left
        assert _state(root) == "after"
        assert not [n for n in _siblings(root) if n.endswith((".staging", ".link", ".lock"))]
        if done:
            break
    assert outcomes[-1] == "new" and set(outcomes) == {"old", "new"}
    assert k > 8  # every step of the write was hit


_KILL_AT = """
import dataclasses, os, sys
from edgeperceiver import versioned
from edgeperceiver.bundle import edit_bundle

k, count = int(sys.argv[2]), [0]
def stop():
    count[0] += 1
    if count[0] == k:
        os._exit(77)
for name in {calls!r}:
    real = getattr(os, name)
    def wrapped(*a, _real=real, **kw):
        stop()
        return _real(*a, **kw)
    setattr(os, name, wrapped)
real_exchange = versioned._exchange
def exchange(a, b):
    stop()
    return real_exchange(a, b)
versioned._exchange = exchange
with edit_bundle(sys.argv[1]) as w:
    w.replace_file("segments/seg1.onnx", b"new")
    w.manifest = dataclasses.replace(w.manifest, extra={{"tag": "new"}})
"""


@pytest.mark.slow
@pytest.mark.parametrize("plain", [False, True], ids=["linked", "plain-directory"])
def test_a_writer_killed_at_any_step_leaves_the_old_or_the_new_bundle(tmp_path: Path, plain: bool) -> None:
    script = tmp_path / "kill_at.py"
    script.write_text(_KILL_AT.format(calls=CALLS))
    outcomes: list[str] = []
    for k in range(1, 200):
        work = tmp_path / f"k{k}"
        work.mkdir()
        root = _plain(work) if plain else work / "b"
        if not plain:
            _write(root)
        proc = subprocess.run([sys.executable, str(script), str(root), str(k)], capture_output=True, text=True,
                              timeout=60, check=False)  # fmt: skip
        assert proc.returncode in (0, 77), proc.stderr
        outcomes.append(_state(root))  # right after the kill, before any recovery
        _edit(root, "after")
        assert _state(root) == "after"
        assert not [n for n in _siblings(root) if n.endswith((".staging", ".link", ".lock"))]
        if proc.returncode == 0:
            break
    else:
        pytest.fail("the writer never finished")
    assert outcomes[-1] == "new" and set(outcomes) == {"old", "new"}
    assert len(outcomes) > 8


def test_readers_never_miss_the_bundle_during_writes(tmp_path: Path) -> None:
    root = tmp_path / "b"
    _write(root)
    stop = threading.Event()
    errors: list[BaseException] = []
    opens = [0]

    def read() -> None:
        while not stop.is_set():
            try:
                _state(root)
                opens[0] += 1
            except BaseException as exc:  # collected and asserted below
                errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        for i in range(40):
            _edit(root, f"v{i}")
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert errors == [] and opens[0] > 0


def test_without_symlinks_a_bundle_stays_a_plain_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_symlinks(*_: Any, **__: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "symlink", no_symlinks)  # as on FAT or some network mounts
    root = tmp_path / "b"
    _write(root)
    _edit(root, "new")
    assert not root.is_symlink() and _state(root) == "new"
    assert _siblings(root) == []
    # killed between the two renames of the next write: the old version moved aside, the new
    # one complete under its version name, the path absent
    shutil.copytree(root, tmp_path / ".b.v9")
    os.rename(root, tmp_path / ".b.123-0000abcd.link")
    Bundle.open(root)  # the next reader puts the newest version in place
    assert _state(root) == "new"
    assert not root.is_symlink() and _siblings(root) == []


def test_a_deleted_bundle_stays_deleted(tmp_path: Path) -> None:
    root = tmp_path / "b"
    _write(root)
    _edit(root, "new")
    root.unlink()  # what 'rm -rf b' does to a link
    with pytest.raises(BundleError, match="not a bundle"):
        Bundle.open(root)
    assert _siblings(root) == []  # its hidden versions went with it
    _write(root)  # a new bundle of that name is not confused with the deleted one
    assert _state(root) == "old"


# --------------------------------------------------------------------------- the lock


def test_a_second_writer_waits_then_both_changes_are_kept(tmp_path: Path) -> None:
    root = tmp_path / "b"
    _write(root)
    inside, release = threading.Event(), threading.Event()

    def first() -> None:
        with edit_bundle(root) as w:
            inside.set()
            release.wait(30)
            assert w.manifest is not None
            w.manifest = dataclasses.replace(w.manifest, extra={**w.manifest.extra, "first": 1})

    t = threading.Thread(target=first)
    t.start()
    assert inside.wait(30)
    timer = threading.Timer(0.5, release.set)
    timer.start()
    with edit_bundle(root) as w:  # waits for the first writer, then starts from its manifest
        assert w.manifest is not None
        assert w.manifest.extra.get("first") == 1
        w.manifest = dataclasses.replace(w.manifest, extra={**w.manifest.extra, "second": 2})
    t.join()
    assert dict(Bundle.open(root).manifest.extra) == {"first": 1, "second": 2}


def test_a_writer_that_cannot_wait_names_the_holder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "b"
    _write(root)
    monkeypatch.setenv("EDGEPERCEIVER_LOCK_TIMEOUT", "0.2")
    with edit_bundle(root), pytest.raises(BundleError, match=rf"being written by another process \(pid {os.getpid()}:"):
        _edit(root, "blocked")
    assert _state(root) == "old"


# --------------------------------------------------------------------------- crash leftovers


_DIE_INSIDE = """
import os, signal, sys
from edgeperceiver.bundle import edit_bundle
with edit_bundle(sys.argv[1]) as w:
    w.path("half/written.bin").write_bytes(b"x" * 1000)
    os.kill(os.getpid(), getattr(signal, sys.argv[2]))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_staging_left_by_a_killed_writer_is_removed_next_time(tmp_path: Path, sig: str) -> None:
    root = tmp_path / "b"
    _write(root)
    proc = subprocess.run([sys.executable, "-c", _DIE_INSIDE, str(root), sig], capture_output=True, timeout=60,
                          check=False)  # fmt: skip
    assert proc.returncode == -getattr(signal, sig)
    assert [n for n in _siblings(root) if n.endswith(".staging")]  # what the killed writer left
    Bundle.open(root)  # a reader cleans up when no writer holds the lock
    assert _siblings(root) == [".b.v1"]
    _edit(root, "new")
    assert _state(root) == "new"


# --------------------------------------------------------------------------- overwrite and permissions


def test_force_replaces_only_a_bundle(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(BundleError, match=r"not an edgeperceiver bundle.*refusing to delete it"):
        _overwrite(folder)
    assert (folder / "holiday.jpg").read_bytes() == b"precious"
    with pytest.raises(BundleError, match="not an edgeperceiver bundle"):
        check_destination(folder, overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    _overwrite(empty)  # nothing to lose
    assert Bundle.open(empty).manifest.model_name == "toy"
    bundle = tmp_path / "b"
    _write(bundle)
    _overwrite(bundle)
    assert _state(bundle) == "old"
    plain = _plain(tmp_path, "p")
    _overwrite(plain)
    assert plain.is_symlink() and _state(plain) == "old"


def _overwrite(dest: Path) -> None:
    with write_bundle(dest, overwrite=True) as w:
        for rel, data in (("model.onnx", b"m"), ("segments/seg1.onnx", b"s1"), ("segments/seg2.onnx", b"s2")):
            w.path(rel).write_bytes(data)
        from test_bundle import _manifest

        w.manifest = _manifest()


def test_the_current_directory_is_never_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "b"
    _write(root)
    monkeypatch.chdir(root)
    with pytest.raises(BundleError, match="current directory"):
        _overwrite(Path("."))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BundleError, match="current directory"):
        check_destination(".", overwrite=True)


def test_files_follow_the_umask(tmp_path: Path) -> None:
    for mask, dirs, files in ((0o022, 0o755, 0o644), (0o027, 0o750, 0o640)):
        old = os.umask(mask)
        try:
            root = tmp_path / f"b{mask:o}"
            _write(root)
            _edit(root, "new")
        finally:
            os.umask(old)
        here = versioned.current(root)
        assert stat.S_IMODE(here.stat().st_mode) == dirs
        assert stat.S_IMODE((here / "segments").stat().st_mode) == dirs
        for name in (MANIFEST, "segments/seg1.onnx", "segments/seg2.onnx"):
            assert stat.S_IMODE((here / name).stat().st_mode) == files, name


def _chmod_tree(root: Path, writable: bool) -> None:
    for p in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        p.chmod(mode | 0o200 if writable else mode & ~0o222)


def test_a_read_only_bundle_is_not_replaced(tmp_path: Path) -> None:
    root = tmp_path / "b"
    _write(root)
    here = versioned.current(root)
    _chmod_tree(here, writable=False)
    try:
        with pytest.raises(BundleError, match="read-only"):
            _edit(root, "new")
        with pytest.raises(BundleError, match="read-only"):
            _overwrite(root)
    finally:
        _chmod_tree(here, writable=True)
    assert _state(root) == "old"


def test_a_read_only_parent_is_a_clear_error(tmp_path: Path) -> None:
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(BundleError, match="not writable"):
            _write(parent / "b")
    finally:
        parent.chmod(0o755)
    assert list(parent.iterdir()) == []


def test_long_bundle_names(tmp_path: Path) -> None:
    root = tmp_path / ("n" * 240)
    _write(root)
    _edit(root, "new")
    assert _state(root) == "new"
    assert all(len(n) < 100 for n in _siblings(root))
    with pytest.raises(BundleError, match="over 255 bytes"):
        _write(tmp_path / ("n" * 300))


def test_lock_waiters_survive_the_lock_file_being_removed(tmp_path: Path) -> None:
    root = tmp_path / "b"
    _write(root)
    done: list[int] = []

    def writer(i: int) -> None:
        with edit_bundle(root) as w:
            assert w.manifest is not None
            time.sleep(0.01)
            w.manifest = dataclasses.replace(w.manifest, extra={**w.manifest.extra, f"w{i}": i})
        done.append(i)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(done) == list(range(8))
    assert dict(Bundle.open(root).manifest.extra) == {f"w{i}": i for i in range(8)}
