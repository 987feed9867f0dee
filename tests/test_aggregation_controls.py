"""Aggregation traffic shaping and an operator's pause, end to end: the API,
the processor (in this process, or as real processes killed for real) and a
loopback origin that logs when each request of each aggregation arrived
(tests/origin.py)."""

from __future__ import annotations

import json
import logging
import math
import signal
import subprocess
import sys
import time

import pytest

from gdl import store as keys
from gdl.clock import RedisClock
from gdl.job import Job, new_id
from gdl.store import now_ms
from tests.conftest import config_file, make_config, wait_until
from tests.origin import CountingOrigin
from tests.test_fencing import processor_cfg

CALLBACK = "http://127.0.0.1:9/cb"  # never called: no notifier in these tests
FAST = {"lease_ttl": 2, "scan_interval": 0.3, "pool_idle_timeout": 1}
# Requests reach the origin a little after their take: a window this much
# narrower than w is what the origin's log can show of a window of w.
JITTER = 0.03


@pytest.fixture
def origin():
    server = CountingOrigin(duration=0.05, size=2048, ticks=1)
    yield server
    server.stop()


def enqueue(api, origin, aggr: str, n: int, limit: int, **fields) -> list[str]:
    return [api.enqueue(url=origin.url(f"/{aggr}/{i}"), aggr_id=aggr, aggr_limit=limit, callback_url=CALLBACK,
                        **fields) for i in range(n)]


