"""Answering a job from the stored result of the same request (job field ``reuse_ttl``).

A request is named by :func:`request_key`: the normalised URL, the
effective request headers (the configured ones overlaid by the job's,
names lower-cased and sorted, credentials and cookies included, so that two
credentials never share a result) and the proxy, hashed. A successful
download of a job with a ``reuse_ttl`` is remembered under that key
(:class:`Record`, in the store's ``reuse:<key>``), unless its response said
``Cache-Control: no-store``; failures never are.

A later job of the same request is answered by :meth:`Reuse.fetch`:

- within its own ``reuse_ttl`` of the record's ``stored_at``, from the
  stored copy with no origin contact (``reused``, no attempt counted);
- past it, when the record has a validator, with one conditional GET
  (``If-None-Match`` / ``If-Modified-Since``): a 304 reuses the copy and
  makes the record fresh again, a 200 is an ordinary download;
- otherwise, or when the copy is gone meanwhile, by downloading.

Each job gets a file of its own (:meth:`~gdl.filestorage.FileStorage.share`:
a hard link, an S3 server-side copy), so it keeps its own ``download_url``
and deletion time and deleting one never breaks another; the record then
names the newest job as the holder of the bytes. The job's own mime
patterns and image size are checked on the stored bytes. Jobs stored into
their own ``s3_bucket`` take no part.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from gdl import mime
from gdl.download import Attempt, Fetched, check_mime, overlay_headers
from gdl.errors import StoreUnavailable, ValidationError
from gdl.filestorage import FileStorage
from gdl.job import Job
from gdl.store import Store

log = logging.getLogger(__name__)

# Bytes of a stored copy read for a reused job's image size (its header is near the start).
IMAGE_HEAD_BYTES = 1024 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}


def check_ttl(job: Job, max_ttl: int) -> None:
    """A job's ``reuse_ttl`` is at most ``processor.reuse_max_ttl`` (a 400 naming the field)."""
    if job.reuse_ttl > max_ttl:
        raise ValidationError("reuse_ttl", f"must be between 0 and {max_ttl} (processor.reuse_max_ttl), "
                                           f"got {job.reuse_ttl}")


def eligible(job: Job) -> bool:
    return job.reuse_ttl > 0 and not job.s3_bucket


