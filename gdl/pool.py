"""Aggregation pools: one per aggregation, fed from its Redis queue by the
taking loop of :mod:`gdl.taking`.

:class:`AggregationPool` is one aggregation: its size is the aggregation's
``aggr_limit``, it owns the aggregation's lease (claimed by the scanner),
it downloads through the process's shared :class:`~gdl.download.Downloader`
for the aggregation's proxy (kept-alive connections outlive a pool), and it
ends after ``processor.pool_idle_timeout`` without work.
Each greenlet of the pool runs one job's exchange with the origin; storing
the file and settling the outcome follow in the taking loop's ``finishing``
pool, so that the slot, the aggregation's limit, counts requests the origin
is serving and a freed slot is refilled at once. A job whose cancel was
requested (:meth:`AggregationPool.cancel`, or a mark found on settling it)
is aborted and settled cancelled instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import gevent.pool

from gdl import resume, sentry, shaping
from gdl.backoff import retry_delay
from gdl.config import Config
from gdl.download import Attempt, Downloader, Downloaders, Fetched
from gdl.errors import DownloadError, StoreUnavailable, Throttled, UnexpectedError
from gdl.filestorage import FileStorages
from gdl.filestorage.base import remove_quietly
from gdl.job import Job, JobState
from gdl.lease import Keeper
from gdl.netguard import AddressGuard
from gdl.reuse import Reuse, eligible
from gdl.stats import ProcessorStats
from gdl.store import DOWNLOADS, DownloadOutcome, Settled, Store, Taken
from gdl.taking import TakingPool

log = logging.getLogger(__name__)

class DownloadCancelled(gevent.GreenletExit):
    """Thrown into a download's greenlet to abort it: its job's cancel was requested.
    A kind of GreenletExit, so that whatever a kill cleans up (the connection, the
    temp file) this cleans up too."""


class AggrLog(logging.LoggerAdapter):
    """Prefixes lines with the aggregation id: ``aggr <id>: job <id>: ...``."""

    def process(self, msg: str, kwargs: Any) -> tuple[str, Any]:
        return f"aggr {(self.extra or {})['aggr_id']}: {msg}", kwargs


class AggregationPool(TakingPool):
    """One aggregation's downloads, at most ``aggr_limit`` at once."""

    kind = DOWNLOADS

    def __init__(self, aggr_id: str, limit: int, proxy: str, *, store: Store, cfg: Config, keeper: Keeper,
                 filestorages: FileStorages, downloaders: Downloaders, stats: ProcessorStats,
                 gate: gevent.event.Event | None, clock: Callable[[], int]):
        super().__init__(size=limit, keeper=keeper, clock=clock, idle_timeout=cfg.processor.pool_idle_timeout,
                         gate=gate, logger=AggrLog(log, {"aggr_id": aggr_id}))
        self.aggr_id = aggr_id
        self.store = store
        self.cfg = cfg.processor
        self.deletion_delay_ms = cfg.notifier.deletion_delay_ms
        self.filestorages = filestorages
        self.stats = stats
        self.downloaders = downloaders
        self.downloader = downloaders.acquire(proxy)
        self.reuse = Reuse(store, filestorages.default, default_headers=self.cfg.request_headers,
                           max_ttl=self.cfg.reuse_max_ttl)
        self._rate_tat = ""  # the GCRA time this pool's last take or refund wrote (see _give_back_start)
        self._fetchers: dict[str, gevent.Greenlet] = {}  # job id -> the greenlet of its download (see _fetch)

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.downloaders.release(self.downloader)

    def take(self, now: int, count: int) -> Taken:
        sent = self.keeper.monotonic()
        taken = self.store.take_downloads(self.aggr_id, self.keeper.owner, now=now, count=count,
                                          deadline=self.keeper.deadline(now), lease_ttl_ms=self.keeper.ttl_ms,
                                          busy=self.busy)
        if not taken.lease_lost:
            self.keeper.confirm(self.aggr_id, sent)
        if taken.rate_tat:
            self._rate_tat = taken.rate_tat
        return taken

    def _give_back_start(self, job: Job) -> None:
        """A job answered from a stored copy made no request: the rate start its take
        charged is given back (refund_start.lua), so reuse never slows the aggregation's
        downloads. Refused, harmlessly, when another take came between."""
        if not self._rate_tat:
            return
        try:
            written = self.store.refund_start(self.aggr_id, now=self.clock(), expected=self._rate_tat)
        except StoreUnavailable:
            return  # the start stays charged: the rate is only kept stricter
        if written is not None:
            self._rate_tat = written
            self.log.debug("job %s: answered from a stored copy, its rate start given back", job.id)
            self.wake()

    def fence(self) -> None:
        """Interrupt the downloads in flight (their connections close; each job is
        put back if Redis answers, else left to the sweep): the lease may pass to
        another process, which must find the origin free of ours."""
        downloading = list(self._fetchers.values())
        if downloading:
            self.log.warning("interrupting %d download(s) in flight", len(downloading))
            gevent.killall(downloading, block=False)

    def cancel(self, job_id: str) -> bool:
        """Abort the download of ``job_id`` if this pool is fetching it (its greenlet then
        settles it cancelled); False when it is not fetching it."""
        fetcher = self._fetchers.get(job_id)
        if fetcher is None:
            return False
        self.log.info("job %s: cancel requested, aborting its download", job_id)
        fetcher.kill(DownloadCancelled, block=False)
        return True

    def handle(self, job: Job) -> None:
        """The job's exchange with the origin, in one of the pool's slots; the
        rest (storing the file, writing the outcome) is finished off outside it."""
        if job.status.cancel:  # marked while in flight, then put back by a sweep: nothing to fetch
            self._cancelled(job)
            return
        started = time.monotonic()
        begun = self.clock()  # this attempt's start, for the job's started_at and timings
        self.stats.worker_started()
        fetched: Fetched | None = None
        error: Exception | None = None
        try:
            fetched = self._fetch(job)
        except DownloadCancelled:
            self.finish_off(job, lambda: self._cancelled(job))
            return
        except gevent.GreenletExit:
            self._put_back(job)
            raise
        except Exception as exc:
            error = exc
        finally:
            self.stats.worker_finished()
        if isinstance(error, DownloadError) and shaping.is_congestion(error):
            # The origin's "slow down" (a 429's pause, an adaptive cut) is written before
            # this slot frees: a take in between would start what the pause forbids.
            self._finish(job, fetched, error, started, begun)
            return
        self.finish_off(job, lambda: self._finish(job, fetched, error, started, begun))

    def _finish(self, job: Job, fetched: Fetched | None, error: Exception | None, started: float,
                begun: int) -> None:
        """Store what the exchange brought and settle the job (or put it back if interrupted)."""
        try:
            if fetched is not None:
                if fetched.attempt.reused and not fetched.contacted:
                    self._give_back_start(job)
                try:
                    self._store(fetched, job)
                except Exception as exc:  # GreenletExit is no Exception: it puts the job back below
                    error = exc
            if error is None:
                assert fetched is not None
                self._succeeded(job, fetched, started, _results(job, fetched.attempt, begun, self.clock()))
            else:
                self._settle_error(job, error, fetched, started, begun)
        except gevent.GreenletExit:
            self._put_back(job)
            raise

    def _settle_error(self, job: Job, error: Exception, fetched: Fetched | None, started: float,
                      begun: int) -> None:
        attempt = getattr(fetched, "attempt", None)
        if isinstance(error, DownloadError):
            results = _results(job, error.attempt or attempt, begun, self.clock(), failed=True)
            self._failed(job, error, started, results)
            return
        # A bug or an unexpected library error: reported, retried as an attempt.
        self.log.error("job %s: unexpected error", job.id, exc_info=error)
        sentry.report(error, component="processor", aggr_id=self.aggr_id, job_id=job.id)
        self._failed(job, UnexpectedError(f"unexpected error: {type(error).__name__}: {error}"), started,
                     _results(job, attempt, begun, self.clock(), failed=True))

    def _fetch(self, job: Job) -> Fetched:
        """The download itself: the part that talks to the origin.

        It runs in a greenlet of its own, the one :meth:`cancel` and :meth:`fence` kill: a
        kill lands in the download, or nowhere once the download is done (a kill of a dead
        greenlet does nothing), never in the storing of the file or the settling of its
        outcome. Killed by a fence, the download's GreenletExit reaches :meth:`handle`,
        which puts the job back."""
        timeout = job.download_timeout or self.cfg.download_timeout
        partial = resume.usable(job) if self.cfg.resume else None

        def download(conditional: list[tuple[str, str]]) -> Fetched:
            return self.downloader.fetch(job, timeout=timeout, partial=partial, conditional=conditional)

        def fetch() -> Fetched:
            if eligible(job):
                return self.reuse.fetch(job, download, now=self.clock())
            return download([])

        fetcher = gevent.spawn(_outcome, fetch)
        self._fetchers[job.id] = fetcher
        try:
            outcome = fetcher.get()
        finally:
            self._fetchers.pop(job.id, None)
            if not fetcher.dead:  # this greenlet was interrupted (shutdown): so is its download
                fetcher.kill(block=True)
        if isinstance(outcome, BaseException):  # killed before it began: gevent returns the exception
            raise outcome
        fetched, error = outcome
        if error is not None:
            raise error
        return fetched

    def _store(self, fetched: Fetched, job: Job) -> None:
        if fetched.stored:
            return
        storage = self.filestorages.for_job(job)
        sha256 = fetched.attempt.sha256
        if fetched.body is not None:
            storage.store_bytes(fetched.body, job, sha256=sha256)
        else:
            try:
                storage.store(fetched.path, job, sha256=sha256)
            except BaseException:
                remove_quietly(fetched.path)
                raise
        self.reuse.remember(job, fetched, now=self.clock())

    def _succeeded(self, job: Job, fetched: Fetched, started: float, results: dict[str, Any]) -> None:
        now = self.clock()
        attempts = job.status.attempts + (1 if fetched.contacted else 0)
        self.log.info("job %s: stored %d bytes%s in %.0f ms", job.id, fetched.size,
                      f" ({fetched.mime})" if fetched.mime else "", (time.monotonic() - started) * 1000)
        self.stats.download_finished("succeeded", fetched.response_code, fetched.size, time.monotonic() - started)
        self.stats.bytes_saved(resumed=fetched.attempt.resumed_bytes, reused=fetched.size if fetched.stored else 0)
        resume.discard(job)
        entry = _log_entry("succeeded", now, attempts, started, response_code=fetched.response_code,
                           bytes=fetched.size)
        outcome = DownloadOutcome(attempts, response_code=fetched.response_code, bytes=fetched.size,
                                  image_size=fetched.image_size, mime=fetched.mime, partial=_no_partial(job),
                                  **results)
        ok = self._signal(now, ok=True)
        settled = self.settle("success", job, lambda: self.store.finish_download(
            job, self.keeper.owner, state=JobState.SUCCEEDED, outcome=outcome, now=now,
            forget_at=self._forget_at(now), log_entry=entry, signal=ok))
        if settled is Settled.CANCEL_REQUESTED:
            self._cancelled(job, stored=True)

    def _signal(self, now: int, **what: Any) -> dict:
        return shaping.signal(now, busy=self.busy, window_ms=int(self.cfg.aimd_window * 1000), **what)

    def _failed(self, job: Job, err: DownloadError, started: float, results: dict[str, Any]) -> None:
        now = self.clock()
        pause = shaping.throttle_pause_ms(err, max_retry_after=self.cfg.max_retry_after)
        if pause is not None and job.status.throttled_attempts + 1 < self.cfg.max_throttled_attempts:
            self._throttled(job, err, started, now, pause)
            return
        if pause is not None:
            err = Throttled(err)
        signal = self._signal(now, throttle=pause, congested=shaping.is_congestion(err))
        attempts = job.status.attempts + (0 if err.internal else 1)
        max_retries = job.max_retries if job.max_retries is not None else self.cfg.max_retries
        retry = err.retriable and (err.internal or attempts <= max_retries)
        result = "retry" if retry else "failed"
        if err.internal:  # our disk or our storage: someone should look
            self.log.warning("job %s: internal error: %s", job.id, err)
            sentry.report(err, component="processor", aggr_id=self.aggr_id, job_id=job.id)
        self.stats.download_finished(result, err.response_code, 0, time.monotonic() - started)
        self.stats.download_failed(job, err, result, now)
        entry = _log_entry(result, now, attempts, started, response_code=err.response_code, error=str(err),
                           phase=err.phase)
        if retry:
            delay = retry_delay(attempts, self.cfg.retry_backoff, at_least=err.retry_after)
            due = now + int(delay * 1000)
            which = "not counted (ours)" if err.internal else f"{attempts} of {max_retries}"
            self.log.info("job %s: %s; retry %s in %.0fs", job.id, err, which, delay)
            # Only the final attempt describes itself; a retry records when the first one began.
            retried = DownloadOutcome(attempts, error=str(err), response_code=err.response_code,
                                      started_at=results.get("started_at", 0), partial=_retry_partial(job, err))
            settled = self.settle("retry", job, lambda: self.store.retry_download(
                job, self.keeper.owner, due=due, now=now, log_entry=entry, outcome=retried, signal=signal))
            self.wake()  # the loop may be sleeping past this retry's due time
        else:
            self.log.info("job %s: failed after %d attempt(s): %s", job.id, attempts, err)
            if err.attempt is not None and err.attempt.kept is not None:
                err.attempt.kept.remove()
            resume.discard(job)
            failed = DownloadOutcome(attempts, error=str(err), response_code=err.response_code,
                                     partial=_no_partial(job), **results)
            settled = self.settle("failure", job, lambda: self.store.finish_download(
                job, self.keeper.owner, state=JobState.FAILED, outcome=failed, now=now,
                forget_at=self._forget_at(now), log_entry=entry, signal=signal))
        if settled is Settled.CANCEL_REQUESTED:
            self._cancelled(job)

    def _throttled(self, job: Job, err: DownloadError, started: float, now: int, pause: int) -> None:
        """The origin asked the aggregation to slow down: the job waits for the pause's
        end (settle.lua), counting a throttled attempt and none of its ``max_retries``."""
        throttled = job.status.throttled_attempts + 1
        self.log.info("job %s: %s; aggregation paused (%s), throttled attempt %d of %d", job.id, err,
                      "Retry-After" if pause >= 0 else "no Retry-After", throttled, self.cfg.max_throttled_attempts)
        self.stats.download_finished("retry", err.response_code, 0, time.monotonic() - started)
        self.stats.download_failed(job, err, "retry", now)
        entry = _log_entry("throttled", now, job.status.attempts, started, response_code=err.response_code,
                           error=str(err))
        outcome = DownloadOutcome(job.status.attempts, error=str(err), response_code=err.response_code,
                                  partial=_retry_partial(job, err))
        signal = self._signal(now, throttle=pause, congested=True, hold=True)
        settled = self.settle("throttled retry", job, lambda: self.store.retry_download(
            job, self.keeper.owner, due=now, now=now, log_entry=entry, outcome=outcome, signal=signal,
            throttled=throttled))
        if settled is Settled.CANCEL_REQUESTED:
            self._cancelled(job)

    def _forget_at(self, now: int) -> int:
        """When a job with no callback is forgotten: as long after as a delivered one."""
        return now + self.deletion_delay_ms

    def _put_back(self, job: Job) -> None:
        """Interrupted (shutdown, or a lease that may lapse): due now again, no attempt counted."""
        now = self.clock()
        try:
            settled = self.store.retry_download(job, self.keeper.owner, due=now, now=now, log_entry=None)
        except StoreUnavailable as exc:
            self.log.warning("job %s: interrupted, left to the sweep, redis unavailable: %s", job.id, exc)
            return
        if settled is Settled.CANCEL_REQUESTED:
            self._cancelled(job)
        elif settled:
            self.log.info("job %s: interrupted, put back in the queue", job.id)
        else:
            self.log.warning("job %s: interrupted, left to the sweep: %s", job.id, settled.value)

    def _cancelled(self, job: Job, *, stored: bool = False) -> None:
        """Settle ``job`` cancelled (its cancel was requested); a file stored for it
        before the cancel won is deleted (settle.lua refused its success)."""
        if stored:
            self.filestorages.for_job(job).delete(job.id)
        resume.discard(job)
        now = self.clock()
        entry = {"kind": "download", "outcome": "cancelled", "at": now, "attempt": job.status.attempts}
        settled = self.settle("cancel", job, lambda: self.store.settle_cancelled(
            job, self.keeper.owner, now=now, forget_at=self._forget_at(now), log_entry=entry))
        if settled:
            self.stats.incr("cancelled")
            self.log.info("job %s: cancelled", job.id)


