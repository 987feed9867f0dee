"""The words of HTTP failures and the error types they map to, written once for every engine.

Each engine finds out what failed its own way (libcurl's result codes,
urllib3's exception chain) and says it with these functions, so both read
alike (``cannot resolve www.python.org``, ``connection refused by
10.0.0.5:443``, ``TLS: certificate has expired``, ``timed out after 30s``)
and map to the same :mod:`gdl.errors` types, whose class decides whether a
retry may help.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from gdl.errors import ConnectionFailed, DownloadTimeout, TLSError, TruncatedBody
from gdl.http.base import Exchange


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


def certificate_not_valid_for(url: str) -> TLSError:
    """The certificate is good but names another host than ``url``'s."""
    return tls_failed(f"certificate is not valid for {urlsplit(url).hostname}")


ENDED_EARLY = "the connection closed before its end"


def cut_short(received: int, why: str | int, response_code: int) -> TruncatedBody:
    """``why``: an errno (a reset), or words (:data:`ENDED_EARLY`, or the library's own)."""
    if isinstance(why, int):
        why = os.strerror(why).lower()
    return TruncatedBody(f"the body was cut short after {received} bytes: {why}", response_code=response_code)


def failed(peer: Peer, why: str) -> ConnectionFailed:
    """Anything else that broke the exchange before a response arrived."""
    return ConnectionFailed(f"exchange with {peer} failed: {why}")
