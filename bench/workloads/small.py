"""Workload 1: small files end to end, next to aria2c, a requests loop and a libcurl
loop on the same URLs; its table and JSON records."""

import argparse
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from common import (
    machine_busy_seconds,
)
from harness import BENCH_DIR, SMALL_BYTES, Gdl, Nginx, children_cpu, discard, gdl_name, gdl_tool, now, set_aside
from report import Report, Row, jobs_record, print_gdl_details, print_jobs_table
from servers import CallbackReceiver
from submit import Enqueuer, Job, await_callbacks, check_callbacks, check_files

log = logging.getLogger("bench.throughput")


def make_small_files(nginx: Nginx, n: int) -> list[str]:
    directory = nginx.root / "small"
    directory.mkdir(exist_ok=True)
    block = os.urandom(SMALL_BYTES)
    names = []
    for i in range(n):
        name = f"small/{i}.bin"
        (nginx.root / name).write_bytes(i.to_bytes(8, "big") + block[8:])
        names.append(name)
    return names


def run_aria2c(urls: list[str], outdir: Path, concurrency: int) -> tuple[float, float]:
    """aria2c on ``urls`` into ``outdir``; returns (wall seconds, CPU seconds)."""
    binary = shutil.which("aria2c")
    if binary is None:
        raise SystemExit("bench: aria2c not found (apt-get install -y aria2)")
    outdir.mkdir(parents=True, exist_ok=True)
    listing = outdir.parent / f"{outdir.name}.urls"
    listing.write_text("".join(u + "\n" for u in urls))
    args = [binary, "--no-conf=true", "-j", str(concurrency), "-i", str(listing), "-d", str(outdir),
            "--allow-overwrite=true", "--auto-file-renaming=false", "--file-allocation=none", "-q"]
    cpu, started = children_cpu(), now()
    done = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=3600)
    seconds, cpu = now() - started, children_cpu() - cpu
    if done.returncode != 0:
        raise SystemExit(f"bench: aria2c exited with {done.returncode}: {done.stdout[-2000:]!r}")
    return seconds, cpu


def check_dir(outdir: Path, count: int, size: int, what: str) -> None:
    files = [p for p in outdir.iterdir() if p.is_file()]
    wrong = [p for p in files if p.stat().st_size != size]
    if len(files) != count or wrong:
        raise SystemExit(f"bench: {what}: {len(files)} files of {count}, {len(wrong)} of the wrong size")


def small_aria2c(args: argparse.Namespace, nginx: Nginx, names: list[str], workdir: Path) -> Row:
    def run(urls: list[str], outdir: Path) -> tuple[float, float, int | None]:
        return *run_aria2c(urls, outdir, args.aria2c_jobs), None

    return small_reference(nginx, names, workdir, key="aria2c", name=f"aria2c -j {args.aria2c_jobs}", run=run)


def small_reference(nginx: Nginx, names: list[str], workdir: Path, *, key: str, name: str,
                    run: Callable[[list[str], Path], tuple[float, float, int | None]], note: str = "") -> Row:
    """A reference tool on workload 1's URLs: ``run(urls, outdir)`` gives its (wall seconds, CPU seconds, peak
    RSS KiB or None); the row adds what nginx, this process and the machine spent meanwhile."""
    outdir = workdir / f"{key}-small"
    log.info("small files: %s, on %d URLs", name, len(names))
    nginx_cpu, machine_cpu, bench_cpu = nginx.cpu(), machine_busy_seconds(), time.process_time()
    seconds, cpu, rss = run([nginx.url(n) for n in names], outdir)
    row = Row(name, seconds, len(names), cpu, server_cpu=nginx.cpu() - nginx_cpu,
              bench_cpu=time.process_time() - bench_cpu, machine_cpu=machine_busy_seconds() - machine_cpu,
              note=note, key=key, peak_rss={key: rss} if rss is not None else {})
    check_dir(outdir, len(names), SMALL_BYTES, f"{name} small files")
    set_aside(outdir)
    return row


