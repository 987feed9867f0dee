"""gdl.download against real loopback HTTP servers: bytes, errors, deadline, mime, headers, proxy."""

from __future__ import annotations

import email.utils
import gzip
import os
import socket
import time

import gevent
import pytest
from gevent import monkey

from gdl import diskio
from gdl.download import Downloader, Downloaders, parse_retry_after
from gdl.errors import (
    ConnectionFailed,
    DownloadTimeout,
    HTTPStatusError,
    InvalidImage,
    InvalidURL,
    MimeMismatch,
    StorageError,
    TLSError,
    TooLarge,
    TooManyRedirects,
    TruncatedBody,
)
from gdl.job import Job, new_id
from tests.conftest import wait_until
from tests.httpserver import LoopbackServer
from tests.samples import broken_png, fetched_body, image_bytes, tiny_pdf

needs_gevent = pytest.mark.skipif(not monkey.is_module_patched("socket"),
                                  reason="the deadline interrupts reads only under gevent monkey patching")

DEFAULT_HEADERS = {"User-Agent": "gdl-test/1", "Accept": "*/*"}


@pytest.fixture
def server():
    with LoopbackServer() as srv:
        yield srv


@pytest.fixture
def scratch_dir(tmp_path) -> str:
    path = tmp_path / "partial"
    path.mkdir()
    return str(path)


@pytest.fixture
def make_downloader(scratch_dir, engine):
    made: list[Downloader] = []

    def make(**overrides) -> Downloader:
        options = {"proxy": "", "default_headers": DEFAULT_HEADERS, "scratch_dir": scratch_dir, "chunk_size": 1024,
                   "engine": engine}
        options.update(overrides)
        downloader = Downloader(**options)
        made.append(downloader)
        return downloader

    yield make
    for downloader in made:
        downloader.close()


@pytest.fixture
def downloader(make_downloader) -> Downloader:
    return make_downloader()


def make_job(url: str, **fields) -> Job:
    return Job(id=new_id(), url=url, aggr_id="aggr", aggr_limit=1, **fields)


# ---------------------------------------------------------------------------- bytes


def test_stores_the_exact_bytes(server, downloader, scratch_dir) -> None:
    body = os.urandom(300_000)
    server.add("/blob", body, headers={"Content-Type": "application/octet-stream"})
    job = make_job(server.url("/blob"))

    fetched = downloader.fetch(job, timeout=5)

    assert fetched_body(fetched) == body
    assert fetched.size == 300_000
    assert fetched.response_code == 200
    assert fetched.mime == ""  # not sniffed: the job asks neither a mime type nor an image size
    assert fetched.image_size == ""
    assert os.path.dirname(fetched.path) == scratch_dir
    assert os.path.basename(fetched.path).startswith(job.id + ".")


def test_a_body_declared_to_fit_one_chunk_stays_in_memory(server, make_downloader, scratch_dir) -> None:
    server.add("/fits", b"x" * 1024)
    server.add("/over", b"y" * 1025)
    downloader = make_downloader(chunk_size=1024)
    fits = downloader.fetch(make_job(server.url("/fits")), timeout=5)
    assert (fits.body, fits.path, fits.size, os.listdir(scratch_dir)) == (b"x" * 1024, "", 1024, [])
    over = downloader.fetch(make_job(server.url("/over")), timeout=5)
    assert (over.body, os.listdir(scratch_dir)) == (None, [os.path.basename(over.path)])
    assert fetched_body(over) == b"y" * 1025


def test_empty_body(server, downloader) -> None:
    server.add("/empty", b"")
    fetched = downloader.fetch(make_job(server.url("/empty"), mime_type="*/*"), timeout=5)
    assert (fetched.size, fetched_body(fetched), fetched.mime) == (0, b"", "application/x-empty")


def test_gzip_body_is_stored_compressed(server, downloader) -> None:
    compressed = gzip.compress(b"hello gdl\n" * 500)
    server.add("/page", compressed, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})

    fetched = downloader.fetch(make_job(server.url("/page"), mime_type="*/*"), timeout=5)

    assert fetched_body(fetched) == compressed
    assert fetched.size == len(compressed)
    assert fetched.mime == "application/gzip"


