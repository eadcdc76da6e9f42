"""Crash-safe file writes (temp file in the same folder, fsync, rename, fsync the folder), the
clean-up of what killed writers leave, and a lock on a folder shared by processes."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import time
from pathlib import Path


class LockTimeout(TimeoutError):
    """Another process held the folder's lock for longer than the caller would wait."""


@contextlib.contextmanager
def dir_lock(folder: str | os.PathLike, timeout: float | None = None):
    """Hold an exclusive flock on `folder` itself (no lock file is left behind), against other
    processes and, since every call opens its own descriptor, other threads. The lock goes
    with the process: a killed holder never leaves it stuck. With `timeout`, LockTimeout
    after that many seconds of waiting."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LockTimeout(f"{folder} is locked by another process") from None
                    time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def file_sha256(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in blocks (no whole-file copy in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(folder: str | os.PathLike, *, older_than_s: float = 600.0) -> list[Path]:
    """Delete the temp files atomic_write_* left behind when its process was killed
    (`.<name>.<random>.tmp`, untouched for `older_than_s`); returns what was removed. A writer
    in progress holds its temp file for milliseconds, far below the age limit."""
    removed = []
    now = time.time()
    try:
        candidates = list(Path(folder).glob(".*.tmp"))
    except OSError:
        return removed
    for p in candidates:
        try:
            st = p.lstat()
            if p.is_file() and not p.is_symlink() and now - st.st_mtime > older_than_s:
                p.unlink()
                removed.append(p)
        except OSError:
            continue
    return removed
