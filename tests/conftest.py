"""Shared fixtures: a real redis-server, configs on temporary directories,
gdl services in this process and gdl processes started for real.

The test process runs on a monkey-patched gevent hub, as gdl does, so
services started in-process behave as in production.
"""

from gevent import monkey

monkey.patch_all()

import dataclasses  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import requests  # noqa: E402
import yaml  # noqa: E402

from gdl import config  # noqa: E402
from gdl.redis_server import find_binary  # noqa: E402
from gdl.store import Store  # noqa: E402
from tests.httpserver import LoopbackServer  # noqa: E402
from tests.servers import CallbackReceiver, RawServer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("chaos", "tests/test_chaos.py: the size of the chaos run")
    group.addoption("--chaos-jobs", type=int, default=600, help="jobs accepted before the chaos starts")
    group.addoption("--chaos-seconds", type=float, default=25.0, help="how long processes and Redis are killed")
    group.addoption("--chaos-seed", type=int, default=14, help="seed of the random events")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


class RedisServer:
    """A real redis-server on a free TCP port, with a data dir of its own."""

    def __init__(self, data_dir: Path, *, aof: bool = False, extra: tuple[str, ...] = ()):
        self.dir = data_dir
        self.port = free_port()
        self.aof = aof
        self.extra = extra
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [find_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--save", "", "--appendonly", "yes" if self.aof else "no", "--appendfsync", "always",
             "--daemonize", "no", *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        store = Store.connect(self.url)
        wait_until(lambda: pings(store), timeout=10)
        store.close()
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def kill(self) -> None:
        """kill -9: what it acknowledged is on disk only as far as its appendfsync went."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = random.randrange(20_000, 30_000)
        try:
            for p in (port, port + 10_000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue


class RedisClusterServer:
    """Three redis-server masters in cluster mode, joined by ``redis-cli --cluster create``."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir
        self.ports = [free_cluster_port() for _ in range(3)]
        self.processes: list[subprocess.Popen] = []

    @property
    def nodes(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.ports]

    def start(self) -> "RedisClusterServer":
        server = find_binary()
        for port in self.ports:
            node_dir = self.dir / str(port)
            node_dir.mkdir(parents=True, exist_ok=True)
            self.processes.append(subprocess.Popen(
                [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir),
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--save", "",
                 "--appendonly", "no", "--daemonize", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in self.ports:
            node = Store.connect(f"redis://127.0.0.1:{port}/0")
            wait_until(lambda node=node: pings(node), timeout=10)
            node.close()
        cli = str(Path(server).with_name("redis-cli"))
        subprocess.run([cli, "--cluster", "create", *self.nodes, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        for port in self.ports:  # every node must see the whole cluster, not only the one a ping reaches
            node = Store.connect(f"redis://127.0.0.1:{port}/0")
            wait_until(lambda node=node: node.redis.cluster("info").get("cluster_state") == "ok", timeout=20)
            node.close()
        return self

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


def pings(store: Store) -> bool:
    try:
        store.ping()
        return True
    except Exception:
        return False


@pytest.fixture(params=["curl", "requests"])
def engine(request: pytest.FixtureRequest) -> str:
    """Each HTTP engine in turn: the download, security and callback tests are one contract suite."""
    return request.param


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def files() -> Iterator[LoopbackServer]:
    """A loopback file server; routes are added by the test."""
    with LoopbackServer() as server:
        yield server


@pytest.fixture
def receiver() -> Iterator[CallbackReceiver]:
    """A loopback callback receiver (200 unless scripted otherwise)."""
    server = CallbackReceiver()
    yield server
    server.stop()


@pytest.fixture
def raw_server() -> Iterator[Callable[..., RawServer]]:
    """Start :class:`RawServer` s: ``raw_server(answer, ssl_context=None)``; stopped after the test."""
    started: list[RawServer] = []

    def start(answer: Callable[[socket.socket, bytes], None], **options: Any) -> RawServer:
        srv = RawServer(answer, **options)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[Store]:
    """A store on an empty database."""
    s = Store.connect(redis_server.url)
    s.redis.flushall()
    yield s
    s.close()


def make_config(tmp: Path, redis_url: str, **sections: dict) -> config.Config:
    """A config on ``tmp`` with test-friendly timings, overridden by ``sections``."""
    raw: dict[str, Any] = {
        "redis": {"url": redis_url},
        "api": {"host": "127.0.0.1", "port": 0, "heartbeat_path": str(tmp / "disable-api")},
        "processor": {
            "storage_dir": str(tmp / "tmp"),
            "filestorage": {"type": "filesystem", "rootdir": str(tmp / "files")},
            "download_url": "http://files.test/files",
            "scan_interval": 0.5,
            "retry_backoff": 0.05,
            "download_timeout": 10,
            "lease_ttl": 3,
            "pool_idle_timeout": 1,
            "stats_interval": 0.2,
            "disk": {"high": 100, "low": 100, "interval": 0.2},
        },
        "notifier": {"concurrency": 10, "retry_backoff": 0.05, "deletion_interval": 60},
        "security": {"block_private_networks": False},
    }
    for section, values in sections.items():
        merged = raw.setdefault(section, {})
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    path = tmp / "gdl.yaml"
    path.write_text(yaml.safe_dump(raw))
    return config.load(path, environ={})


def backend_from_config(directory: Path, kind: str, **sections: dict) -> Any:
    """The ``kind`` callback backend as gdl makes it from a config file of ``sections`` (not started)."""
    from gdl.backends import from_config

    path = directory / f"gdl-{kind}-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump({"notifier": {"concurrency": 10}, **sections}))
    return from_config(config.load(path, environ={}))[kind]


@pytest.fixture
def make_cfg(tmp_path: Path, redis_server: RedisServer, store: Store) -> Callable[..., config.Config]:
    """Configs on this test's directories and on an emptied test Redis."""
    return lambda **sections: make_config(tmp_path, redis_server.url, **sections)


class Running:
    """An in-process gdl service and an HTTP client for its API."""

    def __init__(self, service: Any):
        self.service = service
        port = service.server.server_port if service.server else None
        self.base = f"http://127.0.0.1:{port}" if port else None
        self.http = requests.Session()

    def url(self, path: str) -> str:
        assert self.base, "this service runs no api role"
        return self.base + path

    def post(self, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        # Bytes, not str: http.client then sends headers and body in one write
        # (a str body goes separately and meets Nagle + delayed ACK: 40 ms a request).
        data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
        return self.http.post(self.url(path), data=data, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.http.get(self.url(path), **kwargs)

    def raw(self, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, bytes]:
        """One request with ``path`` sent exactly as given (no client-side normalising)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.service.server.server_port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def enqueue(self, **fields: Any) -> str:
        response = self.post("/download", fields)
        assert response.status_code == 201, response.text
        return response.json()["id"]


@pytest.fixture
def run_service(make_cfg: Callable[..., config.Config]) -> Iterator[Callable[..., Running]]:
    """Start gdl services in this process: ``run_service(roles=("api",), processor={...})``."""
    from gdl.service import ROLES, Service

    started: list[Any] = []

    def start(roles: tuple[str, ...] = ROLES, cfg: config.Config | None = None, **sections: dict) -> Running:
        service = Service(cfg or make_cfg(**sections), roles)
        started.append(service)
        service.start()
        return Running(service)

    yield start
    for service in reversed(started):
        service.shutdown(deadline=5)


class GdlProcess:
    """``gdl`` run as a real subprocess on a config file."""

    def __init__(self, cfg_path: Path, *args: str, env: dict[str, str] | None = None):
        self.cfg_path = cfg_path
        self.log_path = cfg_path.parent / f"gdl-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gdl.cli", "--config", str(cfg_path), *args],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=str(cfg_path.parent),
            env={**os.environ, **(env or {})},
        )

    def output(self) -> str:
        return self.log_path.read_text()

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def config_file(tmp: Path, cfg: config.Config, name: str = "gdl.yaml") -> Path:
    """Write ``cfg`` back to YAML (for subprocesses)."""
    data = dataclasses.asdict(cfg)
    data.pop("source")
    path = tmp / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def gdl_process(tmp_path: Path) -> Iterator[Callable[..., GdlProcess]]:
    started: list[GdlProcess] = []

    def start(cfg: config.Config | Path, *args: str, env: dict[str, str] | None = None,
              name: str = "gdl.yaml") -> GdlProcess:
        path = cfg if isinstance(cfg, Path) else config_file(tmp_path, cfg, name)
        proc = GdlProcess(path, *args, env=env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """moto's S3 server on loopback, one for the session (tests/brokers.py)."""
    from tests.brokers import MotoServer  # brokers imports this module: not at the top

    server = MotoServer(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture
def s3(moto_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An empty moto, and the AWS chain pointed at test credentials only."""
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    moto_server.reset()
    return moto_server
