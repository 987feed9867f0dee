"""Workload 6: scale-out, one then two processor processes (the whole pipeline, then the
processor role alone on jobs queued beforehand); its tables and record."""

import argparse
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import gevent.pool
import gevent.queue
import redis
from harness import SCALEOUT_TARGET, SMALL_BYTES, Gdl, Nginx, ProcessorsAlone, discard, now
from report import (
    Report,
    Row,
    cores_busy,
    jobs_record,
    print_gdl_details,
    print_jobs_table,
    processors_cpu,
    rss_summary,
)
from servers import CallbackReceiver
from submit import Enqueuer, Job, check_files

from gdl.store.layout import (
    CALLBACK_QUEUE,
    FAILURES,
    job_key,
    lease_key,
    queue_key,
)
from workloads.small import Readings, small_gdl

log = logging.getLogger("bench.throughput")


def scale_out(args: argparse.Namespace, nginx: Nginx, names: list[str], workdir: Path,
              receiver: CallbackReceiver) -> tuple[list[Row], list[Row]]:
    """Workload 1 in the split layout with one processor process, then with ``--scaleout-processors`` (the
    whole pipeline); then the processor role alone with as many."""
    mine = names[:args.scaleout_jobs]
    counts = (1, args.scaleout_processors)
    pipeline = [small_gdl(args, "split", nginx, mine, workdir, receiver, processors=n, tag="scaleout")
                for n in counts]
    return pipeline, [processor_alone(args, nginx, mine, workdir, receiver, n) for n in counts]


def processor_alone(args: argparse.Namespace, nginx: Nginx, names: list[str], workdir: Path,
                    receiver: CallbackReceiver, processors: int) -> Row:
    """Workload 6's "processor role alone": ``names`` enqueued as in workload 1 through gdl's API alone, the
    API stopped, then ``processors`` processor processes started; timed from their start (Popen: their
    imports and start-up are inside the window) until every job was downloaded, i.e. until Redis's
    callback queue holds them all (no notifier runs, so nothing leaves it)."""
    run = f"scaleout-alone-x{processors}"
    what = f"processor role alone, {processors} processor{'s' if processors > 1 else ''}"
    with ProcessorsAlone(workdir / run, args.gdl_log_level, args.notifier_concurrency, args.engine) as gdl:
        jobs = [Job(f"{run}-{i}", nginx.url(name), f"small{i % args.small_aggregations}", args.small_limit)
                for i, name in enumerate(names)]
        enqueuer = Enqueuer(gdl.api_port, receiver.url)
        prepared = enqueuer.prepare(jobs)
        log.info("%s: enqueueing %d jobs in %d aggregations of limit %d through the API alone", what, len(jobs),
                 args.small_aggregations, args.small_limit)
        started = now()
        enqueuer.burst(prepared, min(args.connections, len(jobs)))
        log.info("%s: all enqueued in %.1fs; stopping the API", what, now() - started)
        gdl.stop_api()
        client = redis.Redis(unix_socket_path=str(gdl.redis_path))
        try:
            with client.pipeline(transaction=False) as pipe:
                for aggr in sorted({j.aggr for j in jobs}):
                    pipe.zcard(queue_key(aggr))
                queued = sum(pipe.execute())
            if queued != len(jobs) or client.zcard(CALLBACK_QUEUE):
                raise SystemExit(f"bench: {what}: {queued} of {len(jobs)} jobs queued after enqueueing, "
                                 f"{client.zcard(CALLBACK_QUEUE)} already downloaded")
            start = Readings.take(gdl, nginx, receiver)
            started = now()
            gdl.start_processors(processors)
            log.info("%s: started %s", what, ", ".join(f"{k} {p.pid}" for k, p in gdl.procs.items()))
            aggrs = sorted({j.aggr for j in jobs})
            done, owners = await_downloads(client, gdl, len(jobs), aggrs, what, timeout=max(120.0, len(jobs) / 10))
            end = Readings.take(gdl, nginx, receiver, end=True)
            leases = leases_by_process(gdl, owners)
            peak_rss = gdl.peak_rss_kib()
            ids = check_downloads(client, [j.key for j in jobs], what)
        finally:
            client.close()
    by_process = {k: v - start.by_process.get(k, 0.0) for k, v in end.by_process.items()}
    row = Row(what, done - started, len(jobs), sum(by_process.values()), redis_cpu=by_process["redis-server"],
              server_cpu=end.nginx - start.nginx, bench_cpu=end.bench - start.bench,
              machine_cpu=end.machine - start.machine, note="start-up included", by_process=by_process,
              key=f"gdl processor x{processors}", peak_rss=peak_rss, leases=leases)
    check_files(gdl.rootdir, [{"job_id": i} for i in ids], SMALL_BYTES, what)
    stored = sum(1 for p in gdl.rootdir.rglob("*") if p.is_file())
    if stored != len(jobs):
        raise SystemExit(f"bench: {what}: {stored} files under {gdl.rootdir}, expected {len(jobs)}")
    log.info("%s: %d jobs downloaded in %.2fs, all succeeded, all files %d bytes; %d gdl log lines", what,
             len(jobs), row.seconds, SMALL_BYTES, gdl.log_lines())
    if gdl.log_lines():
        log.warning("%s: gdl's logs (--gdl-log-level %s):\n%s", what, args.gdl_log_level, gdl.log_tail(5))
    discard(gdl.dir, args)
    return row


