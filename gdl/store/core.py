"""The store's core: jobs, queues, leases and in-flight records.

Every method is one Redis call or one script (``gdl/lua/``); Redis errors
that mean "not now" become :class:`~gdl.errors.StoreUnavailable`, and
:class:`~gdl.store.health.Health` logs each outage once. What the steps
answer is typed in :mod:`gdl.store.results`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from importlib import resources
from typing import Any, Self

import redis
import redis.exceptions
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

from gdl.errors import StoreUnavailable
from gdl.job import CallbackState, Job, JobState, new_id, status_fields
from gdl.store.batch import ScriptBatcher
from gdl.store.calls import by_aggregation, enqueue_call, taken_from_reply
from gdl.store.health import UNAVAILABLE as _UNAVAILABLE
from gdl.store.health import Health
from gdl.store.health import translated as _translated
from gdl.store.layout import (
    ACTIVE,
    CALLBACK_QUEUE,
    CALLBACKS,
    DELETIONS,
    DOWNLOADS,
    DUE_INDEX,
    FAILED_CALLBACKS,
    INFLIGHT,
    INFLIGHT_READ_MAX,
    PROCESSOR_SLOTS,
    PROCESSORS,
    STATE_FIELD,
    WAKE_AGGR,
    WAKE_CALLBACKS,
    aggr_key,
    job_key,
    lease_key,
    log_key,
    queue_key,
    rate_key,
)
from gdl.store.results import (
    _SETTLED,
    CallbackOutcome,
    Claim,
    DownloadOutcome,
    Enqueued,
    Idempotency,
    Renewal,
    Settled,
    Taken,
    claim_from_reply,
    enqueued_from_reply,
)

log = logging.getLogger("gdl.store")


# How many of a queue's first ids a take reports, to name as the next take's candidates.
HEAD_SEEN = 16

class JobStore:
    """Typed operations on gdl's Redis layout: the data flow of a job."""

    def __init__(self, client: redis.Redis | RedisCluster, *, wait_replicas: int = 0, wait_timeout_ms: int = 1000):
        # Any: redis-py's types cannot say that decode_responses makes every reply a str.
        self.redis: Any = client
        self.health = Health()
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._scripts = {name: client.register_script(_lua(name)) for name in _SCRIPTS}
        self._batcher = ScriptBatcher(client)
        self._heads: dict[str, list[str]] = {}  # queue key -> its first ids, as the last take saw them

    # ---------------------------------------------------------------- setup

    @classmethod
    def connect(cls, url: str, *, sentinel: list[str] | None = None, master_name: str = "",
                cluster_nodes: list[str] | None = None, client_name: str = "gdl-tool",
                wait_replicas: int = 0) -> Self:
        """A store on ``url`` (or on the Sentinel-managed master, or on a Redis Cluster)."""
        client: redis.Redis | RedisCluster
        if cluster_nodes:
            nodes = [ClusterNode(h, int(p)) for h, _, p in (s.rpartition(":") for s in cluster_nodes)]
            client = RedisCluster(startup_nodes=nodes, decode_responses=True, client_name=client_name,
                                  socket_connect_timeout=5, socket_timeout=30)
        elif sentinel:
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

    def _run_batched(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Like :meth:`_run`, sharing a pipeline with other greenlets' calls: the
        scripts that many greenlets run at once (enqueue, take, settle, and the
        claim and release of pools, which idle out together), each of which would
        otherwise hold a connection of redis-py's pool (100 at most) while it
        waits (see :mod:`gdl.store.batch`)."""
        return self._batcher.run(self._scripts[name], keys, args)

    # ---------------------------------------------------------------- enqueue (api)

    def enqueue(self, job: Job, *, now: int) -> Job:
        """Store ``job`` and queue it due ``now`` (its id redrawn if taken)."""
        self.enqueue_many([(job, None)], now=now)
        return job

    @_translated
    def enqueue_many(self, items: list[tuple[Job, Idempotency | None]], *, now: int) -> list[Enqueued]:
        """Store and queue jobs due ``now``, each one script (its idempotency key
        checked and recorded in the same step), sent in as few pipelines as the
        batcher allows; an id found taken is drawn again. Results in order."""
        results: list[Enqueued | None] = [None] * len(items)
        pending = list(range(len(items)))
        while pending:
            groups = by_aggregation(pending, items)
            calls = [enqueue_call([items[i] for i in group], now) for group in groups]
            replies = self._enqueue_durably(calls, alone=len(items) > 1)
            taken = []
            for group, group_replies in zip(groups, replies):
                for i, reply in zip(group, group_replies):
                    job = items[i][0]
                    if reply == 0:
                        log.warning("job %s: id already taken, drawing another", job.id)
                        job.id = new_id()
                        taken.append(i)
                    else:
                        results[i] = enqueued_from_reply(reply, job.id)
            pending = taken
        return [r for r in results if r is not None]

    def _enqueue_durably(self, calls: list[tuple[list[str], list[Any]]], *, alone: bool) -> list[Any]:
        """Run the enqueue scripts; with ``wait_replicas``, also wait for replicas.
        ``alone``: the calls carry many jobs (a batch request's), and go in a pipeline of
        their own rather than share one (see :meth:`ScriptBatcher.run_alone`).

        Redis replicates asynchronously: a job acknowledged by a master that
        fails over before replicating it would be lost. WAIT (on the same
        connection as the writes, hence the pipeline) makes the 201 mean "on
        ``wait_replicas`` replicas too"; when they do not confirm in time the
        caller gets a 503 and retries (with an Idempotency-Key, safely).
        """
        if not self.wait_replicas:
            run = self._batcher.run_alone if alone else self._batcher.run_many
            return run(self._scripts["enqueue"], calls)
        with self.redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                self._scripts["enqueue"](keys=keys, args=args, client=pipe)
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            *replies, acknowledged = pipe.execute()
        if any(reply == 1 for group in replies for reply in group) and acknowledged < self.wait_replicas:
            raise StoreUnavailable(
                f"redis: job written but confirmed by {acknowledged} of {self.wait_replicas} replica(s)")
        return replies

    # ---------------------------------------------------------------- reads

    @_translated
    def get_job(self, job_id: str) -> Job | None:
        data = self.redis.hgetall(job_key(job_id))
        return Job.from_hash(data) if data else None

    @_translated
    def job_log(self, job_id: str) -> list[dict]:
        return [json.loads(line) for line in self.redis.lrange(log_key(job_id), 0, -1)]

    def _inflight_downloads(self) -> list[tuple[str, str | None]]:
        """(job id, its aggregation: None for a job gone) of the downloads in flight, the first
        INFLIGHT_READ_MAX (the in-flight set is global: an aggregation's share is read from its jobs)."""
        ids = self.redis.zrange(INFLIGHT[DOWNLOADS], 0, INFLIGHT_READ_MAX - 1)
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(job_key(job_id), "aggr_id")
            return list(zip(ids, pipe.execute()))

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
    def claim(self, aggr_id: str, owner: str, ttl_ms: int, *, now: int = 0, slots: int = 0,
              fair: bool = False) -> Claim:
        """Take ``aggr_id``'s lease for a pool and mark it active: claimed with its
        limit and proxy, or refused (another process holds the lease, or the
        aggregation has no record).

        ``slots`` is what the caller's pools hold already. A ``fair`` claim by a
        registered processor (:meth:`register_processor`) is refused
        ``OVER_SHARE`` when that is more than its share of all registered
        processors' slots (see claim.lua)."""
        keys = [lease_key(aggr_id), aggr_key(aggr_id), ACTIVE, PROCESSORS, PROCESSOR_SLOTS]
        return claim_from_reply(self._run_batched("claim", keys, [owner, ttl_ms, aggr_id, now, slots, int(fair)]))

    @_translated
    def register_processor(self, owner: str, *, until: int, slots: int) -> None:
        """Count this processor in fair claims until ``until`` (ms), holding ``slots``."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(PROCESSORS, {owner: until})
            pipe.hset(PROCESSOR_SLOTS, owner, slots)
            pipe.execute()

    @_translated
    def unregister_processor(self, owner: str) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(PROCESSORS, owner)
            pipe.hdel(PROCESSOR_SLOTS, owner)
            pipe.execute()

    @_translated
    def lease_holder(self, aggr_id: str) -> str | None:
        return self.redis.get(lease_key(aggr_id))

    @_translated
    def release(self, aggr_id: str, owner: str, *, state_ttl_ms: int = 86_400_000) -> bool:
        """A pool ended: drop its active entry and its lease, if still this owner's; the
        aggregation's record expires ``state_ttl_ms`` later if nothing is queued
        and no operator paused it (ever-new aggregation ids would otherwise pile up records)."""
        keys = [lease_key(aggr_id), ACTIVE, queue_key(aggr_id), aggr_key(aggr_id)]
        return self._run_batched("release_lease", keys, [owner, aggr_id, state_ttl_ms]) == 1

    def renew(self, owner: str, ttl_ms: int, *, now: int, leases: Iterable[str],
              inflight: dict[str, Iterable[str]]) -> Renewal:
        """Extend this process's leases and in-flight deadlines.

        With nothing to extend nothing is sent: a call that reaches no Redis
        must not tell :class:`Health` that Redis answered."""
        aggrs = list(leases)
        deadlines = {kind: {job_id: now + ttl_ms for job_id in ids} for kind, ids in inflight.items()}
        if not aggrs and not any(deadlines.values()):
            return Renewal([], None)
        return self._renew(owner, ttl_ms, aggrs, deadlines)

    @_translated
    def _renew(self, owner: str, ttl_ms: int, aggrs: list[str], deadlines: dict[str, dict[str, int]]) -> Renewal:
        renewal = Renewal([], None)
        if aggrs:
            least, *lost = self._run("renew_leases", [lease_key(a) for a in aggrs], [owner, ttl_ms])
            renewal = Renewal([aggrs[int(i) - 1] for i in lost], int(least) if int(least) >= 0 else None)
        with self.redis.pipeline(transaction=False) as pipe:
            for kind, mapping in deadlines.items():
                if mapping:
                    pipe.zadd(INFLIGHT[kind], mapping, xx=True)
            pipe.execute()
        return renewal

    # ---------------------------------------------------------------- pool: downloads

    @_translated
    def take_downloads(self, aggr_id: str, owner: str, *, now: int, count: int, deadline: int,
                       lease_ttl_ms: int, busy: int = 0) -> Taken:
        """Take due jobs of ``aggr_id`` if, and only if, ``owner`` holds its lease
        (fenced: ``Taken.lease_lost`` otherwise); a take extends the lease by
        ``lease_ttl_ms``, so that what it starts is covered for that long. The
        aggregation's pause, throttle, effective limit (``busy``: the pool's
        downloads in flight) and rate may admit fewer (``Taken.gate``)."""
        keys = [queue_key(aggr_id), INFLIGHT[DOWNLOADS], DUE_INDEX, aggr_key(aggr_id), lease_key(aggr_id),
                rate_key(aggr_id)]
        return self._take(keys, [now, count, deadline, owner, "state", JobState.IN_FLIGHT, aggr_id, lease_ttl_ms,
                                 busy])

    @_translated
    def finish_download(self, job: Job, owner: str, *, state: JobState, outcome: DownloadOutcome, now: int,
                        forget_at: int, log_entry: dict, signal: dict | None = None) -> Settled:
        """Record a final download outcome (``state`` succeeded or failed, as of
        ``now``) and queue the callback; a job with no callback (its own S3 bucket)
        goes straight to the deletion queue, due at ``forget_at``, so that its
        record does not outlive its usefulness."""
        status: dict[str, Any] = {**outcome.fields(), "state": state, "finished_at": now}
        if job.wants_callback:
            status["callback_state"] = CallbackState.QUEUED
            return self._settle(job, owner, DOWNLOADS, log_entry, status,
                                enter=CALLBACK_QUEUE, score=now, wake=(WAKE_CALLBACKS, job.id), signal=signal)
        status["callback_state"] = CallbackState.NONE
        return self._settle(job, owner, DOWNLOADS, log_entry, status, enter=DELETIONS, score=forget_at,
                            signal=signal)

    @_translated
    def retry_download(self, job: Job, owner: str, *, due: int, now: int, log_entry: dict | None,
                       outcome: DownloadOutcome | None = None, signal: dict | None = None,
                       throttled: int = 0) -> Settled:
        """Send an in-flight download back to its queue, due at ``due``, with the
        attempt's ``outcome`` (none: interrupted, nothing to record). A
        ``throttled`` job (its count of throttled attempts) waits for the end of
        its aggregation's throttle instead (``signal`` ``hold``).

        Only work due now wakes the scanners; later work is found by the
        scanner's timed wait on the due index.
        """
        status: dict[str, Any] = {**(outcome.fields() if outcome else {}), "state": JobState.QUEUED}
        if throttled:
            status["throttled_attempts"] = throttled
        wake = (WAKE_AGGR, job.aggr_id) if due <= now and not throttled else None
        return self._settle(job, owner, DOWNLOADS, log_entry, status, enter=queue_key(job.aggr_id),
                            score=due, due_index=True, wake=wake, signal=signal)

    # ---------------------------------------------------------------- notifier: callbacks

    @_translated
    def take_callbacks(self, owner: str, *, now: int, count: int, deadline: int) -> Taken:
        keys = [CALLBACK_QUEUE, INFLIGHT[CALLBACKS]]
        return self._take(keys, [now, count, deadline, owner, "callback_state", CallbackState.IN_FLIGHT, "", 0, 0])

    def _take(self, keys: list[str], args: list[Any]) -> Taken:
        """Run take.lua on the queue ``keys[0]``, naming as candidates its head as
        the last take saw it (every key a script touches is declared, for Redis
        Cluster). When that was stale (new jobs, or another process's takes), the
        reply's head is due work not named: one more call takes it."""
        now, count = args[0], args[1]
        queue = keys[0]
        candidates = self._heads.get(queue, [])[:count]
        taken = self._take_named(keys, args, candidates)
        room = count - len(taken.jobs)
        if room > 0 and taken.next_due is not None and taken.next_due <= now:
            unnamed = [i for i in self._heads.get(queue, [])[:room] if i not in candidates]
            if unnamed:
                busy = args[8] + len(taken.jobs)
                more = self._take_named(keys, [now, room, *args[2:8], busy], unnamed)
                more.jobs[:0] = taken.jobs
                taken = more
        return taken

    def _take_named(self, keys: list[str], args: list[Any], candidates: list[str]) -> Taken:
        seen = max(args[1], HEAD_SEEN)
        reply = self._run_batched("take", [*keys, *map(job_key, candidates)],
                                  [*args[:8], seen, args[8], *candidates])
        if not isinstance(reply, list):  # -1: the fence refused the take
            return Taken([], None, lease_lost=True)
        head = reply[2]
        if head:
            self._heads[keys[0]] = head
        else:
            self._heads.pop(keys[0], None)
        return taken_from_reply(reply)

    @_translated
    def callback_delivered(self, job: Job, owner: str, *, outcome: CallbackOutcome, now: int, delete_at: int,
                           log_entry: dict) -> Settled:
        """Mark the callback delivered at ``now`` and schedule the job's deletion at ``delete_at``."""
        status = {**outcome.fields(), "callback_state": CallbackState.DELIVERED, "callback_due_at": 0,
                  "delivered_at": now}
        return self._settle(job, owner, CALLBACKS, log_entry, status, enter=DELETIONS, score=delete_at)

    @_translated
    def callback_failed(self, job: Job, owner: str, *, outcome: CallbackOutcome, now: int,
                        log_entry: dict) -> Settled:
        """Mark the callback failed and list it in ``callbacks:failed`` (the retry list), as of ``now``."""
        status = {**outcome.fields(), "callback_state": CallbackState.FAILED, "callback_due_at": 0}
        return self._settle(job, owner, CALLBACKS, log_entry, status, enter=FAILED_CALLBACKS, score=now)

    @_translated
    def retry_callback_later(self, job: Job, owner: str, *, due: int, log_entry: dict | None,
                             outcome: CallbackOutcome | None = None) -> Settled:
        """Queue the callback again, due at ``due``, with the attempt's ``outcome``
        (none: interrupted, nothing to record)."""
        status = {**(outcome.fields() if outcome else {}), "callback_state": CallbackState.QUEUED,
                  "callback_due_at": due}
        return self._settle(job, owner, CALLBACKS, log_entry, status, enter=CALLBACK_QUEUE,
                            score=due, wake=(WAKE_CALLBACKS, job.id))

    @_translated
    def retry_failed_callback(self, job_id: str, *, now: int) -> int:
        """``POST /retry``: 1 queued again, 0 unknown job, -1 callback not failed."""
        keys = [job_key(job_id), CALLBACK_QUEUE, FAILED_CALLBACKS]
        return int(self._run("retry_callback", keys, [job_id, now, WAKE_CALLBACKS]))

    # ---------------------------------------------------------------- shared: settle and sweep

    def _settle(self, job: Job, owner: str, kind: str, log_entry: dict | None, status: dict, *,
                enter: str | None = None, score: int = 0, due_index: bool = False,
                wake: tuple[str, str] | None = None, signal: dict | None = None) -> Settled:
        """Run settle.lua; a download's outcome is fenced by its aggregation's lease, and
        its ``signal`` (:func:`gdl.shaping.signal`) shapes the aggregation in the same step."""
        keys = [job_key(job.id), INFLIGHT[kind], log_key(job.id)]
        if enter:
            keys.append(enter)
            if due_index:
                keys.append(DUE_INDEX)
        if signal:
            keys.append(aggr_key(job.aggr_id))
        fenced = kind == DOWNLOADS
        if fenced:
            keys.append(lease_key(job.aggr_id))
        channel, message = wake or ("", "")
        entry = json.dumps(log_entry, separators=(",", ":")) if log_entry else ""
        pairs = [x for kv in status_fields(**status).items() for x in kv]
        shaping = json.dumps(signal, separators=(",", ":")) if signal else ""
        args = [job.id, owner, score, entry, job.aggr_id, channel, message, int(fenced), shaping, *pairs]
        return _SETTLED[int(self._run_batched("settle", keys, args))]

    @_translated
    def sweep(self, kind: str, *, now: int, limit: int = 1000) -> list[str]:
        """Put back in-flight jobs of ``kind`` whose deadline passed."""
        expired = self.redis.zrangebyscore(INFLIGHT[kind], "-inf", now, start=0, num=limit)
        if not expired:
            return []
        keys = [INFLIGHT[kind], DUE_INDEX if kind == DOWNLOADS else CALLBACK_QUEUE, *map(job_key, expired)]
        wake = WAKE_AGGR if kind == DOWNLOADS else WAKE_CALLBACKS
        args = [now, STATE_FIELD[kind], kind, wake, *expired]
        if kind == DOWNLOADS:
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id in expired:
                    pipe.hget(job_key(job_id), "aggr_id")
                aggrs = [aggr or "" for aggr in pipe.execute()]
            keys += map(queue_key, aggrs)
            args += aggrs
        return list(self._run("sweep", keys, args))

    # ---------------------------------------------------------------- reaper

    @_translated
    def due_deletions(self, *, now: int, limit: int = 500) -> list[str]:
        return self.redis.zrangebyscore(DELETIONS, "-inf", now, start=0, num=limit)

    @_translated
    def forget(self, job_ids: list[str], *, now: int) -> int:
        if not job_ids:
            return 0
        keys = [DELETIONS, *map(job_key, job_ids), *map(log_key, job_ids)]
        return int(self._run("forget", keys, [now, *job_ids]))

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


# Every script of gdl/lua/, registered once per store (the mixins of gdl/store/ run theirs by name too).
_SCRIPTS = ("enqueue", "take", "settle", "sweep", "claim", "renew_leases", "release_lease", "retry_callback", "forget",
            "active", "drop_dangling", "reconcile_failed",  # these three: the operator view's
            "pause_aggr", "resume_aggr", "refund_start",  # the aggregation controls' (gdl/store/aggregations.py)
            "cancel", "purge", "settle_cancelled",  # cancel and purge (gdl/store/cancel.py)
            "remember")  # reuse records (gdl/store/reuse.py)


def _lua(name: str) -> str:
    return resources.files("gdl").joinpath("lua", f"{name}.lua").read_text()
