"""The HTTP seam's contract on both engines (the ``engine`` fixture): one exchange,
failures in the same words and types, the guard at connect time, back-pressure.
The download and security suites run on both engines too, and so do HTTP
callbacks (tests/test_http_callbacks.py, tests/test_backends_contract.py).

Real loopback servers only (tests/httpserver.py, tests/servers.py).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import gevent
import pytest

from gdl.config import allowed_networks_hint
from gdl.errors import BlockedAddress, ConnectionFailed, DownloadTimeout, TLSError, TruncatedBody
from gdl.http import Engine, Exchange, make_engine
from gdl.netguard import AddressGuard
from tests.conftest import free_port, wait_until
from tests.httpserver import LoopbackServer

LOOPBACK_REFUSED = f"({allowed_networks_hint('127.0.0.1')})"  # the setting, and how to allow it


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    with LoopbackServer() as srv:
        yield srv


@pytest.fixture
def new_engine(engine: str) -> Iterator[Callable[..., Engine]]:
    made: list[Engine] = []

    def make(**options) -> Engine:
        made.append(make_engine(engine, **options))
        return made[-1]

    yield make
    for each in made:
        each.close()


def get(http: Engine, url: str, **options) -> tuple[int, bytes]:
    with http.send(Exchange("GET", url, [("User-Agent", "gdl-test/1")], **options)) as response:
        return response.status, b"".join(response.chunks())


def body_failure(http: Engine, url: str) -> TruncatedBody:
    """What reading ``url``'s body (500 bytes at a time where the engine reads by size) raised."""
    with http.send(Exchange("GET", url)) as response:
        with pytest.raises(TruncatedBody) as info:
            for _ in response.chunks(500):
                pass
    return info.value


def closed_port() -> int:
    return free_port()  # bound and closed again: nothing listens there


# ---------------------------------------------------------------------------- one exchange


def test_an_exchange_sends_exactly_the_headers_it_is_given(server, new_engine) -> None:
    server.add("/h", b"hello", headers={"X-Answer": "42"})
    with new_engine().send(Exchange("GET", server.url("/h"), [("User-Agent", "t/1"), ("X-Token", "abc")])) as r:
        body = b"".join(r.chunks())
    assert (r.status, r.reason, body, r.headers.get("x-answer")) == (200, "OK", b"hello", "42")
    seen = server.requests_for("/h")[0].headers
    assert sorted(seen.keys()) == ["Host", "User-Agent", "X-Token"]  # no Accept, Accept-Encoding, Connection
    assert (seen["User-Agent"], seen["X-Token"]) == ("t/1", "abc")