def run_loop(script: str, urls: list[str], outdir: Path, *options: str) -> tuple[float, float, int]:
    """A reference loop (``bench/<script>``, which prints requests_loop.py's JSON) on ``urls`` into ``outdir``;
    returns (its wall seconds, CPU seconds, peak RSS KiB)."""
    outdir.mkdir(parents=True, exist_ok=True)
    listing = outdir.parent / f"{outdir.name}.urls"
    listing.write_text("".join(u + "\n" for u in urls))
    args = [sys.executable, str(BENCH_DIR / script), "--urls", str(listing), "--out", str(outdir), *options]
    cpu = children_cpu()
    done = subprocess.run(args, capture_output=True, timeout=3600)
    cpu = children_cpu() - cpu
    if done.returncode != 0:
        raise SystemExit(f"bench: {script} exited with {done.returncode}: {done.stderr[-2000:]!r}")
    result = json.loads(done.stdout)
    return result["seconds"], cpu, result["max_rss_kib"]


def small_loop(nginx: Nginx, names: list[str], workdir: Path, *, key: str, name: str, script: str,
               options: list[str]) -> Row:
    def run(urls: list[str], outdir: Path) -> tuple[float, float, int | None]:
        return run_loop(script, urls, outdir, *options)

    return small_reference(nginx, names, workdir, key=key, name=name, run=run, note="seconds: its own, after imports")


def small_requests(args: argparse.Namespace, nginx: Nginx, names: list[str], workdir: Path) -> Row:
    return small_loop(nginx, names, workdir, key="requests_loop",
                      name=f"requests loop, {args.requests_threads} threads", script="requests_loop.py",
                      options=["--threads", str(args.requests_threads)])


def small_curl(args: argparse.Namespace, nginx: Nginx, names: list[str], workdir: Path) -> Row | None:
    """The libcurl-on-a-gevent-hub loop, when pycurl is installed (the measure of a proposed replacement)."""
    if importlib.util.find_spec("pycurl") is None:
        log.warning("small files: no libcurl reference (pip install pycurl to measure it)")
        return None
    return small_loop(nginx, names, workdir, key="curl_loop", name=f"libcurl on a gevent hub, {args.requests_threads} "
                      "at once", script="curl_loop.py", options=["--parallel", str(args.requests_threads)])


@dataclass
class Readings:
    """CPU seconds so far of each gdl process and the redis-server, of nginx, of the machine's cores and of
    this process; and the connections the callback receiver accepted so far."""

    by_process: dict[str, float]
    nginx: float
    machine: float
    bench: float
    peers: int

    @classmethod
    def take(cls, gdl: Gdl, nginx: Nginx, receiver: CallbackReceiver, end: bool = False) -> Self:
        """At the start of a window (``end`` False) this process's and the machine's CPU are read last, at
        its end first: the reading of /proc is no part of either."""
        if end:
            bench, machine = time.process_time(), machine_busy_seconds()
            return cls(gdl.cpu_by_process(), nginx.cpu(), machine, bench, len(receiver.peers))
        by_process, nginx_cpu, peers = gdl.cpu_by_process(), nginx.cpu(), len(receiver.peers)
        machine = machine_busy_seconds()
        return cls(by_process, nginx_cpu, machine, time.process_time(), peers)