def normalise_url(url: str) -> str:
    """Scheme and host lower-cased, the default port and the fragment dropped; path and query as given."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    netloc = host if port in (None, _DEFAULT_PORTS.get(scheme)) else f"{host}:{port}"
    if parts.username is not None or parts.password is not None:
        netloc = f"{parts.username or ''}:{parts.password or ''}@{netloc}"
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))


def request_key(job: Job, default_headers: dict[str, str]) -> str:
    """The hash naming what ``job`` asks of the origin: URL, effective headers, proxy."""
    headers = sorted((name, value) for name, (_, value) in overlay_headers(default_headers,
                                                                           job.request_headers).items())
    named = json.dumps([normalise_url(job.url), headers, job.aggr_proxy], separators=(",", ":"))
    return hashlib.sha256(named.encode()).hexdigest()


@dataclass(frozen=True)
class Record:
    """A stored result kept for reuse: whose file holds it, and what the response said."""

    holder: str  # the job id whose stored file has the bytes
    stored_at: int  # when the origin last gave (or confirmed, 304) these bytes, ms
    sha256: str = ""
    size: int = 0
    response_code: int = 200
    content_type: str = ""
    etag: str = ""
    last_modified: str = ""
    final_url: str = ""
    redirects: int = 0

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> Record | None:
        values: dict[str, Any] = {f.name: int(data[f.name]) if f.type == "int" else data[f.name]
                                  for f in fields(cls) if f.name in data}
        try:
            return cls(**values)
        except (TypeError, ValueError):
            return None

    def fresh(self, job: Job, now: int) -> bool:
        return now - self.stored_at < job.reuse_ttl * 1000

    def conditional_headers(self) -> list[tuple[str, str]]:
        """The headers of a conditional GET of this result; none when it had no validator."""
        out = []
        if self.etag:
            out.append(("If-None-Match", self.etag))
        if self.last_modified:
            out.append(("If-Modified-Since", self.last_modified))
        return out


def record_of(job: Job, fetched: Fetched, now: int) -> Record:
    a = fetched.attempt
    return Record(holder=job.id, stored_at=now, sha256=a.sha256, size=fetched.size,
                  response_code=fetched.response_code, content_type=a.content_type, etag=a.etag,
                  last_modified=a.last_modified, final_url=a.final_url, redirects=a.redirects)


class Reuse:
    """A pool's reuse of stored results, in our own storage."""

    def __init__(self, store: Store, storage: FileStorage, *, default_headers: dict[str, str], max_ttl: int):
        self.store = store
        self.storage = storage
        self.default_headers = default_headers
        self.ttl_ms = max_ttl * 1000

    def fetch(self, job: Job, download: Callable[[list[tuple[str, str]]], Fetched], *, now: int) -> Fetched:
        """The job's result: reused if it may be, else ``download(conditional headers)``'s."""
        key = request_key(job, self.default_headers)
        try:
            data = self.store.reuse_record(key)
        except StoreUnavailable:
            data = None  # the download itself will find out whether Redis is back
        record = Record.from_hash(data) if data else None
        if record is not None and record.fresh(job, now):
            reused = self.answer(job, key, record, contacted=False, now=now)
            if reused is not None:
                return reused
        conditional = record.conditional_headers() if record is not None else []
        fetched = download(conditional)
        if fetched.not_modified and record is not None:
            log.info("job %s: the origin confirmed the stored copy (304)", job.id)
            reused = self.answer(job, key, replace(record, stored_at=now), contacted=True, now=now)
            if reused is not None:
                return reused
            fetched = download([])  # the copy went meanwhile: a download like any other
        fetched.reuse_key = key
        return fetched

    def answer(self, job: Job, key: str, record: Record, *, contacted: bool, now: int) -> Fetched | None:
        """The job answered from ``record``'s stored copy, or None when the copy is gone."""
        found_mime, image_size = self._check(job, record)
        if found_mime is None or not self.storage.share(record.holder, job):
            log.info("job %s: stored copy of %s gone, downloading", job.id, record.holder)
            return None
        self.store.remember(key, asdict(replace(record, holder=job.id)), ttl_ms=self.ttl_ms)
        log.info("job %s: answered from the stored copy of %s (%d bytes)", job.id, record.holder, record.size)
        attempt = Attempt(response_code=record.response_code, final_url=record.final_url or job.url,
                          redirects=record.redirects, content_type=record.content_type, etag=record.etag,
                          last_modified=record.last_modified, sha256=record.sha256, reused=True)
        return Fetched(path="", size=record.size, response_code=record.response_code, mime=found_mime,
                       image_size=image_size, attempt=attempt, stored=True, contacted=contacted)

    def _check(self, job: Job, record: Record) -> tuple[str | None, str]:
        """The job's own mime check and image size on the stored bytes: (mime, image size);
        (None, "") when the copy is gone. Raises MimeMismatch or InvalidImage."""
        if not (job.mime_type or job.extract_image_size):
            return ("" if self.storage.exists(record.holder) else None), ""
        limit = IMAGE_HEAD_BYTES if job.extract_image_size else mime.SNIFF_BYTES
        head = self.storage.head(record.holder, limit)
        if head is None:
            return None, ""
        patterns = mime.MimePatterns.parse(job.mime_type) if job.mime_type else None
        found = check_mime(head[:mime.SNIFF_BYTES], job.mime_type, patterns, record.response_code)
        size = mime.image_size(head, found) if job.extract_image_size else None
        return found, size or ""

    def remember(self, job: Job, fetched: Fetched, *, now: int) -> None:
        """Keep a successful download's result for later jobs of the same request."""
        if fetched.stored or not fetched.reuse_key:
            return
        if fetched.attempt.no_store:
            log.info("job %s: not kept for reuse: Cache-Control: no-store", job.id)
            return
        try:
            self.store.remember(fetched.reuse_key, asdict(record_of(job, fetched, now)), ttl_ms=self.ttl_ms)
        except StoreUnavailable as exc:
            log.warning("job %s: not kept for reuse, redis unavailable: %s", job.id, exc)