# A process's pools share one Downloader per proxy (Downloaders), so it keeps
# idle connections for as many downloads as all of them run at once, and
# pools for as many hosts as they fetch from (the requests engine's sizes;
# the curl engine keeps its idle connections in the process's multi handle).
SHARED_CONNECTIONS_PER_HOST = 1024
SHARED_HOSTS = 1024


def shared_downloaders(cfg: Config) -> Downloaders:
    """The :class:`~gdl.download.Downloaders` of a processor with this configuration."""
    guard = AddressGuard.from_config(cfg.security)

    def make(proxy: str) -> Downloader:
        return Downloader(proxy=proxy, default_headers=cfg.processor.request_headers,
                          scratch_dir=cfg.processor.storage_dir, chunk_size=cfg.processor.chunk_size,
                          max_bytes=cfg.security.max_download_bytes, max_redirects=cfg.security.max_redirects,
                          guard=guard, pool_size=SHARED_CONNECTIONS_PER_HOST, hosts=SHARED_HOSTS,
                          engine=cfg.http.engine,
                          resume_min_bytes=cfg.processor.resume_min_bytes if cfg.processor.resume else 0)

    return Downloaders(make)


def _outcome(fetch: Callable[[], Fetched]) -> tuple[Any, BaseException | None]:
    """``fetch``'s result or exception, as a value: the greenlet running it ends without an
    error for the hub to print, and its waiter raises the exception (see AggregationPool._fetch)."""
    try:
        return fetch(), None
    except BaseException as exc:  # noqa: BLE001 - handed to the waiting greenlet, which raises it
        return None, exc


