"""End-to-end throughput, latency and limit-keeping of gdl, next to aria2c and curl.

One run starts everything it needs on 127.0.0.1 in a temp dir: nginx serving
the files, a redis-server with append-only persistence (as gdl's embedded
mode runs it), gdl as real processes (``python -m gdl.cli``), and, in this
gevent-patched process, the callback receiver and a slow origin. Then:

1. small files: N x 16 KiB end to end (enqueue, download, store, callback),
   next to ``aria2c -j 16``, a plain ``requests`` loop (16 threads) and, when
   pycurl is installed, libcurl driven by a gevent hub (16 at once) on the
   same URLs: jobs/s, CPU ms per job, peak RSS of each gdl process;
2. big files: a few large files, next to curl (+ fsync) and aria2c: MB/s,
   and the peak RSS of gdl's processes;
3. pickup latency: a trickle of jobs into an idle gdl, enqueue to callback;
4. utilisation: 200 ms downloads in aggregations of limits 1..8: the most
   in flight per aggregation (never above its limit) and the share of slots
   kept busy;
5. many aggregations: 2000 aggregations x 5 small files, limit 2: jobs/s
   against workload 1's, and the peak RSS of all gdl processes;
6. scale-out: workload 1 with one processor process, then with two (the whole
   pipeline); then the processor role alone, 1 then 2 processes, on jobs queued
   beforehand through the API (stopped before the processors start).

    python bench/throughput.py [--quick] [--workloads small,many] [--small-jobs 10000] [--big-mib 256] ...

Progress goes to stderr through ``logging``; the report to stdout: tables,
then one JSON object per line for each workload run (``grep '^{'``). Needs
``nginx`` and ``aria2c`` on PATH (Debian: ``apt-get install nginx aria2``).
"""

# Patched first, as gdl/cli.py does: the callback receiver, the slow origin and
# the HTTP clients below are greenlets on one hub.
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import http.client  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable, Iterable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Self  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import gevent.pool  # noqa: E402
import gevent.queue  # noqa: E402
import redis  # noqa: E402
from common import (  # noqa: E402
    Started,
    api_answers,
    free_port,
    machine_busy_seconds,
    proc_status_kib,
    redis_socket,
    start_gdl,
    start_redis,
    stop_process,
    tree_cpu_seconds,
    wait_for,
    write_gdl_config,
)
from gevent.server import StreamServer  # noqa: E402

from gdl.api import make_server  # noqa: E402
from gdl.store.layout import (  # noqa: E402
    CALLBACK_QUEUE,
    FAILURES,
    HEARTBEATS,
    WAKE_AGGR,
    WAKE_CALLBACKS,
    job_key,
    lease_key,
    queue_key,
)

log = logging.getLogger("bench.throughput")

SMALL_BYTES = 16 * 1024
MIB = 1024 * 1024
MB = 1_000_000
LAYOUTS = ("single", "split")
ENGINES = ("curl", "requests")  # gdl's http.engine
LAYOUT_NAMES = {"single": "gdl (1 process, all roles)", "split": "gdl (api + processor + notifier)"}
WORKLOADS = ("small", "big", "latency", "util", "many", "scaleout")
BENCH_DIR = Path(__file__).resolve().parent
MANY_RATIO_TARGET = 0.8  # workload 5's jobs/s over workload 1's: within 20%
MANY_RSS_TARGET_MB = 300  # workload 5: peak RSS of all gdl processes together
SCALEOUT_TARGET = 1.6  # workload 6: jobs/s with two processor processes over one


def now() -> float:
    return time.perf_counter()


def children_cpu() -> float:
    """CPU seconds of this process's children that have been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of ``values`` (p in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def discard(path: Path, args: argparse.Namespace) -> None:
    """Remove a finished gdl's directory (its files, Redis data, logs) unless ``--keep``."""
    if not args.keep:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- nginx

class Nginx(Started):
    """nginx serving ``<workdir>/www`` on a free loopback port, stopped on exit."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.root = workdir / "www"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def _start(self) -> Self:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.path.exists(binary):
            raise SystemExit("bench: nginx not found (apt-get install -y nginx)")
        self.root.mkdir(parents=True, exist_ok=True)
        # Workers run as an unprivileged user when started as root: they must reach the files.
        os.chmod(self.dir, 0o755)
        (self.root / "probe").write_bytes(b"ok")
        conf = self.dir / "nginx.conf"
        conf.write_text(f"""
daemon off;
worker_processes 2;
pid {self.dir}/nginx.pid;
error_log {self.dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 100000;
    keepalive_timeout 300s;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
    }}
}}
""")
        self.proc = subprocess.Popen([binary, "-p", str(self.dir), "-c", str(conf), "-e",
                                      str(self.dir / "nginx-error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for("nginx", self._answers)
        log.info("nginx pid %d on port %d serving %s", self.proc.pid, self.port, self.root)
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise SystemExit(f"bench: nginx exited with {self.proc.returncode}:\n"
                             + (self.dir / "nginx-error.log").read_text())
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            conn.request("GET", "/probe")
            return conn.getresponse().status == 200
        except OSError:
            return False

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def cpu(self) -> float:
        assert self.proc is not None
        return tree_cpu_seconds([self.proc.pid])

    def __exit__(self, *exc: object) -> None:
        stop_process(self.proc, "nginx")


# --------------------------------------------------------------------------- gdl

def gdl_roles(layout: str, processors: int = 1) -> list[tuple[str, str | None]]:
    """(process name, gdl role) of each gdl process: one with every role, or one per role as in the
    Procfile with ``processors`` processor processes (``processor``, or ``processor1`` ... when several)."""
    if layout == "single":
        return [("all", None)]
    procs = [("processor", "processor")] if processors == 1 else [(f"processor{i + 1}", "processor")
                                                                   for i in range(processors)]
    return [("api", "api"), *procs, ("notifier", "notifier")]


def gdl_name(layout: str, processors: int, engine: str) -> str:
    """The row name of a gdl run in the tables, its HTTP engine last: ``gdl (one per role), curl``."""
    if layout == "split" and processors != 1:
        return f"gdl (api + {processors} processors + notifier), {engine}"
    return f"{LAYOUT_NAMES[layout]}, {engine}"


def gdl_tool(layout: str, processors: int, engine: str) -> str:
    """The ``tool`` of a gdl run in the JSON lines: ``gdl split curl``, ``gdl single requests``,
    ``gdl split x2 curl``."""
    return f"gdl {layout}" + (f" x{processors}" if layout == "split" and processors != 1 else "") + f" {engine}"


class Gdl(Started):
    """A redis-server (AOF on, on a unix socket) and gdl in one process or one per role, in a temp dir."""

    def __init__(self, workdir: Path, layout: str, log_level: str, notifier_concurrency: int, processors: int = 1,
                 engine: str = "curl"):
        self.dir = workdir
        self.layout = layout
        self.engine = engine  # http.engine
        self.processors = processors if layout == "split" else 1
        self.log_level = log_level
        self.notifier_concurrency = notifier_concurrency
        self.redis_dir = workdir / "redis"
        self.redis_path = redis_socket(self.redis_dir)
        self.api_port = free_port()
        self.rootdir = workdir / "files"
        self.redis: subprocess.Popen | None = None
        self.procs: dict[str, subprocess.Popen] = {}

    def _start(self) -> Self:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.redis = start_redis(self.redis_dir, appendonly=True)
        config = self.write_config()
        for name, role in gdl_roles(self.layout, self.processors):
            self.procs[name] = start_gdl(config, role, self.log_level, self.log_path(name))
        api = self.procs.get("api") or self.procs["all"]
        wait_for("gdl api", lambda: api_answers(self.api_port, api, self.log_path("api" if "api" in self.procs
                                                                                    else "all")))
        client = redis.Redis(unix_socket_path=str(self.redis_path))
        try:
            wait_for("gdl processor and notifier", lambda: self._ready(client))
        finally:
            client.close()
        log.info("gdl (%s) pids %s, redis-server pid %d", self.layout,
                 ", ".join(f"{k} {p.pid}" for k, p in self.procs.items()), self.redis.pid)
        return self

    def write_config(self) -> Path:
        """gdl's YAML for this run (every process of it reads the same)."""
        return write_gdl_config(
            self.dir, self.redis_path, self.api_port,
            processor={"download_url": f"http://127.0.0.1:{self.api_port}/files"},
            notifier={"concurrency": self.notifier_concurrency, "deletion_interval": 1_000_000},
            security={"block_private_networks": False},
            http={"engine": self.engine},
        )

    def log_path(self, name: str) -> Path:
        return self.dir / f"gdl-{name}.log"

    def _ready(self, client: redis.Redis) -> bool:
        """Every processor and the notifier reported stats and listen for wake-ups: new work is seen at once."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise SystemExit(f"bench: gdl {name} exited with {proc.returncode}:\n"
                                 + self.log_path(name).read_text())
        subscribers = dict(client.pubsub_numsub(WAKE_AGGR, WAKE_CALLBACKS))
        beats = [json.loads(body) for body in client.hvals(HEARTBEATS)]
        reporting = Counter(c for beat in beats for c in beat.get("components", {}))
        return (reporting["processor"] >= self.processors and reporting["notifier"] >= 1
                and subscribers.get(WAKE_AGGR.encode(), 0) >= self.processors
                and subscribers.get(WAKE_CALLBACKS.encode(), 0) >= 1)

    @property
    def processor_pid(self) -> int:
        """The (first) process with the processor role."""
        return next(p for name, p in self.procs.items() if name.startswith("processor") or name == "all").pid

    def gdl_cpu(self) -> float:
        return tree_cpu_seconds([p.pid for p in self.procs.values()])

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds so far of each gdl process and of the redis-server."""
        assert self.redis is not None
        out = {name: tree_cpu_seconds([p.pid]) for name, p in self.procs.items()}
        out["redis-server"] = tree_cpu_seconds([self.redis.pid])
        return out

    def redis_cpu(self) -> float:
        assert self.redis is not None
        return tree_cpu_seconds([self.redis.pid])

    def redis_calls(self, reset: bool = False) -> dict[str, int]:
        """Commands run by the redis-server so far, by name (``INFO commandstats``; those a script
        runs counted too); with ``reset``, the counts start again from 0 (``CONFIG RESETSTAT``)."""
        client = redis.Redis(unix_socket_path=str(self.redis_path), decode_responses=True)
        try:
            if reset:
                client.config_resetstat()
                return {}
            return {name.removeprefix("cmdstat_"): int(stat["calls"])
                    for name, stat in client.info("commandstats").items()}
        finally:
            client.close()

    def peak_rss_kib(self) -> dict[str, int]:
        """Peak resident memory so far (VmHWM, KiB) of each gdl process and of the redis-server."""
        assert self.redis is not None
        out = {name: proc_status_kib(p.pid, "VmHWM") for name, p in self.procs.items()}
        out["redis-server"] = proc_status_kib(self.redis.pid, "VmHWM")
        return out

    @property
    def log_names(self) -> list[str]:
        """The gdl processes whose logs :meth:`log_tail` and :meth:`log_lines` read."""
        return list(self.procs)

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for name in self.log_names:
            text = self.log_path(name).read_text(errors="replace").splitlines()
            out.append(f"--- gdl {name} log ({len(text)} lines), last {lines}:")
            out += text[-lines:]
        return "\n".join(out)

    def log_lines(self) -> int:
        return sum(len(self.log_path(n).read_text(errors="replace").splitlines()) for n in self.log_names)

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs.values():  # all at once: each takes up to a few seconds
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.procs.items():
            stop_process(proc, f"gdl {name}", signalled=True)
        stop_process(self.redis, "redis-server", timeout=10)


