"""End-to-end throughput, latency and limit-keeping of gdl, next to aria2c and curl.

One run starts everything it needs on 127.0.0.1 in a temp dir: nginx serving
the files, a redis-server with append-only persistence (as gdl's embedded
mode runs it), gdl as real processes (``python -m gdl.cli``), and, in this
gevent-patched process, the callback receiver and a slow origin. Then:

1. small files: N x 16 KiB end to end (enqueue, download, store, callback),
   next to ``aria2c -j 16`` on the same URLs: jobs/s, CPU ms per job;
2. big files: a few large files, next to curl (+ fsync) and aria2c: MB/s,
   and the peak RSS of gdl's processor;
3. pickup latency: a trickle of jobs into an idle gdl, enqueue to callback;
4. utilisation: 200 ms downloads in aggregations of limits 1..8: the most
   in flight per aggregation (never above its limit) and the share of slots
   kept busy.

    python bench/throughput.py [--quick] [--small-jobs 10000] [--big-mib 256] ...

Progress goes to stderr through ``logging``; the report to stdout. Needs
``nginx`` and ``aria2c`` on PATH (Debian: ``apt-get install nginx aria2``).
"""

# Patched first, as gdl/cli.py does: the callback receiver, the slow origin and
# the HTTP clients below are greenlets on one hub.
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
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
    api_answers,
    free_port,
    machine_busy_seconds,
    proc_status_kib,
    start_gdl,
    start_redis,
    stop_process,
    tree_cpu_seconds,
    wait_for,
    write_gdl_config,
)

from gdl.api import make_server  # noqa: E402

log = logging.getLogger("bench.throughput")

SMALL_BYTES = 16 * 1024
MIB = 1024 * 1024
MB = 1_000_000
ROLES = ("api", "processor", "notifier")
LAYOUTS = {"single": (None,), "split": ROLES}
LAYOUT_NAMES = {"single": "gdl (1 process, all roles)", "split": "gdl (api + processor + notifier)"}


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

class Nginx:
    """nginx serving ``<workdir>/www`` on a free loopback port, stopped on exit."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.root = workdir / "www"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Self:
        try:
            return self._start()
        except BaseException:
            self.__exit__()
            raise

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

class Gdl:
    """A redis-server (AOF on) and gdl in one process or one per role, in a temp dir."""

    def __init__(self, workdir: Path, layout: str, log_level: str, notifier_concurrency: int):
        self.dir = workdir
        self.layout = layout
        self.log_level = log_level
        self.notifier_concurrency = notifier_concurrency
        self.redis_port = free_port()
        self.api_port = free_port()
        self.rootdir = workdir / "files"
        self.redis: subprocess.Popen | None = None
        self.procs: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> Self:
        try:
            return self._start()
        except BaseException:
            self.__exit__()
            raise

    def _start(self) -> Self:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.redis = start_redis(self.dir / "redis", self.redis_port, appendonly=True)
        config = write_gdl_config(
            self.dir, self.redis_port, self.api_port,
            processor={"download_url": f"http://127.0.0.1:{self.api_port}/files"},
            notifier={"concurrency": self.notifier_concurrency, "deletion_interval": 1_000_000},
            security={"block_private_networks": False},
        )
        for role in LAYOUTS[self.layout]:
            name = role or "all"
            self.procs[name] = start_gdl(config, role, self.log_level, self.log_path(name))
        api = self.procs.get("api") or self.procs["all"]
        wait_for("gdl api", lambda: api_answers(self.api_port, api, self.log_path("api" if "api" in self.procs
                                                                                    else "all")))
        client = redis.Redis(port=self.redis_port)
        try:
            wait_for("gdl processor and notifier", lambda: self._ready(client))
        finally:
            client.close()
        log.info("gdl (%s) pids %s, redis-server pid %d", self.layout,
                 ", ".join(f"{k} {p.pid}" for k, p in self.procs.items()), self.redis.pid)
        return self

    def log_path(self, name: str) -> Path:
        return self.dir / f"gdl-{name}.log"

    def _ready(self, client: redis.Redis) -> bool:
        """Both roles reported stats and listen for wake-ups: new work is seen at once."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise SystemExit(f"bench: gdl {name} exited with {proc.returncode}:\n"
                                 + self.log_path(name).read_text())
        subscribers = dict(client.pubsub_numsub("gdl:wake:aggr", "gdl:wake:callbacks"))
        reporting = {c for body in client.hvals("gdl:heartbeats") for c in json.loads(body).get("components", {})}
        return {"processor", "notifier"} <= reporting and all(n >= 1 for n in subscribers.values())

    @property
    def processor_pid(self) -> int:
        return (self.procs.get("processor") or self.procs["all"]).pid

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

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for name in self.procs:
            text = self.log_path(name).read_text(errors="replace").splitlines()
            out.append(f"--- gdl {name} log ({len(text)} lines), last {lines}:")
            out += text[-lines:]
        return "\n".join(out)

    def log_lines(self) -> int:
        return sum(len(self.log_path(n).read_text(errors="replace").splitlines()) for n in self.procs)

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs.values():  # all at once: each takes up to a few seconds
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.procs.items():
            stop_process(proc, f"gdl {name}", signalled=True)
        stop_process(self.redis, "redis-server", timeout=10)