def _log_entry(outcome: str, now: int, attempt: int, started: float, **extra: Any) -> dict:
    return {"kind": "download", "outcome": outcome, "at": now, "attempt": attempt,
            "duration_ms": int((time.monotonic() - started) * 1000), **extra}


def _results(job: Job, attempt: Attempt | None, begun: int, now: int, *, failed: bool = False) -> dict[str, Any]:
    """The status fields describing this attempt as far as it got (:meth:`gdl.job.Job.results`),
    those at their default left out to keep the job's hash small.

    Times: ``begun`` and ``now`` are the pool's clock (ms); ttfb and download are
    measured on the monotonic clock; ``total_ms`` is never less than their sum
    with ``wait_ms``, whatever the wall clock did meanwhile.
    """
    wait_ms = max(0, begun - job.created_at) if job.created_at else 0
    out: dict[str, Any] = {"started_at": job.status.started_at or begun, "wait_ms": wait_ms}
    if attempt is not None:
        download_ms = max(0, int((time.monotonic() - attempt.head_at) * 1000)) if attempt.head_at else 0
        out.update(sha256="" if failed else attempt.sha256, content_type=attempt.content_type,
                   # Most downloads end where they began: the job's url then says it, once.
                   final_url=attempt.final_url if attempt.final_url != job.url else "",
                   redirects=attempt.redirects, etag=attempt.etag,
                   last_modified=attempt.last_modified, ttfb_ms=attempt.ttfb_ms, download_ms=download_ms,
                   resumed_bytes=attempt.resumed_bytes, reused=attempt.reused)
        if failed:  # a success's size is written as its bytes already
            out["bytes"] = attempt.size
    timed = wait_ms + out.get("ttfb_ms", 0) + out.get("download_ms", 0)
    out["total_ms"] = max(now - job.created_at if job.created_at else 0, timed)
    if job.status.started_at:
        del out["started_at"]  # written by the first attempt
    return {name: value for name, value in out.items() if value}


def _retry_partial(job: Job, err: DownloadError) -> dict[str, Any]:
    """The status fields of the partial file a retry resumes from: the one this attempt kept, or none."""
    kept = err.attempt.kept if err.attempt is not None else None
    return kept.fields() if kept is not None else _no_partial(job)


def _no_partial(job: Job) -> dict[str, Any]:
    """The status fields clearing the job's record of a partial file, if it has one."""
    return dict(resume.NO_PARTIAL) if job.status.partial_path else {}

