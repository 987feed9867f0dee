"""``gdl cancel`` and ``gdl aggr purge``: the operator controls from a shell.

    gdl cancel ID [--no-callback]
        Cancel one job, as ``DELETE /jobs/<id>`` does: a queued job (or one
        waiting for a retry) is cancelled at once; a download in flight is
        aborted by the processor holding it. Exit 1 for a job that already
        finished or that gdl does not know.

    gdl aggr purge ID [--no-callback]
        Cancel every job of the aggregation accepted before the command, queued
        or downloading, as ``DELETE /aggregations/<id>`` does; jobs accepted
        after it are kept. The processors cancel the queued ones in chunks.

Each cancelled job gets one failure callback whose error says ``cancelled``,
none with ``--no-callback``.
"""

from __future__ import annotations

import argparse

from gdl.commands import EXIT_OK, EXIT_PROBLEMS, open_store
from gdl.config import Config
from gdl.job import CANCELLING, JobState
from gdl.store import Store, now_ms


def run(name: str, args: argparse.Namespace, cfg: Config) -> int:
    """``gdl cancel`` (``gdl aggr purge`` runs through gdl/commands/aggr.py, which calls :func:`purge`)."""
    store = open_store(cfg)
    try:
        return cancel(store, cfg, args.job_id, callback=not args.no_callback)
    finally:
        store.close()


def cancel(store: Store, cfg: Config, job_id: str, *, callback: bool = True) -> int:
    now = now_ms()
    state = store.cancel_job(job_id, now=now, forget_at=now + cfg.notifier.deletion_delay_ms, callback=callback)
    if state == JobState.CANCELLED:
        print(f"job {job_id}: cancelled")
    elif state == CANCELLING:
        print(f"job {job_id}: cancelling (its download is being aborted)")
    elif state == "unknown":
        print(f"job {job_id}: no such job")
        return EXIT_PROBLEMS
    else:
        print(f"job {job_id}: already finished ({state}), not cancelled")
        return EXIT_PROBLEMS
    return EXIT_OK


def purge(store: Store, aggr_id: str, *, callback: bool = True) -> int:
    """``gdl aggr purge ID``."""
    started = store.purge_aggregation(aggr_id, now=now_ms(), callback=callback)
    if not started.known:
        print(f"aggregation {aggr_id}: unknown (no job queued or in flight)")
        return EXIT_PROBLEMS
    print(f"aggregation {aggr_id}: purging {started.queued} queued job(s) and {started.in_flight} in flight")
    return EXIT_OK
