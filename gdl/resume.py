"""Resuming a download after a broken transfer: HTTP ``Range`` with ``If-Range``.

An attempt that fails on the wire (body cut short, connection lost, deadline)
after at least ``processor.resume_min_bytes`` of a 200 or 206 whose bytes a
validator pins down keeps its temp file as a :class:`Partial`, recorded on
the job (``partial_*`` status fields: path, bytes, validator, host). The
retry, when it runs on the same host and finds the file as recorded, asks
for the rest with ``Range: bytes=<N>-`` and ``If-Range: <validator>`` and
:func:`judge` decides what the answer means (RFC 9110 §13.1.5, §14, §15.3.7):

- a 206 whose ``Content-Range`` starts at N (and whose length is consistent)
  is appended to the kept prefix;
- a 200 (the range ignored, or the representation changed) replaces it;
- any other 206, or a 416, restarts without ``Range`` in the same attempt.

Only a strong validator qualifies: an ETag not marked weak, or, when the
response had no ETag at all, its Last-Modified provided the body was not
content-coded (dynamic gzip is not byte-stable). A weak ETag never does.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import gevent.event

from gdl import checksum, diskio, mime
from gdl.errors import ConnectionFailed, DownloadTimeout, StorageError, TruncatedBody
from gdl.filestorage.base import remove_quietly
from gdl.http import Headers, Response
from gdl.job import Job

log = logging.getLogger(__name__)

# The partial file is local: a retry on another host starts from zero.
HOST = socket.gethostname()

# Failures on the wire after which the bytes already received are still good.
RESUMABLE_ERRORS = (TruncatedBody, ConnectionFailed, DownloadTimeout)

# The job's status fields that record a kept partial file ("" / 0: none).
NO_PARTIAL: dict[str, Any] = {"partial_path": "", "partial_bytes": 0, "partial_validator": "", "partial_host": ""}

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Partial:
    """A kept partial download: its first ``size`` bytes at ``path`` on ``host``,
    of the representation ``validator`` names."""

    path: str
    size: int
    validator: str
    host: str = HOST

    def fields(self) -> dict[str, Any]:
        return {"partial_path": self.path, "partial_bytes": self.size, "partial_validator": self.validator,
                "partial_host": self.host}

    def range_headers(self) -> list[tuple[str, str]]:
        return [("Range", f"bytes={self.size}-"), ("If-Range", self.validator)]

    def remove(self) -> None:
        remove_quietly(self.path)


def recorded(job: Job) -> Partial | None:
    """The partial file the job's previous attempt kept, whichever host it is on; None if none."""
    s = job.status
    if not (s.partial_path and s.partial_bytes and s.partial_validator):
        return None
    return Partial(s.partial_path, s.partial_bytes, s.partial_validator, s.partial_host)


def usable(job: Job) -> Partial | None:
    """The job's partial file if this retry can append to it: on this host, the
    size recorded. A local file that does not match is removed."""
    partial = recorded(job)
    if partial is None or partial.host != HOST:
        return None
    try:
        size = os.stat(partial.path).st_size
    except OSError:
        return None
    if size != partial.size:
        log.info("job %s: partial file %s has %d bytes, %d recorded: starting from zero",
                 job.id, partial.path, size, partial.size)
        partial.remove()
        return None
    return partial


def discard(job: Job) -> None:
    """Remove the job's partial file, if one is recorded on this host (the job settled)."""
    partial = recorded(job)
    if partial is not None and partial.host == HOST:
        partial.remove()


def strong_validator(headers: Headers) -> str:
    """The validator an ``If-Range`` may carry for a response with ``headers``; "" if none."""
    etag = (headers.get("ETag") or "").strip()
    if etag:
        return "" if etag.startswith("W/") else etag
    last_modified = (headers.get("Last-Modified") or "").strip()
    encoding = (headers.get("Content-Encoding") or "").strip().lower()
    return last_modified if encoding in ("", "identity") else ""


def worth_keeping(job: Job, error: BaseException, size: int, validator: str, min_bytes: int) -> bool:
    """Whether a failed attempt's ``size`` bytes are kept for the retry to resume from."""
    return (min_bytes > 0 and size >= min_bytes and bool(validator) and isinstance(error, RESUMABLE_ERRORS)
            and not any(name.lower() == "range" for name in job.request_headers))


class Answer(StrEnum):
    """What a response to a range request means for the kept prefix."""

    APPEND = "append"  # 206 from the kept end on: append
    REPLACE = "replace"  # 200: the whole representation, new or unchanged; the prefix goes
    RESTART = "restart"  # a 206 from elsewhere, or a 416: ask again without Range
    OTHER = "other"  # any other status: handled as for any download


def judge(response: Response, start: int) -> Answer:
    """What ``response``, answering ``Range: bytes=<start>-``, means."""
    if response.status == 200:
        return Answer.REPLACE
    if response.status == 416:
        return Answer.RESTART
    if response.status != 206:
        return Answer.OTHER
    span = content_range(response.headers.get("Content-Range"))
    if span is None or span[0] != start or (span[2] is not None and span[1] + 1 != span[2]):
        return Answer.RESTART
    return Answer.APPEND


def content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``bytes first-last/length`` as (first, last, length or None for ``*``); None if absent or malformed."""
    found = _CONTENT_RANGE.match(value or "")
    if found is None:
        return None
    first, last = int(found.group(1)), int(found.group(2))
    if last < first:
        return None
    return first, last, None if found.group(3) == "*" else int(found.group(3))


def read_prefix(partial: Partial, digests: checksum.Digests) -> bytes:
    """Feed the kept prefix to ``digests`` (the whole file's digest covers it) and
    return its first :data:`mime.SNIFF_BYTES` (the mime check reads them)."""
    try:
        return diskio.off_hub(_digest_file, partial.path, partial.size, digests)
    except OSError as exc:
        raise StorageError(f"cannot read {partial.path}: {exc.strerror}") from exc


def _digest_file(path: str, size: int, digests: checksum.Digests) -> bytes:
    head = b""
    left = size
    with open(path, "rb") as file:
        while left > 0:
            block = file.read(min(left, 1024 * 1024))
            if not block:
                raise OSError(0, f"ended after {size - left} of {size} bytes")
            if len(head) < mime.SNIFF_BYTES:
                head += block[:mime.SNIFF_BYTES - len(head)]
            digests.update(block)
            left -= len(block)
    return head


def remove_stale(directory: str, *, older_than: float, now: float) -> int:
    """Remove scratch files untouched for ``older_than`` seconds before ``now``
    (epoch seconds): partial files whose job was retried on another host, or
    settled there, or forgotten. A download being written touches its file
    with every chunk. Returns how many went."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError as exc:
        log.warning("cannot list %s for stale partial files: %s", directory, exc.strerror)
        return 0
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < now - older_than:
                os.unlink(entry.path)
                removed += 1
                log.info("removed stale partial file %s", entry.path)
        except OSError:
            continue  # gone meanwhile, or not ours to remove
    return removed


class StalePartials:
    """Removes stale scratch files every ``processor.partial_ttl / 4`` seconds (see :func:`remove_stale`)."""

    def __init__(self, directory: str, *, ttl: float, clock: Callable[[], float] = time.time):
        self.directory = directory
        self.ttl = ttl
        self.clock = clock
        self._stopping = gevent.event.Event()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        while not self._stopping.wait(self.ttl / 4):
            diskio.off_hub(self.remove_once)

    def remove_once(self) -> int:
        return remove_stale(self.directory, older_than=self.ttl, now=self.clock())
