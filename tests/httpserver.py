"""A loopback HTTP server for tests, with routes set up per test.

Built on ``http.server.ThreadingHTTPServer``, so it runs the same in a plain
threaded test process and under gevent monkey patching (where its threads are
greenlets). It speaks HTTP/1.1 with keep-alive, records every request (target,
headers, client port) and counts requests per path.

    with LoopbackServer() as server:
        server.add("/a.png", body=png, headers={"Content-Type": "image/png"})
        server.add_truncated("/cut", body=b"x" * 100, declared_length=1000)
        server.add_drip("/slow", body=b"x" * 50, interval=0.2)
        server.add_redirect("/old", "/a.png")
        server.add_sequence("/big", [Route(body=data, cut_after=600), Route(body=data, ranges="honour")])
        requests.get(server.url("/a.png"))
        assert server.count("/a.png") == 1
        assert server.requests_for("/a.png")[0].headers["User-Agent"] == "..."

A request whose target is an absolute URI (what a client sends to an HTTP
proxy) is routed by its path and recorded with its full ``target``, so the
server can stand in for a proxy.
"""

from __future__ import annotations

import http.server
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from email.message import Message
from typing import Self
from urllib.parse import urlsplit

__all__ = ["LoopbackServer", "Recorded", "Route"]


@dataclass
class Route:
    """How to answer one path.

    ``content_length``: "auto" sends ``len(body)``; an int sends that value (a
    lie when it differs from the body); None sends none and ends the body by
    closing the connection, or, with ``chunked``, uses chunked encoding.
    ``drip_interval`` > 0 sends the body one byte at a time with that pause.
    ``close`` closes the connection after the body (a cut body when the
    declared length is larger). ``cut_after`` sends only that many bytes of
    the body (its whole length declared), then closes the connection.

    ``ranges`` says how a ``Range: bytes=N-`` request is answered: "ignore"
    (a 200 with the whole body), "honour" (a 206 from N when ``If-Range``, if
    sent, matches the route's ETag or Last-Modified, else a 200), "wrong-start"
    (a 206 from N - 100), "416" (a 416). ``not_modified``: a request whose
    ``If-None-Match`` matches the route's ETag, or with an ``If-Modified-Since``
    when the route has no ETag, gets a 304.
    """

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_length: int | str | None = "auto"
    chunked: bool = False
    drip_interval: float = 0.0
    close: bool = False
    cut_after: int | None = None
    ranges: str = "ignore"
    not_modified: bool = False


@dataclass
class Recorded:
    """One request as the server saw it."""

    method: str
    target: str  # the request line's target: "/path?q" or, through a proxy, "http://host/path?q"
    path: str
    headers: Message
    client_port: int


