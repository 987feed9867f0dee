"""The store's scripts against a real Redis: every move of a job is one step."""

import json
import time

import gevent
import pytest
import redis.exceptions

from gdl import store as keys
from gdl.errors import StoreUnavailable
from gdl.job import Job, JobState, new_id
from gdl.store import (
    CALLBACKS,
    DOWNLOADS,
    CallbackOutcome,
    Claim,
    ClaimOutcome,
    DownloadOutcome,
    EnqueueOutcome,
    Settled,
)
from tests.conftest import free_port
from tests.samples import take_holding_lease

CLAIMED = ClaimOutcome.CLAIMED

NOW = 1_700_000_000_000
OWNER = "host:1:abc"
OTHER = "host:2:def"
LATER = NOW + 99_000  # when jobs without a callback are forgotten


def make_job(aggr: str = "shop", **fields) -> Job:
    base = dict(id=new_id(), url="http://example.com/a.png", aggr_id=aggr, aggr_limit=3,
                callback_type="http", callback_dst="http://cb.example.com/")
    base.update(fields)
    return Job(**base)


def test_enqueue_writes_job_aggregation_queue_and_index_together(store):
    job = store.enqueue(make_job(aggr_proxy="http://proxy:3128"), now=NOW)
    assert store.get_job(job.id).url == "http://example.com/a.png"
    assert store.redis.hgetall(keys.aggr_key("shop")) == {"limit": "3", "proxy": "http://proxy:3128"}
    assert store.redis.zscore(keys.queue_key("shop"), job.id) == NOW
    assert store.redis.zscore(keys.DUE_INDEX, "shop") == NOW
    assert store.pending_aggregations() == [("shop", 1)]


def test_enqueue_draws_a_new_id_when_taken(store):
    first = store.enqueue(make_job(created_at=NOW), now=NOW)
    second = store.enqueue(make_job(id=first.id, url="http://example.com/b.png", created_at=NOW), now=NOW)
    assert second.id != first.id
    assert store.redis.zcard(keys.queue_key("shop")) == 2


def test_an_enqueue_sent_again_after_a_lost_reply_makes_no_copy(store):
    """redis-py sends a pipeline again on a new connection when the first one broke, and a
    script of it may have run already: the job then finds itself, not a taken id."""
    jobs = [make_job(created_at=NOW) for _ in range(3)]
    ids = [job.id for job in jobs]
    store.enqueue_many([(job, None) for job in jobs], now=NOW)
    again = store.enqueue_many([(job, None) for job in jobs], now=NOW)  # what the resend does
    assert [(e.outcome, e.job_id) for e in again] == [(EnqueueOutcome.CREATED, i) for i in ids]
    assert [j.id for j in jobs] == ids
    assert sorted(store.redis.zrange(keys.queue_key("shop"), 0, -1)) == sorted(ids)


def test_due_index_keeps_the_earliest_due_time(store):
    store.enqueue(make_job(), now=NOW + 500)
    store.enqueue(make_job(), now=NOW)
    store.enqueue(make_job(), now=NOW + 900)
    assert store.redis.zscore(keys.DUE_INDEX, "shop") == NOW
    assert store.due_aggregations(NOW - 1) == []
    assert store.due_aggregations(NOW) == ["shop"]


def test_take_moves_due_jobs_in_flight_and_updates_the_index(store):
    jobs = [store.enqueue(make_job(), now=NOW + i) for i in range(3)]
    taken = take_holding_lease(store, "shop", OWNER, now=NOW + 10, count=2, deadline=NOW + 5000)
    assert [j.id for j in taken.jobs] == [jobs[0].id, jobs[1].id]
    assert all(j.status.state == "in_flight" for j in taken.jobs)
    assert (taken.next_due, taken.limit) == (NOW + 2, 3)
    assert store.redis.zscore(keys.INFLIGHT[DOWNLOADS], jobs[0].id) == NOW + 5000
    assert store.redis.hget(keys.job_key(jobs[0].id), "owner") == OWNER
    assert store.redis.zscore(keys.DUE_INDEX, "shop") == NOW + 2
    last = take_holding_lease(store, "shop", OWNER, now=NOW + 10, count=5, deadline=NOW + 5000)
    assert [j.id for j in last.jobs] == [jobs[2].id]
    assert last.next_due is None
    assert store.redis.zscore(keys.DUE_INDEX, "shop") is None