# --------------------------------------------------------------------------- bench-side servers

class CallbackReceiver:
    """Records when each job's callback arrives, keyed by the job's ``extra``."""

    def __init__(self) -> None:
        self.arrivals: dict[str, tuple[float, dict]] = {}
        self.duplicates = 0
        self.bad = 0
        self.peers: set[tuple[str, str]] = set()  # client (address, port): connections gdl opened
        self._pending: set[str] = set()
        self._done = gevent.event.Event()
        self.server = make_server(("127.0.0.1", 0), self.app, log=None)

    def start(self) -> None:
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/cb"

    def stop(self) -> None:
        self.server.stop(timeout=1)

    def app(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        at = now()
        self.peers.add((environ.get("REMOTE_ADDR", ""), environ.get("REMOTE_PORT", "")))
        try:
            payload = json.loads(environ["wsgi.input"].read())
            key = payload["extra"]
        except (ValueError, KeyError, TypeError):
            self.bad += 1
            start_response("400 Bad Request", [("Content-Length", "0")])
            return []
        if key in self.arrivals:
            self.duplicates += 1
        else:
            self.arrivals[key] = (at, payload)
            self._pending.discard(key)
            if not self._pending:
                self._done.set()
        start_response("200 OK", [("Content-Length", "0")])
        return []

    def expect(self, keys: Iterable[str]) -> None:
        """Call before enqueueing: :meth:`wait` returns once all of ``keys`` arrived."""
        self._pending = set(keys) - self.arrivals.keys()
        self._done.clear()
        if not self._pending:
            self._done.set()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    @property
    def missing(self) -> int:
        return len(self._pending)


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


class Enqueuer:
    """POST /download over keep-alive connections; records when each request started."""

    def __init__(self, port: int, callback_url: str):
        self.port = port
        self.callback_url = callback_url
        self.starts: dict[str, float] = {}
        self.errors: list[str] = []

    def _post(self, conn: http.client.HTTPConnection, job: Job, on_start: Callable[[Job], None] | None) -> None:
        body = job.body(self.callback_url)
        if on_start is not None:
            on_start(job)
        self.starts[job.key] = now()
        # A bytes body goes out in the same write as the headers.
        conn.request("POST", "/download", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 201:
            self.errors.append(f"{job.key}: {response.status} {data[:200]!r}")

    def burst(self, jobs: list[Job], connections: int, on_start: Callable[[Job], None] | None = None) -> None:
        """All of ``jobs``, as fast as ``connections`` connections go, in list order per connection."""
        def client(mine: list[Job]) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            try:
                for job in mine:
                    self._post(conn, job, on_start)
            finally:
                conn.close()

        greenlets = [gevent.spawn(client, jobs[i::connections]) for i in range(connections)]
        gevent.joinall(greenlets, raise_error=True)
        self._check()

    def trickle(self, jobs: list[Job], rate: float, connections: int) -> None:
        """One job every 1/``rate`` seconds, each on a free connection of ``connections``."""
        free: gevent.queue.Queue = gevent.queue.Queue()
        for _ in range(connections):
            free.put(http.client.HTTPConnection("127.0.0.1", self.port, timeout=60))

        def send(job: Job) -> None:
            conn = free.get()
            try:
                self._post(conn, job, None)
            finally:
                free.put(conn)

        group = gevent.pool.Group()
        started = now()
        for i, job in enumerate(jobs):
            gevent.sleep(max(0.0, started + i / rate - now()))
            group.spawn(send, job)
        group.join(raise_error=True)
        while not free.empty():
            free.get().close()
        self._check()

    def _check(self) -> None:
        if self.errors:
            raise SystemExit(f"bench: {len(self.errors)} enqueue(s) refused, first: {self.errors[0]}")


def await_callbacks(receiver: CallbackReceiver, gdl: Gdl, what: str, timeout: float) -> None:
    if not receiver.wait(timeout):
        raise SystemExit(f"bench: {what}: {receiver.missing} callback(s) missing after {timeout:.0f}s\n"
                         + gdl.log_tail())


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
    small: list[Row] = field(default_factory=list)
    small_jobs: int = 0
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
    outdir = workdir / "aria2c-small"
    log.info("small files: aria2c -j %d on %d URLs", args.aria2c_jobs, len(names))
    nginx_cpu, machine_cpu, bench_cpu = nginx.cpu(), machine_busy_seconds(), time.process_time()
    seconds, cpu = run_aria2c([nginx.url(n) for n in names], outdir, args.aria2c_jobs)
    row = Row(f"aria2c -j {args.aria2c_jobs}", seconds, len(names), cpu, server_cpu=nginx.cpu() - nginx_cpu,
              bench_cpu=time.process_time() - bench_cpu, machine_cpu=machine_busy_seconds() - machine_cpu)
    check_dir(outdir, len(names), SMALL_BYTES, "aria2c small files")
    shutil.rmtree(outdir)
    return row


def small_gdl(args: argparse.Namespace, layout: str, nginx: Nginx, names: list[str], workdir: Path,
              receiver: CallbackReceiver) -> Row:
    with Gdl(workdir / f"gdl-small-{layout}", layout, args.gdl_log_level, args.notifier_concurrency) as gdl:
        jobs = [Job(f"small-{layout}-{i}", nginx.url(name), f"small{i % args.small_aggregations}", args.small_limit)
                for i, name in enumerate(names)]
        keys = [j.key for j in jobs]
        receiver.expect(keys)
        enqueuer = Enqueuer(gdl.api_port, receiver.url)
        log.info("small files: %s: %d jobs in %d aggregations of limit %d over %d connections", layout, len(jobs),
                 args.small_aggregations, args.small_limit, args.connections)
        gdl_cpu, redis_cpu, nginx_cpu, bench_cpu = gdl.gdl_cpu(), gdl.redis_cpu(), nginx.cpu(), time.process_time()
        by_process, peers, machine_cpu = gdl.cpu_by_process(), len(receiver.peers), machine_busy_seconds()
        started = now()
        enqueuer.burst(jobs, args.connections)
        enqueued = now() - started
        log.info("small files: %s: all enqueued in %.1fs (%.0f/s), %d callbacks so far", layout, enqueued,
                 len(jobs) / enqueued, len(jobs) - receiver.missing)
        await_callbacks(receiver, gdl, f"small files ({layout})", timeout=max(120.0, len(jobs) / 10))
        last = max(receiver.arrivals[k][0] for k in keys)
        first = min(enqueuer.starts.values())
        row = Row(LAYOUT_NAMES[layout], last - first, len(jobs),
                  gdl.gdl_cpu() - gdl_cpu + gdl.redis_cpu() - redis_cpu, redis_cpu=gdl.redis_cpu() - redis_cpu,
                  server_cpu=nginx.cpu() - nginx_cpu, bench_cpu=time.process_time() - bench_cpu,
                  note=f"enqueue {enqueued:.1f}s", machine_cpu=machine_busy_seconds() - machine_cpu,
                  by_process={k: v - by_process[k] for k, v in gdl.cpu_by_process().items()},
                  connections=len(receiver.peers) - peers)
        payloads = check_callbacks(receiver, keys, f"small files ({layout})")
        check_files(gdl.rootdir, payloads, SMALL_BYTES, f"small files ({layout})")
        log.info("small files: %s: %d callbacks, all success, all files %d bytes; %d gdl log lines",
                 layout, len(payloads), SMALL_BYTES, gdl.log_lines())
        if receiver.duplicates:
            log.warning("small files: %d duplicate callbacks so far", receiver.duplicates)
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
              machine_cpu=machine_busy_seconds() - machine_cpu)
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
                bench_cpu=bench_cpu, machine_cpu=machine_cpu),
            Row(f"aria2c -j {concurrency} + fsync after", seconds + fsync, size * len(names), cpu,
                server_cpu=server_cpu, bench_cpu=bench_cpu, machine_cpu=machine_cpu, note=f"fsync {fsync:.2f}s")]


