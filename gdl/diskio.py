"""Disk calls that can take milliseconds, run off the gevent hub.

A write to the page cache is quick, but ``fsync``, creating a file or a
directory and renaming can wait on the disk; made from a greenlet they stop
every other greenlet of the process meanwhile (measured: close to half the
processor's wall time on small files). These run in the hub's threadpool,
so only the calling greenlet waits.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

import gevent

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