def test_take_leaves_future_jobs(store):
    store.enqueue(make_job(), now=NOW + 1000)
    taken = take_holding_lease(store, "shop", OWNER, now=NOW, count=5, deadline=NOW + 5000)
    assert taken.jobs == [] and taken.next_due == NOW + 1000


def test_finish_queues_the_callback_in_one_step(store):
    job = store.enqueue(make_job(), now=NOW)
    [held] = take_holding_lease(store, "shop", OWNER, now=NOW, count=1, deadline=NOW + 5000).jobs
    assert store.finish_download(held, OWNER, now=NOW + 7, forget_at=LATER, log_entry={"outcome": "succeeded"},
                                 state=JobState.SUCCEEDED, outcome=DownloadOutcome(1, bytes=10))
    record = store.get_job(job.id)
    assert (record.status.state, record.status.callback_state, record.status.bytes) == ("succeeded", "queued", 10)
    assert store.redis.zscore(keys.CALLBACK_QUEUE, job.id) == NOW + 7
    assert store.redis.zscore(keys.INFLIGHT[DOWNLOADS], job.id) is None
    assert store.redis.hget(keys.job_key(job.id), "owner") is None
    assert store.job_log(job.id) == [{"outcome": "succeeded"}]


def test_finish_without_callback_needs_no_notifier(store):
    job = store.enqueue(make_job(callback_type="", callback_dst="", s3_bucket="b", s3_region="eu-west-1"), now=NOW)
    [held] = take_holding_lease(store, "shop", OWNER, now=NOW, count=1, deadline=NOW + 5000).jobs
    store.finish_download(held, OWNER, now=NOW, forget_at=LATER, log_entry={},
                          state=JobState.SUCCEEDED, outcome=DownloadOutcome(1))
    assert store.get_job(job.id).status.callback_state == "none"
    assert store.redis.zcard(keys.CALLBACK_QUEUE) == 0
    assert store.redis.zscore(keys.DELETIONS, job.id) == LATER


def test_settle_refuses_a_job_that_is_no_longer_ours(store):
    job = store.enqueue(make_job(), now=NOW)
    [held] = take_holding_lease(store, "shop", OWNER, now=NOW, count=1, deadline=NOW + 100).jobs
    assert store.sweep(DOWNLOADS, now=NOW + 101) == [job.id]
    [again] = take_holding_lease(store, "shop", OTHER, now=NOW + 102, count=1, deadline=NOW + 5000).jobs
    assert store.finish_download(held, OWNER, now=NOW + 103, forget_at=LATER, log_entry={},
                                 state=JobState.SUCCEEDED, outcome=DownloadOutcome(1)) is Settled.LEASE_LOST
    assert store.get_job(job.id).status.state == "in_flight"
    assert store.redis.hget(keys.job_key(job.id), "owner") == OTHER
    assert store.finish_download(again, OTHER, now=NOW + 104, forget_at=LATER, log_entry={},
                                 state=JobState.FAILED, outcome=DownloadOutcome(1))


def test_retry_reschedules_and_lowers_the_index(store):
    job = store.enqueue(make_job(), now=NOW)
    store.enqueue(make_job(), now=NOW + 10_000)
    [held] = take_holding_lease(store, "shop", OWNER, now=NOW, count=1, deadline=NOW + 100).jobs
    assert store.redis.zscore(keys.DUE_INDEX, "shop") == NOW + 10_000
    store.retry_download(held, OWNER, due=NOW + 2000, now=NOW, log_entry=None,
                         outcome=DownloadOutcome(1, error="boom"))
    record = store.get_job(job.id)
    assert (record.status.state, record.status.attempts, record.status.error) == ("queued", 1, "boom")
    assert store.redis.zscore(keys.queue_key("shop"), job.id) == NOW + 2000
    assert store.redis.zscore(keys.DUE_INDEX, "shop") == NOW + 2000


