"""``gdl retry-failed`` and ``gdl fsck``: the chores that put things right.

    gdl retry-failed [--aggr ID] [--dry-run]
        Queue every failed callback again (as ``POST /retry/<id>`` does), from
        the failed-callbacks index; ``--aggr`` only those of one aggregation.

    gdl fsck [--fix]
        Check Redis and the stored files against each other and count:
          orphan files        stored files whose job is gone          fix: delete the file
          missing files       succeeded jobs whose file is gone       fix: forget the job if its
                                                                      callback was delivered (its deletion
                                                                      was scheduled anyway); else listed
          expired in-flight   downloads or callbacks held past their  fix: the sweep (back to their queue)
                              deadline by a process that died
          dangling entries    queue, callback, deletion, in-flight    fix: removed (and the aggregation's
                              or failed-index entries with no job     due index entry set right)
          stale due index     aggregations indexed with an empty      fix: removed
                              queue
          failed index        failed callbacks missing from the       fix: added / removed
                              retry list, or listed but not failed
        It is the one reader that walks the keyspace (SCAN of job and queue
        keys): an occasional check, safe while gdl runs (each fix is atomic
        and re-checks what it removes).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from gdl import store as keys
from gdl.commands import EXIT_OK, EXIT_PROBLEMS, open_store, table
from gdl.config import Config
from gdl.filestorage import FileStorage, FilesystemStorage, from_config
from gdl.job import CallbackState, JobState, is_valid_id
from gdl.store import CALLBACKS, DOWNLOADS, Store, now_ms

SHOWN = 50  # rows listed by retry-failed; examples listed per fsck check
BATCH = 1000
FOREVER = 1 << 62  # a "now" past every deletion time, to forget a job at once
ERROR_WIDTH = 80  # characters of an error shown in a table row



def run(name: str, args: argparse.Namespace, cfg: Config) -> int:
    store = open_store(cfg)
    try:
        if name == "retry-failed":
            return retry_failed(store, aggr=args.aggr, dry_run=args.dry_run)
        return fsck(store, cfg, fix=args.fix, verbose=args.verbose)
    finally:
        store.close()


# ------------------------------------------------------------------ retry-failed

def _cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, ending in an ellipsis when it was cut."""
    return text if len(text) <= width else text[:width - 1] + "…"


def retry_failed(store: Store, *, aggr: str | None, dry_run: bool) -> int:
    failed = [(job, at) for job, at in store.failed_callbacks() if aggr is None or job.aggr_id == aggr]
    rows = [[job.id, job.aggr_id, job.status.callback_code or "", _cut(job.status.callback_error, ERROR_WIDTH)]
            for job, _ in failed[:SHOWN]]
    if rows:
        print(table(["job", "aggregation", "code", "error"], rows))
        if len(failed) > SHOWN:
            print(f"... and {len(failed) - SHOWN} more")
        print()
    which = f" of aggregation {aggr}" if aggr else ""
    if dry_run:
        print(f"{len(failed)} failed callback(s){which} would be queued again (dry run)")
        return EXIT_OK
    now = now_ms()
    queued = moved_on = 0
    for job, _ in failed:
        if store.retry_failed_callback(job.id, now=now) == 1:
            queued += 1
        else:
            moved_on += 1  # retried meanwhile by someone else, or deleted
    print(f"queued {queued} failed callback(s){which} again"
          + (f"; {moved_on} had moved on meanwhile" if moved_on else ""))
    return EXIT_OK


# ------------------------------------------------------------------ fsck

@dataclass
class Check:
    name: str
    what: str
    found: list[str] = field(default_factory=list)
    fixed: int = 0
    note: str = ""


@dataclass
class JobSets:
    """The sorted sets of job ids, read before anything else: a job created
    after this read is not misjudged by the checks."""

    queue_of: dict[str, str | None]  # key -> the aggregation whose queue it is, or None
    entries: dict[str, list[tuple[str, int]]]  # key -> its (member, score) pairs

    @classmethod
    def read(cls, store: Store) -> JobSets:
        queue_of: dict[str, str | None] = {key: None for key in (
            keys.INFLIGHT[DOWNLOADS], keys.INFLIGHT[CALLBACKS], keys.CALLBACK_QUEUE, keys.DELETIONS,
            keys.FAILED_CALLBACKS)}
        for aggr in sorted(store.queued_aggregations()):
            queue_of[keys.queue_key(aggr)] = aggr
        return cls(queue_of, {key: store.zset_entries(key) for key in queue_of})


def fsck(store: Store, cfg: Config, *, fix: bool, verbose: bool = False) -> int:
    now = now_ms()
    storage = from_config(cfg)
    sets = JobSets.read(store)
    missing, failed_index = check_job_records(store, storage, sets, now, fix)
    dangling, stale = check_set_entries(store, sets, fix)
    checks = [check_orphan_files(store, storage, fix), missing, check_expired(store, sets, now, fix),
              dangling, stale, failed_index]
    print(report(checks, fix=fix, verbose=verbose))
    problems = sum(len(c.found) - c.fixed for c in checks)
    return EXIT_OK if problems == 0 else EXIT_PROBLEMS


