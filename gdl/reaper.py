"""The reaper: deletes files, and forgets their jobs, once their time has come.

The notifier schedules a job in the deletion queue ``notifier.deletion_interval``
minutes after its callback is delivered. The reaper takes the due ones,
deletes each file from its job's storage, then forgets the jobs in one script.
Deleting is idempotent, so a crash between the two steps only means the
next pass deletes an already missing file.

The storage is the job's (:meth:`gdl.filestorage.FileStorages.for_job`), read
from the job's record, which is still there until ``forget``. A file in the
caller's own bucket (``s3_bucket``) is the caller's: it is left there and
only the job is forgotten, as the Go service did.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import gevent.event

from gdl.errors import StorageError, StoreUnavailable
from gdl.filestorage import FileStorages
from gdl.job import Job
from gdl.stats import Stats
from gdl.store import Store, now_ms

log = logging.getLogger(__name__)

BATCH = 500


class Reaper:
    def __init__(self, store: Store, filestorages: FileStorages, stats: Stats, *, interval: float,
                 clock: Callable[[], int] = now_ms):
        self.store = store
        self.filestorages = filestorages
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
            storage = self.filestorages.for_job(self._job(job_id))
            if not storage.owned:
                log.info("job %s: file left in the caller's bucket", job_id)
                done.append(job_id)
                continue
            try:
                removed = storage.delete(job_id)
            except Exception as exc:
                log.warning("job %s: file deletion failed, will retry: %s", job_id, exc,
                            exc_info=not isinstance(exc, StorageError))
                self.stats.incr("reaper_failed")
                continue
            log.info("job %s: %s", job_id, "file deleted" if removed else "file already gone")
            self.stats.incr("reaper_deleted")
            done.append(job_id)
        self.store.forget(done, now=now)
        return len(due)

    def _job(self, job_id: str) -> Job | None:
        """The job's record, to find its storage; None if gone or unreadable (then the file is ours)."""
        try:
            return self.store.get_job(job_id)
        except (TypeError, ValueError, KeyError) as exc:
            log.warning("job %s: unreadable record (%s); its file is looked for in our storage", job_id, exc)
            return None
