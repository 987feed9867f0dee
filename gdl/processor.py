"""The processor role: the scanner and its pools, the disk checker that
pauses them, the reaper, and the canceller (aborted downloads, purges), on
the process's store and keeper.

The Go service calls this the Processor. :class:`Processor` assembles the
parts and is what the service starts and stops: stop taking, let what is in
flight finish (:meth:`drain`), interrupt the rest (:meth:`interrupt`).
"""

from __future__ import annotations

from collections.abc import Callable

from gdl.cancelling import Canceller
from gdl.config import Config
from gdl.diskcheck import DiskChecker
from gdl.filestorage import FileStorages
from gdl.lease import Keeper
from gdl.reaper import Reaper
from gdl.resume import StalePartials
from gdl.scanner import Scanner
from gdl.stats import ProcessorStats
from gdl.store import CANCEL_CHANNEL, PURGE_CHANNEL, WAKE_AGGR, Store
from gdl.wakeup import Wakeup

# Seconds between the reaper's looks at the deletion queue.
REAPER_INTERVAL = 1.0

Spawn = Callable[[str, Callable[[], None]], None]


class Processor:
    def __init__(self, store: Store, cfg: Config, keeper: Keeper, filestorages: FileStorages, *,
                 clock: Callable[[], int]):
        self.stats = ProcessorStats()
        self.disk = DiskChecker(cfg.processor.storage_dir, high=cfg.processor.disk.high,
                                low=cfg.processor.disk.low, interval=cfg.processor.disk.interval, stats=self.stats)
        self.scanner = Scanner(store, cfg, keeper, filestorages=filestorages, stats=self.stats,
                               healthy=self.disk.healthy, clock=clock)
        self.reaper = Reaper(store, filestorages, self.stats, interval=REAPER_INTERVAL, clock=clock)
        self.partials = StalePartials(cfg.processor.storage_dir, ttl=cfg.processor.partial_ttl)
        self.canceller = Canceller(store, self.scanner, keeper, interval=cfg.processor.cancel_check_interval,
                                   deletion_delay_ms=cfg.notifier.deletion_delay_ms, clock=clock)

    @property
    def helpers(self) -> list:
        """What the service stops after the pools (anything with a ``stop()``)."""
        return [self.disk, self.reaper, self.partials, self.canceller]

    def start(self, wakeup: Wakeup, spawn: Spawn) -> None:
        wakeup.on(WAKE_AGGR, self.scanner.on_wake)
        wakeup.on(CANCEL_CHANNEL, self.canceller.on_cancel)
        wakeup.on(PURGE_CHANNEL, self.canceller.on_purge)
        self.disk.check_once()  # a full disk pauses the pools before their first take
        spawn("disk", self.disk.run)
        spawn("reaper", self.reaper.run)
        spawn("partials", self.partials.run)
        spawn("scanner", self.scanner.run)
        spawn("cancels", self.canceller.run_checks)
        spawn("purges", self.canceller.run_purges)

    def stop(self) -> None:
        self.scanner.stop()

    def drain(self, timeout: float) -> bool:
        return self.scanner.drain(timeout)

    def interrupt(self, timeout: float) -> None:
        self.scanner.interrupt(timeout)

    @property
    def busy(self) -> int:
        return self.scanner.busy