def big_gdl(args: argparse.Namespace, nginx: Nginx, names: list[str], size: int, workdir: Path,
            receiver: CallbackReceiver, report: Report) -> Row:
    layout = args.layout
    with Gdl(workdir / "gdl-big", layout, args.gdl_log_level, args.notifier_concurrency) as gdl:
        rss_start = proc_status_kib(gdl.processor_pid, "VmRSS")
        jobs = [Job(f"big-{i}", nginx.url(name), f"big{i % args.big_aggregations}", args.big_limit)
                for i, name in enumerate(names)]
        keys = [j.key for j in jobs]
        receiver.expect(keys)
        enqueuer = Enqueuer(gdl.api_port, receiver.url)
        log.info("big files: gdl (%s): %d jobs in %d aggregations of limit %d", layout, len(jobs),
                 args.big_aggregations, args.big_limit)
        gdl_cpu, redis_cpu, nginx_cpu, bench_cpu = gdl.gdl_cpu(), gdl.redis_cpu(), nginx.cpu(), time.process_time()
        machine_cpu = machine_busy_seconds()
        enqueuer.burst(jobs, min(args.connections, len(jobs)))
        await_callbacks(receiver, gdl, "big files", timeout=120 + size * len(names) / (20 * MB))
        last = max(receiver.arrivals[k][0] for k in keys)
        first = min(enqueuer.starts.values())
        row = Row(LAYOUT_NAMES[layout], last - first, size * len(names),
                  gdl.gdl_cpu() - gdl_cpu + gdl.redis_cpu() - redis_cpu, redis_cpu=gdl.redis_cpu() - redis_cpu,
                  server_cpu=nginx.cpu() - nginx_cpu, bench_cpu=time.process_time() - bench_cpu,
                  machine_cpu=machine_busy_seconds() - machine_cpu)
        report.big_rss = (rss_start, proc_status_kib(gdl.processor_pid, "VmHWM"))
        payloads = check_callbacks(receiver, keys, "big files")
        check_files(gdl.rootdir, payloads, size, "big files")
    discard(gdl.dir, args)
    return row


