"""The error tree: every failure gdl reasons about is a type.

Whether a failure is retried, and whether it counts as an attempt, is
decided here, never by matching message text. It is said one way: every
error has the instance attributes ``retriable`` (and, for downloads,
``internal``), set when it is made; a class's usual answer is its
``RETRIABLE`` / ``INTERNAL`` constant, and an error whose answer depends on
the case (an HTTP status, an S3 error, a callback's failure) is given it:

- ``retriable``: the same request may succeed later (5xx, 429, a dropped
  connection, a body cut short, a timeout). Retried up to the job's
  ``max_retries`` after ``attempt * retry_backoff``.
- ``internal``: the fault is ours (our disk, our Redis), not the remote
  server's. Internal errors are retried without counting an attempt.

Library exceptions (requests, OSError, redis) are translated into these at
the boundary of the module that calls the library, with ``raise ... from``.
"""

from __future__ import annotations

from typing import Any


class GdlError(Exception):
    """Base of every error gdl raises on purpose."""


class ConfigError(GdlError):
    """The configuration is invalid; the message starts with the dotted key."""


class StartupError(GdlError):
    """gdl cannot start: Redis unreachable, a directory unwritable. Exit status 2."""


class ValidationError(GdlError):
    """A job payload is invalid. ``field`` names the offending field (HTTP 400)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class StoreUnavailable(GdlError):
    """Redis cannot be reached or answered with an error. Internal and transient."""


class DownloadError(GdlError):
    """A download attempt failed. Subclasses say whether to retry.

    ``phase`` names the step that failed (request, body, mime, image, storage),
    ``response_code`` is the remote status when one was received (else 0),
    ``retry_after`` is the earliest retry the server asked for, in seconds.
    ``attempt`` is what the attempt got before it failed (a
    :class:`gdl.download.Attempt`, set by the downloader), for the callback.
    """

    RETRIABLE = False  # a class's usual answer; each instance says its own in ``retriable``
    INTERNAL = False
    phase = "request"
    attempt: Any = None

    def __init__(self, message: str, *, response_code: int = 0, retry_after: float | None = None,
                 retriable: bool | None = None, internal: bool | None = None):
        super().__init__(message)
        self.response_code = response_code
        self.retry_after = retry_after
        self.retriable: bool = self.RETRIABLE if retriable is None else retriable
        self.internal: bool = self.INTERNAL if internal is None else internal


class HTTPStatusError(DownloadError):
    """The server answered with a non-2xx status: 5xx and 429 are retriable."""

    def __init__(self, status: int, reason: str = "", *, retry_after: float | None = None):
        text = f"Received status code {status}" + (f" {reason}" if reason else "")
        super().__init__(text, response_code=status, retry_after=retry_after,
                         retriable=status >= 500 or status == 429)


class Throttled(DownloadError):
    """The origin asked the aggregation to slow down (429, or 503 with Retry-After)
    ``processor.max_throttled_attempts`` times for this job: given up, not retried."""

    def __init__(self, last: DownloadError):
        super().__init__(f"throttled: {last}", response_code=last.response_code, retriable=False)


class ConnectionFailed(DownloadError):
    """The connection could not be made or broke before a response arrived."""

    RETRIABLE = True


class TruncatedBody(DownloadError):
    """The body ended before Content-Length, or the connection dropped mid-body."""

    RETRIABLE = True
    phase = "body"


class DownloadTimeout(DownloadError):
    """The whole download took longer than its deadline."""

    RETRIABLE = True
    phase = "body"


class TLSError(DownloadError):
    """The TLS handshake failed (bad certificate, protocol): not retried."""


class TooManyRedirects(DownloadError):
    """More redirect hops than ``security.max_redirects``."""


class BlockedAddress(DownloadError):
    """The URL, a redirect hop or a proxy resolves to a refused address."""


class TooLarge(DownloadError):
    """The body is larger than ``security.max_download_bytes``."""

    phase = "body"


class InvalidURL(DownloadError):
    """The URL cannot be requested (scheme, host)."""


class MimeMismatch(DownloadError):
    """The content's sniffed mime type does not match the job's patterns."""

    phase = "mime"

    def __init__(self, expected: str, actual: str, *, response_code: int = 0):
        super().__init__(f"Expected mime-type to be ({expected}), found ({actual})", response_code=response_code)


class ChecksumMismatch(DownloadError):
    """The body's digest is not the job's ``checksum``: nothing is stored, and the
    download is retried like a body error (the bytes may have been damaged on the way)."""

    RETRIABLE = True
    phase = "body"

    def __init__(self, expected: str, got: str, *, response_code: int = 0):
        super().__init__(f"checksum mismatch: expected {expected}, got {got}", response_code=response_code)


class InvalidImage(DownloadError):
    """An image whose size was asked for has a header Pillow cannot read."""

    phase = "image"


class StorageError(DownloadError):
    """Writing or moving the file failed on our side: retried, not counted."""

    RETRIABLE = True
    INTERNAL = True
    phase = "storage"


class UnexpectedError(DownloadError):
    """An exception gdl did not anticipate (a bug, a library surprise).

    Reported to Sentry, retried, and counted as an attempt so that a bug
    cannot retry a job forever.
    """

    RETRIABLE = True


class CallbackError(GdlError):
    """A callback delivery failed; ``retriable`` as for downloads."""

    def __init__(self, message: str, *, retriable: bool = True, status: int = 0):
        super().__init__(message)
        self.retriable = retriable
        self.status = status


class UndefinedBackend(CallbackError):
    """The job names a callback backend that this gdl has not configured."""

    def __init__(self, name: str):
        super().__init__(f"callback backend {name!r} is not configured", retriable=False)


class S3StorageError(StorageError):
    """Storing in, or deleting from, S3 failed.

    ``retriable`` follows the nature of the failure: throttling, a 5xx answer,
    a dropped or refused connection may pass; access denied, no such bucket or
    any other 4xx will not. ``internal`` says whose bucket it is: ours
    (``processor.filestorage``), so a retry is not counted as an attempt, or
    the caller's (the job's ``s3_bucket``), whose failures count like the
    remote server's.
    """

    def __init__(self, message: str, *, retriable: bool, internal: bool):
        super().__init__(message, retriable=retriable, internal=internal)


class UnknownTopic(CallbackError):
    """Kafka: the callback's topic, or its partition, does not exist. Not retried."""

    def __init__(self, message: str):
        super().__init__(message, retriable=False)
