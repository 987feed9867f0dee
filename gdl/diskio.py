"""Disk calls that can take milliseconds, run off the gevent hub.

A write to the page cache is quick, but ``fsync``, creating a file or a
directory and renaming can wait on the disk; made from a greenlet they stop
every other greenlet of the process meanwhile (measured: close to half the
processor's wall time on small files). These run in the hub's threadpool,
so only the calling greenlet waits.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import gevent
import gevent.threadpool

from gdl.errors import StartupError

T = TypeVar("T")


def off_hub(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in the hub's threadpool; exceptions come back to the caller."""
    return gevent.get_hub().threadpool.apply(fn, args)


def flush_sync_close(file: BinaryIO) -> None:
    """Flush ``file``, fsync it and close it, in one trip to the threadpool."""
    off_hub(_flush_sync_close, file)


def _flush_sync_close(file: BinaryIO) -> None:
    file.flush()
    os.fsync(file.fileno())
    file.close()


def write_new_file(directory: str, prefix: str, data: bytes | bytearray) -> str:
    """Create a temp file in ``directory`` holding ``data``, fsynced and closed;
    returns its path.

    Blocking: call it through :func:`off_hub` (or from a function that is)."""
    fd, path = tempfile.mkstemp("", prefix, directory)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        try:
            os.unlink(path)
        except OSError:
            pass  # the write failed first; that is the error to report
        raise
    return path


def sync_directory(directory: str) -> None:
    """fsync a directory, so that entries created or renamed in it are on disk.

    Blocking: call it through :func:`off_hub` (or from a function that is)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mkstemp(directory: str, prefix: str) -> tuple[int, str]:
    """A new temp file's descriptor and path (creating a file can wait on the disk).

    A caller interrupted meanwhile (a shutdown kills downloads in flight)
    never learns the path of the file the thread goes on to make: that file
    is closed and removed as soon as it exists, or nothing would."""
    result = gevent.get_hub().threadpool.spawn(tempfile.mkstemp, "", prefix, directory)
    try:
        return result.get()
    except BaseException:
        if not result.ready():
            result.rawlink(_remove_made_file)
        raise


def _remove_made_file(result: Any) -> None:
    if not result.successful():
        return
    fd, path = result.value
    try:
        os.close(fd)
        os.unlink(path)
    except OSError:
        pass  # gone already


class Writeback:
    """Starts the disk writing a big file's data while the file is still arriving.

    The kernel would otherwise keep gigabytes dirty until the fsync at the
    end of each download, which then waits for all of it (over a second for
    256 MiB here). Every :data:`STEP` bytes, :meth:`written` asks one
    background thread to call ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` on
    the range: it starts writeback and returns, but can block for tens of
    milliseconds when the disk is busy, so neither the hub nor the shared
    threadpool waits on it. A request is a hint: without ``sync_file_range``
    (not Linux), or with :data:`MAX_QUEUED` requests queued, it is dropped.
    The thread gets its own duplicate of the descriptor, so the file may
    close meanwhile.
    """

    STEP = 8 << 20
    MAX_QUEUED = 64
    _WRITE = 2  # SYNC_FILE_RANGE_WRITE (linux/fs.h)

    def __init__(self) -> None:
        self._sync_file_range = _libc_function("sync_file_range")
        self._thread: Any = None
        self.queued = 0
        self.requested = 0  # requests handed to the thread so far

    def written(self, fd: int, start: int, length: int) -> None:
        """``length`` bytes from ``start`` of ``fd`` are written: have them go to disk now."""
        if self._sync_file_range is None or self.queued >= self.MAX_QUEUED:
            return
        if self._thread is None:
            self._thread = gevent.threadpool.ThreadPool(1)
        own = os.dup(fd)
        self.queued += 1
        self.requested += 1
        self._thread.spawn(self._start, own, start, length).rawlink(self._done)

    def _start(self, fd: int, start: int, length: int) -> None:
        try:
            self._sync_file_range(fd, ctypes.c_int64(start), ctypes.c_int64(length), self._WRITE)
        finally:
            os.close(fd)

    def _done(self, _: Any) -> None:
        self.queued -= 1


def check_writable(key: str, path: str) -> None:
    """Create ``path`` if needed and prove we can write there, or fail naming ``key``
    (:class:`~gdl.errors.StartupError`). A startup check: it runs on the hub."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe = Path(path) / f".gdl-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StartupError(f"{key}: {path} is not writable: {exc.strerror or exc}") from exc


def _libc_function(name: str) -> Any:
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (AttributeError, OSError):
        return None


writeback = Writeback()
