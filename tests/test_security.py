"""Security: the address guard on every hop, size and time limits against
hostile servers, input hygiene the API tests leave out, Redis credentials.

Every test talks to real loopback servers (tests/httpserver.py, and below a
raw-socket server for answers no well-behaved server gives) and, where the
service runs, to the real test Redis. conftest turns the guard off for the
rest of the suite; here it is on.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import gevent
import gevent.server
import pytest

from gdl.config import allowed_networks_hint
from gdl.download import Downloader
from gdl.errors import (
    BlockedAddress,
    DownloadTimeout,
    InvalidURL,
    TLSError,
    TooLarge,
    TooManyRedirects,
    TruncatedBody,
)
from gdl.job import Job, new_id
from gdl.netguard import AddressGuard, describe, literal_address
from gdl.redis_server import find_binary
from gdl.store import Store
from tests.conftest import config_file, free_port, make_config, pings, wait_until
from tests.httpserver import LoopbackServer
from tests.samples import fetched_body
from tests.servers import CallbackReceiver

SETTING = "(security.block_private_networks)"  # refusals that allowed_networks cannot lift (socks, a proxied localhost)


def refused_by(address: str) -> str:
    """The end of a refusal of ``address``: the setting, and how to allow it."""
    return f"({allowed_networks_hint(address)})"
HEADERS = {"User-Agent": "gdl-test/1", "Accept": "*/*"}
LOOPBACK = ["127.0.0.0/8"]


# ---------------------------------------------------------------------------- helpers


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    with LoopbackServer() as srv:
        yield srv


@pytest.fixture
def scratch_dir(tmp_path: Path) -> str:
    path = tmp_path / "partial"
    path.mkdir()
    return str(path)


@pytest.fixture
def make_downloader(scratch_dir: str, engine: str) -> Iterator[Callable[..., Downloader]]:
    made: list[Downloader] = []

    def make(guard: AddressGuard | None, **options) -> Downloader:
        settings = {"proxy": "", "default_headers": HEADERS, "scratch_dir": scratch_dir, "chunk_size": 4096,
                    "engine": engine}
        downloader = Downloader(**{**settings, **options}, guard=guard)
        made.append(downloader)
        return downloader

    yield make
    for downloader in made:
        downloader.close()


def job(url: str, **fields) -> Job:
    return Job(id=new_id(), url=url, aggr_id="aggr", aggr_limit=1, **fields)


def resolver(names: dict[str, str], calls: list[str] | None = None) -> Callable[..., list]:
    """A getaddrinfo that answers ``names`` itself and asks the real one for the rest."""
    def resolve(host: str, port: int, family: int = 0, type: int = 0, *args: object) -> list:
        if calls is not None:
            calls.append(host)
        if host not in names:
            return socket.getaddrinfo(host, port, family, type)
        ip = names[host]
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port))]
    return resolve


@functools.cache
def gzip_of_zeros(size: int) -> bytes:
    """A gzip stream that expands to ``size`` zero bytes, made without holding them."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(1 << 20)
    parts = [packer.compress(chunk) for _ in range(size >> 20)]
    return b"".join(parts) + packer.flush()


# ---------------------------------------------------------------------------- the policy


@pytest.mark.parametrize(("address", "why"), [
    ("127.0.0.1", "a loopback address"),
    ("127.255.0.9", "a loopback address"),
    ("10.1.2.3", "a private address"),
    ("172.16.0.1", "a private address"),
    ("192.168.1.1", "a private address"),
    ("169.254.169.254", "a link-local address"),
    ("100.64.0.1", "a shared (CGNAT) address"),
    ("224.0.0.1", "a multicast address"),
    ("0.0.0.0", "an unspecified address"),
    ("0.1.2.3", "a non-public address"),
    ("240.0.0.1", "a reserved address"),
    ("255.255.255.255", "a reserved address"),
    ("192.0.2.1", "a non-public address"),
    ("::1", "a loopback address"),
    ("::", "an unspecified address"),
    ("fe80::1", "a link-local address"),
    ("fc00::1", "a private address"),
    ("fd12:3456::1", "a private address"),
    ("ff02::1", "a multicast address"),
    ("fec0::1", "a site-local address"),
    ("::7f00:1", "a reserved address"),                     # IPv4-compatible, deprecated
    ("2001:db8::1", "a non-public address"),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "a non-public address"),  # Teredo
    ("::ffff:127.0.0.1", "a loopback address (IPv4-mapped 127.0.0.1)"),
    ("::ffff:169.254.169.254", "a link-local address (IPv4-mapped 169.254.169.254)"),
    ("::ffff:10.0.0.1", "a private address (IPv4-mapped 10.0.0.1)"),
    ("2002:7f00:1::", "a loopback address (6to4 127.0.0.1)"),
    ("2002:a9fe:a9fe::1", "a link-local address (6to4 169.254.169.254)"),
    ("64:ff9b::a9fe:a9fe", "a link-local address (NAT64 169.254.169.254)"),
    ("8.8.8.8", None),
    ("93.184.216.34", None),
    ("2606:4700:4700::1111", None),
    ("::ffff:8.8.8.8", None),
    ("2002:808:808::1", None),
    ("64:ff9b::808:808", None),
])
def test_describe_classifies_addresses(address: str, why: str | None) -> None:
    assert describe(ipaddress.ip_address(address)) == why


