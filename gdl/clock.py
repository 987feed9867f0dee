"""The clock a process passes to the scripts: its own, corrected by its offset
from the Redis server's clock.

Scripts never read the clock (tests drive it; some managed Redis refuse
``TIME`` in scripts), so two processes with skewed clocks would disagree on
when a rate's next start or a throttle's end comes, which matters when an
aggregation's lease passes from one to the other. Each process measures its
offset from Redis ``TIME`` at start and every ``MEASURE_INTERVAL`` (the
round trip's half taken off), passes ``local + offset`` to the scripts, and
warns once when the offset is above ``redis.max_clock_skew_ms``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import gevent

from gdl.errors import StoreUnavailable
from gdl.store import Store, now_ms

log = logging.getLogger(__name__)

MEASURE_INTERVAL = 30.0  # seconds between measurements of the offset


class RedisClock:
    """``now_ms`` plus the last measured offset from the Redis server's clock."""

    def __init__(self, max_skew_ms: int, local: Callable[[], int] = now_ms):
        self.max_skew_ms = max_skew_ms
        self.local = local
        self.offset_ms = 0
        self._warned = False

    def __call__(self) -> int:
        return self.local() + self.offset_ms

    def measure(self, store: Store) -> None:
        try:
            self.offset_ms = store.clock_offset_ms(self.local)
        except StoreUnavailable:
            return  # the store logs the outage; the last offset stands
        if abs(self.offset_ms) > self.max_skew_ms and not self._warned:
            self._warned = True
            log.warning("clock: this host's clock is %+d ms from the Redis server's (more than "
                        "redis.max_clock_skew_ms, %d): corrected, but check its time sync",
                        -self.offset_ms, self.max_skew_ms)

    def run(self, store: Store, interval: float = MEASURE_INTERVAL) -> None:
        while True:
            gevent.sleep(interval)
            self.measure(store)
