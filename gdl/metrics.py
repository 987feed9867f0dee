"""Prometheus exposition of the stats every process reports to Redis.

The API renders ``/metrics`` from the live processes' reports (see
:mod:`gdl.stats`) and the store's queue depths, so one scrape of any API
process shows the whole deployment.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from gdl.stats import DURATION_BUCKETS, summed
from gdl.store.aggregations import AggregationView, AggrState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Snapshot:
    """A collector over one moment's reports."""

    def __init__(self, reports: dict[str, list[dict]], depths: dict[str, int], shaped: list[AggregationView],
                 cancels: dict[str, int]):
        self.reports = reports
        self.depths = depths
        self.shaped = shaped
        self.cancels = cancels

    def collect(self) -> Iterable[Metric]:
        queues = GaugeMetricFamily("gdl_queue_depth", "Jobs or aggregations in each Redis structure", labels=["queue"])
        for name, value in sorted(self.depths.items()):
            queues.add_metric([name], value)
        yield queues
        processor = summed(self.reports.get("processor", []))
        notifier = summed(self.reports.get("notifier", []))
        yield _gauge("gdl_processes", "Live processes reporting, by component",
                     {("processor",): processor["processes"], ("notifier",): notifier["processes"]}, ["component"])
        downloads = CounterMetricFamily("gdl_downloads", "Finished download attempts by outcome", labels=["outcome"])
        for outcome in ("succeeded", "retry", "failed"):
            downloads.add_metric([outcome], processor.get(f"downloads_{outcome}", 0))
        yield downloads
        codes = CounterMetricFamily("gdl_download_responses", "Download responses by status class", labels=["class"])
        for cls in ("2xx", "3xx", "4xx", "5xx"):
            codes.add_metric([cls], processor.get(f"status_{cls}", 0))
        yield codes
        yield CounterMetricFamily("gdl_download_bytes", "Bytes stored", value=processor.get("bytes", 0))
        saved = CounterMetricFamily("gdl_bytes_saved", "Bytes not downloaded again: kept prefixes resumed after, "
                                                       "stored copies reused", labels=["reason"])
        saved_downloads = CounterMetricFamily("gdl_downloads_saved", "Downloads resumed or answered from a "
                                                                     "stored copy", labels=["reason"])
        for reason in ("resumed", "reused"):
            saved.add_metric([reason], processor.get(f"{reason}_bytes", 0))
            saved_downloads.add_metric([reason], processor.get(f"downloads_{reason}", 0))
        yield saved
        yield saved_downloads
        buckets = [(str(b), processor.get(f"duration_le_{b}", 0)) for b in DURATION_BUCKETS]
        buckets.append(("+Inf", processor.get("duration_count", 0)))
        yield HistogramMetricFamily("gdl_download_duration_seconds", "Download attempt duration", buckets=buckets,
                                    sum_value=processor.get("duration_seconds_sum_ms", 0) / 1000)
        yield _gauge("gdl_pools", "Aggregation pools running", {(): processor.get("pools", 0)})
        yield _gauge("gdl_workers", "Downloads in progress", {(): processor.get("workers", 0)})
        yield _gauge("gdl_disk_paused", "Processors paused by the disk checker", {(): processor.get("disk_paused", 0)})
        callbacks = CounterMetricFamily("gdl_callbacks", "Callback deliveries by outcome", labels=["outcome"])
        for outcome in ("successful", "retried", "failed", "undefined_backend"):
            callbacks.add_metric([outcome], notifier.get(outcome, 0))
        yield callbacks
        yield CounterMetricFamily("gdl_reaped", "Files deleted by the reaper", value=processor.get("reaper_deleted", 0))
        yield _gauge("gdl_disk_used_percent", "Storage filesystem usage, highest over processors",
                     {(): max((r.get("disk_used_percent", 0) for r in self.reports.get("processor", [])), default=0)})
        errors = CounterMetricFamily("gdl_redis_errors", "Failed Redis calls", labels=["component"])
        errors.add_metric(["processor"], processor.get("redis_errors", 0))
        errors.add_metric(["notifier"], notifier.get("redis_errors", 0))
        yield errors
        cancelled = CounterMetricFamily("gdl_cancelled_jobs", "Jobs cancelled, by what they were doing then: "
                                        "queued or in_flight (DELETE /jobs), purged (DELETE /aggregations)",
                                        labels=["how"])
        for how in ("queued", "in_flight", "purged"):
            cancelled.add_metric([how], self.cancels.get(how, 0))
        yield cancelled
        yield from self._shaping()

    def _shaping(self) -> Iterable[Metric]:
        """Aggregations an operator paused or an origin throttled, and adaptive limits."""
        counts = {state: sum(1 for v in self.shaped if v.state is state)
                  for state in (AggrState.PAUSED, AggrState.THROTTLED)}
        yield _gauge("gdl_aggregations_paused", "Aggregations paused by an operator", {(): counts[AggrState.PAUSED]})
        yield _gauge("gdl_aggregations_throttled", "Aggregations paused by their origin's 429 or 503",
                     {(): counts[AggrState.THROTTLED]})
        yield _gauge("gdl_aggr_effective_limit", "Effective concurrency limit of adaptive aggregations",
                     {(v.aggr_id,): v.effective_limit for v in self.shaped if v.adaptive}, ["aggr"])


def _gauge(name: str, doc: str, values: dict[tuple, float], labels: list[str] | None = None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels or [])
    for label_values, value in values.items():
        family.add_metric(list(label_values), value)
    return family


def exposition(reports: dict[str, list[dict]], depths: dict[str, int],
               shaped: list[AggregationView] | None = None, cancels: dict[str, int] | None = None) -> bytes:
    """``cancels``: the store's counts of cancelled jobs (kept in Redis, whichever process cancelled them)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(reports, depths, shaped or [], cancels or {}))
    return generate_latest(registry)
