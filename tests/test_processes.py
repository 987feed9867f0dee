"""gdl as real processes: crashes, shutdown and several processes on one Redis.

The test process serves the downloads and receives the callbacks (loopback
servers on its own gevent hub); gdl runs as subprocesses that are signalled
and killed for real.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter

import pytest

from gdl import store as keys
from gdl.store import Store
from tests.conftest import wait_until
from tests.servers import CallbackReceiver, HoldServer

FAST = {"lease_ttl": 2, "scan_interval": 0.3, "pool_idle_timeout": 1}


def states(store: Store, ids: list[str], field: str = "state") -> dict[str, int]:
    counts: dict[str, int] = {}
    for job_id in ids:
        value = store.redis.hget(keys.job_key(job_id), field) or "gone"
        counts[value] = counts.get(value, 0) + 1
    return counts


def temp_files(cfg) -> list[str]:
    return os.listdir(cfg.processor.storage_dir) if os.path.isdir(cfg.processor.storage_dir) else []


@pytest.fixture
def hold_server():
    server = HoldServer(hold=2.0, body=os.urandom(200_000), midway=True)
    yield server
    server.stop()


def enqueue_many(api, server: HoldServer, aggrs: dict[str, int], per_limit: int = 1, callback: str = "") -> list[str]:
    ids = []
    for aggr, limit in aggrs.items():
        for n in range(limit * per_limit):
            ids.append(api.enqueue(url=server.url(f"/hold/{aggr}/{n}"), aggr_id=aggr, aggr_limit=limit,
                                   callback_url=callback or "http://127.0.0.1:9/cb"))
    return ids


def test_sigkill_with_50_downloads_in_flight_loses_nothing(run_service, make_cfg, gdl_process, hold_server,
                                                           store):
    cfg = make_cfg(processor=FAST)
    api = run_service(("api",), cfg=cfg)
    first = gdl_process(cfg, "processor")
    ids = enqueue_many(api, hold_server, {f"k{i}": 10 for i in range(5)})
    wait_until(lambda: sum(hold_server.current.values()) == 50, timeout=15)
    wait_until(lambda: len(temp_files(cfg)) == 50, timeout=10)  # partial downloads on disk
    first.kill()
    assert states(store, ids) == {"in_flight": 50}
    hold_server.hold = 0.05
    gdl_process(cfg, "processor", name="second.yaml")
    wait_until(lambda: states(store, ids) == {"succeeded": 50}, timeout=30)
    assert all(store.get_job(job_id).status.attempts == 1 for job_id in ids)
    assert temp_files(cfg) == []
    assert store.redis.zcard(keys.INFLIGHT["downloads"]) == 0


def test_sigterm_puts_work_still_in_flight_after_the_grace_back_and_exits_0_within_10s(
        make_cfg, gdl_process, hold_server, store, run_service):
    hold_server.hold = 60
    cfg = make_cfg(processor={**FAST, "shutdown_grace": 1})
    api = run_service(("api",), cfg=cfg)
    proc = gdl_process(cfg, "processor")
    ids = enqueue_many(api, hold_server, {"t1": 4, "t2": 6})
    wait_until(lambda: sum(hold_server.current.values()) == 10, timeout=15)
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 10
    assert states(store, ids) == {"queued": 10}
    assert {store.get_job(job_id).status.attempts for job_id in ids} == {0}
    assert store.redis.zcard(keys.INFLIGHT["downloads"]) == 0
    assert store.lease_holder("t1") is None and store.lease_holder("t2") is None
    assert store.redis.zcard(keys.PROCESSORS) == 0  # no longer counted in fair claims
    assert sorted(store.due_aggregations(keys.now_ms())) == ["t1", "t2"]
    assert temp_files(cfg) == []
    assert "letting 10 job(s) in flight finish, for up to 1s" in proc.output()
    assert "grace over, interrupting 10 job(s) and putting them back" in proc.output()


def test_two_processors_together_never_pass_the_limit(make_cfg, gdl_process, run_service, store):
    server = HoldServer(hold=0.2)
    try:
        cfg = make_cfg(processor=FAST)
        api = run_service(("api",), cfg=cfg)
        gdl_process(cfg, "processor", name="one.yaml")
        gdl_process(cfg, "processor", name="two.yaml")
        limits = {f"p{i}": 1 + i % 5 for i in range(10)}
        ids = enqueue_many(api, server, limits, per_limit=4)
        wait_until(lambda: states(store, ids) == {"succeeded": len(ids)}, timeout=40)
        assert all(server.peak[aggr] <= limit for aggr, limit in limits.items()), dict(server.peak)
        assert sum(server.total.values()) == len(ids)
    finally:
        server.stop()


def test_a_processor_that_joins_gets_the_new_aggregations_until_shares_are_even(make_cfg, gdl_process,
                                                                                run_service, store):
    server = HoldServer(hold=30)
    try:
        cfg = make_cfg(processor=FAST)
        api = run_service(("api",), cfg=cfg)
        gdl_process(cfg, "processor", name="first.yaml")
        enqueue_many(api, server, {f"old{i}": 2 for i in range(6)})
        wait_until(lambda: sum(server.current.values()) == 12, timeout=15)
        [first] = set(store.redis.hvals(keys.ACTIVE))
        gdl_process(cfg, "processor", name="second.yaml")
        wait_until(lambda: store.redis.zcard(keys.PROCESSORS) == 2, timeout=15)
        # The first holds 12 slots: over its share of every one of these (12 > (12 + 8 + 2) / 2 at the last).
        enqueue_many(api, server, {f"new{i}": 2 for i in range(5)})
        wait_until(lambda: sum(server.current.values()) == 22, timeout=15)
        owners = Counter(store.redis.hvals(keys.ACTIVE))
        [second] = set(owners) - {first}
        assert owners == {first: 6, second: 5}
        assert store.redis.hgetall(keys.PROCESSOR_SLOTS) == {first: "12", second: "10"}
    finally:
        server.stop()


def test_sigkill_of_the_notifier_with_50_callbacks_in_flight(make_cfg, gdl_process, run_service, store):
    receiver = CallbackReceiver(hold=3.0)
    files = HoldServer(hold=0.0)
    try:
        cfg = make_cfg(processor=FAST, notifier={"concurrency": 50})
        api = run_service(("api", "processor"), cfg=cfg)
        notifier = gdl_process(cfg, "notifier")
        ids = enqueue_many(api, files, {f"n{i}": 10 for i in range(5)}, callback=receiver.url("/cb"))
        wait_until(lambda: receiver.current == 50, timeout=20)
        notifier.kill()
        receiver.hold = 0.0
        gdl_process(cfg, "notifier", name="notifier2.yaml")
        wait_until(lambda: states(store, ids, "callback_state") == {"delivered": 50}, timeout=30)
        assert set(receiver.by_job()) == set(ids)
    finally:
        receiver.stop()
        files.stop()


def test_gdl_will_not_start_beside_processes_of_the_earlier_key_layout(make_cfg, gdl_process, store):
    store.redis.hset("gdl:heartbeats", "old:1", json.dumps({"process": "old:1", "at": keys.now_ms()}))
    store.redis.hset("gdl:job:abc", "url", "http://example.com/")
    try:
        proc = gdl_process(make_cfg(), "processor")
        assert proc.wait(timeout=20) == 2
        assert proc.output().strip().splitlines() == [
            "gdl: redis.url: gdl processes of an earlier version still run on this Redis (old:1): "
            "stop them all, then start this version"]
        assert store.redis.hget("gdl:job:abc", "url") == "http://example.com/"  # nothing renamed under them
    finally:  # tests that use the session's Redis without emptying it must not find a live old process
        store.redis.delete("gdl:heartbeats", "gdl:job:abc")
