"""The taking loop shared by the processor's aggregation pools and the notifier.

:class:`TakingPool` feeds a ``gevent.pool.Pool`` from a Redis queue: wait
for a free slot, take at most that many due jobs into the in-flight set (one
script, so Redis always knows who holds what), spawn one greenlet per job,
and sleep on a wake event until the next job is due. It never runs more
greenlets than its size. A concrete pool supplies :meth:`TakingPool.take`
and :meth:`TakingPool.handle`: :class:`gdl.pool.AggregationPool` downloads,
:class:`gdl.notifier.Notifier` delivers callbacks. :class:`Idleness` is the
loop's sleep-and-idle decision, a function of the times it is given.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import gevent
import gevent.event
import gevent.pool

from gdl.backoff import Backoff
from gdl.errors import StoreUnavailable
from gdl.job import Job
from gdl.lease import Keeper
from gdl.store import DOWNLOADS, Settled, Taken

log = logging.getLogger(__name__)

MAX_WAIT = 5.0  # longest sleep between looks at the queue when nothing wakes us


class Idleness:
    """A pool's decisions when a take brought nothing: how long to sleep, and
    whether it has been idle long enough to end. A function of the times it is
    given (``mono``: monotonic seconds; ``now`` and due times: the store's
    milliseconds), so that tests drive it without sleeping."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout  # None: never ends for idleness (the notifier)
        self.since: float | None = None  # when the pool last had nothing to do, nothing running

    def after_take(self, mono: float, *, took: bool, busy: bool) -> None:
        if took or busy:
            self.since = None
        elif self.since is None:
            self.since = mono

    def over(self, mono: float) -> bool:
        return self.timeout is not None and self.since is not None and mono - self.since >= self.timeout

    def sleep_for(self, mono: float, now: int, next_due: int | None) -> float:
        """Until the next job is due, the idle timeout runs out, or ``MAX_WAIT``, whichever is first."""
        sleep = MAX_WAIT
        if next_due is not None:
            sleep = min(sleep, max(0.0, (next_due - now) / 1000))
        if self.timeout is not None and self.since is not None:
            sleep = min(sleep, max(0.0, self.timeout - (mono - self.since)))
        return sleep


