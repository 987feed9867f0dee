"""The service: one process running one or more roles on one gevent hub.

Roles are ``api`` (the HTTP API), ``processor`` (scanner, pools, disk
checker, reaper) and ``notifier``. Whatever the roles, a process has one
store connection pool, one keeper (leases and in-flight deadlines), one
pub/sub listener and one stats reporter.

Shutdown (SIGTERM or SIGINT) is a sequence with a deadline: stop taking
work (scanner, pools, notifier) and stop accepting requests; let what is in
flight finish for ``processor.shutdown_grace``; interrupt the rest, each
greenlet putting its job back due now; release leases as pools end; stop the
helpers; shut the embedded Redis down last. A second signal exits
at once: leases then expire and the sweep recovers the work.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable

import gevent
import gevent.event
from gevent.pywsgi import WSGIServer

from gdl import __version__, sentry
from gdl.api import API, make_server
from gdl.backends import from_config as backends_from_config
from gdl.clock import RedisClock
from gdl.config import Config
from gdl.diskio import check_writable
from gdl.errors import StartupError, StoreUnavailable
from gdl.filestorage import FileStorage, FileStorages
from gdl.lease import Keeper
from gdl.notifier import Notifier
from gdl.processor import Processor
from gdl.redis_server import EmbeddedRedis
from gdl.scanner import Scanner
from gdl.stats import NotifierStats, Reporter, Stats
from gdl.store import WAKE_CALLBACKS, Store, now_ms
from gdl.wakeup import Wakeup

log = logging.getLogger(__name__)

ROLES = ("api", "processor", "notifier")
SHUTDOWN_DEADLINE = 10.0


def process_token() -> str:
    """Names this process in leases, in-flight records and stats."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Service:
    def __init__(self, cfg: Config, roles: tuple[str, ...] = ROLES, *, clock: Callable[[], int] = now_ms):
        self.cfg = cfg
        self.roles = roles
        # A driven clock (tests) is taken as it is; the real one is corrected to Redis's (gdl/clock.py).
        self.redis_clock = RedisClock(cfg.redis.max_clock_skew_ms) if clock is now_ms else None
        self.clock: Callable[[], int] = self.redis_clock or clock
        self.token = process_token()
        self.client_name = "gdl:" + self.token.replace(" ", "_")
        self.embedded: EmbeddedRedis | None = None
        self.store: Store | None = None
        self.greenlets: list[gevent.Greenlet] = []
        self.stopped = gevent.event.Event()
        self._signals = 0
        self.processor: Processor | None = None
        self.notifier: Notifier | None = None
        self.server: WSGIServer | None = None
        self.helpers: list = []

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        cfg = self.cfg
        sentry.setup(cfg.sentry, component="+".join(self.roles))
        storage = self._storage()
        self.store = self._connect()
        clock, store = self.redis_clock, self.store
        if clock is not None:
            clock.measure(store)
            self._spawn("clock", lambda: clock.run(store))
        keeper = Keeper(self.store, self.token, cfg.processor.lease_ttl, clock=self.clock)
        wakeup = Wakeup(self.store)
        stats: list[Stats] = []
        if "processor" in self.roles:
            assert storage is not None
            stats.append(self._start_processor(keeper, wakeup, storage))
        if "notifier" in self.roles:
            stats.append(self._start_notifier(keeper, wakeup, storage))
        for component in stats:
            component.gauge("redis_errors", lambda: self.store.health.errors if self.store else 0)
        reporter = Reporter(self.store, self.token, cfg.processor.stats_interval, stats, roles=self.roles,
                            clock=self.clock)
        self.helpers += [keeper, wakeup, reporter]
        self._spawn("keeper", keeper.run)
        self._spawn("reporter", reporter.run)
        if wakeup.has_handlers:
            self._spawn("wakeup", wakeup.run)
        if "api" in self.roles:
            self._start_api(storage.default)
        log.info("gdl %s: started %s as %s (config %s)", __version__, ", ".join(self.roles), self.token, cfg.source)

    def _storage(self) -> FileStorages:
        if "processor" in self.roles:
            check_writable("processor.storage_dir", self.cfg.processor.storage_dir)
        filestorages = FileStorages.from_config(self.cfg)
        # The processor stores into the default filestorage; the api serves from it when it is a
        # filesystem. Its own check() proves it (a filesystem's makes and probes rootdir).
        serves_files = self.cfg.processor.filestorage.get("type") == "filesystem" and "api" in self.roles
        if "processor" in self.roles or serves_files:
            filestorages.default.check()
        return filestorages

    def _connect(self) -> Store:
        rcfg = self.cfg.redis
        url = rcfg.url
        if url == "embedded" and not rcfg.sentinel and not rcfg.cluster_nodes:
            self.embedded = EmbeddedRedis(rcfg.embedded_dir, rcfg.embedded_fsync)
            url = self.embedded.start()
        store = Store.connect(url, sentinel=rcfg.sentinel, master_name=rcfg.master_name,
                              cluster_nodes=rcfg.cluster_nodes, client_name=self.client_name,
                              wait_replicas=rcfg.wait_replicas)
        try:
            store.ping()
            if not rcfg.cluster_nodes:  # an earlier gdl never ran on a cluster: nothing to upgrade there
                self._upgrade_layout(store)
        except StoreUnavailable as exc:
            if rcfg.cluster_nodes:
                raise StartupError(f"redis.cluster_nodes: cannot reach the cluster via "
                                   f"{', '.join(rcfg.cluster_nodes)}: {exc}") from exc
            if rcfg.sentinel:
                where = f"master {self.cfg.redis.master_name!r} via {', '.join(self.cfg.redis.sentinel)}"
                raise StartupError(f"redis.sentinel: cannot reach redis {where}: {exc}") from exc
            raise StartupError(f"redis.url: cannot reach redis at {_redacted(url)}: {exc}") from exc
        store.health.watch()
        return store

    def _upgrade_layout(self, store: Store) -> None:
        """Carry the keys of a gdl before the hash-tagged layout over (once)."""
        running = store.legacy_processes(now=self.clock())
        if running:
            raise StartupError(f"redis.url: gdl processes of an earlier version still run on this Redis "
                               f"({', '.join(running)}): stop them all, then start this version")
        renamed = store.upgrade_layout()
        if renamed:
            log.info("redis: %d key(s) of the earlier layout renamed with the {gdl} hash tag", renamed)

    def _start_processor(self, keeper: Keeper, wakeup: Wakeup, filestorages: FileStorages) -> Stats:
        assert self.store is not None
        self.processor = Processor(self.store, self.cfg, keeper, filestorages, clock=self.clock)
        self.helpers += self.processor.helpers
        self.processor.start(wakeup, self._spawn)
        return self.processor.stats

    @property
    def scanner(self) -> Scanner | None:
        return self.processor.scanner if self.processor else None

    def _start_notifier(self, keeper: Keeper, wakeup: Wakeup, filestorages: FileStorages) -> Stats:
        assert self.store is not None
        stats = NotifierStats()
        self.notifier = Notifier(self.store, self.cfg, keeper, backends_from_config(self.cfg), stats=stats,
                                 filestorages=filestorages, clock=self.clock)
        wakeup.on(WAKE_CALLBACKS, self.notifier.on_wake)
        self._spawn("notifier", self.notifier.run)
        return stats

    def _start_api(self, storage: FileStorage) -> None:
        assert self.store is not None
        app = API(self.cfg, self.store, storage, clock=self.clock)
        address = (self.cfg.api.host, self.cfg.api.port)
        self.server = make_server(address, app, log=None, error_log=logging.getLogger("gdl.api.server"))
        try:
            self.server.start()
        except OSError as exc:
            raise StartupError(f"api.port: cannot listen on {address[0]}:{address[1]}: {exc.strerror or exc}") from exc
        log.info("api: listening on http://%s:%d", address[0], self.server.server_port)

    def _spawn(self, name: str, fn: Callable[[], None]) -> None:
        greenlet = gevent.spawn(fn)
        greenlet.name = name
        greenlet.link_exception(lambda g: self._crashed(name, g))
        self.greenlets.append(greenlet)

    def _crashed(self, name: str, greenlet: gevent.Greenlet) -> None:
        exc = greenlet.exception
        log.error("%s: crashed: %r; stopping the process", name, exc,
                  exc_info=(type(exc), exc, exc.__traceback__))
        sentry.report(exc, component=name)
        self.request_stop()

    # ------------------------------------------------------------------ run and stop

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(signum, self._on_signal, signum)

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second %s: exiting at once; leases expire and the sweep recovers in-flight work",
                        signal.Signals(signum).name)
            os._exit(1)
        log.info("%s: shutting down", signal.Signals(signum).name)
        self.request_stop()

    def request_stop(self) -> None:
        self.stopped.set()

    def wait(self) -> None:
        self.stopped.wait()

    def shutdown(self, deadline: float = SHUTDOWN_DEADLINE) -> None:
        """Stop taking, let what is in flight finish for ``processor.shutdown_grace``,
        interrupt and put back the rest, release, and stop the embedded Redis last.

        Leases are released only once their pool's downloads have ended, with
        their connections closed, so that the process claiming an aggregation
        next never finds the origin still serving ours (gunicorn's graceful
        timeout is the model)."""
        started = time.monotonic()

        def left() -> float:
            return max(0.5, deadline - (time.monotonic() - started) - 1.0)

        if self.processor:
            self.processor.stop()
        if self.notifier:
            self.notifier.stop()
        if self.server:
            self.server.close()  # stop accepting; requests in progress finish below
        self._drain(min(self.cfg.processor.shutdown_grace, left()))
        if self.processor:
            self.processor.interrupt(timeout=left() / 2)
        if self.notifier:
            self.notifier.interrupt(timeout=left() / 2)
        if self.server:
            self.server.stop(timeout=min(2.0, left()))
        for helper in self.helpers:
            helper.stop()
        # The listener and the clock hold nothing to save; killing them spares waiting out their sleep.
        gevent.killall([g for g in self.greenlets if g.name in ("wakeup", "clock")], block=False)
        gevent.joinall(self.greenlets, timeout=left())
        gevent.killall([g for g in self.greenlets if not g.dead], timeout=1)
        if self.store is not None:
            if self.embedded is not None:
                self.embedded.stop(self.store, self.client_name)
            self.store.close()
        sentry.flush(timeout=min(2.0, left()))
        log.info("gdl: stopped in %.1fs", time.monotonic() - started)

    def _busy(self) -> int:
        return (self.processor.busy if self.processor else 0) + (self.notifier.busy if self.notifier else 0)

    def _drain(self, grace: float) -> None:
        """Let downloads and callbacks in flight finish for up to ``grace`` seconds."""
        busy = self._busy()
        if not busy:
            return
        log.info("shutdown: letting %d job(s) in flight finish, for up to %gs", busy, grace)
        until = time.monotonic() + grace
        if self.processor:
            self.processor.drain(timeout=grace)
        if self.notifier:
            self.notifier.drain(timeout=max(0.0, until - time.monotonic()))
        busy = self._busy()
        if busy:
            log.info("shutdown: grace over, interrupting %d job(s) and putting them back", busy)


def _redacted(url: str) -> str:
    """The URL without its password, for error lines."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url