def test_settle_refuses_a_job_swept_back_to_the_same_lease_holder(store):
    job = store.enqueue(make_job(), now=NOW)
    [held] = take_holding_lease(store, "shop", OWNER, now=NOW, count=1, deadline=NOW + 100).jobs
    assert store.sweep(DOWNLOADS, now=NOW + 101) == [job.id]
    assert store.finish_download(held, OWNER, now=NOW + 103, forget_at=LATER, log_entry={},
                                 state=JobState.SUCCEEDED, outcome=DownloadOutcome(1)) is Settled.NOT_OURS
    assert store.get_job(job.id).status.state == "queued"


def test_take_is_fenced_by_the_lease(store):
    job = store.enqueue(make_job(), now=NOW)
    assert store.claim("shop", OWNER, 60_000) == Claim(CLAIMED, 3, "")
    store.redis.set(keys.lease_key("shop"), OTHER, px=60_000)  # the lease lapsed and passed to another process
    refused = store.take_downloads("shop", OWNER, now=NOW, count=3, deadline=NOW + 5000, lease_ttl_ms=60_000)
    assert (refused.lease_lost, refused.jobs) == (True, [])
    assert store.redis.zscore(keys.queue_key("shop"), job.id) == NOW  # nothing moved
    assert store.redis.zcard(keys.INFLIGHT[DOWNLOADS]) == 0
    store.redis.delete(keys.lease_key("shop"))  # lapsed, nobody claimed it yet: still refused
    assert store.take_downloads("shop", OWNER, now=NOW, count=3, deadline=NOW + 5000, lease_ttl_ms=60_000).lease_lost


def test_take_by_the_holder_extends_its_lease(store):
    store.enqueue(make_job(), now=NOW)
    assert store.claim("shop", OWNER, 1_000) == Claim(CLAIMED, 3, "")
    taken = store.take_downloads("shop", OWNER, now=NOW, count=3, deadline=NOW + 5000, lease_ttl_ms=45_000)
    assert (taken.lease_lost, len(taken.jobs)) == (False, 1)
    assert 1_000 < store.redis.pttl(keys.lease_key("shop")) <= 45_000


def test_put_back_by_a_former_lease_holder_is_refused(store):
    job = store.enqueue(make_job(), now=NOW)
    [held] = take_holding_lease(store, "shop", OWNER, now=NOW, count=1, deadline=NOW + 5000).jobs
    store.redis.set(keys.lease_key("shop"), OTHER, px=60_000)
    assert store.retry_download(held, OWNER, due=NOW, now=NOW, log_entry=None) is Settled.LEASE_LOST
    assert store.redis.zscore(keys.INFLIGHT[DOWNLOADS], job.id) == NOW + 5000  # left to the sweep


