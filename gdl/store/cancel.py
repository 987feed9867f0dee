"""The store's operator controls: cancel a job, purge an aggregation, and
the steps of the processor's cancel path (:mod:`gdl.cancelling`).

Each change is one script: ``cancel.lua`` (queued jobs end cancelled, jobs in
flight are marked and their holders told on ``gdl:cancel``), ``purge.lua``
(the aggregation's queue renamed to a purge set in O(1), its jobs in flight
marked), ``settle_cancelled.lua`` (a marked download leaves the in-flight
set cancelled). ``settle.lua`` refuses any other outcome of a marked job.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from gdl.job import Job
from gdl.store.core import JobStore, _translated
from gdl.store.layout import (
    CALLBACK_QUEUE,
    CANCEL_CHANNEL,
    CANCEL_MARKS,
    CANCELS,
    DELETIONS,
    DOWNLOADS,
    DUE_INDEX,
    INFLIGHT,
    PURGE_CHANNEL,
    PURGES,
    WAKE_CALLBACKS,
    aggr_key,
    job_key,
    lease_key,
    log_key,
    purge_key,
    queue_key,
)
from gdl.store.results import _SETTLED, Purge, Settled

CANCELLED_BY_REQUEST = "cancelled by request"
PURGE_CHUNK = 200  # jobs a purger cancels per script call (each call 1 to 3 ms)
# Queue head ids a purge looks at beyond the aggregation's limit: a take between
# that look and the purge takes among the queue's first (limit + HEAD_SEEN).
PURGE_HEAD_MARGIN = 1000


def purged_error(aggr_id: str) -> str:
    return f"cancelled: aggregation {aggr_id} purged"


class CancelOps(JobStore):
    """Cancel and purge (the API and ``gdl cancel``/``gdl aggr purge``), and the processor's side."""

    # ---------------------------------------------------------------- requests

    @_translated
    def cancel_job(self, job_id: str, *, now: int, forget_at: int, callback: bool = True) -> str:
        """Cancel one job: its state now (``cancelled``, ``cancelling``, ``unknown``, or the
        state it finished in). ``forget_at``: when a job cancelled with no callback is forgotten."""
        aggr = self.redis.hget(job_key(job_id), "aggr_id")
        if aggr is None:
            return "unknown"
        [state] = self._cancel([job_id], queue_key(aggr), aggr, now=now, forget_at=forget_at, callback=callback,
                               error=CANCELLED_BY_REQUEST, counter="queued", aggr_queue=True)
        return str(state)

    @_translated
    def purge_aggregation(self, aggr_id: str, *, now: int, callback: bool = True) -> Purge:
        """Cancel every job of ``aggr_id`` accepted before this call: its queue moves to a purge
        set at once (the purger cancels it in chunks), its downloads in flight are marked."""
        candidates = self._purge_candidates(aggr_id)
        token = secrets.token_hex(8)
        record = json.dumps({"aggr_id": aggr_id, "callback": callback, "at": now}, separators=(",", ":"))
        keys = [queue_key(aggr_id), purge_key(token), DUE_INDEX, PURGES, aggr_key(aggr_id), CANCEL_MARKS,
                *map(job_key, candidates)]
        args = [aggr_id, token, record, int(callback), purged_error(aggr_id), CANCEL_CHANNEL, PURGE_CHANNEL,
                *candidates]
        reply = self._run("purge", keys, args)
        if not isinstance(reply, list):
            return Purge(known=False)
        return Purge(known=True, queued=int(reply[0]), in_flight=int(reply[1]))

    def _purge_candidates(self, aggr_id: str) -> list[str]:
        """The jobs of ``aggr_id`` seen in flight, then its queue's head (see purge.lua)."""
        ours = [job_id for job_id, aggr in self._inflight_downloads() if aggr == aggr_id]
        limit = self.redis.hget(aggr_key(aggr_id), "limit")
        head = self.redis.zrange(queue_key(aggr_id), 0, int(limit or 0) + PURGE_HEAD_MARGIN - 1)
        return list(dict.fromkeys(ours + head))

    def _cancel(self, ids: list[str], queue: str, aggr_id: str, *, now: int, forget_at: int, callback: bool,
                error: str, counter: str, aggr_queue: bool) -> list[str]:
        keys = [DUE_INDEX, CALLBACK_QUEUE, DELETIONS, CANCELS, CANCEL_MARKS]
        args: list[Any] = [now, forget_at, int(callback), error, WAKE_CALLBACKS, CANCEL_CHANNEL, counter,
                           int(aggr_queue)]
        for job_id in ids:
            keys += [job_key(job_id), queue]
            args += [job_id, aggr_id]
        return list(self._run("cancel", keys, args))

    # ---------------------------------------------------------------- purgers

    @_translated
    def purges(self) -> dict[str, dict]:
        """Purges under way: token -> record (``aggr_id``, ``callback``, ``at``)."""
        return {token: json.loads(body) for token, body in self.redis.hgetall(PURGES).items()}

    @_translated
    def purge_chunk(self, token: str, record: dict, *, now: int, forget_at: int, size: int = PURGE_CHUNK) -> int:
        """Cancel up to ``size`` jobs of purge ``token``; how many are left (0: done and unlisted).
        Any process may run any purge's chunks, several at once: each job is cancelled once."""
        key = purge_key(token)
        ids = self.redis.zrange(key, 0, size - 1)
        if ids:
            aggr_id = record["aggr_id"]
            self._cancel(ids, key, aggr_id, now=now, forget_at=forget_at, callback=bool(record["callback"]),
                         error=purged_error(aggr_id), counter="purged", aggr_queue=False)
        left = int(self.redis.zcard(key))
        if not left:
            self.redis.hdel(PURGES, token)
        return left

    # ---------------------------------------------------------------- holders of downloads

    @_translated
    def settle_cancelled(self, job: Job, owner: str, *, now: int, forget_at: int, log_entry: dict | None) -> Settled:
        """A marked download ends cancelled (its holder aborted it, or found the mark settling it)."""
        return self._settle_cancelled(job.id, job.aggr_id, owner, now=now, forget_at=forget_at, log_entry=log_entry)

    def _settle_cancelled(self, job_id: str, aggr_id: str, owner: str, *, now: int, forget_at: int,
                          log_entry: dict | None) -> Settled:
        keys = [job_key(job_id), INFLIGHT[DOWNLOADS], log_key(job_id), CALLBACK_QUEUE, DELETIONS, CANCELS,
                lease_key(aggr_id)]
        entry = json.dumps(log_entry, separators=(",", ":")) if log_entry else ""
        return _SETTLED[int(self._run_batched("settle_cancelled", keys, [job_id, owner, now, forget_at, entry,
                                                                         WAKE_CALLBACKS]))]

    @_translated
    def cancel_marks(self) -> int:
        """How many downloads in flight were ever marked for cancelling: a count that moves
        with each new mark (0 before the first), so that the backstop reads marks only then."""
        return int(self.redis.get(CANCEL_MARKS) or 0)

    @_translated
    def cancels_requested(self, job_ids: list[str]) -> list[str]:
        """Those of ``job_ids`` marked for cancelling (the backstop of lost ``gdl:cancel`` messages)."""
        if not job_ids:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hexists(job_key(job_id), "cancel")
            marked = pipe.execute()
        return [job_id for job_id, flag in zip(job_ids, marked) if flag]

    @_translated
    def sweep_cancelled(self, *, now: int, forget_at: int, limit: int = 1000) -> list[str]:
        """Settle cancelled the marked downloads whose holder stopped renewing them (run before
        the sweep, which would put them back in their queue)."""
        expired = self.redis.zrangebyscore(INFLIGHT[DOWNLOADS], "-inf", now, start=0, num=limit)
        if not expired:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in expired:
                pipe.hmget(job_key(job_id), "cancel", "aggr_id")
            found = pipe.execute()
        settled = []
        for job_id, (mark, aggr_id) in zip(expired, found):
            if mark is not None and self._settle_cancelled(job_id, aggr_id or "", "", now=now, forget_at=forget_at,
                                                           log_entry=None):
                settled.append(job_id)
        return settled

    @_translated
    def cancel_counts(self) -> dict[str, int]:
        """Jobs cancelled so far, by how: ``queued``, ``in_flight``, ``purged``."""
        return {how: int(n) for how, n in self.redis.hgetall(CANCELS).items()}
