"""The store: the only module that talks to Redis.

Every key name is built here and every atomic step is one Lua script in
``gdl/lua/`` (each opens with a comment on its KEYS and ARGV). Times are
milliseconds since the epoch, passed in by the caller (no script reads the
clock, so tests drive time and processes may sit on different hosts).

Layout (``gdl:`` prefix)::

    key                        type    holds                          written by          read by
    job:<id>                   hash    job spec + Status fields       api, pool, notifier  everyone
                                       + owner (holder while in flight)
    job:<id>:log               list    JSON line per attempt           pool, notifier       api, cli
    aggr:<aggr>                hash    limit, proxy (latest enqueue)   api                  scanner
    queue:<aggr>               zset    job id -> due ms                api, pool, sweep     pool
    due                        zset    aggr id -> earliest due ms of   same scripts as      scanner
                                       its queue (the aggregation        queue:<aggr>
                                       index: no SCAN to find work)
    lease:<aggr>               string  owner token, PX lease_ttl       scanner (claim),     scanner
                                                                       keeper (renew),
                                                                       pool (release)
    inflight                   zset    job id -> deadline ms           take/settle, keeper  sweep
    callbacks                  zset    job id -> due ms                settle, api (retry)  notifier
    callbacks:inflight         zset    job id -> deadline ms           notifier, keeper     sweep
    deletions                  zset    job id -> delete-at ms          notifier             reaper
    callbacks:failed           zset    job id -> failed at ms (failed  settle (callback     api, cli
                                       callbacks: the retry list)      failed), retry       (retry-failed)
    heartbeats                 hash    process token -> JSON: roles,   every process's      api (stats,
                                       host, pid, version, start,      reporter             metrics,
                                       components' snapshots, at                            dashboard),
                                                                                            cli (status)
    active                     hash    aggr id -> owner token of the   scanner (claim,      api, cli
                                       lease its pool holds (pools     pool end), readers
                                       whose queue may be empty)       (prune stale)
    tput:<10 s bucket>         hash    downloads, bytes, failures,     every process's      api, cli
                                       callbacks, callback_failures    reporter (HINCRBY
                                       (EXPIRE 16 min)                 of its deltas)
    failures                   list    JSON per failed download        every process's      api, cli
                                       attempt, newest first (LTRIM)   reporter

    channels  wake:aggr       message: aggr id with new due work   (enqueue, retry, sweep)
              wake:callbacks  message: job id with a due callback  (settle, retry, sweep)

A job is in exactly one of queue:<aggr>, inflight, callbacks, callbacks:inflight,
deletions, callbacks:failed, or none (finished with no callback), and every
move between them is one script, so a crash at any instant loses nothing:
anything left in an in-flight set past its deadline is put back by the sweep.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import redis
import redis.exceptions
from redis.sentinel import Sentinel

from gdl.errors import StoreUnavailable
from gdl.job import Job, new_id, status_fields

log = logging.getLogger(__name__)

PREFIX = "gdl:"
WAKE_AGGR = PREFIX + "wake:aggr"
WAKE_CALLBACKS = PREFIX + "wake:callbacks"
DOWNLOADS = "downloads"
CALLBACKS = "callbacks"


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def log_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}{LOG_SUFFIX}"


LOG_SUFFIX = ":log"


def aggr_key(aggr_id: str) -> str:
    return f"{PREFIX}aggr:{aggr_id}"


def queue_key(aggr_id: str) -> str:
    return f"{PREFIX}queue:{aggr_id}"


def lease_key(aggr_id: str) -> str:
    return f"{PREFIX}lease:{aggr_id}"


DUE_INDEX = PREFIX + "due"
INFLIGHT = {DOWNLOADS: PREFIX + "inflight", CALLBACKS: PREFIX + "callbacks:inflight"}
CALLBACK_QUEUE = PREFIX + "callbacks"
DELETIONS = PREFIX + "deletions"
FAILED_CALLBACKS = PREFIX + "callbacks:failed"
# The operator view (gdl/dashboard.py, gdl/commands/): written off the hot path.
HEARTBEATS = PREFIX + "heartbeats"
ACTIVE = PREFIX + "active"
FAILURES = PREFIX + "failures"
FAILURES_KEPT = 100  # failed download attempts kept in ``failures``
TPUT_BUCKET_MS = 10_000  # width of a throughput bucket
TPUT_TTL_S = 16 * 60  # life of a bucket: the dashboard shows the last 15 minutes
INFLIGHT_READ_MAX = 20_000  # in-flight downloads read to count them per aggregation


def tput_key(bucket: int) -> str:
    """The throughput hash of 10-second bucket number ``bucket`` (ms // TPUT_BUCKET_MS)."""
    return f"{PREFIX}tput:{bucket}"
STATE_FIELD = {DOWNLOADS: "state", CALLBACKS: "callback_state"}

# Redis failures that mean "not now" rather than "wrong": translated to StoreUnavailable.
# (A ReadOnlyError is a master demoted by a failover: the next connection finds the new one.)
_UNAVAILABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.OutOfMemoryError,
    OSError,
)

