"""Jobs: what a client asked for, and how it is stored.

A :class:`Job` is built from a ``POST /download`` body by
:func:`gdl.submission.parse_request` (every rule of the contract's field
table), and round-trips through a flat Redis hash with :meth:`Job.to_hash` /
:meth:`Job.from_hash`.

The job's progress lives in the same hash, in the fields of :class:`Status`:
``state`` (download) and ``callback_state`` move as below, each move made by
one script in :mod:`gdl.store`::

    state:           queued -> in_flight -> succeeded | failed
                                 '-> queued (retry, or put back)
                     queued | in_flight -> cancelled  (DELETE /jobs/<id>, a purge; in
                                 flight: marked ``cancel`` first, shown as cancelling)
    callback_state:  "" -> queued -> in_flight -> delivered | failed
                                        '-> queued (retry)      '-> queued (POST /retry)
                     "" -> none  (no callback asked for: s3_bucket without callback)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from gdl.ids import ID_LENGTH, is_valid_id, new_id, new_ids

__all__ = ["CANCELLING", "ID_LENGTH", "CallbackState", "Job", "JobState", "Status", "is_valid_id", "new_id", "new_ids",
           "status_fields"]


class JobState(StrEnum):
    """Where a job's download stands (its ``state``)."""

    QUEUED = "queued"  # in its aggregation's queue, due now or later (a retry)
    IN_FLIGHT = "in_flight"  # taken by a pool: in the in-flight set, with a deadline
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"  # by DELETE /jobs/<id> or a purge of its aggregation


class CallbackState(StrEnum):
    """Where a job's callback stands (its ``callback_state``)."""

    WAITING = ""  # the download has not ended yet
    NONE = "none"  # no callback asked for (the job stores into its own S3 bucket)
    QUEUED = "queued"  # in the callback queue, due now or later (a retry)
    IN_FLIGHT = "in_flight"  # taken by a notifier
    DELIVERED = "delivered"
    FAILED = "failed"  # given up on: listed in callbacks:failed for POST /retry


@dataclass
class Status:
    """A job's progress: written only by the scripts of :mod:`gdl.store`."""

    state: JobState = JobState.QUEUED
    attempts: int = 0
    throttled_attempts: int = 0  # responses that paused the aggregation (not counted in attempts)
    error: str = ""
    response_code: int = 0
    bytes: int = 0
    image_size: str = ""
    mime: str = ""
    finished_at: int = 0
    callback_state: CallbackState = CallbackState.WAITING
    callback_attempts: int = 0
    callback_error: str = ""
    callback_code: int = 0
    callback_due_at: int = 0  # when a callback retry is due (ms since the epoch); 0 when none waits
    delivered_at: int = 0
    # What the final attempt got (see Job.results): written when the download ends.
    sha256: str = ""
    content_type: str = ""
    final_url: str = ""
    redirects: int = 0
    etag: str = ""
    last_modified: str = ""
    resumed_bytes: int = 0
    reused: bool = False
    started_at: int = 0  # the first attempt's start (ms since the epoch), written by that attempt
    wait_ms: int = 0
    ttfb_ms: int = 0
    download_ms: int = 0
    total_ms: int = 0
    # A partial file kept for the retry to resume from (gdl.resume); "" / 0: none.
    partial_path: str = ""
    partial_bytes: int = 0
    partial_validator: str = ""
    partial_host: str = ""
    # A cancel requested while in flight ("1": with a callback, "0": without): its
    # holder aborts the download and settles it cancelled (see gdl/lua/cancel.lua).
    cancel: str = ""


CANCELLING = "cancelling"  # what GET /jobs/<id> shows of a job in flight marked to cancel


