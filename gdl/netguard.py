"""Outgoing HTTP that clients aim: the address guard and hostile-server hygiene.

gdl GETs URLs and POSTs callbacks to URLs that its clients name. Unchecked,
that makes it a proxy into the network it runs in. :class:`AddressGuard`
(on while ``security.block_private_networks`` is true) refuses to connect to
any address that is not public unicast: loopback, private, link-local
(169.254.0.0/16, cloud metadata included), shared/CGNAT (100.64.0.0/10),
multicast, unspecified, reserved, IPv4 and IPv6, and IPv4 addresses inside
IPv6 ones (IPv4-mapped, 6to4, NAT64). ``security.allowed_networks`` exempts
CIDRs.

The check sits where the socket is made, in the urllib3 connection's
``_new_conn``: the host is resolved once, every address is checked, and the
socket connects to a checked address, so there is no second lookup for DNS
rebinding to slip through, and every spelling the resolver accepts
(``2130706433``, ``0x7f.1``, ``017700000001``) is judged by the address it
resolves to. TLS still sends SNI for, and verifies the certificate against,
the URL's hostname. Every redirect hop and every proxy goes through the same
connection code. Through a proxy, the proxy resolves the target, so only
what the URL itself shows can be checked: literal addresses in any spelling
and ``localhost`` names (:meth:`AddressGuard.check_proxied_target`). A SOCKS
proxy connects outside urllib3's connection classes, so it is refused while
the guard is on.

Two more pieces are shared by downloads and callbacks: :class:`HopSession`,
a ``requests.Session`` that never follows or reads a redirect itself, and
:func:`discard_body`, which drops at most a few KiB of a body nobody wants.
"""

from __future__ import annotations

import http.cookiejar
import ipaddress
import re
import select
import socket
import sys
from collections.abc import Callable, Iterator, Mapping
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

from gdl.config import allowed_networks_hint
from gdl.errors import BlockedAddress

# The unpatched poll: used only with a zero timeout (see _QuickLivenessCheck).
_original_poll = gevent.monkey.get_original("select", "poll")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., list]  # socket.getaddrinfo's signature

SETTING = "security.block_private_networks"
# The most bytes read from a body that is thrown away (a redirect's, a callback answer's);
# a longer one closes the connection instead.
DISCARD_LIMIT = 64 * 1024

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_PRIVATE = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# What inet_aton may read as an IPv4 address: 2130706433, 0x7f.1, 017700000001, 127.1.
_NUMERIC_HOST = re.compile(r"^[0-9a-fx.]+$")


def describe(ip: IPAddress) -> str | None:
    """Why ``ip`` is refused ("a loopback address"), or None for a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner, how = _embedded_ipv4(ip)
        if inner is not None:
            what = describe(inner)
            return f"{what} ({how} {inner})" if what else None
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip in _CGNAT:
        return "a shared (CGNAT) address"
    if any(ip in net for net in _PRIVATE):
        return "a private address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "a site-local address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "a non-public address"
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address | None, str]:
    """The IPv4 address a packet to ``ip`` really goes to, for mapped, 6to4 and NAT64 forms."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "IPv4-mapped"
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4"
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64"
    return None, ""


def literal_address(host: str) -> IPAddress | None:
    """``host`` read as an address the way resolvers do (IPv6, dotted, decimal, octal, hex), else None."""
    name = host.strip("[]").lower()
    try:
        return ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        pass
    if _NUMERIC_HOST.match(name):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(name))
        except OSError:
            return None
    return None


