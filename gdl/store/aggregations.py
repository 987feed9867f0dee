"""The store's aggregation controls: one aggregation's view (``GET
/aggregations/<id>``), an operator's pause and resume, and the shaping
state the metrics and the dashboard show.

An aggregation's record (``aggr:<aggr>``) holds its settings and the state
that gates taking (see take.lua): ``paused`` (an operator's), ``paused_until``
and ``streak`` (the origin's throttle), ``eff`` and ``aimd_at`` (the adaptive
limit), ``rate`` and ``burst``; the GCRA's arrival time is ``rate:<aggr>``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from gdl.job import rfc3339
from gdl.store.core import JobStore, _translated
from gdl.store.layout import DUE_INDEX, PAUSED, WAKE_AGGR, aggr_key, lease_key, queue_key, rate_key

# Aggregations read for the metrics' shaping gauges (the due index's first ones, and every paused one).
SHAPING_READ_MAX = 1000


class AggrState(StrEnum):
    RUNNING = "running"  # queued or in-flight work, nothing holding it back
    PAUSED = "paused"  # an operator paused it
    THROTTLED = "throttled"  # the origin asked it to slow down, until paused_until
    IDLE = "idle"  # nothing queued, nothing in flight


@dataclass(frozen=True)
class AggregationView:
    """One aggregation as ``GET /aggregations/<id>`` shows it."""

    aggr_id: str
    state: AggrState
    limit: int
    effective_limit: int
    rate: float
    burst: int
    paused_until: int  # the throttle's end (ms); 0 when not throttled
    queued: int
    in_flight: int
    adaptive: bool = False

    def public(self) -> dict[str, Any]:
        return {"aggr_id": self.aggr_id, "state": str(self.state), "limit": self.limit,
                "effective_limit": self.effective_limit, "rate": self.rate, "burst": self.burst,
                "paused_until": rfc3339(self.paused_until) or None,
                "queued": self.queued, "in_flight": self.in_flight}


def view_from_record(aggr_id: str, record: dict[str, str], *, now: int, queued: int, in_flight: int
                     ) -> AggregationView:
    limit = int(record.get("limit") or 0)
    effective = limit
    if record.get("adaptive") == "1" and record.get("eff"):
        effective = max(1, min(limit, int(float(record["eff"]))))
    paused_until = int(record.get("paused_until") or 0)
    paused_until = paused_until if paused_until > now else 0
    if record.get("paused") == "1":
        state = AggrState.PAUSED
    elif paused_until:
        state = AggrState.THROTTLED
    elif queued or in_flight:
        state = AggrState.RUNNING
    else:
        state = AggrState.IDLE
    return AggregationView(aggr_id, state, limit, effective, float(record.get("rate") or 0),
                           int(record.get("burst") or 1), paused_until, queued, in_flight,
                           adaptive=record.get("adaptive") == "1")


def idle_view(aggr_id: str) -> AggregationView:
    """The view of an aggregation with no record left: one paused before it had a job, then resumed."""
    return view_from_record(aggr_id, {}, now=0, queued=0, in_flight=0)


class AggregationControls(JobStore):
    @_translated
    def aggregation(self, aggr_id: str, *, now: int) -> AggregationView | None:
        """``aggr_id``'s view; None when gdl never saw it or forgot it (its record expired)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(aggr_key(aggr_id))
            pipe.zcard(queue_key(aggr_id))
            record, queued = pipe.execute()
        if not record:
            return None
        in_flight = sum(1 for _, aggr in self._inflight_downloads() if aggr == aggr_id)
        return view_from_record(aggr_id, record, now=now, queued=int(queued), in_flight=in_flight)

    @_translated
    def pause_aggregation(self, aggr_id: str) -> None:
        """Stop taking ``aggr_id``'s jobs (take.lua reads the flag at its next call), until resumed."""
        self._run("pause_aggr", [aggr_key(aggr_id), DUE_INDEX, PAUSED], [aggr_id])

    @_translated
    def resume_aggregation(self, aggr_id: str, *, now: int, state_ttl_ms: int) -> bool:
        """Start again: the due index back from the queue's head, and a wake. False when unknown."""
        keys = [aggr_key(aggr_id), DUE_INDEX, PAUSED, queue_key(aggr_id), lease_key(aggr_id)]
        return int(self._run("resume_aggr", keys, [aggr_id, now, WAKE_AGGR, state_ttl_ms])) == 1

    @_translated
    def refund_start(self, aggr_id: str, *, now: int, expected: str) -> str | None:
        """Give back the rate start charged for a job that made no request (refund_start.lua):
        the GCRA time now ("" when idle), or None when refused (a take came between)."""
        reply = self._run("refund_start", [rate_key(aggr_id), aggr_key(aggr_id)], [now, expected])
        return str(reply[1]) if int(reply[0]) == 1 else None

    @_translated
    def clock_offset_ms(self, local: Callable[[], int]) -> int:
        """The Redis server's clock minus ``local``'s (ms), half the round trip taken off."""
        sent = local()
        seconds, micros = self.redis.time()
        received = local()
        return int(seconds) * 1000 + int(micros) // 1000 - (sent + received) // 2

    @_translated
    def shaping_records(self, *, now: int) -> list[AggregationView]:
        """The paused, throttled and adaptive among the aggregations with queued work
        (the due index's first SHAPING_READ_MAX) and the paused ones, for /metrics."""
        names = sorted(set(self.redis.zrange(DUE_INDEX, 0, SHAPING_READ_MAX - 1))
                       | set(self.redis.srandmember(PAUSED, SHAPING_READ_MAX) or []))
        with self.redis.pipeline(transaction=False) as pipe:
            for aggr in names:
                pipe.hgetall(aggr_key(aggr))
            records = pipe.execute()
        views = [view_from_record(a, r, now=now, queued=0, in_flight=0) for a, r in zip(names, records) if r]
        return [v for v in views if v.state is not AggrState.IDLE or v.adaptive]
