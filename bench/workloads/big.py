"""Workload 2: big files, next to curl (+ fsync) and aria2c; its table and JSON record."""

import argparse
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import gevent.pool
import gevent.queue
from common import (
    machine_busy_seconds,
    proc_status_kib,
)
from harness import MB, MIB, Gdl, Nginx, children_cpu, discard, gdl_name, gdl_tool, now
from report import Report, Row, rss_mb, rss_summary
from servers import CallbackReceiver
from submit import Enqueuer, Job, await_callbacks, check_callbacks, check_files

from workloads.small import check_dir, run_aria2c

log = logging.getLogger("bench.throughput")


def make_big_files(nginx: Nginx, count: int, size: int) -> list[str]:
    directory = nginx.root / "big"
    directory.mkdir(exist_ok=True)
    block = os.urandom(MIB)
    names = []
    for i in range(count):
        name = f"big/{i}.bin"
        with open(nginx.root / name, "wb") as out:
            left = size
            while left > 0:
                out.write(block[:min(left, MIB)])
                left -= MIB
        names.append(name)
    return names


def quiet_disk() -> None:
    """Write back what earlier runs left dirty (their deleted files included) before a
    big-file run starts, so that no tool pays for the previous one's writeback."""
    started = now()
    os.sync()
    time.sleep(1.0)
    log.info("big files: disk synced in %.1fs before the next tool", now() - started)


def big_curl(args: argparse.Namespace, nginx: Nginx, names: list[str], size: int, workdir: Path) -> Row:
    """curl per file, then ``sync <file>`` (an fsync): ``limit`` at a time in each of the aggregations' groups."""
    curl = shutil.which("curl")
    if curl is None:
        raise SystemExit("bench: curl not found")
    outdir = workdir / "curl-big"
    outdir.mkdir(parents=True, exist_ok=True)
    groups = [names[g::args.big_aggregations] for g in range(args.big_aggregations)]
    failures: list[str] = []

    def one(name: str) -> None:
        target = outdir / name.replace("/", "-")
        done = subprocess.run(["sh", "-c", 'curl -sf -o "$1" "$2" && sync "$1"', "sh", str(target), nginx.url(name)],
                              timeout=3600)
        if done.returncode != 0:
            failures.append(f"{name}: exit {done.returncode}")

    def group(mine: list[str]) -> None:
        pool = gevent.pool.Pool(args.big_limit)
        for name in mine:
            pool.spawn(one, name)
        pool.join()

    log.info("big files: curl + sync, %d groups of %d at a time", len(groups), args.big_limit)
    cpu, nginx_cpu, machine_cpu, bench_cpu = children_cpu(), nginx.cpu(), machine_busy_seconds(), time.process_time()
    started = now()
    gevent.joinall([gevent.spawn(group, g) for g in groups])
    seconds = now() - started
    if failures:
        raise SystemExit(f"bench: curl failed: {failures}")
    row = Row("curl + sync (per file)", seconds, size * len(names), children_cpu() - cpu,
              server_cpu=nginx.cpu() - nginx_cpu, bench_cpu=time.process_time() - bench_cpu,
              machine_cpu=machine_busy_seconds() - machine_cpu, key="curl_fsync")
    check_dir(outdir, len(names), size, "curl big files")
    shutil.rmtree(outdir)
    return row


def big_aria2c(args: argparse.Namespace, nginx: Nginx, names: list[str], size: int, workdir: Path) -> list[Row]:
    outdir = workdir / "aria2c-big"
    concurrency = args.big_aggregations * args.big_limit
    log.info("big files: aria2c -j %d", concurrency)
    nginx_cpu, machine_cpu, bench_cpu = nginx.cpu(), machine_busy_seconds(), time.process_time()
    seconds, cpu = run_aria2c([nginx.url(n) for n in names], outdir, concurrency)
    server_cpu = nginx.cpu() - nginx_cpu
    machine_cpu, bench_cpu = machine_busy_seconds() - machine_cpu, time.process_time() - bench_cpu
    check_dir(outdir, len(names), size, "aria2c big files")
    # aria2c does not fsync; gdl and the curl line do. Time the same guarantee after it.
    started = now()
    for path in outdir.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync = now() - started
    shutil.rmtree(outdir)
    return [Row(f"aria2c -j {concurrency} (no fsync)", seconds, size * len(names), cpu, server_cpu=server_cpu,
                bench_cpu=bench_cpu, machine_cpu=machine_cpu, key="aria2c"),
            Row(f"aria2c -j {concurrency} + fsync after", seconds + fsync, size * len(names), cpu,
                server_cpu=server_cpu, bench_cpu=bench_cpu, machine_cpu=machine_cpu, note=f"fsync {fsync:.2f}s",
                key="aria2c_fsync")]