class ProcessorsAlone(Gdl):
    """Workload 6's "processor role alone": :class:`Gdl`'s redis-server and config with gdl's API alone, to
    enqueue; then, the API stopped, processor processes alone (no notifier) to download."""

    def __init__(self, workdir: Path, log_level: str, notifier_concurrency: int, engine: str = "curl"):
        super().__init__(workdir, "split", log_level, notifier_concurrency, engine=engine)
        self.config: Path | None = None
        self.stopped: list[str] = []  # processes stopped before the end, whose logs still count

    def _start(self) -> Self:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.redis = start_redis(self.redis_dir, appendonly=True)
        self.config = self.write_config()
        api = self.procs["api"] = start_gdl(self.config, "api", self.log_level, self.log_path("api"))
        wait_for("gdl api", lambda: api_answers(self.api_port, api, self.log_path("api")))
        log.info("gdl api pid %d, redis-server pid %d", api.pid, self.redis.pid)
        return self

    def stop_api(self) -> None:
        stop_process(self.procs.pop("api"), "gdl api")
        self.stopped.append("api")

    def start_processors(self, count: int) -> None:
        """``count`` processor processes, started at once (their imports and start-up run in parallel)."""
        assert self.config is not None
        self.processors = count
        for name, role in gdl_roles("split", count):
            if role == "processor":
                self.procs[name] = start_gdl(self.config, role, self.log_level, self.log_path(name))

    @property
    def log_names(self) -> list[str]:
        return self.stopped + list(self.procs)


# --------------------------------------------------------------------------- bench-side servers

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


# --------------------------------------------------------------------------- enqueueing

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


# --------------------------------------------------------------------------- results

@dataclass
class Row:
    """One tool's run of a workload."""

    name: str
    seconds: float
    units: float  # jobs, or bytes
    tool_cpu: float  # CPU seconds of the tool (gdl: its processes + redis-server)
    redis_cpu: float = 0.0
    server_cpu: float = 0.0  # nginx
    bench_cpu: float = 0.0  # this process (enqueue client, callback receiver)
    machine_cpu: float = 0.0  # every process on the machine (for other_cpu)
    note: str = ""
    by_process: dict[str, float] = field(default_factory=dict)  # gdl: CPU seconds of each process
    connections: int = 0  # gdl: connections its notifier opened to the callback receiver
    key: str = ""  # the JSON lines' name: a reference's key, or a gdl run's tool
    peak_rss: dict[str, int] = field(default_factory=dict)  # peak RSS (VmHWM, KiB) by process
    leases: dict[str, int] = field(default_factory=dict)  # processor role alone: aggregations leased by process
    redis_calls: dict[str, int] = field(default_factory=dict)  # gdl: Redis commands run in the window, by name

    @property
    def cpu_ms_per_unit(self) -> float:
        return self.tool_cpu * 1000 / self.units

    @property
    def rate(self) -> float:
        return self.units / self.seconds

    @property
    def other_cpu(self) -> float:
        """CPU the machine spent beyond the tool, nginx and this process: the kernel's share of
        loopback traffic and disk, plus anything else running (which skews the figures)."""
        return self.machine_cpu - self.tool_cpu - self.server_cpu - self.bench_cpu


@dataclass
class Report:
    small_refs: list[Row] = field(default_factory=list)  # aria2c, the requests loop, the libcurl loop
    small: list[Row] = field(default_factory=list)  # gdl, one row per layout
    small_jobs: int = 0
    many: Row | None = None
    scaleout: list[Row] = field(default_factory=list)  # gdl split with 1, then N processors
    scaleout_alone: list[Row] = field(default_factory=list)  # the processor role alone: 1, then N processes
    big: list[Row] = field(default_factory=list)
    big_desc: str = ""
    big_rss: tuple[int, int] = (0, 0)  # VmRSS at start, VmHWM at end (KiB)
    latency: dict[str, Any] = field(default_factory=dict)
    util: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    load: tuple[str, str] = ("", "")


# --------------------------------------------------------------------------- workload 1: small files

def make_small_files(nginx: Nginx, n: int) -> list[str]:
    directory = nginx.root / "small"
    directory.mkdir(exist_ok=True)
    block = os.urandom(SMALL_BYTES)
    names = []
    for i in range(n):
        name = f"small/{i}.bin"
        (nginx.root / name).write_bytes(i.to_bytes(8, "big") + block[8:])
        names.append(name)
    return names


def run_aria2c(urls: list[str], outdir: Path, concurrency: int) -> tuple[float, float]:
    """aria2c on ``urls`` into ``outdir``; returns (wall seconds, CPU seconds)."""
    binary = shutil.which("aria2c")
    if binary is None:
        raise SystemExit("bench: aria2c not found (apt-get install -y aria2)")
    outdir.mkdir(parents=True, exist_ok=True)
    listing = outdir.parent / f"{outdir.name}.urls"
    listing.write_text("".join(u + "\n" for u in urls))
    args = [binary, "--no-conf=true", "-j", str(concurrency), "-i", str(listing), "-d", str(outdir),
            "--allow-overwrite=true", "--auto-file-renaming=false", "--file-allocation=none", "-q"]
    cpu, started = children_cpu(), now()
    done = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=3600)
    seconds, cpu = now() - started, children_cpu() - cpu
    if done.returncode != 0:
        raise SystemExit(f"bench: aria2c exited with {done.returncode}: {done.stdout[-2000:]!r}")
    return seconds, cpu


def check_dir(outdir: Path, count: int, size: int, what: str) -> None:
    files = [p for p in outdir.iterdir() if p.is_file()]
    wrong = [p for p in files if p.stat().st_size != size]
    if len(files) != count or wrong:
        raise SystemExit(f"bench: {what}: {len(files)} files of {count}, {len(wrong)} of the wrong size")


def small_aria2c(args: argparse.Namespace, nginx: Nginx, names: list[str], workdir: Path) -> Row:
    def run(urls: list[str], outdir: Path) -> tuple[float, float, int | None]:
        return *run_aria2c(urls, outdir, args.aria2c_jobs), None

    return small_reference(nginx, names, workdir, key="aria2c", name=f"aria2c -j {args.aria2c_jobs}", run=run)


def small_reference(nginx: Nginx, names: list[str], workdir: Path, *, key: str, name: str,
                    run: Callable[[list[str], Path], tuple[float, float, int | None]], note: str = "") -> Row:
    """A reference tool on workload 1's URLs: ``run(urls, outdir)`` gives its (wall seconds, CPU seconds, peak
    RSS KiB or None); the row adds what nginx, this process and the machine spent meanwhile."""
    outdir = workdir / f"{key}-small"
    log.info("small files: %s, on %d URLs", name, len(names))
    nginx_cpu, machine_cpu, bench_cpu = nginx.cpu(), machine_busy_seconds(), time.process_time()
    seconds, cpu, rss = run([nginx.url(n) for n in names], outdir)
    row = Row(name, seconds, len(names), cpu, server_cpu=nginx.cpu() - nginx_cpu,
              bench_cpu=time.process_time() - bench_cpu, machine_cpu=machine_busy_seconds() - machine_cpu,
              note=note, key=key, peak_rss={key: rss} if rss is not None else {})
    check_dir(outdir, len(names), SMALL_BYTES, f"{name} small files")
    shutil.rmtree(outdir)
    return row