class LoopbackServer:
    """A threaded HTTP/1.1 server on 127.0.0.1 and a free port."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.sequences: dict[str, list[Route]] = {}  # path -> answers of its next requests, the last repeated
        self.body_bytes: Counter[str] = Counter()  # path -> body bytes sent
        self.requests: list[Recorded] = []
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="loopback-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ routes

    def add(self, path: str, body: bytes = b"", status: int = 200, headers: dict[str, str] | None = None,
            **options: object) -> None:
        """Answer ``path`` with fixed bytes; ``options`` are further :class:`Route` fields."""
        self.routes[path] = Route(status=status, body=body, headers=dict(headers or {}), **options)  # type: ignore[arg-type]

    def add_sequence(self, path: str, routes: list[Route]) -> None:
        """Answer ``path``'s first request with ``routes[0]``, the next with ``routes[1]``, ...,
        and every one after the last with the last."""
        self.sequences[path] = list(routes)

    def route_for(self, path: str) -> Route:
        with self._lock:
            sequence = self.sequences.get(path)
            if sequence:
                return sequence.pop(0) if len(sequence) > 1 else sequence[0]
        return self.routes.get(path) or Route(status=404, body=b"no route\n")

    def add_truncated(self, path: str, body: bytes, declared_length: int) -> None:
        """Declare ``declared_length`` bytes, send ``body`` (fewer), then close the connection."""
        self.add(path, body, content_length=declared_length, close=True)

    def add_drip(self, path: str, body: bytes, interval: float) -> None:
        """Send ``body`` one byte every ``interval`` seconds (Content-Length is correct)."""
        self.add(path, body, drip_interval=interval)

    def add_redirect(self, path: str, location: str, status: int = 302) -> None:
        """Redirect ``path`` to ``location`` (a path on this server or a full URL)."""
        self.add(path, b"", status=status, headers={"Location": location})

    # ------------------------------------------------------------------ what was seen

    def count(self, path: str) -> int:
        with self._lock:
            return self._counts[path]

    def requests_for(self, path: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def _record(self, entry: Recorded) -> None:
        with self._lock:
            self.requests.append(entry)
            self._counts[entry.path] += 1


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves a :class:`LoopbackServer`'s routes (the server is set by :func:`_handler_for`)."""

    protocol_version = "HTTP/1.1"
    loopback: LoopbackServer

    def do_GET(self) -> None:  # http.server's naming
        path = urlsplit(self.path).path or "/"
        self.loopback._record(Recorded(self.command, self.path, path, self.headers, self.client_address[1]))
        route = _conditional(self.loopback.route_for(path), self.headers)
        try:
            self._answer(route)
            with self.loopback._lock:
                self.loopback.body_bytes[path] += len(route.body) if route.cut_after is None else route.cut_after
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away, e.g. after its deadline

    do_POST = do_GET  # noqa: N815 - http.server's naming

    def _answer(self, route: Route) -> None:
        self._drain_request_body()
        self.send_response(route.status)
        for name, value in route.headers.items():
            self.send_header(name, value)
        length = len(route.body) if route.content_length == "auto" else route.content_length
        if length is not None:
            self.send_header("Content-Length", str(length))
        elif route.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            route = Route(**{**route.__dict__, "close": True})  # close-delimited body
        if route.close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self._send_body(route)

    def _send_body(self, route: Route) -> None:
        if route.cut_after is not None:
            self.wfile.write(route.body[:route.cut_after])
            self.wfile.flush()
            self.close_connection = True
            return
        if route.chunked and route.content_length is None:
            half = len(route.body) // 2
            for part in (route.body[:half], route.body[half:]):
                if part:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif route.drip_interval > 0:
            for i in range(len(route.body)):
                self.wfile.write(route.body[i:i + 1])
                self.wfile.flush()
                time.sleep(route.drip_interval)
        else:
            self.wfile.write(route.body)
        self.wfile.flush()

    def _drain_request_body(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output clean


def _conditional(route: Route, headers: Message) -> Route:
    """The answer ``route`` gives to a request with ``headers`` (Range, If-Range, If-None-Match)."""
    etag, modified = route.headers.get("ETag"), route.headers.get("Last-Modified")
    if route.not_modified and ((etag and headers.get("If-None-Match") == etag)
                               or (not etag and headers.get("If-Modified-Since"))):
        return Route(status=304, headers=dict(route.headers), body=b"")
    wanted = re.fullmatch(r"bytes=(\d+)-", headers.get("Range") or "")
    if wanted is None or route.ranges == "ignore":
        return route
    start, length = int(wanted.group(1)), len(route.body)
    if route.ranges == "416":
        return Route(status=416, headers={"Content-Range": f"bytes */{length}"})
    if_range = headers.get("If-Range")
    if route.ranges == "honour" and if_range is not None and if_range not in (etag, modified):
        return route
    if route.ranges == "wrong-start":
        start = max(0, start - 100)
    return Route(status=206, body=route.body[start:], cut_after=None,
                 headers={**route.headers, "Content-Range": f"bytes {start}-{length - 1}/{length}"})


def _handler_for(server: LoopbackServer) -> type[http.server.BaseHTTPRequestHandler]:
    return type("Handler", (_Handler,), {"loopback": server})
