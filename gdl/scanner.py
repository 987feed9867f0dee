"""The scanner: finds aggregations with due work and runs one pool for each.

It reads the due index (``due`` in :mod:`gdl.store`), never the keyspace.
For each due aggregation it does not run yet it claims the aggregation's
lease; while this process holds the lease no other process runs that
aggregation, which is what makes ``aggr_limit`` hold across processes. It
then starts an :class:`~gdl.pool.AggregationPool`; when the pool ends (idle,
lease lost or shutdown) the lease is released and the aggregation looked at
again.

With several processor processes on one Redis, claims are fair: a
processor whose pools hold more than its share of all processors' download
slots leaves a new aggregation to one below its share, and claims it itself
only if it is still unclaimed ``FAIR_SHARE_WAIT`` later (see claim.lua).
Each processor registers itself at every fallback scan while its storage is
healthy, so a processor that died or paused stops counting within
``REGISTRATION_SCANS`` scans.

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
from gdl.filestorage import FileStorages
from gdl.lease import Keeper
from gdl.pool import AggregationPool, shared_downloaders
from gdl.stats import ProcessorStats
from gdl.store import DOWNLOADS, ClaimOutcome, Store, now_ms

log = logging.getLogger(__name__)

# How long a processor over its share leaves a new aggregation to the others:
# they hear of it by the same pub/sub message, so they claim it within
# milliseconds if they are there to.
FAIR_SHARE_WAIT = 0.25
# A registration lasts this many fallback scans.
REGISTRATION_SCANS = 3


class Scanner:
    def __init__(self, store: Store, cfg: Config, keeper: Keeper, *, filestorages: FileStorages,
                 stats: ProcessorStats, healthy: gevent.event.Event, clock: Callable[[], int] = now_ms,
                 pool_class: type[AggregationPool] = AggregationPool):
        self.store = store
        self.cfg = cfg
        self.keeper = keeper
        self.filestorages = filestorages
        self.downloaders = shared_downloaders(cfg)
        self.stats = stats
        self.healthy = healthy
        self.clock = clock
        self.monotonic = keeper.monotonic  # one driven clock for leases and deferrals in tests
        self.pool_class = pool_class
        self.pools: dict[str, AggregationPool] = {}
        self.slots = 0  # the sizes of self.pools added up (fair claims), kept as pools start and end
        self.group = gevent.pool.Group()
        self._event = gevent.event.Event()
        self._woken: set[str] = set()
        self._deferred: dict[str, float] = {}  # aggr id -> monotonic time of the unconditional claim
        self._full_scan = True
        self.stopping = False
        keeper.on_lost = self._lease_lost
        keeper.on_unconfirmed = self._lease_unconfirmed
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
        try:
            self.store.unregister_processor(self.keeper.owner)
        except StoreUnavailable:
            pass  # the registration lapses by itself

    def scan_once(self, now: int) -> float:
        """Claim what is due; returns how long to sleep before the next due work."""
        full, self._full_scan = self._full_scan, False
        woken, self._woken = self._woken, set()
        if full:
            swept = self.store.sweep(DOWNLOADS, now=now)
            if swept:
                log.warning("scanner: put back %d job(s) whose process stopped renewing them", len(swept))
                self._remove_partial_downloads(swept)
        claiming = self.healthy.is_set() and not self.stopping
        if full:
            self._register(now, claiming)
        if claiming:
            if full:
                candidates = self.store.due_aggregations(now)
            else:
                candidates = self.store.due_among(sorted(woken - self.pools.keys()), now) if woken else []
            for aggr_id in candidates:
                if aggr_id not in self.pools and aggr_id not in self._deferred:
                    self._claim(aggr_id, now, fair=True)
            self._claim_deferred(now)
        timeout = self.cfg.processor.scan_interval
        next_due = self.store.next_aggregation_due()
        if next_due is not None and next_due > now:
            timeout = (next_due - now) / 1000
        if self._deferred:
            timeout = min(timeout, max(0.0, min(self._deferred.values()) - self.monotonic()))
        return timeout

    def _register(self, now: int, claiming: bool) -> None:
        """Count this process in fair claims while it claims work, and not otherwise."""
        if claiming:
            until = now + int(REGISTRATION_SCANS * self.cfg.processor.scan_interval * 1000)
            self.store.register_processor(self.keeper.owner, until=until, slots=self.slots)
        else:
            self.store.unregister_processor(self.keeper.owner)

    def _claim_deferred(self, now: int) -> None:
        """Claim, whatever the shares, what this process left to others that nobody took."""
        clock = self.monotonic()
        ripe = [aggr_id for aggr_id, at in self._deferred.items() if at <= clock]
        for aggr_id in ripe:
            del self._deferred[aggr_id]
        for aggr_id in self.store.due_among(ripe, now) if ripe else []:
            if aggr_id not in self.pools:
                self._claim(aggr_id, now, fair=False)

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

    def _claim(self, aggr_id: str, now: int, *, fair: bool) -> None:
        sent = self.keeper.monotonic()
        claimed = self.store.claim(aggr_id, self.keeper.owner, self.keeper.ttl_ms, now=now, slots=self.slots,
                                   fair=fair)
        if claimed.outcome is ClaimOutcome.OVER_SHARE:
            log.debug("aggr %s: left to a processor below its share for %.2fs", aggr_id, FAIR_SHARE_WAIT)
            self._deferred[aggr_id] = self.monotonic() + FAIR_SHARE_WAIT
            return
        if not claimed:  # another process runs it, or it has no record: nothing to run
            return
        limit, proxy = claimed.limit, claimed.proxy
        pool = self.pool_class(aggr_id, limit, proxy, store=self.store, cfg=self.cfg, keeper=self.keeper,
                               filestorages=self.filestorages, downloaders=self.downloaders, stats=self.stats,
                               gate=self.healthy, clock=self.clock)
        self.keeper.hold_lease(aggr_id, sent)
        self.pools[aggr_id] = pool
        self.slots += pool.size
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
            self.slots -= pool.size
        if aggr_id in self.keeper.leases:
            self.keeper.release_lease(aggr_id)
            try:
                self.store.release(aggr_id, self.keeper.owner,
                                   state_ttl_ms=int(self.cfg.processor.aggr_state_ttl * 1000))
            except StoreUnavailable:
                pass  # it expires by itself within lease_ttl
        log.info("aggr %s: pool ended", aggr_id)
        # Work may have arrived between the pool's last look and the release.
        self._woken.add(aggr_id)
        self._event.set()

    def _lease_lost(self, aggr_id: str) -> None:
        """Another process may run the aggregation now: take nothing more, and
        leave the origin to it (a lease is lost this way only when Redis lost
        the lease's last extensions: otherwise it was fenced before it lapsed)."""
        self.stats.incr("leases_lost")
        pool = self.pools.get(aggr_id)
        if pool is not None:
            pool.stop()
            pool.fence()

    def _lease_unconfirmed(self, aggr_id: str) -> None:
        self.stats.incr("lease_fences")
        pool = self.pools.get(aggr_id)
        if pool is not None:
            pool.fence()

    # ------------------------------------------------------------------ shutdown

    def stop(self) -> None:
        """Stop claiming and stop every pool from taking more work."""
        self.stopping = True
        self._event.set()
        for pool in list(self.pools.values()):
            pool.stop()

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the pools (stopped) to finish what they run;
        each releases its lease as it ends. True when all have ended."""
        return self.group.join(timeout=timeout)

    def interrupt(self, timeout: float) -> None:
        """Kill in-flight downloads (each puts its job back), then wait for the pools."""
        for pool in list(self.pools.values()):
            pool.interrupt(timeout)
        self.group.join(timeout=timeout)

    @property
    def busy(self) -> int:
        return sum(pool.busy for pool in self.pools.values())
