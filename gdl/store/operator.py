"""The store's operator view: heartbeats, throughput, failures, aggregations
and the repairs of ``gdl fsck``, for the dashboard and the operator commands.

Written by the reporter (one pipeline per flush) and the scanner (claim,
pool end), never on a job's path.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import redis.exceptions
from redis.cluster import RedisCluster

from gdl.job import Job
from gdl.store.core import JobStore, _translated
from gdl.store.layout import (
    ACTIVE,
    CALLBACK_QUEUE,
    CALLBACKS,
    DELETIONS,
    DOWNLOADS,
    DUE_INDEX,
    FAILED_CALLBACKS,
    FAILURES,
    FAILURES_KEPT,
    HEARTBEATS,
    INFLIGHT,
    LEGACY_PREFIX,
    LOG_SUFFIX,
    PAUSED,
    PREFIX,
    TPUT_BUCKET_MS,
    TPUT_TTL_S,
    aggr_key,
    job_key,
    lease_key,
    queue_key,
    tput_key,
)


class OperatorView(JobStore):
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
    def inflight_by_aggregation(self) -> dict[str, int]:
        """Downloads in flight per aggregation (the first INFLIGHT_READ_MAX of them)."""
        counts: dict[str, int] = {}
        for _, aggr in self._inflight_downloads():
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
        paused = set(self.redis.smembers(PAUSED))  # out of the due index while paused
        names = list(oldest) + sorted((set(active) | paused) - set(oldest))
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
                self._run("active", [ACTIVE, lease_key(aggr)], [aggr])  # its process died
                if not in_flight.get(aggr):
                    continue
            rows.append({"aggr_id": aggr, "pending": int(pending), "due_now": int(due_now),
                         "in_flight": in_flight.get(aggr, 0), "limit": int(spec.get("limit", 0) or 0),
                         "proxy": bool(spec.get("proxy")), "lease_holder": holder or "",
                         "oldest_due": oldest.get(aggr), "paused": spec.get("paused") == "1"})
        return rows, total

    # ---------------------------------------------------------------- queues at a glance

    @_translated
    def pending_aggregations(self) -> list[tuple[str, int]]:
        """Aggregations with queued jobs and their queue sizes, oldest due first (paused ones last)."""
        aggrs = self.redis.zrange(DUE_INDEX, 0, -1)
        aggrs += sorted(set(self.redis.smembers(PAUSED)) - set(aggrs))
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

    # ---------------------------------------------------------------- upgrade

    @_translated
    def legacy_processes(self, *, now: int, within_ms: int = 15_000) -> list[str]:
        """Processes of a gdl before the hash-tagged layout that reported within
        ``within_ms`` and did not say they stopped (they would write the old keys)."""
        beats = [json.loads(b) for b in self.redis.hvals(LEGACY_PREFIX + "heartbeats")]
        return sorted(b.get("process", "?") for b in beats
                      if b.get("state") != "stopped" and b.get("at", 0) >= now - within_ms)

    @_translated
    def upgrade_layout(self) -> int:
        """Rename the keys of the layout before the hash tag (``gdl:*``) to their
        tagged names; returns how many were renamed. Every gdl process of the
        earlier version must be stopped first (see :meth:`legacy_processes`).
        Several processes may run this at once: a key is renamed once."""
        renamed = 0
        for key in list(self.scan_keys(LEGACY_PREFIX + "*")):
            try:
                renamed += int(self.redis.renamenx(key, PREFIX + key[len(LEGACY_PREFIX):]))
            except redis.exceptions.ResponseError:
                pass  # renamed meanwhile by another process
        return renamed

    # fsck: the one reader that walks the keyspace (SCAN), an operator's occasional check.

    @_translated
    def scan_page(self, cursor: int, match: str, count: int = 1000) -> tuple[int, list[str]]:
        """One SCAN step over keys matching ``match`` (a pattern built from this module's helpers).
        On a cluster, every gdl key is on the node of the ``{gdl}`` slot: that node is scanned."""
        if isinstance(self.redis, RedisCluster):
            node = self.redis.get_node_from_key(PREFIX)
            # Any: redis-py types a cluster SCAN as a single node's reply; it is one per node.
            reply: Any = self.redis.scan(cursor=cursor, match=match, count=count, target_nodes=node)
            cursors, found = reply
            return int(cursors[node.name]), [str(k) for k in found]
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

    @_translated
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
        keys = [key, DUE_INDEX, *map(job_key, job_ids)]
        return int(self._run("drop_dangling", keys, [aggr_id or "", *job_ids]))

    @_translated
    def reconcile_failed_callback(self, job_id: str, *, failed_at: int) -> int:
        """List a failed callback in the retry list or unlist one that is not: 1 added, -1 removed, 0 right."""
        return int(self._run("reconcile_failed", [job_key(job_id), FAILED_CALLBACKS], [job_id, failed_at]))