def run_loop(script: str, urls: list[str], outdir: Path, *options: str) -> tuple[float, float, int]:
    """A reference loop (``bench/<script>``, which prints requests_loop.py's JSON) on ``urls`` into ``outdir``;
    returns (its wall seconds, CPU seconds, peak RSS KiB)."""
    outdir.mkdir(parents=True, exist_ok=True)
    listing = outdir.parent / f"{outdir.name}.urls"
    listing.write_text("".join(u + "\n" for u in urls))
    args = [sys.executable, str(BENCH_DIR / script), "--urls", str(listing), "--out", str(outdir), *options]
    cpu = children_cpu()
    done = subprocess.run(args, capture_output=True, timeout=3600)
    cpu = children_cpu() - cpu
    if done.returncode != 0:
        raise SystemExit(f"bench: {script} exited with {done.returncode}: {done.stderr[-2000:]!r}")
    result = json.loads(done.stdout)
    return result["seconds"], cpu, result["max_rss_kib"]


def small_loop(nginx: Nginx, names: list[str], workdir: Path, *, key: str, name: str, script: str,
               options: list[str]) -> Row:
    def run(urls: list[str], outdir: Path) -> tuple[float, float, int | None]:
        return run_loop(script, urls, outdir, *options)

    return small_reference(nginx, names, workdir, key=key, name=name, run=run, note="seconds: its own, after imports")


def small_requests(args: argparse.Namespace, nginx: Nginx, names: list[str], workdir: Path) -> Row:
    return small_loop(nginx, names, workdir, key="requests_loop",
                      name=f"requests loop, {args.requests_threads} threads", script="requests_loop.py",
                      options=["--threads", str(args.requests_threads)])


def small_curl(args: argparse.Namespace, nginx: Nginx, names: list[str], workdir: Path) -> Row | None:
    """The libcurl-on-a-gevent-hub loop, when pycurl is installed (the measure of a proposed replacement)."""
    if importlib.util.find_spec("pycurl") is None:
        log.warning("small files: no libcurl reference (pip install pycurl to measure it)")
        return None
    return small_loop(nginx, names, workdir, key="curl_loop", name=f"libcurl on a gevent hub, {args.requests_threads} "
                      "at once", script="curl_loop.py", options=["--parallel", str(args.requests_threads)])


@dataclass
class Readings:
    """CPU seconds so far of each gdl process and the redis-server, of nginx, of the machine's cores and of
    this process; and the connections the callback receiver accepted so far."""

    by_process: dict[str, float]
    nginx: float
    machine: float
    bench: float
    peers: int

    @classmethod
    def take(cls, gdl: Gdl, nginx: Nginx, receiver: CallbackReceiver, end: bool = False) -> Self:
        """At the start of a window (``end`` False) this process's and the machine's CPU are read last, at
        its end first: the reading of /proc is no part of either."""
        if end:
            bench, machine = time.process_time(), machine_busy_seconds()
            return cls(gdl.cpu_by_process(), nginx.cpu(), machine, bench, len(receiver.peers))
        by_process, nginx_cpu, peers = gdl.cpu_by_process(), nginx.cpu(), len(receiver.peers)
        machine = machine_busy_seconds()
        return cls(by_process, nginx_cpu, machine, time.process_time(), peers)


def measure_gdl(args: argparse.Namespace, gdl: Gdl, nginx: Nginx, receiver: CallbackReceiver, jobs: list[Job],
                what: str, size: int) -> Row:
    """Enqueue ``jobs`` in one burst and wait for every callback: a row of first enqueue to last callback,
    the CPU of gdl's processes and redis-server, and their peak RSS at the end; checks that every stored
    file has ``size`` bytes."""
    keys = [j.key for j in jobs]
    receiver.expect(keys)
    enqueuer = Enqueuer(gdl.api_port, receiver.url)
    prepared = enqueuer.prepare(jobs)
    gdl.redis_calls(reset=True)
    start = Readings.take(gdl, nginx, receiver)
    started = now()
    enqueuer.burst(prepared, min(args.connections, len(jobs)))
    enqueued = now() - started
    log.info("%s: all enqueued in %.1fs (%.0f/s), %d callbacks so far", what, enqueued, len(jobs) / enqueued,
             len(jobs) - receiver.missing)
    end = await_callbacks(receiver, gdl, what, timeout=max(120.0, len(jobs) / 10),
                          at_count=lambda: Readings.take(gdl, nginx, receiver, end=True))
    redis_calls = gdl.redis_calls()
    last = max(receiver.arrivals[k][0] for k in keys)
    first = min(enqueuer.starts.values())
    by_process = {k: v - start.by_process[k] for k, v in end.by_process.items()}
    row = Row(gdl_name(gdl.layout, gdl.processors, gdl.engine), last - first, len(jobs), sum(by_process.values()),
              redis_cpu=by_process["redis-server"], server_cpu=end.nginx - start.nginx,
              bench_cpu=end.bench - start.bench, note=f"enqueue {enqueued:.1f}s",
              machine_cpu=end.machine - start.machine, by_process=by_process, connections=end.peers - start.peers,
              key=gdl_tool(gdl.layout, gdl.processors, gdl.engine), peak_rss=gdl.peak_rss_kib(),
              redis_calls=redis_calls)
    payloads = check_callbacks(receiver, keys, what)
    check_files(gdl.rootdir, payloads, size, what)
    log.info("%s: %d callbacks, all success, all files %d bytes; %d gdl log lines", what, len(payloads), size,
             gdl.log_lines())
    if receiver.duplicates:
        log.warning("%s: %d duplicate callbacks so far", what, receiver.duplicates)
    return row


def small_gdl(args: argparse.Namespace, layout: str, nginx: Nginx, names: list[str], workdir: Path,
              receiver: CallbackReceiver, processors: int = 1, tag: str = "small", engine: str = "") -> Row:
    """Workload 1 for one gdl layout and engine (``--engine`` by default): ``names`` into
    ``--small-aggregations`` of ``--small-limit``."""
    engine = engine or args.engine
    run = f"{tag}-{gdl_tool(layout, processors, engine).replace(' ', '-')}"  # small-gdl-split-curl
    with Gdl(workdir / run, layout, args.gdl_log_level, args.notifier_concurrency, processors, engine) as gdl:
        jobs = [Job(f"{run}-{i}", nginx.url(name), f"small{i % args.small_aggregations}", args.small_limit)
                for i, name in enumerate(names)]
        log.info("%s: %s: %d jobs in %d aggregations of limit %d over %d connections", tag,
                 gdl_name(layout, processors, engine), len(jobs), args.small_aggregations, args.small_limit,
                 args.connections)
        row = measure_gdl(args, gdl, nginx, receiver, jobs, run, SMALL_BYTES)
    discard(gdl.dir, args)
    return row


# --------------------------------------------------------------------------- workload 2: big files

def make_big_files(nginx: Nginx, count: int, size: int) -> list[str]:
    directory = nginx.root / "big"
    directory.mkdir(exist_ok=True)
    block = os.urandom(MIB)
    names = []
    for i in range(count):
        name = f"big/{i}.bin"
        with open(nginx.root / name, "wb") as out:
            left = size
            while left > 0:
                out.write(block[:min(left, MIB)])
                left -= MIB
        names.append(name)
    return names


def quiet_disk() -> None:
    """Write back what earlier runs left dirty (their deleted files included) before a
    big-file run starts, so that no tool pays for the previous one's writeback."""
    started = now()
    os.sync()
    time.sleep(1.0)
    log.info("big files: disk synced in %.1fs before the next tool", now() - started)


def big_curl(args: argparse.Namespace, nginx: Nginx, names: list[str], size: int, workdir: Path) -> Row:
    """curl per file, then ``sync <file>`` (an fsync): ``limit`` at a time in each of the aggregations' groups."""
    curl = shutil.which("curl")
    if curl is None:
        raise SystemExit("bench: curl not found")
    outdir = workdir / "curl-big"
    outdir.mkdir(parents=True, exist_ok=True)
    groups = [names[g::args.big_aggregations] for g in range(args.big_aggregations)]
    failures: list[str] = []

    def one(name: str) -> None:
        target = outdir / name.replace("/", "-")
        done = subprocess.run(["sh", "-c", 'curl -sf -o "$1" "$2" && sync "$1"', "sh", str(target), nginx.url(name)],
                              timeout=3600)
        if done.returncode != 0:
            failures.append(f"{name}: exit {done.returncode}")

    def group(mine: list[str]) -> None:
        pool = gevent.pool.Pool(args.big_limit)
        for name in mine:
            pool.spawn(one, name)
        pool.join()

    log.info("big files: curl + sync, %d groups of %d at a time", len(groups), args.big_limit)
    cpu, nginx_cpu, machine_cpu, bench_cpu = children_cpu(), nginx.cpu(), machine_busy_seconds(), time.process_time()
    started = now()
    gevent.joinall([gevent.spawn(group, g) for g in groups])
    seconds = now() - started
    if failures:
        raise SystemExit(f"bench: curl failed: {failures}")
    row = Row("curl + sync (per file)", seconds, size * len(names), children_cpu() - cpu,
              server_cpu=nginx.cpu() - nginx_cpu, bench_cpu=time.process_time() - bench_cpu,
              machine_cpu=machine_busy_seconds() - machine_cpu, key="curl_fsync")
    check_dir(outdir, len(names), size, "curl big files")
    shutil.rmtree(outdir)
    return row


