"""The address guard: the policy on where gdl's outgoing HTTP may connect.

gdl GETs URLs and POSTs callbacks to URLs that its clients name. Unchecked,
that makes it a proxy into the network it runs in. :class:`AddressGuard`
(on while ``security.block_private_networks`` is true) refuses to connect to
any address that is not public unicast: loopback, private, link-local
(169.254.0.0/16, cloud metadata included), shared/CGNAT (100.64.0.0/10),
multicast, unspecified, reserved, IPv4 and IPv6, and IPv4 addresses inside
IPv6 ones (IPv4-mapped, 6to4, NAT64). ``security.allowed_networks`` exempts
CIDRs.

This module is the policy only; each HTTP engine (:mod:`gdl.http`) calls it
where its sockets are made: the host is resolved once by
:meth:`AddressGuard.resolve`, every address is checked, and the socket
connects to a checked address (:meth:`AddressGuard.check_address`), so
there is no second lookup for DNS rebinding to slip through, and every
spelling the resolver accepts (``2130706433``, ``0x7f.1``,
``017700000001``) is judged by the address it resolves to. Every redirect
hop and every proxy goes through the same engine code. Through a proxy, the
proxy resolves the target, so only what the URL itself shows can be
checked: literal addresses in any spelling and ``localhost`` names
(:meth:`AddressGuard.check_proxied_target`). A SOCKS proxy is refused
while the guard is on (:meth:`AddressGuard.check_proxy`).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from gdl.config import allowed_networks_hint
from gdl.errors import BlockedAddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., list]  # socket.getaddrinfo's signature

SETTING = "security.block_private_networks"

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
        family = socket.AF_UNSPEC if socket.has_ipv6 else socket.AF_INET
        infos = resolve(name, port, family, socket.SOCK_STREAM)
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
            self.check_address(host, str(ip))

    def check_address(self, host: str, address: str, *, role: str = "") -> None:
        """Raise BlockedAddress when ``address`` (what ``host`` led to) is refused."""
        reason = self.refusal(address)
        if reason is not None:
            raise BlockedAddress(_message(host, address, reason, role=role))

    def check_proxy(self, proxy: str) -> None:
        """A SOCKS proxy connects to its targets where no engine can check them: refused."""
        parts = urlsplit(proxy)
        if parts.scheme.lower().startswith("socks"):
            raise BlockedAddress(f"refused: socks proxy {parts.hostname}: its connections cannot be checked "
                                 f"({SETTING})")


def _message(host: str, address: str, reason: str, *, role: str = "") -> str:
    verb = "is" if _same_address(host, address) else f"resolves to {address},"
    return f"refused: {role}{host} {verb} {reason} ({allowed_networks_hint(address)})"


def _same_address(host: str, address: str) -> bool:
    """Whether ``host`` is ``address`` written in standard notation (not a decimal or hex spelling)."""
    try:
        return ipaddress.ip_address(host.strip("[]")) == ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