def check_job_records(store: Store, storage: FileStorage, sets: JobSets, now: int, fix: bool) -> tuple[Check, Check]:
    """Succeeded jobs whose file is gone, and the failed-callbacks index against the jobs' states."""
    missing = Check("missing files", "succeeded jobs whose stored file is gone")
    failed_index = Check("failed index", "failed callbacks not in the retry list, or listed but not failed")
    deletions = dict(sets.entries[keys.DELETIONS])
    failed_listed = dict(sets.entries[keys.FAILED_CALLBACKS])
    missing_delivered: list[str] = []
    job_ids = list(store.job_ids())
    for start in range(0, len(job_ids), BATCH):
        chunk = job_ids[start:start + BATCH]
        for job_id, record in zip(chunk, store.job_fields(chunk, "state", "callback_state", "s3_bucket")):
            if record is None:
                continue  # forgotten meanwhile
            if (record["callback_state"] == CallbackState.FAILED) != (job_id in failed_listed):
                failed_index.found.append(job_id)
            if (record["state"] == JobState.SUCCEEDED and not record["s3_bucket"]
                    and deletions.get(job_id, FOREVER) > now and not storage.exists(job_id)):
                missing.found.append(job_id)
                if job_id in deletions:
                    missing_delivered.append(job_id)
    if fix:
        missing.fixed = store.forget(missing_delivered, now=FOREVER)
        left = len(missing.found) - missing.fixed
        if left:
            missing.note = f"{left} not delivered yet: re-enqueue their URLs"
        failed_index.fixed = sum(1 for job_id in failed_index.found
                                 if store.reconcile_failed_callback(job_id, failed_at=now))
    return missing, failed_index


def check_orphan_files(store: Store, storage: FileStorage, fix: bool) -> Check:
    check = Check("orphan files", "stored files whose job is gone")
    if not isinstance(storage, FilesystemStorage):
        check.note = "skipped: not filesystem storage"
        return check
    stored = list(_stored_ids(storage.rootdir))
    for start in range(0, len(stored), BATCH):
        chunk = stored[start:start + BATCH]
        check.found += [i for i, r in zip(chunk, store.job_fields(chunk, "state")) if r is None]
    if fix:  # each file deleted only if its job is still gone
        check.fixed = sum(1 for job_id in check.found
                          if store.job_fields([job_id], "state")[0] is None and storage.delete(job_id))
    return check


def check_set_entries(store: Store, sets: JobSets, fix: bool) -> tuple[Check, Check]:
    """Set entries whose job is gone, and aggregations indexed with an empty queue."""
    dangling = Check("dangling entries", "set entries with no job record")
    stale = Check("stale due index", "aggregations indexed with an empty queue")
    for key, queue_of in sets.queue_of.items():
        ids = [member for member, _ in sets.entries[key]]
        gone = {i for i, r in zip(ids, store.job_fields(ids, "state")) if r is None} if ids else set()
        dangling.found += [f"{key[len(keys.PREFIX):]} {i}" for i in sorted(gone)]
        if fix and gone:
            dangling.fixed += store.drop_dangling(key, sorted(gone), aggr_id=queue_of)
        if queue_of is not None and not ids:
            stale.found.append(queue_of)
            if fix:
                store.drop_dangling(key, [], aggr_id=queue_of)
                stale.fixed += 1
    return dangling, stale


def check_expired(store: Store, sets: JobSets, now: int, fix: bool) -> Check:
    check = Check("expired in-flight", "jobs held past their deadline")
    for kind in (DOWNLOADS, CALLBACKS):
        expired = [i for i, deadline in sets.entries[keys.INFLIGHT[kind]] if deadline < now]
        check.found += [f"{kind} {i}" for i in expired]
        if fix and expired:
            check.fixed += len(store.sweep(kind, now=now))
    return check


def _stored_ids(rootdir: str) -> Iterable[str]:
    """Job ids with a file under ``rootdir`` (``<id[0:3]>/<id>``); other names are not gdl's."""
    try:
        prefixes = os.listdir(rootdir)
    except FileNotFoundError:
        return
    for prefix in sorted(prefixes):
        directory = os.path.join(rootdir, prefix)
        if not os.path.isdir(directory):
            continue
        for name in sorted(os.listdir(directory)):
            if is_valid_id(name) and name[:3] == prefix and os.path.isfile(os.path.join(directory, name)):
                yield name


def report(checks: list[Check], *, fix: bool, verbose: bool) -> str:
    headers = ["check", "found", *(["fixed"] if fix else []), "what"]
    rows = [[c.name, len(c.found), *([c.fixed] if fix else []), c.what + (f" ({c.note})" if c.note else "")]
            for c in checks]
    lines = [table(headers, rows, right=[1, 2] if fix else [1])]
    for c in checks:
        shown = c.found if verbose else c.found[:SHOWN // 5]
        if shown:
            lines.append(f"\n{c.name}:")
            lines += [f"  {item}" for item in shown]
            if len(c.found) > len(shown):
                lines.append(f"  ... and {len(c.found) - len(shown)} more (--verbose lists them all)")
    total = sum(len(c.found) for c in checks)
    fixed = sum(c.fixed for c in checks)
    if not total:
        lines.append("\nall consistent")
    elif fix:
        lines.append(f"\n{total} problem(s) found, {fixed} fixed")
    else:
        lines.append(f"\n{total} problem(s) found; gdl fsck --fix repairs them")
    return "\n".join(lines)