@dataclass
class Job:
    """One download request, as accepted by the API."""

    id: str
    url: str
    aggr_id: str
    aggr_limit: int
    aggr_proxy: str = ""
    callback_type: str = ""
    callback_dst: str = ""
    extra: str = ""
    mime_type: str = ""
    max_retries: int | None = None
    extract_image_size: bool = False
    download_timeout: int | None = None
    request_headers: dict[str, str] = field(default_factory=dict)
    s3_bucket: str = ""
    s3_region: str = ""
    checksum: str = ""
    aggr_rate: float | None = None  # the shaping fields (gdl/shaping.py): None when left out
    aggr_burst: int | None = None
    aggr_adaptive: bool | None = None
    reuse_ttl: int = 0  # seconds a stored result of the same request may answer this job (gdl.reuse)
    created_at: int = 0
    status: Status = field(default_factory=Status)

    @property
    def wants_callback(self) -> bool:
        return bool(self.callback_type)

    @property
    def succeeded(self) -> bool:
        return self.status.state is JobState.SUCCEEDED

    def to_hash(self) -> dict[str, str]:
        """The flat string mapping stored in ``job:<id>`` (spec and status).

        Fields at their default are left out (``state`` excepted), and
        :meth:`from_hash` reads them back as defaults: a typical job has 10
        fields set of 29, and every enqueue, take and read would otherwise
        carry the other 19 across the wire and through the parsers.
        """
        spec, status = vars(self), vars(self.status)  # the dataclasses' own dicts: no getattr per field
        out = {name: value if type(value) is str else _to_field(value)  # most set fields are strings
               for name, default in _SPEC_DEFAULTS.items() if (value := spec[name]) != default}
        if status != _STATUS_DEFAULTS:  # one C comparison spares a new job's walk of them all
            out.update({name: _to_field(value) for name, default in _STATUS_DEFAULTS.items()
                        if (value := status[name]) != default})
        out["state"] = str(self.status.state)
        return out

    @classmethod
    def from_hash(cls, data: Mapping[str, str]) -> Job:
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "status" or f.name not in data:
                continue
            kwargs[f.name] = _from_field(f.name, data[f.name])
        status = Status(**{
            name: _STATUS_READERS[name](data[name]) for name in _STATUS_FIELDS if name in data
        })
        return cls(status=status, **kwargs)

    def public(self) -> dict[str, Any]:
        """The job as ``GET /jobs/<id>`` shows it: spec, status and :meth:`results`."""
        out = asdict(self)
        out.update(out.pop("status"))
        for name in _TIMING_FIELDS:
            del out[name]
        if out.pop("cancel") and self.status.state is JobState.IN_FLIGHT:
            out["state"] = CANCELLING
        out.update(self.results())
        return out

    def results(self) -> dict[str, Any]:
        """What the final attempt got, as every callback and ``GET /jobs/<id>`` report it.

        ``sha256`` is that of the stored bytes as served ("" on failure);
        ``size`` the bytes received; times are RFC 3339 UTC ("" before they
        happen) and ``timings`` whole milliseconds.
        """
        s = self.status
        # final_url is stored only when a redirect moved it (Job.to_hash keeps the hash small).
        final_url = s.final_url or (self.url if s.started_at else "")
        return {
            "sha256": s.sha256, "size": s.bytes, "content_type": s.content_type, "final_url": final_url,
            "redirects": s.redirects, "etag": s.etag, "last_modified": s.last_modified, "attempts": s.attempts,
            "resumed_bytes": s.resumed_bytes, "reused": s.reused,
            "started_at": rfc3339(s.started_at), "finished_at": rfc3339(s.finished_at),
            "timings": {name: getattr(s, name) for name in _TIMING_FIELDS},
        }


def rfc3339(ms: int) -> str:
    """Milliseconds since the epoch as RFC 3339 UTC (``2026-12-06T05:12:00.123Z``); "" for 0."""
    if not ms:
        return ""
    when = datetime.fromtimestamp(ms / 1000, UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


_TIMING_FIELDS = ("wait_ms", "ttfb_ms", "download_ms", "total_ms")


_SPEC_FIELDS = tuple(f.name for f in fields(Job) if f.name != "status")
_STATUS_FIELDS = tuple(f.name for f in fields(Status))
_SPEC_DEFAULTS = {name: getattr(Job(id="", url="", aggr_id="", aggr_limit=0), name) for name in _SPEC_FIELDS}
_STATUS_DEFAULTS = {name: getattr(Status(), name) for name in _STATUS_FIELDS}


def _int_field(raw: str) -> int:
    return int(raw or 0)


def _bool_field(raw: str) -> bool:
    return raw == "1"


# How each status field is read back from its hash string.
_STATUS_READERS: dict[str, Callable[[str], Any]] = {
    name: JobState if name == "state" else CallbackState if name == "callback_state"
    else _bool_field if isinstance(default, bool) else _int_field if isinstance(default, int) else str
    for name, default in _STATUS_DEFAULTS.items()}


def status_fields(**values: Any) -> dict[str, str]:
    """Status updates as hash fields; unknown names are a programming error."""
    unknown = set(values).difference(_STATUS_FIELDS)
    if unknown:
        raise KeyError(f"not status fields: {sorted(unknown)}")
    return {k: _to_field(v) for k, v in values.items()}


def _to_field(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _from_field(name: str, raw: str) -> Any:
    if name in ("aggr_limit", "created_at", "reuse_ttl"):
        return int(raw)
    if name in ("max_retries", "download_timeout", "aggr_burst"):
        return int(raw) if raw != "" else None
    if name in ("aggr_rate", "aggr_adaptive"):
        return None if raw == "" else float(raw) if name == "aggr_rate" else raw == "1"
    if name == "extract_image_size":
        return raw == "1"
    if name == "request_headers":
        return json.loads(raw) if raw else {}
    return raw


# --------------------------------------------------------------------------- validation