@pytest.mark.parametrize(("host", "address"), [
    ("2130706433", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"),
    ("017700000001", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("0xa9fea9fe", "169.254.169.254"),
    ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1"),
    ("[::1]", "::1"),
    ("example.com", None),
    ("cafe.example", None),
    ("0x7f.example", None),
])
def test_literal_address_reads_every_spelling(host: str, address: str | None) -> None:
    assert literal_address(host) == (ipaddress.ip_address(address) if address else None)


def test_allowed_networks_exempt_their_addresses_only() -> None:
    guard = AddressGuard(["127.0.0.0/8", "fd00::/8"])
    assert guard.refusal("127.0.0.1") is None
    assert guard.refusal("::ffff:127.0.0.1") is None  # the mapped form of an allowed address
    assert guard.refusal("fd00::5") is None
    assert guard.refusal("10.0.0.1") == "a private address"
    assert guard.refusal("169.254.169.254") == "a link-local address"
    assert guard.refusal("::1") == "a loopback address"


def test_guard_follows_the_config() -> None:
    from gdl.config import SecurityConfig

    assert AddressGuard.from_config(SecurityConfig(block_private_networks=False)) is None
    guard = AddressGuard.from_config(SecurityConfig(allowed_networks=["10.0.0.0/8"]))
    assert guard is not None
    assert guard.allowed == (ipaddress.ip_network("10.0.0.0/8"),)
    assert SecurityConfig().block_private_networks is True  # on unless turned off


# ---------------------------------------------------------------------------- downloads


def test_loopback_url_is_refused_by_default(server, make_downloader, scratch_dir) -> None:
    server.add("/a", b"secret")
    with pytest.raises(BlockedAddress) as info:
        make_downloader(AddressGuard()).fetch(job(server.url("/a")), timeout=5)
    assert str(info.value) == ("refused: 127.0.0.1 is a loopback address (security.block_private_networks; to "
                               "allow it, add 127.0.0.0/8 to security.allowed_networks or set "
                               "GDL_SECURITY_ALLOWED_NETWORKS=127.0.0.0/8)")
    assert info.value.retriable is False
    assert info.value.response_code == 0
    assert server.count("/a") == 0
    assert os.listdir(scratch_dir) == []


def test_loopback_url_is_allowed_by_allowed_networks(server, make_downloader) -> None:
    server.add("/a", b"inside")
    fetched = make_downloader(AddressGuard(LOOPBACK)).fetch(job(server.url("/a")), timeout=5)
    assert fetched_body(fetched) == b"inside"
    assert server.count("/a") == 1


def test_public_looking_name_resolving_to_loopback_is_refused(server, make_downloader) -> None:
    server.add("/a", b"secret")
    guard = AddressGuard(resolve=resolver({"public.example": "127.0.0.1"}))
    with pytest.raises(BlockedAddress) as info:
        make_downloader(guard).fetch(job(f"http://public.example:{server.port}/a"), timeout=5)
    assert str(info.value) == \
        f"refused: public.example resolves to 127.0.0.1, a loopback address {refused_by('127.0.0.1')}"
    assert server.count("/a") == 0


def test_the_checked_address_is_the_one_connected_to(server, make_downloader) -> None:
    # A rebinding resolver: allowed the first time, loopback ever after. One
    # lookup per connection, and the socket goes to what that lookup said.
    calls: list[str] = []
    answers = iter(["127.0.0.1"])

    def rebinding(host: str, port: int, *args: object) -> list:
        calls.append(host)
        ip = next(answers, "127.0.0.2")
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port))]

    server.add("/a", b"ok")
    downloader = make_downloader(AddressGuard(["127.0.0.1/32"], resolve=rebinding))
    fetched = downloader.fetch(job(f"http://rebind.example:{server.port}/a"), timeout=5)
    assert fetched_body(fetched) == b"ok"
    assert calls == ["rebind.example"]
    assert server.requests_for("/a")[0].headers["Host"] == f"rebind.example:{server.port}"
    # A new connection (another downloader's) meets the rebound answer: refused.
    downloader = make_downloader(AddressGuard(["127.0.0.1/32"], resolve=rebinding))
    with pytest.raises(BlockedAddress, match="resolves to 127.0.0.2, a loopback address"):
        downloader.fetch(job(f"http://rebind.example:{server.port}/a"), timeout=5)
    assert calls == ["rebind.example", "rebind.example"]
    assert server.count("/a") == 1


