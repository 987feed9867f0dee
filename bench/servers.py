"""The bench-side servers, on this process's gevent hub: the callback receiver
(keep-alive, counting, with the bodies it got) and a slow origin whose answers are
held, both hand-rolled on raw sockets so that the harness leaves the cores to gdl."""

import json
import logging
import socket
from collections import Counter
from collections.abc import Callable, Iterable

import gevent
import gevent.event
import gevent.pool
import gevent.queue
from gevent.server import StreamServer
from harness import now

from gdl.api import make_server

log = logging.getLogger("bench.throughput")


def content_length(head: bytes) -> int:
    """The Content-Length (any case) of an HTTP head (start line and headers, without the blank line),
    -1 without one."""
    lowered = head.lower()
    start = lowered.find(b"\r\ncontent-length:")
    if start < 0:
        return -1
    start += 17
    end = lowered.find(b"\r\n", start)
    return int(head[start:end] if end >= 0 else head[start:])  # int() strips the spaces around


def send_all(sock: socket.socket, data: bytes) -> None:
    """``sock.sendall(data)``, in one send() when the kernel takes it whole, as it does a small message:
    gevent's sendall costs a getsockopt() call and some bookkeeping more each time."""
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


class CallbackReceiver:
    """Records when each job's callback arrives and its body, keyed by the job's ``extra``.

    The harness shares the machine with gdl, so the receiver is lean: a StreamServer reading HTTP/1.1 by
    hand on keep-alive connections (the request line, Content-Length, the body; any number of requests
    per recv), answering every request with a fixed 200. A body is kept raw with its arrival time; only
    :meth:`settle` parses them (JSON, the ``extra`` key) and fills :attr:`arrivals`, after the measured
    window. Until then :meth:`wait` counts bodies: it wakes once as many arrived as callbacks were still
    missing at the last :meth:`expect` or :meth:`settle`.
    """

    OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    def __init__(self) -> None:
        self.arrivals: dict[str, tuple[float, dict]] = {}
        self.duplicates = 0
        self.bad = 0
        self.peers: set[tuple[str, int]] = set()  # client (address, port): connections gdl opened
        self._raw: list[tuple[float, bytes]] = []  # (arrival, body) not parsed yet
        self._received = 0  # bodies so far
        self._target = 0  # _received at which every callback still missing may have arrived
        self._pending: set[str] = set()
        self._done = gevent.event.Event()
        self.server = StreamServer(("127.0.0.1", 0), self._serve)

    def start(self) -> None:
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/cb"

    def stop(self) -> None:
        self.server.stop(timeout=1)
        self.settle()

    def _serve(self, sock: socket.socket, address: tuple[str, int]) -> None:
        """One connection: its requests, in order, until the client closes it."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peers.add(address)
        recv, ok = sock.recv, self.OK
        buf = b""
        try:
            while True:
                data = recv(65536)
                if not data:
                    return
                at = now()  # when the bytes that complete the request(s) below came in
                buf += data
                while (end := buf.find(b"\r\n\r\n")) >= 0:
                    head = buf[:end]
                    if not head.startswith(b"POST "):
                        self.bad += 1  # not a callback as gdl sends them (a JSON POST with Content-Length)
                        send_all(sock, self.BAD)
                        return
                    need = end + 4 + max(content_length(head), 0)
                    if len(buf) < need:
                        break  # the rest of the body is still on its way
                    self._raw.append((at, buf[end + 4:need]))
                    buf = buf[need:]
                    self._received += 1
                    if self._received == self._target:
                        self._done.set()
                    send_all(sock, ok)
        except ValueError:
            self.bad += 1  # a Content-Length that is no number: the connection is lost anyway
        except OSError:
            pass  # reset by the client: nothing more from it
        finally:
            sock.close()

    def settle(self) -> int:
        """Parses the bodies received so far into :attr:`arrivals`; returns how many expected callbacks are
        still missing, and has :meth:`wait` wait for that many more bodies."""
        raw, self._raw = self._raw, []
        for at, body in raw:
            try:
                payload = json.loads(body)
                key = payload["extra"]
                known = key in self.arrivals
            except (ValueError, KeyError, TypeError):
                self.bad += 1
                continue
            if known:
                self.duplicates += 1
            else:
                self.arrivals[key] = (at, payload)
                self._pending.discard(key)
        self._arm()
        return len(self._pending)

    def _arm(self) -> None:
        self._target = self._received + len(self._pending)
        if self._pending:
            self._done.clear()
        else:
            self._done.set()

    def expect(self, keys: Iterable[str]) -> None:
        """Call before enqueueing: :meth:`wait` returns once as many bodies as ``keys`` not arrived yet came
        in; :meth:`settle` then says whether they were those."""
        self.settle()
        self._pending = set(keys) - self.arrivals.keys()
        self._arm()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    @property
    def missing(self) -> int:
        """Expected callbacks not arrived (counted in bodies until :meth:`settle`)."""
        return max(0, self._target - self._received)


class _Release:
    """A response body whose close() (after pywsgi wrote it) ends the request's in-flight count."""

    def __init__(self, body: bytes, done: Callable[[], None]):
        self.body = body
        self.done = done

    def __iter__(self):
        yield self.body

    def close(self) -> None:
        self.done()


class HoldServer:
    """A slow origin: ``/hold/<aggr>/<n>`` answers after ``hold`` seconds; counts requests in flight."""

    BODY = b"0123456789abcdef"

    def __init__(self, hold: float, limits: dict[str, int]):
        self.hold = hold
        self.limits = limits
        self.inflight: Counter[str] = Counter()
        self.started: Counter[str] = Counter()
        self.max: Counter[str] = Counter()
        self.violations: list[tuple[float, str, int]] = []
        self.server = make_server(("127.0.0.1", 0), self.app, log=None)

    def start(self) -> None:
        self.server.start()
        self.port = self.server.server_port

    def stop(self) -> None:
        self.server.stop(timeout=1)

    def url(self, aggr: str, n: int) -> str:
        return f"http://127.0.0.1:{self.port}/hold/{aggr}/{n}"

    def app(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        parts = environ["PATH_INFO"].split("/")
        if len(parts) != 4 or parts[1] != "hold":
            start_response("404 Not Found", [("Content-Length", "0")])
            return []
        aggr = parts[2]
        self.started[aggr] += 1
        self.inflight[aggr] += 1
        count = self.inflight[aggr]
        self.max[aggr] = max(self.max[aggr], count)
        if count > self.limits.get(aggr, 0):
            self.violations.append((now(), aggr, count))
            log.error("LIMIT VIOLATED: aggregation %s has %d requests in flight, limit %d",
                      aggr, count, self.limits.get(aggr, 0))
        done = False

        def release() -> None:
            nonlocal done
            if not done:
                done = True
                self.inflight[aggr] -= 1

        try:
            gevent.sleep(self.hold)
        except BaseException:
            release()
            raise
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(len(self.BODY)))])
        return _Release(self.BODY, release)
