"""The processor's cancel path: aborting downloads whose cancel was requested,
and finishing purges.

A cancel of a job in flight (``DELETE /jobs/<id>``, or a purge) marks the job
in Redis and publishes its id on ``gdl:cancel``; :meth:`Canceller.on_cancel`
finds the pool fetching it and aborts the download (the pool then settles it
cancelled, :mod:`gdl.pool`). Pub/sub may drop a message (a reconnect, a slow
subscriber), so every ``processor.cancel_check_interval`` seconds the
canceller also reads the marks of the downloads this process holds (one
pipeline): a lost message delays an abort by at most that long. The same
check settles the marked downloads whose holder died (before the sweep would
put them back in their queue).

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

    # ------------------------------------------------------------------ pub/sub handlers

    def on_cancel(self, job_id: str | None) -> None:
        """``gdl:cancel`` handler: abort ``job_id`` if this process fetches it (None: messages
        may have been lost, check every mark)."""
        if job_id is None:
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
        held = sorted(self.keeper.inflight.get(DOWNLOADS, ()))
        aborted = [job_id for job_id in self.store.cancels_requested(held) if self.abort(job_id)]
        if aborted:
            log.info("cancels: %d download(s) found marked by the backstop check", len(aborted))
        return len(aborted)

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
