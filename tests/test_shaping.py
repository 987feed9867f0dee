"""Aggregation traffic shaping, unit by unit: the GCRA of take.lua, the throttle
and the adaptive limit of settle.lua, an operator's pause, on a real Redis
with a driven clock (every script takes ``now`` from its caller); the job
fields and Retry-After in pure functions; the routes through the API."""

from __future__ import annotations

import email.utils

import pytest

from gdl import shaping
from gdl import store as keys
from gdl.download import parse_retry_after
from gdl.errors import DownloadTimeout, HTTPStatusError, ValidationError
from gdl.job import Job, JobState, new_id
from gdl.store import AggrState, DownloadOutcome
from gdl.submission import shaping_fields
from tests.samples import take_holding_lease

NOW = 1_700_000_000_000
OWNER = "host:1:abc"
WINDOW_MS = 2000


def make_job(aggr: str = "shop", **fields) -> Job:
    base = dict(id=new_id(), url="http://example.com/a.png", aggr_id=aggr, aggr_limit=16,
                callback_type="http", callback_dst="http://cb.example.com/")
    base.update(fields)
    return Job(**base)


def enqueue(store, n: int, *, now: int = NOW, aggr: str = "shop", **fields) -> list[Job]:
    return [store.enqueue(make_job(aggr, **fields), now=now) for _ in range(n)]


def take(store, now: int, count: int = 16, aggr: str = "shop", busy: int = 0):
    return take_holding_lease(store, aggr, OWNER, now=now, count=count, deadline=now + 60_000, busy=busy)


def record(store, aggr: str = "shop") -> dict:
    return store.redis.hgetall(keys.aggr_key(aggr))


def put_back(store, job: Job, now: int, **signal):
    """A download of ``job`` settled as a throttled retry (``hold``) or with another signal."""
    sent = shaping.signal(now, busy=1, window_ms=WINDOW_MS, **signal)
    return store.retry_download(job, OWNER, due=now, now=now, log_entry=None, signal=sent,
                                throttled=1 if signal.get("hold") else 0)


def succeed(store, job: Job, now: int, busy: int = 1):
    sent = shaping.signal(now, busy=busy, window_ms=WINDOW_MS, ok=True)
    return store.finish_download(job, OWNER, state=JobState.SUCCEEDED, outcome=DownloadOutcome(1), now=now,
                                 forget_at=now + 1000, log_entry={}, signal=sent)


# ------------------------------------------------------------------ rate (GCRA in take.lua)

def test_burst_3_rate_2_admits_3_then_one_every_half_second(store):
    enqueue(store, 6, aggr_rate=2.0, aggr_burst=3)
    first = take(store, NOW)
    assert (len(first.jobs), first.gate, first.next_due) == (3, "rate", NOW + 500)
    assert store.redis.zscore(keys.DUE_INDEX, "shop") == NOW + 500  # no scanner claims it early
    early = take(store, NOW + 499)
    assert (len(early.jobs), early.next_due) == (0, NOW + 500)
    on_time = take(store, NOW + 500)
    assert (len(on_time.jobs), on_time.next_due) == (1, NOW + 1000)
    # Late by 2 s: the idle time refills the burst, never more than it.
    late = take(store, NOW + 3000)
    assert len(late.jobs) == 2  # all that is left


def test_every_window_holds_at_most_burst_plus_rate_times_width(store):
    enqueue(store, 60, aggr_rate=5.0, aggr_burst=2)
    starts: list[int] = []
    now = NOW
    while len(starts) < 60:
        taken = take(store, now, count=4)
        starts += [now] * len(taken.jobs)
        now = taken.next_due if taken.next_due and taken.next_due > now else now + 37
    for width in (200, 1000, 5000):
        most = max(sum(1 for s in starts if t <= s < t + width) for t in starts)
        assert most <= 2 + 5 * width // 1000
    # No idle waste: 60 starts, 2 at once then one each 200 ms.
    assert starts[-1] - starts[0] == (60 - 2) * 200


