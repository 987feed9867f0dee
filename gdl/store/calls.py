"""The arguments of the scripts whose calls carry many jobs, and the reading
of their replies: enqueue.lua (jobs grouped by aggregation, in chunks) and
take.lua. Kept apart from :mod:`gdl.store.core`, which runs the calls."""

from __future__ import annotations

import json
from typing import Any

from gdl.job import Job
from gdl.store.layout import DUE_INDEX, WAKE_AGGR, aggr_key, idempotency_key, job_key, queue_key, rate_key
from gdl.store.results import Idempotency, Taken

# Jobs of one aggregation per enqueue script call: Redis runs nothing else while a script runs.
ENQUEUE_CHUNK = 200


def by_aggregation(indexes: list[int], items: list[tuple[Job, Idempotency | None]]) -> list[list[int]]:
    """``indexes`` grouped by their job's aggregation (in order within each), in chunks."""
    groups: dict[str, list[int]] = {}
    for i in indexes:
        groups.setdefault(items[i][0].aggr_id, []).append(i)
    return [group[start:start + ENQUEUE_CHUNK] for group in groups.values()
            for start in range(0, len(group), ENQUEUE_CHUNK)]


def enqueue_call(group: list[tuple[Job, Idempotency | None]], now: int) -> tuple[list[str], list[Any]]:
    """enqueue.lua's keys and arguments for jobs of one aggregation."""
    aggr_id = group[0][0].aggr_id
    keys = [aggr_key(aggr_id), queue_key(aggr_id), DUE_INDEX, rate_key(aggr_id)]
    ttl = next((check.ttl_ms for _, check in group if check is not None), 0)
    args: list[Any] = [aggr_id, now, WAKE_AGGR, ttl]
    for job, check in group:
        # A job without a key still declares a record key of its own, never written.
        record = idempotency_key(check.scope, check.key) if check else idempotency_key("none", job.id)
        keys += [job_key(job.id), record]
        fields = json.dumps(job.to_hash(), separators=(",", ":"), ensure_ascii=False)
        args += [job.id, check.fingerprint if check else "", job.aggr_limit, job.aggr_proxy, fields]
    return keys, args


def taken_from_reply(reply: list) -> Taken:
    """take.lua's reply: {next due, {limit, effective limit, gate, GCRA time} or '', head, id, hash, ...}."""
    next_due = int(float(reply[0])) if reply[0] != "" else None
    limit = cap = None
    gate = rate_tat = ""
    if reply[1] != "":
        limit, cap, gate, rate_tat = int(reply[1][0]), int(reply[1][1]), reply[1][2], reply[1][3]
    jobs = []
    for i in range(3, len(reply), 2):
        flat = reply[i + 1]
        jobs.append(Job.from_hash(dict(zip(flat[::2], flat[1::2]))))
    return Taken(jobs, next_due, limit, cap=cap, gate=gate, rate_tat=rate_tat)
