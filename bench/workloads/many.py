"""Workload 5: many aggregations against workload 1's jobs/s and memory; its table and record."""

import argparse
import logging
from pathlib import Path
from typing import Any

from harness import MANY_RATIO_TARGET, MANY_RSS_TARGET_MB, SMALL_BYTES, Gdl, Nginx, discard, gdl_name
from report import Report, Row, jobs_record, print_gdl_details, print_jobs_table, rss_summary
from servers import CallbackReceiver
from submit import Job

from workloads.small import measure_gdl

log = logging.getLogger("bench.throughput")


def many_aggregations(args: argparse.Namespace, nginx: Nginx, names: list[str], workdir: Path,
                      receiver: CallbackReceiver) -> Row:
    """Workload 1's files and measure, spread over ``--many-aggregations`` small aggregations."""
    count = args.many_aggregations * args.many_jobs_per_aggregation
    with Gdl(workdir / "gdl-many", args.layout, args.gdl_log_level, args.notifier_concurrency,
             args.processors, args.engine) as gdl:
        jobs = [Job(f"many-{i}", nginx.url(names[i % len(names)]), f"many{i % args.many_aggregations}",
                    args.many_limit) for i in range(count)]
        log.info("many aggregations: %s: %d jobs in %d aggregations of limit %d over %d connections",
                 gdl_name(args.layout, gdl.processors, gdl.engine), len(jobs), args.many_aggregations, args.many_limit,
                 args.connections)
        row = measure_gdl(args, gdl, nginx, receiver, jobs, "many aggregations", SMALL_BYTES)
    discard(gdl.dir, args)
    return row


def small_match(report: Report, row: Row) -> Row | None:
    """Workload 1's row of the same gdl layout as ``row``, if workload 1 ran."""
    return next((r for r in report.small if r.key == row.key), None)


def print_many(report: Report, args: argparse.Namespace) -> None:
    r = report.many
    assert r is not None
    print(f"5. many aggregations: {int(r.units)} x 16 KiB from nginx, gdl: {args.many_aggregations} aggregations "
          f"x {args.many_jobs_per_aggregation} jobs, limit {args.many_limit}, enqueued over {args.connections} "
          "connections")
    print_jobs_table([r])
    print_gdl_details(r)
    small = small_match(report, r)
    if small:
        print(f"ratio many / small files ({r.name}): jobs/s {r.rate / small.rate:.3f} "
              f"(target >= {MANY_RATIO_TARGET}), cpu per job {r.cpu_ms_per_unit / small.cpu_ms_per_unit:.2f}x")
    else:
        print("ratio many / small files: not measured (workload 1 with the same layout did not run)")
    total = rss_summary(r.peak_rss)["gdl_total"]
    print(f"gdl processes' peak RSS together: {total:.0f} MB (target <= {MANY_RSS_TARGET_MB})")
    print()


def many_record(report: Report, args: argparse.Namespace) -> dict[str, Any]:
    r = report.many
    assert r is not None
    small = small_match(report, r)
    ratio = r.rate / small.rate if small else None
    total = rss_summary(r.peak_rss)["gdl_total"]
    return {"workload": "many", **jobs_record(r), "aggregations": args.many_aggregations,
            "jobs_per_aggregation": args.many_jobs_per_aggregation, "limit": args.many_limit,
            "small_jobs_per_s": small.rate if small else None, "ratio": {"jobs_per_s_vs_small": ratio},
            "target": {"jobs_per_s_vs_small_min": MANY_RATIO_TARGET, "gdl_peak_rss_mb_max": MANY_RSS_TARGET_MB},
            "meets_target": {"jobs_per_s": ratio >= MANY_RATIO_TARGET if ratio is not None else None,
                             "peak_rss": total <= MANY_RSS_TARGET_MB}}