def test_keeps_the_connection_alive_between_jobs(server, downloader) -> None:
    server.add("/a", b"a" * 5000)
    downloader.fetch(make_job(server.url("/a")), timeout=5)
    downloader.fetch(make_job(server.url("/a")), timeout=5)
    ports = {r.client_port for r in server.requests_for("/a")}
    assert server.count("/a") == 2
    assert len(ports) == 1


@needs_gevent
def test_a_kept_connection_the_server_closed_is_not_reused(downloader) -> None:
    # Each connection answers one request as keep-alive, then the server closes it.
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            accepted.append(conn)
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")
            conn.close()

    server = gevent.spawn(serve)
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/x"
        first = downloader.fetch(make_job(url), timeout=5)
        gevent.sleep(0.1)  # the close reaches the kept connection
        second = downloader.fetch(make_job(url), timeout=5)
    finally:
        server.kill()
        listener.close()
    assert (fetched_body(first), fetched_body(second), len(accepted)) == (b"ok", b"ok", 2)


def open_under(directory) -> list[str]:
    """The files under ``directory`` this process has a descriptor of."""
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # closed meanwhile
    return [p for p in paths if p.startswith(str(directory))]


def test_a_big_body_is_handed_to_disk_writeback_as_it_arrives(server, downloader, scratch_dir) -> None:
    body = os.urandom(20 * 1024 * 1024)
    server.add("/big", body)
    os.unlink(downloader.fetch(make_job(server.url("/big")), timeout=30).path)  # the kept connection, the thread
    wait_until(lambda: diskio.writeback.queued == 0, timeout=10)
    requested = diskio.writeback.requested
    fetched = downloader.fetch(make_job(server.url("/big")), timeout=30)
    # At 8 and 16 MiB; the rest is the final fsync's.
    assert diskio.writeback.requested - requested == 2
    wait_until(lambda: diskio.writeback.queued == 0, timeout=10)
    assert open_under(scratch_dir) == []  # the thread closed its duplicates (other fds may come and go)
    assert fetched_body(fetched) == body


def test_downloaders_share_one_per_proxy_until_its_last_user_lets_go(make_downloader) -> None:
    made: list[Downloader] = []

    def make(proxy: str) -> Downloader:
        made.append(make_downloader(proxy=proxy))
        return made[-1]

    shared = Downloaders(make)
    first, second = shared.acquire(""), shared.acquire("")
    proxied = shared.acquire("http://proxy.example:3128")
    assert first is second and proxied is not first and len(made) == 2
    shared.release(first)
    assert shared.acquire("") is second  # still used: kept
    shared.release(second)
    shared.release(second)
    assert len(shared) == 1  # the proxied one
    assert shared.acquire("") is not first and len(made) == 3  # made anew after its last user let go


# ---------------------------------------------------------------------------- status codes


def test_404_is_not_retriable(server, downloader, scratch_dir) -> None:
    with pytest.raises(HTTPStatusError) as info:
        downloader.fetch(make_job(server.url("/missing")), timeout=5)
    assert info.value.response_code == 404
    assert info.value.retriable is False
    assert str(info.value) == "Received status code 404 Not Found"
    assert os.listdir(scratch_dir) == []


@pytest.mark.parametrize("status", [500, 503, 429])
def test_5xx_and_429_are_retriable(server, downloader, status) -> None:
    server.add("/busy", b"try later", status=status)
    with pytest.raises(HTTPStatusError) as info:
        downloader.fetch(make_job(server.url("/busy")), timeout=5)
    assert info.value.response_code == status
    assert info.value.retriable is True
    assert info.value.retry_after is None


def test_retry_after_in_seconds(server, downloader) -> None:
    server.add("/busy", b"", status=503, headers={"Retry-After": "120"})
    with pytest.raises(HTTPStatusError) as info:
        downloader.fetch(make_job(server.url("/busy")), timeout=5)
    assert info.value.retry_after == 120.0


def test_retry_after_as_http_date(server, downloader) -> None:
    server.add("/busy", b"", status=429, headers={"Retry-After": email.utils.formatdate(time.time() + 90,
                                                                                          usegmt=True)})
    with pytest.raises(HTTPStatusError) as info:
        downloader.fetch(make_job(server.url("/busy")), timeout=5)
    assert 85 <= info.value.retry_after <= 90


