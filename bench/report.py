"""What every workload fills and prints: a row per tool run, the report, and the
printing and JSON helpers the workloads' tables and records share."""

import math
from dataclasses import dataclass, field
from typing import Any

from harness import MB


@dataclass
class Row:
    """One tool's run of a workload."""

    name: str
    seconds: float
    units: float  # jobs, or bytes
    tool_cpu: float  # CPU seconds of the tool (gdl: its processes + redis-server)
    redis_cpu: float = 0.0
    server_cpu: float = 0.0  # nginx
    bench_cpu: float = 0.0  # this process (enqueue client, callback receiver)
    machine_cpu: float = 0.0  # every process on the machine (for other_cpu)
    note: str = ""
    by_process: dict[str, float] = field(default_factory=dict)  # gdl: CPU seconds of each process
    connections: int = 0  # gdl: connections its notifier opened to the callback receiver
    key: str = ""  # the JSON lines' name: a reference's key, or a gdl run's tool
    peak_rss: dict[str, int] = field(default_factory=dict)  # peak RSS (VmHWM, KiB) by process
    leases: dict[str, int] = field(default_factory=dict)  # processor role alone: aggregations leased by process
    redis_calls: dict[str, int] = field(default_factory=dict)  # gdl: Redis commands run in the window, by name

    @property
    def cpu_ms_per_unit(self) -> float:
        return self.tool_cpu * 1000 / self.units

    @property
    def rate(self) -> float:
        return self.units / self.seconds

    @property
    def other_cpu(self) -> float:
        """CPU the machine spent beyond the tool, nginx and this process: the kernel's share of
        loopback traffic and disk, plus anything else running (which skews the figures)."""
        return self.machine_cpu - self.tool_cpu - self.server_cpu - self.bench_cpu


@dataclass
class Report:
    small_refs: list[Row] = field(default_factory=list)  # aria2c, the requests loop, the libcurl loop
    small: list[Row] = field(default_factory=list)  # gdl, one row per layout
    small_jobs: int = 0
    many: Row | None = None
    scaleout: list[Row] = field(default_factory=list)  # gdl split with 1, then N processors
    scaleout_alone: list[Row] = field(default_factory=list)  # the processor role alone: 1, then N processes
    big: list[Row] = field(default_factory=list)
    big_desc: str = ""
    big_rss: tuple[int, int] = (0, 0)  # VmRSS at start, VmHWM at end (KiB)
    latency: dict[str, Any] = field(default_factory=dict)
    util: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    load: tuple[str, str] = ("", "")


def rss_mb(kib: int) -> float:
    """KiB (as /proc gives them) in MB (10^6 bytes)."""
    return kib * 1024 / MB


def rss_summary(peak: dict[str, int]) -> dict[str, float]:
    """Peak RSS in MB by process, and ``gdl_total``: the gdl processes together (the redis-server apart)."""
    out = {name: rss_mb(kib) for name, kib in peak.items()}
    out["gdl_total"] = rss_mb(sum(kib for name, kib in peak.items() if name != "redis-server"))
    return out


def processors_cpu(row: Row) -> float:
    """CPU seconds of all of a gdl row's processes with the processor role."""
    return sum(v for k, v in row.by_process.items() if k.startswith("processor") or k == "all")


def print_jobs_table(rows: list[Row]) -> None:
    """The jobs/s table of workloads 1, 5 and 6: references (if any) and gdl rows."""
    print(f"{'':36} {'seconds':>8} {'jobs/s':>8} {'cpu ms/job':>10} {'(redis)':>8} "
          f"{'nginx cpu':>9} {'bench cpu':>9} {'other cpu':>9}  note")
    for r in rows:
        print(f"{r.name:36} {r.seconds:>8.2f} {r.rate:>8.0f} {r.cpu_ms_per_unit:>10.3f} "
              f"{r.redis_cpu * 1000 / r.units:>8.3f} {r.server_cpu:>8.2f}s {r.bench_cpu:>8.2f}s "
              f"{r.other_cpu:>8.2f}s  {r.note}")


def print_gdl_details(r: Row) -> None:
    """A gdl row's CPU by process, callback connections and peak RSS by process."""
    parts = ", ".join(f"{k} {v * 1000 / r.units:.2f}" for k, v in r.by_process.items())
    several = sum(1 for k in r.by_process if k.startswith("processor")) > 1
    together = f" (processors together {processors_cpu(r) * 1000 / r.units:.2f})" if several else ""
    print(f"{r.name}: cpu ms/job by process: {parts}{together}; "
          f"{r.connections} connections opened for {int(r.units)} callbacks")
    if r.redis_calls:
        calls = redis_calls_per_job(r)
        top = ", ".join(f"{k} {v:.2f}" for k, v in sorted(calls.items(), key=lambda kv: -kv[1])[:6] if k != "all")
        print(f"{r.name}: redis commands per job: {calls['all']:.1f} counting those scripts run ({top}); "
              f"one redis core at this CPU per job: {r.units / r.redis_cpu:.0f} jobs/s" if r.redis_cpu else "")
    if r.peak_rss:
        rss = rss_summary(r.peak_rss)
        total = rss.pop("gdl_total")
        print(f"{r.name}: peak RSS (VmHWM) MB: " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items())
              + f"; gdl processes together {total:.0f}")


def cores_busy(r: Row) -> float:
    """How many of the machine's cores were busy on average during a row's window (every process)."""
    return r.machine_cpu / r.seconds


def rounded(value: Any) -> Any:
    """``value`` with floats rounded to 4 decimals and NaN as null, recursively (valid, short JSON)."""
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v) for v in value]
    return value


def redis_calls_per_job(r: Row) -> dict[str, float]:
    """Redis commands per job in a gdl row: ``all``, and by name."""
    out = {k: v / r.units for k, v in r.redis_calls.items()}
    out["all"] = sum(r.redis_calls.values()) / r.units
    return out


def jobs_record(r: Row) -> dict[str, Any]:
    """A jobs/s row (a gdl run or a reference) as JSON: its rate, CPU and, when known, peak RSS."""
    out: dict[str, Any] = {"tool": r.key, "name": r.name, "jobs": int(r.units), "seconds": r.seconds,
                           "jobs_per_s": r.rate, "cpu_ms_per_job": r.cpu_ms_per_unit}
    if r.by_process:
        out["cpu_ms_per_job_by_process"] = {k: v * 1000 / r.units for k, v in r.by_process.items()}
        out["callback_connections"] = r.connections
    if r.redis_calls:
        out["redis_commands_per_job"] = redis_calls_per_job(r)
    if r.peak_rss:
        out["peak_rss_mb"] = rss_summary(r.peak_rss) if r.by_process else rss_mb(next(iter(r.peak_rss.values())))
    out["nginx_cpu_s"], out["bench_cpu_s"], out["other_cpu_s"] = r.server_cpu, r.bench_cpu, r.other_cpu
    return out
