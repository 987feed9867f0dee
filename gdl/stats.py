"""Stats: each process's counters, reported to Redis for ``/stats/<component>``.

A :class:`Stats` holds one component's counters and gauges in memory
(incrementing is a dict update, so the hot path never waits for Redis). The
reporter greenlet writes a snapshot every ``processor.stats_interval``
seconds; the API sums the live processes' snapshots. The names follow the Go
service's stats (workers, pools, spawned, max, failures, response codes by
class; successful, failed, undefined backend for the notifier).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

import gevent.event

from gdl.errors import StoreUnavailable
from gdl.store import Store, now_ms

log = logging.getLogger(__name__)

# Download duration buckets (seconds) for the Prometheus histogram.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# Reports older than this many intervals belong to dead processes.
STALE_AFTER_INTERVALS = 3


class Stats:
    def __init__(self, component: str):
        self.component = component
        self.counters: Counter[str] = Counter()
        self.gauges: dict[str, Callable[[], float]] = {}

    def incr(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        self.gauges[name] = read

    def snapshot(self) -> dict[str, float]:
        out: dict[str, float] = dict(self.counters)
        for name, read in self.gauges.items():
            out[name] = read()
        return out


class ProcessorStats(Stats):
    def __init__(self) -> None:
        super().__init__("processor")
        self.workers = 0
        self.gauge("workers", lambda: self.workers)

    def worker_started(self) -> None:
        self.workers += 1
        self.counters["max"] = max(self.counters["max"], self.workers)

    def worker_finished(self) -> None:
        self.workers -= 1

    def download_finished(self, outcome: str, response_code: int, size: int, seconds: float) -> None:
        self.counters[f"downloads_{outcome}"] += 1
        if outcome != "succeeded":
            self.counters["failures"] += 1
        if response_code:
            self.counters[f"status_{response_code // 100}xx"] += 1
        self.counters["bytes"] += size
        self.counters["duration_seconds_sum_ms"] += int(seconds * 1000)
        for bound in DURATION_BUCKETS:
            if seconds <= bound:
                self.counters[f"duration_le_{bound}"] += 1
        self.counters["duration_count"] += 1


class NotifierStats(Stats):
    def __init__(self) -> None:
        super().__init__("notifier")
        self.in_flight = 0
        self.gauge("in_flight", lambda: self.in_flight)


class Reporter:
    """Writes every component's snapshot to Redis every ``interval`` seconds."""

    def __init__(self, store: Store, process: str, interval: float, stats: list[Stats]):
        self.store = store
        self.process = process
        self.interval = interval
        self.stats = stats
        self._stopping = gevent.event.Event()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self._stopping.is_set():
            self.report_once()
            next_at += self.interval
            self._stopping.wait(max(0.0, next_at - time.monotonic()))
        self.report_once()

    def report_once(self) -> None:
        try:
            for stats in self.stats:
                self.store.report(stats.component, self.process, stats.snapshot(), now=now_ms())
        except StoreUnavailable:
            pass  # the keeper and the pools already log the outage; the next report catches up


def summed(reports: list[dict]) -> dict[str, float]:
    """Processes' reports added up (the ``/stats`` view of a component)."""
    total: Counter[str] = Counter()
    for report in reports:
        for name, value in report.items():
            if isinstance(value, (int, float)) and name != "at":
                total[name] = max(total[name], value) if name == "max" else total[name] + value
    out: dict[str, float] = dict(total)
    out["processes"] = len(reports)
    return out
