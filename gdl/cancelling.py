"""The processor's cancel path: aborting downloads whose cancel was requested,
and finishing purges.

A cancel of a job in flight (``DELETE /jobs/<id>``, or a purge) marks the job
in Redis and publishes its id on ``gdl:cancel``; :meth:`Canceller.on_cancel`
finds the pool fetching it and aborts the download (the pool then settles it
cancelled, :mod:`gdl.pool`). Pub/sub may drop a message (a reconnect, a slow
subscriber), so every ``processor.cancel_check_interval`` seconds the
canceller also looks for marks itself: a lost message delays an abort by at
most that long. It reads the count of marks ever made (one ``GET``), and only
when that moved the marks of the downloads this process holds (one pipeline
of a command per download: done every time, about a Redis command per job on
a busy processor). It reads them in that check and the next: a job taken in
Redis before its mark but not yet held here when the count was read is held
by then. A mark made before a take comes back with the job, and the pool
settles it cancelled at once. The same check settles the marked downloads
whose holder died (before the sweep would put them back in their queue).

A purge (:meth:`gdl.store.Store.purge_aggregation`) leaves its aggregation's
queued jobs in a purge set listed in ``purges``; the purger cancels each set
in chunks of ``PURGE_CHUNK`` jobs, one short script call each, until it is
empty. It wakes on ``gdl:purge`` and looks at ``purges`` at every check too,
so a purge half done when its process died is finished by another.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import gevent
import gevent.event

from gdl.errors import StoreUnavailable
from gdl.lease import Keeper
from gdl.scanner import Scanner
from gdl.store import DOWNLOADS, Store

log = logging.getLogger(__name__)

# Checks that read the held downloads' marks once the count of marks moved (or the
# cancel channel reconnected): that check and the next (see the module's docstring).
MARK_READS = 2


class Canceller:
    def __init__(self, store: Store, scanner: Scanner, keeper: Keeper, *, interval: float, deletion_delay_ms: int,
                 clock: Callable[[], int]):
        self.store = store
        self.scanner = scanner
        self.keeper = keeper
        self.interval = interval
        self.deletion_delay_ms = deletion_delay_ms
        self.clock = clock
        self._look = gevent.event.Event()  # check the marks now (a pub/sub reconnect)
        self._purge = gevent.event.Event()  # a purge was started
        self._stopping = False
        self._marks_seen: int | None = None  # the count of marks at the last check
        self._mark_reads_due = 0  # checks still to read the held downloads' marks

    # ------------------------------------------------------------------ pub/sub handlers

    def on_cancel(self, job_id: str | None) -> None:
        """``gdl:cancel`` handler: abort ``job_id`` if this process fetches it (None: messages
        may have been lost, check every mark)."""
        if job_id is None:
            self._mark_reads_due = MARK_READS
            self._look.set()
        else:
            self.abort(job_id)

    def on_purge(self, _token: str | None) -> None:
        self._purge.set()

    def abort(self, job_id: str) -> bool:
        return any(pool.cancel(job_id) for pool in list(self.scanner.pools.values()))

    def stop(self) -> None:
        self._stopping = True
        self._look.set()
        self._purge.set()

    # ------------------------------------------------------------------ the backstop

    def run_checks(self) -> None:
        self._loop(self.check_once, self._look, self.interval)

    def run_purges(self) -> None:
        self._loop(self.purge_once, self._purge, self.scanner.cfg.processor.scan_interval)

    def _loop(self, step: Callable[[], int], wake: gevent.event.Event, interval: float) -> None:
        """``step`` at once, then each time ``wake`` is set or ``interval`` seconds have passed."""
        while not self._stopping:
            wake.clear()
            try:
                step()
            except StoreUnavailable:  # logged once per outage by the store
                pass
            wake.wait(interval)

    def check_once(self) -> int:
        """Abort the held downloads found marked; settle the marked ones whose holder died.
        Returns how many downloads were aborted."""
        now = self.clock()
        for job_id in self.store.sweep_cancelled(now=now, forget_at=now + self.deletion_delay_ms):
            log.info("job %s: cancelled (its holder stopped renewing it)", job_id)
        if not self._marks_moved():
            return 0
        held = sorted(self.keeper.inflight.get(DOWNLOADS, ()))
        aborted = [job_id for job_id in self.store.cancels_requested(held) if self.abort(job_id)]
        if aborted:
            log.info("cancels: %d download(s) found marked by the backstop check", len(aborted))
        return len(aborted)

    def _marks_moved(self) -> bool:
        """Whether this check reads the held downloads' marks: in the check that finds
        the count of marks moved and in the next (see the module's docstring)."""
        marks = self.store.cancel_marks()
        if marks != self._marks_seen:
            self._marks_seen = marks
            self._mark_reads_due = MARK_READS
        if not self._mark_reads_due:
            return False
        self._mark_reads_due -= 1
        return True

    # ------------------------------------------------------------------ purges

    def purge_once(self) -> int:
        """Finish every purge under way; returns the purges finished."""
        finished = 0
        for token, record in self.store.purges().items():
            while not self._stopping:
                now = self.clock()
                left = self.store.purge_chunk(token, record, now=now, forget_at=now + self.deletion_delay_ms)
                if not left:
                    log.info("aggr %s: purge %s done", record["aggr_id"], token)
                    finished += 1
                    break
                gevent.sleep(0)  # other greenlets' Redis calls go between chunks
        return finished
