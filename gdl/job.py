"""Jobs: what a client asks for, how it is validated, how it is stored.

A :class:`Job` is built from a ``POST /download`` body by :func:`parse_request`
(every rule of the contract's field table, raising
:class:`~gdl.errors.ValidationError` naming the field), and round-trips
through a flat Redis hash with :meth:`Job.to_hash` / :meth:`Job.from_hash`.

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

import functools
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from gdl import checksum
from gdl.errors import ValidationError
from gdl.ids import ID_LENGTH, is_valid_id, new_id, new_ids
from gdl.mime import check_mime_patterns
from gdl.shaping import parse_fields

__all__ = ["CANCELLING", "ID_LENGTH", "CallbackState", "Job", "JobState", "Status", "is_valid_id", "new_id", "new_ids",
           "parse_request", "check_mime_patterns", "check_http_url", "status_fields", "url_origin"]


MAX_URL_LENGTH = 8192
MAX_AGGR_ID_LENGTH = 200
MAX_AGGR_LIMIT = 10_000
MAX_RETRIES_BOUND = 100
MAX_DOWNLOAD_TIMEOUT = 7 * 24 * 3600
MAX_EXTRA_LENGTH = 64 * 1024
MAX_HEADERS = 64
MAX_REUSE_TTL = 365 * 24 * 3600  # the field's own bound; processor.reuse_max_ttl is checked by the API

CALLBACK_TYPES = ("http", "kafka")
# RFC 7230 token characters: a header name must be one.
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Headers a client may not set: they belong to the connection, not the request.
FORBIDDEN_HEADERS = frozenset(
    h.lower() for h in ("Host", "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
                        "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding", "Upgrade", "Content-Length")
)
_KAFKA_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_S3_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_S3_REGION_RE = re.compile(r"^[a-z]{2}(-[a-z0-9]+)+-\d+$|^[a-z0-9-]{2,32}$")


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


def parse_request(body: Any, *, job_id: str, now_ms: int) -> Job:
    """Validate a decoded ``POST /download`` body into a :class:`Job`."""
    if not isinstance(body, dict):
        raise ValidationError("body", "must be a JSON object")
    url = _http_url(body, "url", required=True)
    aggr_id = _string(body, "aggr_id", required=True, max_length=MAX_AGGR_ID_LENGTH)
    if not _printable_without_spaces(aggr_id):
        raise ValidationError("aggr_id", "must not contain whitespace or control characters")
    aggr_limit = _integer(body, "aggr_limit", required=True, minimum=1, maximum=MAX_AGGR_LIMIT)
    assert aggr_limit is not None
    proxy = _string(body, "aggr_proxy")
    if proxy:
        parts = urlsplit(proxy)
        if parts.scheme not in ("http", "https", "socks5", "socks5h") or not parts.hostname:
            raise ValidationError("aggr_proxy", "must be an http(s):// or socks5:// URL with a host")
    s3_bucket, s3_region = _s3(body)
    callback_type, callback_dst = _callback(body, has_bucket=bool(s3_bucket))
    mime_type = _string(body, "mime_type")
    if mime_type:
        check_mime_patterns(mime_type)
    extra = _string(body, "extra", max_length=MAX_EXTRA_LENGTH)
    shaping = parse_fields(body)
    return Job(
        id=job_id,
        url=url,
        aggr_id=aggr_id,
        aggr_limit=aggr_limit,
        aggr_proxy=proxy,
        callback_type=callback_type,
        callback_dst=callback_dst,
        extra=extra,
        mime_type=mime_type,
        max_retries=_integer(body, "max_retries", minimum=0, maximum=MAX_RETRIES_BOUND),
        extract_image_size=_boolean(body, "extract_image_size"),
        download_timeout=_integer(body, "download_timeout", minimum=1, maximum=MAX_DOWNLOAD_TIMEOUT),
        request_headers=_headers(body),
        s3_bucket=s3_bucket,
        s3_region=s3_region,
        checksum=_checksum(body),
        aggr_rate=shaping.rate, aggr_burst=shaping.burst, aggr_adaptive=shaping.adaptive,
        reuse_ttl=_integer(body, "reuse_ttl", minimum=0, maximum=MAX_REUSE_TTL) or 0,
        created_at=now_ms,
    )


def _field(body: dict, name: str, kind: str) -> Any:
    """The value of ``name``, None when absent (:func:`_null` when null)."""
    value = body.get(name)
    if value is None and name in body:
        raise _null(name, kind)
    return value


def _null(name: str, kind: str) -> ValidationError:
    """A JSON ``null`` is not absence: as in the Go service, a field is either left out
    or of its type (``kind``, for the message)."""
    return ValidationError(name, f"must be {kind}, not null (leave the field out instead)")


# _string, _integer and _boolean read the field as _field does, written out: most fields
# of most jobs are absent, and a call less per field is a tenth of a job's validation.


def _string(body: dict, name: str, *, required: bool = False, max_length: int | None = None) -> str:
    value = body.get(name)
    if value is None:
        if name in body:
            raise _null(name, "a string")
        if required:
            raise ValidationError(name, "is required")
        return ""
    if not isinstance(value, str):
        raise ValidationError(name, f"must be a string, not {_json_type(value)}")
    if required and not value.strip():
        raise ValidationError(name, "must not be empty")
    if max_length is not None and len(value) > max_length:
        raise ValidationError(name, f"must be at most {max_length} characters")
    return value


def _integer(body: dict, name: str, *, required: bool = False, minimum: int, maximum: int) -> int | None:
    value = body.get(name)
    if value is None:
        if name in body:
            raise _null(name, "an integer")
        if required:
            raise ValidationError(name, "is required")
        return None
    # json.loads accepts NaN and Infinity, on which int() raises: not integers either.
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(value, float) and not math.isfinite(value)) or value != int(value):
        raise ValidationError(name, f"must be an integer, not {_json_type(value)}")
    value = int(value)
    if not minimum <= value <= maximum:
        raise ValidationError(name, f"must be between {minimum} and {maximum}, got {value}")
    return value


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        if name in body:
            raise _null(name, "true or false")
        return False
    if not isinstance(value, bool):
        raise ValidationError(name, f"must be true or false, not {_json_type(value)}")
    return value


def _http_url(body: dict, name: str, *, required: bool = False) -> str:
    value = _string(body, name, required=required, max_length=MAX_URL_LENGTH)
    if value:
        check_http_url(name, value)
    return value


def check_http_url(name: str, value: str) -> None:
    problem = _http_url_problem(value)
    if problem is not None:
        raise ValidationError(name, problem)


def _http_url_problem(value: str) -> str | None:
    """What is wrong with ``value`` as an http(s) URL, or None."""
    if not _printable_without_spaces(value):
        return "must not contain whitespace or control characters"
    return _origin_problem(url_origin(value))


def _printable_without_spaces(value: str) -> bool:
    """No character is whitespace or unprintable: the same test (checked over every
    code point), as the only printable whitespace is the ASCII space, in two C calls."""
    return value.isprintable() and " " not in value


# Of a printable URL without spaces, urlsplit reads the scheme, the host, the port and its
# own errors (brackets, NFKC) from what comes before the first '/', '?' or '#' that follows
# "scheme://" alone: that part, the URL's origin, decides the checks.
_ORIGIN_RE = re.compile(r"[^/?#]*(?://[^/?#]*)?")


def url_origin(value: str) -> str:
    """``http://host:port`` of ``http://host:port/path?query``: what urlsplit reads
    ``value``'s scheme and netloc from (any string has one, maybe empty)."""
    match = _ORIGIN_RE.match(value)
    assert match is not None  # every part of the pattern may be empty
    return match.group()


