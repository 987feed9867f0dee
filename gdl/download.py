"""One HTTP download into a temp file.

:class:`Downloader` sends a job's GET through one HTTP engine
(:mod:`gdl.http`: ``curl`` or ``requests``, ``http.engine``) for one proxy
(or none); :class:`Downloaders` shares it between every aggregation pool of
a process that uses that proxy. :meth:`Downloader.fetch` streams the body,
exactly as served, into a temp file in the scratch directory (``processor.storage_dir``), checking the job's
mime patterns on the first bytes and reading the image size at the end. It
returns a :class:`Fetched` or raises a :class:`~gdl.errors.DownloadError`
subclass; on every failure the temp file is gone. Where the file goes next
is :mod:`gdl.filestorage`'s business; this module knows nothing of Redis.

Everything above the engine's one hop is here, the same for every engine:
redirects are followed hop by hop (each hop's scheme checked, http and https
only; a redirect's body dropped after at most a few KiB; ``max_redirects``
hops), cookies set by one hop go to the next ones, credentials are dropped
on a change of host, the guard's proxy rules apply, and the size limit,
mime check and whole-download deadline hold. The engine applies the guard
(:class:`~gdl.netguard.AddressGuard`) to every connection it makes.
"""

from __future__ import annotations

import email.utils
import logging
import os
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.cookiejar import CookieJar
from typing import BinaryIO
from urllib.parse import urljoin, urlsplit

import gevent
from requests.utils import requote_uri

from gdl import diskio, mime
from gdl.errors import (
    BlockedAddress,
    DownloadError,
    DownloadTimeout,
    HTTPStatusError,
    InvalidURL,
    MimeMismatch,
    StorageError,
    TooLarge,
    TooManyRedirects,
    TruncatedBody,
)
from gdl.http import DEFAULT_ENGINE, Exchange, Headers, Response, make_engine
from gdl.http.base import wire_url
from gdl.job import Job
from gdl.netguard import AddressGuard

log = logging.getLogger(__name__)

# Redirect statuses that carry a Location to follow (as requests follows).
REDIRECTS = frozenset({301, 302, 303, 307, 308})


@dataclass
class Fetched:
    """A complete download: in its temp file (``path``), or, when its
    Content-Length fitted one chunk, in memory (``body``; ``path`` is "")."""

    path: str
    size: int
    response_code: int
    mime: str
    image_size: str
    body: bytes | None = None


@dataclass
class _Attempt:
    """What one fetch has got so far, for cleanup and for errors raised by the deadline."""

    response_code: int = 0
    temp: _TempFile | None = None