def test_an_outage_is_not_declared_over_by_a_renewal_with_nothing_to_send():
    dead = keys.Store.connect(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    with pytest.raises(StoreUnavailable):
        dead.ping()
    assert dead.health.down_since is not None
    renewal = dead.renew(OWNER, 3000, now=NOW, leases=[], inflight={DOWNLOADS: set()})
    assert (renewal.lost, renewal.margin_ms) == ([], None)
    assert dead.health.down_since is not None  # still down: no "redis: back" line
    with pytest.raises(StoreUnavailable):
        dead.renew(OWNER, 3000, now=NOW, leases=["shop"], inflight={})
    dead.close()


def test_sweep_puts_expired_jobs_back_due_now(store):
    job = store.enqueue(make_job(), now=NOW)
    take_holding_lease(store, "shop", OWNER, now=NOW, count=1, deadline=NOW + 100)
    assert store.sweep(DOWNLOADS, now=NOW + 100) == [job.id]
    assert store.sweep(DOWNLOADS, now=NOW + 100) == []
    assert store.get_job(job.id).status.state == "queued"
    assert store.due_aggregations(NOW + 100) == ["shop"]


def test_renew_extends_deadlines_and_reports_lost_leases(store):
    job = store.enqueue(make_job(), now=NOW)
    assert store.claim("shop", OWNER, 60_000) == Claim(CLAIMED, 3, "")
    store.take_downloads("shop", OWNER, now=NOW, count=1, deadline=NOW + 100, lease_ttl_ms=60_000)
    assert store.claim("shop", OWNER, 60_000) == Claim(ClaimOutcome.HELD)
    assert store.claim("shop", OTHER, 60_000) == Claim(ClaimOutcome.HELD)
    store.redis.set(keys.lease_key("other"), OTHER)
    renewal = store.renew(OWNER, 3000, now=NOW + 50, leases=["shop", "other"], inflight={DOWNLOADS: [job.id]})
    assert renewal.lost == ["other"]
    assert 3000 < renewal.margin_ms <= 60_000  # what the claim's 60 s lease had left
    assert store.redis.zscore(keys.INFLIGHT[DOWNLOADS], job.id) == NOW + 3050
    assert 0 < store.redis.pttl(keys.lease_key("shop")) <= 3000
    assert not store.release("shop", OTHER)
    assert store.release("shop", OWNER)
    assert store.lease_holder("shop") is None


def test_claim_takes_the_lease_reads_the_settings_and_marks_the_pool_active(store):
    store.enqueue(make_job(aggr_proxy="http://proxy:3128"), now=NOW)
    assert store.claim("shop", OWNER, 60_000) == Claim(CLAIMED, 3, "http://proxy:3128")
    assert (store.lease_holder("shop"), store.redis.hget(keys.ACTIVE, "shop")) == (OWNER, OWNER)
    # No aggregation record: no lease kept.
    assert store.claim("nowhere", OWNER, 60_000) == Claim(ClaimOutcome.NO_RECORD)
    assert store.lease_holder("nowhere") is None and store.redis.hget(keys.ACTIVE, "nowhere") is None
    store.redis.hset(keys.ACTIVE, "shop", OTHER)  # (a later claim by another process, after a lease expiry)
    assert store.release("shop", OWNER)
    assert (store.lease_holder("shop"), store.redis.hget(keys.ACTIVE, "shop")) == (None, OTHER)
    assert store.redis.exists(keys.aggr_key("shop")) == 1  # a job still queued: the record stays


def test_a_fair_claim_leaves_an_aggregation_to_a_processor_below_its_share(store):
    for aggr in ("a", "b", "c"):
        store.enqueue(make_job(aggr, aggr_limit=4), now=NOW)
    store.register_processor(OWNER, until=NOW + 10_000, slots=8)
    store.register_processor(OTHER, until=NOW + 10_000, slots=0)
    # Shares count this aggregation in: OWNER holds 8 of (8 + 0 + 4) slots, over its half of 6.
    assert store.claim("a", OWNER, 60_000, now=NOW, slots=8, fair=True) == Claim(ClaimOutcome.OVER_SHARE)
    assert store.lease_holder("a") is None and store.redis.hget(keys.ACTIVE, "a") is None
    assert store.claim("a", OTHER, 60_000, now=NOW, slots=0, fair=True) == Claim(CLAIMED, 4, "")
    assert store.redis.hgetall(keys.PROCESSOR_SLOTS) == {OWNER: "8", OTHER: "4"}
    # Holding 6 of (6 + 4 + 4), OWNER is within its share of 7 and claims.
    assert store.claim("b", OWNER, 60_000, now=NOW, slots=6, fair=True) == Claim(CLAIMED, 4, "")
    assert store.redis.hget(keys.PROCESSOR_SLOTS, OWNER) == "10"
    # 10 of (10 + 4 + 4) is over 9; the unconditional claim (for what nobody else took) ignores shares.
    assert store.claim("c", OWNER, 60_000, now=NOW, slots=10, fair=True) == Claim(ClaimOutcome.OVER_SHARE)
    assert store.claim("c", OWNER, 60_000, now=NOW, slots=10, fair=False) == Claim(CLAIMED, 4, "")
    assert store.lease_holder("c") == OWNER


def test_a_lapsed_registration_no_longer_counts_in_fair_claims(store):
    store.enqueue(make_job("a", aggr_limit=4), now=NOW)
    store.register_processor(OWNER, until=NOW + 10_000, slots=8)
    store.register_processor(OTHER, until=NOW + 1_000, slots=0)  # it stopped scanning: lapses at NOW + 1 s
    assert store.claim("a", OWNER, 60_000, now=NOW + 2_000, slots=8, fair=True) == Claim(CLAIMED, 4, "")
    assert store.redis.zrange(keys.PROCESSORS, 0, -1) == [OWNER]
    assert store.redis.hgetall(keys.PROCESSOR_SLOTS) == {OWNER: "12"}
    store.unregister_processor(OWNER)
    assert store.redis.exists(keys.PROCESSORS, keys.PROCESSOR_SLOTS) == 0


def test_an_unregistered_claimer_is_not_held_to_shares_and_not_counted(store):
    store.enqueue(make_job("a", aggr_limit=4), now=NOW)
    store.register_processor(OTHER, until=NOW + 10_000, slots=0)
    store.register_processor("third", until=NOW + 10_000, slots=0)
    assert store.claim("a", OWNER, 60_000, now=NOW, slots=100, fair=True) == Claim(CLAIMED, 4, "")
    assert store.redis.hgetall(keys.PROCESSOR_SLOTS) == {OTHER: "0", "third": "0"}


def test_release_lets_the_record_of_an_aggregation_with_nothing_queued_expire(store):
    job = store.enqueue(make_job(), now=NOW)
    assert store.claim("shop", OWNER, 60_000) == Claim(CLAIMED, 3, "")
    [held] = take_holding_lease(store, "shop", OWNER, now=NOW, count=1, deadline=NOW + 5000).jobs
    store.finish_download(held, OWNER, now=NOW, forget_at=LATER, log_entry={},
                          state=JobState.SUCCEEDED, outcome=DownloadOutcome(1))
    assert not store.release("shop", OTHER)
    assert store.redis.exists(keys.aggr_key("shop")) == 1  # not the holder: nothing touched
    assert store.release("shop", OWNER, state_ttl_ms=60_000)
    # Kept processor.aggr_state_ttl more, for the shaping state, then forgotten.
    assert 0 < store.redis.pttl(keys.aggr_key("shop")) <= 60_000
    store.enqueue(make_job(aggr_limit=5), now=NOW)  # the next job brings it back
    assert store.claim("shop", OWNER, 60_000) == Claim(CLAIMED, 5, "")
    assert store.get_job(job.id).status.state == "succeeded"


def test_callback_cycle_delivered_then_forgotten(store):
    job = store.enqueue(make_job(), now=NOW)
    [held] = take_holding_lease(store, "shop", OWNER, now=NOW, count=1, deadline=NOW + 100).jobs
    store.finish_download(held, OWNER, now=NOW, forget_at=LATER, log_entry={},
                          state=JobState.SUCCEEDED, outcome=DownloadOutcome(1))
    [cb] = store.take_callbacks(OWNER, now=NOW, count=5, deadline=NOW + 100).jobs
    assert cb.status.callback_state == "in_flight"
    assert store.callback_delivered(cb, OWNER, outcome=CallbackOutcome(1, code=200), now=NOW, delete_at=NOW + 60_000,
                                    log_entry={"outcome": "delivered"})
    assert store.get_job(job.id).status.callback_state == "delivered"
    assert store.due_deletions(now=NOW + 59_999) == []
    assert store.due_deletions(now=NOW + 60_000) == [job.id]
    assert store.forget([job.id], now=NOW + 60_000) == 1
    assert store.get_job(job.id) is None
    assert store.job_log(job.id) == []


def test_failed_callback_can_be_retried_once_failed(store):
    job = store.enqueue(make_job(), now=NOW)
    assert store.retry_failed_callback(job.id, now=NOW) == -1  # no callback_state field yet: not failed
    [held] = take_holding_lease(store, "shop", OWNER, now=NOW, count=1, deadline=NOW + 100).jobs
    store.finish_download(held, OWNER, now=NOW, forget_at=LATER, log_entry={},
                          state=JobState.SUCCEEDED, outcome=DownloadOutcome(1))
    assert store.retry_failed_callback(job.id, now=NOW) == -1
    assert store.retry_failed_callback("nosuchjob00000", now=NOW) == 0
    [cb] = store.take_callbacks(OWNER, now=NOW, count=5, deadline=NOW + 100).jobs
    store.callback_failed(cb, OWNER, outcome=CallbackOutcome(3, error="500"), now=NOW + 1, log_entry={})
    assert store.redis.zscore(keys.FAILED_CALLBACKS, job.id) == NOW + 1
    assert store.retry_failed_callback(job.id, now=NOW + 5) == 1
    record = store.get_job(job.id)
    assert (record.status.callback_state, record.status.callback_attempts) == ("queued", 0)
    assert store.redis.zscore(keys.CALLBACK_QUEUE, job.id) == NOW + 5


def test_callback_sweep(store):
    job = store.enqueue(make_job(), now=NOW)
    [held] = take_holding_lease(store, "shop", OWNER, now=NOW, count=1, deadline=NOW + 100).jobs
    store.finish_download(held, OWNER, now=NOW, forget_at=LATER, log_entry={},
                          state=JobState.SUCCEEDED, outcome=DownloadOutcome(1))
    store.take_callbacks(OWNER, now=NOW, count=5, deadline=NOW + 100)
    assert store.sweep(CALLBACKS, now=NOW + 100) == [job.id]
    assert store.get_job(job.id).status.callback_state == "queued"
    assert store.redis.zscore(keys.CALLBACK_QUEUE, job.id) == NOW + 100


# ---------------------------------------------------------------- group commit (gdl/store/batch.py)

def test_concurrent_calls_share_pipelines_and_each_gets_its_own_reply(store):
    jobs = [make_job(aggr=f"a{i % 4}") for i in range(40)]
    greenlets = [gevent.spawn(store.enqueue, job, now=NOW) for job in jobs]
    gevent.joinall(greenlets, raise_error=True)
    assert [g.value.id for g in greenlets] == [j.id for j in jobs]
    assert store._batcher.calls == 40
    assert store._batcher.batches < 10  # the first call goes alone, the rest queue behind it
    assert sum(n for _, n in store.pending_aggregations()) == 40


def test_one_failing_call_fails_alone(store):
    bad = make_job()
    store.redis.set(keys.queue_key(bad.aggr_id), "not a zset")  # the script's ZADD fails
    good = [make_job(aggr="other") for _ in range(5)]
    greenlets = [gevent.spawn(store.enqueue, bad, now=NOW)] + [gevent.spawn(store.enqueue, j, now=NOW) for j in good]
    gevent.joinall(greenlets)
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        greenlets[0].get()
    assert [g.get().id for g in greenlets[1:]] == [j.id for j in good]
    assert store.redis.zcard(keys.queue_key("other")) == 5


def test_scripts_forgotten_by_redis_are_loaded_again(store):
    store.enqueue(make_job(), now=NOW)
    store.redis.script_flush()  # as after a restart or a failover
    job = store.enqueue(make_job(), now=NOW)
    taken = take_holding_lease(store, "shop", OWNER, now=NOW, count=5, deadline=NOW + 5000)
    assert job.id in [j.id for j in taken.jobs] and len(taken.jobs) == 2


def test_a_batch_of_jobs_goes_on_a_connection_of_its_own_not_behind_the_shared_pipeline(store):
    # A single job shares the batcher's pipeline (and its kept connection); many jobs at
    # once go alone, at once: the shared connection is never taken, no flusher runs.
    jobs = [make_job(aggr=f"a{i % 3}") for i in range(30)]
    results = store.enqueue_many([(job, None) for job in jobs], now=NOW)
    assert [r.job_id for r in results] == [j.id for j in jobs]
    assert store._batcher._connection is None and store._batcher._flusher is None
    assert store._batcher.calls == 3 and store._batcher.batches == 1  # one pipeline, a call an aggregation
    assert sorted(n for _, n in store.pending_aggregations()) == [10, 10, 10]
    # The next batch goes on the same connection, kept by the batcher rather than checked
    # out of the pool again (the pool's check of it is a yield to the hub).
    [kept] = store._batcher._spare
    store.enqueue_many([(make_job(), None), (make_job(), None)], now=NOW)
    assert store._batcher._spare == [kept]
    store.enqueue(make_job(), now=NOW)
    assert store._batcher._connection is not None and store._batcher._connection is not kept


def test_a_batch_sent_alone_reloads_scripts_redis_has_forgotten(store):
    store.enqueue_many([(make_job(), None), (make_job(), None)], now=NOW)
    store.redis.script_flush()  # as after a restart or a failover
    jobs = [make_job(aggr="other") for _ in range(4)]
    assert [r.job_id for r in store.enqueue_many([(j, None) for j in jobs], now=NOW)] == [j.id for j in jobs]
    assert store.redis.zcard(keys.queue_key("other")) == 4


def test_the_batchers_own_packing_sends_arguments_as_redis_py_does(store):
    # The batcher writes its EVALSHA commands itself (gdl/store/batch.py): the script must
    # read every kind of argument exactly as redis-py's own packing sends it.
    echo = store.redis.register_script("return {KEYS[1], unpack(ARGV)}")
    args = ["plain", "d\u00e9j\u00e0 \u2603", JobState.IN_FLIGHT, 0, -17, 2**70, 1.5, b"raw\x00bytes", "", "a\r\nb"]
    key = keys.job_key("echo")
    assert store._batcher.run(echo, [key], args) == echo(keys=[key], args=args)
    with pytest.raises(redis.exceptions.DataError, match="invalid script argument True"):
        store._batcher.run(echo, [key], [True])


# ---------------------------------------------------------------- wake-ups only when a queue gains due work

def _published(store, action) -> list[str]:
    pubsub = store.subscribe(keys.WAKE_AGGR, keys.WAKE_CALLBACKS)
    try:
        action()
        out = []
        until = time.monotonic() + 0.5  # (subscribe confirmations also read as None)
        while time.monotonic() < until:
            message = store.next_message(pubsub, 0.05)
            if message is not None:
                out.append(message)
        return out
    finally:
        pubsub.close()


def test_enqueue_wakes_only_a_queue_with_nothing_due(store):
    def three_enqueues():
        store.enqueue(make_job(), now=NOW)
        store.enqueue(make_job(), now=NOW)  # the queue has due work: its pool will take this one
        store.enqueue(make_job(aggr="other"), now=NOW)
    assert _published(store, three_enqueues) == [(keys.WAKE_AGGR, "shop"), (keys.WAKE_AGGR, "other")]


def test_enqueue_wakes_a_queue_whose_jobs_are_all_due_later(store):
    store.enqueue(make_job(), now=NOW + 60_000)  # a retry waiting for its backoff
    assert _published(store, lambda: store.enqueue(make_job(), now=NOW)) == [(keys.WAKE_AGGR, "shop")]


def test_finished_downloads_wake_the_notifier_once_per_idle_callback_queue(store):
    for _ in range(3):
        store.enqueue(make_job(), now=NOW)
    taken = take_holding_lease(store, "shop", OWNER, now=NOW, count=3, deadline=NOW + 5000).jobs

    def finish_all():
        for job in taken:
            assert store.finish_download(job, OWNER, now=NOW, forget_at=LATER, log_entry={"outcome": "ok"},
                                         state=JobState.SUCCEEDED, outcome=DownloadOutcome(1))
    assert _published(store, finish_all) == [(keys.WAKE_CALLBACKS, taken[0].id)]
    assert store.redis.zcard(keys.CALLBACK_QUEUE) == 3


def test_upgrade_renames_the_keys_of_the_layout_before_the_hash_tag(store):
    store.redis.hset("gdl:job:abc", mapping={"url": "http://example.com/a", "aggr_id": "shop"})
    store.redis.zadd("gdl:queue:shop", {"abc": NOW})
    store.redis.zadd("gdl:due", {"shop": NOW})
    store.redis.set("gdl:lease:shop", OWNER, px=30_000)
    assert store.upgrade_layout() == 4
    assert store.redis.hget(keys.job_key("abc"), "aggr_id") == "shop"
    assert store.redis.zscore(keys.queue_key("shop"), "abc") == NOW
    assert store.due_aggregations(NOW) == ["shop"]
    assert 0 < store.redis.pttl(keys.lease_key("shop")) <= 30_000  # its expiry goes with it
    assert store.redis.keys("gdl:*") == []
    assert store.upgrade_layout() == 0


def test_processes_of_the_earlier_layout_are_found_unless_stopped_or_silent(store):
    beats = {"old-live": {"at": NOW - 1_000}, "old-stopped": {"at": NOW - 1_000, "state": "stopped"},
             "old-dead": {"at": NOW - 60_000}}
    for process, beat in beats.items():
        store.redis.hset("gdl:heartbeats", process, json.dumps({**beat, "process": process}))
    assert store.legacy_processes(now=NOW) == ["old-live"]