# --------------------------------------------------------------------------- workload 3: pickup latency

def pickup_latency(args: argparse.Namespace, nginx: Nginx, names: list[str], workdir: Path,
                   receiver: CallbackReceiver) -> dict[str, Any]:
    with Gdl(workdir / "gdl-latency", args.layout, args.gdl_log_level, args.notifier_concurrency) as gdl:
        enqueuer = Enqueuer(gdl.api_port, receiver.url)
        # Warm up connections and lazy imports in an aggregation of its own, then leave gdl idle.
        warm = [Job(f"warm-{i}", nginx.url(names[i]), "warmup", 8) for i in range(10)]
        receiver.expect(j.key for j in warm)
        enqueuer.burst(warm, 2)
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
        enqueuer.trickle(jobs, args.trickle_rate, connections=4)
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
        with Gdl(workdir / "gdl-util", args.layout, args.gdl_log_level, args.notifier_concurrency) as gdl:
            receiver.expect(j.key for j in jobs)
            enqueuer = Enqueuer(gdl.api_port, receiver.url)
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
            enqueuer.burst(jobs, args.connections, on_start)
            await_callbacks(receiver, gdl, "utilisation", timeout=120 + len(jobs) * args.util_hold)
            elapsed = now() - started
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


# --------------------------------------------------------------------------- printing