F = TypeVar("F", bound=Callable[..., Any])


class Health:
    """Whether Redis answers, as this process last saw it.

    Every greenlet meets an outage; only this object logs it: one line when
    it starts, one when it ends (once :meth:`watch` is called: before that,
    at start-up or in a one-shot command, the caller reports the failure).
    ``errors`` counts failed calls for metrics.
    """

    def __init__(self) -> None:
        self.down_since: float | None = None
        self.errors = 0
        self.outages = 0
        self.watching = False

    def watch(self) -> None:
        self.watching = True

    def failed(self, exc: BaseException) -> None:
        self.errors += 1
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.outages += 1
            if self.watching:
                log.warning("redis: unavailable (%s); work pauses and resumes when it is back", exc)

    def answered(self) -> None:
        if self.down_since is not None:
            if self.watching:
                log.warning("redis: back after %.1fs", time.monotonic() - self.down_since)
            self.down_since = None


def _translated(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(self: Store, *args: Any, **kwargs: Any) -> Any:
        try:
            result = fn(self, *args, **kwargs)
        except _UNAVAILABLE as exc:
            self.health.failed(exc)
            raise StoreUnavailable(f"redis: {exc}") from exc
        if self.health.down_since is not None:
            self.health.answered()
        return result
    return wrapper  # type: ignore[return-value]


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Taken:
    """Jobs moved into an in-flight set, when the queue's next job is due, and
    the aggregation's current limit (None for the callback queue)."""

    jobs: list[Job]
    next_due: int | None
    limit: int | None = None


class Store:
    """Typed operations on gdl's Redis layout."""

    def __init__(self, client: redis.Redis, *, wait_replicas: int = 0, wait_timeout_ms: int = 1000):
        self.redis = client
        self.health = Health()
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._scripts = {name: client.register_script(_lua(name)) for name in _SCRIPTS}

    # ---------------------------------------------------------------- setup

    @classmethod
    def connect(cls, url: str, *, sentinel: list[str] | None = None, master_name: str = "",
                client_name: str = "gdl-tool", wait_replicas: int = 0) -> Store:
        """A store on ``url`` (or on the Sentinel-managed master)."""
        if sentinel:
            hosts = [(h, int(p)) for h, _, p in (s.rpartition(":") for s in sentinel)]
            client = Sentinel(hosts, socket_timeout=5).master_for(
                master_name, decode_responses=True, client_name=client_name, socket_timeout=30,
            )
        else:
            tcp = {} if url.startswith("unix:") else {"socket_keepalive": True}
            client = redis.Redis.from_url(url, decode_responses=True, client_name=client_name,
                                          socket_connect_timeout=5, health_check_interval=30, **tcp)
        return cls(client, wait_replicas=wait_replicas)

    @_translated
    def ping(self) -> None:
        self.redis.ping()

    def close(self) -> None:
        self.redis.close()

    @_translated
    def other_gdl_clients(self, own_name: str) -> set[str]:
        """Names of connected gdl clients other than ``own_name`` (embedded server's life)."""
        names = {c.get("name", "") for c in self.redis.client_list()}
        return {n for n in names if n.startswith("gdl:") and n != own_name}

    def shutdown_server(self) -> None:
        try:
            self.redis.shutdown(nosave=False)
        except _UNAVAILABLE:
            pass  # the server closes the connection as it goes

    def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return self._scripts[name](keys=keys, args=args)

    # ---------------------------------------------------------------- enqueue (api)

    @_translated
    def enqueue(self, job: Job, *, now: int) -> Job:
        """Store ``job`` and queue it due ``now``; redraws the id if it is taken."""
        while True:
            fields = job.to_hash()
            pairs = [x for kv in fields.items() for x in kv]
            keys = [job_key(job.id), aggr_key(job.aggr_id), queue_key(job.aggr_id), DUE_INDEX]
            args = [job.id, job.aggr_id, job.aggr_limit, job.aggr_proxy, now, WAKE_AGGR, *pairs]
            if self._enqueue_durably(keys, args) == 1:
                return job
            log.warning("job %s: id already taken, drawing another", job.id)
            job.id = new_id()

    def _enqueue_durably(self, keys: list[str], args: list[Any]) -> int:
        """Run the enqueue script; with ``wait_replicas``, also wait for replicas.

        Redis replicates asynchronously: a job acknowledged by a master that
        fails over before replicating it would be lost. WAIT (on the same
        connection as the write, hence the pipeline) makes the 201 mean "on
        ``wait_replicas`` replicas too"; when they do not confirm in time the
        caller gets a 503 and retries (the job may then exist twice).
        """
        if not self.wait_replicas:
            return int(self._run("enqueue", keys, args))
        with self.redis.pipeline(transaction=False) as pipe:
            self._scripts["enqueue"](keys=keys, args=args, client=pipe)
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            created, acknowledged = pipe.execute()
        if created == 1 and acknowledged < self.wait_replicas:
            raise StoreUnavailable(
                f"redis: job written but confirmed by {acknowledged} of {self.wait_replicas} replica(s)")
        return int(created)

    # ---------------------------------------------------------------- reads

    @_translated
    def get_job(self, job_id: str) -> Job | None:
        data = self.redis.hgetall(job_key(job_id))
        return Job.from_hash(data) if data else None

    @_translated
    def job_log(self, job_id: str) -> list[dict]:
        return [json.loads(line) for line in self.redis.lrange(log_key(job_id), 0, -1)]

    @_translated
    def pending_aggregations(self) -> list[tuple[str, int]]:
        """Aggregations with queued jobs and their queue sizes, oldest due first."""
        aggrs = self.redis.zrange(DUE_INDEX, 0, -1)
        with self.redis.pipeline(transaction=False) as pipe:
            for aggr in aggrs:
                pipe.zcard(queue_key(aggr))
            sizes = pipe.execute()
        return [(a, n) for a, n in zip(aggrs, sizes) if n]

    @_translated
    def queue_depths(self) -> dict[str, int]:
        """Jobs in each state's structure (and aggregations with queued jobs)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(INFLIGHT[DOWNLOADS])
            pipe.zcard(CALLBACK_QUEUE)
            pipe.zcard(INFLIGHT[CALLBACKS])
            pipe.zcard(DELETIONS)
            pipe.zcard(DUE_INDEX)
            names = ("downloads_in_flight", "callbacks_queued", "callbacks_in_flight",
                     "deletions_scheduled", "aggregations_pending")
            depths = dict(zip(names, pipe.execute()))
        depths["downloads_queued"] = sum(size for _, size in self.pending_aggregations())
        return depths

    # ---------------------------------------------------------------- scanner: leases

    @_translated
    def due_aggregations(self, now: int, limit: int = 10_000) -> list[str]:
        return self.redis.zrangebyscore(DUE_INDEX, "-inf", now, start=0, num=limit)

    @_translated
    def due_among(self, aggr_ids: list[str], now: int) -> list[str]:
        """Those of ``aggr_ids`` whose queue has a job due by ``now``."""
        with self.redis.pipeline(transaction=False) as pipe:
            for aggr_id in aggr_ids:
                pipe.zscore(DUE_INDEX, aggr_id)
            scores = pipe.execute()
        return [a for a, score in zip(aggr_ids, scores) if score is not None and score <= now]

    @_translated
    def next_aggregation_due(self) -> int | None:
        head = self.redis.zrange(DUE_INDEX, 0, 0, withscores=True)
        return int(head[0][1]) if head else None

    @_translated
    def aggregation(self, aggr_id: str) -> tuple[int, str] | None:
        data = self.redis.hgetall(aggr_key(aggr_id))
        if not data:
            return None
        return int(data.get("limit", 1)), data.get("proxy", "")

    @_translated
    def claim_lease(self, aggr_id: str, owner: str, ttl_ms: int) -> bool:
        return bool(self.redis.set(lease_key(aggr_id), owner, nx=True, px=ttl_ms))

    @_translated
    def lease_holder(self, aggr_id: str) -> str | None:
        return self.redis.get(lease_key(aggr_id))

    @_translated
    def release_lease(self, aggr_id: str, owner: str) -> bool:
        return self._run("release_lease", [lease_key(aggr_id)], [owner]) == 1

    @_translated
    def renew(self, owner: str, ttl_ms: int, *, now: int, leases: Iterable[str],
              inflight: dict[str, Iterable[str]]) -> list[str]:
        """Extend this process's leases and in-flight deadlines; returns leases lost."""
        aggrs = list(leases)
        lost: list[str] = []
        if aggrs:
            for i in self._run("renew_leases", [lease_key(a) for a in aggrs], [owner, ttl_ms]):
                lost.append(aggrs[int(i) - 1])
        with self.redis.pipeline(transaction=False) as pipe:
            for kind, ids in inflight.items():
                mapping = {job_id: now + ttl_ms for job_id in ids}
                if mapping:
                    pipe.zadd(INFLIGHT[kind], mapping, xx=True)
            pipe.execute()
        return lost

    # ---------------------------------------------------------------- pool: downloads

    @_translated
    def take_downloads(self, aggr_id: str, owner: str, *, now: int, count: int, deadline: int) -> Taken:
        keys = [queue_key(aggr_id), INFLIGHT[DOWNLOADS], DUE_INDEX, aggr_key(aggr_id)]
        args = [now, count, deadline, owner, job_key(""), "state", "in_flight", aggr_id]
        return _taken(self._run("take", keys, args))

    @_translated
    def finish_download(self, job: Job, owner: str, *, now: int, forget_at: int, log_entry: dict,
                        **status: Any) -> bool:
        """Record a final download outcome and queue the callback; a job with no
        callback (its own S3 bucket) goes straight to the deletion queue, due at
        ``forget_at``, so that its record does not outlive its usefulness."""
        if job.wants_callback:
            status["callback_state"] = "queued"
            return self._settle(job, owner, DOWNLOADS, log_entry, status,
                                enter=CALLBACK_QUEUE, score=now, wake=(WAKE_CALLBACKS, job.id))
        status["callback_state"] = "none"
        return self._settle(job, owner, DOWNLOADS, log_entry, status, enter=DELETIONS, score=forget_at)

    @_translated
    def retry_download(self, job: Job, owner: str, *, due: int, now: int, log_entry: dict | None,
                       **status: Any) -> bool:
        """Send an in-flight download back to its queue, due at ``due``.

        Only work due now wakes the scanners; later work is found by the
        scanner's timed wait on the due index.
        """
        status["state"] = "queued"
        wake = (WAKE_AGGR, job.aggr_id) if due <= now else None
        return self._settle(job, owner, DOWNLOADS, log_entry, status, enter=queue_key(job.aggr_id),
                            score=due, due_index=True, wake=wake)

    # ---------------------------------------------------------------- notifier: callbacks

    @_translated
    def take_callbacks(self, owner: str, *, now: int, count: int, deadline: int) -> Taken:
        keys = [CALLBACK_QUEUE, INFLIGHT[CALLBACKS]]
        args = [now, count, deadline, owner, job_key(""), "callback_state", "in_flight", ""]
        return _taken(self._run("take", keys, args))

    @_translated
    def callback_delivered(self, job: Job, owner: str, *, delete_at: int, log_entry: dict, **status: Any) -> bool:
        status["callback_state"] = "delivered"
        return self._settle(job, owner, CALLBACKS, log_entry, status, enter=DELETIONS, score=delete_at)

    @_translated
    def callback_failed(self, job: Job, owner: str, *, log_entry: dict, **status: Any) -> bool:
        """Mark the callback failed and list it in ``callbacks:failed`` (the retry list)."""
        status["callback_state"] = "failed"
        failed_at = int(log_entry.get("at") or now_ms())
        return self._settle(job, owner, CALLBACKS, log_entry, status, enter=FAILED_CALLBACKS, score=failed_at)

    @_translated
    def retry_callback_later(self, job: Job, owner: str, *, due: int, log_entry: dict | None,
                             **status: Any) -> bool:
        status["callback_state"] = "queued"
        return self._settle(job, owner, CALLBACKS, log_entry, status, enter=CALLBACK_QUEUE,
                            score=due, wake=(WAKE_CALLBACKS, job.id))

    @_translated
    def retry_failed_callback(self, job_id: str, *, now: int) -> int:
        """``POST /retry``: 1 queued again, 0 unknown job, -1 callback not failed."""
        keys = [job_key(job_id), CALLBACK_QUEUE, FAILED_CALLBACKS]
        return int(self._run("retry_callback", keys, [job_id, now, WAKE_CALLBACKS]))

    @_translated
    def next_callback_due(self) -> int | None:
        head = self.redis.zrange(CALLBACK_QUEUE, 0, 0, withscores=True)
        return int(head[0][1]) if head else None

    # ---------------------------------------------------------------- shared: settle and sweep

    def _settle(self, job: Job, owner: str, kind: str, log_entry: dict | None, status: dict, *,
                enter: str | None = None, score: int = 0, due_index: bool = False,
                wake: tuple[str, str] | None = None) -> bool:
        keys = [job_key(job.id), INFLIGHT[kind], log_key(job.id)]
        if enter:
            keys.append(enter)
            if due_index:
                keys.append(DUE_INDEX)
        channel, message = wake or ("", "")
        entry = json.dumps(log_entry, separators=(",", ":")) if log_entry else ""
        pairs = [x for kv in status_fields(**status).items() for x in kv]
        args = [job.id, owner, score, entry, job.aggr_id, channel, message, *pairs]
        return self._run("settle", keys, args) == 1

    @_translated
    def sweep(self, kind: str, *, now: int, limit: int = 1000) -> list[str]:
        """Put back in-flight jobs of ``kind`` whose deadline passed."""
        second = DUE_INDEX if kind == DOWNLOADS else CALLBACK_QUEUE
        wake = WAKE_AGGR if kind == DOWNLOADS else WAKE_CALLBACKS
        args = [now, limit, job_key(""), queue_key(""), STATE_FIELD[kind], kind, wake]
        return list(self._run("sweep", [INFLIGHT[kind], second], args))

    # ---------------------------------------------------------------- reaper

    @_translated
    def due_deletions(self, *, now: int, limit: int = 500) -> list[str]:
        return self.redis.zrangebyscore(DELETIONS, "-inf", now, start=0, num=limit)

    @_translated
    def forget(self, job_ids: list[str], *, now: int) -> int:
        if not job_ids:
            return 0
        return int(self._run("forget", [DELETIONS], [now, job_key(""), LOG_SUFFIX, *job_ids]))

    # ---------------------------------------------------------------- processes and stats

    @_translated
    def reports(self, component: str, *, newer_than: int) -> list[dict]:
        """``component``'s counters from each process whose heartbeat is newer
        than ``newer_than`` (what ``/stats`` and ``/metrics`` add up)."""
        out = []
        for body in self.redis.hvals(HEARTBEATS):
            beat = json.loads(body)
            snapshot = beat.get("components", {}).get(component)
            if snapshot is not None and beat.get("at", 0) >= newer_than:
                out.append(snapshot)
        return out

    # ---------------------------------------------------------------- wake-ups

    @_translated
    def subscribe(self, *channels: str) -> Any:
        """A pub/sub connection listening on ``channels`` (see :mod:`gdl.wakeup`)."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(*channels)
        return pubsub

    @_translated
    def next_message(self, pubsub: Any, timeout: float) -> tuple[str, str] | None:
        """(channel, message) from ``pubsub``, or None after ``timeout`` seconds."""
        msg = pubsub.get_message(timeout=timeout)
        if msg is None or msg.get("type") != "message":
            return None
        return msg["channel"], msg["data"]


    # ---------------------------------------------------------------- operator view
    # Heartbeats, throughput, failures and aggregations for the dashboard and
    # the operator commands. Written by the reporter (one pipeline per flush)
    # and the scanner (claim, pool end), never on a job's path.

    @_translated
    def heartbeat(self, process: str, info: dict, *, now: int, throughput: dict[str, int] | None = None,
                  failures: list[dict] | None = None) -> None:
        """A process's heartbeat, its throughput since the last one and its new failures: one round trip."""
        body = json.dumps({**info, "process": process, "at": now}, separators=(",", ":"))
        deltas = {name: int(n) for name, n in (throughput or {}).items() if n}
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(HEARTBEATS, process, body)
            if deltas:
                key = tput_key(now // TPUT_BUCKET_MS)
                for name, n in deltas.items():
                    pipe.hincrby(key, name, n)
                pipe.expire(key, TPUT_TTL_S)
            if failures:
                pipe.lpush(FAILURES, *(json.dumps(f, separators=(",", ":")) for f in failures))
                pipe.ltrim(FAILURES, 0, FAILURES_KEPT - 1)
            pipe.execute()

    @_translated
    def heartbeats(self, *, forget_before: int) -> list[dict]:
        """Every process's last heartbeat, oldest process first; those last seen before
        ``forget_before`` are dropped for good."""
        beats, gone = [], []
        for process, body in self.redis.hgetall(HEARTBEATS).items():
            beat = json.loads(body)
            if beat.get("at", 0) >= forget_before:
                beats.append(beat)
            else:
                gone.append(process)
        if gone:
            self.redis.hdel(HEARTBEATS, *gone)
        return sorted(beats, key=lambda b: (b.get("started_at", 0), b.get("process", "")))

    @_translated
    def throughput(self, *, now: int, buckets: int) -> list[tuple[int, dict[str, int]]]:
        """The ``buckets`` 10-second buckets up to the one holding ``now``, oldest first:
        (bucket start ms, counts); a bucket nobody wrote is empty."""
        last = now // TPUT_BUCKET_MS
        numbers = range(last - buckets + 1, last + 1)
        with self.redis.pipeline(transaction=False) as pipe:
            for number in numbers:
                pipe.hgetall(tput_key(number))
            found = pipe.execute()
        return [(n * TPUT_BUCKET_MS, {k: int(v) for k, v in data.items()}) for n, data in zip(numbers, found)]

    @_translated
    def recent_failures(self, limit: int = FAILURES_KEPT) -> list[dict]:
        """The latest failed download attempts, newest first."""
        return [json.loads(line) for line in self.redis.lrange(FAILURES, 0, limit - 1)]

    @_translated
    def failed_callbacks(self, limit: int | None = None, batch: int = 1000) -> list[tuple[Job, int]]:
        """Jobs whose callback failed, newest first, with when it failed (ms)."""
        entries = self.redis.zrevrange(FAILED_CALLBACKS, 0, -1 if limit is None else limit - 1, withscores=True)
        out = []
        for start in range(0, len(entries), batch):
            chunk = entries[start:start + batch]
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id, _ in chunk:
                    pipe.hgetall(job_key(job_id))
                records = pipe.execute()
            out += [(Job.from_hash(data), int(score)) for (_, score), data in zip(chunk, records) if data]
        return out

    @_translated
    def failed_callback_count(self) -> int:
        return int(self.redis.zcard(FAILED_CALLBACKS))

    @_translated
    def mark_active(self, aggr_id: str, owner: str) -> None:
        """The scanner runs a pool for ``aggr_id`` (called once it holds the lease)."""
        self.redis.hset(ACTIVE, aggr_id, owner)

    @_translated
    def unmark_active(self, aggr_id: str, owner: str) -> None:
        """The pool ended (called before its lease is released)."""
        self._run("active", [ACTIVE, lease_key(aggr_id)], [aggr_id, owner])

    @_translated
    def inflight_by_aggregation(self) -> dict[str, int]:
        """Downloads in flight per aggregation (the first INFLIGHT_READ_MAX of them)."""
        ids = self.redis.zrange(INFLIGHT[DOWNLOADS], 0, INFLIGHT_READ_MAX - 1)
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(job_key(job_id), "aggr_id")
            aggrs = pipe.execute()
        counts: dict[str, int] = {}
        for aggr in aggrs:
            if aggr is not None:
                counts[aggr] = counts.get(aggr, 0) + 1
        return counts

    @_translated
    def aggregations_view(self, *, now: int, limit: int = 500) -> tuple[list[dict], int]:
        """Aggregations with queued or in-flight work (queued ones earliest due first, at most
        ``limit``), and how many have queued work in all. From the due index and the
        active pools; no SCAN."""
        due = self.redis.zrange(DUE_INDEX, 0, limit - 1, withscores=True)
        total = int(self.redis.zcard(DUE_INDEX))
        active = self.redis.hgetall(ACTIVE)
        oldest = {aggr: int(score) for aggr, score in due}
        names = list(oldest) + sorted(set(active) - set(oldest))
        with self.redis.pipeline(transaction=False) as pipe:
            for aggr in names:
                pipe.zcard(queue_key(aggr))
                pipe.zcount(queue_key(aggr), "-inf", now)
                pipe.hgetall(aggr_key(aggr))
                pipe.get(lease_key(aggr))
            replies = pipe.execute()
        in_flight = self.inflight_by_aggregation()
        rows = []
        for i, aggr in enumerate(names):
            pending, due_now, spec, holder = replies[4 * i:4 * i + 4]
            if aggr not in oldest and active.get(aggr) != holder:
                self._run("active", [ACTIVE, lease_key(aggr)], [aggr, ""])  # its process died
                if not in_flight.get(aggr):
                    continue
            rows.append({"aggr_id": aggr, "pending": int(pending), "due_now": int(due_now),
                         "in_flight": in_flight.get(aggr, 0), "limit": int(spec.get("limit", 0) or 0),
                         "proxy": bool(spec.get("proxy")), "lease_holder": holder or "",
                         "oldest_due": oldest.get(aggr)})
        return rows, total

    # fsck: the one reader that walks the keyspace (SCAN), an operator's occasional check.

    @_translated
    def scan_page(self, cursor: int, match: str, count: int = 1000) -> tuple[int, list[str]]:
        """One SCAN step over keys matching ``match`` (a pattern built from this module's helpers)."""
        cursor, keys = self.redis.scan(cursor=cursor, match=match, count=count)
        return int(cursor), list(keys)

    def scan_keys(self, match: str) -> Iterable[str]:
        cursor = 0
        while True:
            cursor, keys = self.scan_page(cursor, match)
            yield from keys
            if cursor == 0:
                return

    def job_ids(self) -> Iterable[str]:
        """Every job id in Redis (SCAN of ``job:*``)."""
        prefix = job_key("")
        for key in self.scan_keys(prefix + "*"):
            if not key.endswith(LOG_SUFFIX):
                yield key[len(prefix):]

    def queued_aggregations(self) -> set[str]:
        """Aggregations with a queue key or a due index entry (SCAN of ``queue:*``)."""
        prefix = queue_key("")
        found = {key[len(prefix):] for key in self.scan_keys(prefix + "*")}
        return found | set(self.redis.zrange(DUE_INDEX, 0, -1))

    @_translated
    def job_fields(self, job_ids: list[str], *names: str) -> list[dict[str, str] | None]:
        """``names`` of each job, None for a job that does not exist."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.exists(job_key(job_id))
                pipe.hmget(job_key(job_id), *names)
            replies = pipe.execute()
        return [dict(zip(names, (v or "" for v in values))) if exists else None
                for exists, values in zip(replies[::2], replies[1::2])]

    @_translated
    def zset_entries(self, key: str) -> list[tuple[str, int]]:
        """Members and scores of one of this module's sorted sets (fsck)."""
        return [(m, int(s)) for m, s in self.redis.zrange(key, 0, -1, withscores=True)]

    @_translated
    def drop_dangling(self, key: str, job_ids: list[str], *, aggr_id: str | None = None) -> int:
        """Remove from ``key`` those of ``job_ids`` whose job is gone; for an aggregation queue,
        also set its due index entry to the queue's head (or remove it)."""
        keys = [key, DUE_INDEX] if aggr_id is not None else [key]
        return int(self._run("drop_dangling", keys, [job_key(""), aggr_id or "", *job_ids]))

    @_translated
    def reconcile_failed_callback(self, job_id: str, *, failed_at: int) -> int:
        """List a failed callback in the retry list or unlist one that is not: 1 added, -1 removed, 0 right."""
        return int(self._run("reconcile_failed", [job_key(job_id), FAILED_CALLBACKS], [job_id, failed_at]))


def _taken(reply: list) -> Taken:
    next_due = int(float(reply[0])) if reply[0] != "" else None
    limit = int(reply[1]) if reply[1] != "" else None
    jobs = []
    for i in range(2, len(reply), 2):
        flat = reply[i + 1]
        jobs.append(Job.from_hash(dict(zip(flat[::2], flat[1::2]))))
    return Taken(jobs, next_due, limit)


_SCRIPTS = ("enqueue", "take", "settle", "sweep", "renew_leases", "release_lease", "retry_callback", "forget")
_SCRIPTS += ("active", "drop_dangling", "reconcile_failed")  # operator view


def _lua(name: str) -> str:
    return resources.files("gdl").joinpath("lua", f"{name}.lua").read_text()

