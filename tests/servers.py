"""Loopback WSGI servers on gevent for processor and notifier tests.

- :class:`HoldServer` answers ``/hold/<group>/<anything>`` after holding the
  response ``hold`` seconds, and records how many requests of each group
  were in progress at once (the download side of ``aggr_limit``).
- :class:`CallbackReceiver` records every callback POST (parsed, and as the
  bytes and headers received) and answers with a scripted sequence of status
  codes per path (then 200); a 3xx sends the client to ``<path>/moved``.
- :class:`RawServer` answers with whatever bytes a test writes (answers no
  well-behaved server gives) and counts the connections it accepted.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import gevent
import gevent.server

from gdl.api import make_server


class _Server:
    def __init__(self) -> None:
        self.server = make_server(("127.0.0.1", 0), self.app, log=None, error_log=None)
        self.server.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def url(self, path: str) -> str:
        return self.base + path

    def stop(self) -> None:
        self.server.stop(timeout=1)

    def app(self, environ: dict, start_response: Any) -> list[bytes]:
        raise NotImplementedError


class HoldServer(_Server):
    """With ``midway``, the headers and half the body go out before the hold."""

    def __init__(self, hold: float = 0.2, body: bytes = b"held body", midway: bool = False) -> None:
        self.hold = hold
        self.body = body
        self.midway = midway
        self.current: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.total: Counter[str] = Counter()
        super().__init__()

    def app(self, environ: dict, start_response: Any) -> Any:
        parts = environ["PATH_INFO"].split("/")
        group = parts[2] if len(parts) > 2 else ""
        self.current[group] += 1
        self.total[group] += 1
        self.peak[group] = max(self.peak[group], self.current[group])
        if self.midway:
            start_response("200 OK", [("Content-Length", str(len(self.body)))])
            return self._midway(group)
        try:
            gevent.sleep(self.hold)
        finally:
            self.current[group] -= 1
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(len(self.body)))])
        return [self.body]

    def _midway(self, group: str) -> Any:
        half = len(self.body) // 2
        try:
            yield self.body[:half]
            gevent.sleep(self.hold)
        finally:
            self.current[group] -= 1
        yield self.body[half:]


class CallbackReceiver(_Server):
    def __init__(self, hold: float = 0.0) -> None:
        self.hold = hold
        self.received: dict[str, list[dict]] = defaultdict(list)
        self.raw: dict[str, list[bytes]] = defaultdict(list)
        self.headers: dict[str, list[dict[str, str]]] = defaultdict(list)
        self.script: dict[str, list[int]] = {}
        self.current = 0
        super().__init__()

    def answer(self, path: str, *statuses: int) -> None:
        """Answer the next POSTs to ``path`` with ``statuses``, then 200."""
        self.script[path] = list(statuses)

    def bodies(self, path: str = "/cb") -> list[dict]:
        return list(self.received[path])

    def by_job(self, path: str = "/cb") -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = defaultdict(list)
        for body in self.received[path]:
            out[body["job_id"]].append(body)
        return out

    def app(self, environ: dict, start_response: Any) -> list[bytes]:
        path = environ["PATH_INFO"]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        data = environ["wsgi.input"].read(length)
        self.raw[path].append(data)
        self.headers[path].append({name[5:].replace("_", "-").title(): value for name, value in environ.items()
                                   if name.startswith("HTTP_")} | {"Content-Type": environ.get("CONTENT_TYPE", "")})
        body = json.loads(data or b"null")
        if self.hold:
            self.current += 1
            try:
                gevent.sleep(self.hold)
            finally:
                self.current -= 1
        self.received[path].append(body)
        pending = self.script.get(path)
        status = pending.pop(0) if pending else 200
        # A redirect points at ``<path>/moved``: a client that followed it would show up there.
        location = [("Location", path + "/moved")] if 300 <= status < 400 else []
        start_response(f"{status} X", [("Content-Length", "0"), *location])
        return []


class RawServer:
    """A loopback TCP (or TLS) server whose ``answer(sock, request)`` writes whatever bytes a test wants."""

    def __init__(self, answer: Callable[[socket.socket, bytes], None], ssl_context: ssl.SSLContext | None = None):
        self.answer = answer
        self.requests: list[bytes] = []
        self.connections = 0  # accepted, whether a request came or not
        tls = {"ssl_context": ssl_context} if ssl_context else {}
        self.server = gevent.server.StreamServer(("127.0.0.1", 0), self._handle, **tls)
        self.server.start()

    @property
    def port(self) -> int:
        return self.server.server_port

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _handle(self, sock: socket.socket, _address: object) -> None:
        self.connections += 1
        request = b""
        try:
            while b"\r\n\r\n" not in request:
                data = sock.recv(65536)
                if not data:
                    return
                request += data
            self.requests.append(request)
            self.answer(sock, request)
        except OSError:
            pass  # the client hung up, as it should

    def stop(self) -> None:
        self.server.stop(timeout=1)