def measure_gdl(args: argparse.Namespace, gdl: Gdl, nginx: Nginx, receiver: CallbackReceiver, jobs: list[Job],
                what: str, size: int) -> Row:
    """Enqueue ``jobs`` in one burst and wait for every callback: a row of first enqueue to last callback,
    the CPU of gdl's processes and redis-server, and their peak RSS at the end; checks that every stored
    file has ``size`` bytes."""
    keys = [j.key for j in jobs]
    receiver.expect(keys)
    enqueuer = Enqueuer(gdl.api_port, receiver.url)
    prepared = enqueuer.prepare(jobs)
    gdl.redis_calls(reset=True)
    start = Readings.take(gdl, nginx, receiver)
    started = now()
    enqueuer.burst(prepared, min(args.connections, len(jobs)))
    enqueued = now() - started
    log.info("%s: all enqueued in %.1fs (%.0f/s), %d callbacks so far", what, enqueued, len(jobs) / enqueued,
             len(jobs) - receiver.missing)
    end = await_callbacks(receiver, gdl, what, timeout=max(120.0, len(jobs) / 10),
                          at_count=lambda: Readings.take(gdl, nginx, receiver, end=True))
    redis_calls = gdl.redis_calls()
    last = max(receiver.arrivals[k][0] for k in keys)
    first = min(enqueuer.starts.values())
    by_process = {k: v - start.by_process[k] for k, v in end.by_process.items()}
    row = Row(gdl_name(gdl.layout, gdl.processors, gdl.engine), last - first, len(jobs), sum(by_process.values()),
              redis_cpu=by_process["redis-server"], server_cpu=end.nginx - start.nginx,
              bench_cpu=end.bench - start.bench, note=f"enqueue {enqueued:.1f}s",
              machine_cpu=end.machine - start.machine, by_process=by_process, connections=end.peers - start.peers,
              key=gdl_tool(gdl.layout, gdl.processors, gdl.engine), peak_rss=gdl.peak_rss_kib(),
              redis_calls=redis_calls)
    payloads = check_callbacks(receiver, keys, what)
    check_files(gdl.rootdir, payloads, size, what)
    log.info("%s: %d callbacks, all success, all files %d bytes; %d gdl log lines", what, len(payloads), size,
             gdl.log_lines())
    if receiver.duplicates:
        log.warning("%s: %d duplicate callbacks so far", what, receiver.duplicates)
    return row


def small_gdl(args: argparse.Namespace, layout: str, nginx: Nginx, names: list[str], workdir: Path,
              receiver: CallbackReceiver, processors: int = 1, tag: str = "small", engine: str = "") -> Row:
    """Workload 1 for one gdl layout and engine (``--engine`` by default): ``names`` into
    ``--small-aggregations`` of ``--small-limit``."""
    engine = engine or args.engine
    run = f"{tag}-{gdl_tool(layout, processors, engine).replace(' ', '-')}"  # small-gdl-split-curl
    with Gdl(workdir / run, layout, args.gdl_log_level, args.notifier_concurrency, processors, engine) as gdl:
        jobs = [Job(f"{run}-{i}", nginx.url(name), f"small{i % args.small_aggregations}", args.small_limit)
                for i, name in enumerate(names)]
        log.info("%s: %s: %d jobs in %d aggregations of limit %d over %d connections", tag,
                 gdl_name(layout, processors, engine), len(jobs), args.small_aggregations, args.small_limit,
                 args.connections)
        row = measure_gdl(args, gdl, nginx, receiver, jobs, run, SMALL_BYTES)
    discard(gdl.dir, args)
    return row


def print_small(report: Report, args: argparse.Namespace) -> None:
    print(f"1. small files: {report.small_jobs} x 16 KiB from nginx, gdl: {args.small_aggregations} "
          f"aggregations of limit {args.small_limit}, enqueued over {args.connections} connections")
    print_jobs_table(report.small_refs + report.small)
    for r in report.small:
        print_gdl_details(r)
    for r in report.small:
        for ref in report.small_refs:
            print(f"ratio {r.name} / {ref.name}: jobs/s {r.rate / ref.rate:.3f}, "
                  f"cpu per job {r.tool_cpu / ref.tool_cpu:.1f}x")
    print()


def small_records(report: Report, args: argparse.Namespace) -> list[dict[str, Any]]:
    refs = {ref.key: jobs_record(ref) for ref in report.small_refs}
    out = []
    for r in report.small:
        ratio = {}
        for ref in report.small_refs:
            ratio[f"jobs_per_s_vs_{ref.key}"] = r.rate / ref.rate
            ratio[f"cpu_per_job_vs_{ref.key}"] = r.tool_cpu / ref.tool_cpu
        out.append({"workload": "small", **jobs_record(r), "aggregations": args.small_aggregations,
                    "limit": args.small_limit, "reference": refs, "ratio": ratio})
    return out
