"""The bench's harness: its constants and measuring helpers, and nginx and gdl started
as real processes on 127.0.0.1 (gdl in any layout of roles, with either HTTP engine)."""

import argparse
import http.client
import json
import logging
import math
import os
import resource
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Self

import redis
from common import (
    Started,
    api_answers,
    free_port,
    proc_status_kib,
    redis_socket,
    start_gdl,
    start_redis,
    stop_process,
    tree_cpu_seconds,
    wait_for,
    write_gdl_config,
)

from gdl.store.layout import (
    HEARTBEATS,
    WAKE_AGGR,
    WAKE_CALLBACKS,
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
    """Put a finished gdl's directory (its files, Redis data, logs) aside unless ``--keep``."""
    if not args.keep:
        set_aside(path)


SET_ASIDE = "set-aside"


def set_aside(path: Path) -> None:
    """Move a finished tool's files out of the way, to be deleted with the temp dir at the end.

    Deleting them at once would tax whichever tool runs next. On an ext4 without a
    journal (the machine these figures come from), creating a file skips every free
    inode of its group freed within the last minute (six, while the freed inodes'
    table is not yet written back), one buffer-cache lookup each: after the references
    deleted their 30,000 files, ``perf`` put about an eighth of the machine's busy CPU
    during gdl's small-file run in that scan (``recently_deleted``,
    ``find_get_block_common``). A rename frees no inode."""
    aside = path.parent / SET_ASIDE
    aside.mkdir(exist_ok=True)
    path.rename(aside / f"{path.name}-{len(os.listdir(aside))}")


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

    redis_fsync = "always"  # the AOF fsync policy (gdl's redis.embedded_fsync); --redis-fsync sets it

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
        self.redis = start_redis(self.redis_dir, appendonly=True, fsync=self.redis_fsync)
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
        self.redis = start_redis(self.redis_dir, appendonly=True, fsync=self.redis_fsync)
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