def big_aria2c(args: argparse.Namespace, nginx: Nginx, names: list[str], size: int, workdir: Path) -> list[Row]:
    outdir = workdir / "aria2c-big"
    concurrency = args.big_aggregations * args.big_limit
    log.info("big files: aria2c -j %d", concurrency)
    nginx_cpu, machine_cpu, bench_cpu = nginx.cpu(), machine_busy_seconds(), time.process_time()
    seconds, cpu = run_aria2c([nginx.url(n) for n in names], outdir, concurrency)
    server_cpu = nginx.cpu() - nginx_cpu
    machine_cpu, bench_cpu = machine_busy_seconds() - machine_cpu, time.process_time() - bench_cpu
    check_dir(outdir, len(names), size, "aria2c big files")
    # aria2c does not fsync; gdl and the curl line do. Time the same guarantee after it.
    started = now()
    for path in outdir.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync = now() - started
    shutil.rmtree(outdir)
    return [Row(f"aria2c -j {concurrency} (no fsync)", seconds, size * len(names), cpu, server_cpu=server_cpu,
                bench_cpu=bench_cpu, machine_cpu=machine_cpu, key="aria2c"),
            Row(f"aria2c -j {concurrency} + fsync after", seconds + fsync, size * len(names), cpu,
                server_cpu=server_cpu, bench_cpu=bench_cpu, machine_cpu=machine_cpu, note=f"fsync {fsync:.2f}s",
                key="aria2c_fsync")]


def big_gdl(args: argparse.Namespace, nginx: Nginx, names: list[str], size: int, workdir: Path,
            receiver: CallbackReceiver, report: Report) -> Row:
    layout = args.layout
    with Gdl(workdir / "gdl-big", layout, args.gdl_log_level, args.notifier_concurrency, args.processors,
             args.engine) as gdl:
        rss_start = proc_status_kib(gdl.processor_pid, "VmRSS")
        jobs = [Job(f"big-{i}", nginx.url(name), f"big{i % args.big_aggregations}", args.big_limit)
                for i, name in enumerate(names)]
        keys = [j.key for j in jobs]
        receiver.expect(keys)
        enqueuer = Enqueuer(gdl.api_port, receiver.url)
        prepared = enqueuer.prepare(jobs)
        log.info("big files: gdl (%s): %d jobs in %d aggregations of limit %d", layout, len(jobs),
                 args.big_aggregations, args.big_limit)
        gdl_cpu, redis_cpu, nginx_cpu, bench_cpu = gdl.gdl_cpu(), gdl.redis_cpu(), nginx.cpu(), time.process_time()
        machine_cpu = machine_busy_seconds()
        enqueuer.burst(prepared, min(args.connections, len(jobs)))
        await_callbacks(receiver, gdl, "big files", timeout=120 + size * len(names) / (20 * MB))
        last = max(receiver.arrivals[k][0] for k in keys)
        first = min(enqueuer.starts.values())
        row = Row(gdl_name(layout, gdl.processors, gdl.engine), last - first, size * len(names),
                  gdl.gdl_cpu() - gdl_cpu + gdl.redis_cpu() - redis_cpu, redis_cpu=gdl.redis_cpu() - redis_cpu,
                  server_cpu=nginx.cpu() - nginx_cpu, bench_cpu=time.process_time() - bench_cpu,
                  machine_cpu=machine_busy_seconds() - machine_cpu, key=gdl_tool(layout, gdl.processors, gdl.engine),
                  peak_rss=gdl.peak_rss_kib())
        report.big_rss = (rss_start, proc_status_kib(gdl.processor_pid, "VmHWM"))
        payloads = check_callbacks(receiver, keys, "big files")
        check_files(gdl.rootdir, payloads, size, "big files")
    discard(gdl.dir, args)
    return row


# --------------------------------------------------------------------------- workload 3: pickup latency

def pickup_latency(args: argparse.Namespace, nginx: Nginx, names: list[str], workdir: Path,
                   receiver: CallbackReceiver) -> dict[str, Any]:
    with Gdl(workdir / "gdl-latency", args.layout, args.gdl_log_level, args.notifier_concurrency,
             args.processors, args.engine) as gdl:
        enqueuer = Enqueuer(gdl.api_port, receiver.url)
        # Warm up connections and lazy imports in an aggregation of its own, then leave gdl idle.
        warm = [Job(f"warm-{i}", nginx.url(names[i]), "warmup", 8) for i in range(10)]
        receiver.expect(j.key for j in warm)
        enqueuer.burst(enqueuer.prepare(warm), 2)
        await_callbacks(receiver, gdl, "latency warm-up", timeout=60)
        log.info("pickup latency: warmed up; idle for %.0fs", args.idle_seconds)
        gevent.sleep(args.idle_seconds)
        count = int(args.trickle_rate * args.trickle_seconds)
        jobs = [Job(f"trickle-{i}", nginx.url(names[i % len(names)]), f"trickle{i % args.trickle_aggregations}", 8)
                for i in range(count)]
        keys = [j.key for j in jobs]
        receiver.expect(keys)
        log.info("pickup latency: %d jobs at %g/s into %d aggregations", count, args.trickle_rate,
                 args.trickle_aggregations)
        enqueuer.trickle(enqueuer.prepare(jobs), args.trickle_rate, connections=4)
        await_callbacks(receiver, gdl, "pickup latency", timeout=60)
        check_callbacks(receiver, keys, "pickup latency")
    discard(gdl.dir, args)
    latencies = [(receiver.arrivals[k][0] - enqueuer.starts[k]) * 1000 for k in keys]
    # The first job of each aggregation also starts its pool (scanner wake-up, lease, pool).
    firsts = latencies[:args.trickle_aggregations]
    rest = latencies[args.trickle_aggregations:] or firsts
    return {"jobs": count, "all": latencies, "first": firsts, "rest": rest,
            "span": max(enqueuer.starts[k] for k in keys) - min(enqueuer.starts[k] for k in keys)}


# --------------------------------------------------------------------------- workload 4: utilisation

def utilisation(args: argparse.Namespace, workdir: Path, receiver: CallbackReceiver) -> dict[str, Any]:
    limits = {f"util{i:02d}": i % 8 + 1 for i in range(args.util_aggregations)}
    totals = {aggr: args.util_rounds * limit for aggr, limit in limits.items()}
    hold = HoldServer(args.util_hold, limits)
    hold.start()
    # Round-robin over the aggregations so that all of them have work from the start.
    jobs = []
    for n in range(max(totals.values())):
        for aggr, limit in limits.items():
            if n < totals[aggr]:
                jobs.append(Job(f"util-{aggr}-{n}", hold.url(aggr, n), aggr, limit))
    sent: Counter[str] = Counter()
    samples: list[tuple[float, dict[str, int], dict[str, int]]] = []
    try:
        with Gdl(workdir / "gdl-util", args.layout, args.gdl_log_level, args.notifier_concurrency,
                 args.processors, args.engine) as gdl:
            receiver.expect(j.key for j in jobs)
            enqueuer = Enqueuer(gdl.api_port, receiver.url)
            prepared = enqueuer.prepare(jobs)
            stop = gevent.event.Event()

            def sample() -> None:
                deadline = now() + 600
                while not stop.is_set() and now() < deadline:
                    queued = {a: sent[a] - hold.started[a] for a in limits}
                    samples.append((now(), dict(hold.inflight), queued))
                    if all(hold.started[a] >= totals[a] for a in limits):
                        break
                    stop.wait(args.util_sample)

            log.info("utilisation: %d aggregations, limits 1..8, %d jobs of %.0f ms each", len(limits), len(jobs),
                     args.util_hold * 1000)
            sampler = gevent.spawn(sample)

            def on_start(job: Job) -> None:
                sent[job.aggr] += 1

            started = now()
            enqueuer.burst(prepared, args.connections, on_start)
            elapsed = await_callbacks(receiver, gdl, "utilisation", timeout=120 + len(jobs) * args.util_hold,
                                      at_count=now) - started
            stop.set()
            sampler.join()
            check_callbacks(receiver, [j.key for j in jobs], "utilisation")
        discard(gdl.dir, args)
    finally:
        hold.stop()

    def busy(inflight: dict[str, int], aggrs: Iterable[str]) -> int:
        return sum(min(inflight.get(a, 0), limits[a]) for a in aggrs)

    # A: while every aggregation still had queued work, busy slots over all slots.
    all_queued = [s for s in samples if all(q > 0 for q in s[2].values())]
    ratio_a = (sum(busy(s[1], limits) for s in all_queued) / (len(all_queued) * sum(limits.values()))
               if all_queued else float("nan"))
    # B: over the whole run, busy slots over usable slots (an aggregation can use at most
    # min(limit, in flight + queued)); samples with nothing usable are skipped.
    usable = [(busy(s[1], limits), sum(min(limits[a], s[1].get(a, 0) + max(0, s[2][a])) for a in limits))
              for s in samples]
    usable = [(b, u) for b, u in usable if u]
    ratio_b = sum(b for b, _ in usable) / sum(u for _, u in usable) if usable else float("nan")
    per_aggr = {}
    for aggr, limit in limits.items():
        mine = [s[1].get(aggr, 0) for s in samples if s[2][aggr] > 0]
        per_aggr[aggr] = (limit, totals[aggr], hold.max[aggr],
                          sum(min(x, limit) for x in mine) / (len(mine) * limit) if mine else float("nan"))
    ideal = args.util_rounds * args.util_hold
    demand = sum(limits.values()) / args.util_hold
    return {"demand": demand, "achieved": len(jobs) / elapsed,
            "per_aggr": per_aggr, "violations": hold.violations, "ratio_a": ratio_a, "samples_a": len(all_queued),
            "ratio_b": ratio_b, "samples": len(samples), "elapsed": elapsed, "ideal": ideal, "jobs": len(jobs)}


# --------------------------------------------------------------------------- workload 5: many aggregations

