"""Exclusive locks on a directory that one process at a time may write: a training run, a search index.

``with exclusive_lock(directory, what="training run"):`` holds an OS-level ``flock`` on
``directory/.lock`` for the duration of the block and writes the holder's pid, host and start
time into that file, so that a second process is told exactly who holds it:

    training run 'runs/a' is in use by pid 4242 on host1 since 2026-12-03T08:00:01Z
    (lock file runs/a/.lock); wait for that process to finish, stop it, or choose another directory

The kernel releases a ``flock`` when its holder dies, even on ``kill -9``, so a lock is never
left stuck. A lock file that still names a process is therefore stale once the lock can be
taken; when that process was on this host and is gone, the new holder logs that it took the
lock over. ``timeout`` > 0 makes a second process wait that many seconds for the lock before
giving up; 0 fails at once.

Why not the ``filelock`` package: it truncates the lock file when it *tries* to take the lock,
which erases the holder's pid and host that the message above needs. ``fcntl.flock`` is POSIX
only; on other systems the lock is taken with an exclusive create of the file instead, which
cannot tell a dead holder from a live one (the message then says to remove the file by hand).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class LockHeld(RuntimeError):
    """Another process holds the lock; the message names it and the way out."""


def holder_info(text: str) -> dict[str, str]:
    """``pid``, ``host`` and ``since`` of a lock file's text ("?" where missing)."""
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    return {k: fields.get(k, "?") for k in ("pid", "host", "since")}


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(what: str, directory: Path, lock: Path, text: str) -> str:
    h = holder_info(text)
    who = f"pid {h['pid']} on {h['host']} since {h['since']}" if text.strip() else "another process"
    return (f"{what} '{directory}' is in use by {who} (lock file {lock}); wait for that process to finish, "
            "stop it, or choose another directory")


@contextlib.contextmanager
def exclusive_lock(directory: str | Path, what: str = "directory", timeout: float = 0.0,
                   poll: float = 0.2) -> Iterator[Path]:
    """Hold the lock on ``directory`` (created if missing) for the ``with`` block; raise ``LockHeld`` if taken."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK_NAME
    if fcntl is None:  # pragma: no cover - not POSIX
        yield from _exclusive_create(directory, lock, what, timeout, poll)
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise LockHeld(_describe(what, directory, lock, _holder_text(fd))) from None
                time.sleep(poll)
        previous = _read(fd)
        if previous.strip():
            h = holder_info(previous)
            here = h["host"] == socket.gethostname()
            gone = here and h["pid"].isdigit() and not pid_alive(int(h["pid"]))
            log.warning("%s '%s': took over a stale lock left by pid %s on %s%s", what, directory, h["pid"], h["host"],
                        " (that process is no longer running)" if gone else "")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        text = f"pid={os.getpid()} host={socket.gethostname()} since={stamp}\n".encode()
        os.pwrite(fd, text, 0)  # write, then cut what is left of a longer stale text: the file is never empty here
        os.ftruncate(fd, len(text))
        os.fsync(fd)
        try:
            yield lock
        finally:
            os.ftruncate(fd, 0)  # a clean release leaves an empty file: nothing stale to report
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _holder_text(fd: int, wait: float = 1.0) -> str:
    """The holder's stamp for the message. A holder writes it just after taking the lock, so a process that finds
    the lock taken within that instant reads an empty file; it re-reads for up to ``wait`` seconds before settling
    for "another process"."""
    end = time.monotonic() + wait
    text = _read(fd)
    while not text.strip() and time.monotonic() < end:
        time.sleep(0.02)
        text = _read(fd)
    return text


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", "replace")
    except OSError:
        return ""


def _exclusive_create(directory: Path, lock: Path, what: str, timeout: float, poll: float):  # pragma: no cover
    deadline = time.monotonic() + max(timeout, 0.0)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            if time.monotonic() >= deadline:
                raise LockHeld(_describe(what, directory, lock, lock.read_text(errors="replace"))
                               + "; if no such process runs, delete the lock file") from None
            time.sleep(poll)
    os.write(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode())
    os.close(fd)
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)