@pytest.mark.parametrize("value, expected", [
    ("0", 0.0),
    ("3600", 3600.0),
    (" 7 ", 7.0),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 60.0),   # now is 07:27:00
    ("Wed, 21 Oct 2015 07:00:00 GMT", 0.0),    # in the past: at once
    ("soon", None),
    ("-5", None),
    ("", None),
    (None, None),
])
def test_parse_retry_after(value, expected) -> None:
    now = email.utils.parsedate_to_datetime("Wed, 21 Oct 2015 07:27:00 GMT").timestamp()
    assert parse_retry_after(value, now=now) == expected


# ---------------------------------------------------------------------------- broken bodies and deadline


def test_truncated_body(server, downloader, scratch_dir) -> None:
    server.add_truncated("/cut", b"x" * 3000, declared_length=10_000)
    with pytest.raises(TruncatedBody) as info:
        downloader.fetch(make_job(server.url("/cut")), timeout=5)
    assert info.value.retriable is True
    assert info.value.response_code == 200
    assert os.listdir(scratch_dir) == []


@needs_gevent
def test_drip_is_cut_at_the_deadline(server, downloader, scratch_dir) -> None:
    # Each byte arrives well within any per-read timeout; only the overall deadline stops it.
    server.add_drip("/slow", b"x" * 40, interval=0.1)
    with pytest.raises(DownloadTimeout) as info:
        downloader.fetch(make_job(server.url("/slow")), timeout=1)
    assert str(info.value) == "download did not finish within 1s"
    assert info.value.response_code == 200
    assert info.value.retriable is True
    assert os.listdir(scratch_dir) == []


@needs_gevent
def test_killed_download_removes_its_temp_file(server, make_downloader, scratch_dir) -> None:
    server.add_drip("/slow", b"x" * 40, interval=0.05)
    downloader = make_downloader(chunk_size=4)  # a body declared to fit one chunk stays in memory
    greenlet = gevent.spawn(downloader.fetch, make_job(server.url("/slow")), timeout=10)
    gevent.sleep(0.4)
    assert len(os.listdir(scratch_dir)) == 1  # mid-body
    greenlet.kill(block=True, timeout=2)
    assert greenlet.dead
    assert isinstance(greenlet.value, gevent.GreenletExit)
    assert os.listdir(scratch_dir) == []


@needs_gevent
def test_a_temp_file_made_after_its_download_was_killed_is_removed(scratch_dir) -> None:
    # The kill lands while the file is being made off the hub: here, while the
    # request to make it waits behind a threadpool kept busy on purpose.
    threads = gevent.get_hub().threadpool
    sleep = monkey.get_original("time", "sleep")
    busy = [threads.spawn(sleep, 0.3) for _ in range(threads.maxsize)]
    making = gevent.spawn(diskio.mkstemp, scratch_dir, "job.")
    gevent.sleep(0.1)
    making.kill(block=True, timeout=2)
    assert isinstance(making.value, gevent.GreenletExit)
    gevent.joinall(busy)
    made = [threads.spawn(diskio.mkstemp, scratch_dir, "later.") for _ in range(threads.maxsize)]
    for result in made:  # first in, first out: the killed caller's file is made before these
        fd, _ = result.get()
        os.close(fd)
    wait_until(lambda: sorted(name.split(".")[0] for name in os.listdir(scratch_dir)) == ["later"] * threads.maxsize,
               timeout=2)


def test_connection_refused(downloader) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(ConnectionFailed) as info:
        downloader.fetch(make_job(f"http://127.0.0.1:{port}/x"), timeout=5)
    assert info.value.retriable is True
    assert info.value.response_code == 0
    assert isinstance(info.value.__cause__, Exception)


def test_tls_handshake_failure_is_not_retriable(server, downloader) -> None:
    # The loopback server speaks plain HTTP: the TLS handshake fails.
    with pytest.raises(TLSError) as info:
        downloader.fetch(make_job(f"https://127.0.0.1:{server.port}/x"), timeout=5)
    assert info.value.retriable is False


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/file", "http://", "no-scheme.example/x"])
def test_invalid_url(downloader, url) -> None:
    with pytest.raises(InvalidURL):
        downloader.fetch(make_job(url), timeout=5)


