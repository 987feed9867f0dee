"""The loops' decisions as functions of the time they are given (huey's
``loop(now)``): a pool's sleep and idle exit, retry timing, and fair-share
claiming between three processors, each driven without sleeping. The
end-to-end tests elsewhere keep the real timers."""

from __future__ import annotations

from collections import Counter

import gevent
import gevent.event
import pytest

from gdl import store as keys
from gdl.backends import from_config as backends_from_config
from gdl.backoff import retry_delay
from gdl.filestorage import FileStorages
from gdl.job import Job, new_id
from gdl.lease import Keeper
from gdl.notifier import Notifier
from gdl.pool import AggregationPool
from gdl.scanner import FAIR_SHARE_WAIT, Scanner
from gdl.stats import NotifierStats, ProcessorStats
from gdl.taking import MAX_WAIT, Idleness
from tests.test_fencing import DrivenClock

NOW = 1_700_000_000_000


# ---------------------------------------------------------------------- a pool with nothing to take

def test_a_pool_sleeps_until_its_next_job_is_due_then_idles_out():
    idle = Idleness(timeout=10.0)
    idle.after_take(100.0, took=False, busy=True)  # downloads still running: not idle
    assert (idle.since, idle.over(100.0)) == (None, False)
    assert idle.sleep_for(100.0, NOW, next_due=NOW + 1_500) == 1.5
    idle.after_take(101.0, took=False, busy=False)  # nothing taken, nothing running: idle from now
    assert idle.sleep_for(101.0, NOW, next_due=None) == MAX_WAIT
    assert idle.sleep_for(108.0, NOW, next_due=None) == 3.0  # what the idle timeout leaves
    idle.after_take(108.0, took=False, busy=False)
    assert (idle.since, idle.over(110.9)) == (101.0, False)
    assert idle.over(111.0)
    idle.after_take(111.0, took=True, busy=True)  # work arrived: the count starts again
    assert not idle.over(500.0)


def test_a_pool_without_an_idle_timeout_never_idles_out():
    idle = Idleness(timeout=None)
    idle.after_take(0.0, took=False, busy=False)
    assert not idle.over(1e9)
    assert idle.sleep_for(1e9, NOW, next_due=NOW - 5) == 0.0  # overdue: take again at once


# ---------------------------------------------------------------------- retries

@pytest.mark.parametrize(("attempt", "retry_after", "delay"), [
    (1, None, 120), (2, None, 240), (0, None, 120), (1, 600, 600), (3, 5, 360)])
def test_retry_n_waits_n_times_the_backoff_or_the_retry_after(attempt, retry_after, delay):
    assert retry_delay(attempt, 120, at_least=retry_after) == delay


def test_a_failed_callback_is_due_again_after_attempt_times_the_backoff(make_cfg, store, receiver):
    receiver.script["/cb"] = [500, 500, 500]
    cfg = make_cfg(notifier={"retry_backoff": 600, "max_retries": 2})
    clock = DrivenClock(NOW)
    keeper = Keeper(store, "notifier-1", cfg.processor.lease_ttl, clock=lambda: int(clock()),
                    monotonic=lambda: 0.0)
    notifier = Notifier(store, cfg, keeper, backends_from_config(cfg), stats=NotifierStats(),
                        filestorages=FileStorages.from_config(cfg), clock=lambda: int(clock()))
    for backend in notifier.backends.values():
        backend.start()
    job = store.enqueue(Job(id=new_id(), url="http://example.com/a", aggr_id="r", aggr_limit=1,
                            callback_type="http", callback_dst=receiver.url("/cb")), now=NOW)
    store.redis.zadd(keys.CALLBACK_QUEUE, {job.id: NOW})  # the download ended: its callback is due
    for attempt, due in ((1, NOW + 600_000), (2, NOW + 600_000 + 1_200_000)):
        [taken] = notifier.take(int(clock()), 1).jobs
        notifier.handle(taken)
        assert store.redis.zscore(keys.CALLBACK_QUEUE, job.id) == due, attempt
        assert store.get_job(job.id).status.callback_attempts == attempt
        assert notifier.take(int(clock()), 1).jobs == []  # not due yet
        clock.now = due
    [taken] = notifier.take(int(clock()), 1).jobs
    notifier.handle(taken)  # the third failure is the last (max_retries 2)
    assert store.get_job(job.id).status.callback_state == "failed"
    assert len(receiver.bodies()) == 3


# ---------------------------------------------------------------------- fair shares between processors

class InertPool(AggregationPool):
    """A pool that holds its lease and downloads nothing: the claims are the subject."""

    def run(self) -> None:
        self._wake.wait()


def test_three_processors_share_new_aggregations_by_their_slots(make_cfg, store):
    cfg = make_cfg()
    for n in range(9):
        store.enqueue(Job(id=new_id(), url="http://example.com/a", aggr_id=f"f{n}", aggr_limit=2,
                          callback_type="http", callback_dst="http://example.com/cb"), now=NOW)
    mono = DrivenClock(50.0)
    healthy = gevent.event.Event()
    healthy.set()
    scanners = {name: Scanner(store, cfg, Keeper(store, name, cfg.processor.lease_ttl, monotonic=mono),
                              filestorages=FileStorages.from_config(cfg), stats=ProcessorStats(), healthy=healthy,
                              clock=lambda: NOW, pool_class=InertPool)
                for name in ("A", "B", "C")}
    try:
        for scanner in scanners.values():  # each registers at its first full scan
            scanner._register(NOW, claiming=True)
        for scanner in scanners.values():  # then each scans once, at the same instant
            scanner._full_scan = True
            scanner.scan_once(NOW)
        # Each claims while at or below its share of all slots counted so far, and leaves the rest
        # to the others for FAIR_SHARE_WAIT: A (first) 1 of limit 2, B 2, C 3.
        assert Counter(store.redis.hvals(keys.ACTIVE)) == {"A": 1, "B": 2, "C": 3}
        assert store.redis.hgetall(keys.PROCESSOR_SLOTS) == {"A": "2", "B": "4", "C": "6"}
        mono.now += FAIR_SHARE_WAIT  # nobody took the rest: the processors that left them claim them anyway
        for scanner in scanners.values():
            scanner.scan_once(NOW)
        assert len(store.redis.hvals(keys.ACTIVE)) == 9
        assert Counter(store.redis.hvals(keys.ACTIVE))["A"] == 4  # the first to find them unclaimed
    finally:
        for scanner in scanners.values():
            scanner.group.kill(block=False)
        gevent.sleep(0)
