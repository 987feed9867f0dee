"""Leases that fence: one process at a time starts an aggregation's downloads,
across lease hand-overs, Redis restarts and shutdowns.

The origin (:class:`tests.origin.CountingOrigin`) counts the requests it is
serving per aggregation, and each gdl process names itself in a request
header, so a peak above a limit says whose requests made it.
"""

from __future__ import annotations

import random
import re
import signal
import time
from pathlib import Path

import pytest

from gdl import store as keys
from gdl.lease import Keeper
from gdl.store import Store
from tests.conftest import RedisServer, make_config, pings, wait_until
from tests.origin import CountingOrigin

FAST = {"lease_ttl": 2, "scan_interval": 0.3, "pool_idle_timeout": 1}


def processor_cfg(tmp: Path, redis_url: str, name: str, **processor):
    headers = {"User-Agent": "gdl", "X-Gdl-Process": name}
    return make_config(tmp, redis_url, processor={**FAST, "request_headers": headers, **processor})


def enqueue_all(api, origin: CountingOrigin, limits: dict[str, int], per_limit: int) -> list[str]:
    return [api.enqueue(url=origin.url(f"/{aggr}/{n}"), aggr_id=aggr, aggr_limit=limit,
                        callback_url="http://127.0.0.1:9/cb")
            for aggr, limit in limits.items() for n in range(limit * per_limit)]


