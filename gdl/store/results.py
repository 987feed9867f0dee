"""What the store's steps answer: small result types instead of tuples,
magic strings and negative integers."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from gdl.job import Job


@dataclass(frozen=True)
class DownloadOutcome:
    """What a download attempt writes on its job, however it ended: the Go
    service's fields, and what the final attempt says of itself (the
    verifiable results, :meth:`gdl.job.Job.results`)."""

    attempts: int  # attempts counted so far, this one included (an internal error counts none)
    error: str = ""
    response_code: int = 0
    bytes: int = 0  # stored; for a failure, received before it failed
    image_size: str = ""
    mime: str = ""
    started_at: int = 0  # the first attempt's start (ms); 0: recorded already
    sha256: str = ""
    content_type: str = ""
    final_url: str = ""  # "" when no redirect changed it
    redirects: int = 0
    etag: str = ""
    last_modified: str = ""
    wait_ms: int = 0
    ttfb_ms: int = 0
    download_ms: int = 0
    total_ms: int = 0
    resumed_bytes: int = 0
    reused: bool = False
    partial: dict[str, Any] = field(default_factory=dict)  # a kept partial file's fields, or their clearing

    def fields(self) -> dict[str, Any]:
        """The status fields to write: the Go service's always (each attempt's own), the
        others only when set, so that a job's hash carries no field at its default."""
        out: dict[str, Any] = {"attempts": self.attempts, "error": self.error, "response_code": self.response_code,
                               "bytes": self.bytes, "image_size": self.image_size, "mime": self.mime,
                               **self.partial}
        for name in _DESCRIBING:
            value = getattr(self, name)
            if value:
                out[name] = value
        return out


_DESCRIBING = ("started_at", "sha256", "content_type", "final_url", "redirects", "etag", "last_modified",
               "wait_ms", "ttfb_ms", "download_ms", "total_ms", "resumed_bytes", "reused")


@dataclass(frozen=True)
class CallbackOutcome:
    """What a callback attempt writes on its job, however it ended."""

    attempts: int
    error: str = ""
    code: int = 0  # the destination's answer (HTTP status; 0 for Kafka or no answer)

    def fields(self) -> dict[str, Any]:
        return {"callback_attempts": self.attempts, "callback_error": self.error, "callback_code": self.code}


@dataclass(frozen=True)
class Idempotency:
    """An ``Idempotency-Key`` as the store keeps it: scoped (to an API token, or
    anonymous), with the fingerprint of the request that used it first."""

    scope: str
    key: str
    fingerprint: str
    ttl_ms: int


class EnqueueOutcome(StrEnum):
    CREATED = "created"
    REPLAYED = "replayed"  # the key's first request had the same body: its job, nothing new
    CONFLICT = "conflict"  # the key's first request had another body: nothing new


@dataclass(frozen=True)
class Enqueued:
    outcome: EnqueueOutcome
    job_id: str  # the job created, or the one the key's first request created


def enqueued_from_reply(reply: list | int, job_id: str) -> Enqueued:
    """enqueue.lua's reply (0, the id taken, is the caller's to handle)."""
    if isinstance(reply, list):
        return Enqueued(EnqueueOutcome.REPLAYED if int(reply[0]) == 2 else EnqueueOutcome.CONFLICT, reply[1])
    return Enqueued(EnqueueOutcome.CREATED, job_id)


class ClaimOutcome(StrEnum):
    CLAIMED = "claimed"
    HELD = "another process holds the lease"
    NO_RECORD = "the aggregation has no record"  # queue entries without settings: nothing to run
    OVER_SHARE = "over its share"  # a fair claim by a processor over its share (claim.lua)


@dataclass(frozen=True)
class Claim:
    """The answer to a claim of an aggregation's lease: its settings when claimed."""

    outcome: ClaimOutcome
    limit: int = 0
    proxy: str = ""

    def __bool__(self) -> bool:
        return self.outcome is ClaimOutcome.CLAIMED


_CLAIM_REFUSED = {0: ClaimOutcome.HELD, -1: ClaimOutcome.NO_RECORD, -2: ClaimOutcome.OVER_SHARE}


def claim_from_reply(reply: list | int) -> Claim:
    """claim.lua's reply: {limit, proxy}, or 0, -1 or -2."""
    if isinstance(reply, list):
        return Claim(ClaimOutcome.CLAIMED, int(reply[0]), reply[1])
    return Claim(_CLAIM_REFUSED[int(reply)])


@dataclass
class Taken:
    """Jobs moved into an in-flight set, when the queue's next job is due (or
    may start, under a rate or a throttle), and the aggregation's current limit
    (None for the callback queue)."""

    jobs: list[Job]
    next_due: int | None
    limit: int | None = None
    lease_lost: bool = False  # the take was refused: the caller no longer holds the lease
    cap: int | None = None  # the effective limit (adaptive aggregations; else the limit)
    gate: str = ""  # what held the take back: "", paused, throttled, capped, rate (take.lua)
    rate_tat: str = ""  # the GCRA time the take wrote ("" for none): what refund_start expects


class Settled(StrEnum):
    """What became of an outcome written by a settle script (settle.lua)."""

    RECORDED = "recorded"
    NOT_OURS = "the job is no longer ours"
    LEASE_LOST = "this process no longer holds the aggregation's lease"
    CANCEL_REQUESTED = "its cancel was requested: to settle as cancelled"  # nothing written (settle.lua)

    def __bool__(self) -> bool:
        return self is Settled.RECORDED


_SETTLED = {1: Settled.RECORDED, 0: Settled.NOT_OURS, -1: Settled.LEASE_LOST, 2: Settled.CANCEL_REQUESTED}


@dataclass
class Renewal:
    """One renewal of a process's leases (renew_leases.lua)."""

    lost: list[str]
    margin_ms: int | None  # least time to live a held lease had left; None when none was held


@dataclass(frozen=True)
class Purge:
    """The answer to a purge's start (purge.lua): ``queued`` jobs moved to its purge set,
    ``in_flight`` jobs marked for cancelling; ``known`` False for an aggregation gdl
    has never seen or has forgotten (nothing done)."""

    known: bool
    queued: int = 0
    in_flight: int = 0