class Downloader:
    """Downloads jobs through one HTTP engine, direct or through one proxy.

    With a ``guard``, every connection (the URL's host, each redirect hop's,
    the proxy's) is checked by the engine, and a target reached through the
    proxy is checked here as far as its URL shows.
    """

    def __init__(self, *, proxy: str, default_headers: dict[str, str], scratch_dir: str, chunk_size: int,
                 max_bytes: int = 0, max_redirects: int = 10, guard: AddressGuard | None = None,
                 pool_size: int = 10, hosts: int = 10, engine: str = DEFAULT_ENGINE,
                 ca_bundle: str | None = None):
        self.scratch_dir = scratch_dir  # partial downloads: processor.storage_dir
        self.chunk_size = chunk_size
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.proxy = proxy
        self.guard = guard
        self.default_headers = dict(default_headers)
        self.http = make_engine(engine, guard=guard, pool_size=pool_size, hosts=hosts, ca_bundle=ca_bundle)

    def close(self) -> None:
        self.http.close()

    def fetch(self, job: Job, *, timeout: float) -> Fetched:
        """Download ``job.url`` into a temp file within ``timeout`` seconds, all phases included."""
        attempt = _Attempt()
        # One deadline over connect, every read and every write: a server that
        # drips a byte a second never trips a per-read timeout.
        deadline = gevent.Timeout(timeout)
        deadline.start()
        try:
            return self._fetch(job, timeout, attempt)
        except BaseException as exc:
            deadline.cancel()
            if attempt.temp is not None:
                attempt.temp.discard()
            if exc is deadline:
                raise DownloadTimeout(f"download did not finish within {timeout:g}s",
                                      response_code=attempt.response_code) from exc
            if isinstance(exc, DownloadError) and not exc.response_code:
                # Errors raised after the response arrived carry its status.
                exc.response_code = attempt.response_code
            raise
        finally:
            deadline.cancel()

    def _fetch(self, job: Job, timeout: float, attempt: _Attempt) -> Fetched:
        response = self._request(job, timeout)
        with response:
            attempt.response_code = response.status
            check_status(response)
            declared = self._check_declared_length(response)
            # A body declared to fit one chunk stays in memory: the storage then
            # writes it in one trip to the threadpool, not two.
            small = declared is not None and declared <= self.chunk_size
            attempt.temp = _TempFile(self.scratch_dir, prefix=job.id + ".", in_memory=self.chunk_size if small else 0)
            found_mime = self._stream_body(job, response, declared, attempt.temp)
            body = attempt.temp.finish()
        size = attempt.temp.size
        image_size = None
        if job.extract_image_size:
            image_size = mime.image_size(attempt.temp.path if body is None else body, found_mime)
        log.debug("job %s: fetched %d bytes of %s (%d) from %s", job.id, size, found_mime,
                  response.status, response.url)
        return Fetched(path=attempt.temp.path, size=size, response_code=response.status,
                       mime=found_mime, image_size=image_size or "", body=body)

    def _request(self, job: Job, timeout: float) -> Response:
        """Send the GET and follow redirects; returns with the final response's head read."""
        url = job.url
        headers = _overlay(self.default_headers, job.request_headers)
        cookies = CookieJar()  # cookies set by one hop go to the next ones, as browsers do
        for hop in range(self.max_redirects + 1):
            try:
                response = self._send(url, headers, cookies, timeout)
            except BlockedAddress as exc:
                if hop:
                    raise BlockedAddress(f"{exc}, at redirect {hop} to {url}") from exc
                raise
            location = _location(response)
            if location is None:
                return response
            cookies.extract_cookies(_CookieResponse(response.headers), urllib.request.Request(url))  # type: ignore[arg-type]
            response.discard()
            if hop == self.max_redirects:
                raise TooManyRedirects(f"more than {self.max_redirects} redirects (security.max_redirects)",
                                       response_code=response.status)
            next_url = redirect_url(url, location)
            if should_strip_auth(url, next_url):
                headers.pop("authorization", None)
            headers.pop("cookie", None)  # from here on, cookies come from the jar only (as in requests)
            url = next_url
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _send(self, url: str, headers: dict[str, tuple[str, str]], cookies: CookieJar,
              timeout: float) -> Response:
        """One GET, no redirect followed."""
        self._check_url(url)
        pairs = list(headers.values())
        if len(cookies) and "cookie" not in headers:
            request = urllib.request.Request(url)
            cookies.add_cookie_header(request)
            if request.unredirected_hdrs.get("Cookie"):
                pairs.append(("Cookie", request.unredirected_hdrs["Cookie"]))
        return self.http.send(Exchange("GET", wire_url(url), pairs, proxy=self.proxy, timeout=timeout))

    def _check_url(self, url: str) -> None:
        try:
            parts = urlsplit(url)
            host = parts.hostname
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise InvalidURL(f"invalid URL {url!r}: {exc}") from exc
        if parts.scheme.lower() not in ("http", "https"):
            raise InvalidURL(f"invalid URL {url!r}: only http and https URLs are fetched")
        if not host:
            raise InvalidURL(f"invalid URL {url!r}: no host")
        if self.guard is not None and self.proxy:
            self.guard.check_proxy(self.proxy)
            self.guard.check_proxied_target(host)

    def _check_declared_length(self, response: Response) -> int | None:
        """The response's Content-Length (None without one), refused when over ``max_bytes``."""
        declared = content_length(response.headers)
        if self.max_bytes and declared is not None and declared > self.max_bytes:
            raise TooLarge(f"Content-Length {declared} exceeds the limit of {self.max_bytes} bytes",
                           response_code=response.status)
        return declared

    def _stream_body(self, job: Job, response: Response, declared: int | None, temp: _TempFile) -> str:
        """Copy the body chunk by chunk into ``temp``; returns the sniffed mime type
        ("" when the job has neither ``mime_type`` nor ``extract_image_size``).

        The job's mime patterns are checked as soon as :data:`mime.SNIFF_BYTES`
        have arrived (or the body ended), before the rest is read.
        """
        patterns = mime.MimePatterns.parse(job.mime_type) if job.mime_type else None
        # libmagic costs up to a few hundred microseconds a body (text and random
        # bytes most): only a job that checks the type or wants an image size pays it.
        sniffing = patterns is not None or job.extract_image_size
        code = response.status
        head = bytearray()
        found_mime = ""
        for chunk in response.chunks(self.chunk_size):  # the engine raises TruncatedBody or DownloadTimeout
            if self.max_bytes and temp.size + len(chunk) > self.max_bytes:
                raise TooLarge(f"body exceeds the limit of {self.max_bytes} bytes", response_code=code)
            temp.write(chunk)
            if sniffing:
                head += chunk
                if len(head) >= mime.SNIFF_BYTES:
                    found_mime = check_mime(head, job.mime_type, patterns, code)
                    sniffing, head = False, bytearray()
        if sniffing:
            found_mime = check_mime(head, job.mime_type, patterns, code)  # a body shorter than SNIFF_BYTES
        if declared is not None and temp.size != declared:
            raise TruncatedBody(f"received {temp.size} of {declared} bytes", response_code=code)
        return found_mime


