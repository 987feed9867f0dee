"""What a client may submit: the body of ``POST /download`` (and each item of a
batch) checked field by field into a :class:`~gdl.job.Job` by
:func:`parse_request`, every rule of the contract's field table, a bad value
raising :class:`~gdl.errors.ValidationError` that names its field. The rules
live here once; the API's single and batch paths both call them.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any
from urllib.parse import urlsplit

from gdl import checksum
from gdl.errors import ValidationError
from gdl.job import Job
from gdl.mime import check_mime_patterns
from gdl.shaping import MAX_AGGR_BURST, MAX_AGGR_RATE, ShapingFields

__all__ = ["parse_request", "shaping_fields", "check_aggr_id", "check_http_url", "url_origin", "MAX_AGGR_ID_LENGTH"]

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


def parse_request(body: Any, *, job_id: str, now_ms: int) -> Job:
    """Validate a decoded ``POST /download`` body into a :class:`Job`."""
    if not isinstance(body, dict):
        raise ValidationError("body", "must be a JSON object")
    url = _http_url(body, "url", required=True)
    aggr_id = check_aggr_id(_string(body, "aggr_id", required=True))
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
    shaping = shaping_fields(body)
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


def shaping_fields(body: dict) -> ShapingFields:
    """The traffic-shaping fields of a body: each None when left out (the aggregation keeps its own)."""
    burst = _integer(body, "aggr_burst", minimum=1, maximum=MAX_AGGR_BURST)
    adaptive = _boolean(body, "aggr_adaptive") if "aggr_adaptive" in body else None
    return ShapingFields(rate=_rate(body), burst=burst, adaptive=adaptive)


def _rate(body: dict) -> float | None:
    if "aggr_rate" not in body:
        return None
    value = body["aggr_rate"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValidationError("aggr_rate", f"must be a number of starts per second, not {value!r}")
    if not 0 <= value <= MAX_AGGR_RATE:
        raise ValidationError("aggr_rate", f"must be between 0 and {MAX_AGGR_RATE:g}, got {value}")
    return float(value)


def check_aggr_id(value: str) -> str:
    """``value`` as an aggregation id (a job's field, or a route's path): at most
    ``MAX_AGGR_ID_LENGTH`` characters, none of them whitespace or unprintable."""
    if len(value) > MAX_AGGR_ID_LENGTH:
        raise ValidationError("aggr_id", f"must be at most {MAX_AGGR_ID_LENGTH} characters")
    if not _printable_without_spaces(value):
        raise ValidationError("aggr_id", "must not contain whitespace or control characters")
    return value


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