LEASE_SAMPLE = 0.25  # seconds between two readings of the aggregations' leases (processor role alone)


def await_downloads(client: redis.Redis, gdl: Gdl, count: int, aggrs: list[str], what: str,
                    timeout: float) -> tuple[float, dict[str, set[str]]]:
    """Polls ``ZCARD`` of the callback queue every 20 ms until it holds ``count`` jobs (a finished download
    with a callback, succeeded or failed for good, enters it); returns when it first did (:func:`now`), and
    the owner tokens seen holding each of ``aggrs``' leases (read every :data:`LEASE_SAMPLE` seconds: a pool
    keeps its lease for seconds after its last job, so no claim is missed)."""
    deadline = now() + timeout
    keys = [lease_key(a) for a in aggrs]
    owners: dict[str, set[str]] = {a: set() for a in aggrs}
    sampled = -LEASE_SAMPLE
    while True:
        downloaded = client.zcard(CALLBACK_QUEUE)
        if downloaded >= count:
            done = now()
            for aggr, token in zip(aggrs, client.mget(keys), strict=True):
                if token:
                    owners[aggr].add(token.decode())
            return done, owners
        if now() - sampled >= LEASE_SAMPLE:
            sampled = now()
            for aggr, token in zip(aggrs, client.mget(keys), strict=True):
                if token:
                    owners[aggr].add(token.decode())
        for name, proc in gdl.procs.items():
            if proc.poll() is not None:
                raise SystemExit(f"bench: {what}: gdl {name} exited with {proc.returncode}\n" + gdl.log_tail())
        if now() > deadline:
            failures = client.llen(FAILURES)
            first = client.lindex(FAILURES, 0)
            raise SystemExit(f"bench: {what}: {downloaded} of {count} jobs downloaded after {timeout:.0f}s; "
                             f"{failures} failed download attempt(s) reported"
                             + (f", the latest: {first.decode(errors='replace')}" if first else "")
                             + "\n" + gdl.log_tail())
        gevent.sleep(0.02)


def leases_by_process(gdl: Gdl, owners: dict[str, set[str]]) -> dict[str, int]:
    """How many aggregations each gdl process held the lease of (owner tokens are ``host:pid:random``); an
    aggregation taken over by another process counts for both."""
    names = {str(p.pid): name for name, p in gdl.procs.items()}
    counts: Counter[str] = Counter()
    for tokens in owners.values():
        for token in tokens:
            parts = token.rsplit(":", 2)
            counts[names.get(parts[1], token) if len(parts) == 3 else token] += 1
    return {name: counts[name] for name in gdl.procs} | {k: v for k, v in counts.items() if k not in gdl.procs}


def check_downloads(client: redis.Redis, keys: list[str], what: str) -> list[str]:
    """The ids of the jobs in the callback queue, after checking that they are the jobs of ``keys`` (by their
    ``extra``), once each, and that every one succeeded."""
    ids = [i.decode() for i in client.zrange(CALLBACK_QUEUE, 0, -1)]
    with client.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hmget(job_key(job_id), "state", "extra", "error")
        fields = pipe.execute()
    extras = Counter((extra or b"").decode() for _, extra, _ in fields)
    if len(ids) != len(keys) or extras.keys() != set(keys) or max(extras.values(), default=0) != 1:
        raise SystemExit(f"bench: {what}: {len(ids)} jobs downloaded, {len(set(extras) & set(keys))} of the "
                         f"{len(keys)} enqueued")
    failed = [(i, state, error) for i, (state, _, error) in zip(ids, fields, strict=True) if state != b"succeeded"]
    if failed:
        job_id, state, error = failed[0]
        raise SystemExit(f"bench: {what}: {len(failed)} job(s) did not succeed, first: {job_id} "
                         f"state {state!r}, error {error!r}")
    return ids


