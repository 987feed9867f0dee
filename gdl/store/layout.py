"""Every Redis key and channel name gdl uses, built in one place.

The table of what each key holds, who writes it and who reads it is in
:mod:`gdl.store`'s docstring.
"""

from __future__ import annotations

# Every key carries one hash tag, ``{gdl}``: on a Redis Cluster all of them
# live in one slot, so that every script's keys are on one node (tier 1: a
# cluster-mode Redis runs gdl unchanged; see docs/design.md for tier 2).
PREFIX = "{gdl}:"
# Keys of the layout before the hash tag, renamed at start (upgrade_layout).
LEGACY_PREFIX = "gdl:"
# Pub/sub channels are cluster-wide and not keys: they need no tag.
WAKE_AGGR = "gdl:wake:aggr"
WAKE_CALLBACKS = "gdl:wake:callbacks"
# Operator controls: a job id whose download is to be aborted by its holder,
# and a purge token with queued jobs to cancel (gdl/cancelling.py listens).
CANCEL_CHANNEL = "gdl:cancel"
PURGE_CHANNEL = "gdl:purge"
DOWNLOADS = "downloads"
CALLBACKS = "callbacks"


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def log_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}{LOG_SUFFIX}"


LOG_SUFFIX = ":log"


def aggr_key(aggr_id: str) -> str:
    return f"{PREFIX}aggr:{aggr_id}"


def queue_key(aggr_id: str) -> str:
    return f"{PREFIX}queue:{aggr_id}"


def lease_key(aggr_id: str) -> str:
    return f"{PREFIX}lease:{aggr_id}"


def rate_key(aggr_id: str) -> str:
    """The aggregation's GCRA theoretical arrival time (µs), PX until it is reached (take.lua)."""
    return f"{PREFIX}rate:{aggr_id}"


def reuse_key(request_key: str) -> str:
    """The record of the last stored result of one request (:mod:`gdl.reuse`'s key of URL, headers, proxy)."""
    return f"{PREFIX}reuse:{request_key}"


def idempotency_key(scope: str, key: str) -> str:
    """The record of an ``Idempotency-Key`` used under ``scope`` (an API token's digest, or ``anon``)."""
    return f"{PREFIX}idem:{scope}:{key}"


# Fair shares between processor processes (claim.lua): who is running, and
# how many download slots each one's pools hold.
PROCESSORS = PREFIX + "processors"
PROCESSOR_SLOTS = PREFIX + "processor_slots"


DUE_INDEX = PREFIX + "due"
# Aggregations an operator paused: out of the due index while paused, listed here for the views.
PAUSED = PREFIX + "paused"
INFLIGHT = {DOWNLOADS: PREFIX + "inflight", CALLBACKS: PREFIX + "callbacks:inflight"}
CALLBACK_QUEUE = PREFIX + "callbacks"
DELETIONS = PREFIX + "deletions"
FAILED_CALLBACKS = PREFIX + "callbacks:failed"
# The operator view (gdl/dashboard.py, gdl/commands/): written off the hot path.
HEARTBEATS = PREFIX + "heartbeats"
ACTIVE = PREFIX + "active"
FAILURES = PREFIX + "failures"
FAILURES_KEPT = 100  # failed download attempts kept in ``failures``
TPUT_BUCKET_MS = 10_000  # width of a throughput bucket
TPUT_TTL_S = 16 * 60  # life of a bucket: the dashboard shows the last 15 minutes
INFLIGHT_READ_MAX = 20_000  # in-flight downloads read to count them per aggregation


# Purges under way (token -> JSON record), each with its purge set of jobs still to cancel,
# and the counts of jobs cancelled, by how (queued, in_flight, purged), for /metrics.
PURGES = PREFIX + "purges"
CANCELS = PREFIX + "cancels"
# Raised each time a download in flight is newly marked for cancelling: a processor's
# backstop check reads the marks of the downloads it holds only after it moved.
CANCEL_MARKS = PREFIX + "cancel_marks"


def purge_key(token: str) -> str:
    """The jobs a purge (``token``) has yet to cancel: its aggregation's queue as the purge renamed it."""
    return f"{PREFIX}purge:{token}"


def tput_key(bucket: int) -> str:
    """The throughput hash of 10-second bucket number ``bucket`` (ms // TPUT_BUCKET_MS)."""
    return f"{PREFIX}tput:{bucket}"
STATE_FIELD = {DOWNLOADS: "state", CALLBACKS: "callback_state"}


__all__ = [
    "PREFIX",
    "LEGACY_PREFIX",
    "WAKE_AGGR",
    "WAKE_CALLBACKS",
    "CANCEL_CHANNEL",
    "PURGE_CHANNEL",
    "PURGES",
    "CANCELS",
    "CANCEL_MARKS",
    "purge_key",
    "DOWNLOADS",
    "CALLBACKS",
    "LOG_SUFFIX",
    "DUE_INDEX",
    "PAUSED",
    "INFLIGHT",
    "CALLBACK_QUEUE",
    "DELETIONS",
    "FAILED_CALLBACKS",
    "HEARTBEATS",
    "ACTIVE",
    "FAILURES",
    "FAILURES_KEPT",
    "TPUT_BUCKET_MS",
    "TPUT_TTL_S",
    "INFLIGHT_READ_MAX",
    "STATE_FIELD",
    "job_key",
    "log_key",
    "aggr_key",
    "queue_key",
    "lease_key",
    "rate_key",
    "idempotency_key",
    "reuse_key",
    "PROCESSORS",
    "PROCESSOR_SLOTS",
    "tput_key",
]