class Downloaders:
    """One :class:`Downloader` per proxy, shared by all of a process's aggregation pools.

    Aggregations often fetch from the same hosts (a CDN, a platform that
    hosts many shops). With an HTTP client each, every pool opened its own
    connections and closed them when it ended; shared, a kept-alive
    connection outlives the pool that opened it and serves the next
    aggregation. ``make(proxy)`` builds a Downloader on first use; it is
    closed when the last pool using it lets go (the curl engine's
    connections are the process's and outlive it too). Each pool still runs
    at most ``aggr_limit`` downloads: the limit is the pool's, not the
    engine's.
    """

    def __init__(self, make: Callable[[str], Downloader]):
        self._make = make
        self._shared: dict[str, Downloader] = {}
        self._users: dict[str, int] = {}

    def acquire(self, proxy: str) -> Downloader:
        if proxy not in self._shared:
            self._shared[proxy] = self._make(proxy)
            self._users[proxy] = 0
        self._users[proxy] += 1
        return self._shared[proxy]

    def release(self, downloader: Downloader) -> None:
        proxy = downloader.proxy
        self._users[proxy] -= 1
        if not self._users[proxy]:
            del self._users[proxy]
            self._shared.pop(proxy).close()

    def __len__(self) -> int:
        return len(self._shared)


def _location(response: Response) -> str | None:
    """Where a redirect leads, or None for any other response. Servers send UTF-8 in
    headers that HTTP reads as latin-1: read back as UTF-8 where it is (as requests does)."""
    location = response.headers.get("Location") if response.status in REDIRECTS else None
    if location is None:
        return None
    try:
        return location.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return location