def test_proxies_and_credentials_from_the_environment_are_not_used(server, new_engine, monkeypatch,
                                                                   tmp_path) -> None:
    server.add("/direct", b"direct")
    dead = f"http://127.0.0.1:{closed_port()}"
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead)
    (tmp_path / ".netrc").write_text("machine 127.0.0.1 login user password secret\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    assert get(new_engine(), server.url("/direct")) == (200, b"direct")
    assert "Authorization" not in server.requests_for("/direct")[0].headers


def test_repeated_response_headers_are_all_kept(raw_server, new_engine) -> None:
    def answer(sock: socket.socket, _request: bytes) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n")

    srv = raw_server(answer)
    with new_engine().send(Exchange("GET", srv.url("/c"))) as response:
        assert response.headers.get_all("set-cookie") == ["a=1", "b=2"]
        assert response.headers.get("Set-Cookie") == "a=1, b=2"
        assert b"".join(response.chunks()) == b""


def test_a_head_after_100_continue_is_the_final_one(raw_server, new_engine) -> None:
    def answer(sock: socket.socket, _request: bytes) -> None:
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")

    status, body = get(new_engine(), raw_server(answer).url("/x"))
    assert (status, body) == (201, b"ok")


def test_a_body_ending_before_its_length_in_words(server, new_engine) -> None:
    server.add_truncated("/cut", b"x" * 1000, declared_length=10_000)
    error = body_failure(new_engine(), server.url("/cut"))
    assert str(error) == "the body was cut short after 1000 bytes: the connection closed before its end"
    assert (error.retriable, error.response_code) == (True, 200)


def test_a_response_closed_early_leaves_a_clean_engine(server, new_engine) -> None:
    server.add("/big", os.urandom(4 << 20))
    server.add("/small", b"after")
    http = new_engine()
    response = http.send(Exchange("GET", server.url("/big")))
    first = next(response.chunks())
    response.close()
    response.close()  # twice is fine
    assert len(first) > 0
    assert get(http, server.url("/small")) == (200, b"after")


# ---------------------------------------------------------------------------- failures, in words


def test_an_unknown_host_in_words(new_engine) -> None:
    with pytest.raises(ConnectionFailed) as info:
        get(new_engine(), "http://gdl-test.invalid/x")
    assert str(info.value) == "cannot resolve gdl-test.invalid"
    assert info.value.retriable is True


def test_an_unknown_proxy_in_words(new_engine) -> None:
    with pytest.raises(ConnectionFailed) as info:
        get(new_engine(), "http://example.com/x", proxy="http://gdl-proxy.invalid:3128")
    assert str(info.value) == "cannot resolve proxy gdl-proxy.invalid"


def test_a_refused_connection_in_words(new_engine) -> None:
    port = closed_port()
    with pytest.raises(ConnectionFailed) as info:
        get(new_engine(), f"http://127.0.0.1:{port}/x")
    assert str(info.value) == f"connection refused by 127.0.0.1:{port}"
    assert info.value.retriable is True


def test_a_server_hanging_up_before_answering_in_words(raw_server, new_engine) -> None:
    srv = raw_server(lambda sock, _request: sock.close())
    with pytest.raises(ConnectionFailed) as info:
        get(new_engine(), srv.url("/x"))
    assert str(info.value) == f"127.0.0.1:{srv.port} closed the connection before answering"


def test_a_server_that_never_answers_in_words(raw_server, new_engine) -> None:
    srv = raw_server(lambda _sock, _request: gevent.sleep(30))
    with pytest.raises(DownloadTimeout) as info:
        get(new_engine(), srv.url("/x"), timeout=1)
    assert str(info.value) == "timed out after 1s"
    assert info.value.retriable is True


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    """A TLS server context with a self-signed certificate for 127.0.0.1."""
    openssl = shutil.which("openssl")
    assert openssl, "the openssl command (Debian's openssl package) is needed to make a test certificate"
    where: Path = tmp_path_factory.mktemp("self-signed")
    key, cert = str(where / "key.pem"), str(where / "cert.pem")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def test_an_untrusted_certificate_in_words(raw_server, new_engine, self_signed) -> None:
    srv = raw_server(lambda sock, _request: sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
                     ssl_context=self_signed)
    with pytest.raises(TLSError) as info:
        get(new_engine(), f"https://127.0.0.1:{srv.port}/x")  # verified against certifi's bundle
    assert str(info.value) == "TLS: self-signed certificate"
    assert info.value.retriable is False
    assert srv.requests == []


def test_a_plain_http_server_on_https_in_words(server, new_engine) -> None:
    with pytest.raises(TLSError) as info:
        get(new_engine(), f"https://127.0.0.1:{server.port}/x")
    assert str(info.value) == "TLS: wrong version number"


def test_a_reset_mid_body_is_a_truncated_body(raw_server, new_engine) -> None:
    def reset(sock: socket.socket, _request: bytes) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        gevent.sleep(0.1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # linger 0: a reset, not a clean end

    error = body_failure(new_engine(), raw_server(reset).url("/x"))
    assert str(error) == "the body was cut short after 1000 bytes: connection reset by peer"
    assert (error.retriable, error.response_code) == (True, 200)


# ---------------------------------------------------------------------------- the guard, where sockets are made


def test_a_name_resolving_to_loopback_is_never_connected_to(raw_server, new_engine) -> None:
    srv = raw_server(lambda sock, _request: sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    with pytest.raises(BlockedAddress) as info:
        get(new_engine(guard=AddressGuard()), f"http://localhost:{srv.port}/x")
    assert str(info.value) == f"refused: localhost resolves to 127.0.0.1, a loopback address {LOOPBACK_REFUSED}"
    assert info.value.retriable is False
    assert srv.connections == 0


def test_a_guarded_connection_is_kept_alive_too(server, new_engine) -> None:
    server.add("/a", b"a" * 5000)
    http = new_engine(guard=AddressGuard(["127.0.0.0/8"]))
    assert [get(http, server.url("/a")) for _ in range(3)] == [(200, b"a" * 5000)] * 3
    assert len({r.client_port for r in server.requests_for("/a")}) == 1


class _UncheckedLookup(AddressGuard):
    """A guard whose lookup lets every address through, as a resolver bug or a
    lookup made elsewhere would: only the check where the socket is made is left."""

    def resolve(self, host: str, port: int, *, role: str = "") -> list[str]:
        return [str(info[4][0]) for info in socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)]


def test_the_curl_engine_checks_the_address_it_connects_to(raw_server) -> None:
    srv = raw_server(lambda sock, _request: sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    http = make_engine("curl", guard=_UncheckedLookup())
    try:
        with pytest.raises(BlockedAddress) as info:
            get(http, f"http://localhost:{srv.port}/x")
    finally:
        http.close()
    assert str(info.value) == f"refused: localhost resolves to 127.0.0.1, a loopback address {LOOPBACK_REFUSED}"
    assert srv.connections == 0


def test_a_refused_proxy_is_never_connected_to(raw_server, new_engine) -> None:
    srv = raw_server(lambda sock, _request: sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    with pytest.raises(BlockedAddress) as info:
        get(new_engine(guard=AddressGuard()), "http://example.com/x", proxy=srv.url(""))
    assert str(info.value) == f"refused: proxy 127.0.0.1 is a loopback address {LOOPBACK_REFUSED}"
    assert srv.connections == 0


# ---------------------------------------------------------------------------- back-pressure


def test_a_reader_that_falls_behind_pauses_the_curl_transfer(server) -> None:
    from gdl.http.curl import HIGH_WATER

    body = os.urandom(16 << 20)
    server.add("/big", body)
    http = make_engine("curl")
    try:
        with http.send(Exchange("GET", server.url("/big"))) as response:
            transfer = response.transfer  # type: ignore[attr-defined]
            chunks = response.chunks()
            received = [next(chunks)]
            wait_until(lambda: transfer.paused, timeout=10)  # the reader is not reading: libcurl stops
            assert HIGH_WATER <= transfer.buffered < HIGH_WATER + 64 * 1024
            held = transfer.buffered
            gevent.sleep(0.1)
            assert transfer.buffered == held  # nothing more arrives while paused
            received += list(chunks)
    finally:
        http.close()
    assert b"".join(received) == body