def test_a_drained_and_refilled_aggregation_gets_no_second_burst(store):
    enqueue(store, 3, aggr_rate=1.0, aggr_burst=3)
    assert len(take(store, NOW).jobs) == 3
    store.release("shop", OWNER, state_ttl_ms=60_000)
    enqueue(store, 3, now=NOW + 10)  # a Go client: no aggr_rate, the rate is kept
    # The due index waits for the next start the GCRA allows, one second after the burst.
    assert store.redis.zscore(keys.DUE_INDEX, "shop") == NOW + 1000
    assert take(store, NOW + 10).jobs == []
    assert len(take(store, NOW + 1000).jobs) == 1


def test_a_start_given_back_is_exactly_the_take_without_that_job(store):
    """refund_start.lua (a job answered from a stored copy made no request): the GCRA
    time becomes what the take would have written for one job fewer."""
    enqueue(store, 4, aggr_rate=2.0, aggr_burst=1)
    first = take(store, NOW, count=1)
    assert (len(first.jobs), first.rate_tat) == (1, str((NOW + 500) * 1000))
    assert store.refund_start("shop", now=NOW + 10, expected=first.rate_tat) == ""  # back to idle
    assert store.redis.get(keys.rate_key("shop")) is None
    again = take(store, NOW + 10, count=1)  # the next start is due at once, not at NOW + 500
    assert (len(again.jobs), again.rate_tat) == (1, str((NOW + 510) * 1000))


def test_a_start_is_not_given_back_once_another_take_came_between(store):
    enqueue(store, 4, aggr_rate=2.0, aggr_burst=2)
    first = take(store, NOW, count=1)
    second = take(store, NOW + 100, count=1)  # admitted under the first one's charge
    assert second.rate_tat != first.rate_tat
    assert store.refund_start("shop", now=NOW + 120, expected=first.rate_tat) is None
    assert store.redis.get(keys.rate_key("shop")) == second.rate_tat
    # The latest take's own charge can be given back: one period off.
    assert store.refund_start("shop", now=NOW + 120, expected=second.rate_tat) == str((NOW + 500) * 1000)


def test_omitting_aggr_rate_keeps_it_and_zero_clears_it(store):
    enqueue(store, 1, aggr_rate=0.5, aggr_burst=2)
    enqueue(store, 1, aggr_limit=4)
    assert (record(store)["rate"], record(store)["burst"], record(store)["limit"]) == ("0.5", "2", "4")
    enqueue(store, 1, aggr_rate=0.0)
    assert "rate" not in record(store) and record(store)["burst"] == "2"
    assert len(take(store, NOW).jobs) == 3  # no rate: everything due is taken


# ------------------------------------------------------------------ throttle (settle.lua)

def test_a_throttle_pauses_the_aggregation_and_holds_the_job_until_its_end(store):
    jobs = enqueue(store, 4, aggr_limit=4)
    held = take(store, NOW, count=2).jobs
    assert put_back(store, held[0], NOW + 10, throttle=2000, congested=True, hold=True)
    assert record(store)["paused_until"] == str(NOW + 2010)
    assert store.redis.zscore(keys.queue_key("shop"), held[0].id) == NOW + 2010
    assert store.get_job(held[0].id).status.throttled_attempts == 1
    assert store.get_job(held[0].id).status.attempts == 0  # not one of its max_retries
    paused = take(store, NOW + 20, busy=1)
    assert (paused.jobs, paused.gate, paused.next_due) == ([], "throttled", NOW + 2010)
    assert store.redis.zscore(keys.DUE_INDEX, "shop") == NOW + 2010
    # A concurrent 429 saying 1 s does not shorten it; one saying 3 s extends it.
    assert put_back(store, held[1], NOW + 30, throttle=1000, hold=True)
    assert record(store)["paused_until"] == str(NOW + 2010)
    assert store.redis.zscore(keys.queue_key("shop"), held[1].id) == NOW + 2010
    [again] = take(store, NOW + 2010, count=1).jobs
    assert put_back(store, again, NOW + 2020, throttle=3000, hold=True)
    assert record(store)["paused_until"] == str(NOW + 5020)
    assert len(take(store, NOW + 5020).jobs) == len(jobs)  # then everything runs


