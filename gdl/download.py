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

Each fetch keeps an :class:`Attempt`: the final hop's URL and headers, the
redirects, the time to the response head, the bytes received and their
sha-256 (:mod:`gdl.checksum`, fed chunk by chunk as they stream), checked
against the job's ``checksum`` before anything is stored. A success carries
it in :class:`Fetched`, a failure in its error's ``attempt``. A failure
on the wire may leave a kept partial file (``Attempt.kept``) that the retry
resumes with ``Range`` (the rules are :mod:`gdl.resume`'s); a conditional GET
of a stored copy (:mod:`gdl.reuse`) answered 304 is a ``Fetched`` with no body.
"""

from __future__ import annotations

import email.utils
import logging
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.cookiejar import CookieJar
from urllib.parse import urljoin, urlsplit

import gevent
from requests.utils import requote_uri

from gdl import checksum, mime, resume
from gdl.errors import (
    BlockedAddress,
    DownloadError,
    DownloadTimeout,
    HTTPStatusError,
    InvalidURL,
    MimeMismatch,
    TooLarge,
    TooManyRedirects,
    TruncatedBody,
)
from gdl.http import DEFAULT_ENGINE, Exchange, Headers, Response, make_engine
from gdl.http.base import wire_url
from gdl.job import Job
from gdl.netguard import AddressGuard
from gdl.resume import Partial
from gdl.scratch import TempFile

log = logging.getLogger(__name__)

# Redirect statuses that carry a Location to follow (as requests follows).
REDIRECTS = frozenset({301, 302, 303, 307, 308})


@dataclass
class Attempt:
    """What one fetch has got so far: for cleanup, for errors raised by the deadline, for the callback."""

    response_code: int = 0
    temp: TempFile | None = None
    started: float = field(default_factory=time.monotonic)
    head_at: float = 0.0  # monotonic time the final response's head arrived; 0 before
    final_url: str = ""
    redirects: int = 0
    content_type: str = ""
    etag: str = ""
    last_modified: str = ""
    sha256: str = ""  # set once the whole body arrived and matched the job's checksum
    validator: str = ""  # what an If-Range may name for the bytes in ``temp`` ("" if nothing may)
    no_store: bool = False  # the response said Cache-Control: no-store
    resumed_bytes: int = 0  # bytes of a kept partial file this attempt appended to
    reused: bool = False  # answered from a stored copy (gdl.reuse)
    kept: Partial | None = None  # the partial file this failed attempt left for the retry

    @property
    def size(self) -> int:
        return self.temp.size if self.temp is not None else 0

    @property
    def ttfb_ms(self) -> int:
        return max(0, int((self.head_at - self.started) * 1000)) if self.head_at else 0

    def got_head(self, response: Response) -> None:
        self.head_at = time.monotonic()
        self.response_code = response.status
        headers = response.headers
        self.content_type = headers.get("Content-Type") or ""
        self.etag = headers.get("ETag") or ""
        self.last_modified = headers.get("Last-Modified") or ""
        self.no_store = "no-store" in (headers.get("Cache-Control") or "").lower()


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
    attempt: Attempt = field(default_factory=Attempt)
    not_modified: bool = False  # a conditional GET was answered 304: no body, nothing in ``path``
    stored: bool = False  # already at the job's place in the storage (a reused copy)
    contacted: bool = True  # the origin was asked (False: a fresh reused copy, no attempt counted)
    reuse_key: str = ""  # the request key it is remembered under when it succeeds ("" not at all)


class Downloader:
    """Downloads jobs through one HTTP engine, direct or through one proxy.

    With a ``guard``, every connection (the URL's host, each redirect hop's,
    the proxy's) is checked by the engine, and a target reached through the
    proxy is checked here as far as its URL shows.
    """

    def __init__(self, *, proxy: str, default_headers: dict[str, str], scratch_dir: str, chunk_size: int,
                 max_bytes: int = 0, max_redirects: int = 10, guard: AddressGuard | None = None,
                 pool_size: int = 10, hosts: int = 10, engine: str = DEFAULT_ENGINE,
                 ca_bundle: str | None = None, resume_min_bytes: int = 0):
        self.scratch_dir = scratch_dir  # partial downloads: processor.storage_dir
        self.chunk_size = chunk_size
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.resume_min_bytes = resume_min_bytes  # 0: a failed attempt's bytes are never kept
        self.proxy = proxy
        self.guard = guard
        self.default_headers = dict(default_headers)
        self.http = make_engine(engine, guard=guard, pool_size=pool_size, hosts=hosts, ca_bundle=ca_bundle)

    def close(self) -> None:
        self.http.close()

    def fetch(self, job: Job, *, timeout: float, partial: Partial | None = None,
              conditional: list[tuple[str, str]] | None = None) -> Fetched:
        """Download ``job.url`` into a temp file within ``timeout`` seconds, all phases included.

        With a ``partial`` file (see :mod:`gdl.resume`), ask for the rest of it;
        with ``conditional`` headers (``If-None-Match`` ...), a 304 is answered
        as a :class:`Fetched` with ``not_modified``.
        """
        attempt = Attempt()
        # One deadline over connect, every read and every write: a server that
        # drips a byte a second never trips a per-read timeout.
        deadline = gevent.Timeout(timeout)
        deadline.start()
        try:
            return self._fetch(job, timeout, attempt, partial, conditional or [])
        except BaseException as exc:
            deadline.cancel()
            self._keep_or_discard(job, attempt, exc)
            if exc is deadline:
                timed_out = DownloadTimeout(f"download did not finish within {timeout:g}s",
                                            response_code=attempt.response_code)
                timed_out.attempt = attempt
                raise timed_out from exc
            if isinstance(exc, DownloadError):
                exc.attempt = attempt
                if not exc.response_code:  # errors raised after the response arrived carry its status
                    exc.response_code = attempt.response_code
            raise
        finally:
            deadline.cancel()

    def _keep_or_discard(self, job: Job, attempt: Attempt, error: BaseException) -> None:
        """After a failure: keep the temp file for the retry to resume from, if it is worth it."""
        temp = attempt.temp
        if temp is None:
            return
        keep = resume.worth_keeping(job, error, temp.size, attempt.validator, self.resume_min_bytes)
        if keep and temp.keep():
            attempt.kept = Partial(temp.path, temp.size, attempt.validator)
            log.info("job %s: kept %d bytes in %s to resume from", job.id, temp.size, temp.path)
        else:
            temp.discard()

    def _fetch(self, job: Job, timeout: float, attempt: Attempt, partial: Partial | None,
               conditional: list[tuple[str, str]]) -> Fetched:
        response, partial = self._open(job, timeout, attempt, partial, conditional)
        with response:
            if conditional and response.status == 304:
                return Fetched(path="", size=0, response_code=304, mime="", image_size="", attempt=attempt,
                               not_modified=True)
            check_status(response)
            start = partial.size if partial is not None else 0
            declared = self._check_declared_length(response, start)
            digests = checksum.Digests(job.checksum)
            head = b""
            if partial is not None:
                attempt.temp = TempFile.reopen(partial.path, partial.size)
                attempt.resumed_bytes = partial.size
                head = resume.read_prefix(partial, digests)
            else:
                # A body declared to fit one chunk stays in memory: the storage then
                # writes it in one trip to the threadpool, not two.
                small = declared is not None and declared <= self.chunk_size
                attempt.temp = TempFile(self.scratch_dir, prefix=job.id + ".",
                                        in_memory=self.chunk_size if small else 0)
            found_mime = self._stream_body(job, response, declared, attempt.temp, digests, head)
            attempt.sha256 = digests.check(response.status)  # before the file is kept
            body = attempt.temp.finish()
        size = attempt.temp.size
        image_size = None
        if job.extract_image_size:
            image_size = mime.image_size(attempt.temp.path if body is None else body, found_mime)
        log.debug("job %s: fetched %d bytes of %s (%d) from %s", job.id, size, found_mime,
                  response.status, response.url)
        return Fetched(path=attempt.temp.path, size=size, response_code=response.status,
                       mime=found_mime, image_size=image_size or "", body=body, attempt=attempt)

    def _open(self, job: Job, timeout: float, attempt: Attempt, partial: Partial | None,
              conditional: list[tuple[str, str]]) -> tuple[Response, Partial | None]:
        """The response whose body this attempt streams, and the partial file it
        appends to (None: from zero). A range request answered by anything but
        the rest of the partial file is asked again without Range, once."""
        extra = partial.range_headers() if partial is not None else conditional
        response = self._request(job, timeout, attempt, extra)
        attempt.got_head(response)
        attempt.validator = resume.strong_validator(response.headers)
        if partial is None:
            return response, None
        answer = resume.judge(response, partial.size)
        log.info("job %s: asked for bytes %d- (If-Range %s): %d, %s", job.id, partial.size, partial.validator,
                 response.status, answer)
        if answer is resume.Answer.APPEND:
            attempt.validator = partial.validator
            return response, partial
        if answer is resume.Answer.OTHER:  # a failure status: the kept bytes stay good for a later retry
            attempt.kept = partial
            return response, None
        partial.remove()
        if answer is resume.Answer.REPLACE:
            return response, None
        response.discard()
        response = self._request(job, timeout, attempt, [])
        attempt.got_head(response)
        attempt.validator = resume.strong_validator(response.headers)
        return response, None

    def _request(self, job: Job, timeout: float, attempt: Attempt,
                 extra: list[tuple[str, str]] | None = None) -> Response:
        """Send the GET (with the ``extra`` headers) and follow redirects; returns with the final
        response's head read."""
        url = job.url
        headers = overlay_headers(self.default_headers, job.request_headers)
        headers.update((name.lower(), (name, value)) for name, value in extra or [])
        cookies = CookieJar()  # cookies set by one hop go to the next ones, as browsers do
        for hop in range(self.max_redirects + 1):
            attempt.final_url, attempt.redirects = url, hop
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

    def _check_declared_length(self, response: Response, start: int = 0) -> int | None:
        """The response's Content-Length (None without one), refused when the file it
        makes (``start`` bytes kept before it) would be over ``max_bytes``."""
        declared = content_length(response.headers)
        if self.max_bytes and declared is not None and start + declared > self.max_bytes:
            whole = f" (after {start} bytes kept)" if start else ""
            raise TooLarge(f"Content-Length {declared}{whole} exceeds the limit of {self.max_bytes} bytes",
                           response_code=response.status)
        return declared

    def _stream_body(self, job: Job, response: Response, declared: int | None, temp: TempFile,
                     digests: checksum.Digests, kept_head: bytes = b"") -> str:
        """Copy the body chunk by chunk into ``temp``; returns the sniffed mime type
        ("" when the job has neither ``mime_type`` nor ``extract_image_size``).

        The job's mime patterns are checked as soon as :data:`mime.SNIFF_BYTES`
        have arrived (or the body ended), before the rest is read; a resumed
        body's first bytes are ``kept_head``, read from the kept prefix.
        """
        patterns = mime.MimePatterns.parse(job.mime_type) if job.mime_type else None
        # libmagic costs up to a few hundred microseconds a body (text and random
        # bytes most): only a job that checks the type or wants an image size pays it.
        sniffing = patterns is not None or job.extract_image_size
        code = response.status
        start = temp.size
        head = bytearray(kept_head)
        found_mime = ""
        if sniffing and len(head) >= mime.SNIFF_BYTES:
            found_mime = check_mime(head, job.mime_type, patterns, code)
            sniffing, head = False, bytearray()
        for chunk in response.chunks(self.chunk_size):  # the engine raises TruncatedBody or DownloadTimeout
            if self.max_bytes and temp.size + len(chunk) > self.max_bytes:
                raise TooLarge(f"body exceeds the limit of {self.max_bytes} bytes", response_code=code)
            temp.write(chunk, digests)
            if sniffing:
                head += chunk
                if len(head) >= mime.SNIFF_BYTES:
                    found_mime = check_mime(head, job.mime_type, patterns, code)
                    sniffing, head = False, bytearray()
        temp.wait_written()  # the last chunk too: the digests are read next
        if sniffing:
            found_mime = check_mime(head, job.mime_type, patterns, code)  # a body shorter than SNIFF_BYTES
        if declared is not None and temp.size - start != declared:
            raise TruncatedBody(f"received {temp.size - start} of {declared} bytes", response_code=code)
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


def overlay_headers(defaults: dict[str, str], overrides: dict[str, str]) -> dict[str, tuple[str, str]]:
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