@functools.lru_cache(maxsize=4096)
def _origin_problem(origin: str) -> str | None:
    """:func:`_http_url_problem` of the URLs with this origin. Cached: a client's URLs
    share a few origins (its images' hosts, its callback's), so nearly every job's URL
    is checked by one look-up rather than a urlsplit (2 us, a tenth of a batch item)."""
    try:
        parts = urlsplit(origin)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        return f"is not a valid URL: {exc}"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not parts.hostname:
        return "must have a host"
    return None


def _callback(body: dict, *, has_bucket: bool) -> tuple[str, str]:
    ctype = _string(body, "callback_type")
    dst = _string(body, "callback_dst")
    legacy = _http_url(body, "callback_url")
    if ctype or dst:
        if not ctype:
            raise ValidationError("callback_type", "is required with callback_dst")
        if ctype not in CALLBACK_TYPES:
            raise ValidationError("callback_type", f"must be one of {', '.join(CALLBACK_TYPES)}")
        if not dst:
            raise ValidationError("callback_dst", "is required with callback_type")
        if ctype == "http":
            check_http_url("callback_dst", dst)
        elif not _KAFKA_TOPIC_RE.match(dst):
            raise ValidationError("callback_dst", "must be a Kafka topic name ([A-Za-z0-9._-], 1 to 249)")
        return ctype, dst
    if legacy:
        return "http", legacy
    if has_bucket:
        return "", ""
    raise ValidationError("callback_type", "callback_type and callback_dst (or callback_url) are required")


def _checksum(body: dict) -> str:
    """The expected digest as given (checked by :func:`gdl.checksum.parse`); "" when absent."""
    if "checksum" not in body:
        return ""
    value = _field(body, "checksum", "a string")
    if not isinstance(value, str):
        raise ValidationError("checksum", f"must be a string, not {_json_type(value)}")
    checksum.parse(value)  # "" included: a checksum field must name one
    return value


def _s3(body: dict) -> tuple[str, str]:
    bucket = _string(body, "s3_bucket")
    region = _string(body, "s3_region")
    if bucket and not region:
        raise ValidationError("s3_region", "is required with s3_bucket")
    if region and not bucket:
        raise ValidationError("s3_bucket", "is required with s3_region")
    if bucket and not _S3_BUCKET_RE.match(bucket):
        raise ValidationError("s3_bucket", "is not a valid S3 bucket name")
    if region and not _S3_REGION_RE.match(region):
        raise ValidationError("s3_region", "is not a valid S3 region name")
    return bucket, region


def _headers(body: dict) -> dict[str, str]:
    value = _field(body, "request_headers", "an object")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError("request_headers", f"must be an object, not {_json_type(value)}")
    if len(value) > MAX_HEADERS:
        raise ValidationError("request_headers", f"must have at most {MAX_HEADERS} headers")
    out = {}
    for name, val in value.items():
        if not _HEADER_NAME_RE.match(name):
            raise ValidationError("request_headers", f"{name!r} is not a valid header name")
        if name.lower() in FORBIDDEN_HEADERS:
            raise ValidationError("request_headers", f"{name!r} may not be set by a job")
        if not isinstance(val, str):
            raise ValidationError("request_headers", f"{name}: value must be a string, not {_json_type(val)}")
        if any(ord(c) < 0x20 and c != "\t" or ord(c) == 0x7F for c in val):
            raise ValidationError("request_headers", f"{name}: value must not contain control characters")
        out[name] = val
    return out


def _json_type(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), "null")