@pytest.mark.parametrize(("host", "message"), [
    ("2130706433", "2130706433 resolves to 127.0.0.1, a loopback address"),
    ("0x7f.1", "0x7f.1 resolves to 127.0.0.1, a loopback address"),
    ("017700000001", "017700000001 resolves to 127.0.0.1, a loopback address"),
    ("127.1", "127.1 resolves to 127.0.0.1, a loopback address"),
    ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1 is a loopback address (IPv4-mapped 127.0.0.1)"),
    ("0.0.0.0", "0.0.0.0 is an unspecified address"),
])
def test_address_spellings_are_refused(server, make_downloader, host: str, message: str) -> None:
    server.add("/a", b"secret")
    url = f"http://{host}:{server.port}/a"
    with pytest.raises(BlockedAddress) as info:
        make_downloader(AddressGuard()).fetch(job(url), timeout=5)
    address = "0.0.0.0" if host == "0.0.0.0" else "127.0.0.1"
    assert str(info.value) == f"refused: {message} {refused_by(address)}"
    assert server.count("/a") == 0


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "017700000001", "127.1"])
def test_address_spellings_do_reach_loopback_when_allowed(server, make_downloader, host: str) -> None:
    # The control for the test above: these spellings are loopback, not junk.
    server.add("/a", b"here")
    fetched = make_downloader(AddressGuard(LOOPBACK)).fetch(job(f"http://{host}:{server.port}/a"), timeout=5)
    assert fetched_body(fetched) == b"here"


def test_redirect_to_the_metadata_address_is_refused(server, make_downloader, scratch_dir) -> None:
    server.add_redirect("/r", "http://169.254.169.254/latest/meta-data/")
    with pytest.raises(BlockedAddress) as info:
        make_downloader(AddressGuard(LOOPBACK)).fetch(job(server.url("/r")), timeout=5)
    assert str(info.value) == (f"refused: 169.254.169.254 is a link-local address {refused_by('169.254.169.254')}, "
                               "at redirect 1 to http://169.254.169.254/latest/meta-data/")
    assert info.value.retriable is False
    assert server.count("/r") == 1
    assert os.listdir(scratch_dir) == []


def test_redirect_to_a_name_resolving_to_a_private_address_is_refused(server, make_downloader) -> None:
    server.add_redirect("/r", "http://intranet.example/admin")
    guard = AddressGuard(LOOPBACK, resolve=resolver({"intranet.example": "10.0.0.7"}))
    with pytest.raises(BlockedAddress) as info:
        make_downloader(guard).fetch(job(server.url("/r")), timeout=5)
    assert str(info.value) == (f"refused: intranet.example resolves to 10.0.0.7, a private address "
                               f"{refused_by('10.0.0.7')}, at redirect 1 to http://intranet.example/admin")


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1:6379/_x"])
def test_redirect_to_another_scheme_is_refused(server, make_downloader, location: str) -> None:
    server.add_redirect("/r", location)
    with pytest.raises(InvalidURL) as info:
        make_downloader(AddressGuard(LOOPBACK)).fetch(job(server.url("/r")), timeout=5)
    assert str(info.value) == f"invalid URL {location!r}: only http and https URLs are fetched"
    assert info.value.retriable is False


