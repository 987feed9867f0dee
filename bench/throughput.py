"""End-to-end throughput, latency and limit-keeping of gdl, next to aria2c and curl.

One run starts everything it needs on 127.0.0.1 in a temp dir: nginx serving
the files, a redis-server with append-only persistence (as gdl's embedded
mode runs it), gdl as real processes (``python -m gdl.cli``), and, in this
gevent-patched process, the callback receiver and a slow origin. Then:

1. small files: N x 16 KiB end to end (enqueue, download, store, callback),
   next to ``aria2c -j 16``, a plain ``requests`` loop (16 threads) and, when
   pycurl is installed, libcurl driven by a gevent hub (16 at once) on the
   same URLs: jobs/s, CPU ms per job, peak RSS of each gdl process;
2. big files: a few large files, next to curl (+ fsync) and aria2c: MB/s,
   and the peak RSS of gdl's processes;
3. pickup latency: a trickle of jobs into an idle gdl, enqueue to callback;
4. utilisation: 200 ms downloads in aggregations of limits 1..8: the most
   in flight per aggregation (never above its limit) and the share of slots
   kept busy;
5. many aggregations: 2000 aggregations x 5 small files, limit 2: jobs/s
   against workload 1's, and the peak RSS of all gdl processes;
6. scale-out: workload 1 with one processor process, then with two (the whole
   pipeline); then the processor role alone, 1 then 2 processes, on jobs queued
   beforehand through the API (stopped before the processors start).

    python bench/throughput.py [--quick] [--workloads small,many] [--small-jobs 10000] [--big-mib 256] ...

Progress goes to stderr through ``logging``; the report to stdout: tables,
then one JSON object per line for each workload run (``grep '^{'``). Needs
``nginx`` and ``aria2c`` on PATH (Debian: ``apt-get install nginx aria2``).
"""

# Patched first, as gdl/cli.py does: the callback receiver, the slow origin and
# the HTTP clients below are greenlets on one hub.
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from harness import (  # noqa: E402
    ENGINES,
    LAYOUTS,
    MANY_RATIO_TARGET,
    MANY_RSS_TARGET_MB,
    MIB,
    SCALEOUT_TARGET,
    SMALL_BYTES,
    WORKLOADS,
    Gdl,
    Nginx,
    percentile,
)
from report import Report, rounded, rss_summary  # noqa: E402
from servers import CallbackReceiver  # noqa: E402
from workloads.big import big_aria2c, big_curl, big_gdl, big_record, make_big_files, print_big, quiet_disk  # noqa: E402
from workloads.latency import latency_record, pickup_latency, print_latency  # noqa: E402
from workloads.many import many_aggregations, many_record, print_many, small_match  # noqa: E402
from workloads.scaleout import print_scaleout, scale_out, scaleout_record  # noqa: E402
from workloads.small import (  # noqa: E402
    make_small_files,
    print_small,
    small_aria2c,
    small_curl,
    small_gdl,
    small_records,
    small_requests,
)
from workloads.utilisation import print_util, util_record, utilisation  # noqa: E402

log = logging.getLogger("bench.throughput")


def print_summary(report: Report, args: argparse.Namespace) -> None:
    print("summary")
    for r in report.small:
        for ref in report.small_refs:
            print(f"  small files  {r.name:36} / {ref.key:13}  jobs/s {r.rate / ref.rate:6.3f}   "
                  f"cpu ms/job {r.cpu_ms_per_unit:.2f} vs {ref.cpu_ms_per_unit:.3f}")
    if report.big:
        gdl = report.big[-1]
        for r in report.big[:-1]:
            print(f"  big files    gdl / {r.name:36}  MB/s {gdl.rate / r.rate:6.2f}")
    if report.latency:
        lat = report.latency["all"]
        print(f"  latency      p50 {percentile(lat, 50):.1f} ms, p99 {percentile(lat, 99):.1f} ms, "
              f"max {max(lat):.1f} ms")
    if report.util:
        u = report.util
        print(f"  utilisation  busy-slot ratio {u['ratio_a']:.3f} (all queued), {u['ratio_b']:.3f} (usable); "
              f"elapsed/ideal {u['elapsed'] / u['ideal']:.2f}; limit violations: {len(u['violations'])}")
    if report.many:
        r = report.many
        small = small_match(report, r)
        ratio = (f"{r.rate / small.rate:.3f} of small files' (target >= {MANY_RATIO_TARGET})" if small
                 else "no ratio (small files not run)")
        print(f"  many aggrs   jobs/s {r.rate:.0f}, {ratio}; gdl peak RSS "
              f"{rss_summary(r.peak_rss)['gdl_total']:.0f} MB (target <= {MANY_RSS_TARGET_MB})")
    if report.scaleout:
        one, more = report.scaleout
        print(f"  scale-out    whole pipeline: jobs/s {one.rate:.0f} with 1 processor, {more.rate:.0f} with "
              f"{args.scaleout_processors}: {more.rate / one.rate:.3f}x (target >= {SCALEOUT_TARGET})")
    if report.scaleout_alone:
        one, more = report.scaleout_alone
        print(f"  scale-out    processor role alone: jobs/s {one.rate:.0f} with 1 processor, {more.rate:.0f} with "
              f"{args.scaleout_processors}: {more.rate / one.rate:.3f}x (target >= {SCALEOUT_TARGET})")
    for note in report.notes:
        print(f"  note: {note}")