class AddressGuard:
    """Refuses connections to non-public addresses outside ``allowed_networks``.

    ``resolve`` is ``socket.getaddrinfo`` by default (gevent's cooperative
    one once patched), looked up at each call; tests pass their own.
    """

    def __init__(self, allowed_networks: list[str] | tuple[str, ...] = (), *, resolve: Resolver | None = None):
        self.allowed = tuple(ipaddress.ip_network(str(n), strict=False) for n in allowed_networks)
        self._resolve = resolve
        self._pool_classes: dict[str, type] | None = None

    @classmethod
    def from_config(cls, security: Any, *, resolve: Resolver | None = None) -> AddressGuard | None:
        """The guard for a ``SecurityConfig``; None while ``block_private_networks`` is off."""
        if not security.block_private_networks:
            return None
        return cls(security.allowed_networks, resolve=resolve)

    # ------------------------------------------------------------------ the policy

    def refusal(self, ip: IPAddress | str) -> str | None:
        """Why a connection to ``ip`` is refused, or None when it is allowed."""
        if isinstance(ip, str):
            ip = ipaddress.ip_address(ip.split("%", 1)[0])
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        if any(c in net for c in candidates for net in self.allowed):
            return None
        return describe(ip)

    def resolve(self, host: str, port: int, *, role: str = "") -> list[str]:
        """The addresses of ``host`` that may be connected to; BlockedAddress when none may.

        ``role`` ("proxy ") goes into the message.
        """
        name = host.strip("[]")
        resolve = self._resolve or socket.getaddrinfo
        infos = resolve(name, port, urllib3.util.connection.allowed_gai_family(), socket.SOCK_STREAM)
        allowed: list[str] = []
        refused: tuple[str, str] | None = None
        for *_, sockaddr in infos:
            address = str(sockaddr[0])
            reason = self.refusal(address)
            if reason is None:
                if address not in allowed:
                    allowed.append(address)
            elif refused is None:
                refused = (address, reason)
        if allowed:
            return allowed
        if refused is None:
            raise OSError(f"{name}: getaddrinfo returned no address")
        raise BlockedAddress(_message(host, *refused, role=role))

    def check_proxied_target(self, host: str) -> None:
        """What can be checked of a target a proxy will resolve: its literal address, ``localhost``."""
        name = host.strip("[]").rstrip(".").lower()
        if name == "localhost" or name.endswith(".localhost"):
            raise BlockedAddress(f"refused: {host} names the loopback interface ({SETTING})")
        ip = literal_address(name)
        if ip is not None:
            reason = self.refusal(ip)
            if reason is not None:
                raise BlockedAddress(_message(host, str(ip), reason))

    # ------------------------------------------------------------------ the connection

    def create_connection(self, address: tuple[str, int], timeout: Any, *, role: str = "",
                          **options: Any) -> socket.socket:
        """Resolve ``address`` once and connect to the first allowed address that answers."""
        host, port = address
        error: OSError | None = None
        for ip in self.resolve(host, port, role=role):
            try:
                return urllib3.util.connection.create_connection((ip, port), timeout, **options)
            except OSError as exc:
                error = exc
        assert error is not None
        raise error

    @property
    def pool_classes(self) -> dict[str, type]:
        """urllib3 pool classes by scheme whose connections call this guard."""
        if self._pool_classes is None:
            self._pool_classes = _pool_classes("Guarded", (_GuardedConnection,), {"guard": self})
        return self._pool_classes


def _message(host: str, address: str, reason: str, *, role: str = "") -> str:
    verb = "is" if _same_address(host, address) else f"resolves to {address},"
    return f"refused: {role}{host} {verb} {reason} ({allowed_networks_hint(address)})"


def _same_address(host: str, address: str) -> bool:
    """Whether ``host`` is ``address`` written in standard notation (not a decimal or hex spelling)."""
    try:
        return ipaddress.ip_address(host.strip("[]")) == ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False


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
            sock = self.guard.create_connection((self._dns_host, self.port), self.timeout, role=role,
                                                source_address=self.source_address,
                                                socket_options=self.socket_options)
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
    http = type(f"{prefix}HTTPConnection", (*mixins, _QuickLivenessCheck, HTTPConnection), attrs)
    https = type(f"{prefix}HTTPSConnection", (*mixins, _QuickLivenessCheck, HTTPSConnection), attrs)
    return {
        "http": type(f"{prefix}HTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": http}),
        "https": type(f"{prefix}HTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": https}),
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
        self.guard = guard  # before super().__init__, which builds the pool manager
        super().__init__(**kwargs)

    @property
    def pool_classes(self) -> dict[str, type]:
        return self.guard.pool_classes

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        if proxy.lower().startswith("socks"):
            host = urllib3.util.parse_url(proxy).host
            raise BlockedAddress(f"refused: socks proxy {host}: its connections cannot be checked ({SETTING})")
        return super().proxy_manager_for(proxy, **kwargs)


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

    def send_one(self, method: str, url: str, *, headers: Mapping[str, Any] | None = None, body: bytes | None = None,
                 cookies: http.cookiejar.CookieJar | None = None, timeout: Any = None,
                 stream: bool = True) -> requests.Response:
        """Send one request (redirects not followed) with the session's headers,
        overlaid by ``headers`` (a ``None`` value drops one), proxies and adapters."""
        merged = CaseInsensitiveDict(self.headers)
        if headers:
            merged.update(headers)
        request = requests.PreparedRequest()
        request.prepare_method(method)
        request.prepare_url(url, None)
        request.prepare_headers({k: v for k, v in merged.items() if v is not None})
        if cookies is not None and len(cookies):
            request.prepare_cookies(cookies)
        request.body = body
        if body is not None:
            request.headers["Content-Length"] = str(len(body))
        request.prepare_auth(None, url)  # user:password@ in the URL
        request.hooks = default_hooks()
        return self.send(request, stream=stream, timeout=timeout, allow_redirects=False, proxies=self.proxies,
                         verify=self.verify, cert=self.cert)


def discard_body(response: requests.Response, limit: int = DISCARD_LIMIT) -> None:
    """Drop a body nobody wants: read at most ``limit`` raw bytes (the connection is then
    reused), else close the connection unread."""
    try:
        declared = response.headers.get("Content-Length", "")
        if not declared.isdigit() or int(declared) <= limit:
            response.raw.read(limit + 1, decode_content=False)
    except (urllib3.exceptions.HTTPError, OSError):
        pass  # the body is being thrown away; closing below settles the connection
    finally:
        response.close()


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