def print_alone_table(rows: list[Row]) -> None:
    """Workload 6's processor-role-alone rows: the processors' CPU and the redis-server's apart."""
    print(f"{'':36} {'seconds':>8} {'jobs/s':>8} {'proc ms/job':>11} {'redis ms/job':>12} "
          f"{'nginx cpu':>9} {'bench cpu':>9} {'other cpu':>9} {'cores busy':>10}  note")
    for r in rows:
        print(f"{r.name:36} {r.seconds:>8.2f} {r.rate:>8.0f} {processors_cpu(r) * 1000 / r.units:>11.3f} "
              f"{r.redis_cpu * 1000 / r.units:>12.3f} {r.server_cpu:>8.2f}s {r.bench_cpu:>8.2f}s "
              f"{r.other_cpu:>8.2f}s {cores_busy(r):>10.2f}  {r.note}")
    for r in rows:
        parts = ", ".join(f"{k} {v * 1000 / r.units:.3f}" for k, v in r.by_process.items())
        rss = rss_summary(r.peak_rss)
        rss.pop("gdl_total")
        leased = ", ".join(f"{k} {v}" for k, v in r.leases.items())
        print(f"{r.name}: cpu ms/job by process: {parts}; aggregations leased: {leased}; peak RSS (VmHWM) MB: "
              + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()))


def print_scaleout(report: Report, args: argparse.Namespace) -> None:
    one, more = report.scaleout
    cores = os.cpu_count()
    print(f"6. scale-out: {int(one.units)} x 16 KiB from nginx, {args.small_aggregations} aggregations of limit "
          f"{args.small_limit}; {cores} cores")
    print(f"whole pipeline: gdl split layout (api + notifier) with 1, then {args.scaleout_processors} processor "
          "processes, enqueue to last callback")
    print_jobs_table(report.scaleout)
    for r in report.scaleout:
        print_gdl_details(r)
    print("machine busy (cores, every process): "
          + ", ".join(f"{r.name} {cores_busy(r):.2f} of {cores}" for r in report.scaleout))
    if report.scaleout_alone:
        print()
        print(f"processor role alone: jobs enqueued through the API alone, API stopped, then 1, then "
              f"{args.scaleout_processors} processor processes (no API, no notifier), their start to the last "
              "job downloaded")
        print_alone_table(report.scaleout_alone)
    print(f"ratio whole pipeline: {args.scaleout_processors} processors / 1: jobs/s {more.rate / one.rate:.3f} "
          f"(target >= {SCALEOUT_TARGET})")
    if report.scaleout_alone:
        a_one, a_more = report.scaleout_alone
        print(f"ratio processor role alone: {args.scaleout_processors} processors / 1: jobs/s "
              f"{a_more.rate / a_one.rate:.3f} (target >= {SCALEOUT_TARGET})")
    print()


def scaleout_record(report: Report, args: argparse.Namespace) -> dict[str, Any]:
    one, more = report.scaleout
    ratio = more.rate / one.rate
    out = {"workload": "scaleout", "tool": "gdl split", "jobs": int(one.units), "cores": os.cpu_count(),
           "processors": [1, args.scaleout_processors], "jobs_per_s": [one.rate, more.rate],
           "cpu_ms_per_job": [one.cpu_ms_per_unit, more.cpu_ms_per_unit],
           "cores_busy": [cores_busy(one), cores_busy(more)],
           "ratio": {f"jobs_per_s_{args.scaleout_processors}_vs_1": ratio},
           "target": {"ratio_min": SCALEOUT_TARGET}, "meets_target": ratio >= SCALEOUT_TARGET,
           "runs": [jobs_record(one), jobs_record(more)]}
    if report.scaleout_alone:
        rows = report.scaleout_alone
        alone = rows[1].rate / rows[0].rate
        out["processor_alone"] = {
            "jobs_per_s": [r.rate for r in rows], "seconds": [r.seconds for r in rows],
            "cpu_ms_per_job": [processors_cpu(r) * 1000 / r.units for r in rows],
            "cpu_ms_per_job_by_process": [{k: v * 1000 / r.units for k, v in r.by_process.items()} for r in rows],
            "redis_cpu_ms_per_job": [r.redis_cpu * 1000 / r.units for r in rows],
            "nginx_cpu_s": [r.server_cpu for r in rows], "bench_cpu_s": [r.bench_cpu for r in rows],
            "other_cpu_s": [r.other_cpu for r in rows], "cores_busy": [cores_busy(r) for r in rows],
            "aggregations_leased": [r.leases for r in rows],
            "peak_rss_mb": [rss_summary(r.peak_rss) for r in rows], "startup_included": True,
            "ratio": alone, "meets_target": alone >= SCALEOUT_TARGET}
    return out