def test_header_less_429s_pause_1_2_4_s_growing_once_per_pause_and_a_2xx_resets(store):
    jobs = enqueue(store, 6)
    held = take(store, NOW, count=6).jobs
    now = NOW
    ends = []
    for job in held[:3]:
        put_back(store, job, now, throttle=-1, hold=True)
        ends.append(int(record(store)["paused_until"]) - now)
        now = int(record(store)["paused_until"])
    assert ends == [1000, 2000, 4000]
    # A 429 within a pause neither extends it nor grows the streak.
    put_back(store, held[3], now - 100, throttle=-1, hold=True)
    assert int(record(store)["paused_until"]) == now and record(store)["streak"] == "3"
    succeed(store, held[4], now + 5)
    assert "streak" not in record(store)
    put_back(store, held[5], now + 10, throttle=-1, hold=True)
    assert int(record(store)["paused_until"]) == now + 10 + 1000
    assert len(jobs) == 6


def test_a_503_without_retry_after_is_congestion_not_a_throttle():
    assert shaping.throttle_pause_ms(HTTPStatusError(503), max_retry_after=3600) is None
    assert shaping.throttle_pause_ms(HTTPStatusError(503, retry_after=2.0), max_retry_after=3600) == 2000
    assert shaping.throttle_pause_ms(HTTPStatusError(429), max_retry_after=3600) == -1
    assert shaping.throttle_pause_ms(HTTPStatusError(429, retry_after=86400.0), max_retry_after=3600) == 3_600_000
    assert shaping.throttle_pause_ms(HTTPStatusError(500, retry_after=5.0), max_retry_after=3600) is None
    assert shaping.is_congestion(HTTPStatusError(504)) and shaping.is_congestion(DownloadTimeout("slow"))
    assert not shaping.is_congestion(HTTPStatusError(500))


def test_retry_after_is_seconds_or_an_http_date_and_garbage_is_absent():
    now = 1_700_000_000.0
    assert parse_retry_after("2", now=now) == 2.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == 30.0
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0  # past: no pause
    assert parse_retry_after("soon", now=now) is None
    assert parse_retry_after("-5", now=now) is None
    day = HTTPStatusError(429, retry_after=parse_retry_after("86400", now=now))
    assert shaping.throttle_pause_ms(day, max_retry_after=3600) == 3_600_000  # clamped


# ------------------------------------------------------------------ adaptive limit

def test_eight_simultaneous_429s_cut_the_adaptive_limit_once(store):
    enqueue(store, 16, aggr_adaptive=True)
    held = take(store, NOW).jobs
    assert len(held) == 16
    for job in held[:8]:
        put_back(store, job, NOW + 100, congested=True)
    assert float(record(store)["eff"]) == 8.0
    for job in held[8:10]:  # the next window: one more cut
        put_back(store, job, NOW + 100 + WINDOW_MS, congested=True)
    assert float(record(store)["eff"]) == 4.0
    capped = take(store, NOW + 200 + WINDOW_MS, busy=6)
    assert (capped.jobs, capped.gate, capped.cap, capped.limit) == ([], "capped", 4, 16)


