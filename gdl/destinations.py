"""Where a job points, checked when it is submitted: a refused literal address is a 400.

The address guard (:mod:`gdl.netguard`) judges every connection when it is
made, after resolving the host. A job whose ``url`` or HTTP callback is
written as an address the guard refuses (``127.0.0.1``, ``[::1]``,
``10.0.0.5``, or any spelling resolvers read as one, such as ``2130706433``)
or names ``localhost`` would be refused then for certain, after the client
was told 201; so ``POST /download`` refuses it at once, naming the field and
how to allow it. Names that merely resolve to such addresses are left to the
guard: DNS answers change between now and the download.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterator
from urllib.parse import urlsplit

from gdl.config import allowed_networks_hint
from gdl.errors import ValidationError
from gdl.job import Job
from gdl.netguard import AddressGuard, literal_address
from gdl.submission import url_origin

# What a ``localhost`` name reaches (RFC 6761: it and its subdomains are loopback).
_LOCALHOST = ipaddress.IPv4Address("127.0.0.1")


def check(job: Job, body: dict, guard: AddressGuard | None) -> None:
    """Raise :class:`ValidationError` for the first destination of ``job`` (parsed from
    ``body``) that ``guard`` would refuse whatever the resolver says; nothing while the
    guard is off (None)."""
    if guard is None:
        return
    for field, url in _destinations(job, body):
        host, ip = _host_and_address(url_origin(url))
        if ip is None:
            continue
        reason = guard.refusal(ip)
        if reason is not None:
            if ip is _LOCALHOST:
                what = "names the loopback interface"
            else:  # another spelling (2130706433, 0x7f.1) says which address it is
                what = f"is {reason}" if host.strip("[]") == str(ip) else f"is {ip}, {reason}"
            raise ValidationError(field, f"{host} {what}, refused by {allowed_networks_hint(str(ip))}")


def _destinations(job: Job, body: dict) -> Iterator[tuple[str, str]]:
    """(field, URL) of what gdl will connect to for this job, named as the client sent them."""
    yield "url", job.url
    if job.callback_type == "http":
        # callback_type + callback_dst win over the legacy callback_url (gdl.submission._callback)
        legacy = not (body.get("callback_type") or body.get("callback_dst"))
        yield ("callback_url" if legacy else "callback_dst"), job.callback_dst


@functools.lru_cache(maxsize=4096)
def _host_and_address(origin: str) -> tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address | None]:
    """The host named by a URL's origin (``http://host:port``), and the address it
    certainly is (see :func:`_address_of`). Cached by origin: a batch or a busy client
    names the same few (its images' hosts, its callback's) again and again, and a
    urlsplit and telling a name from an address's many spellings cost tens of
    microseconds."""
    host = urlsplit(origin).hostname or ""
    return host, _address_of(host)


def _address_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host written in a URL certainly is, or None for a name."""
    return _LOCALHOST if _is_localhost(host) else literal_address(host)


def _is_localhost(host: str) -> bool:
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")