def states(store, ids: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job_id in ids:
        value = store.redis.hget(keys.job_key(job_id), "state") or "gone"
        counts[value] = counts.get(value, 0) + 1
    return counts


def assert_rate_holds(origin, aggr: str, rate: float, burst: int) -> None:
    for width in (0.5, 1.0, 3.0):
        assert origin.most_in_window(aggr, width - JITTER) <= burst + math.floor(rate * width), width


def processes_serving(origin, aggr: str) -> set[str]:
    """The processes (their X-Gdl-Process header) that started requests of ``aggr``."""
    return {name for group, serving in origin.overlaps if group == aggr for name in serving}


# ------------------------------------------------------------------ rate

def test_a_rate_holds_in_every_window_across_two_processors_and_a_kill_9(tmp_path, redis_server, gdl_process,
                                                                           run_service, store, origin):
    api = run_service(("api",), cfg=make_config(tmp_path, redis_server.url))
    processors = {name: gdl_process(processor_cfg(tmp_path, redis_server.url, name), "processor", name=f"{name}.yaml")
                  for name in ("p0", "p1")}
    ids = enqueue(api, origin, "r", 40, limit=8, aggr_rate=4, aggr_burst=2)
    wait_until(lambda: origin.total["r"] >= 12, timeout=20)
    holder = store.lease_holder("r")
    [victim] = [name for name, p in processors.items() if f":{p.process.pid}:" in holder]
    processors[victim].kill()
    at_kill = origin.total["r"]
    wait_until(lambda: states(store, ids) == {"succeeded": 40}, timeout=60)
    assert at_kill < 40 <= origin.total["r"]
    assert processes_serving(origin, "r") == {"p0", "p1"}  # the survivor took the lease over
    assert_rate_holds(origin, "r", rate=4, burst=2)


def test_a_rate_wastes_no_time_n_jobs_take_about_n_minus_burst_over_rate(run_service, store, origin):
    api = run_service(("api", "processor"), processor=FAST)
    ids = enqueue(api, origin, "w", 21, limit=4, aggr_rate=10, aggr_burst=1)
    wait_until(lambda: states(store, ids) == {"succeeded": 21}, timeout=20)
    starts = sorted(origin.starts["w"])
    # (21 - 1) / 10 = 2 s: never less (the rate), and not much more (no polling, no
    # rescheduling); the upper bound is generous for a loaded machine.
    assert 2.0 - JITTER <= starts[-1] - starts[0] <= 3.5
    assert_rate_holds(origin, "w", rate=10, burst=1)


# ------------------------------------------------------------------ the origin says slow down

def test_a_429_with_retry_after_pauses_its_aggregation_while_another_on_the_origin_goes_on(run_service, make_cfg,
                                                                                           store):
    refused: list[float] = []

    def answer(group: str, _current: int):
        if group == "a" and not refused:
            refused.append(time.monotonic())
            return 429, {"Retry-After": "2"}
        return None

    origin = CountingOrigin(duration=0.2, size=2048, ticks=4, answer=answer)
    try:
        cfg = make_cfg(processor=FAST)
        api = run_service(("api",), cfg=cfg)
        a = enqueue(api, origin, "a", 10, limit=4, max_retries=0)
        b = enqueue(api, origin, "b", 30, limit=2, max_retries=0)
        run_service(("processor",), cfg=cfg)  # after the enqueues: its first take of "a" is 4 jobs
        wait_until(lambda: states(store, a + b) == {"succeeded": 40}, timeout=30)
        [at] = refused
        # The first take started 4 requests at once, the refused one first; after the 429
        # nothing more of "a" for 2 s (a slot freed by the 429 is not refilled meanwhile).
        assert sum(1 for s in origin.starts["a"] if s < at + 2.0 - 0.01) == 4, sorted(origin.starts["a"])
        assert sum(1 for s in origin.starts["b"] if at < s < at + 2.0) >= 4  # b went on meanwhile
        assert origin.refused["a"] == 1 and origin.total["a"] == 11
        throttled = [store.get_job(i).status for i in a if store.get_job(i).status.throttled_attempts]
        assert [(s.throttled_attempts, s.attempts) for s in throttled] == [(1, 1)]
    finally:
        origin.stop()


def test_adaptive_concurrency_settles_below_double_what_the_origin_takes(run_service, store):
    refusals: list[bool] = []  # per arrival: refused or not

    def answer(_group: str, current: int):
        refusals.append(current > 3)
        return (429, {}) if current > 3 else None

    origin = CountingOrigin(duration=0.3, size=2048, ticks=3, answer=answer)
    try:
        api = run_service(("api", "processor"), processor={**FAST, "aimd_window": 0.5})
        ids = enqueue(api, origin, "ad", 60, limit=16, aggr_adaptive=True, max_retries=0)
        wait_until(lambda: states(store, ids) == {"succeeded": 60}, timeout=60)
        view = api.get("/aggregations/ad").json()
        assert view["limit"] == 16 and 1 <= view["effective_limit"] <= 6
        assert origin.peak["ad"] <= 16
        late = refusals[len(refusals) // 2:]
        assert sum(late) <= len(late) // 4, refusals  # 429s have become rare
    finally:
        origin.stop()


def test_eight_simultaneous_429s_cut_the_adaptive_limit_once(run_service, make_cfg, store):
    arrivals: list[int] = []

    def answer(_group: str, _current: int):
        arrivals.append(1)
        return (429, {"Retry-After": "3"}) if len(arrivals) <= 8 else None

    # The served half outlasts the look below: no success can grow the limit before it.
    origin = CountingOrigin(duration=4, size=2048, ticks=4, answer=answer)
    try:
        cfg = make_cfg(processor={**FAST, "aimd_window": 2})
        api = run_service(("api",), cfg=cfg)
        ids = enqueue(api, origin, "e", 16, limit=16, aggr_adaptive=True)
        run_service(("processor",), cfg=cfg)  # after the enqueues: one take starts all 16 at once
        wait_until(lambda: sum(store.get_job(i).status.throttled_attempts for i in ids) == 8, timeout=5)
        view = api.get("/aggregations/e").json()
        # One cut, 16 -> 8, not eight (16 -> 1): they all came within one aimd_window.
        assert (view["state"], view["limit"], view["effective_limit"]) == ("throttled", 16, 8), view
        assert origin.total["e"] == 16 and origin.refused["e"] == 8 and origin.completed["e"] == 0
        metrics = api.get("/metrics").text
        assert 'gdl_aggr_effective_limit{aggr="e"} 8.0' in metrics and "gdl_aggregations_throttled 1.0" in metrics
        wait_until(lambda: states(store, ids) == {"succeeded": 16}, timeout=30)
    finally:
        origin.stop()


# ------------------------------------------------------------------ operator pause

def test_a_pause_stops_new_starts_survives_restarts_and_resume_restarts_work(tmp_path, redis_server, run_service,
                                                                           gdl_process, store):
    origin = CountingOrigin(duration=0.3, size=2048, ticks=3)
    try:
        api = run_service(("api",), cfg=make_config(tmp_path, redis_server.url))

        def processor(name: str):
            return gdl_process(processor_cfg(tmp_path, redis_server.url, name), "processor", name=f"{name}.yaml")

        first = [processor("one"), processor("two")]
        ids = enqueue(api, origin, "p", 30, limit=2)
        enqueue(api, origin, "q", 400, limit=1)  # the other aggregation on the origin: it keeps going
        wait_until(lambda: origin.total["p"] >= 2, timeout=15)
        paused = api.post("/aggregations/p/pause")
        paused_at = time.monotonic()
        in_flight = {f"/p/{n}" for n, f in enumerate(store.job_fields(ids, "state")) if f["state"] == "in_flight"}
        assert paused.status_code == 200 and paused.json()["state"] == "paused"
        assert api.post("/download", {"url": origin.url("/p/late"), "aggr_id": "p", "aggr_limit": 2,
                                      "callback_url": CALLBACK}).status_code == 201
        wait_until(lambda: origin.current["p"] == 0)  # downloads in flight finish
        seen = origin.total["p"]
        q_then = origin.total["q"]
        wait_until(lambda: origin.total["q"] >= q_then + 3, timeout=15)
        assert origin.total["p"] == seen  # nothing new started, while q went on
        # What reached the origin after the 200 had been taken before it (a request can
        # follow its take by a few ms).
        assert {path for path, start, _ in origin.served if path.startswith("/p/") and start > paused_at} <= in_flight
        assert 'gdl_aggregations_paused 1.0' in api.get("/metrics").text

        # Both processes go, one killed -9 and one stopped; two new ones start on the same Redis.
        first[0].kill()
        first[1].signal(signal.SIGTERM)
        assert first[1].wait(timeout=15) == 0
        restarted = [processor("three"), processor("four")]
        q_then = origin.total["q"]
        # q's lease, held by a killed process, lapses (lease_ttl 2 s) and a new process takes it
        # over; by the time it has started three requests both new processes have scanned
        # several times (scan_interval 0.3 s) and found p paused.
        wait_until(lambda: origin.total["q"] >= q_then + 3 and processes_serving(origin, "q") & {"three", "four"},
                   timeout=30)
        wait_until(lambda: all(f":{p.process.pid}:" in " ".join(store.redis.zrange(keys.PROCESSORS, 0, -1))
                               for p in restarted), timeout=15)
        assert origin.total["p"] == seen
        # p's pool may have been the killed process's: its lease lapses within lease_ttl of the
        # kill (q's may have been the stopped one's, released at once, so q's hand-over says
        # nothing of p's). A new process that claimed the paused p would renew the lease and
        # this wait would fail.
        wait_until(lambda: store.lease_holder("p") is None, timeout=10)
        assert store.redis.zscore(keys.DUE_INDEX, "p") is None and origin.total["p"] == seen
        view = api.get("/aggregations/p").json()
        assert view["state"] == "paused" and view["queued"] == 31 - seen

        resume_sent = time.monotonic()
        resumed = api.post("/aggregations/p/resume")
        resume_answered = time.monotonic()
        assert resumed.status_code == 200 and resumed.json()["state"] == "running"
        wait_until(lambda: origin.total["p"] > seen, timeout=10)
        first_start = min(s for s in origin.starts["p"] if s > resume_sent)
        delay = first_start - resume_answered  # negative: the origin saw it before the client read the 200
        print(f"resume: first request {delay * 1000:.1f} ms after the 200 ({(first_start - resume_sent) * 1000:.1f}"
              f" ms after the request was sent)")
        # The issue asks for work again within 100 ms: the resume publishes a wake that the
        # processes' scanners act on at once. 1 s is that bound with a margin for two busy
        # cores shared by several test runs; a missed wake would wait for a scan (0.3 s) or
        # for ever, and a lost one without a scan would fail the wait above.
        assert delay < 1.0
        assert processes_serving(origin, "p") & {"three", "four"}  # the new processes took it up
        wait_until(lambda: states(store, ids) == {"succeeded": 30}, timeout=30)
        assert 'gdl_aggregations_paused 0.0' in api.get("/metrics").text
    finally:
        origin.stop()


# ------------------------------------------------------------------ routes

def test_the_aggregation_routes_answer_as_the_contract_says(run_service, store):
    api = run_service(("api",))
    assert api.get("/aggregations/nowhere").status_code == 404
    assert api.post("/aggregations/nowhere/resume").status_code == 404
    paused = api.post("/aggregations/early/pause")  # not seen yet: allowed, its jobs wait
    assert paused.status_code == 200
    assert paused.json() == {"aggr_id": "early", "state": "paused", "limit": 0, "effective_limit": 0, "rate": 0.0,
                             "burst": 1, "paused_until": None, "queued": 0, "in_flight": 0}
    api.enqueue(url="http://example.com/x", aggr_id="early", aggr_limit=3, callback_url=CALLBACK, aggr_rate=0.2,
                aggr_burst=4, aggr_adaptive=True)
    view = api.get("/aggregations/early").json()
    assert (view["limit"], view["rate"], view["burst"], view["queued"], view["state"]) == (3, 0.2, 4, 1, "paused")
    assert api.post("/aggregations/early/resume").json()["state"] == "running"
    store.redis.hset(keys.aggr_key("early"), "paused_until", now_ms() + 60_000)
    view = api.get("/aggregations/early").json()
    assert view["state"] == "throttled" and view["paused_until"].endswith("Z")
    metrics = api.get("/metrics").text
    assert "gdl_aggregations_throttled 1.0" in metrics
    assert 'gdl_aggr_effective_limit{aggr="early"} 3.0' in metrics


@pytest.mark.parametrize("field,value", [("aggr_rate", -0.5), ("aggr_rate", "fast"), ("aggr_burst", 0),
                                         ("aggr_burst", 2000), ("aggr_adaptive", "true")])
def test_a_bad_shaping_field_is_a_400_naming_it_and_nothing_is_enqueued(run_service, store, field, value):
    api = run_service(("api",))
    response = api.post("/download", {"url": "http://example.com/x", "aggr_id": "bad", "aggr_limit": 1,
                                      "callback_url": CALLBACK, field: value})
    assert response.status_code == 400 and response.json()["error"].startswith(f"{field}:")
    assert store.redis.exists(keys.queue_key("bad"), keys.aggr_key("bad")) == 0


def test_every_new_mutating_route_needs_a_token_and_changes_nothing_without_one(run_service, store):
    api = run_service(("api",), security={"api_tokens": ["s3cret"]})
    auth = {"Authorization": "Bearer s3cret"}
    queued = api.post("/download", {"url": "http://127.0.0.1:9/x", "aggr_id": "t", "aggr_limit": 1,
                                    "callback_url": CALLBACK}, headers=auth).json()["id"]
    routes = [("DELETE", f"/jobs/{queued}"), ("POST", "/aggregations/t/pause"), ("POST", "/aggregations/t/resume"),
              ("DELETE", "/aggregations/t")]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            assert api.http.request(method, api.url(path), headers=headers).status_code == 401, (method, path)
    assert store.get_job(queued).status.state == "queued"
    assert store.redis.hget(keys.aggr_key("t"), "paused") is None and store.purges() == {}
    answers = [api.http.request(method, api.url(path), headers=auth) for method, path in routes]
    assert [a.status_code for a in answers] == [200, 200, 200, 202]
    assert answers[3].json() == {"aggr_id": "t", "state": "purging", "queued": 0}  # the job was cancelled first
    assert store.get_job(queued).status.state == "cancelled"


# ------------------------------------------------------------------ the clock

def test_a_process_measures_its_offset_from_redis_and_warns_once_when_skewed(store, caplog):
    clock = RedisClock(250)
    clock.measure(store)
    assert abs(clock.offset_ms) < 100  # same host: the same clock, give or take a round trip
    behind = RedisClock(250, local=lambda: now_ms() - 10_000)  # a host 10 s behind
    with caplog.at_level(logging.WARNING, logger="gdl.clock"):
        behind.measure(store)
        behind.measure(store)
    assert 9_900 < behind.offset_ms < 10_100
    assert abs(behind() - now_ms()) < 100  # what it passes to the scripts is the server's time
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "-10" in caplog.records[0].getMessage() and len(caplog.records) == 1


# ------------------------------------------------------------------ gdl aggr

def test_gdl_aggr_pauses_shows_and_resumes_an_aggregation(tmp_path, redis_server, store):
    cfg_path = config_file(tmp_path, make_config(tmp_path, redis_server.url), name="cli.yaml")
    store.enqueue(Job(id=new_id(), url="http://example.com/a", aggr_id="cli", aggr_limit=3, callback_type="http",
                      callback_dst=CALLBACK), now=now_ms())

    def gdl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gdl.cli", "--config", str(cfg_path), "aggr", *args],
                              capture_output=True, text=True, timeout=60, check=False, cwd=str(tmp_path))

    paused = gdl("pause", "cli", "--json")
    assert paused.returncode == 0 and json.loads(paused.stdout)["state"] == "paused"
    assert store.redis.zscore(keys.DUE_INDEX, "cli") is None
    shown = gdl("show", "cli")
    assert shown.returncode == 0
    assert [line.split() for line in shown.stdout.splitlines()][:4] == [
        ["aggr_id", "cli"], ["state", "paused"], ["limit", "3"], ["effective_limit", "3"]]
    resumed = gdl("resume", "cli", "--json")
    assert resumed.returncode == 0 and json.loads(resumed.stdout)["state"] == "running"
    unknown = gdl("resume", "nowhere")
    assert unknown.returncode == 1 and "aggregation nowhere is unknown" in unknown.stderr
