"""``gdl enqueue``: submit URLs to the API, then optionally follow them to their callbacks.

    gdl enqueue [FILE|-] --aggr ID --limit N --callback URL [--extra S] [--mime P] [--wait]

Each line of FILE (or stdin) is a URL, or a JSON object with any
``POST /download`` fields (``{"url": ..., "aggr_id": ..., "extra": ...}``);
the options fill in the fields a line leaves out. Blank lines and lines
starting with ``#`` are skipped. Jobs go to ``POST /download/batch``,
``api.batch_max_jobs`` at a time, over a few keep-alive connections
(``--connections``), each line with an idempotency key of this run (a batch
sent again after a dropped connection creates nothing twice), with a
progress bar showing accepted/s; lines the API refuses are listed on stderr
with its reason.

``--wait`` then follows the accepted jobs in Redis until each has reached
its end (download succeeded or failed, callback delivered or failed), with a
second bar, and prints a summary table: succeeded, and failed by reason.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import gevent
import gevent.pool
import requests
from tqdm import tqdm

from gdl.commands import EXIT_OK, EXIT_PROBLEMS, open_store, table
from gdl.config import Config
from gdl.errors import StartupError
from gdl.job import CallbackState, JobState
from gdl.store import Store

SUBMIT_TRIES = 4  # a 503 (Redis away) or a dropped connection is tried again, with backoff
POLL_INTERVAL = 0.5
WAIT_BATCH = 1000
REJECTIONS_SHOWN = 20
REASON_LENGTH = 100
SUCCEEDED = "succeeded"
FINISHED = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
SETTLED_CALLBACK = (CallbackState.DELIVERED, CallbackState.FAILED, CallbackState.NONE)
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"



@dataclass
class Submitted:
    accepted: list[tuple[int, str, str]] = field(default_factory=list)  # (line, job id, url)
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    seconds: float = 0.0


def run(name: str, args: argparse.Namespace, cfg: Config) -> int:
    base = (args.api or _api_base(cfg)).rstrip("/")
    token = args.token if args.token is not None else (cfg.security.api_tokens or [""])[0]
    store = open_store(cfg) if args.wait else None  # fail before submitting anything
    lines, rejected = _read(args)
    submitted = submit(lines, base, token, connections=max(1, args.connections),
                       batch_size=cfg.api.batch_max_jobs, quiet=args.quiet)
    submitted.rejected = sorted(rejected + submitted.rejected)
    _report_submission(submitted, total=len(lines) + len(rejected))
    if args.print_ids:
        for _, job_id, url in sorted(submitted.accepted):
            print(f"{job_id}\t{url}")
    if not args.wait:
        return EXIT_OK if not submitted.rejected else EXIT_PROBLEMS
    assert store is not None
    try:
        results = wait(store, [job_id for _, job_id, _ in submitted.accepted], timeout=args.timeout,
                       quiet=args.quiet)
    finally:
        store.close()
    print(summary(results))
    ok = not submitted.rejected and set(results) <= {SUCCEEDED}
    return EXIT_OK if ok else EXIT_PROBLEMS


def _api_base(cfg: Config) -> str:
    host, port = cfg.api.host, cfg.api.port
    if port == 0:
        raise StartupError("api.port: is 0 (a random port); pass the API's address with --api URL")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _read(args: argparse.Namespace) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """The lines to submit as request bodies, and those refused before sending."""
    defaults = {"aggr_id": args.aggr, "aggr_limit": args.limit, "callback_url": args.callback,
                "extra": args.extra, "mime_type": args.mime}
    defaults = {k: v for k, v in defaults.items() if v is not None}
    try:
        source = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
    except OSError as exc:
        raise StartupError(f"{args.file}: cannot read: {exc.strerror}") from exc
    bodies, rejected = [], []
    with source:
        for number, raw in enumerate(source, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("{"):
                try:
                    fields = json.loads(line)
                except ValueError as exc:
                    rejected.append((number, f"not a JSON object: {exc}"))
                    continue
                if not isinstance(fields, dict):
                    rejected.append((number, "not a JSON object"))
                    continue
            else:
                fields = {"url": line}
            bodies.append((number, {**defaults, **fields}))
    return bodies, rejected


def submit(lines: list[tuple[int, dict]], base: str, token: str, *, connections: int, batch_size: int = 1000,
           quiet: bool = False) -> Submitted:
    """POST every body, ``batch_size`` at a time to ``POST /download/batch``, over
    ``connections`` keep-alive connections. Each line carries an idempotency key
    of this run, so that a batch sent again after a dropped connection or a 503
    creates nothing twice."""
    out = Submitted()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    bar = tqdm(total=len(lines), desc="enqueue", unit=" accepted", bar_format=BAR_FORMAT, disable=quiet,
               file=sys.stderr, dynamic_ncols=True)
    run = secrets.token_hex(8)
    batches: Iterator[list[tuple[int, dict]]] = (lines[i:i + batch_size] for i in range(0, len(lines), batch_size))
    failure: list[BaseException] = []

    def worker() -> None:
        with requests.Session() as session:
            for batch in batches:
                if failure:
                    return
                jobs = [{**body, "idempotency_key": f"gdl-enqueue-{run}-{number}"} for number, body in batch]
                try:
                    status, answer = _post(session, f"{base}/download/batch", {"jobs": jobs}, headers)
                except StartupError as exc:
                    failure.append(exc)
                    return
                if status == 401:
                    failure.append(StartupError(f"{base}: 401 {answer.get('error', '')} "
                                                "(security.api_tokens is set: pass --token)"))
                    return
                _record(out, batch, status, answer)
                bar.update(len(batch))

    started = time.monotonic()
    group = gevent.pool.Group()
    for _ in range(min(connections, max(1, -(-len(lines) // batch_size)))):
        group.spawn(worker)
    group.join()
    out.seconds = time.monotonic() - started
    bar.close()
    if failure:
        print(f"gdl: accepted {len(out.accepted)} job(s) before stopping", file=sys.stderr)
        raise failure[0]
    return out


def _record(out: Submitted, batch: list[tuple[int, dict]], status: int, answer: dict) -> None:
    """Each line's result, from the batch's answer (or the whole batch's refusal)."""
    results = answer.get("jobs") if status == 200 else None
    if not isinstance(results, list) or len(results) != len(batch):
        reason = f"{status} {answer.get('error', '')}"
        out.rejected += [(number, reason) for number, _ in batch]
        return
    for (number, body), result in zip(batch, results):
        if result.get("status") == 201:
            out.accepted.append((number, result["id"], str(body.get("url", ""))))
        else:
            out.rejected.append((number, f"{result.get('status')} {result.get('error', '')}"))


def _post(session: requests.Session, url: str, body: dict, headers: dict) -> tuple[int, dict]:
    data = json.dumps(body, separators=(",", ":")).encode()
    delay = 0.1
    for attempt in range(1, SUBMIT_TRIES + 1):
        try:
            response = session.post(url, data=data, headers=headers, timeout=30)
        except requests.RequestException as exc:
            if attempt == SUBMIT_TRIES:
                raise StartupError(f"cannot reach the API at {url}: {exc}") from exc
        else:
            if response.status_code < 500 or attempt == SUBMIT_TRIES:
                try:
                    answer = response.json()
                except ValueError:
                    answer = {"error": response.text[:REASON_LENGTH]}
                return response.status_code, answer if isinstance(answer, dict) else {}
        gevent.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")  # pragma: no cover


def _report_submission(submitted: Submitted, *, total: int) -> None:
    rate = len(submitted.accepted) / submitted.seconds if submitted.seconds else 0.0
    print(f"accepted {len(submitted.accepted)} of {total} job(s) in {submitted.seconds:.1f}s ({rate:.0f}/s)"
          + (f", {len(submitted.rejected)} rejected" if submitted.rejected else ""), file=sys.stderr)
    for number, reason in submitted.rejected[:REJECTIONS_SHOWN]:
        print(f"  line {number}: {reason}", file=sys.stderr)
    if len(submitted.rejected) > REJECTIONS_SHOWN:
        print(f"  ... and {len(submitted.rejected) - REJECTIONS_SHOWN} more", file=sys.stderr)


def outcome(record: dict[str, str] | None) -> str | None:
    """A finished job's result (``succeeded`` or a reason), None while it is under way."""
    if record is None:
        return "gone (deleted before it was seen finished)"
    state, callback = JobState(record["state"]), CallbackState(record["callback_state"])
    if state not in FINISHED or callback not in SETTLED_CALLBACK:
        return None
    if state is JobState.CANCELLED:
        return _short(record["error"])  # "cancelled by request", or by a purge
    if state is JobState.FAILED:
        reason = f"download failed: {_short(record['error'])}"
        return reason + (" (callback failed too)" if callback is CallbackState.FAILED else "")
    if callback is CallbackState.FAILED:
        return f"callback failed: {_short(record['callback_error'])}"
    return SUCCEEDED


def wait(store: Store, job_ids: list[str], *, timeout: float | None = None, quiet: bool = False) -> Counter[str]:
    """Poll the jobs until each has finished (or ``timeout``); results counted by outcome."""
    results: Counter[str] = Counter()
    pending = list(job_ids)
    bar = tqdm(total=len(job_ids), desc="finished", unit=" jobs", bar_format=BAR_FORMAT, disable=quiet,
               file=sys.stderr, dynamic_ncols=True)
    deadline = time.monotonic() + timeout if timeout is not None else None
    try:
        while pending:
            still = []
            for start in range(0, len(pending), WAIT_BATCH):
                chunk = pending[start:start + WAIT_BATCH]
                records = store.job_fields(chunk, "state", "callback_state", "error", "callback_error")
                for job_id, record in zip(chunk, records):
                    result = outcome(record)
                    if result is None:
                        still.append(job_id)
                    else:
                        results[result] += 1
                        bar.update(1)
            pending = still
            if not pending:
                break
            if deadline is not None and time.monotonic() >= deadline:
                results[f"still under way after {timeout:g}s"] = len(pending)
                break
            gevent.sleep(POLL_INTERVAL)
    except KeyboardInterrupt:
        results["still under way (interrupted)"] = len(pending)
    finally:
        bar.close()
    return results


def summary(results: Counter[str]) -> str:
    rows = sorted(results.items(), key=lambda kv: (kv[0] != SUCCEEDED, -kv[1], kv[0]))
    if SUCCEEDED not in results:
        rows.insert(0, (SUCCEEDED, 0))
    failed = sum(n for name, n in results.items() if name != SUCCEEDED)
    return table(["result", "jobs"], rows, right=[1]) + f"\n\n{results[SUCCEEDED]} succeeded, {failed} not"


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= REASON_LENGTH else text[:REASON_LENGTH - 1] + "…"
