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
    aggr:<aggr>                hash    limit, proxy (latest enqueue);  api (enqueue,        scanner,
                                       rate, burst, adaptive (latest   pause, resume),      pool (take:
                                       that gave them); paused         scanner (release),   the gate),
                                       (operator); paused_until,       pool (settle: the    api (GET
                                       streak (throttle); eff, aimd_at shaping block)       /aggregations)
                                       (adaptive limit); expires
                                       aggr_state_ttl after a pool
                                       ends on an empty queue, unless
                                       paused
    rate:<aggr>                string  GCRA theoretical arrival time   pool (take, refund)  pool (take),
                                       (us), PX until it is reached                         api (enqueue)
    paused                     set     aggregation ids an operator     api (pause, resume)  api (metrics,
                                       paused (out of the due index)                         views)
    queue:<aggr>               zset    job id -> due ms                api, pool, sweep     pool
    due                        zset    aggr id -> earliest due ms of   same scripts as      scanner
                                       its queue (the aggregation        queue:<aggr>
                                       index: no SCAN to find work)
    lease:<aggr>               string  owner token, PX lease_ttl       scanner (claim),     scanner,
                                       (the fence of take and settle)  pool (take extends), pool (take,
                                                                       keeper (renew),      settle: fenced)
                                                                       pool (release)
    processors                 zset    processor token -> registered   scanner (full scan,  scanner
                                       until ms (fair claims)          stop), claim.lua     (claim.lua)
    processor_slots            hash    processor token -> download     scanner (same),      scanner
                                       slots its pools hold            claim.lua            (claim.lua)
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
    idem:<scope>:<key>         hash    id, fingerprint of the request  api (enqueue.lua)    api (enqueue.lua)
                                       that first used an Idempotency-
                                       Key (PEXPIRE api.idempotency_ttl)
    reuse:<request key>        hash    holder (job id whose file has    pool (remember.lua)  pool (reuse)
                                       the bytes), sha256, size,
                                       validators, stored_at ... of a
                                       result kept for reuse (PEXPIRE
                                       processor.reuse_max_ttl)
    purges                     hash    purge token -> JSON: aggr id,   api (purge.lua)      processor
                                       callback, at (purges under way)  processor (done)    (purger)
    purge:<token>              zset    job id -> due ms: the queue a   api (purge.lua:      processor
                                       purge renamed, left to cancel   RENAME), purger     (purger)
    cancels                    hash    queued, in_flight, purged ->    cancel scripts       api (metrics)
                                       jobs cancelled that way
    cancel_marks               string  count of downloads in flight    cancel.lua,          processor
                                       ever marked for cancelling      purge.lua (INCR)     (backstop)
    tput:<10 s bucket>         hash    downloads, bytes, failures,     every process's      api, cli
                                       callbacks, callback_failures    reporter (HINCRBY
                                       (EXPIRE 16 min)                 of its deltas)
    failures                   list    JSON per failed download        every process's      api, cli
                                       attempt, newest first (LTRIM)   reporter

    channels  wake:aggr       message: aggr id with new due work   (enqueue, retry, sweep)
              wake:callbacks  message: job id with a due callback  (settle, retry, sweep)
              cancel          message: job id in flight to abort   (cancel, purge)
              purge           message: purge token with jobs       (purge)

A job is in exactly one of queue:<aggr>, purge:<token>, inflight, callbacks,
callbacks:inflight, deletions, callbacks:failed, or none (finished with no callback), and every
move between them is one script, so a crash at any instant loses nothing:
anything left in an in-flight set past its deadline is put back by the sweep.
"""

from gdl.store.aggregations import AggregationControls, AggregationView, AggrState
from gdl.store.cancel import CancelOps
from gdl.store.core import JobStore
from gdl.store.health import Health, now_ms
from gdl.store.layout import *  # noqa: F403
from gdl.store.layout import __all__ as _layout_names
from gdl.store.operator import OperatorView
from gdl.store.results import (
    CallbackOutcome,
    Claim,
    ClaimOutcome,
    DownloadOutcome,
    Enqueued,
    EnqueueOutcome,
    Idempotency,
    Purge,
    Renewal,
    Settled,
    Taken,
)
from gdl.store.reuse import ReuseRecords


class Store(AggregationControls, CancelOps, ReuseRecords, OperatorView):
    """Typed operations on gdl's Redis layout (see the table above)."""


__all__ = ["AggregationView", "AggrState", "CallbackOutcome", "Claim", "ClaimOutcome", "DownloadOutcome", "Enqueued",
           "EnqueueOutcome", "Idempotency", "Health", "JobStore", "Purge", "Renewal", "Settled", "Store", "Taken",
           "now_ms",
           *_layout_names]
