"""Workload 3: pickup latency, enqueue to callback on an idle gdl; its table and record."""

import argparse
import logging
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import gevent.pool
import gevent.queue
from harness import Gdl, Nginx, discard, gdl_name, gdl_tool, percentile
from report import Report
from servers import CallbackReceiver
from submit import Enqueuer, Job, await_callbacks, check_callbacks

log = logging.getLogger("bench.throughput")


def pickup_latency(args: argparse.Namespace, nginx: Nginx, names: list[str], workdir: Path,
                   receiver: CallbackReceiver) -> dict[str, Any]:
    with Gdl(workdir / "gdl-latency", args.layout, args.gdl_log_level, args.notifier_concurrency,
             args.processors, args.engine) as gdl:
        enqueuer = Enqueuer(gdl.api_port, receiver.url)
        # Warm up connections and lazy imports in an aggregation of its own, then leave gdl idle.
        warm = [Job(f"warm-{i}", nginx.url(names[i]), "warmup", 8) for i in range(10)]
        receiver.expect(j.key for j in warm)
        enqueuer.burst(enqueuer.prepare(warm), 2)
        await_callbacks(receiver, gdl, "latency warm-up", timeout=60)
        log.info("pickup latency: warmed up; idle for %.0fs", args.idle_seconds)
        gevent.sleep(args.idle_seconds)
        count = int(args.trickle_rate * args.trickle_seconds)
        jobs = [Job(f"trickle-{i}", nginx.url(names[i % len(names)]), f"trickle{i % args.trickle_aggregations}", 8)
                for i in range(count)]
        keys = [j.key for j in jobs]
        receiver.expect(keys)
        log.info("pickup latency: %d jobs at %g/s into %d aggregations", count, args.trickle_rate,
                 args.trickle_aggregations)
        enqueuer.trickle(enqueuer.prepare(jobs), args.trickle_rate, connections=4)
        await_callbacks(receiver, gdl, "pickup latency", timeout=60)
        check_callbacks(receiver, keys, "pickup latency")
    discard(gdl.dir, args)
    latencies = [(receiver.arrivals[k][0] - enqueuer.starts[k]) * 1000 for k in keys]
    # The first job of each aggregation also starts its pool (scanner wake-up, lease, pool).
    firsts = latencies[:args.trickle_aggregations]
    rest = latencies[args.trickle_aggregations:] or firsts
    return {"jobs": count, "all": latencies, "first": firsts, "rest": rest,
            "span": max(enqueuer.starts[k] for k in keys) - min(enqueuer.starts[k] for k in keys)}


def print_latency(report: Report, args: argparse.Namespace) -> None:
    lat = report.latency
    print(f"3. pickup latency ({gdl_name(args.layout, args.processors, args.engine)}): {lat['jobs']} jobs at "
          f"{args.trickle_rate:g}/s over {lat['span']:.1f}s into {args.trickle_aggregations} aggregations, "
          "enqueue request start -> callback received, ms")
    print(f"{'':36} {'jobs':>6} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}")
    for name, key in (("all jobs", "all"), ("first job of each aggregation", "first"), ("the others", "rest")):
        values = lat[key]
        print(f"{name:36} {len(values):>6} {percentile(values, 50):>7.1f} {percentile(values, 90):>7.1f} "
              f"{percentile(values, 99):>7.1f} {max(values):>7.1f}")
    print()


def latency_record(report: Report, args: argparse.Namespace) -> dict[str, Any]:
    lat = report.latency

    def percentiles(values: list[float]) -> dict[str, float]:
        return {"p50_ms": percentile(values, 50), "p90_ms": percentile(values, 90), "p99_ms": percentile(values, 99),
                "max_ms": max(values)}

    return {"workload": "latency", "tool": gdl_tool(args.layout, args.processors, args.engine),
            "jobs": lat["jobs"],
            "rate_per_s": args.trickle_rate, "aggregations": args.trickle_aggregations, **percentiles(lat["all"]),
            "first_of_aggregation": percentiles(lat["first"]), "others": percentiles(lat["rest"])}
