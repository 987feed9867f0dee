"""A bounded chaos run: a split deployment on one Redis, killed at random.

One api, two processors and one notifier run as real processes on a Redis
with AOF (``appendfsync always``). Jobs into 30 aggregations of limits 1..5
are accepted first; then, for a while, a random gdl process is killed with
-9 (and started again) or Redis is killed with -9 (and started again on the
same port and directory), and once a processor gets a SIGTERM. Everything
is seeded, loopback only, and stops by itself.

What must hold: every accepted job is called back, successfully; every
stored file is byte-exact; an origin request is repeated only if, between
the earlier request's start and the repeat, the process that made the
earlier one was killed or told to stop (its outcome is recorded after the
body ends, once the file is stored), or Redis was out (plus the lease ttl
after it), or a process logged a lease fence (a machine so loaded that a
renewal came too late: the process stops its downloads rather than risk the
limit); and no aggregation's limit is ever passed.

The default run is short (CI runs it); ``pytest tests/test_chaos.py
--chaos-jobs 3000 --chaos-seconds 180`` is the long one.
"""

from __future__ import annotations

import random
import signal
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from gdl.store import Store
from tests.conftest import GdlProcess, RedisServer, config_file, free_port, make_config, pings, wait_until
from tests.origin import CountingOrigin, body_for
from tests.servers import CallbackReceiver

pytestmark = pytest.mark.chaos

# Short enough for a short run, long enough that a loaded machine's late
# renewals do not fence leases (which would repeat downloads outside a kill).
LEASE_TTL = 4.0


class Deployment:
    """The four gdl processes, each started again after it is killed."""

    def __init__(self, tmp: Path, redis: RedisServer, api_port: int) -> None:
        self.tmp = tmp
        self.procs: dict[str, GdlProcess] = {}
        self.every: list[GdlProcess] = []  # killed ones too, for their logs
        self.configs: dict[str, Path] = {}
        for name, role in (("api", "api"), ("p1", "processor"), ("p2", "processor"), ("n1", "notifier")):
            cfg = make_config(tmp, redis.url, api={"port": api_port}, processor={
                "lease_ttl": LEASE_TTL, "scan_interval": 0.3, "shutdown_grace": 1, "max_retries": 20,
                "request_headers": {"User-Agent": "gdl", "X-Gdl-Process": name}},
                notifier={"max_retries": 20})
            self.configs[name] = config_file(tmp, cfg, f"{name}.yaml")
            self.start(name, role)

    def role(self, name: str) -> str:
        return {"api": "api", "n1": "notifier"}.get(name, "processor")

    def start(self, name: str, role: str | None = None) -> None:
        self.procs[name] = GdlProcess(self.configs[name], role or self.role(name))
        self.every.append(self.procs[name])

    def log_lines(self, *words: str) -> list[str]:
        return [line for proc in self.every for line in proc.output().splitlines()
                if any(word in line for word in words)]

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()


def test_chaos(tmp_path, request):
    jobs = request.config.getoption("--chaos-jobs")
    seconds = request.config.getoption("--chaos-seconds")
    rng = random.Random(request.config.getoption("--chaos-seed"))
    redis = RedisServer(tmp_path / "redis", aof=True).start()
    origin = CountingOrigin(duration=2.0, size=24 * 1024, ticks=20, notice_disconnect=True)
    receiver = CallbackReceiver()
    api_port = free_port()
    deployment = Deployment(tmp_path, redis, api_port)
    store = Store.connect(redis.url)
    windows: list[tuple[float, float]] = []  # Redis outages: any request's outcome may be lost
    deaths: dict[str, list[float]] = {}  # processor name -> when it was killed or told to stop
    try:
        limits = {f"c{i}": 1 + i % 5 for i in range(30)}
        paths = accept(api_port, origin, receiver, limits, jobs)
        sigterm_at = rng.randrange(3, 8)
        deadline = time.monotonic() + seconds
        event = 0
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(1.0, 3.0))
            event += 1
            if event == sigterm_at:
                name, at = sigterm_a_processor(deployment, rng)
                deaths.setdefault(name, []).append(at)
            elif rng.random() < 0.25:
                windows.append(restart_redis(redis, rng))
            else:
                name, at = kill_a_process(deployment, rng)
                deaths.setdefault(name, []).append(at)
        wait_until(lambda: pings(store), timeout=10)
        wait_until(lambda: set(receiver.by_job()) >= set(paths), timeout=180, interval=0.5)
        called_back = receiver.by_job()
        assert all(body["success"] for job_id in paths for body in called_back[job_id]), "a job failed"
        for job_id, path in paths.items():
            stored = tmp_path / "files" / job_id[:3] / job_id
            assert stored.read_bytes() == body_for(path, origin.size), job_id
        assert origin.over(limits) == {}, [o for o in origin.overlaps if len(o[1]) > limits[o[0]]]
        # A process that could not renew its leases in time (a starved machine) interrupts its downloads
        # before they can lapse: each such fence is a window too.
        repeated = repeated_unexplained(origin, deaths, windows + fence_windows(deployment))
        job_ids = [job_id for job_id, path in paths.items() if path in repeated]
        assert repeated == [], deployment.log_lines(*job_ids, "unconfirmed", "late")
    finally:
        store.close()
        deployment.stop()
        redis.kill()
        receiver.stop()
        origin.stop()