def many_aggregations(args: argparse.Namespace, nginx: Nginx, names: list[str], workdir: Path,
                      receiver: CallbackReceiver) -> Row:
    """Workload 1's files and measure, spread over ``--many-aggregations`` small aggregations."""
    count = args.many_aggregations * args.many_jobs_per_aggregation
    with Gdl(workdir / "gdl-many", args.layout, args.gdl_log_level, args.notifier_concurrency,
             args.processors, args.engine) as gdl:
        jobs = [Job(f"many-{i}", nginx.url(names[i % len(names)]), f"many{i % args.many_aggregations}",
                    args.many_limit) for i in range(count)]
        log.info("many aggregations: %s: %d jobs in %d aggregations of limit %d over %d connections",
                 gdl_name(args.layout, gdl.processors, gdl.engine), len(jobs), args.many_aggregations, args.many_limit,
                 args.connections)
        row = measure_gdl(args, gdl, nginx, receiver, jobs, "many aggregations", SMALL_BYTES)
    discard(gdl.dir, args)
    return row


# --------------------------------------------------------------------------- workload 6: scale-out

def scale_out(args: argparse.Namespace, nginx: Nginx, names: list[str], workdir: Path,
              receiver: CallbackReceiver) -> tuple[list[Row], list[Row]]:
    """Workload 1 in the split layout with one processor process, then with ``--scaleout-processors`` (the
    whole pipeline); then the processor role alone with as many."""
    mine = names[:args.scaleout_jobs]
    counts = (1, args.scaleout_processors)
    pipeline = [small_gdl(args, "split", nginx, mine, workdir, receiver, processors=n, tag="scaleout")
                for n in counts]
    return pipeline, [processor_alone(args, nginx, mine, workdir, receiver, n) for n in counts]


def processor_alone(args: argparse.Namespace, nginx: Nginx, names: list[str], workdir: Path,
                    receiver: CallbackReceiver, processors: int) -> Row:
    """Workload 6's "processor role alone": ``names`` enqueued as in workload 1 through gdl's API alone, the
    API stopped, then ``processors`` processor processes started; timed from their start (Popen: their
    imports and start-up are inside the window) until every job was downloaded, i.e. until Redis's
    callback queue holds them all (no notifier runs, so nothing leaves it)."""
    run = f"scaleout-alone-x{processors}"
    what = f"processor role alone, {processors} processor{'s' if processors > 1 else ''}"
    with ProcessorsAlone(workdir / run, args.gdl_log_level, args.notifier_concurrency, args.engine) as gdl:
        jobs = [Job(f"{run}-{i}", nginx.url(name), f"small{i % args.small_aggregations}", args.small_limit)
                for i, name in enumerate(names)]
        enqueuer = Enqueuer(gdl.api_port, receiver.url)
        prepared = enqueuer.prepare(jobs)
        log.info("%s: enqueueing %d jobs in %d aggregations of limit %d through the API alone", what, len(jobs),
                 args.small_aggregations, args.small_limit)
        started = now()
        enqueuer.burst(prepared, min(args.connections, len(jobs)))
        log.info("%s: all enqueued in %.1fs; stopping the API", what, now() - started)
        gdl.stop_api()
        client = redis.Redis(unix_socket_path=str(gdl.redis_path))
        try:
            with client.pipeline(transaction=False) as pipe:
                for aggr in sorted({j.aggr for j in jobs}):
                    pipe.zcard(queue_key(aggr))
                queued = sum(pipe.execute())
            if queued != len(jobs) or client.zcard(CALLBACK_QUEUE):
                raise SystemExit(f"bench: {what}: {queued} of {len(jobs)} jobs queued after enqueueing, "
                                 f"{client.zcard(CALLBACK_QUEUE)} already downloaded")
            start = Readings.take(gdl, nginx, receiver)
            started = now()
            gdl.start_processors(processors)
            log.info("%s: started %s", what, ", ".join(f"{k} {p.pid}" for k, p in gdl.procs.items()))
            aggrs = sorted({j.aggr for j in jobs})
            done, owners = await_downloads(client, gdl, len(jobs), aggrs, what, timeout=max(120.0, len(jobs) / 10))
            end = Readings.take(gdl, nginx, receiver, end=True)
            leases = leases_by_process(gdl, owners)
            peak_rss = gdl.peak_rss_kib()
            ids = check_downloads(client, [j.key for j in jobs], what)
        finally:
            client.close()
    by_process = {k: v - start.by_process.get(k, 0.0) for k, v in end.by_process.items()}
    row = Row(what, done - started, len(jobs), sum(by_process.values()), redis_cpu=by_process["redis-server"],
              server_cpu=end.nginx - start.nginx, bench_cpu=end.bench - start.bench,
              machine_cpu=end.machine - start.machine, note="start-up included", by_process=by_process,
              key=f"gdl processor x{processors}", peak_rss=peak_rss, leases=leases)
    check_files(gdl.rootdir, [{"job_id": i} for i in ids], SMALL_BYTES, what)
    stored = sum(1 for p in gdl.rootdir.rglob("*") if p.is_file())
    if stored != len(jobs):
        raise SystemExit(f"bench: {what}: {stored} files under {gdl.rootdir}, expected {len(jobs)}")
    log.info("%s: %d jobs downloaded in %.2fs, all succeeded, all files %d bytes; %d gdl log lines", what,
             len(jobs), row.seconds, SMALL_BYTES, gdl.log_lines())
    if gdl.log_lines():
        log.warning("%s: gdl's logs (--gdl-log-level %s):\n%s", what, args.gdl_log_level, gdl.log_tail(5))
    discard(gdl.dir, args)
    return row


LEASE_SAMPLE = 0.25  # seconds between two readings of the aggregations' leases (processor role alone)


def await_downloads(client: redis.Redis, gdl: Gdl, count: int, aggrs: list[str], what: str,
                    timeout: float) -> tuple[float, dict[str, set[str]]]:
    """Polls ``ZCARD`` of the callback queue every 20 ms until it holds ``count`` jobs (a finished download
    with a callback, succeeded or failed for good, enters it); returns when it first did (:func:`now`), and
    the owner tokens seen holding each of ``aggrs``' leases (read every :data:`LEASE_SAMPLE` seconds: a pool
    keeps its lease for seconds after its last job, so no claim is missed)."""
    deadline = now() + timeout
    keys = [lease_key(a) for a in aggrs]
    owners: dict[str, set[str]] = {a: set() for a in aggrs}
    sampled = -LEASE_SAMPLE
    while True:
        downloaded = client.zcard(CALLBACK_QUEUE)
        if downloaded >= count:
            done = now()
            for aggr, token in zip(aggrs, client.mget(keys), strict=True):
                if token:
                    owners[aggr].add(token.decode())
            return done, owners
        if now() - sampled >= LEASE_SAMPLE:
            sampled = now()
            for aggr, token in zip(aggrs, client.mget(keys), strict=True):
                if token:
                    owners[aggr].add(token.decode())
        for name, proc in gdl.procs.items():
            if proc.poll() is not None:
                raise SystemExit(f"bench: {what}: gdl {name} exited with {proc.returncode}\n" + gdl.log_tail())
        if now() > deadline:
            failures = client.llen(FAILURES)
            first = client.lindex(FAILURES, 0)
            raise SystemExit(f"bench: {what}: {downloaded} of {count} jobs downloaded after {timeout:.0f}s; "
                             f"{failures} failed download attempt(s) reported"
                             + (f", the latest: {first.decode(errors='replace')}" if first else "")
                             + "\n" + gdl.log_tail())
        gevent.sleep(0.02)


def leases_by_process(gdl: Gdl, owners: dict[str, set[str]]) -> dict[str, int]:
    """How many aggregations each gdl process held the lease of (owner tokens are ``host:pid:random``); an
    aggregation taken over by another process counts for both."""
    names = {str(p.pid): name for name, p in gdl.procs.items()}
    counts: Counter[str] = Counter()
    for tokens in owners.values():
        for token in tokens:
            parts = token.rsplit(":", 2)
            counts[names.get(parts[1], token) if len(parts) == 3 else token] += 1
    return {name: counts[name] for name in gdl.procs} | {k: v for k, v in counts.items() if k not in gdl.procs}


def check_downloads(client: redis.Redis, keys: list[str], what: str) -> list[str]:
    """The ids of the jobs in the callback queue, after checking that they are the jobs of ``keys`` (by their
    ``extra``), once each, and that every one succeeded."""
    ids = [i.decode() for i in client.zrange(CALLBACK_QUEUE, 0, -1)]
    with client.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hmget(job_key(job_id), "state", "extra", "error")
        fields = pipe.execute()
    extras = Counter((extra or b"").decode() for _, extra, _ in fields)
    if len(ids) != len(keys) or extras.keys() != set(keys) or max(extras.values(), default=0) != 1:
        raise SystemExit(f"bench: {what}: {len(ids)} jobs downloaded, {len(set(extras) & set(keys))} of the "
                         f"{len(keys)} enqueued")
    failed = [(i, state, error) for i, (state, _, error) in zip(ids, fields, strict=True) if state != b"succeeded"]
    if failed:
        job_id, state, error = failed[0]
        raise SystemExit(f"bench: {what}: {len(failed)} job(s) did not succeed, first: {job_id} "
                         f"state {state!r}, error {error!r}")
    return ids


# --------------------------------------------------------------------------- printing

def rss_mb(kib: int) -> float:
    """KiB (as /proc gives them) in MB (10^6 bytes)."""
    return kib * 1024 / MB


def rss_summary(peak: dict[str, int]) -> dict[str, float]:
    """Peak RSS in MB by process, and ``gdl_total``: the gdl processes together (the redis-server apart)."""
    out = {name: rss_mb(kib) for name, kib in peak.items()}
    out["gdl_total"] = rss_mb(sum(kib for name, kib in peak.items() if name != "redis-server"))
    return out