def states(store: Store, ids: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job_id in ids:
        state = store.redis.hget(keys.job_key(job_id), "state") or "gone"
        counts[state] = counts.get(state, 0) + 1
    return counts


# ---------------------------------------------------------------------- the keeper, on a driven clock

class DrivenClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_keeper_fences_a_lease_once_before_it_can_lapse_unconfirmed():
    clock = DrivenClock(100.0)
    keeper = Keeper(None, "me", ttl=6, monotonic=clock)  # type: ignore[arg-type]  # no renewal is run
    fenced: list[str] = []
    keeper.on_unconfirmed = fenced.append
    keeper.hold_lease("a", 100.0)
    assert keeper.fence_at("a") == 105.0  # a sixth of the ttl before the lease's certain end
    clock.now = 104.9
    keeper.fence_unconfirmed()
    assert fenced == []
    clock.now = 105.0
    keeper.fence_unconfirmed()
    keeper.fence_unconfirmed()
    assert fenced == ["a"]
    keeper.confirm("a", 105.5)  # a take or a renewal sent at 105.5 found it held
    clock.now = 110.4
    keeper.fence_unconfirmed()
    assert fenced == ["a"]
    clock.now = 110.5
    keeper.fence_unconfirmed()
    assert fenced == ["a", "a"]
    keeper.release_lease("a")
    clock.now = 200.0
    keeper.fence_unconfirmed()
    assert fenced == ["a", "a"]


def test_a_confirmation_never_moves_a_lease_back():
    keeper = Keeper(None, "me", ttl=6, monotonic=DrivenClock(0.0))  # type: ignore[arg-type]
    keeper.hold_lease("a", 50.0)
    keeper.confirm("a", 40.0)  # a renewal sent before the claim answers after it
    keeper.confirm("b", 60.0)  # not held: ignored
    assert (keeper.fence_at("a"), list(keeper.leases)) == (55.0, ["a"])


# ---------------------------------------------------------------------- in one process

def test_a_pool_whose_lease_passed_to_another_process_takes_no_further_job(run_service, make_cfg, store):
    origin = CountingOrigin(duration=0.5, notice_disconnect=False)
    try:
        # A long ttl: no renewal runs during the test, so only the take's fence can stop the pool.
        running = run_service(("api", "processor"), processor={"lease_ttl": 60, "pool_idle_timeout": 30})
        ids = enqueue_all(running, origin, {"f": 1}, per_limit=3)
        wait_until(lambda: origin.current["f"] == 1, timeout=10)
        store.redis.set(keys.lease_key("f"), "another-process", px=60_000)
        scanner = running.service.scanner
        wait_until(lambda: "f" not in scanner.pools, timeout=10)
        assert (origin.total["f"], origin.completed["f"]) == (1, 1)
        # The finished download was not recorded (the sweep gives it to the lease's holder); the rest wait.
        assert states(store, ids) == {"in_flight": 1, "queued": 2}
        assert store.lease_holder("f") == "another-process"
    finally:
        origin.stop()


# ---------------------------------------------------------------------- real processes

@pytest.fixture
def aof_redis(tmp_path: Path):
    server = RedisServer(tmp_path / "redis", aof=True).start()
    yield server
    server.kill()


def test_two_processors_never_pass_a_limit_across_20_redis_restarts(tmp_path, aof_redis, gdl_process,
                                                                    run_service):
    rng = random.Random(21)
    origin = CountingOrigin(duration=0.6, notice_disconnect=True)
    limits = {"r1": 1, "r2": 2, "r3": 3, "r4": 1, "r5": 2, "r6": 3}
    store = Store.connect(aof_redis.url)
    try:
        api = run_service(("api",), cfg=make_config(tmp_path, aof_redis.url))
        ids = enqueue_all(api, origin, limits, per_limit=60)
        for name in ("one", "two"):
            gdl_process(processor_cfg(tmp_path, aof_redis.url, name), "processor", name=f"{name}.yaml")
        wait_until(lambda: sum(origin.current.values()) >= 8, timeout=15)
        for _ in range(20):
            # Down for 0.2 to 3.2 s against a 2 s ttl: leases survive some outages and lapse in others.
            time.sleep(rng.uniform(0.3, 1.5))
            aof_redis.kill()
            time.sleep(rng.uniform(0.2, 3.2))
            aof_redis.start()
        wait_until(lambda: pings(store), timeout=10)
        time.sleep(2.0)  # a last hand-over after the last restart
        assert origin.over(limits) == {}, [o for o in origin.overlaps if len(o[1]) > limits[o[0]]]
        assert sum(origin.completed.values()) > 20  # work went on throughout
        assert sum(states(store, ids).values()) == len(ids) and "gone" not in states(store, ids)
    finally:
        store.close()
        origin.stop()


def test_sigterm_lets_downloads_in_flight_finish_before_another_processor_takes_over(tmp_path, redis_server,
                                                                                     store, gdl_process,
                                                                                     run_service):
    # An origin that serves each request for its whole second, connection or not.
    origin = CountingOrigin(duration=1.0, notice_disconnect=False)
    try:
        api = run_service(("api",), cfg=make_config(tmp_path, redis_server.url))
        first = gdl_process(processor_cfg(tmp_path, redis_server.url, "one"), "processor", name="one.yaml")
        ids = enqueue_all(api, origin, {"d": 2}, per_limit=3)
        wait_until(lambda: origin.current["d"] == 2, timeout=15)
        gdl_process(processor_cfg(tmp_path, redis_server.url, "two"), "processor", name="two.yaml")
        wait_until(lambda: store.redis.zcard(keys.PROCESSORS) == 2, timeout=10)
        first.signal(signal.SIGTERM)
        assert first.wait(timeout=10) == 0
        wait_until(lambda: states(store, ids) == {"succeeded": 6}, timeout=20)
        assert origin.peak["d"] == 2
        assert (origin.total["d"], origin.completed["d"]) == (6, 6)  # nothing thrown away and fetched again
        assert {store.get_job(job_id).status.attempts for job_id in ids} == {1}
        assert "letting 2 job(s) in flight finish" in first.output()
        assert "grace over" not in first.output()
        # Not sniffed (no mime_type asked): no empty "()" where the type would be.
        assert re.search(r"job \w+: stored 32768 bytes in \d+ ms", first.output()), first.output()
    finally:
        origin.stop()


def test_when_the_grace_runs_out_connections_close_before_the_lease_is_released(tmp_path, redis_server,
                                                                                store, gdl_process,
                                                                                run_service):
    origin = CountingOrigin(duration=30.0, ticks=600, notice_disconnect=True)
    try:
        api = run_service(("api",), cfg=make_config(tmp_path, redis_server.url))
        first = gdl_process(processor_cfg(tmp_path, redis_server.url, "one", shutdown_grace=1), "processor",
                            name="one.yaml")
        ids = enqueue_all(api, origin, {"g": 2}, per_limit=2)
        wait_until(lambda: origin.current["g"] == 2, timeout=15)
        gdl_process(processor_cfg(tmp_path, redis_server.url, "two"), "processor", name="two.yaml")
        wait_until(lambda: store.redis.zcard(keys.PROCESSORS) == 2, timeout=10)
        started = time.monotonic()
        first.signal(signal.SIGTERM)
        assert first.wait(timeout=10) == 0
        assert time.monotonic() - started < 10
        wait_until(lambda: origin.serving["g"] == ["two", "two"], timeout=10)
        assert origin.peak["g"] == 2, origin.overlaps
        assert origin.completed["g"] == 0
        assert {store.get_job(job_id).status.attempts for job_id in ids} == {0}  # interrupted: no attempt counted
        assert "grace over, interrupting 2 job(s) and putting them back" in first.output()
    finally:
        origin.stop()
