"""The keeper: renews everything this process holds in Redis, and knows how
long each lease is certainly still held.

A process holds two kinds of things with an expiry: aggregation leases
(``lease:<aggr>``, so one process at a time runs an aggregation) and in-flight
records (a job's entry in an in-flight set, with a deadline). Both are
extended every third of ``processor.lease_ttl`` by this one greenlet, on the
monotonic clock (sooner, with backoff, after a failed renewal). If the
process dies, both run out within ``lease_ttl``: the lease becomes claimable
and the sweep puts the jobs back.

A lease is *confirmed* by each step that found it held and extended it (its
claim, a pool's take, a renewal), as of the moment that step was sent: Redis
extended it later than that, so the lease is certainly held until that moment
plus ``lease_ttl``. While Redis cannot be reached nothing confirms it, and the
process cannot know whether another one holds it already. So
``FENCE_MARGIN`` of the ttl before the last confirmation runs out, the keeper
calls ``on_unconfirmed``: the pool interrupts its downloads, closing their
connections, before the lease can lapse and another process start the
aggregation's downloads. Redis itself fences the rest: a take or settle by a
process that no longer holds the lease is refused (take.lua, settle.lua).

A lease found lost on renewal is reported to ``on_lost`` so its pool stops.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable

import gevent
import gevent.event

from gdl.backoff import Backoff
from gdl.errors import StoreUnavailable
from gdl.store import Store, now_ms

log = logging.getLogger(__name__)

# Share of lease_ttl before a lease's certain end at which its downloads are
# interrupted: time for the connections to close and the origin to see them
# go before another process may claim the aggregation.
FENCE_MARGIN = 1 / 6
# A renewal that finds a lease with less than this share of its ttl left is late.
LATE_RENEWAL = 1 / 3


class Keeper:
    def __init__(self, store: Store, owner: str, ttl: float, *, clock: Callable[[], int] = now_ms,
                 monotonic: Callable[[], float] = time.monotonic):
        self.store = store
        self.owner = owner
        self.ttl_ms = int(ttl * 1000)
        self.clock = clock
        self.monotonic = monotonic
        self.leases: dict[str, float] = {}  # aggr id -> monotonic time its last confirmation was sent
        self.inflight: dict[str, set[str]] = defaultdict(set)
        self.on_lost: Callable[[str], None] = lambda aggr_id: None
        self.on_unconfirmed: Callable[[str], None] = lambda aggr_id: None
        self.least_margin_ms: int | None = None  # the last renewal's (see renew_leases.lua)
        self._fenced: set[str] = set()  # leases whose pools were told to interrupt
        self._stopping = gevent.event.Event()

    def deadline(self, now: int) -> int:
        return now + self.ttl_ms

    # ------------------------------------------------------------------ what is held

    def hold(self, kind: str, job_id: str) -> None:
        self.inflight[kind].add(job_id)

    def drop(self, kind: str, job_id: str) -> None:
        self.inflight[kind].discard(job_id)

    def hold_lease(self, aggr_id: str, confirmed_at: float) -> None:
        """A lease claimed by a step sent at ``confirmed_at`` (monotonic)."""
        self.leases[aggr_id] = confirmed_at
        self._fenced.discard(aggr_id)

    def release_lease(self, aggr_id: str) -> None:
        self.leases.pop(aggr_id, None)
        self._fenced.discard(aggr_id)

    def confirm(self, aggr_id: str, sent_at: float) -> None:
        """A step sent at ``sent_at`` found the lease held and extended it."""
        if aggr_id in self.leases:
            self.leases[aggr_id] = max(self.leases[aggr_id], sent_at)
            if aggr_id in self._fenced:
                self._fenced.discard(aggr_id)
                log.info("aggr %s: lease confirmed again", aggr_id)

    def fence_at(self, aggr_id: str) -> float:
        """When (monotonic) the pool of ``aggr_id`` must have stopped its downloads."""
        return self.leases[aggr_id] + self.ttl_ms / 1000 * (1 - FENCE_MARGIN)

    # ------------------------------------------------------------------ the loop

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        interval = self.ttl_ms / 3000
        backoff = Backoff(first=0.1, most=min(1.0, interval))
        next_renewal = self.monotonic()
        while not self._stopping.is_set():
            if self.monotonic() >= next_renewal:
                renewed = self.renew_once()
                next_renewal = self.monotonic() + (interval if renewed else min(interval, backoff.next()))
                if renewed:
                    backoff.reset()
            self.fence_unconfirmed()
            self._stopping.wait(max(0.0, self._next_wake(next_renewal) - self.monotonic()))

    def _next_wake(self, next_renewal: float) -> float:
        fences = [self.fence_at(a) for a in self.leases if a not in self._fenced]
        return min([next_renewal, *fences])

    def renew_once(self) -> bool:
        """Renew everything held; False when Redis could not be reached."""
        sent = self.monotonic()
        leases = list(self.leases)
        try:
            renewal = self.store.renew(self.owner, self.ttl_ms, now=self.clock(), leases=leases,
                                       inflight={k: set(v) for k, v in self.inflight.items()})
        except StoreUnavailable:
            return False  # logged once per outage by the store
        for aggr_id in renewal.lost:
            log.warning("aggr %s: lease lost to another process, stopping its pool", aggr_id)
            self.release_lease(aggr_id)
            self.on_lost(aggr_id)
        for aggr_id in leases:
            self.confirm(aggr_id, sent)
        self._check_margin(renewal.margin_ms)
        return True

    def _check_margin(self, margin_ms: int | None) -> None:
        self.least_margin_ms = margin_ms
        if margin_ms is not None and margin_ms < self.ttl_ms * LATE_RENEWAL:
            log.warning("leases: renewed with %d ms of %d left (late: a blocked hub or a slow redis)",
                        margin_ms, self.ttl_ms)

    def fence_unconfirmed(self) -> None:
        """Tell the pools whose lease may lapse soon, unconfirmed, to interrupt their downloads."""
        now = self.monotonic()
        for aggr_id in list(self.leases):
            if aggr_id not in self._fenced and now >= self.fence_at(aggr_id):
                self._fenced.add(aggr_id)
                log.warning("aggr %s: lease unconfirmed for %.1fs (redis unreachable): interrupting its "
                            "downloads before the lease can lapse", aggr_id, now - self.leases[aggr_id])
                self.on_unconfirmed(aggr_id)