def _overlay(defaults: dict[str, str], overrides: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Headers by lower-case name: the job's override the configured ones, whatever their case."""
    merged = {name.lower(): (name, value) for name, value in defaults.items()}
    merged.update((name.lower(), (name, value)) for name, value in overrides.items())
    return merged


class _CookieResponse:
    """What ``http.cookiejar`` reads of a response: its headers, through ``info()``."""

    def __init__(self, headers: Headers):
        self.headers = headers

    def info(self) -> Headers:
        return self.headers


def should_strip_auth(old_url: str, new_url: str) -> bool:
    """Whether credentials must be dropped on a redirect from ``old_url`` to ``new_url`` (as requests
    decides): on a change of host, except http -> https on the default ports."""
    old, new = urlsplit(old_url), urlsplit(new_url)
    if old.hostname != new.hostname:
        return True
    if old.scheme == "http" and old.port in (80, None) and new.scheme == "https" and new.port in (443, None):
        return False
    default = {"http": 80, "https": 443}
    return (old.scheme != new.scheme
            or (old.port or default.get(old.scheme)) != (new.port or default.get(new.scheme)))


def check_status(response: Response) -> None:
    if 200 <= response.status < 300:
        return
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    raise HTTPStatusError(response.status, response.reason or "", retry_after=retry_after)


def check_mime(head: bytes | bytearray, expected: str, patterns: mime.MimePatterns | None, response_code: int) -> str:
    """Sniff the head of a body; raise MimeMismatch (naming the job's ``expected`` text) if refused."""
    found = mime.sniff(bytes(head))
    if patterns is not None and not patterns.matches(found):
        raise MimeMismatch(expected, found, response_code=response_code)
    return found


def redirect_url(current: str, location: str) -> str:
    """Where a redirect from ``current`` to ``location`` leads, resolved as requests does."""
    if location.startswith("//"):  # scheme-relative (RFC 1808)
        location = f"{urlsplit(current).scheme}:{location}"
    if not urlsplit(location).netloc:
        return urljoin(current, requote_uri(location))
    return requote_uri(location)


def content_length(headers: Headers) -> int | None:
    """The declared body length, or None when absent or unreadable."""
    value = headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from ``now`` named by a ``Retry-After`` header (seconds or an HTTP date), never negative."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


class _TempFile:
    """A temp file being written; OSErrors become :class:`StorageError`.

    Up to ``in_memory`` bytes stay in memory, and a body that fits never
    becomes a file here (:meth:`finish` returns it). ``path`` is set once the
    file exists.
    """

    def __init__(self, directory: str, *, prefix: str, in_memory: int):
        self.directory = directory
        self.prefix = prefix
        self.in_memory = in_memory
        self.buffer = bytearray()
        self.path = ""
        self.file: BinaryIO | None = None
        self.size = 0
        self.written_back = 0  # bytes whose writeback to disk was requested

    def write(self, chunk: bytes) -> None:
        if self.file is None and len(self.buffer) + len(chunk) <= self.in_memory:
            self.buffer += chunk
            self.size += len(chunk)
            return
        if self.file is None:
            self.file = self._create()
        try:
            if self.buffer:
                self.file.write(self.buffer)
                self.buffer = bytearray()
            self.file.write(chunk)
        except OSError as exc:
            raise StorageError(f"cannot write {self.path}: {exc.strerror}") from exc
        self.size += len(chunk)
        if self.size - self.written_back >= diskio.Writeback.STEP:  # big files only: see diskio.Writeback
            diskio.writeback.written(self.file.fileno(), self.written_back, self.size - self.written_back)
            self.written_back = self.size

    def _create(self) -> BinaryIO:
        try:
            fd, self.path = diskio.mkstemp(self.directory, self.prefix)
        except OSError as exc:
            raise StorageError(f"cannot create a temp file in {self.directory}: {exc.strerror}") from exc
        return os.fdopen(fd, "wb")

    def finish(self) -> bytes | None:
        """The body if it stayed in memory; else flush the file to disk and close
        it (it survives a crash from here on) and return None."""
        if self.file is None:
            return bytes(self.buffer)
        try:
            diskio.flush_sync_close(self.file)
        except OSError as exc:
            raise StorageError(f"cannot write {self.path}: {exc.strerror}") from exc
        return None

    def discard(self) -> None:
        self.buffer = bytearray()
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass  # the data is being thrown away; a failed flush does not matter
        if not self.path:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove temp file %s: %s", self.path, exc.strerror)
