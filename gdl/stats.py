"""Stats: each process's counters, reported to Redis for ``/stats/<component>``.

A :class:`Stats` holds one component's counters and gauges in memory
(incrementing is a dict update, so the hot path never waits for Redis). The
reporter greenlet writes a snapshot every ``processor.stats_interval``
seconds; the API sums the live processes' snapshots. Every snapshot carries
gdl's own names and the Go service's expvar names (:data:`GO_NAMES` and the
counters only the Go names have: ``spawnedWorkers``, ``maxWorkerPools``,
``failures``, ``download.response.<code>``, ``invalidProxies``), so
dashboards and alerts built on the Go service find their numbers.

The same flush writes the operator view (:mod:`gdl.dashboard`): the
process's heartbeat (roles, host, pid, version, start time and every
component's snapshot), the counters' increase since the previous flush added
into the current 10-second throughput bucket, and the failed download
attempts recorded since then. So every process contributes to the dashboard
with one pipelined round trip per interval, and none on a job's path.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any

import gevent.event

from gdl import __version__
from gdl.errors import InvalidImage, MimeMismatch, StoreUnavailable, TLSError, TruncatedBody
from gdl.store import FAILURES_KEPT, Store, now_ms

log = logging.getLogger(__name__)

# Download duration buckets (seconds) for the Prometheus histogram.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# Reports older than this many intervals belong to dead processes.
STALE_AFTER_INTERVALS = 3
# Longest error text kept in a failure record.
MAX_ERROR_LENGTH = 500
# The Go service's names for gdl's counters and gauges, by component: its name -> gdl's.
GO_NAMES: dict[str, dict[str, str]] = {
    "processor": {"workerPools": "pools", "spawnedWorkerPools": "spawned", "maxWorkers": "max",
                  "reaperFailures": "reaper_failed", "reaperSuccessfulDeletions": "reaper_deleted"},
    "notifier": {"successfulCallbacks": "successful", "failedCallbacks": "failed"},
}
# Counters that only the Go names have, reported from the start (0) so that a dashboard finds them.
GO_COUNTERS = {"processor": ("spawnedWorkers", "maxWorkerPools", "failures", "invalidProxies"), "notifier": ()}
# The highest value of one process, not a sum, when processes are added up.
MAXIMA = frozenset({"max", "maxWorkers", "maxWorkerPools"})
# Go's ``download.response.<what>`` for failures without a status code, by error type (see _response_key).
_FAILURE_KEYS = ((TLSError, "tls"), (MimeMismatch, "mime"), (InvalidImage, "image-size"), (TruncatedBody, "body"))
# Throughput fields, each the increase of some counters of one component.
THROUGHPUT: dict[str, dict[str, tuple[str, ...]]] = {
    "processor": {"downloads": ("downloads_succeeded",), "bytes": ("bytes",),
                  "failures": ("downloads_failed", "downloads_retry")},
    "notifier": {"callbacks": ("successful",), "callback_failures": ("failed", "retried")},
}


class Stats:
    def __init__(self, component: str):
        self.component = component
        self.counters: Counter[str] = Counter()
        self.gauges: dict[str, Callable[[], float]] = {}
        # Failed attempts since the last flush, for the dashboard's "latest failures".
        self.failures: deque[dict] = deque(maxlen=FAILURES_KEPT)

    def incr(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        self.gauges[name] = read

    def snapshot(self) -> dict[str, float]:
        out: dict[str, float] = {name: 0 for name in GO_COUNTERS.get(self.component, ())}
        out.update(self.counters)
        for name, read in self.gauges.items():
            out[name] = read()
        for go_name, name in GO_NAMES.get(self.component, {}).items():
            out[go_name] = out.get(name, 0)
        return out


class ProcessorStats(Stats):
    def __init__(self) -> None:
        super().__init__("processor")
        self.workers = 0
        self.gauge("workers", lambda: self.workers)

    def incr(self, name: str, n: int = 1) -> None:
        super().incr(name, n)
        if name == "spawned" and "pools" in self.gauges:
            # A pool started (the scanner counts it in its pools gauge first): Go's maxWorkerPools
            # is the most pools at once, which only the moment a pool starts can raise.
            self.counters["maxWorkerPools"] = max(self.counters["maxWorkerPools"], int(self.gauges["pools"]()))

    def download_failed(self, job: Any, err: Exception, outcome: str, at: int) -> None:
        """Remember a failed attempt (``outcome`` retry or failed) until the reporter's next flush."""
        if getattr(err, "internal", False):
            self.counters["failures"] += 1  # Go's meaning: failures on our side (disk, storage)
        if key := _response_key(err):  # as in Go, besides the status code counted when there was one
            self.counters[f"download.response.{key}"] += 1
        self.failures.append({
            "job_id": job.id, "aggr_id": job.aggr_id, "url": job.url, "outcome": outcome, "at": at,
            "error": str(err)[:MAX_ERROR_LENGTH], "response_code": getattr(err, "response_code", 0),
            "phase": getattr(err, "phase", ""),
        })

    def worker_started(self) -> None:
        self.workers += 1
        self.counters["spawnedWorkers"] += 1  # a worker greenlet per download attempt
        self.counters["max"] = max(self.counters["max"], self.workers)

    def worker_finished(self) -> None:
        self.workers -= 1

    def bytes_saved(self, *, resumed: int, reused: int) -> None:
        """Bytes a download did not fetch again: the kept prefix it resumed after, or a reused copy's."""
        if resumed:
            self.counters["resumed_bytes"] += resumed
            self.counters["downloads_resumed"] += 1
        if reused:
            self.counters["reused_bytes"] += reused
            self.counters["downloads_reused"] += 1

    def download_finished(self, outcome: str, response_code: int, size: int, seconds: float) -> None:
        self.counters[f"downloads_{outcome}"] += 1
        if response_code:
            self.counters[f"status_{response_code // 100}xx"] += 1
            self.counters[f"download.response.{response_code}"] += 1
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
    """Writes every component's snapshot, and this process's heartbeat, throughput
    and failures, to Redis every ``interval`` seconds."""

    def __init__(self, store: Store, process: str, interval: float, stats: list[Stats], *,
                 roles: Iterable[str] = (), clock: Callable[[], int] = now_ms):
        self.store = store
        self.process = process
        self.interval = interval
        self.stats = stats
        self.clock = clock
        self.info = {"roles": list(roles) or [s.component for s in stats], "host": socket.gethostname(),
                     "pid": os.getpid(), "version": __version__, "started_at": clock(),
                     "interval_ms": int(interval * 1000)}
        self._flushed: dict[str, Counter[str]] = {s.component: Counter() for s in stats}
        self._stopping = gevent.event.Event()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self._stopping.is_set():
            self.report_once()
            next_at += self.interval
            self._stopping.wait(max(0.0, next_at - time.monotonic()))
        self.report_once(state="stopped")

    def report_once(self, state: str = "running") -> None:
        now = self.clock()
        snapshots = {stats.component: stats.snapshot() for stats in self.stats}
        taken = {stats.component: _drain(stats) for stats in self.stats}
        failures = [f for batch in taken.values() for f in batch]  # oldest first: LPUSH leaves the newest on top
        try:
            self.store.heartbeat(self.process, {**self.info, "state": state, "components": snapshots}, now=now,
                                 throughput=self._increase(snapshots), failures=failures)
        except StoreUnavailable:
            for stats in self.stats:  # the next flush carries them
                stats.failures.extendleft(reversed(taken[stats.component]))
            return  # the store logs the outage
        for component, snapshot in snapshots.items():
            self._flushed[component] = Counter({k: v for k, v in snapshot.items() if isinstance(v, int)})

    def _increase(self, snapshots: dict[str, dict]) -> dict[str, int]:
        """Each throughput field's increase since the last successful flush."""
        out: dict[str, int] = {}
        for component, fields in THROUGHPUT.items():
            if component not in snapshots:
                continue
            now, then = snapshots[component], self._flushed[component]
            for name, counters in fields.items():
                out[name] = sum(max(0, int(now.get(c, 0)) - then.get(c, 0)) for c in counters)
        return out


def _drain(stats: Stats) -> list[dict]:
    batch = list(stats.failures)
    stats.failures.clear()
    return batch


def _response_key(err: Exception) -> str | None:
    """The Go service's ``download.response.<key>`` of a failure that the status code does not tell."""
    for kind, key in _FAILURE_KEYS:
        if isinstance(err, kind):
            return key
    return None


def summed(reports: list[dict]) -> dict[str, float]:
    """Processes' reports added up (the ``/stats`` view of a component)."""
    total: dict[str, float] = {}
    for report in reports:
        for name, value in report.items():
            if isinstance(value, (int, float)) and name != "at":
                before = total.get(name, 0)
                total[name] = max(before, value) if name in MAXIMA else before + value
    out = dict(total)
    out["processes"] = len(reports)
    return out
