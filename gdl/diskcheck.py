"""The disk checker: pauses downloading while the storage disk is too full.

Every ``processor.disk.interval`` seconds it reads the usage of the
filesystem holding ``processor.storage_dir``. Above ``high`` percent it
clears the ``healthy`` event: pools stop taking jobs (those in flight finish)
and the scanner claims no new aggregations. At or below ``low`` it sets the
event again and everything resumes. The gap between the two thresholds keeps
it from flapping.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable

import gevent.event

from gdl.stats import Stats

log = logging.getLogger(__name__)


def used_percent(path: str) -> float:
    usage = shutil.disk_usage(path)
    return 100.0 * usage.used / usage.total if usage.total else 0.0


class DiskChecker:
    def __init__(self, path: str, *, high: float, low: float, interval: float, stats: Stats,
                 usage: Callable[[str], float] = used_percent):
        self.path = path
        self.high = high
        self.low = low
        self.interval = interval
        self.stats = stats
        self.usage = usage
        self.healthy = gevent.event.Event()
        self.healthy.set()
        self.last = 0.0
        self._stopping = gevent.event.Event()
        stats.gauge("disk_used_percent", lambda: round(self.last, 2))
        stats.gauge("disk_paused", lambda: 0 if self.healthy.is_set() else 1)

    def check_once(self) -> bool:
        """Sample the usage and move between healthy and paused; returns healthy."""
        try:
            self.last = self.usage(self.path)
        except OSError as exc:
            log.error("disk: cannot read usage of %s: %s", self.path, exc)
            return self.healthy.is_set()
        if self.healthy.is_set() and self.last > self.high:
            log.warning("disk: %s is %.1f%% full (above %.0f%%), pausing downloads", self.path, self.last, self.high)
            self.healthy.clear()
            self.stats.incr("disk_pauses")
        elif not self.healthy.is_set() and self.last <= self.low:
            log.info("disk: %s is %.1f%% full (at or below %.0f%%), resuming downloads", self.path, self.last,
                     self.low)
            self.healthy.set()
        return self.healthy.is_set()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            self.check_once()
            self._stopping.wait(self.interval)