def big_gdl(args: argparse.Namespace, nginx: Nginx, names: list[str], size: int, workdir: Path,
            receiver: CallbackReceiver, report: Report) -> Row:
    layout = args.layout
    with Gdl(workdir / "gdl-big", layout, args.gdl_log_level, args.notifier_concurrency, args.processors,
             args.engine) as gdl:
        rss_start = proc_status_kib(gdl.processor_pid, "VmRSS")
        jobs = [Job(f"big-{i}", nginx.url(name), f"big{i % args.big_aggregations}", args.big_limit)
                for i, name in enumerate(names)]
        keys = [j.key for j in jobs]
        receiver.expect(keys)
        enqueuer = Enqueuer(gdl.api_port, receiver.url)
        prepared = enqueuer.prepare(jobs)
        log.info("big files: gdl (%s): %d jobs in %d aggregations of limit %d", layout, len(jobs),
                 args.big_aggregations, args.big_limit)
        gdl_cpu, redis_cpu, nginx_cpu, bench_cpu = gdl.gdl_cpu(), gdl.redis_cpu(), nginx.cpu(), time.process_time()
        machine_cpu = machine_busy_seconds()
        enqueuer.burst(prepared, min(args.connections, len(jobs)))
        await_callbacks(receiver, gdl, "big files", timeout=120 + size * len(names) / (20 * MB))
        last = max(receiver.arrivals[k][0] for k in keys)
        first = min(enqueuer.starts.values())
        row = Row(gdl_name(layout, gdl.processors, gdl.engine), last - first, size * len(names),
                  gdl.gdl_cpu() - gdl_cpu + gdl.redis_cpu() - redis_cpu, redis_cpu=gdl.redis_cpu() - redis_cpu,
                  server_cpu=nginx.cpu() - nginx_cpu, bench_cpu=time.process_time() - bench_cpu,
                  machine_cpu=machine_busy_seconds() - machine_cpu, key=gdl_tool(layout, gdl.processors, gdl.engine),
                  peak_rss=gdl.peak_rss_kib())
        report.big_rss = (rss_start, proc_status_kib(gdl.processor_pid, "VmHWM"))
        payloads = check_callbacks(receiver, keys, "big files")
        check_files(gdl.rootdir, payloads, size, "big files")
    discard(gdl.dir, args)
    return row


def print_big(report: Report) -> None:
    print(f"2. big files: {report.big_desc}")
    print(f"{'':36} {'seconds':>8} {'MB/s':>8} {'cpu s':>8} {'nginx cpu':>9} {'other cpu':>9}  note")
    for r in report.big:
        print(f"{r.name:36} {r.seconds:>8.2f} {r.rate / MB:>8.0f} {r.tool_cpu:>7.2f}s {r.server_cpu:>8.2f}s "
              f"{r.other_cpu:>8.2f}s  {r.note}")
    gdl = report.big[-1]
    for r in report.big[:-1]:
        print(f"ratio gdl / {r.name}: MB/s {gdl.rate / r.rate:.2f}")
    print(f"gdl processor RSS: {report.big_rss[0] / 1024:.0f} MiB at start, peak (VmHWM) "
          f"{report.big_rss[1] / 1024:.0f} MiB")
    rss = rss_summary(gdl.peak_rss)
    total = rss.pop("gdl_total")
    print("gdl peak RSS (VmHWM) MB: " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items())
          + f"; gdl processes together {total:.0f}")
    print()


def big_record(report: Report, args: argparse.Namespace) -> dict[str, Any]:
    gdl = report.big[-1]

    def rates(r: Row) -> dict[str, Any]:
        return {"seconds": r.seconds, "mb_per_s": r.rate / MB, "cpu_s": r.tool_cpu, "nginx_cpu_s": r.server_cpu,
                "other_cpu_s": r.other_cpu}

    return {"workload": "big", "tool": gdl.key, "name": gdl.name, "files": args.big_files, "file_mib": args.big_mib,
            **rates(gdl), "peak_rss_mb": rss_summary(gdl.peak_rss),
            "processor_rss_mb": {"start": rss_mb(report.big_rss[0]), "peak": rss_mb(report.big_rss[1])},
            "reference": {r.key: {"tool": r.name, **rates(r)} for r in report.big[:-1]},
            "ratio": {f"mb_per_s_vs_{r.key}": gdl.rate / r.rate for r in report.big[:-1]}}
