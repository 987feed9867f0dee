"""The scanner: finds aggregations with due work and runs one pool for each.

It reads the due index (``due`` in :mod:`gdl.store`), never the keyspace.
For each due aggregation it does not run yet it claims the aggregation's
lease; while this process holds the lease no other process runs that
aggregation, which is what makes ``aggr_limit`` hold across processes. It
then starts an :class:`~gdl.pool.AggregationPool`; when the pool ends (idle,
lease lost or shutdown) the lease is released and the aggregation looked at
again.

The scanner wakes on a message for an aggregation it does not run (new work
on an idle service starts within milliseconds), when the earliest future due
time in the index comes, and every ``scan_interval`` as a fallback. At each
fallback scan it also sweeps the in-flight set: jobs whose deadline passed
(their process died) go back to their queues.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import time
from collections.abc import Callable

import gevent
import gevent.event
import gevent.pool

from gdl.config import Config
from gdl.errors import StoreUnavailable
from gdl.filestorage import Storages
from gdl.lease import Keeper
from gdl.pool import AggregationPool
from gdl.stats import ProcessorStats
from gdl.store import DOWNLOADS, Store, now_ms

log = logging.getLogger(__name__)


class Scanner:
    def __init__(self, store: Store, cfg: Config, keeper: Keeper, *, storages: Storages,
                 stats: ProcessorStats, healthy: gevent.event.Event, clock: Callable[[], int] = now_ms):
        self.store = store
        self.cfg = cfg
        self.keeper = keeper
        self.storages = storages
        self.stats = stats
        self.healthy = healthy
        self.clock = clock
        self.pools: dict[str, AggregationPool] = {}
        self.group = gevent.pool.Group()
        self._event = gevent.event.Event()
        self._woken: set[str] = set()
        self._full_scan = True
        self.stopping = False
        keeper.on_lost = self._lease_lost
        stats.gauge("pools", lambda: len(self.pools))

    # ------------------------------------------------------------------ wake-ups

    def on_wake(self, aggr_id: str | None) -> None:
        """Pub/sub handler: new due work for ``aggr_id`` (None: look at everything)."""
        pool = self.pools.get(aggr_id) if aggr_id is not None else None
        if pool is not None:
            pool.wake()
            return
        if aggr_id is None:
            self._full_scan = True
        else:
            self._woken.add(aggr_id)
        self._event.set()

    # ------------------------------------------------------------------ main loop

    def run(self) -> None:
        interval = self.cfg.processor.scan_interval
        next_full = time.monotonic()
        while not self.stopping:
            self._event.clear()
            now = self.clock()
            if time.monotonic() >= next_full:
                self._full_scan = True
                next_full = time.monotonic() + interval
            try:
                timeout = self.scan_once(now)
            except StoreUnavailable:  # logged once per outage by the store
                self._full_scan = True
                timeout = random.uniform(0.5, 1.5)
            self._event.wait(min(timeout, max(0.0, next_full - time.monotonic())))

    def scan_once(self, now: int) -> float:
        """Claim what is due; returns how long to sleep before the next due work."""
        full, self._full_scan = self._full_scan, False
        woken, self._woken = self._woken, set()
        if full:
            swept = self.store.sweep(DOWNLOADS, now=now)
            if swept:
                log.warning("scanner: put back %d job(s) whose process stopped renewing them", len(swept))
                self._remove_partial_downloads(swept)
        if self.healthy.is_set() and not self.stopping:
            if full:
                candidates = self.store.due_aggregations(now)
            else:
                candidates = self.store.due_among(sorted(woken - self.pools.keys()), now) if woken else []
            for aggr_id in candidates:
                if aggr_id not in self.pools:
                    self._claim(aggr_id)
        next_due = self.store.next_aggregation_due()
        if next_due is not None and next_due > now:
            return (next_due - now) / 1000
        return self.cfg.processor.scan_interval

    def _remove_partial_downloads(self, job_ids: list[str]) -> None:
        """Temp files a dead process left for jobs it held (named ``<job id>.*``).

        Runs right after the sweep, before this process could yield to a pool
        that takes the job again and starts a new temp file.
        """
        for job_id in job_ids:
            for path in glob.glob(os.path.join(glob.escape(self.cfg.processor.storage_dir), f"{job_id}.*")):
                try:
                    os.unlink(path)
                    log.info("job %s: removed partial download %s", job_id, path)
                except OSError:
                    pass  # gone already, or on another machine's disk

    def _claim(self, aggr_id: str) -> None:
        claimed = self.store.claim(aggr_id, self.keeper.owner, self.keeper.ttl_ms)
        if claimed is None:  # another process runs it, or it has no record: nothing to run
            return
        limit, proxy = claimed
        pool = AggregationPool(aggr_id, limit, proxy, store=self.store, cfg=self.cfg, keeper=self.keeper,
                               storages=self.storages, stats=self.stats, gate=self.healthy, clock=self.clock)
        self.keeper.leases.add(aggr_id)
        self.pools[aggr_id] = pool
        self.stats.incr("spawned")
        log.info("aggr %s: pool started (limit %d%s)", aggr_id, limit, ", proxy" if proxy else "")
        self.group.spawn(self._run_pool, aggr_id, pool)

    def _run_pool(self, aggr_id: str, pool: AggregationPool) -> None:
        try:
            pool.run()
        except gevent.GreenletExit:
            raise
        except Exception:
            log.exception("aggr %s: pool crashed", aggr_id)
        finally:
            self._pool_ended(aggr_id, pool)

    def _pool_ended(self, aggr_id: str, pool: AggregationPool) -> None:
        if self.pools.get(aggr_id) is pool:
            del self.pools[aggr_id]
        if aggr_id in self.keeper.leases:
            self.keeper.leases.discard(aggr_id)
            try:
                self.store.release(aggr_id, self.keeper.owner)
            except StoreUnavailable:
                pass  # it expires by itself within lease_ttl
        log.info("aggr %s: pool ended", aggr_id)
        # Work may have arrived between the pool's last look and the release.
        self._woken.add(aggr_id)
        self._event.set()

    def _lease_lost(self, aggr_id: str) -> None:
        pool = self.pools.get(aggr_id)
        if pool is not None:
            pool.stop()

    # ------------------------------------------------------------------ shutdown

    def stop(self) -> None:
        """Stop claiming and stop every pool from taking more work."""
        self.stopping = True
        self._event.set()
        for pool in list(self.pools.values()):
            pool.stop()

    def interrupt(self, timeout: float) -> None:
        """Kill in-flight downloads (each puts its job back), then wait for the pools."""
        for pool in list(self.pools.values()):
            pool.interrupt(timeout)
        self.group.join(timeout=timeout)

    @property
    def busy(self) -> int:
        return sum(pool.busy for pool in self.pools.values())
