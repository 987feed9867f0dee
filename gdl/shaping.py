"""Aggregation traffic shaping: what a download's outcome says of its origin,
and the job fields that set an aggregation's rate.

Four things gate the one step that starts downloads (take.lua): an
operator's pause, a throttle pause the origin asked for (429, or 503 with
``Retry-After``), the adaptive limit (AIMD on the concurrency cap) and the
rate (GCRA: one stored theoretical arrival time per aggregation). The
scripts do the arithmetic in one atomic step; this module decides what an
outcome signals (:func:`signal`) and holds the constants and the job fields'
type (validated with the other fields by :func:`gdl.submission.shaping_fields`). The contract's words are in
docs/api.md, "Aggregation traffic shaping".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gdl.errors import DownloadError, DownloadTimeout

MAX_AGGR_RATE = 1000.0  # starts per second; more is a 400 (the GCRA works in whole microseconds)
MAX_AGGR_BURST = 1000
# A 429 without Retry-After pauses its aggregation 1, 2, 4 ... s, the streak
# growing once per pause (not per response) and reset by any 2xx.
THROTTLE_MIN_PAUSE_MS = 1000
THROTTLE_MAX_PAUSE_MS = 300_000
# AIMD: a congestion signal multiplies the effective limit by this (at most once
# per processor.aimd_window); each success in use adds 1/limit (about +1 a window).
AIMD_BACKOFF = 0.5
CONGESTION_CODES = frozenset({429, 503, 504})


@dataclass(frozen=True)
class ShapingFields:
    """A job's ``aggr_rate``, ``aggr_burst`` and ``aggr_adaptive``: None when left out (kept)."""

    rate: float | None = None
    burst: int | None = None
    adaptive: bool | None = None


def throttle_pause_ms(err: DownloadError, *, max_retry_after: float) -> int | None:
    """How long ``err`` pauses its whole aggregation: the ``Retry-After`` clamped to
    ``max_retry_after`` seconds (0 for a date in the past); -1 for a 429 without
    one (the streak's pause, decided in settle.lua); None when it is no throttle
    (a 503 without ``Retry-After`` is only congestion)."""
    code = err.response_code
    if code == 429 or (code == 503 and err.retry_after is not None):
        if err.retry_after is None:
            return -1
        return int(min(max(err.retry_after, 0.0), max_retry_after) * 1000)
    return None


def is_congestion(err: DownloadError) -> bool:
    """A sign that the origin is overloaded: 429, 503, 504 or a timeout."""
    return err.response_code in CONGESTION_CODES or isinstance(err, DownloadTimeout)


def signal(now: int, *, busy: int, window_ms: int, ok: bool = False, throttle: int | None = None,
           congested: bool = False, hold: bool = False) -> dict[str, Any]:
    """What settle.lua writes on the aggregation for one outcome (see its ``shape``).

    ``busy``: downloads the pool runs, this one included (AIMD grows a limit in
    use only); ``hold``: the job goes back to its queue until the throttle's end."""
    out: dict[str, Any] = {"now": now, "busy": busy, "window": window_ms, "beta": AIMD_BACKOFF,
                           "min_pause": THROTTLE_MIN_PAUSE_MS, "max_pause": THROTTLE_MAX_PAUSE_MS}
    if ok:
        out["ok"] = True
    if throttle is not None:
        out["throttle"] = throttle
    if congested:
        out["congested"] = True
    if hold:
        out["hold"] = True
    return out
