"""The HTTP seam: one exchange (one hop) and what an engine must do for it.

Everything gdl needs from an HTTP client is one hop: a method, a URL, the
exact headers to send, an optional body, a proxy, one deadline; back come
the status, the headers and a body streamed in chunks that the caller may
stop reading at any time. :class:`Engine` is that interface;
:mod:`gdl.http.curl` (libcurl) and :mod:`gdl.http.requests` implement it.

Above the seam, written once for every engine (:mod:`gdl.download`,
:mod:`gdl.backends.http`): redirects and the cookies carried between hops,
credentials stripped on a host change, the guard's proxy rules, size limits,
mime sniffing, retries and the whole-download deadline. At the seam, also
written once (:mod:`gdl.http.failures`): the words of every connection
failure and the error types they map to, so that both engines say ``cannot
resolve www.python.org`` or ``connection refused by 10.0.0.5:443`` alike.

An engine is given the :class:`~gdl.netguard.AddressGuard` (or None) and
must apply it where the socket is made, to the address actually connected
(the URL's host or the proxy's): it never connects to an address the guard
refuses, and raises the guard's :class:`~gdl.errors.BlockedAddress`.
It sends exactly the headers it is given (plus Host and Content-Length),
follows no redirect, decodes no content encoding (bytes are as served),
verifies TLS against ``ca_bundle`` (certifi's by default) and keeps
connections alive between exchanges.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import urlsplit, urlunsplit

import idna
from requests.utils import requote_uri

from gdl.errors import DownloadError, InvalidURL

if TYPE_CHECKING:
    from gdl.netguard import AddressGuard

# The connect phase never gets more than this, however long the whole exchange may take.
MAX_CONNECT_TIMEOUT = 30.0
CHUNK_SIZE = 64 * 1024
# The most bytes read from a body that is thrown away (a redirect's, a callback answer's);
# a longer one closes the connection instead.
DISCARD_LIMIT = 64 * 1024


@dataclass(frozen=True)
class Exchange:
    """One request, one hop. ``headers`` are sent as given, in order."""

    method: str
    url: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | None = None
    proxy: str = ""
    timeout: float = 30.0  # seconds for the exchange; connecting gets at most MAX_CONNECT_TIMEOUT

    @property
    def connect_timeout(self) -> float:
        return min(self.timeout, MAX_CONNECT_TIMEOUT)


class Headers:
    """Response headers: case-insensitive, repeated names kept (``Set-Cookie``)."""

    def __init__(self, pairs: list[tuple[str, str]] | None = None):
        self.pairs: list[tuple[str, str]] = list(pairs or ())

    def get(self, name: str, default: str | None = None) -> str | None:
        """The value of ``name``; repeated values joined by ", " (as requests does)."""
        values = self.get_all(name)
        return ", ".join(values) if values else default

    def get_all(self, name: str, default: list[str] | None = None) -> list[str]:
        name = name.lower()
        found = [value for key, value in self.pairs if key.lower() == name]
        return found or (default if default is not None else [])

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(self.get_all(name))


class Response(ABC):
    """A response whose head has arrived; its body is read with :meth:`chunks`.

    Close it (or use it as a context manager) when done: a body read to its
    end leaves the connection to be reused, one closed early drops it.
    """

    status: int
    reason: str
    headers: Headers
    url: str

    @abstractmethod
    def chunks(self, size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """The body as served, in chunks (of at most ``size`` bytes where the engine reads by size:
        requests; libcurl hands over what arrived); raises TruncatedBody or DownloadTimeout."""

    @abstractmethod
    def close(self) -> None:
        """Stop the exchange; safe to call more than once."""

    def discard(self, limit: int = DISCARD_LIMIT) -> None:
        """Drop a body nobody wants: read at most ``limit`` bytes (the connection is then
        reused), else close the connection unread. Errors while reading do not matter."""
        try:
            declared = self.headers.get("Content-Length", "") or ""
            if not declared.isdigit() or int(declared) <= limit:
                read = 0
                for chunk in self.chunks():
                    read += len(chunk)
                    if read > limit:
                        break
        except DownloadError:
            pass  # the body is being thrown away; closing below settles the connection
        finally:
            self.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Engine(ABC):
    """An HTTP client behind the seam. ``send`` raises only :class:`~gdl.errors.DownloadError`
    subclasses: BlockedAddress, ConnectionFailed, TLSError, DownloadTimeout, InvalidURL."""

    name: ClassVar[str]

    def __init__(self, *, guard: AddressGuard | None = None, pool_size: int = 10, hosts: int = 10,
                 ca_bundle: str | None = None):
        self.guard = guard
        self.pool_size = pool_size  # idle connections kept per host
        self.hosts = hosts  # hosts whose idle connections are kept
        self.ca_bundle = ca_bundle or default_ca_bundle()

    @abstractmethod
    def send(self, exchange: Exchange) -> Response:
        """Send one request (no redirect followed); returns once the response's head has arrived."""

    @abstractmethod
    def close(self) -> None:
        """Let go of what this engine keeps (idle connections it alone holds)."""


def wire_url(url: str) -> str:
    """``url`` as it is sent, prepared as requests prepares it: a non-ASCII host in IDNA, and what
    needs quoting in the path and query (spaces, non-ASCII) percent-quoted, the rest left as given.
    Raises InvalidURL for a URL that does not parse, a host name with an empty
    label (``a..b``: no resolver could answer it, so both engines refuse it at
    once rather than retry), or a host IDNA cannot encode."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:
        raise InvalidURL(f"invalid URL {url!r}: {exc}") from exc
    if host and not host.startswith("[") and "" in host.rstrip(".").split("."):
        raise InvalidURL(f"invalid URL {url!r}: the host name has an empty label")
    if not parts.netloc.isascii() and parts.hostname:
        try:
            host = idna.encode(parts.hostname, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise InvalidURL(f"invalid URL {url!r}: {exc}") from exc
        userinfo, at, _ = parts.netloc.rpartition("@")
        port = f":{parts.port}" if parts.port else ""
        parts = parts._replace(netloc=f"{userinfo}{at}{host}{port}")
    return requote_uri(urlunsplit(parts))


def default_ca_bundle() -> str:
    """The CA bundle TLS is verified against: certifi's, as requests uses."""
    import certifi

    return certifi.where()