def print_report(report: Report, args: argparse.Namespace) -> None:
    rep = LAYOUT_NAMES[args.layout]
    print()
    print(f"machine: {os.cpu_count()} cores; load average {report.load[0]} at start, {report.load[1]} at end "
          "(other cpu = machine busy time not spent by the tool, nginx or this process)")
    if report.small:
        print(f"1. small files: {report.small_jobs} x 16 KiB from nginx, gdl: {args.small_aggregations} "
              f"aggregations of limit {args.small_limit}, enqueued over {args.connections} connections")
        print(f"{'':34} {'seconds':>8} {'jobs/s':>8} {'cpu ms/job':>10} {'(redis)':>8} "
              f"{'nginx cpu':>9} {'bench cpu':>9} {'other cpu':>9}  note")
        for r in report.small:
            print(f"{r.name:34} {r.seconds:>8.2f} {r.rate:>8.0f} {r.tool_cpu * 1000 / r.units:>10.3f} "
                  f"{r.redis_cpu * 1000 / r.units:>8.3f} {r.server_cpu:>8.2f}s {r.bench_cpu:>8.2f}s "
                  f"{r.other_cpu:>8.2f}s  {r.note}")
        for r in report.small[1:]:
            parts = ", ".join(f"{k} {v * 1000 / r.units:.2f}" for k, v in r.by_process.items())
            print(f"{r.name}: cpu ms/job by process: {parts}; "
                  f"{r.connections} connections opened for {int(r.units)} callbacks")
        aria = report.small[0]
        for r in report.small[1:]:
            print(f"ratio {r.name} / {aria.name}: jobs/s {r.rate / aria.rate:.3f}, "
                  f"cpu per job {r.tool_cpu / aria.tool_cpu:.1f}x")
        print()
    if report.big:
        print(f"2. big files: {report.big_desc}")
        print(f"{'':34} {'seconds':>8} {'MB/s':>8} {'cpu s':>8} {'nginx cpu':>9} {'other cpu':>9}  note")
        for r in report.big:
            print(f"{r.name:34} {r.seconds:>8.2f} {r.rate / MB:>8.0f} {r.tool_cpu:>7.2f}s {r.server_cpu:>8.2f}s "
                  f"{r.other_cpu:>8.2f}s  {r.note}")
        gdl = report.big[-1]
        for r in report.big[:-1]:
            print(f"ratio gdl / {r.name}: MB/s {gdl.rate / r.rate:.2f}")
        print(f"gdl processor RSS: {report.big_rss[0] / 1024:.0f} MiB at start, peak (VmHWM) "
              f"{report.big_rss[1] / 1024:.0f} MiB")
        print()
    if report.latency:
        lat = report.latency
        print(f"3. pickup latency ({rep}): {lat['jobs']} jobs at {args.trickle_rate:g}/s over {lat['span']:.1f}s into "
              f"{args.trickle_aggregations} aggregations, enqueue request start -> callback received, ms")
        print(f"{'':34} {'jobs':>6} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}")
        for name, key in (("all jobs", "all"), ("first job of each aggregation", "first"), ("the others", "rest")):
            values = lat[key]
            print(f"{name:34} {len(values):>6} {percentile(values, 50):>7.1f} {percentile(values, 90):>7.1f} "
                  f"{percentile(values, 99):>7.1f} {max(values):>7.1f}")
        print()
    if report.util:
        u = report.util
        print(f"4. utilisation ({rep}): {u['jobs']} jobs of {args.util_hold * 1000:.0f} ms in "
              f"{len(u['per_aggr'])} aggregations; {u['elapsed']:.2f}s for an ideal {u['ideal']:.2f}s")
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
    print("summary")
    if report.small:
        aria = report.small[0]
        for r in report.small[1:]:
            print(f"  small files  {r.name:34} / aria2c  jobs/s {r.rate / aria.rate:6.3f}   "
                  f"cpu ms/job {r.tool_cpu * 1000 / r.units:.2f} vs {aria.tool_cpu * 1000 / aria.units:.3f}")
    if report.big:
        gdl = report.big[-1]
        for r in report.big[:-1]:
            print(f"  big files    gdl / {r.name:34}  MB/s {gdl.rate / r.rate:6.2f}")
    if report.latency:
        lat = report.latency["all"]
        print(f"  latency      p50 {percentile(lat, 50):.1f} ms, p99 {percentile(lat, 99):.1f} ms, "
              f"max {max(lat):.1f} ms")
    if report.util:
        u = report.util
        print(f"  utilisation  busy-slot ratio {u['ratio_a']:.3f} (all queued), {u['ratio_b']:.3f} (usable); "
              f"elapsed/ideal {u['elapsed'] / u['ideal']:.2f}; limit violations: {len(u['violations'])}")
    for note in report.notes:
        print(f"  note: {note}")


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes: 2000 small files, 8 x 32 MiB, a 5 s trickle, 5 rounds of utilisation")
    parser.add_argument("--workloads", default="small,big,latency,util",
                        help="comma-separated subset of small,big,latency,util (default: all)")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="split",
                        help="gdl processes for workloads 2-4: split = one per role as in the Procfile "
                             "(default), single = one process with every role")
    parser.add_argument("--small-layouts", default="single,split",
                        help="gdl layouts measured in workload 1 (default: both)")
    parser.add_argument("--small-jobs", type=int, help="small files (default 10000, quick 2000)")
    parser.add_argument("--small-aggregations", type=int, default=100)
    parser.add_argument("--small-limit", type=int, default=8)
    parser.add_argument("--aria2c-jobs", type=int, default=16, help="aria2c -j for the small files")
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
    args.workloads = {w.strip() for w in args.workloads.split(",") if w.strip()}
    unknown = args.workloads - {"small", "big", "latency", "util"}
    if unknown:
        parser.error(f"--workloads: unknown {', '.join(sorted(unknown))}")
    args.small_layouts = [w.strip() for w in args.small_layouts.split(",") if w.strip()]
    if not set(args.small_layouts) <= set(LAYOUTS):
        parser.error("--small-layouts: single and/or split")
    return args


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
            if {"small", "latency"} & args.workloads:
                count = args.small_jobs if "small" in args.workloads else 200
                log.info("writing %d files of %d bytes", count, SMALL_BYTES)
                names = make_small_files(nginx, count)
            if "small" in args.workloads:
                report.small_jobs = len(names)
                report.small.append(small_aria2c(args, nginx, names, workdir))
                for layout in args.small_layouts:
                    report.small.append(small_gdl(args, layout, nginx, names, workdir, receiver))
            if "big" in args.workloads:
                size = args.big_mib * MIB
                report.big_desc = (f"{args.big_files} x {args.big_mib} MiB from nginx; gdl ({args.layout}): "
                                   f"{args.big_aggregations} aggregations of limit {args.big_limit}; references "
                                   f"{args.big_aggregations * args.big_limit} at once; MB = 10^6 bytes")
                log.info("writing %d files of %d MiB", args.big_files, args.big_mib)
                big = make_big_files(nginx, args.big_files, size)
                try:
                    report.big.append(big_curl(args, nginx, big, size, workdir))
                    report.big += big_aria2c(args, nginx, big, size, workdir)
                    report.big.append(big_gdl(args, nginx, big, size, workdir, receiver, report))
                finally:
                    shutil.rmtree(nginx.root / "big", ignore_errors=True)
            if "latency" in args.workloads:
                report.latency = pickup_latency(args, nginx, names, workdir, receiver)
            if "util" in args.workloads:
                report.util = utilisation(args, workdir, receiver)
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
