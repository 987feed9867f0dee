"""The notifier: delivers each finished job's callback, at least once.

Jobs whose download ended (succeeded, failed or cancelled) wait in the callback queue.
The notifier takes due ones into the callback in-flight set (the same
reliable pattern as the processor: a deadline renewed by the keeper, swept
when a process dies) and runs up to ``notifier.concurrency`` deliveries at
once through the backend the job names (:mod:`gdl.backends`), each
attempt signed when ``notifier.signing_secrets`` are set (:mod:`gdl.signing`).

A delivered callback schedules the job's deletion ``deletion_interval``
minutes later (the reaper then deletes the file and the record). A failed
delivery is retried after ``attempt * notifier.retry_backoff`` up to
``notifier.max_retries`` times (the log line, the job's ``callback_due_at``
and its attempt's ``next_at`` say when), then marked failed; ``POST
/retry/<id>`` puts it back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import gevent
import gevent.event

from gdl import callback, sentry, signing
from gdl.backends import Backend
from gdl.backoff import retry_delay
from gdl.config import Config
from gdl.errors import CallbackError, StoreUnavailable, UndefinedBackend, UnknownTopic
from gdl.filestorage import FileStorages
from gdl.job import Job
from gdl.lease import Keeper
from gdl.stats import NotifierStats
from gdl.store import CALLBACKS, CallbackOutcome, Store, Taken, now_ms
from gdl.taking import TakingPool

log = logging.getLogger(__name__)


class Notifier(TakingPool):
    kind = CALLBACKS

    def __init__(self, store: Store, cfg: Config, keeper: Keeper, backends: dict[str, Backend], *,
                 stats: NotifierStats, filestorages: FileStorages | None = None, clock: Callable[[], int] = now_ms):
        super().__init__(size=cfg.notifier.concurrency, keeper=keeper, clock=clock, logger=log)
        self.store = store
        self.cfg = cfg.notifier
        self.filestorages = filestorages or FileStorages.from_config(cfg)  # the stored files' URLs
        self.sweep_interval = cfg.processor.scan_interval
        self.backends = backends
        self.stats = stats
        self.signer = signing.Signer.from_secrets(cfg.notifier.signing_secrets)
        self._sweeper: gevent.Greenlet | None = None

    def on_wake(self, _job_id: str | None) -> None:
        self.wake()

    def run(self) -> None:
        for backend in self.backends.values():
            backend.start()
        self._sweeper = gevent.spawn(self._sweep_forever)
        try:
            super().run()
        finally:
            self._sweeper.kill()
            for backend in self.backends.values():
                backend.stop()

    def take(self, now: int, count: int) -> Taken:
        return self.store.take_callbacks(self.keeper.owner, now=now, count=count, deadline=self.keeper.deadline(now))

    def handle(self, job: Job) -> None:
        started = time.monotonic()
        self.stats.in_flight += 1
        try:
            status = self._deliver(job)
        except CallbackError as err:
            self._failed(job, err, started)
        except gevent.GreenletExit:
            self._put_back(job)
            raise
        except Exception as exc:  # a bug or a library surprise: reported, retried as an attempt
            log.exception("job %s: unexpected error delivering the callback", job.id)
            sentry.report(exc, component="notifier", job_id=job.id)
            self._failed(job, CallbackError(f"unexpected error: {type(exc).__name__}: {exc}"), started)
        else:
            self._delivered(job, status, started)
        finally:
            self.stats.in_flight -= 1

    def _deliver(self, job: Job) -> int:
        backend = self.backends.get(job.callback_type)
        if backend is None:
            raise UndefinedBackend(job.callback_type)
        url = self.filestorages.url_for(job) if job.succeeded else ""
        # Serialised once for this attempt: the bytes signed are the bytes sent.
        body = callback.encode(callback.payload(job, download_url=url))
        return backend.notify(job.callback_dst, body, self.signer.headers(job.id, body, now_ms=self.clock()))

    def _delivered(self, job: Job, status: int, started: float) -> None:
        now = self.clock()
        attempts = job.status.callback_attempts + 1
        delete_at = now + self.cfg.deletion_delay_ms
        log.info("job %s: callback delivered to %s (%d) in %.0f ms", job.id, job.callback_dst, status,
                 (time.monotonic() - started) * 1000)
        self.stats.incr("successful")
        entry = _log_entry("delivered", now, attempts, started, status=status)
        outcome = CallbackOutcome(attempts, code=status)
        self.settle("delivery", job, lambda: self.store.callback_delivered(
            job, self.keeper.owner, outcome=outcome, now=now, delete_at=delete_at, log_entry=entry))

    def _failed(self, job: Job, err: CallbackError, started: float) -> None:
        now = self.clock()
        attempts = job.status.callback_attempts + 1
        entry = _log_entry("retry", now, attempts, started, status=err.status, error=str(err))
        outcome = CallbackOutcome(attempts, error=str(err), code=err.status)
        if isinstance(err, UndefinedBackend):
            self.stats.incr("undefined_backend")
        elif isinstance(err, UnknownTopic):
            self.stats.incr("kafka_unknown_topic")
        if err.retriable and attempts <= self.cfg.max_retries:
            delay = retry_delay(attempts, self.cfg.retry_backoff)
            due = now + int(delay * 1000)
            log.info("job %s: %s; retry %d of %d in %.0fs", job.id, err, attempts, self.cfg.max_retries, delay)
            self.stats.incr("retried")
            entry["next_at"] = due
            self.settle("callback retry", job, lambda: self.store.retry_callback_later(
                job, self.keeper.owner, due=due, log_entry=entry, outcome=outcome))
            return
        log.warning("job %s: callback failed after %d attempt(s): %s", job.id, attempts, err)
        self.stats.incr("failed")
        entry["outcome"] = "failed"
        self.settle("callback failure", job, lambda: self.store.callback_failed(
            job, self.keeper.owner, outcome=outcome, now=now, log_entry=entry))

    def _put_back(self, job: Job) -> None:
        now = self.clock()
        log.info("job %s: callback interrupted, put back", job.id)
        try:
            self.store.retry_callback_later(job, self.keeper.owner, due=now, log_entry=None)
        except StoreUnavailable as exc:
            log.warning("job %s: callback left to the sweep, redis unavailable: %s", job.id, exc)

    def _sweep_forever(self) -> None:
        while not self.stopping:
            try:
                swept = self.store.sweep(CALLBACKS, now=self.clock())
                if swept:
                    log.warning("notifier: put back %d callback(s) whose process stopped renewing them",
                                len(swept))
            except StoreUnavailable:
                pass  # the loop logs the outage
            gevent.sleep(self.sweep_interval)


def _log_entry(outcome: str, now: int, attempt: int, started: float, **extra: object) -> dict:
    return {"kind": "callback", "outcome": outcome, "at": now, "attempt": attempt,
            "duration_ms": int((time.monotonic() - started) * 1000), **extra}