def test_the_adaptive_limit_grows_only_in_use_and_never_above_aggr_limit(store):
    enqueue(store, 40, aggr_limit=4, aggr_adaptive=True)
    held = take(store, NOW).jobs
    put_back(store, held[0], NOW, congested=True)
    assert float(record(store)["eff"]) == 2.0
    succeed(store, held[1], NOW + 1, busy=0)  # the limit is not in use: not grown
    assert float(record(store)["eff"]) == 2.0
    for i, job in enumerate(held[2:4]):
        succeed(store, job, NOW + 2 + i, busy=2)
    assert float(record(store)["eff"]) == pytest.approx(2.9, abs=0.01)  # 2 + 1/2 + 1/2.5
    now = NOW + 10
    while len(held) < 40:
        more = take(store, now, busy=0).jobs
        for job in more:
            succeed(store, job, now, busy=4)
        held += more
        now += 1
        assert float(record(store)["eff"]) <= 4
    assert float(record(store)["eff"]) == 4.0


def test_without_aggr_adaptive_the_limit_stays_the_go_services(store):
    enqueue(store, 5, aggr_limit=5)
    held = take(store, NOW).jobs
    for job in held:
        put_back(store, job, NOW, congested=True)
    assert "eff" not in record(store)
    assert take(store, NOW, busy=0).cap == 5


# ------------------------------------------------------------------ operator pause

def test_a_paused_aggregation_takes_nothing_keeps_its_record_and_resumes(store):
    enqueue(store, 2)
    store.pause_aggregation("shop")
    paused = take(store, NOW)
    assert (paused.jobs, paused.gate, paused.next_due) == ([], "paused", None)
    assert store.redis.zscore(keys.DUE_INDEX, "shop") is None
    enqueue(store, 1)  # still accepted, still not due
    assert store.redis.zscore(keys.DUE_INDEX, "shop") is None
    view = store.aggregation("shop", now=NOW)
    assert (view.state, view.queued) == (AggrState.PAUSED, 3)
    assert store.pending_aggregations() == [("shop", 3)]
    store.redis.delete(keys.queue_key("shop"))
    store.release("shop", OWNER, state_ttl_ms=1000)
    assert store.redis.pttl(keys.aggr_key("shop")) == -1  # kept until resumed
    assert store.resume_aggregation("shop", now=NOW, state_ttl_ms=1000)
    assert 0 < store.redis.pttl(keys.aggr_key("shop")) <= 1000
    assert not store.resume_aggregation("never-seen", now=NOW, state_ttl_ms=1000)


def test_resume_restores_the_due_index_from_the_queue_head(store):
    enqueue(store, 2)
    store.pause_aggregation("shop")
    assert store.resume_aggregation("shop", now=NOW + 5, state_ttl_ms=1000)
    assert store.redis.zscore(keys.DUE_INDEX, "shop") == NOW
    assert len(take(store, NOW + 5).jobs) == 2


# ------------------------------------------------------------------ job fields

@pytest.mark.parametrize("field,value", [
    ("aggr_rate", -1), ("aggr_rate", "2"), ("aggr_rate", True), ("aggr_rate", 1001), ("aggr_rate", None),
    ("aggr_burst", 0), ("aggr_burst", 1.5), ("aggr_burst", 1001), ("aggr_burst", "3"),
    ("aggr_burst", float("inf")), ("aggr_burst", float("nan")),  # json.loads reads Infinity and NaN
    ("aggr_adaptive", "yes"), ("aggr_adaptive", 1), ("aggr_adaptive", None),
])
def test_bad_shaping_fields_are_refused_naming_the_field(field, value):
    with pytest.raises(ValidationError) as caught:
        shaping_fields({field: value})
    assert caught.value.field == field


def test_shaping_fields_left_out_are_none_and_round_trip_through_the_job_hash():
    assert shaping_fields({}) == shaping.ShapingFields()
    job = make_job(aggr_rate=0.2, aggr_burst=4, aggr_adaptive=False)
    again = Job.from_hash(job.to_hash())
    assert (again.aggr_rate, again.aggr_burst, again.aggr_adaptive) == (0.2, 4, False)
    plain = Job.from_hash(make_job().to_hash())
    assert (plain.aggr_rate, plain.aggr_burst, plain.aggr_adaptive) == (None, None, None)