def print_report(report: Report, args: argparse.Namespace) -> None:
    print()
    print(f"machine: {os.cpu_count()} cores; load average {report.load[0]} at start, {report.load[1]} at end "
          "(other cpu = machine busy time not spent by the tool, nginx or this process)")
    if report.small:
        print_small(report, args)
    if report.big:
        print_big(report)
    if report.latency:
        print_latency(report, args)
    if report.util:
        print_util(report, args)
    if report.many:
        print_many(report, args)
    if report.scaleout:
        print_scaleout(report, args)
    print_summary(report, args)
    print()
    for record in json_records(report, args):
        print(json.dumps(rounded(record)))


def json_records(report: Report, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One JSON object per workload run (per gdl layout in workload 1), in the order of the tables."""
    out = small_records(report, args)
    if report.big:
        out.append(big_record(report, args))
    if report.latency:
        out.append(latency_record(report, args))
    if report.util:
        out.append(util_record(report, args))
    if report.many:
        out.append(many_record(report, args))
    if report.scaleout:
        out.append(scaleout_record(report, args))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes: 2000 small files, 8 x 32 MiB, a 5 s trickle, 5 rounds of utilisation, "
                             "400 x 5 jobs of many aggregations, 2000 jobs of scale-out")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated subset of {','.join(WORKLOADS)} (default: all)")
    parser.add_argument("--layout", choices=LAYOUTS, default="split",
                        help="gdl processes for workloads 2-5: split = one per role as in the Procfile "
                             "(default), single = one process with every role")
    parser.add_argument("--processors", type=int, default=1,
                        help="processor processes in the split layout (workloads 1-5; default 1)")
    parser.add_argument("--engine", choices=ENGINES, default="curl",
                        help="gdl's http.engine in workloads 2-6 (default curl)")
    parser.add_argument("--small-engines", default="curl,requests",
                        help="gdl's http.engines measured side by side in workload 1 (default: both)")
    parser.add_argument("--small-layouts", default="single,split",
                        help="gdl layouts measured in workload 1 (default: both)")
    parser.add_argument("--small-jobs", type=int, help="small files (default 10000, quick 2000)")
    parser.add_argument("--small-aggregations", type=int, default=100)
    parser.add_argument("--small-limit", type=int, default=8)
    parser.add_argument("--aria2c-jobs", type=int, default=16, help="aria2c -j for the small files")
    parser.add_argument("--requests-threads", type=int, default=16,
                        help="threads (one requests.Session each) of the requests loop for the small files")
    parser.add_argument("--many-aggregations", type=int, help="aggregations of workload 5 (default 2000, quick 400)")
    parser.add_argument("--many-jobs-per-aggregation", type=int, default=5)
    parser.add_argument("--many-limit", type=int, default=2, help="aggr_limit of workload 5")
    parser.add_argument("--scaleout-jobs", type=int,
                        help="small files of workload 6, per run (default: --small-jobs; quick 2000)")
    parser.add_argument("--scaleout-processors", type=int, default=2,
                        help="processor processes of workload 6's second run, in both measurements (default 2)")
    parser.add_argument("--redis-fsync", choices=("always", "everysec"), default="always",
                        help="the redis-server's AOF fsync policy, as gdl's redis.embedded_fsync (default always)")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive connections enqueueing jobs")
    parser.add_argument("--big-files", type=int, default=8)
    parser.add_argument("--big-mib", type=int, help="MiB per big file (default 256, quick 32)")
    parser.add_argument("--big-aggregations", type=int, default=2)
    parser.add_argument("--big-limit", type=int, default=4)
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="gdl idle time before the trickle")
    parser.add_argument("--trickle-rate", type=float, default=20.0, help="jobs per second")
    parser.add_argument("--trickle-seconds", type=float, help="default 10, quick 5")
    parser.add_argument("--trickle-aggregations", type=int, default=10)
    parser.add_argument("--util-aggregations", type=int, default=20)
    parser.add_argument("--util-rounds", type=int, help="jobs per aggregation = rounds x limit (default 10, quick 5)")
    parser.add_argument("--util-hold", type=float, default=0.2, help="seconds the slow origin holds each response")
    parser.add_argument("--util-sample", type=float, default=0.02, help="seconds between in-flight samples")
    parser.add_argument("--notifier-concurrency", type=int, default=50)
    parser.add_argument("--gdl-log-level", default="warning", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) and say where it is")
    args = parser.parse_args(argv)
    quick = args.quick
    Gdl.redis_fsync = args.redis_fsync
    args.small_jobs = args.small_jobs or (2000 if quick else 10000)
    args.big_mib = args.big_mib or (32 if quick else 256)
    args.trickle_seconds = args.trickle_seconds or (5.0 if quick else 10.0)
    args.util_rounds = args.util_rounds or (5 if quick else 10)
    args.many_aggregations = args.many_aggregations or (400 if quick else 2000)
    args.scaleout_jobs = args.scaleout_jobs or (2000 if quick else args.small_jobs)
    args.workloads = {w.strip() for w in args.workloads.split(",") if w.strip()}
    unknown = args.workloads - set(WORKLOADS)
    if unknown:
        parser.error(f"--workloads: unknown {', '.join(sorted(unknown))}")
    if args.processors < 1 or args.scaleout_processors < 2:
        parser.error("--processors must be at least 1, --scaleout-processors at least 2")
    args.small_engines = [w.strip() for w in args.small_engines.split(",") if w.strip()]
    if not set(args.small_engines) <= set(ENGINES):
        parser.error("--small-engines: curl and/or requests")
    args.small_layouts = [w.strip() for w in args.small_layouts.split(",") if w.strip()]
    if not set(args.small_layouts) <= set(LAYOUTS):
        parser.error("--small-layouts: single and/or split")
    return args


def small_files_needed(args: argparse.Namespace) -> int:
    """How many distinct 16 KiB files the chosen workloads use (latency alone: 200, reused round-robin)."""
    needs = [0]
    if "small" in args.workloads:
        needs.append(args.small_jobs)
    if "many" in args.workloads:
        needs.append(args.many_aggregations * args.many_jobs_per_aggregation)
    if "scaleout" in args.workloads:
        needs.append(args.scaleout_jobs)
    if "latency" in args.workloads:
        needs.append(200)
    return max(needs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    report = Report()
    load_start = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    tmp = tempfile.mkdtemp(prefix="gdl-throughput-")
    workdir = Path(tmp)
    receiver = CallbackReceiver()
    receiver.start()
    try:
        with Nginx(workdir) as nginx:
            names: list[str] = []
            count = small_files_needed(args)
            if count:
                log.info("writing %d files of %d bytes", count, SMALL_BYTES)
                names = make_small_files(nginx, count)
            if "small" in args.workloads:
                mine = names[:args.small_jobs]
                report.small_jobs = len(mine)
                report.small_refs.append(small_aria2c(args, nginx, mine, workdir))
                report.small_refs.append(small_requests(args, nginx, mine, workdir))
                curl = small_curl(args, nginx, mine, workdir)
                if curl is not None:
                    report.small_refs.append(curl)
                for layout in args.small_layouts:
                    for engine in args.small_engines:  # side by side, against the same references
                        report.small.append(small_gdl(args, layout, nginx, mine, workdir, receiver, args.processors,
                                                      engine=engine))
            if "big" in args.workloads:
                size = args.big_mib * MIB
                report.big_desc = (f"{args.big_files} x {args.big_mib} MiB from nginx; gdl ({args.layout}): "
                                   f"{args.big_aggregations} aggregations of limit {args.big_limit}; references "
                                   f"{args.big_aggregations * args.big_limit} at once; MB = 10^6 bytes")
                log.info("writing %d files of %d MiB", args.big_files, args.big_mib)
                big = make_big_files(nginx, args.big_files, size)
                try:
                    quiet_disk()
                    report.big.append(big_curl(args, nginx, big, size, workdir))
                    quiet_disk()
                    report.big += big_aria2c(args, nginx, big, size, workdir)
                    quiet_disk()
                    report.big.append(big_gdl(args, nginx, big, size, workdir, receiver, report))
                finally:
                    shutil.rmtree(nginx.root / "big", ignore_errors=True)
            if "latency" in args.workloads:
                report.latency = pickup_latency(args, nginx, names, workdir, receiver)
            if "util" in args.workloads:
                report.util = utilisation(args, workdir, receiver)
            if "many" in args.workloads:
                report.many = many_aggregations(args, nginx, names, workdir, receiver)
            if "scaleout" in args.workloads:
                report.scaleout, report.scaleout_alone = scale_out(args, nginx, names, workdir, receiver)
    finally:
        receiver.stop()
        if args.keep:
            log.info("temp dir kept: %s", workdir)
        else:
            # rm, not shutil.rmtree: on this process's gevent hub (gevent 25.8+), closing a
            # directory's descriptor waits for the hub's next turn, so rmtree held one open per
            # directory of the tree (tens of thousands of <id[0:3]>/ directories) and ran out.
            subprocess.run(["rm", "-rf", "--", str(workdir)], check=False)
            # Written back now, the inodes just freed are skipped by new files (see
            # harness.set_aside) for one minute rather than six: a run started soon
            # after this one is taxed less.
            os.sync()
    if receiver.duplicates or receiver.bad:
        report.notes.append(f"{receiver.duplicates} duplicate and {receiver.bad} unreadable callback(s)")
    report.load = (load_start, " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    print_report(report, args)
    return 1 if report.util and report.util["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