def test_max_redirects_zero_follows_none(server, make_downloader) -> None:
    server.add_redirect("/r", "/final")
    server.add("/final", b"x")
    with pytest.raises(TooManyRedirects) as info:
        make_downloader(AddressGuard(LOOPBACK), max_redirects=0).fetch(job(server.url("/r")), timeout=5)
    assert str(info.value) == "more than 0 redirects (security.max_redirects)"
    assert info.value.response_code == 302
    assert (server.count("/r"), server.count("/final")) == (1, 0)


def test_credentials_do_not_follow_a_redirect_to_another_host(make_downloader) -> None:
    with LoopbackServer() as first, LoopbackServer() as other:
        first.add("/start", b"", status=302, headers={"Location": "/same", "Set-Cookie": "hop=1; Path=/"})
        first.add_redirect("/same", f"http://other.example:{other.port}/elsewhere")
        other.add("/elsewhere", b"landed")
        headers = {"Authorization": "Bearer job-secret", "Cookie": "session=job-secret"}
        guard = AddressGuard(LOOPBACK, resolve=resolver({"other.example": "127.0.0.1"}))
        fetched = make_downloader(guard).fetch(job(first.url("/start"), request_headers=headers), timeout=5)
        assert fetched_body(fetched) == b"landed"
        start = first.requests_for("/start")[0].headers
        same = first.requests_for("/same")[0].headers
        elsewhere = other.requests_for("/elsewhere")[0].headers
    assert (start["Authorization"], start["Cookie"]) == ("Bearer job-secret", "session=job-secret")
    assert (same["Authorization"], same["Cookie"]) == ("Bearer job-secret", "hop=1")  # same host
    assert "Authorization" not in elsewhere
    assert "Cookie" not in elsewhere


# ---------------------------------------------------------------------------- proxies


def test_a_private_proxy_is_refused(server, make_downloader) -> None:
    server.add("/p", b"via proxy")
    downloader = make_downloader(AddressGuard(), proxy=server.base_url)
    with pytest.raises(BlockedAddress) as info:
        downloader.fetch(job("http://gdl-test.invalid/p"), timeout=5)
    assert str(info.value) == f"refused: proxy 127.0.0.1 is a loopback address {refused_by('127.0.0.1')}"
    assert server.count("/p") == 0


def test_an_allowed_proxy_carries_a_public_name(server, make_downloader) -> None:
    server.add("/p", b"via proxy")
    downloader = make_downloader(AddressGuard(LOOPBACK), proxy=server.base_url)
    fetched = downloader.fetch(job("http://gdl-test.invalid/p"), timeout=5)
    assert fetched_body(fetched) == b"via proxy"
    assert [r.target for r in server.requests_for("/p")] == ["http://gdl-test.invalid/p"]


@pytest.mark.parametrize(("url", "message", "ending"), [
    ("http://10.0.0.1/p", "10.0.0.1 is a private address", refused_by("10.0.0.1")),
    ("http://169.254.169.254/p", "169.254.169.254 is a link-local address", refused_by("169.254.169.254")),
    ("http://0xa9fea9fe/p", "0xa9fea9fe resolves to 169.254.169.254, a link-local address",
     refused_by("169.254.169.254")),
    ("http://[::ffff:a9fe:a9fe]/p", "::ffff:a9fe:a9fe is a link-local address (IPv4-mapped 169.254.169.254)",
     refused_by("169.254.169.254")),
    ("https://192.168.0.1/p", "192.168.0.1 is a private address", refused_by("192.168.0.1")),
    # the proxy resolves a name: allowed_networks cannot vouch for it, so no hint to allow it
    ("http://localhost/p", "localhost names the loopback interface", SETTING),
    ("http://admin.localhost./p", "admin.localhost. names the loopback interface", SETTING),
])
def test_literal_private_targets_are_refused_through_a_proxy(server, make_downloader, url: str,
                                                             message: str, ending: str) -> None:
    # The proxy would resolve the name; the URL's literal address is what gdl can see.
    server.add("/p", b"internal")
    downloader = make_downloader(AddressGuard(["127.0.0.1/32"]), proxy=server.base_url)
    with pytest.raises(BlockedAddress) as info:
        downloader.fetch(job(url), timeout=5)
    assert str(info.value) == f"refused: {message} {ending}"
    assert server.count("/p") == 0


