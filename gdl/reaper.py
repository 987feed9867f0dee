"""The reaper: deletes files, and forgets their jobs, once their time has come.

The notifier schedules a job in the deletion queue ``notifier.deletion_interval``
minutes after its callback is delivered. The reaper takes the due ones,
deletes each file from the file storage, then forgets the jobs in one script.
Deleting is idempotent, so a crash between the two steps only means the
next pass deletes an already missing file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import gevent.event

from gdl.errors import StoreUnavailable
from gdl.filestorage import FileStorage
from gdl.stats import Stats
from gdl.store import Store, now_ms

log = logging.getLogger(__name__)

BATCH = 500


class Reaper:
    def __init__(self, store: Store, storage: FileStorage, stats: Stats, *, interval: float,
                 clock: Callable[[], int] = now_ms):
        self.store = store
        self.storage = storage
        self.stats = stats
        self.interval = interval
        self.clock = clock
        self._stopping = gevent.event.Event()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                while self.reap_once() == BATCH and not self._stopping.is_set():
                    pass
            except StoreUnavailable:
                pass  # logged by the components that need redis to make progress
            self._stopping.wait(self.interval)

    def reap_once(self) -> int:
        """Delete what is due now; returns how many jobs were due."""
        now = self.clock()
        due = self.store.due_deletions(now=now, limit=BATCH)
        done = []
        for job_id in due:
            try:
                removed = self.storage.delete(job_id)
            except Exception:
                log.exception("job %s: file deletion failed, will retry", job_id)
                self.stats.incr("reaper_failed")
                continue
            log.info("job %s: %s", job_id, "file deleted" if removed else "file already gone")
            self.stats.incr("reaper_deleted")
            done.append(job_id)
        self.store.forget(done, now=now)
        return len(due)