def processors_cpu(row: Row) -> float:
    """CPU seconds of all of a gdl row's processes with the processor role."""
    return sum(v for k, v in row.by_process.items() if k.startswith("processor") or k == "all")


def print_jobs_table(rows: list[Row]) -> None:
    """The jobs/s table of workloads 1, 5 and 6: references (if any) and gdl rows."""
    print(f"{'':36} {'seconds':>8} {'jobs/s':>8} {'cpu ms/job':>10} {'(redis)':>8} "
          f"{'nginx cpu':>9} {'bench cpu':>9} {'other cpu':>9}  note")
    for r in rows:
        print(f"{r.name:36} {r.seconds:>8.2f} {r.rate:>8.0f} {r.cpu_ms_per_unit:>10.3f} "
              f"{r.redis_cpu * 1000 / r.units:>8.3f} {r.server_cpu:>8.2f}s {r.bench_cpu:>8.2f}s "
              f"{r.other_cpu:>8.2f}s  {r.note}")


def print_gdl_details(r: Row) -> None:
    """A gdl row's CPU by process, callback connections and peak RSS by process."""
    parts = ", ".join(f"{k} {v * 1000 / r.units:.2f}" for k, v in r.by_process.items())
    several = sum(1 for k in r.by_process if k.startswith("processor")) > 1
    together = f" (processors together {processors_cpu(r) * 1000 / r.units:.2f})" if several else ""
    print(f"{r.name}: cpu ms/job by process: {parts}{together}; "
          f"{r.connections} connections opened for {int(r.units)} callbacks")
    if r.redis_calls:
        calls = redis_calls_per_job(r)
        top = ", ".join(f"{k} {v:.2f}" for k, v in sorted(calls.items(), key=lambda kv: -kv[1])[:6] if k != "all")
        print(f"{r.name}: redis commands per job: {calls['all']:.1f} counting those scripts run ({top}); "
              f"one redis core at this CPU per job: {r.units / r.redis_cpu:.0f} jobs/s" if r.redis_cpu else "")
    if r.peak_rss:
        rss = rss_summary(r.peak_rss)
        total = rss.pop("gdl_total")
        print(f"{r.name}: peak RSS (VmHWM) MB: " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items())
              + f"; gdl processes together {total:.0f}")


def print_small(report: Report, args: argparse.Namespace) -> None:
    print(f"1. small files: {report.small_jobs} x 16 KiB from nginx, gdl: {args.small_aggregations} "
          f"aggregations of limit {args.small_limit}, enqueued over {args.connections} connections")
    print_jobs_table(report.small_refs + report.small)
    for r in report.small:
        print_gdl_details(r)
    for r in report.small:
        for ref in report.small_refs:
            print(f"ratio {r.name} / {ref.name}: jobs/s {r.rate / ref.rate:.3f}, "
                  f"cpu per job {r.tool_cpu / ref.tool_cpu:.1f}x")
    print()


def print_big(report: Report) -> None:
    print(f"2. big files: {report.big_desc}")
    print(f"{'':36} {'seconds':>8} {'MB/s':>8} {'cpu s':>8} {'nginx cpu':>9} {'other cpu':>9}  note")
    for r in report.big:
        print(f"{r.name:36} {r.seconds:>8.2f} {r.rate / MB:>8.0f} {r.tool_cpu:>7.2f}s {r.server_cpu:>8.2f}s "
              f"{r.other_cpu:>8.2f}s  {r.note}")
    gdl = report.big[-1]
    for r in report.big[:-1]:
        print(f"ratio gdl / {r.name}: MB/s {gdl.rate / r.rate:.2f}")
    print(f"gdl processor RSS: {report.big_rss[0] / 1024:.0f} MiB at start, peak (VmHWM) "
          f"{report.big_rss[1] / 1024:.0f} MiB")
    rss = rss_summary(gdl.peak_rss)
    total = rss.pop("gdl_total")
    print("gdl peak RSS (VmHWM) MB: " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items())
          + f"; gdl processes together {total:.0f}")
    print()


def print_latency(report: Report, args: argparse.Namespace) -> None:
    lat = report.latency
    print(f"3. pickup latency ({gdl_name(args.layout, args.processors, args.engine)}): {lat['jobs']} jobs at "
          f"{args.trickle_rate:g}/s over {lat['span']:.1f}s into {args.trickle_aggregations} aggregations, "
          "enqueue request start -> callback received, ms")
    print(f"{'':36} {'jobs':>6} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}")
    for name, key in (("all jobs", "all"), ("first job of each aggregation", "first"), ("the others", "rest")):
        values = lat[key]
        print(f"{name:36} {len(values):>6} {percentile(values, 50):>7.1f} {percentile(values, 90):>7.1f} "
              f"{percentile(values, 99):>7.1f} {max(values):>7.1f}")
    print()


def print_util(report: Report, args: argparse.Namespace) -> None:
    u = report.util
    print(f"4. utilisation ({gdl_name(args.layout, args.processors, args.engine)}): {u['jobs']} jobs of "
          f"{args.util_hold * 1000:.0f} ms in {len(u['per_aggr'])} aggregations; {u['elapsed']:.2f}s for an ideal "
          f"{u['ideal']:.2f}s")
    print(f"{'aggregation':14} {'limit':>5} {'jobs':>5} {'max in flight':>13} {'busy while queued':>17}")
    for aggr, (limit, total, peak, busy) in u["per_aggr"].items():
        flag = "  <-- LIMIT VIOLATED" if peak > limit else ""
        print(f"{aggr:14} {limit:>5} {total:>5} {peak:>13} {busy:>17.2f}{flag}")
    print(f"busy-slot ratio while every aggregation had queued work: {u['ratio_a']:.3f} "
          f"({u['samples_a']} samples of {args.util_sample * 1000:.0f} ms)")
    print(f"busy-slot ratio over the run, of usable slots: {u['ratio_b']:.3f} ({u['samples']} samples)")
    print(f"jobs/s: {u['achieved']:.0f} done, {u['demand']:.0f} needed to keep every slot busy")
    if u["violations"]:
        print(f"!!! LIMIT VIOLATED {len(u['violations'])} time(s): "
              + ", ".join(f"{a} had {n}" for _, a, n in u["violations"][:10]))
    else:
        print("limits kept: no aggregation ever had more requests in flight than its limit")
    print()


def small_match(report: Report, row: Row) -> Row | None:
    """Workload 1's row of the same gdl layout as ``row``, if workload 1 ran."""
    return next((r for r in report.small if r.key == row.key), None)


def print_many(report: Report, args: argparse.Namespace) -> None:
    r = report.many
    assert r is not None
    print(f"5. many aggregations: {int(r.units)} x 16 KiB from nginx, gdl: {args.many_aggregations} aggregations "
          f"x {args.many_jobs_per_aggregation} jobs, limit {args.many_limit}, enqueued over {args.connections} "
          "connections")
    print_jobs_table([r])
    print_gdl_details(r)
    small = small_match(report, r)
    if small:
        print(f"ratio many / small files ({r.name}): jobs/s {r.rate / small.rate:.3f} "
              f"(target >= {MANY_RATIO_TARGET}), cpu per job {r.cpu_ms_per_unit / small.cpu_ms_per_unit:.2f}x")
    else:
        print("ratio many / small files: not measured (workload 1 with the same layout did not run)")
    total = rss_summary(r.peak_rss)["gdl_total"]
    print(f"gdl processes' peak RSS together: {total:.0f} MB (target <= {MANY_RSS_TARGET_MB})")
    print()


def cores_busy(r: Row) -> float:
    """How many of the machine's cores were busy on average during a row's window (every process)."""
    return r.machine_cpu / r.seconds


def print_alone_table(rows: list[Row]) -> None:
    """Workload 6's processor-role-alone rows: the processors' CPU and the redis-server's apart."""
    print(f"{'':36} {'seconds':>8} {'jobs/s':>8} {'proc ms/job':>11} {'redis ms/job':>12} "
          f"{'nginx cpu':>9} {'bench cpu':>9} {'other cpu':>9} {'cores busy':>10}  note")
    for r in rows:
        print(f"{r.name:36} {r.seconds:>8.2f} {r.rate:>8.0f} {processors_cpu(r) * 1000 / r.units:>11.3f} "
              f"{r.redis_cpu * 1000 / r.units:>12.3f} {r.server_cpu:>8.2f}s {r.bench_cpu:>8.2f}s "
              f"{r.other_cpu:>8.2f}s {cores_busy(r):>10.2f}  {r.note}")
    for r in rows:
        parts = ", ".join(f"{k} {v * 1000 / r.units:.3f}" for k, v in r.by_process.items())
        rss = rss_summary(r.peak_rss)
        rss.pop("gdl_total")
        leased = ", ".join(f"{k} {v}" for k, v in r.leases.items())
        print(f"{r.name}: cpu ms/job by process: {parts}; aggregations leased: {leased}; peak RSS (VmHWM) MB: "
              + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()))


