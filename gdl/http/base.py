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
written once (here): the words of every connection failure and the error
types they map to, so that both engines say ``cannot resolve
www.python.org`` or ``connection refused by 10.0.0.5:443`` alike.

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

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import urlsplit

from gdl.errors import ConnectionFailed, DownloadError, DownloadTimeout, TLSError, TruncatedBody

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


def default_ca_bundle() -> str:
    """The CA bundle TLS is verified against: certifi's, as requests uses."""
    import certifi

    return certifi.where()


# ---------------------------------------------------------------------------- the words of failures
#
# Each engine finds out what failed (its own way) and says it with these, so the
# two engines read alike and map to the same types.


@dataclass(frozen=True)
class Peer:
    """Whom an exchange connects to: the proxy when there is one, else the URL's host."""

    host: str
    port: int
    role: str  # "" or "proxy "

    @classmethod
    def of(cls, exchange: Exchange) -> Peer:
        url, role = (exchange.proxy, "proxy ") if exchange.proxy else (exchange.url, "")
        parts = urlsplit(url)
        default = 443 if parts.scheme.lower() == "https" else (1080 if parts.scheme.startswith("socks") else 80)
        try:
            port = parts.port or default
        except ValueError:
            port = default
        return cls(parts.hostname or "", port, role)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.role}{host}:{self.port}"


def cannot_resolve(peer: Peer) -> ConnectionFailed:
    return ConnectionFailed(f"cannot resolve {peer.role}{peer.host}")


def refused(peer: Peer) -> ConnectionFailed:
    return ConnectionFailed(f"connection refused by {peer}")


def cannot_connect(peer: Peer, errno: int) -> ConnectionFailed:
    reason = os.strerror(errno).lower() if errno else "no connection could be made"
    return ConnectionFailed(f"cannot connect to {peer}: {reason}")


def dropped(peer: Peer) -> ConnectionFailed:
    return ConnectionFailed(f"{peer} closed the connection before answering")


def timed_out(seconds: float, *, connecting: Peer | None = None) -> DownloadTimeout:
    where = f" connecting to {connecting}" if connecting else ""
    return DownloadTimeout(f"timed out after {seconds:g}s{where}")


def tls_failed(reason: str) -> TLSError:
    return TLSError(f"TLS: {reason}")


def certificate_not_valid_for(host: str) -> TLSError:
    return tls_failed(f"certificate is not valid for {host}")


ENDED_EARLY = "the connection closed before its end"


def cut_short(received: int, why: str | int, response_code: int) -> TruncatedBody:
    """``why``: an errno (a reset), or words (:data:`ENDED_EARLY`, or the library's own)."""
    if isinstance(why, int):
        why = os.strerror(why).lower()
    return TruncatedBody(f"the body was cut short after {received} bytes: {why}", response_code=response_code)


def failed(peer: Peer, why: str) -> ConnectionFailed:
    """Anything else that broke the exchange before a response arrived."""
    return ConnectionFailed(f"exchange with {peer} failed: {why}")