def test_a_socks_proxy_is_refused_while_the_guard_is_on(make_downloader) -> None:
    downloader = make_downloader(AddressGuard(), proxy="socks5h://user:pw@proxy.example:1080")
    with pytest.raises(BlockedAddress) as info:
        downloader.fetch(job("http://example.com/a"), timeout=5)
    assert str(info.value) == f"refused: socks proxy proxy.example: its connections cannot be checked {SETTING}"


# ---------------------------------------------------------------------------- TLS keeps the hostname


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for public.example (and only that name)."""
    openssl = shutil.which("openssl")
    assert openssl, "the openssl command (Debian's openssl package) is needed to make a test certificate"
    where = tmp_path_factory.mktemp("tls")
    key, cert = str(where / "key.pem"), str(where / "cert.pem")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=public.example", "-addext", "subjectAltName=DNS:public.example",
                    "-addext", "basicConstraints=critical,CA:TRUE"],
                   check=True, capture_output=True)
    return cert, key


def test_https_keeps_sni_and_verifies_the_hostname(certificate, raw_server, make_downloader) -> None:
    cert, key = certificate
    names: list[str | None] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda _sock, name, _ctx: names.append(name)

    def answer(sock: socket.socket, _request: bytes) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nContent-Type: text/plain\r\n\r\nsecure")

    tls = raw_server(answer, ssl_context=context)
    guard = AddressGuard(LOOPBACK, resolve=resolver({"public.example": "127.0.0.1", "other.example": "127.0.0.1"}))
    downloader = make_downloader(guard, ca_bundle=cert)  # trust the test certificate, and only it
    fetched = downloader.fetch(job(f"https://public.example:{tls.port}/s"), timeout=5)
    assert fetched_body(fetched) == b"secure"
    assert names == ["public.example"]
    assert f"\r\nHost: public.example:{tls.port}\r\n".encode() in tls.requests[0]
    # The same address under another name: the certificate is checked against the name.
    with pytest.raises(TLSError) as info:
        downloader.fetch(job(f"https://other.example:{tls.port}/s"), timeout=5)
    assert str(info.value) == "TLS: certificate is not valid for other.example"
    assert len(tls.requests) == 1


# ---------------------------------------------------------------------------- hostile servers


def test_content_length_of_10_gb_is_refused_before_reading(server, make_downloader, scratch_dir) -> None:
    server.add("/huge", b"x" * 1000, content_length=10 * 1024 ** 3, close=True)
    with pytest.raises(TooLarge) as info:
        make_downloader(AddressGuard(LOOPBACK), max_bytes=1 << 20).fetch(job(server.url("/huge")), timeout=5)
    assert str(info.value) == "Content-Length 10737418240 exceeds the limit of 1048576 bytes"
    assert (info.value.retriable, info.value.response_code) == (False, 200)
    assert os.listdir(scratch_dir) == []


def test_an_endless_chunked_body_is_cut_at_the_limit(raw_server, make_downloader, scratch_dir) -> None:
    sent = [0]

    def endless(sock: socket.socket, _request: bytes) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (8192, b"z" * 8192)
        while True:
            sock.sendall(chunk)
            sent[0] += 8192

    srv = raw_server(endless)
    with pytest.raises(TooLarge) as info:
        make_downloader(AddressGuard(LOOPBACK), max_bytes=100_000).fetch(job(srv.url("/x")), timeout=10)
    assert str(info.value) == "body exceeds the limit of 100000 bytes"
    assert os.listdir(scratch_dir) == []
    assert sent[0] >= 100_000


def test_a_body_longer_than_its_content_length_is_read_to_the_length_only(server, make_downloader) -> None:
    server.add("/lie", b"a" * 1000 + b"b" * 200_000, content_length=1000)
    server.add("/next", b"clean")
    downloader = make_downloader(AddressGuard(LOOPBACK), max_bytes=4096)
    fetched = downloader.fetch(job(server.url("/lie")), timeout=5)
    assert fetched_body(fetched) == b"a" * 1000
    # The rest is never taken for the next answer on that connection.
    assert fetched_body(downloader.fetch(job(server.url("/next")), timeout=5)) == b"clean"


def test_a_one_byte_per_second_server_is_stopped_at_the_deadline(server, make_downloader, scratch_dir) -> None:
    server.add_drip("/drip", b"x" * 100, interval=1.0)
    with pytest.raises(DownloadTimeout) as info:
        make_downloader(AddressGuard(LOOPBACK)).fetch(job(server.url("/drip")), timeout=2)
    assert str(info.value) == "download did not finish within 2s"  # the whole download's deadline, not a read's
    assert (info.value.retriable, info.value.response_code) == (True, 200)
    assert os.listdir(scratch_dir) == []


def test_a_connection_reset_mid_body_is_retried(raw_server, make_downloader, scratch_dir) -> None:
    def reset(sock: socket.socket, _request: bytes) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 20_000)
        gevent.sleep(0.1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # linger 0: a reset

    with pytest.raises(TruncatedBody) as info:
        make_downloader(AddressGuard(LOOPBACK)).fetch(job(raw_server(reset).url("/x")), timeout=5)
    assert str(info.value).endswith(" bytes: connection reset by peer")
    assert (info.value.retriable, info.value.response_code) == (True, 200)
    assert os.listdir(scratch_dir) == []


def test_a_gzip_bomb_is_stored_as_sent(server, make_downloader) -> None:
    bomb = gzip_of_zeros(128 << 20)  # 128 MiB of zeros in about 130 KB
    server.add("/bomb", bomb, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})
    fetched = make_downloader(AddressGuard(LOOPBACK), max_bytes=1 << 20).fetch(
        job(server.url("/bomb"), mime_type="*/*"), timeout=10)
    assert len(bomb) < 1 << 20
    assert fetched.size == len(bomb)
    assert fetched_body(fetched) == bomb
    assert fetched.mime == "application/gzip"


def test_a_gzip_bomb_over_the_limit_is_refused(server, make_downloader, scratch_dir) -> None:
    bomb = gzip_of_zeros(128 << 20)
    server.add("/bomb", bomb, headers={"Content-Encoding": "gzip"}, content_length=None, chunked=True)
    with pytest.raises(TooLarge, match="body exceeds the limit of 50000 bytes"):
        make_downloader(AddressGuard(LOOPBACK), max_bytes=50_000).fetch(job(server.url("/bomb")), timeout=10)
    assert os.listdir(scratch_dir) == []


@pytest.mark.parametrize("framing", [
    b"",                                                            # ended by closing: never, here
    b"Content-Length: 10737418240\r\n",
    b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
])
def test_a_redirect_body_is_not_read_past_a_few_kib(server, raw_server, make_downloader, framing: bytes) -> None:
    # The 30x sends 1 MiB of body (or 128 MiB of zeros gzipped into 130 KB)
    # and then holds the connection open: reading it to the end would wait
    # for the deadline (and requests would inflate the gzip in memory).
    server.add("/final", b"arrived")
    payload = gzip_of_zeros(128 << 20) if b"gzip" in framing else b"r" * (1 << 20)
    if b"chunked" in framing:
        payload = b"%x\r\n%s\r\n" % (len(payload), payload)

    def hostile(sock: socket.socket, _request: bytes) -> None:
        sock.sendall(b"HTTP/1.1 302 Found\r\nLocation: " + server.url("/final").encode() + b"\r\n" + framing
                     + b"\r\n")
        sock.sendall(payload)
        gevent.sleep(30)

    srv = raw_server(hostile)
    # Reading the redirect's body to its end would meet the deadline and fail.
    fetched = make_downloader(AddressGuard(LOOPBACK)).fetch(job(srv.url("/r")), timeout=8)
    assert fetched_body(fetched) == b"arrived"
    assert server.count("/final") == 1


# ---------------------------------------------------------------------------- the service


@pytest.fixture
def receiver() -> Iterator[CallbackReceiver]:
    srv = CallbackReceiver()
    yield srv
    srv.stop()


def settled(running, job_id: str) -> dict:
    def done():
        record = running.get(f"/jobs/{job_id}").json()
        return record if record["callback_state"] in ("delivered", "failed") else None
    return wait_until(done, timeout=15)


def test_refused_download_and_callback_fail_at_once_saying_why(run_service, receiver, engine) -> None:
    # Literal private destinations are refused at submit (tests below); to reach the refusal
    # where the connection is made, the api accepts them (its guard off) and the workers' guard is on.
    running = run_service(("api",), security={"block_private_networks": False})
    run_service(("processor", "notifier"), security={"block_private_networks": True}, http={"engine": engine})
    job_id = running.enqueue(url="http://10.255.255.1/secret", aggr_id="a", aggr_limit=1, max_retries=3,
                             callback_url=receiver.url("/cb"))
    record = settled(running, job_id)
    assert (record["state"], record["attempts"]) == ("failed", 1)
    assert record["error"] == f"refused: 10.255.255.1 is a private address {refused_by('10.255.255.1')}"
    assert (record["callback_state"], record["callback_attempts"]) == ("failed", 1)
    assert record["callback_error"] == (f"callback to {receiver.url('/cb')} refused: 127.0.0.1 is a loopback "
                                        f"address {refused_by('127.0.0.1')}")
    assert receiver.bodies() == []


# ---------------------------------------------------------------------------- at submit: literal destinations

HINT_LOOPBACK = ("refused by security.block_private_networks; to allow it, add 127.0.0.0/8 to "
                 "security.allowed_networks or set GDL_SECURITY_ALLOWED_NETWORKS=127.0.0.0/8")
SUBMIT = {"url": "http://example.com/a", "aggr_id": "a", "aggr_limit": 1, "callback_url": "http://example.com/cb"}


@pytest.mark.parametrize(("fields", "error"), [
    ({"url": "http://127.0.0.1:8080/a"}, f"url: 127.0.0.1 is a loopback address, {HINT_LOOPBACK}"),
    ({"url": "http://[::1]/a"}, "url: ::1 is a loopback address, refused by security.block_private_networks; "
                                "to allow it, add ::1/128 to security.allowed_networks or set "
                                "GDL_SECURITY_ALLOWED_NETWORKS=::1/128"),
    ({"url": "http://2130706433/a"}, f"url: 2130706433 is 127.0.0.1, a loopback address, {HINT_LOOPBACK}"),
    ({"callback_url": "http://localhost:9999/cb"}, f"callback_url: localhost names the loopback interface, "
                                                   f"{HINT_LOOPBACK}"),
    ({"callback_url": None, "callback_type": "http", "callback_dst": "http://10.0.0.5/cb"},
     "callback_dst: 10.0.0.5 is a private address, refused by security.block_private_networks; to allow it, add "
     "10.0.0.5/32 to security.allowed_networks or set GDL_SECURITY_ALLOWED_NETWORKS=10.0.0.5/32"),
])
def test_a_literal_refused_destination_is_400_at_submit(run_service, store, fields: dict, error: str) -> None:
    running = run_service(("api",), security={"block_private_networks": True})
    body = {k: v for k, v in {**SUBMIT, **fields}.items() if v is not None}
    response = running.post("/download", body)
    assert (response.status_code, response.json()) == (400, {"error": error})
    assert store.redis.keys("*job:*") == []


@pytest.mark.parametrize("security", [
    {"block_private_networks": True, "allowed_networks": ["127.0.0.0/8"]},
    {"block_private_networks": False},
])
def test_allowed_or_unguarded_literal_destinations_are_accepted(run_service, security: dict) -> None:
    running = run_service(("api",), security=security)
    running.enqueue(**{**SUBMIT, "url": "http://127.0.0.1:8080/a", "callback_url": "http://localhost:9999/cb"})


def test_names_and_kafka_topics_are_left_to_the_guard_at_connect_time(run_service) -> None:
    running = run_service(("api",), security={"block_private_networks": True})
    running.enqueue(**{**SUBMIT, "url": "http://intranet.example/a"})  # may resolve anywhere by then
    running.enqueue(**{k: v for k, v in SUBMIT.items() if k != "callback_url"}, callback_type="kafka",
                    callback_dst="localhost")


def test_allowed_networks_let_download_and_callback_through(run_service, server, receiver, engine) -> None:
    server.add("/a", b"allowed")
    running = run_service(security={"block_private_networks": True, "allowed_networks": LOOPBACK},
                          http={"engine": engine})
    job_id = running.enqueue(url=server.url("/a"), aggr_id="a", aggr_limit=1, callback_url=receiver.url("/cb"))
    record = settled(running, job_id)
    assert (record["state"], record["bytes"], record["callback_state"]) == ("succeeded", 7, "delivered")
    [body] = receiver.bodies()
    assert (body["job_id"], body["success"]) == (job_id, True)


# ---------------------------------------------------------------------------- API input hygiene


JOB = {"url": "http://example.com/a.png", "aggr_id": "shop1", "aggr_limit": 3, "callback_type": "http",
       "callback_dst": "http://cb.example.com/done"}


@pytest.mark.parametrize("headers", [
    {"X-A": "a\nInjected: 1"},
    {"X-A": "a\rb"},
    {"X-A": "a\x00b"},
    {"X-A": "a\x7fb"},
    {"X-A\r\nInjected": "1"},
    {"X A": "1"},
    {"X-A:": "1"},
    {"transfer-encoding": "chunked"},
    {"Connection": "close"},
    {"Proxy-Authorization": "Basic eDp5"},
    {"content-length": "0"},
    {"HOST": "internal"},
])
def test_header_injection_is_refused(run_service, store: Store, headers: dict) -> None:
    running = run_service(roles=("api",))
    response = running.post("/download", {**JOB, "request_headers": headers})
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith("request_headers: ")
    assert store.redis.keys("*job*") == []


@pytest.mark.parametrize(("path", "status"), [
    ("/files/../../etc/passwd", 404),
    ("/files/%2e%2e/%2e%2e/etc/passwd", 404),
    ("/files/%2e%2e%2f%2e%2e%2fetc%2fpasswd", 404),
    ("/files/..%2F..%2Fetc/passwd", 404),
    ("/files/..%252f..%252fetc%252fpasswd", 404),
    ("/files/..%5c..%5cetc%5cpasswd", 404),
    ("/files/etc/%2e%2e%2f%2e%2e%2fpasswd", 404),
    ("/jobs/..%2F..", 404),
    ("/jobs/%2e%2e", 404),
    ("/retry/..%2F..", 404),
])
def test_traversal_to_etc_passwd_is_refused(run_service, path: str, status: int) -> None:
    running = run_service(roles=("api",))
    code, body = running.raw("GET" if not path.startswith("/retry") else "POST", path)
    assert code == status
    assert b"root:" not in body


def test_api_tokens_read_guards_reads_too(run_service) -> None:
    running = run_service(roles=("api",), security={"api_tokens": ["s3cret"], "api_tokens_read": True})
    good = {"Authorization": "Bearer s3cret"}
    for wrong in ({}, {"Authorization": "Bearer s3cre"}, {"Authorization": "Bearer s3cretX"},
                  {"Authorization": "Bearer "}):
        assert running.post("/download", JOB, headers=wrong).status_code == 401
    response = running.post("/download", JOB, headers=good)
    assert response.status_code == 201
    job_id = response.json()["id"]
    assert running.get(f"/jobs/{job_id}").status_code == 401
    assert running.get(f"/jobs/{job_id}", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert running.get(f"/jobs/{job_id}", headers=good).json()["id"] == job_id


# ---------------------------------------------------------------------------- Redis credentials


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[int]:
    """A redis-server with a default-user password and an ACL user ``gdl``."""
    port = free_port()
    process = subprocess.Popen(
        [find_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path), "--save", "",
         "--appendonly", "no", "--requirepass", "default-pw",
         "--user", "gdl", "on", ">gdl-pw", "~*", "&*", "+@all"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    probe = Store.connect(f"redis://:default-pw@127.0.0.1:{port}/0")
    try:
        wait_until(lambda: pings(probe), timeout=10)
        yield port
    finally:
        probe.close()
        process.terminate()
        process.wait(timeout=10)


def test_gdl_connects_with_an_acl_user_and_password(run_service, locked_redis: int, tmp_path: Path) -> None:
    url = f"redis://gdl:gdl-pw@127.0.0.1:{locked_redis}/0"
    running = run_service(roles=("api",), cfg=make_config(tmp_path, url))
    job_id = running.enqueue(**JOB)
    check = Store.connect(url)
    try:
        assert check.redis.acl_whoami() == "gdl"
        assert check.redis.exists(*check.redis.keys(f"*{job_id}*")) >= 1
    finally:
        check.close()
    assert running.get(f"/jobs/{job_id}").json()["id"] == job_id


@pytest.mark.parametrize("userinfo", ["gdl:not-the-pw", ":not-the-pw"])
def test_a_wrong_redis_password_exits_2_without_printing_it(locked_redis: int, tmp_path: Path,
                                                            userinfo: str) -> None:
    cfg = make_config(tmp_path, f"redis://{userinfo}@127.0.0.1:{locked_redis}/0")
    path = config_file(tmp_path, cfg, "locked.yaml")
    result = subprocess.run([sys.executable, "-m", "gdl.cli", "--config", str(path), "api"],
                            capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"gdl: redis.url: cannot reach redis at redis://***@127.0.0.1:{locked_redis}/0: ")
    assert "not-the-pw" not in result.stderr
    assert "not-the-pw" not in result.stdout
