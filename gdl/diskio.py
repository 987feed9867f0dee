"""Disk calls that can take milliseconds, run off the gevent hub.

A write to the page cache is quick, but ``fsync``, creating a file or a
directory and renaming can wait on the disk; made from a greenlet they stop
every other greenlet of the process meanwhile (measured: close to half the
processor's wall time on small files). These run in the hub's threadpool,
so only the calling greenlet waits.

An exception in a pool thread comes back to the caller as a value and is
raised there (:func:`_capture`): left to gevent, the hub would also print
it to stderr itself (its traceback and a ``ThreadPoolWorker ... failed
with`` line), beside the caller's log line and outside ``logging``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import gevent
import gevent.threadpool
from gevent.event import AsyncResult

from gdl.errors import StartupError

T = TypeVar("T")
log = logging.getLogger(__name__)


class _Raised:
    """An exception raised in a pool thread, carried back to the hub as a value."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


def _capture(fn: Callable[..., T], args: tuple) -> T | _Raised:
    """Run in the pool thread: what ``fn`` returns or raises, never an exception for gevent to print."""
    try:
        return fn(*args)
    except BaseException as exc:  # every failure goes back to the caller, which logs it (once)
        return _Raised(exc)


def _unwrap(value: T | _Raised) -> T:
    if isinstance(value, _Raised):
        error, value.error = value.error, None  # type: ignore[assignment]  # no cycle through the frame
        raise error
    return value


def off_hub(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in the hub's threadpool; exceptions come back to the caller."""
    return _unwrap(gevent.get_hub().threadpool.apply(_capture, (fn, args)))


class Started:
    """A call running in the hub's threadpool (:func:`start_off_hub`); :meth:`wait` for its result."""

    __slots__ = ("_result",)

    def __init__(self, fn: Callable[..., Any], args: tuple) -> None:
        self._result = gevent.get_hub().threadpool.spawn(_capture, fn, args)

    def wait(self) -> Any:
        """The call's return value, or its exception raised here. Waiting again after an
        interrupt (a killed greenlet cleaning up) waits for the same call."""
        return _unwrap(self._result.get())


def start_off_hub(fn: Callable[..., Any], *args: object) -> Started:
    """Start ``fn(*args)`` in the hub's threadpool and return at once (see :class:`Started`)."""
    return Started(fn, args)


def off_hub_shared(fn: Callable[..., T], *args: object) -> T:
    """Like :func:`off_hub`, sharing the trip with other greenlets' calls (see :class:`TripSharer`)."""
    hub = gevent.get_hub()
    sharer = _SHARERS.get(hub)
    if sharer is None:
        sharer = _SHARERS[hub] = TripSharer(hub)
    return sharer.run(fn, args)


class TripSharer:
    """Group commit for the disk: calls queued while earlier ones are in the
    threadpool go there together, one trip (and one thread hand-off each way)
    for all of them, run one after another, each with its own result or error.

    On small files every download ends in one such call (write, fsync, rename,
    fsync the directory); one trip each cost the processor more CPU in thread
    hand-offs and GIL contention than the disk work itself. A lone call goes
    at once, as with :func:`off_hub`; at most :data:`TRIPS` trips run at a
    time, of at most :data:`MAX_BATCH` calls each, so one slow fsync delays
    a few calls, not the process's.
    """

    TRIPS = 4
    MAX_BATCH = 16

    def __init__(self, hub: Any):
        self.hub = hub
        self._pending: list[tuple[Callable[..., Any], tuple, AsyncResult]] = []
        self._trips = 0
        self.batches = 0  # trips made, for the curious (tests, benchmarks)
        self.calls = 0

    def run(self, fn: Callable[..., T], args: tuple) -> T:
        result: AsyncResult = AsyncResult()
        self._pending.append((fn, args, result))
        if self._trips < self.TRIPS:
            self._trips += 1
            gevent.spawn(self._flush)
        return _unwrap(result.get())

    def _flush(self) -> None:
        try:
            while self._pending:
                batch = self._pending[:self.MAX_BATCH]
                del self._pending[:self.MAX_BATCH]
                try:
                    values = self.hub.threadpool.apply(_capture_all, ([(fn, args) for fn, args, _ in batch],))
                except BaseException as exc:  # killed, or the pool failed: every caller hears of it
                    for _, _, result in batch:
                        result.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                self.batches += 1
                self.calls += len(batch)
                for (_, _, result), value in zip(batch, values):
                    result.set(value)
        finally:
            self._trips -= 1
            if self._pending and not self._trips:  # queued while a kill unwound us: keep them moving
                self._trips += 1
                gevent.spawn(self._flush)


def _capture_all(calls: list[tuple[Callable[..., Any], tuple]]) -> list[Any]:
    """Run in the pool thread: :func:`_capture` of each call, in order."""
    return [_capture(fn, args) for fn, args in calls]


_SHARERS: weakref.WeakKeyDictionary[Any, TripSharer] = weakref.WeakKeyDictionary()


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
        # os-level calls, no file object: each call releases and retakes the
        # GIL, which the hub's thread holds most of the time (fdopen's fstat,
        # flush and close were three more trips of this thread through it).
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
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
    result = gevent.get_hub().threadpool.spawn(_capture, tempfile.mkstemp, ("", prefix, directory))
    try:
        return _unwrap(result.get())
    except BaseException:
        if not result.ready():
            result.rawlink(_remove_made_file)
        raise


def _remove_made_file(result: Any) -> None:
    if not result.successful() or isinstance(result.value, _Raised):
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
        self._thread.spawn(_capture, self._start, (own, start, length)).rawlink(self._done)

    def _start(self, fd: int, start: int, length: int) -> None:
        try:
            self._sync_file_range(fd, ctypes.c_int64(start), ctypes.c_int64(length), self._WRITE)
        finally:
            os.close(fd)

    def _done(self, result: Any) -> None:
        self.queued -= 1
        if isinstance(result.value, _Raised):  # a hint that failed: worth a line, not a traceback
            log.warning("disk: writeback request failed: %s", result.value.error)


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
