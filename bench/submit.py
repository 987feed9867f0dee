"""Enqueueing for the bench: jobs sent over raw keep-alive connections to gdl's API,
then the callbacks awaited and checked, and the stored files compared byte for byte."""

import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import gevent.pool
import gevent.queue
from harness import Gdl, now
from servers import CallbackReceiver, content_length, send_all

log = logging.getLogger("bench.throughput")


@dataclass
class Job:
    key: str  # sent as the job's ``extra``; the callback brings it back
    url: str
    aggr: str
    limit: int

    def body(self, callback_url: str) -> bytes:
        return json.dumps({"url": self.url, "aggr_id": self.aggr, "aggr_limit": self.limit,
                           "callback_url": callback_url, "extra": self.key}).encode()


class Connection:
    """One keep-alive HTTP/1.1 connection to gdl's API, lean as the harness shares the cores with gdl: a
    request goes out whole in one write, and of the response only the status line, Content-Length and
    the body are read. No socket timeout (gevent would arm a timer for every wait): the
    :class:`Enqueuer` watches over its connections as a whole."""

    def __init__(self, port: int):
        self.port = port
        self.sock: socket.socket | None = None
        self.buf = b""  # received, not yet consumed

    def exchange(self, request: bytes) -> tuple[int, bytes]:
        """Sends ``request`` (connecting first if need be); returns the response's status and body."""
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port))
        send_all(self.sock, request)
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            buf += self._recv()
        head = buf[:end]
        status = int(head.split(b" ", 2)[1])
        length = content_length(head)
        if length < 0:
            raise RuntimeError(f"bench: a response without Content-Length: {head[:200]!r}")
        need = end + 4 + length
        while len(buf) < need:
            buf += self._recv()
        self.buf = buf[need:]
        return status, buf[end + 4:need]

    def _recv(self) -> bytes:
        assert self.sock is not None
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError(f"gdl's API on port {self.port} closed the connection")
        return data

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


Prepared = tuple[Job, bytes]  # a job and its whole POST /download request


class Enqueuer:
    """POST /download over keep-alive connections; records when each request started."""

    TIMEOUT = 60.0  # seconds without any answer from gdl's API before enqueueing is given up

    def __init__(self, port: int, callback_url: str):
        self.port = port
        self.callback_url = callback_url
        self.starts: dict[str, float] = {}
        self.errors: list[str] = []
        self.answered = 0

    def prepare(self, jobs: list[Job]) -> list[Prepared]:
        """Each job with its request (request line, headers, JSON body) as one bytes: built before the
        measured window."""
        head = (f"POST /download HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                "Content-Type: application/json\r\nContent-Length: ").encode()
        out = []
        for job in jobs:
            body = job.body(self.callback_url)
            out.append((job, b"%s%d\r\n\r\n%s" % (head, len(body), body)))
        return out

    def _post(self, conn: Connection, prepared: Prepared, on_start: Callable[[Job], None] | None) -> None:
        job, request = prepared
        if on_start is not None:
            on_start(job)
        self.starts[job.key] = now()
        status, data = conn.exchange(request)
        self.answered += 1
        if status != 201:
            self.errors.append(f"{job.key}: {status} {data[:200]!r}")

    def burst(self, jobs: list[Prepared], connections: int, on_start: Callable[[Job], None] | None = None) -> None:
        """All of ``jobs``, as fast as ``connections`` connections go, in list order per connection."""
        def client(mine: list[Prepared]) -> None:
            conn = Connection(self.port)
            try:
                for prepared in mine:
                    self._post(conn, prepared, on_start)
            finally:
                conn.close()

        self._join([gevent.spawn(client, jobs[i::connections]) for i in range(connections)])
        self._check()

    def trickle(self, jobs: list[Prepared], rate: float, connections: int) -> None:
        """One job every 1/``rate`` seconds, each on a free connection of ``connections``."""
        free: gevent.queue.Queue = gevent.queue.Queue()
        for _ in range(connections):
            free.put(Connection(self.port))

        def send(prepared: Prepared) -> None:
            conn = free.get()
            try:
                self._post(conn, prepared, None)
            finally:
                free.put(conn)

        sends = []
        started = now()
        for i, job in enumerate(jobs):
            gevent.sleep(max(0.0, started + i / rate - now()))
            sends.append(gevent.spawn(send, job))
        self._join(sends)
        while not free.empty():
            free.get().close()
        self._check()

    def _join(self, greenlets: list[gevent.Greenlet]) -> None:
        """Waits for ``greenlets``, raising the first error; gives up when gdl's API answered nothing for
        :attr:`TIMEOUT` seconds meanwhile (one watch over all connections instead of a timer per wait)."""
        while True:
            answered = self.answered
            if len(gevent.joinall(greenlets, timeout=self.TIMEOUT, raise_error=True)) == len(greenlets):
                return
            if self.answered == answered:
                gevent.killall(greenlets)
                raise SystemExit(f"bench: gdl's API answered no request for {self.TIMEOUT:.0f}s")

    def _check(self) -> None:
        if self.errors:
            raise SystemExit(f"bench: {len(self.errors)} enqueue(s) refused, first: {self.errors[0]}")


def await_callbacks(receiver: CallbackReceiver, gdl: Gdl, what: str, timeout: float,
                    at_count: Callable[[], Any] | None = None) -> Any:
    """Waits until every expected callback arrived, :meth:`CallbackReceiver.settle` done.

    Each time as many bodies as callbacks were missing came in, ``at_count`` (if given) runs before
    they are parsed: the end of the measured window. Returns its last result, or None.
    """
    deadline = now() + timeout
    reading = None
    while True:
        if not receiver.wait(max(0.0, deadline - now())):
            raise SystemExit(f"bench: {what}: {receiver.settle()} callback(s) missing after {timeout:.0f}s\n"
                             + gdl.log_tail())
        if at_count is not None:
            reading = at_count()
        if not receiver.settle():
            return reading
        log.warning("%s: %d callback(s) still missing, %d duplicate(s) so far", what, receiver.missing,
                    receiver.duplicates)


def check_callbacks(receiver: CallbackReceiver, keys: list[str], what: str) -> list[dict]:
    payloads = [receiver.arrivals[k][1] for k in keys]
    failed = [p for p in payloads if not p.get("success")]
    if failed:
        raise SystemExit(f"bench: {what}: {len(failed)} job(s) failed, first: {failed[0]}")
    return payloads


def check_files(rootdir: Path, payloads: list[dict], size: int, what: str) -> None:
    wrong = []
    for payload in payloads:
        job_id = payload["job_id"]
        path = rootdir / job_id[:3] / job_id
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            actual = -1
        if actual != size:
            wrong.append(f"{path}: {actual} bytes")
    if wrong:
        raise SystemExit(f"bench: {what}: {len(wrong)} stored file(s) wrong (expected {size} bytes), "
                         f"first: {wrong[0]}")