def print_scaleout(report: Report, args: argparse.Namespace) -> None:
    one, more = report.scaleout
    cores = os.cpu_count()
    print(f"6. scale-out: {int(one.units)} x 16 KiB from nginx, {args.small_aggregations} aggregations of limit "
          f"{args.small_limit}; {cores} cores")
    print(f"whole pipeline: gdl split layout (api + notifier) with 1, then {args.scaleout_processors} processor "
          "processes, enqueue to last callback")
    print_jobs_table(report.scaleout)
    for r in report.scaleout:
        print_gdl_details(r)
    print("machine busy (cores, every process): "
          + ", ".join(f"{r.name} {cores_busy(r):.2f} of {cores}" for r in report.scaleout))
    if report.scaleout_alone:
        print()
        print(f"processor role alone: jobs enqueued through the API alone, API stopped, then 1, then "
              f"{args.scaleout_processors} processor processes (no API, no notifier), their start to the last "
              "job downloaded")
        print_alone_table(report.scaleout_alone)
    print(f"ratio whole pipeline: {args.scaleout_processors} processors / 1: jobs/s {more.rate / one.rate:.3f} "
          f"(target >= {SCALEOUT_TARGET})")
    if report.scaleout_alone:
        a_one, a_more = report.scaleout_alone
        print(f"ratio processor role alone: {args.scaleout_processors} processors / 1: jobs/s "
              f"{a_more.rate / a_one.rate:.3f} (target >= {SCALEOUT_TARGET})")
    print()


def print_summary(report: Report, args: argparse.Namespace) -> None:
    print("summary")
    for r in report.small:
        for ref in report.small_refs:
            print(f"  small files  {r.name:36} / {ref.key:13}  jobs/s {r.rate / ref.rate:6.3f}   "
                  f"cpu ms/job {r.cpu_ms_per_unit:.2f} vs {ref.cpu_ms_per_unit:.3f}")
    if report.big:
        gdl = report.big[-1]
        for r in report.big[:-1]:
            print(f"  big files    gdl / {r.name:36}  MB/s {gdl.rate / r.rate:6.2f}")
    if report.latency:
        lat = report.latency["all"]
        print(f"  latency      p50 {percentile(lat, 50):.1f} ms, p99 {percentile(lat, 99):.1f} ms, "
              f"max {max(lat):.1f} ms")
    if report.util:
        u = report.util
        print(f"  utilisation  busy-slot ratio {u['ratio_a']:.3f} (all queued), {u['ratio_b']:.3f} (usable); "
              f"elapsed/ideal {u['elapsed'] / u['ideal']:.2f}; limit violations: {len(u['violations'])}")
    if report.many:
        r = report.many
        small = small_match(report, r)
        ratio = (f"{r.rate / small.rate:.3f} of small files' (target >= {MANY_RATIO_TARGET})" if small
                 else "no ratio (small files not run)")
        print(f"  many aggrs   jobs/s {r.rate:.0f}, {ratio}; gdl peak RSS "
              f"{rss_summary(r.peak_rss)['gdl_total']:.0f} MB (target <= {MANY_RSS_TARGET_MB})")
    if report.scaleout:
        one, more = report.scaleout
        print(f"  scale-out    whole pipeline: jobs/s {one.rate:.0f} with 1 processor, {more.rate:.0f} with "
              f"{args.scaleout_processors}: {more.rate / one.rate:.3f}x (target >= {SCALEOUT_TARGET})")
    if report.scaleout_alone:
        one, more = report.scaleout_alone
        print(f"  scale-out    processor role alone: jobs/s {one.rate:.0f} with 1 processor, {more.rate:.0f} with "
              f"{args.scaleout_processors}: {more.rate / one.rate:.3f}x (target >= {SCALEOUT_TARGET})")
    for note in report.notes:
        print(f"  note: {note}")


def print_report(report: Report, args: argparse.Namespace) -> None:
    print()
    print(f"machine: {os.cpu_count()} cores; load average {report.load[0]} at start, {report.load[1]} at end "
          "(other cpu = machine busy time not spent by the tool, nginx or this process)")
    if report.small:
        print_small(report, args)
    if report.big:
        print_big(report)
    if report.latency:
        print_latency(report, args)
    if report.util:
        print_util(report, args)
    if report.many:
        print_many(report, args)
    if report.scaleout:
        print_scaleout(report, args)
    print_summary(report, args)
    print()
    for record in json_records(report, args):
        print(json.dumps(rounded(record)))


# --------------------------------------------------------------------------- JSON lines

def rounded(value: Any) -> Any:
    """``value`` with floats rounded to 4 decimals and NaN as null, recursively (valid, short JSON)."""
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v) for v in value]
    return value


def redis_calls_per_job(r: Row) -> dict[str, float]:
    """Redis commands per job in a gdl row: ``all``, and by name."""
    out = {k: v / r.units for k, v in r.redis_calls.items()}
    out["all"] = sum(r.redis_calls.values()) / r.units
    return out


def jobs_record(r: Row) -> dict[str, Any]:
    """A jobs/s row (a gdl run or a reference) as JSON: its rate, CPU and, when known, peak RSS."""
    out: dict[str, Any] = {"tool": r.key, "name": r.name, "jobs": int(r.units), "seconds": r.seconds,
                           "jobs_per_s": r.rate, "cpu_ms_per_job": r.cpu_ms_per_unit}
    if r.by_process:
        out["cpu_ms_per_job_by_process"] = {k: v * 1000 / r.units for k, v in r.by_process.items()}
        out["callback_connections"] = r.connections
    if r.redis_calls:
        out["redis_commands_per_job"] = redis_calls_per_job(r)
    if r.peak_rss:
        out["peak_rss_mb"] = rss_summary(r.peak_rss) if r.by_process else rss_mb(next(iter(r.peak_rss.values())))
    out["nginx_cpu_s"], out["bench_cpu_s"], out["other_cpu_s"] = r.server_cpu, r.bench_cpu, r.other_cpu
    return out


def small_records(report: Report, args: argparse.Namespace) -> list[dict[str, Any]]:
    refs = {ref.key: jobs_record(ref) for ref in report.small_refs}
    out = []
    for r in report.small:
        ratio = {}
        for ref in report.small_refs:
            ratio[f"jobs_per_s_vs_{ref.key}"] = r.rate / ref.rate
            ratio[f"cpu_per_job_vs_{ref.key}"] = r.tool_cpu / ref.tool_cpu
        out.append({"workload": "small", **jobs_record(r), "aggregations": args.small_aggregations,
                    "limit": args.small_limit, "reference": refs, "ratio": ratio})
    return out


def big_record(report: Report, args: argparse.Namespace) -> dict[str, Any]:
    gdl = report.big[-1]

    def rates(r: Row) -> dict[str, Any]:
        return {"seconds": r.seconds, "mb_per_s": r.rate / MB, "cpu_s": r.tool_cpu, "nginx_cpu_s": r.server_cpu,
                "other_cpu_s": r.other_cpu}

    return {"workload": "big", "tool": gdl.key, "name": gdl.name, "files": args.big_files, "file_mib": args.big_mib,
            **rates(gdl), "peak_rss_mb": rss_summary(gdl.peak_rss),
            "processor_rss_mb": {"start": rss_mb(report.big_rss[0]), "peak": rss_mb(report.big_rss[1])},
            "reference": {r.key: {"tool": r.name, **rates(r)} for r in report.big[:-1]},
            "ratio": {f"mb_per_s_vs_{r.key}": gdl.rate / r.rate for r in report.big[:-1]}}


def latency_record(report: Report, args: argparse.Namespace) -> dict[str, Any]:
    lat = report.latency

    def percentiles(values: list[float]) -> dict[str, float]:
        return {"p50_ms": percentile(values, 50), "p90_ms": percentile(values, 90), "p99_ms": percentile(values, 99),
                "max_ms": max(values)}

    return {"workload": "latency", "tool": gdl_tool(args.layout, args.processors, args.engine),
            "jobs": lat["jobs"],
            "rate_per_s": args.trickle_rate, "aggregations": args.trickle_aggregations, **percentiles(lat["all"]),
            "first_of_aggregation": percentiles(lat["first"]), "others": percentiles(lat["rest"])}


def util_record(report: Report, args: argparse.Namespace) -> dict[str, Any]:
    u = report.util
    return {"workload": "util", "tool": gdl_tool(args.layout, args.processors, args.engine), "jobs": u["jobs"],
            "aggregations": len(u["per_aggr"]), "hold_ms": args.util_hold * 1000, "seconds": u["elapsed"],
            "ideal_seconds": u["ideal"], "jobs_per_s": u["achieved"], "jobs_per_s_needed": u["demand"],
            "busy_ratio_all_queued": u["ratio_a"], "busy_ratio_usable": u["ratio_b"],
            "limit_violations": len(u["violations"]),
            "violated": sorted({a for _, a, _ in u["violations"]})}


def many_record(report: Report, args: argparse.Namespace) -> dict[str, Any]:
    r = report.many
    assert r is not None
    small = small_match(report, r)
    ratio = r.rate / small.rate if small else None
    total = rss_summary(r.peak_rss)["gdl_total"]
    return {"workload": "many", **jobs_record(r), "aggregations": args.many_aggregations,
            "jobs_per_aggregation": args.many_jobs_per_aggregation, "limit": args.many_limit,
            "small_jobs_per_s": small.rate if small else None, "ratio": {"jobs_per_s_vs_small": ratio},
            "target": {"jobs_per_s_vs_small_min": MANY_RATIO_TARGET, "gdl_peak_rss_mb_max": MANY_RSS_TARGET_MB},
            "meets_target": {"jobs_per_s": ratio >= MANY_RATIO_TARGET if ratio is not None else None,
                             "peak_rss": total <= MANY_RSS_TARGET_MB}}