def accept(api_port: int, origin: CountingOrigin, receiver: CallbackReceiver, limits: dict[str, int],
           jobs: int) -> dict[str, str]:
    """Enqueue ``jobs`` jobs spread over ``limits``; job id -> origin path."""
    http = requests.Session()
    base = f"http://127.0.0.1:{api_port}"
    wait_until(lambda: _answers(http, base + "/hb"), timeout=15)
    aggrs = list(limits)
    paths = {}
    for n in range(jobs):
        aggr = aggrs[n % len(aggrs)]
        path = f"/{aggr}/{n}"
        response = http.post(base + "/download", json={
            "url": origin.url(path), "aggr_id": aggr, "aggr_limit": limits[aggr],
            "callback_url": receiver.url("/cb")})
        assert response.status_code == 201, response.text
        paths[response.json()["id"]] = path
    return paths


def _answers(http: requests.Session, url: str) -> bool:
    try:
        return http.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def kill_a_process(deployment: Deployment, rng: random.Random) -> tuple[str, float]:
    """kill -9 of any of the four, started again a moment later; (its name, when)."""
    name = rng.choice(sorted(deployment.procs))
    at = time.monotonic()
    deployment.procs[name].kill()
    time.sleep(rng.uniform(0.2, 1.5))
    deployment.start(name)
    return name, at


def sigterm_a_processor(deployment: Deployment, rng: random.Random) -> tuple[str, float]:
    """SIGTERM of a processor, which drains within its grace and exits 0; (its name, when)."""
    name = rng.choice(["p1", "p2"])
    proc = deployment.procs[name]
    at = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    deployment.start(name)
    return name, at


def restart_redis(redis: RedisServer, rng: random.Random) -> tuple[float, float]:
    at = time.monotonic()
    redis.kill()
    time.sleep(rng.uniform(0.3, 3.0))
    redis.start()
    return at, time.monotonic() + LEASE_TTL


def fence_windows(deployment: Deployment) -> list[tuple[float, float]]:
    """The time around each lease fence the processes logged, on the monotonic clock."""
    offset = time.time() - time.monotonic()
    windows = []
    for line in deployment.log_lines("before the lease can lapse"):
        at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp() - offset
        windows.append((at - LEASE_TTL, at + LEASE_TTL))
    return windows


def repeated_unexplained(origin: CountingOrigin, deaths: dict[str, list[float]],
                         windows: list[tuple[float, float]]) -> list[str]:
    """Paths requested again although nothing could have lost the earlier request's outcome.

    A request's outcome is recorded after its body ends (the file stored, the outcome
    settled), so the request is at risk from its start until the job is requested again:
    the process that made it may die meanwhile (a kill, a SIGTERM's drain), or Redis may
    be out or a lease fenced (``windows``). The death of another process explains nothing."""
    requests: dict[str, list[tuple[float, str]]] = {}
    for (path, start, _end), process in zip(origin.served, origin.served_to):
        requests.setdefault(path, []).append((start, process))
    unexplained = []
    for path, made in requests.items():
        made.sort()
        for (start, process), (again, _) in zip(made, made[1:]):
            died = any(start <= at <= again for at in deaths.get(process, ()))
            outage = any(start <= w_end and w_start <= again for w_start, w_end in windows)
            if not (died or outage):
                unexplained.append(path)
    return sorted(set(unexplained))


def test_a_repeat_is_explained_only_by_its_own_process_dying_or_an_outage_between():
    origin = SimpleNamespace(served=[("/a/1", 1.0, 3.0), ("/a/1", 5.0, 7.0), ("/b/2", 1.0, 3.0)],
                             served_to=["p1", "p2", "p1"])
    assert repeated_unexplained(origin, {}, []) == ["/a/1"]
    assert repeated_unexplained(origin, {"p2": [4.0], "p1": [0.5, 5.5]}, []) == ["/a/1"]  # not between
    assert repeated_unexplained(origin, {"p1": [4.0]}, []) == []  # p1 died after its body ended: lost
    assert repeated_unexplained(origin, {}, [(4.5, 6.0)]) == []  # Redis was out before the repeat
    assert repeated_unexplained(origin, {}, [(5.5, 6.0)]) == ["/a/1"]
