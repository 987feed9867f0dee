"""Cancel and purge against a real Redis, step by step: each outcome is one
script, and settle.lua alone decides between a finishing download and its cancel."""

from __future__ import annotations

from gdl import shaping
from gdl import store as keys
from gdl.job import Job, JobState, new_id
from gdl.store import DownloadOutcome, Settled
from tests.samples import take_holding_lease
from tests.test_store import LATER, NOW, OWNER, make_job


def finish(store, job: Job, now: int = NOW + 50) -> Settled:
    return store.finish_download(job, OWNER, state=JobState.SUCCEEDED, outcome=DownloadOutcome(1, bytes=3),
                                 now=now, forget_at=LATER, log_entry={"outcome": "succeeded"})


def test_a_queued_job_is_cancelled_in_one_step_with_its_callback_queued(store):
    first, second = store.enqueue(make_job(), now=NOW), store.enqueue(make_job(), now=NOW + 5)
    assert store.cancel_job(first.id, now=NOW + 10, forget_at=LATER) == "cancelled"
    record = store.get_job(first.id)
    assert (record.status.state, record.status.callback_state, record.status.error) == \
        ("cancelled", "queued", "cancelled by request")
    assert store.redis.zrange(keys.queue_key("shop"), 0, -1) == [second.id]
    assert store.redis.zscore(keys.DUE_INDEX, "shop") == NOW + 5  # the index follows the new head
    assert store.redis.zscore(keys.CALLBACK_QUEUE, first.id) == NOW + 10
    assert store.cancel_counts() == {"queued": 1}


def test_cancelling_the_last_queued_job_leaves_the_due_index(store):
    job = store.enqueue(make_job(), now=NOW)
    assert store.cancel_job(job.id, now=NOW, forget_at=LATER, callback=False) == "cancelled"
    assert store.redis.zscore(keys.DUE_INDEX, "shop") is None
    assert store.get_job(job.id).status.callback_state == "none"
    assert store.redis.zscore(keys.DELETIONS, job.id) == LATER
    assert store.redis.zscore(keys.CALLBACK_QUEUE, job.id) is None


def test_a_job_waiting_for_its_retry_is_cancelled_from_its_queue(store):
    job = store.enqueue(make_job(), now=NOW)
    [held] = take_holding_lease(store, "shop", OWNER, now=NOW, count=1, deadline=NOW + 5000).jobs
    store.retry_download(held, OWNER, due=NOW + 60_000, now=NOW + 1, log_entry=None)
    assert store.cancel_job(job.id, now=NOW + 2, forget_at=LATER) == "cancelled"
    assert store.redis.zcard(keys.queue_key("shop")) == 0


def test_a_repeat_answers_the_state_and_queues_no_second_callback(store):
    job = store.enqueue(make_job(), now=NOW)
    assert [store.cancel_job(job.id, now=NOW + i, forget_at=LATER) for i in range(3)] == ["cancelled"] * 3
    assert store.redis.zscore(keys.CALLBACK_QUEUE, job.id) == NOW  # queued once, by the first
    assert store.cancel_counts() == {"queued": 1}


def test_unknown_and_finished_jobs_are_left_alone(store):
    job = store.enqueue(make_job(), now=NOW)
    [held] = take_holding_lease(store, "shop", OWNER, now=NOW, count=1, deadline=NOW + 5000).jobs
    assert finish(store, held) is Settled.RECORDED
    assert store.cancel_job(job.id, now=NOW + 60, forget_at=LATER) == "succeeded"
    assert store.get_job(job.id).status.state == "succeeded"
    assert store.cancel_job(new_id(), now=NOW, forget_at=LATER) == "unknown"


