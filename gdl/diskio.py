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
from typing import TypeVar

import gevent

T = TypeVar("T")


def off_hub(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in the hub's threadpool; exceptions come back to the caller."""
    return gevent.get_hub().threadpool.apply(fn, args)


def fsync(fd: int) -> None:
    off_hub(os.fsync, fd)


def fsync_dir(directory: str) -> None:
    off_hub(_fsync_dir, directory)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mkstemp(directory: str, prefix: str) -> tuple[int, str]:
    return off_hub(tempfile.mkstemp, "", prefix, directory)


def makedirs(directory: str) -> None:
    off_hub(os.makedirs, directory, 0o777, True)


def replace(source: str, target: str) -> None:
    off_hub(os.replace, source, target)