def scaleout_record(report: Report, args: argparse.Namespace) -> dict[str, Any]:
    one, more = report.scaleout
    ratio = more.rate / one.rate
    out = {"workload": "scaleout", "tool": "gdl split", "jobs": int(one.units), "cores": os.cpu_count(),
           "processors": [1, args.scaleout_processors], "jobs_per_s": [one.rate, more.rate],
           "cpu_ms_per_job": [one.cpu_ms_per_unit, more.cpu_ms_per_unit],
           "cores_busy": [cores_busy(one), cores_busy(more)],
           "ratio": {f"jobs_per_s_{args.scaleout_processors}_vs_1": ratio},
           "target": {"ratio_min": SCALEOUT_TARGET}, "meets_target": ratio >= SCALEOUT_TARGET,
           "runs": [jobs_record(one), jobs_record(more)]}
    if report.scaleout_alone:
        rows = report.scaleout_alone
        alone = rows[1].rate / rows[0].rate
        out["processor_alone"] = {
            "jobs_per_s": [r.rate for r in rows], "seconds": [r.seconds for r in rows],
            "cpu_ms_per_job": [processors_cpu(r) * 1000 / r.units for r in rows],
            "cpu_ms_per_job_by_process": [{k: v * 1000 / r.units for k, v in r.by_process.items()} for r in rows],
            "redis_cpu_ms_per_job": [r.redis_cpu * 1000 / r.units for r in rows],
            "nginx_cpu_s": [r.server_cpu for r in rows], "bench_cpu_s": [r.bench_cpu for r in rows],
            "other_cpu_s": [r.other_cpu for r in rows], "cores_busy": [cores_busy(r) for r in rows],
            "aggregations_leased": [r.leases for r in rows],
            "peak_rss_mb": [rss_summary(r.peak_rss) for r in rows], "startup_included": True,
            "ratio": alone, "meets_target": alone >= SCALEOUT_TARGET}
    return out


def json_records(report: Report, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One JSON object per workload run (per gdl layout in workload 1), in the order of the tables."""
    out = small_records(report, args)
    if report.big:
        out.append(big_record(report, args))
    if report.latency:
        out.append(latency_record(report, args))
    if report.util:
        out.append(util_record(report, args))
    if report.many:
        out.append(many_record(report, args))
    if report.scaleout:
        out.append(scaleout_record(report, args))
    return out


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes: 2000 small files, 8 x 32 MiB, a 5 s trickle, 5 rounds of utilisation, "
                             "400 x 5 jobs of many aggregations, 2000 jobs of scale-out")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated subset of {','.join(WORKLOADS)} (default: all)")
    parser.add_argument("--layout", choices=LAYOUTS, default="split",
                        help="gdl processes for workloads 2-5: split = one per role as in the Procfile "
                             "(default), single = one process with every role")
    parser.add_argument("--processors", type=int, default=1,
                        help="processor processes in the split layout (workloads 1-5; default 1)")
    parser.add_argument("--engine", choices=ENGINES, default="curl",
                        help="gdl's http.engine in workloads 2-6 (default curl)")
    parser.add_argument("--small-engines", default="curl,requests",
                        help="gdl's http.engines measured side by side in workload 1 (default: both)")
    parser.add_argument("--small-layouts", default="single,split",
                        help="gdl layouts measured in workload 1 (default: both)")
    parser.add_argument("--small-jobs", type=int, help="small files (default 10000, quick 2000)")
    parser.add_argument("--small-aggregations", type=int, default=100)
    parser.add_argument("--small-limit", type=int, default=8)
    parser.add_argument("--aria2c-jobs", type=int, default=16, help="aria2c -j for the small files")
    parser.add_argument("--requests-threads", type=int, default=16,
                        help="threads (one requests.Session each) of the requests loop for the small files")
    parser.add_argument("--many-aggregations", type=int, help="aggregations of workload 5 (default 2000, quick 400)")
    parser.add_argument("--many-jobs-per-aggregation", type=int, default=5)
    parser.add_argument("--many-limit", type=int, default=2, help="aggr_limit of workload 5")
    parser.add_argument("--scaleout-jobs", type=int,
                        help="small files of workload 6, per run (default: --small-jobs; quick 2000)")
    parser.add_argument("--scaleout-processors", type=int, default=2,
                        help="processor processes of workload 6's second run, in both measurements (default 2)")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive connections enqueueing jobs")
    parser.add_argument("--big-files", type=int, default=8)
    parser.add_argument("--big-mib", type=int, help="MiB per big file (default 256, quick 32)")
    parser.add_argument("--big-aggregations", type=int, default=2)
    parser.add_argument("--big-limit", type=int, default=4)
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="gdl idle time before the trickle")
    parser.add_argument("--trickle-rate", type=float, default=20.0, help="jobs per second")
    parser.add_argument("--trickle-seconds", type=float, help="default 10, quick 5")
    parser.add_argument("--trickle-aggregations", type=int, default=10)
    parser.add_argument("--util-aggregations", type=int, default=20)
    parser.add_argument("--util-rounds", type=int, help="jobs per aggregation = rounds x limit (default 10, quick 5)")
    parser.add_argument("--util-hold", type=float, default=0.2, help="seconds the slow origin holds each response")
    parser.add_argument("--util-sample", type=float, default=0.02, help="seconds between in-flight samples")
    parser.add_argument("--notifier-concurrency", type=int, default=50)
    parser.add_argument("--gdl-log-level", default="warning", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) and say where it is")
    args = parser.parse_args(argv)
    quick = args.quick
    args.small_jobs = args.small_jobs or (2000 if quick else 10000)
    args.big_mib = args.big_mib or (32 if quick else 256)
    args.trickle_seconds = args.trickle_seconds or (5.0 if quick else 10.0)
    args.util_rounds = args.util_rounds or (5 if quick else 10)
    args.many_aggregations = args.many_aggregations or (400 if quick else 2000)
    args.scaleout_jobs = args.scaleout_jobs or (2000 if quick else args.small_jobs)
    args.workloads = {w.strip() for w in args.workloads.split(",") if w.strip()}
    unknown = args.workloads - set(WORKLOADS)
    if unknown:
        parser.error(f"--workloads: unknown {', '.join(sorted(unknown))}")
    if args.processors < 1 or args.scaleout_processors < 2:
        parser.error("--processors must be at least 1, --scaleout-processors at least 2")
    args.small_engines = [w.strip() for w in args.small_engines.split(",") if w.strip()]
    if not set(args.small_engines) <= set(ENGINES):
        parser.error("--small-engines: curl and/or requests")
    args.small_layouts = [w.strip() for w in args.small_layouts.split(",") if w.strip()]
    if not set(args.small_layouts) <= set(LAYOUTS):
        parser.error("--small-layouts: single and/or split")
    return args


def small_files_needed(args: argparse.Namespace) -> int:
    """How many distinct 16 KiB files the chosen workloads use (latency alone: 200, reused round-robin)."""
    needs = [0]
    if "small" in args.workloads:
        needs.append(args.small_jobs)
    if "many" in args.workloads:
        needs.append(args.many_aggregations * args.many_jobs_per_aggregation)
    if "scaleout" in args.workloads:
        needs.append(args.scaleout_jobs)
    if "latency" in args.workloads:
        needs.append(200)
    return max(needs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    report = Report()
    load_start = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    tmp = tempfile.mkdtemp(prefix="gdl-throughput-")
    workdir = Path(tmp)
    receiver = CallbackReceiver()
    receiver.start()
    try:
        with Nginx(workdir) as nginx:
            names: list[str] = []
            count = small_files_needed(args)
            if count:
                log.info("writing %d files of %d bytes", count, SMALL_BYTES)
                names = make_small_files(nginx, count)
            if "small" in args.workloads:
                mine = names[:args.small_jobs]
                report.small_jobs = len(mine)
                report.small_refs.append(small_aria2c(args, nginx, mine, workdir))
                report.small_refs.append(small_requests(args, nginx, mine, workdir))
                curl = small_curl(args, nginx, mine, workdir)
                if curl is not None:
                    report.small_refs.append(curl)
                for layout in args.small_layouts:
                    for engine in args.small_engines:  # side by side, against the same references
                        report.small.append(small_gdl(args, layout, nginx, mine, workdir, receiver, args.processors,
                                                      engine=engine))
            if "big" in args.workloads:
                size = args.big_mib * MIB
                report.big_desc = (f"{args.big_files} x {args.big_mib} MiB from nginx; gdl ({args.layout}): "
                                   f"{args.big_aggregations} aggregations of limit {args.big_limit}; references "
                                   f"{args.big_aggregations * args.big_limit} at once; MB = 10^6 bytes")
                log.info("writing %d files of %d MiB", args.big_files, args.big_mib)
                big = make_big_files(nginx, args.big_files, size)
                try:
                    quiet_disk()
                    report.big.append(big_curl(args, nginx, big, size, workdir))
                    quiet_disk()
                    report.big += big_aria2c(args, nginx, big, size, workdir)
                    quiet_disk()
                    report.big.append(big_gdl(args, nginx, big, size, workdir, receiver, report))
                finally:
                    shutil.rmtree(nginx.root / "big", ignore_errors=True)
            if "latency" in args.workloads:
                report.latency = pickup_latency(args, nginx, names, workdir, receiver)
            if "util" in args.workloads:
                report.util = utilisation(args, workdir, receiver)
            if "many" in args.workloads:
                report.many = many_aggregations(args, nginx, names, workdir, receiver)
            if "scaleout" in args.workloads:
                report.scaleout, report.scaleout_alone = scale_out(args, nginx, names, workdir, receiver)
    finally:
        receiver.stop()
        if args.keep:
            log.info("temp dir kept: %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if receiver.duplicates or receiver.bad:
        report.notes.append(f"{receiver.duplicates} duplicate and {receiver.bad} unreadable callback(s)")
    report.load = (load_start, " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    print_report(report, args)
    return 1 if report.util and report.util["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
