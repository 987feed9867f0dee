"""``gdl status`` and ``gdl job``: the dashboard's view, as text.

    gdl status [--watch [--interval S]] [--json]   processes, aggregations, queue depths
    gdl job ID [--json]                            one job's record and its attempts

Both read what the dashboard reads (:mod:`gdl.dashboard`), from Redis.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any

import gevent

from gdl.commands import EXIT_OK, EXIT_PROBLEMS, duration, open_store, table
from gdl.config import Config
from gdl.dashboard import overview
from gdl.job import is_valid_id
from gdl.store import Store, now_ms

CLEAR_SCREEN = "\x1b[H\x1b[2J"
QUEUE_LABELS = (
    ("aggregations_pending", "aggregations with queued jobs"),
    ("downloads_queued", "downloads queued"),
    ("downloads_in_flight", "downloads in flight"),
    ("callbacks_queued", "callbacks queued"),
    ("callbacks_in_flight", "callbacks in flight"),
    ("callbacks_failed", "callbacks failed"),
    ("deletions_scheduled", "files awaiting deletion"),
)



def run(name: str, args: argparse.Namespace, cfg: Config) -> int:
    store = open_store(cfg)
    try:
        return show_job(store, args.job_id, as_json=args.json) if name == "job" else status(store, args)
    finally:
        store.close()


# ------------------------------------------------------------------ status

def status(store: Store, args: argparse.Namespace) -> int:
    while True:
        now = now_ms()
        view = overview(store, now)
        text = json.dumps(view, indent=2) if args.json else render(view)
        if args.watch:
            sys.stdout.write(CLEAR_SCREEN)
        print(text, flush=True)
        if not args.watch:
            return EXIT_OK
        gevent.sleep(max(0.1, args.interval))


def render(view: dict[str, Any]) -> str:
    now = view["now"]
    procs = view["processes"]
    live = sum(p["status"] == "live" for p in procs)
    out = [f"gdl status at {_clock(now)}", "", f"PROCESSES ({live} live of {len(procs)})"]
    rows = []
    for p in procs:
        disk = "" if p["disk"] is None else f"{p['disk']['used_percent']:.1f}%" + (" paused" if p["disk"]["paused"]
                                                                                   else "")
        rows.append([p["process"], p["status"], ",".join(p["roles"]), p["pid"], p["version"],
                     duration(now - p["started_at"]) if p["status"] == "live" else "-",
                     duration(now - p["last_seen"]) + " ago", _dash(p["pools"]), _dash(p["workers"]),
                     _dash(p["callbacks_in_flight"]), disk])
    out.append(table(["process", "status", "roles", "pid", "version", "up", "last seen", "pools", "workers",
                      "callbacks", "disk"], rows, right=[3, 5, 6, 7, 8, 9]) if rows else "(none has reported)")
    aggrs = view["aggregations"]
    out += ["", f"AGGREGATIONS ({len(aggrs)} shown, {view['aggregations_queued']} with queued jobs)"]
    rows = [[a["aggr_id"], a["pending"], a["due_now"], a["in_flight"], a["limit"], a["lease_holder"] or "-",
             _due(a["oldest_due"], now)] for a in aggrs]
    out.append(table(["aggregation", "pending", "due now", "in flight", "limit", "lease holder", "oldest due"], rows,
                     right=[1, 2, 3, 4]) if rows else "(no queued or running work)")
    out += ["", "QUEUES"]
    out.append(table(["queue", "size"], [[label, view["queues"].get(key, 0)] for key, label in QUEUE_LABELS],
                     right=[1]))
    return "\n".join(out)


def _due(due: int | None, now: int) -> str:
    if due is None:
        return "-"
    return f"{duration(now - due)} ago" if due <= now else f"in {duration(due - now)}"


def _dash(value: Any) -> Any:
    return "-" if value is None else value


def _clock(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


# ------------------------------------------------------------------ job

def show_job(store: Store, job_id: str, *, as_json: bool = False) -> int:
    job = store.get_job(job_id) if is_valid_id(job_id) else None
    if job is None:
        print(f"gdl: job {job_id} does not exist", file=sys.stderr)
        return EXIT_PROBLEMS
    record = job.public()
    attempts = store.job_log(job_id)
    if as_json:
        print(json.dumps({**record, "attempts_log": attempts}, indent=2))
        return EXIT_OK
    width = max(len(k) for k in record)
    now = now_ms()
    lines = [f"{key.ljust(width)}  {_field(key, value, now)}" for key, value in record.items()]
    lines += ["", f"ATTEMPTS ({len(attempts)})"]
    rows = [[i, a.get("kind", ""), a.get("attempt", ""), a.get("outcome", ""), _clock(a["at"]) if a.get("at") else "",
             f"{a.get('duration_ms', 0)} ms", a.get("response_code") or a.get("status") or "",
             a.get("error", "")] for i, a in enumerate(attempts, 1)]
    lines.append(table(["#", "kind", "attempt", "outcome", "at", "took", "code", "error"], rows, right=[0, 2, 5, 6])
                 if rows else "(none yet)")
    print("\n".join(lines))
    return EXIT_OK


def _field(key: str, value: Any, now: int) -> str:
    if key == "callback_due_at" and isinstance(value, int) and value:  # a callback retry waits
        return f"{value} ({_clock(value)}, {_due(value, now)})"
    if key in ("created_at", "finished_at", "delivered_at") and isinstance(value, int) and value:
        return f"{value} ({_clock(value)})"
    if isinstance(value, dict):
        return json.dumps(value)
    return "" if value is None else str(value)