def test_a_cancel_landing_before_the_success_settles_wins_over_it(store):
    job = store.enqueue(make_job(), now=NOW)
    [held] = take_holding_lease(store, "shop", OWNER, now=NOW, count=1, deadline=NOW + 5000).jobs
    assert store.cancel_job(job.id, now=NOW + 10, forget_at=LATER) == "cancelling"
    assert store.cancel_job(job.id, now=NOW + 11, forget_at=LATER) == "cancelling"  # a repeat: the same
    # The download completes now: its success is refused, nothing written ...
    assert finish(store, held) is Settled.CANCEL_REQUESTED
    record = store.get_job(job.id)
    assert (record.status.state, record.status.callback_state, record.status.cancel) == ("in_flight", "", "1")
    assert record.public()["state"] == "cancelling"
    # ... and its holder settles it cancelled: one callback, no success anywhere.
    assert store.settle_cancelled(held, OWNER, now=NOW + 60, forget_at=LATER, log_entry={"outcome": "cancelled"}) \
        is Settled.RECORDED
    record = store.get_job(job.id)
    assert (record.status.state, record.status.callback_state, record.status.error) == \
        ("cancelled", "queued", "cancelled by request")
    assert store.redis.zscore(keys.INFLIGHT[keys.DOWNLOADS], job.id) is None
    assert store.redis.zrange(keys.CALLBACK_QUEUE, 0, -1, withscores=True) == [(job.id, NOW + 60)]
    assert store.cancel_job(job.id, now=NOW + 70, forget_at=LATER) == "cancelled"
    assert store.cancel_counts() == {"in_flight": 1}


def test_a_429_on_a_marked_download_still_pauses_its_aggregation(store):
    """The throttle is the origin's word on the aggregation: recorded even when the
    outcome itself is refused because the job's cancel was requested."""
    job = store.enqueue(make_job(), now=NOW)
    [held] = take_holding_lease(store, "shop", OWNER, now=NOW, count=1, deadline=NOW + 5000).jobs
    store.cancel_job(job.id, now=NOW + 1, forget_at=LATER)
    throttle = shaping.signal(NOW + 2, busy=1, window_ms=2000, throttle=3000, congested=True, hold=True)
    assert store.retry_download(held, OWNER, due=NOW + 2, now=NOW + 2, log_entry=None, signal=throttle,
                                throttled=1) is Settled.CANCEL_REQUESTED
    assert store.redis.hget(keys.aggr_key("shop"), "paused_until") == str(NOW + 3002)


def test_a_retry_or_a_put_back_of_a_marked_download_is_refused_too(store):
    job = store.enqueue(make_job(), now=NOW)
    [held] = take_holding_lease(store, "shop", OWNER, now=NOW, count=1, deadline=NOW + 5000).jobs
    store.cancel_job(job.id, now=NOW + 1, forget_at=LATER, callback=False)
    assert store.retry_download(held, OWNER, due=NOW + 9, now=NOW + 2, log_entry=None) is Settled.CANCEL_REQUESTED
    assert store.redis.zcard(keys.queue_key("shop")) == 0
    assert store.settle_cancelled(held, OWNER, now=NOW + 3, forget_at=LATER, log_entry=None) is Settled.RECORDED
    assert store.get_job(job.id).status.callback_state == "none"  # callback=false: no callback
    assert store.redis.zscore(keys.DELETIONS, job.id) == LATER


def test_a_marked_download_whose_holder_died_is_settled_cancelled_by_the_sweep(store):
    job = store.enqueue(make_job(), now=NOW)
    take_holding_lease(store, "shop", OWNER, now=NOW, count=1, deadline=NOW + 100)
    store.cancel_job(job.id, now=NOW + 1, forget_at=LATER)
    assert store.sweep_cancelled(now=NOW + 99, forget_at=LATER) == []  # its deadline has not passed
    assert store.sweep_cancelled(now=NOW + 100, forget_at=LATER) == [job.id]
    assert store.get_job(job.id).status.state == "cancelled"
    assert store.sweep(keys.DOWNLOADS, now=NOW + 200) == []  # nothing left to put back