def test_unwritable_storage_dir_is_a_storage_error(server, make_downloader, tmp_path) -> None:
    server.add("/a", b"abc" * 1000)  # more than one chunk: written to scratch_dir as it arrives
    downloader = make_downloader(scratch_dir=str(tmp_path / "does-not-exist"))
    with pytest.raises(StorageError) as info:
        downloader.fetch(make_job(server.url("/a")), timeout=5)
    assert info.value.internal is True
    assert info.value.response_code == 200


# ---------------------------------------------------------------------------- size limit


def test_max_bytes_by_content_length(server, make_downloader, scratch_dir) -> None:
    server.add("/big", b"x" * 5000)
    downloader = make_downloader(max_bytes=4096)
    with pytest.raises(TooLarge, match="Content-Length 5000") as info:
        downloader.fetch(make_job(server.url("/big")), timeout=5)
    assert info.value.retriable is False
    assert info.value.response_code == 200
    assert os.listdir(scratch_dir) == []


@pytest.mark.parametrize("framing", [{"content_length": None}, {"content_length": None, "chunked": True}])
def test_max_bytes_by_bytes_read(server, make_downloader, scratch_dir, framing) -> None:
    server.add("/big", b"x" * 10_000, **framing)  # no Content-Length to check up front
    downloader = make_downloader(max_bytes=4096)
    with pytest.raises(TooLarge, match="exceeds the limit of 4096 bytes"):
        downloader.fetch(make_job(server.url("/big")), timeout=5)
    assert os.listdir(scratch_dir) == []


def test_body_of_exactly_max_bytes_is_fine(server, make_downloader) -> None:
    server.add("/fits", b"y" * 4096, content_length=None)
    fetched = make_downloader(max_bytes=4096).fetch(make_job(server.url("/fits")), timeout=5)
    assert fetched.size == 4096


# ---------------------------------------------------------------------------- mime


def test_mime_match(server, downloader) -> None:
    server.add("/a.png", image_bytes("PNG", 5, 5))
    fetched = downloader.fetch(make_job(server.url("/a.png"), mime_type="image/*"), timeout=5)
    assert fetched.mime == "image/png"


def test_mime_mismatch(server, downloader, scratch_dir) -> None:
    server.add("/doc", tiny_pdf(), headers={"Content-Type": "image/png"})  # the header is not believed
    with pytest.raises(MimeMismatch) as info:
        downloader.fetch(make_job(server.url("/doc"), mime_type="image/*"), timeout=5)
    assert str(info.value) == "Expected mime-type to be (image/*), found (application/pdf)"
    assert info.value.retriable is False
    assert info.value.response_code == 200
    assert os.listdir(scratch_dir) == []


@pytest.mark.parametrize("fmt, ok", [("PNG", False), ("JPEG", True), ("GIF", True)])
def test_mime_negation(server, downloader, fmt, ok) -> None:
    server.add("/img", image_bytes(fmt, 5, 5))
    job = make_job(server.url("/img"), mime_type="!image/png,image/*")
    if ok:
        assert downloader.fetch(job, timeout=5).mime == f"image/{fmt.lower()}"
    else:
        with pytest.raises(MimeMismatch, match=r"found \(image/png\)"):
            downloader.fetch(job, timeout=5)


def test_mime_is_checked_before_the_rest_is_read(server, downloader) -> None:
    # A png head, then the connection drops far before Content-Length: the
    # mismatch is found on the first bytes, so the cut is never reached.
    head = image_bytes("PNG", 5, 5).ljust(4096, b"\0")
    server.add_truncated("/img", head, declared_length=1_000_000)
    with pytest.raises(MimeMismatch):
        downloader.fetch(make_job(server.url("/img"), mime_type="application/pdf"), timeout=5)


# ---------------------------------------------------------------------------- image size


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF"])
def test_image_size(server, downloader, fmt) -> None:
    server.add("/img", image_bytes(fmt, 13, 7))
    fetched = downloader.fetch(make_job(server.url("/img"), extract_image_size=True), timeout=5)
    assert fetched.image_size == "13x7"


def test_image_size_only_when_asked(server, downloader) -> None:
    server.add("/img", image_bytes("PNG", 13, 7))
    assert downloader.fetch(make_job(server.url("/img")), timeout=5).image_size == ""


def test_image_size_ignores_other_types(server, downloader) -> None:
    server.add("/doc.pdf", tiny_pdf())
    fetched = downloader.fetch(make_job(server.url("/doc.pdf"), extract_image_size=True), timeout=5)
    assert (fetched.mime, fetched.image_size) == ("application/pdf", "")


