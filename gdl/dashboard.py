"""The operator view as JSON: what the dashboard page, ``gdl status`` and scripts read.

    overview(store, now)     processes (live, dead or stopped, with disk health),
                             queue depths, aggregations with queued or running work
    throughput(store, now)   the last minutes in 10-second buckets, every process's share added up
    failures(store)          the latest failed download attempts and the failed callbacks

Everything comes from structures the store keeps for the purpose (heartbeats,
throughput buckets, the failures list, the failed-callbacks index, the due
index and the active pools); nothing here walks the keyspace.
"""

from __future__ import annotations

from typing import Any

from gdl import __version__
from gdl.stats import STALE_AFTER_INTERVALS
from gdl.store import FAILURES_KEPT, TPUT_BUCKET_MS, Store

# A process gone silent is shown as dead for this long, then forgotten.
PROCESS_FORGET_AFTER_MS = 3600 * 1000
# The throughput window: buckets expire a minute after it (store.TPUT_TTL_S).
THROUGHPUT_MINUTES = 15
THROUGHPUT_FIELDS = ("downloads", "bytes", "failures", "callbacks", "callback_failures")
DEFAULT_INTERVAL_MS = 5000


def process_status(beat: dict, now: int) -> str:
    """``live``, ``dead`` (silent for more than three of its stats intervals) or ``stopped``."""
    if beat.get("state") == "stopped":
        return "stopped"
    interval = beat.get("interval_ms") or DEFAULT_INTERVAL_MS
    return "dead" if now - beat.get("at", 0) > STALE_AFTER_INTERVALS * interval else "live"


def processes(store: Store, now: int) -> list[dict[str, Any]]:
    rows = []
    for beat in store.heartbeats(forget_before=now - PROCESS_FORGET_AFTER_MS):
        components = beat.get("components") or {}
        processor, notifier = components.get("processor"), components.get("notifier")
        rows.append({
            "process": beat.get("process", ""), "status": process_status(beat, now),
            "roles": beat.get("roles", []), "host": beat.get("host", ""), "pid": beat.get("pid", 0),
            "version": beat.get("version", ""), "started_at": beat.get("started_at", 0),
            "last_seen": beat.get("at", 0),
            "disk": None if processor is None else {
                "used_percent": processor.get("disk_used_percent", 0),
                "paused": bool(processor.get("disk_paused", 0)),
                "pauses": processor.get("disk_pauses", 0),
            },
            "pools": None if processor is None else processor.get("pools", 0),
            "workers": None if processor is None else processor.get("workers", 0),
            "callbacks_in_flight": None if notifier is None else notifier.get("in_flight", 0),
        })
    return rows


def overview(store: Store, now: int, *, aggregations_limit: int = 500) -> dict[str, Any]:
    procs = processes(store, now)
    aggrs, queued_total = store.aggregations_view(now=now, limit=aggregations_limit)
    queues = store.queue_depths()
    queues["callbacks_failed"] = store.failed_callback_count()
    return {
        "now": now,
        "version": __version__,
        "processes": procs,
        "queues": queues,
        "aggregations": aggrs,
        "aggregations_queued": queued_total,
        "disk": [{"process": p["process"], "host": p["host"], "status": p["status"], **p["disk"]}
                 for p in procs if p["disk"] is not None],
    }


def throughput(store: Store, now: int, *, minutes: int = THROUGHPUT_MINUTES) -> dict[str, Any]:
    count = max(1, min(minutes, THROUGHPUT_MINUTES)) * 60_000 // TPUT_BUCKET_MS
    buckets = [{"t": start, **{f: counts.get(f, 0) for f in THROUGHPUT_FIELDS}}
               for start, counts in store.throughput(now=now, buckets=count)]
    totals = {f: sum(b[f] for b in buckets) for f in THROUGHPUT_FIELDS}
    return {"now": now, "bucket_seconds": TPUT_BUCKET_MS // 1000, "buckets": buckets, "totals": totals}


def failures(store: Store, *, limit: int = 50) -> dict[str, Any]:
    limit = max(1, min(limit, FAILURES_KEPT))
    callbacks = [{
        "job_id": job.id, "aggr_id": job.aggr_id, "url": job.url, "callback_type": job.callback_type,
        "callback_dst": job.callback_dst, "error": job.status.callback_error, "code": job.status.callback_code,
        "attempts": job.status.callback_attempts, "download_state": job.status.state, "failed_at": failed_at,
    } for job, failed_at in store.failed_callbacks(limit)]
    return {"downloads": store.recent_failures(limit), "callbacks": callbacks,
            "callbacks_total": store.failed_callback_count()}