class TakingPool:
    """Feeds a ``gevent.pool.Pool`` of ``size`` from an in-flight-taking script."""

    kind = DOWNLOADS

    def __init__(self, *, size: int, keeper: Keeper, clock: Callable[[], int],
                 idle_timeout: float | None = None, gate: gevent.event.Event | None = None,
                 logger: logging.Logger | logging.LoggerAdapter = log):
        self.pool = gevent.pool.Pool(size)
        # What a job needs once its exchange is over (storing the file, writing
        # the outcome) may run here instead, off the pool's slot: the next job's
        # exchange then starts without waiting for a disk or a Redis round trip.
        # As big as the pool, so that a slow disk holds the slots back rather
        # than piling up finished downloads.
        self.finishing = gevent.pool.Pool(size)
        self._handed_over: set[str] = set()
        self.size = size
        self.keeper = keeper
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.gate = gate
        self.log = logger
        self._wake = gevent.event.Event()
        self._capped = False  # the last take stopped at the effective limit: wake on a finish
        self.stopping = False

    # The two operations a concrete pool supplies.
    def take(self, now: int, count: int) -> Taken:
        raise NotImplementedError

    def handle(self, job: Job) -> None:
        raise NotImplementedError

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Stop taking work; greenlets in flight carry on (see :meth:`interrupt`)."""
        self.stopping = True
        self._wake.set()

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the greenlets in flight to finish; True when none is left."""
        until = time.monotonic() + timeout
        exchanges_done = self.pool.join(timeout=timeout)
        return self.finishing.join(timeout=max(0.0, until - time.monotonic())) and exchanges_done

    def interrupt(self, timeout: float) -> None:
        """Kill the exchanges in flight: each puts its job back as it dies. What
        is being finished off (a disk write, a Redis call) is given the rest of
        ``timeout`` to end by itself: a greenlet killed before it ran would leave
        its job to the sweep and its file behind."""
        until = time.monotonic() + timeout
        self.pool.kill(block=True, timeout=timeout)
        if not self.finishing.join(timeout=max(0.0, until - time.monotonic())):
            self.finishing.kill(block=True, timeout=max(0.0, until - time.monotonic()))

    @property
    def busy(self) -> int:
        """Jobs this pool holds: in their exchange, or being finished off."""
        return len(self.pool) + len(self.finishing)

    def finish_off(self, job: Job, rest: Callable[[], None]) -> None:
        """Called by :meth:`handle` when the job's exchange is over: ``rest`` runs
        in another greenlet and :meth:`handle` returns, freeing its slot."""
        self.finishing.wait_available()
        self._handed_over.add(job.id)
        self.finishing.spawn(self._finish_held, job, rest)

    def run(self) -> None:
        idle = Idleness(self.idle_timeout)
        backoff = Backoff()
        while not self.stopping:
            if not self._gate_open():
                self._wait_for_gate()
                continue
            self.pool.wait_available()
            # A pause (disk, shutdown, a lost lease) may have begun while we
            # waited for a slot: it holds at the moment of taking.
            if self.stopping or not self._gate_open():
                continue
            now = self.clock()
            self._wake.clear()  # before taking, so a wake during the take is not lost
            busy = self.busy
            try:
                taken = self.take(now, self.pool.free_count())
            except StoreUnavailable:  # logged once per outage by the store
                self._wake.wait(backoff.next())
                continue
            backoff.reset()
            if taken.lease_lost:
                self.log.warning("lease no longer held by this process: taking nothing more")
                self.stopping = True
                break
            if taken.limit is not None and taken.limit != self.size:
                self.log.info("limit changed from %d to %d: ending this pool to start one of the new size",
                              self.size, taken.limit)
                self.stopping = True
            for job in taken.jobs:
                self.keeper.hold(self.kind, job.id)
                self.pool.spawn(self._handle_held, job)
            mono = self.keeper.monotonic()
            idle.after_take(mono, took=bool(taken.jobs), busy=bool(self.busy))
            if taken.jobs:
                continue
            if idle.over(mono):
                break
            if taken.gate == "capped":
                # The adaptive limit is in use: the next finish (see _handle_held) wakes us,
                # unless one came while we were taking.
                self._capped = True
                if self.busy >= busy:
                    self._wake.wait(MAX_WAIT)
                continue
            self._wake.wait(idle.sleep_for(mono, now, taken.next_due))
        self.pool.join()
        self.finishing.join()

    def _gate_open(self) -> bool:
        return self.gate is None or self.gate.is_set()

    def _wait_for_gate(self) -> None:
        """Until the gate opens or :meth:`stop` (which sets the wake event) is called."""
        if self.gate is not None:
            self._wake.clear()
            if not self.stopping:
                gevent.wait([self.gate, self._wake], count=1, timeout=MAX_WAIT)

    def _handle_held(self, job: Job) -> None:
        try:
            self.handle(job)
        finally:
            if job.id not in self._handed_over:
                self.keeper.drop(self.kind, job.id)
                self._released()

    def _finish_held(self, job: Job, rest: Callable[[], None]) -> None:
        try:
            rest()
        finally:
            self._handed_over.discard(job.id)
            self.keeper.drop(self.kind, job.id)
            self._released()

    def _released(self) -> None:
        """A held job is done: a take stopped at the effective limit may start another."""
        if self._capped:
            self._capped = False
            self._wake.set()

    def settle(self, what: str, job: Job, write: Callable[[], Settled]) -> Settled | None:
        """Write an outcome, riding out a Redis outage; if we stop first, the sweep has it (None)."""
        backoff = Backoff()
        while True:
            try:
                settled = write()
                if not settled and settled is not Settled.CANCEL_REQUESTED:
                    self.log.warning("job %s: %s not recorded, %s", job.id, what, settled.value)
                return settled
            except StoreUnavailable:
                if self.stopping:
                    self.log.warning("job %s: %s left to the sweep, redis unavailable", job.id, what)
                    return None
                gevent.sleep(backoff.next())
