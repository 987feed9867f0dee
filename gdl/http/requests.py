"""The requests engine: requests + urllib3 behind the seam.

One keep-alive :class:`HopSession` per engine. The guard is applied where
urllib3 makes its socket (``_new_conn`` of the connection classes mounted
here): the peer is resolved once by the guard and the socket connects to an
address the guard allowed, so there is no second lookup for DNS rebinding to
slip through. TLS still sends SNI for, and verifies the certificate
against, the URL's hostname. A SOCKS proxy connects outside urllib3's
connection classes, so it is refused while the guard is on.

urllib3's exceptions are translated into the seam's words here
(:func:`translate`), so that ``Max retries exceeded ... NameResolutionError``
reads ``cannot resolve www.python.org``.
"""

from __future__ import annotations

import http.client
import http.cookiejar
import select
import socket
import ssl
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import gevent.monkey
import requests
import urllib3.exceptions
import urllib3.util.connection
from requests.adapters import HTTPAdapter
from requests.hooks import default_hooks
from requests.structures import CaseInsensitiveDict
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util import SKIP_HEADER

from gdl.errors import BlockedAddress, DownloadError, InvalidURL
from gdl.http import failures
from gdl.http.base import CHUNK_SIZE, Engine, Exchange, Headers, Response
from gdl.http.failures import Peer
from gdl.netguard import AddressGuard

# The unpatched poll: used only with a zero timeout (see _QuickLivenessCheck).
_original_poll = gevent.monkey.get_original("select", "poll")

X509_V_ERR_HOSTNAME_MISMATCH = 62  # OpenSSL's verify code for a certificate of another name


class RequestsEngine(Engine):
    """The engine on requests: see the module's docstring."""

    name = "requests"

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.session = HopSession()
        # No requests defaults: only the exchange's headers. SKIP_HEADER keeps
        # http.client from adding its own "Accept-Encoding: identity".
        self.session.headers = CaseInsensitiveDict({"Accept-Encoding": SKIP_HEADER})
        self.session.verify = self.ca_bundle
        mount_adapters(self.session, self.guard, pool_size=self.pool_size, hosts=self.hosts)
        # The environment must not pick proxies or send .netrc credentials.
        self.session.trust_env = False
        self.session.cookies.set_policy(_NoCookies())  # cookies between hops are the caller's business

    def send(self, exchange: Exchange) -> Response:
        proxies = {"http": exchange.proxy, "https": exchange.proxy} if exchange.proxy else {}
        try:
            response = self.session.send_one(exchange.method, exchange.url, headers=exchange.headers,
                                             body=exchange.body, proxies=proxies,
                                             timeout=(exchange.connect_timeout, exchange.timeout))
        except BlockedAddress:
            raise
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise translate(exc, exchange) from exc
        return RequestsResponse(response, exchange)

    def close(self) -> None:
        self.session.close()


class RequestsResponse(Response):
    def __init__(self, response: requests.Response, exchange: Exchange):
        self.response = response
        self.exchange = exchange
        self.status = response.status_code
        self.reason = response.reason or ""
        self.headers = Headers(list(response.raw.headers.items()))
        self.url = exchange.url

    def chunks(self, size: int = CHUNK_SIZE) -> Iterator[bytes]:
        received = 0
        try:
            # decode_content=False: bytes as served, gzip included.
            for chunk in self.response.raw.stream(size, decode_content=False):
                received += len(chunk)
                yield chunk
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise failures.timed_out(self.exchange.timeout) from exc
        except urllib3.exceptions.HTTPError as exc:
            # ProtocolError (IncompleteRead, a reset), SSLError mid-body: the body was cut short.
            raise failures.cut_short(received, _body_words(exc), self.status) from exc

    def close(self) -> None:
        self.response.close()


