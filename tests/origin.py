"""A loopback origin that counts concurrent requests per aggregation.

:class:`CountingOrigin` serves ``GET /<group>/<name>`` with a body derived
from the path (:func:`body_for`, so a stored file can be checked byte for
byte), streamed in ``ticks`` pieces over ``duration`` seconds. It counts a
request as being served from the moment its request line arrives until its
last byte is sent or, when ``notice_disconnect`` is on, until the client is
seen gone (checked between pieces, as a real origin streaming a file finds
out at its next write). With ``notice_disconnect`` off it serves the whole
duration whatever the client does, like an origin busy computing the answer.

It records, per group, the requests in progress (``current``), the most at
once (``peak``), how many arrived (``total``) and were served to the end
(``completed``), and every moment the count of a group went up, with the
value of the ``X-Gdl-Process`` request header of each request then served
(``overlaps``: how a test tells which processes a peak came from), and
each request's path and time span (``served``).

It also logs when each request of a group arrived (``starts``, on
time.monotonic: what a rate limit bounds), and an ``answer`` hook may refuse
a request instead of serving it: given the group and the requests of the
group in progress (this one included), it returns a status and headers (a
429 with ``Retry-After``, say), or None to serve the body.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import gevent
import gevent.select
from gevent.server import StreamServer

PROCESS_HEADER = "x-gdl-process"


def body_for(path: str, size: int) -> bytes:
    """``size`` bytes that only ``path`` gives."""
    seed = hashlib.sha256(path.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


class CountingOrigin:
    def __init__(self, *, duration: float = 0.5, size: int = 32 * 1024, ticks: int = 20,
                 notice_disconnect: bool = True,
                 answer: Callable[[str, int], tuple[int, dict[str, str]] | None] | None = None) -> None:
        self.duration = duration
        self.size = size
        self.ticks = ticks
        self.notice_disconnect = notice_disconnect
        self.current: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.total: Counter[str] = Counter()
        self.completed: Counter[str] = Counter()
        self.serving: dict[str, list[str]] = defaultdict(list)  # group -> process header of each request
        self.overlaps: list[tuple[str, list[str]]] = []
        self.served: list[tuple[str, float, float]] = []  # (path, start, end) on time.monotonic
        self.served_to: list[str] = []  # the process header of each of ``served``, in the same order
        self.starts: dict[str, list[float]] = defaultdict(list)  # group -> arrival of each request
        self.refused: Counter[str] = Counter()  # group -> requests the answer hook refused
        self.answer = answer
        self.server = StreamServer(("127.0.0.1", 0), self._connection)
        self.server.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def stop(self) -> None:
        self.server.stop(timeout=1)

    def over(self, limits: dict[str, int]) -> dict[str, int]:
        """The groups whose peak passed their limit, with that peak."""
        return {g: self.peak[g] for g, limit in limits.items() if self.peak[g] > limit}

    # ------------------------------------------------------------------ serving

    def _connection(self, sock: socket.socket, _address: Any) -> None:
        reader = sock.makefile("rb")
        try:
            while True:
                request = _read_head(reader)
                if request is None:
                    return
                path, headers = request
                self._serve(sock, path, headers.get(PROCESS_HEADER, ""))
        except OSError:
            pass  # the client went away
        finally:
            reader.close()
            sock.close()

    def _serve(self, sock: socket.socket, path: str, process: str) -> None:
        group = path.split("/")[1]
        body = body_for(path, self.size)
        self._arrived(group, process)
        start = time.monotonic()
        self.starts[group].append(start)
        refusal = self.answer(group, self.current[group]) if self.answer else None
        try:
            if refusal is not None:
                self._refuse(sock, group, *refusal)
                return
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body))
            step = -(-len(body) // self.ticks)
            pieces = [body[i:i + step] for i in range(0, len(body), step)]
            for piece in pieces[:-1]:
                sock.sendall(piece)
                self._pause(sock)
            sock.sendall(pieces[-1])
            self.completed[group] += 1
        finally:
            self.current[group] -= 1
            self.serving[group].remove(process)
            self.served.append((path, start, time.monotonic()))
            self.served_to.append(process)

    def _arrived(self, group: str, process: str) -> None:
        self.current[group] += 1
        self.total[group] += 1
        self.serving[group].append(process)
        self.peak[group] = max(self.peak[group], self.current[group])
        self.overlaps.append((group, list(self.serving[group])))

    def _refuse(self, sock: socket.socket, group: str, status: int, headers: dict[str, str]) -> None:
        self.refused[group] += 1
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        sock.sendall(f"HTTP/1.1 {status} No\r\nContent-Length: 0\r\n{lines}\r\n".encode())

    def most_in_window(self, group: str, window: float) -> int:
        """The most requests of ``group`` that arrived within any ``window`` seconds."""
        starts = sorted(self.starts[group])
        most, first = 0, 0
        for last, at in enumerate(starts):
            while at - starts[first] >= window:
                first += 1
            most = max(most, last - first + 1)
        return most

    def _pause(self, sock: socket.socket) -> None:
        """One tick; raises when the client is seen gone (with ``notice_disconnect``)."""
        wait = self.duration / self.ticks
        if not self.notice_disconnect:
            gevent.sleep(wait)
            return
        readable, _, _ = gevent.select.select([sock], [], [], wait)
        if readable and sock.recv(1, socket.MSG_PEEK) == b"":
            raise ConnectionResetError("client gone")


def _read_head(reader: Any) -> tuple[str, dict[str, str]] | None:
    line = reader.readline()
    if not line:
        return None
    path = line.split(b" ")[1].decode()
    headers = {}
    while True:
        header = reader.readline()
        if header in (b"\r\n", b"\n", b""):
            return path, headers
        name, _, value = header.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
