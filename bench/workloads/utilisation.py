"""Workload 4: utilisation of the allowed slots with 200 ms downloads, never above a
limit; its table and record."""

import argparse
import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import gevent.pool
import gevent.queue
from harness import Gdl, discard, gdl_name, gdl_tool, now
from report import Report
from servers import CallbackReceiver, HoldServer
from submit import Enqueuer, Job, await_callbacks, check_callbacks

log = logging.getLogger("bench.throughput")


def utilisation(args: argparse.Namespace, workdir: Path, receiver: CallbackReceiver) -> dict[str, Any]:
    limits = {f"util{i:02d}": i % 8 + 1 for i in range(args.util_aggregations)}
    totals = {aggr: args.util_rounds * limit for aggr, limit in limits.items()}
    hold = HoldServer(args.util_hold, limits)
    hold.start()
    # Round-robin over the aggregations so that all of them have work from the start.
    jobs = []
    for n in range(max(totals.values())):
        for aggr, limit in limits.items():
            if n < totals[aggr]:
                jobs.append(Job(f"util-{aggr}-{n}", hold.url(aggr, n), aggr, limit))
    sent: Counter[str] = Counter()
    samples: list[tuple[float, dict[str, int], dict[str, int]]] = []
    try:
        with Gdl(workdir / "gdl-util", args.layout, args.gdl_log_level, args.notifier_concurrency,
                 args.processors, args.engine) as gdl:
            receiver.expect(j.key for j in jobs)
            enqueuer = Enqueuer(gdl.api_port, receiver.url)
            prepared = enqueuer.prepare(jobs)
            stop = gevent.event.Event()

            def sample() -> None:
                deadline = now() + 600
                while not stop.is_set() and now() < deadline:
                    queued = {a: sent[a] - hold.started[a] for a in limits}
                    samples.append((now(), dict(hold.inflight), queued))
                    if all(hold.started[a] >= totals[a] for a in limits):
                        break
                    stop.wait(args.util_sample)

            log.info("utilisation: %d aggregations, limits 1..8, %d jobs of %.0f ms each", len(limits), len(jobs),
                     args.util_hold * 1000)
            sampler = gevent.spawn(sample)

            def on_start(job: Job) -> None:
                sent[job.aggr] += 1

            started = now()
            enqueuer.burst(prepared, args.connections, on_start)
            elapsed = await_callbacks(receiver, gdl, "utilisation", timeout=120 + len(jobs) * args.util_hold,
                                      at_count=now) - started
            stop.set()
            sampler.join()
            check_callbacks(receiver, [j.key for j in jobs], "utilisation")
        discard(gdl.dir, args)
    finally:
        hold.stop()

    def busy(inflight: dict[str, int], aggrs: Iterable[str]) -> int:
        return sum(min(inflight.get(a, 0), limits[a]) for a in aggrs)

    # A: while every aggregation still had queued work, busy slots over all slots.
    all_queued = [s for s in samples if all(q > 0 for q in s[2].values())]
    ratio_a = (sum(busy(s[1], limits) for s in all_queued) / (len(all_queued) * sum(limits.values()))
               if all_queued else float("nan"))
    # B: over the whole run, busy slots over usable slots (an aggregation can use at most
    # min(limit, in flight + queued)); samples with nothing usable are skipped.
    usable = [(busy(s[1], limits), sum(min(limits[a], s[1].get(a, 0) + max(0, s[2][a])) for a in limits))
              for s in samples]
    usable = [(b, u) for b, u in usable if u]
    ratio_b = sum(b for b, _ in usable) / sum(u for _, u in usable) if usable else float("nan")
    per_aggr = {}
    for aggr, limit in limits.items():
        mine = [s[1].get(aggr, 0) for s in samples if s[2][aggr] > 0]
        per_aggr[aggr] = (limit, totals[aggr], hold.max[aggr],
                          sum(min(x, limit) for x in mine) / (len(mine) * limit) if mine else float("nan"))
    ideal = args.util_rounds * args.util_hold
    demand = sum(limits.values()) / args.util_hold
    return {"demand": demand, "achieved": len(jobs) / elapsed,
            "per_aggr": per_aggr, "violations": hold.violations, "ratio_a": ratio_a, "samples_a": len(all_queued),
            "ratio_b": ratio_b, "samples": len(samples), "elapsed": elapsed, "ideal": ideal, "jobs": len(jobs)}


def print_util(report: Report, args: argparse.Namespace) -> None:
    u = report.util
    print(f"4. utilisation ({gdl_name(args.layout, args.processors, args.engine)}): {u['jobs']} jobs of "
          f"{args.util_hold * 1000:.0f} ms in {len(u['per_aggr'])} aggregations; {u['elapsed']:.2f}s for an ideal "
          f"{u['ideal']:.2f}s")
    print(f"{'aggregation':14} {'limit':>5} {'jobs':>5} {'max in flight':>13} {'busy while queued':>17}")
    for aggr, (limit, total, peak, busy) in u["per_aggr"].items():
        flag = "  <-- LIMIT VIOLATED" if peak > limit else ""
        print(f"{aggr:14} {limit:>5} {total:>5} {peak:>13} {busy:>17.2f}{flag}")
    print(f"busy-slot ratio while every aggregation had queued work: {u['ratio_a']:.3f} "
          f"({u['samples_a']} samples of {args.util_sample * 1000:.0f} ms)")
    print(f"busy-slot ratio over the run, of usable slots: {u['ratio_b']:.3f} ({u['samples']} samples)")
    print(f"jobs/s: {u['achieved']:.0f} done, {u['demand']:.0f} needed to keep every slot busy")
    if u["violations"]:
        print(f"!!! LIMIT VIOLATED {len(u['violations'])} time(s): "
              + ", ".join(f"{a} had {n}" for _, a, n in u["violations"][:10]))
    else:
        print("limits kept: no aggregation ever had more requests in flight than its limit")
    print()


def util_record(report: Report, args: argparse.Namespace) -> dict[str, Any]:
    u = report.util
    return {"workload": "util", "tool": gdl_tool(args.layout, args.processors, args.engine), "jobs": u["jobs"],
            "aggregations": len(u["per_aggr"]), "hold_ms": args.util_hold * 1000, "seconds": u["elapsed"],
            "ideal_seconds": u["ideal"], "jobs_per_s": u["achieved"], "jobs_per_s_needed": u["demand"],
            "busy_ratio_all_queued": u["ratio_a"], "busy_ratio_usable": u["ratio_b"],
            "limit_violations": len(u["violations"]),
            "violated": sorted({a for _, a, _ in u["violations"]})}