def translate(exc: Exception, exchange: Exchange) -> DownloadError:
    """What requests raised before a response, in the seam's words."""
    peer = Peer.of(exchange)
    chain = list(_causes(exc))

    def first(*kinds: type) -> Any:
        return next((e for e in chain if isinstance(e, kinds)), None)

    if (blocked := first(BlockedAddress)) is not None:
        return blocked
    if (tls := first(ssl.SSLError)) is not None:
        return _tls_error(tls, exchange)
    if first(requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema,
             urllib3.exceptions.LocationParseError) is not None:
        return InvalidURL(f"invalid URL {exchange.url!r}: {exc}")
    if first(socket.gaierror, urllib3.exceptions.NameResolutionError) is not None:
        return failures.cannot_resolve(peer)
    if first(ConnectionRefusedError) is not None:
        return failures.refused(peer)
    if first(urllib3.exceptions.ConnectTimeoutError) is not None:
        return failures.timed_out(exchange.connect_timeout, connecting=peer)
    if first(urllib3.exceptions.ReadTimeoutError, TimeoutError) is not None:
        return failures.timed_out(exchange.timeout)
    if (os_error := first(OSError)) is not None and os_error.errno:
        return failures.cannot_connect(peer, os_error.errno)
    if first(urllib3.exceptions.ProtocolError, http.client.RemoteDisconnected) is not None:
        return failures.dropped(peer)
    return failures.failed(peer, _innermost_words(exc))


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and every exception behind it: causes, contexts, urllib3's ``reason`` and wrapped args."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        current = todo.pop(0)
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__, getattr(current, "reason", None)]
        todo += [arg for arg in current.args if isinstance(arg, BaseException)]


def _tls_error(exc: ssl.SSLError, exchange: Exchange) -> DownloadError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code == X509_V_ERR_HOSTNAME_MISMATCH:
            return failures.certificate_not_valid_for(exchange.url)
        return failures.tls_failed(str(exc.verify_message))
    reason = exc.reason if isinstance(exc.reason, str) else str(exc)
    return failures.tls_failed(reason.replace("_", " ").lower())


def _body_words(exc: BaseException) -> str | int:
    """Why a body stopped: an errno, the seam's words for an early end, or the innermost error's text."""
    chain = list(_causes(exc))
    if any(isinstance(e, (urllib3.exceptions.IncompleteRead, http.client.IncompleteRead)) for e in chain):
        return failures.ENDED_EARLY
    errno = next((e.errno for e in chain if isinstance(e, OSError) and e.errno), None)
    return errno if errno is not None else _innermost_words(exc)


def _innermost_words(exc: BaseException) -> str:
    innermost = list(_causes(exc))[-1]
    return str(innermost) or type(innermost).__name__


# ---------------------------------------------------------------------------- the session and its connections