def test_the_backstop_finds_the_marked_downloads(store):
    jobs = [store.enqueue(make_job(), now=NOW) for _ in range(3)]
    take_holding_lease(store, "shop", OWNER, now=NOW, count=3, deadline=NOW + 5000)
    store.cancel_job(jobs[1].id, now=NOW + 1, forget_at=LATER)
    assert store.cancels_requested([j.id for j in jobs]) == [jobs[1].id]


def test_the_count_of_marks_moves_with_each_new_mark_only(store):
    jobs = [store.enqueue(make_job(), now=NOW + i) for i in range(4)]
    queued = store.enqueue(make_job(), now=NOW + 10)
    take_holding_lease(store, "shop", OWNER, now=NOW + 5, count=4, deadline=NOW + 5000)
    assert store.cancel_marks() == 0
    store.cancel_job(jobs[0].id, now=NOW + 6, forget_at=LATER)
    assert store.cancel_marks() == 1
    store.cancel_job(jobs[0].id, now=NOW + 7, forget_at=LATER)  # a repeat: marked already
    store.cancel_job(queued.id, now=NOW + 7, forget_at=LATER)  # queued: cancelled, no mark
    assert store.cancel_marks() == 1
    store.purge_aggregation("shop", now=NOW + 8)  # marks the three others in flight
    assert store.cancel_marks() == 4
    assert store.cancels_requested([j.id for j in jobs]) == [j.id for j in jobs]


def test_a_purge_renames_the_queue_and_marks_what_is_in_flight(store):
    jobs = [store.enqueue(make_job(), now=NOW + i) for i in range(5)]
    [held] = take_holding_lease(store, "shop", OWNER, now=NOW, count=1, deadline=NOW + 5000).jobs
    other = store.enqueue(make_job(aggr="other"), now=NOW)
    purge = store.purge_aggregation("shop", now=NOW + 10)
    assert (purge.known, purge.queued, purge.in_flight) == (True, 4, 1)
    assert store.redis.exists(keys.queue_key("shop")) == 0
    assert store.redis.zscore(keys.DUE_INDEX, "shop") is None
    assert store.get_job(held.id).status.cancel == "1"
    # A job enqueued after the purge is kept: the queue is a new one.
    later = store.enqueue(make_job(), now=NOW + 20)
    [(token, record)] = store.purges().items()
    assert record == {"aggr_id": "shop", "callback": True, "at": NOW + 10}
    assert store.purge_chunk(token, record, now=NOW + 30, forget_at=LATER, size=3) == 1
    assert store.purge_chunk(token, record, now=NOW + 31, forget_at=LATER, size=3) == 0
    assert store.purges() == {}
    states = {j.id: store.get_job(j.id).status for j in jobs}
    assert sorted(s.state for s in states.values()) == ["cancelled"] * 4 + ["in_flight"]
    assert {s.error for s in states.values() if s.state == "cancelled"} == {"cancelled: aggregation shop purged"}
    assert store.get_job(later.id).status.state == "queued"
    assert store.get_job(other.id).status.state == "queued"
    assert store.redis.zrange(keys.queue_key("shop"), 0, -1) == [later.id]
    assert store.cancel_counts() == {"purged": 4}


def test_a_job_cancelled_by_request_during_a_purge_gets_one_callback(store):
    jobs = [store.enqueue(make_job(), now=NOW + i) for i in range(3)]
    store.purge_aggregation("shop", now=NOW + 10, callback=False)
    assert store.cancel_job(jobs[0].id, now=NOW + 11, forget_at=LATER) == "cancelled"  # with a callback
    [(token, record)] = store.purges().items()
    assert store.purge_chunk(token, record, now=NOW + 12, forget_at=LATER) == 0
    assert store.redis.zrange(keys.CALLBACK_QUEUE, 0, -1) == [jobs[0].id]
    assert sorted(store.redis.zrange(keys.DELETIONS, 0, -1)) == sorted(j.id for j in jobs[1:])


def test_purging_an_unknown_aggregation_does_nothing(store):
    assert not store.purge_aggregation("never-seen", now=NOW).known
    assert store.purges() == {}
