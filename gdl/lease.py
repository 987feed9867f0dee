"""The keeper: renews everything this process holds in Redis.

A process holds two kinds of things with an expiry: aggregation leases
(``lease:<aggr>``, so one process at a time runs an aggregation) and in-flight
records (a job's entry in an in-flight set, with a deadline). Both are
extended every third of ``processor.lease_ttl`` by this one greenlet, on the
monotonic clock. If the process dies, both run out within ``lease_ttl``: the
lease becomes claimable and the sweep puts the jobs back.

A lease found lost on renewal (Redis was away longer than the ttl and another
process claimed the aggregation) is reported to ``on_lost`` so its pool stops
taking work.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable

import gevent
import gevent.event

from gdl.errors import StoreUnavailable
from gdl.store import Store, now_ms

log = logging.getLogger(__name__)


class Keeper:
    def __init__(self, store: Store, owner: str, ttl: float, *, clock: Callable[[], int] = now_ms):
        self.store = store
        self.owner = owner
        self.ttl_ms = int(ttl * 1000)
        self.clock = clock
        self.leases: set[str] = set()
        self.inflight: dict[str, set[str]] = defaultdict(set)
        self.on_lost: Callable[[str], None] = lambda aggr_id: None
        self._stopping = gevent.event.Event()

    def deadline(self, now: int) -> int:
        return now + self.ttl_ms

    def hold(self, kind: str, job_id: str) -> None:
        self.inflight[kind].add(job_id)

    def drop(self, kind: str, job_id: str) -> None:
        self.inflight[kind].discard(job_id)

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        interval = self.ttl_ms / 3000
        next_at = time.monotonic()
        while not self._stopping.is_set():
            next_at += interval
            try:
                self.renew_once()
            except StoreUnavailable:
                pass  # logged once per outage by the store; leases outlive a short one
            self._stopping.wait(max(0.0, next_at - time.monotonic()))

    def renew_once(self) -> None:
        lost = self.store.renew(self.owner, self.ttl_ms, now=self.clock(), leases=set(self.leases),
                                inflight={k: set(v) for k, v in self.inflight.items()})
        for aggr_id in lost:
            log.warning("aggr %s: lease lost to another process, stopping its pool", aggr_id)
            self.leases.discard(aggr_id)
            self.on_lost(aggr_id)