class HopSession(requests.Session):
    """A session that leaves redirects to its caller, one hop at a time.

    Even with ``allow_redirects=False``, ``Session.send`` reads a 30x's whole
    body (decoded: a gzip bomb expands in memory) to prepare
    ``Response.next``; here nothing is resolved, so nothing is read.

    :meth:`send_one` is the way in: one request, none of ``Session.request``'s
    merging of settings from the environment (``trust_env`` is off anyway).
    That merging costs more than the rest of requests together on Python
    3.11: requests 2.34 checks its arguments with ``isinstance`` against
    runtime-checkable protocols, about 40 us each, seven a request
    (measured: 730 us of CPU per 16 KiB GET through ``Session.get``, 500 us
    here, 430 us for urllib3 alone).
    """

    def resolve_redirects(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        return iter(())

    def send_one(self, method: str, url: str, *, headers: list[tuple[str, str]] | Mapping[str, Any] | None = None,
                 body: bytes | None = None, proxies: dict[str, str] | None = None, timeout: Any = None,
                 stream: bool = True) -> requests.Response:
        """Send one request (redirects not followed) with the session's headers overlaid by ``headers``."""
        merged = CaseInsensitiveDict(self.headers)
        if headers:
            merged.update(headers)
        request = requests.PreparedRequest()
        request.prepare_method(method)
        request.prepare_url(url, None)
        request.prepare_headers(merged)
        request.body = body
        if body is not None:
            request.headers["Content-Length"] = str(len(body))
        request.prepare_auth(None, url)  # user:password@ in the URL
        request.hooks = default_hooks()
        return self.send(request, stream=stream, timeout=timeout, allow_redirects=False,
                         proxies=proxies or {}, verify=self.verify, cert=self.cert)


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """Refuses to keep any cookie in the session's jar."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:
        return False


def guarded_connection(guard: AddressGuard, address: tuple[str, int], timeout: Any, *, role: str = "",
                       **options: Any) -> socket.socket:
    """Resolve ``address`` once through the guard and connect to the first allowed address that answers."""
    host, port = address
    error: OSError | None = None
    for ip in guard.resolve(host, port, role=role):
        try:
            return urllib3.util.connection.create_connection((ip, port), timeout, **options)
        except OSError as exc:
            error = exc
    assert error is not None
    raise error


class _GuardedConnection:
    """Mixed into urllib3's connections: ``_new_conn`` connects through the guard.

    The same translation of OS errors as urllib3's own ``_new_conn``;
    BlockedAddress passes through urllib3 and requests untouched.
    """

    guard: AddressGuard
    host: str
    port: int
    timeout: Any
    source_address: Any
    socket_options: Any
    proxy: Any
    _dns_host: str

    def _new_conn(self) -> socket.socket:
        role = "proxy " if self.proxy is not None else ""
        try:
            sock = guarded_connection(self.guard, (self._dns_host, self.port), self.timeout, role=role,
                                      source_address=self.source_address, socket_options=self.socket_options)
        except socket.gaierror as exc:
            raise urllib3.exceptions.NameResolutionError(self.host, self, exc) from exc  # type: ignore[arg-type]
        except TimeoutError as exc:
            raise urllib3.exceptions.ConnectTimeoutError(
                self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})") from exc
        except OSError as exc:
            raise urllib3.exceptions.NewConnectionError(
                self, f"Failed to establish a new connection: {exc}") from exc  # type: ignore[arg-type]
        sys.audit("http.client.connect", self, self.host, self.port)
        return sock


class _QuickLivenessCheck:
    """Mixed into urllib3's connections: a cheaper "did the server close it?".

    Before reusing a kept-alive connection urllib3 polls its socket with a
    zero timeout. Through gevent's patched ``select.poll`` that sets up and
    tears down hub watchers, about 30 us a request; the original ``poll``
    takes 2 us, and with a zero timeout it never blocks the hub.
    """

    sock: Any

    @property
    def is_connected(self) -> bool:
        if self.sock is None:
            return False
        poller = _original_poll()
        poller.register(self.sock, select.POLLIN)
        return not poller.poll(0)  # readable while idle: closed by the server (or junk), not reusable


def _pool_classes(prefix: str, mixins: tuple[type, ...], attrs: dict[str, Any]) -> dict[str, type]:
    """urllib3 pool classes by scheme whose connections have ``mixins`` (and the quick liveness check)."""
    http_conn = type(f"{prefix}HTTPConnection", (*mixins, _QuickLivenessCheck, HTTPConnection), attrs)
    https_conn = type(f"{prefix}HTTPSConnection", (*mixins, _QuickLivenessCheck, HTTPSConnection), attrs)
    return {
        "http": type(f"{prefix}HTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
        "https": type(f"{prefix}HTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
    }


_QUICK_POOL_CLASSES = _pool_classes("Quick", (), {})


class KeepAliveAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` whose pools, direct and through an http(s) proxy, use :attr:`pool_classes`."""

    @property
    def pool_classes(self) -> dict[str, type]:
        return _QUICK_POOL_CLASSES

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self.pool_classes

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        if not proxy.lower().startswith("socks"):  # a SOCKS manager has pool classes of its own
            manager.pool_classes_by_scheme = self.pool_classes
        return manager


class GuardedAdapter(KeepAliveAdapter):
    """A :class:`KeepAliveAdapter` whose connections, direct and through an http(s) proxy, are guarded."""

    def __init__(self, guard: AddressGuard, **kwargs: Any):
        self.guard = guard
        # Before super().__init__, which builds the pool manager.
        self._guarded_classes = _pool_classes("Guarded", (_GuardedConnection,), {"guard": guard})
        super().__init__(**kwargs)

    @property
    def pool_classes(self) -> dict[str, type]:
        return self._guarded_classes

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        self.guard.check_proxy(proxy)
        return super().proxy_manager_for(proxy, **kwargs)


def mount_adapters(session: requests.Session, guard: AddressGuard | None, *, pool_size: int,
                   hosts: int = 10) -> None:
    """Keep up to ``pool_size`` idle connections per host (requests keeps 10:
    a pool of 50 greenlets would otherwise reconnect for most requests) for
    up to ``hosts`` hosts, through guarded connections when there is a guard."""
    if guard is None:
        adapter = KeepAliveAdapter(pool_maxsize=pool_size, pool_connections=hosts)
    else:
        adapter = GuardedAdapter(guard, pool_maxsize=pool_size, pool_connections=hosts)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