def test_broken_image_header(server, downloader, scratch_dir) -> None:
    server.add("/broken.png", broken_png())
    with pytest.raises(InvalidImage) as info:
        downloader.fetch(make_job(server.url("/broken.png"), extract_image_size=True), timeout=5)
    assert info.value.response_code == 200
    assert info.value.retriable is False
    assert os.listdir(scratch_dir) == []


# ---------------------------------------------------------------------------- request headers, redirects, proxy


def test_request_headers_from_defaults_and_job(server, downloader) -> None:
    server.add("/h", b"ok")
    job = make_job(server.url("/h"), request_headers={"user-agent": "job-agent", "X-Token": "abc"})
    downloader.fetch(job, timeout=5)
    seen = server.requests_for("/h")[0].headers
    assert seen["User-Agent"] == "job-agent"  # the job's value wins, whatever its case
    assert seen.get_all("User-Agent") == ["job-agent"]
    assert seen["Accept"] == "*/*"
    assert seen["X-Token"] == "abc"
    assert "Accept-Encoding" not in seen


def test_accept_encoding_sent_when_configured(server, make_downloader) -> None:
    server.add("/h", b"ok")
    downloader = make_downloader(default_headers={**DEFAULT_HEADERS, "Accept-Encoding": "gzip"})
    downloader.fetch(make_job(server.url("/h")), timeout=5)
    assert server.requests_for("/h")[0].headers["Accept-Encoding"] == "gzip"


def test_cookies_do_not_leak_between_jobs(server, downloader) -> None:
    server.add("/login", b"ok", headers={"Set-Cookie": "session=secret; Path=/"})
    server.add("/next", b"ok")
    downloader.fetch(make_job(server.url("/login")), timeout=5)
    downloader.fetch(make_job(server.url("/next")), timeout=5)
    assert "Cookie" not in server.requests_for("/next")[0].headers


def test_redirects_are_followed(server, downloader) -> None:
    server.add_redirect("/old", "/middle", status=301)
    server.add_redirect("/middle", server.url("/new"))
    server.add("/new", b"moved content")
    fetched = downloader.fetch(make_job(server.url("/old")), timeout=5)
    assert fetched_body(fetched) == b"moved content"
    assert [server.count(p) for p in ("/old", "/middle", "/new")] == [1, 1, 1]


def test_urls_are_quoted_as_requests_quotes_them(server, downloader) -> None:
    server.add("/a%20b/%C3%A9", b"quoted")  # the test server routes by the path as sent
    fetched = downloader.fetch(make_job(server.url("/a b/é?q=1 2&r=%41")), timeout=5)
    assert fetched_body(fetched) == b"quoted"
    # %41 is an unreserved character: unquoted, as requests does
    assert [r.target for r in server.requests_for("/a%20b/%C3%A9")] == ["/a%20b/%C3%A9?q=1%202&r=A"]


def test_a_utf8_location_is_followed(server, downloader) -> None:
    server.add_redirect("/old", "/né".encode().decode("latin-1"))  # UTF-8 bytes on the wire
    server.add("/n%C3%A9", b"moved")
    assert fetched_body(downloader.fetch(make_job(server.url("/old")), timeout=5)) == b"moved"


def test_too_many_redirects(server, make_downloader, scratch_dir) -> None:
    server.add_redirect("/loop", "/loop")
    with pytest.raises(TooManyRedirects) as info:
        make_downloader(max_redirects=3).fetch(make_job(server.url("/loop")), timeout=5)
    assert info.value.retriable is False
    assert server.count("/loop") == 4  # the request and 3 hops
    assert os.listdir(scratch_dir) == []


def test_proxy_is_used(server, make_downloader) -> None:
    # The loopback server stands in for the proxy: it gets the absolute URI.
    server.add("/proxied", b"via proxy")
    downloader = make_downloader(proxy=server.base_url)
    fetched = downloader.fetch(make_job("http://gdl-test.invalid/proxied?x=1"), timeout=5)
    assert fetched_body(fetched) == b"via proxy"
    assert [r.target for r in server.requests_for("/proxied")] == ["http://gdl-test.invalid/proxied?x=1"]
