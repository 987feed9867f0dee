"""Files as S3 objects ``<id[0:3]>/<id>``, uploaded with boto3.

The bucket is ours (``processor.filestorage: {type: s3, ...}``) or the
caller's (a job's ``s3_bucket`` + ``s3_region``). Uploads are multipart and
streamed from the temp file. Failures become
:class:`~gdl.errors.S3StorageError`, retriable or not by their nature.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import threading
from collections.abc import Callable
from typing import Any, BinaryIO

from gdl import __version__, checksum
from gdl.errors import ConfigError, S3StorageError, StartupError
from gdl.filestorage.base import SAFE_ID_RE, FileStorage, path_for_id, remove_quietly
from gdl.job import Job

log = logging.getLogger("gdl.filestorage")

# Multipart uploads: files above the threshold go up in parts of this size,
# this many at once per file; each part is read from the temp file as it is
# sent, so a file's memory is about chunk size x concurrency, whatever its size.
S3_MULTIPART_THRESHOLD = 8 * 1024 * 1024
S3_MULTIPART_CHUNKSIZE = 8 * 1024 * 1024
S3_MAX_CONCURRENCY = 4
S3_CONNECT_TIMEOUT = 10.0  # seconds to open a connection to S3
S3_READ_TIMEOUT = 60.0  # seconds S3 may take to answer one request
S3_MAX_POOL_CONNECTIONS = 50  # connections kept per client (shared by every upload through it)

# S3 answers that mean "try again later", whatever their status code.
_S3_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "RequestLimitExceeded",
    "TooManyRequestsException", "ServiceUnavailable", "InternalError", "RequestTimeout",
    "BadDigest",  # the bytes S3 received are not those sent (ChecksumSHA256): sending them again may do
})
# An RFC 7230 token: what an S3 metadata name (an x-amz-meta-* header) may be.
_HEADER_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_PRINTABLE_ASCII_RE = re.compile(r"^[\x20-\x7e]*$")


class S3Clients:
    """boto3 clients, one per (region, endpoint), made on first use and then shared.

    A client is thread-safe and keeps a pool of connections, so every upload
    and delete to that region goes through it. Credentials come from the
    standard AWS chain (environment, shared config files, container or
    instance role), resolved by boto3; gdl never sees or logs them.
    """

    def __init__(self) -> None:
        self._clients: dict[tuple[str, str | None], Any] = {}
        self._session: Any = None
        self._lock = threading.Lock()

    def get(self, region: str, endpoint_url: str | None) -> Any:
        key = (region, endpoint_url)
        client = self._clients.get(key)
        if client is None:
            with self._lock:
                client = self._clients.get(key)
                if client is None:
                    client = self._clients[key] = self._make(region, endpoint_url)
        return client

    def _make(self, region: str, endpoint_url: str | None, **config: Any) -> Any:
        boto3, botocore_config = _boto3()
        if self._session is None:
            self._session = boto3.session.Session()
        settings = {"connect_timeout": S3_CONNECT_TIMEOUT, "read_timeout": S3_READ_TIMEOUT,
                    "max_pool_connections": S3_MAX_POOL_CONNECTIONS, "user_agent_extra": f"gdl/{__version__}",
                    **config}
        return self._session.client("s3", region_name=region, endpoint_url=endpoint_url,
                                    config=botocore_config.Config(**settings))

    def probe(self, region: str, endpoint_url: str | None) -> Any:
        """A client that tries once, quickly: for the startup check."""
        return self._make(region, endpoint_url, connect_timeout=3, read_timeout=5,
                          retries={"max_attempts": 1, "mode": "standard"})


class S3Storage(FileStorage):
    """Objects ``<id[0:3]>/<id>`` in one bucket.

    ``caller``: the bucket is the job's own (``s3_bucket``), not ours. Then
    the job's ``extra``, when it is a JSON object, becomes the object's
    metadata; the reaper leaves the object alone (it is the caller's); and a
    failure counts as an attempt, as a remote server's would. In our bucket
    a failure is internal: retried without counting when it is transient.
    """

    def __init__(self, clients: S3Clients, bucket: str, region: str, *, endpoint_url: str | None = None,
                 caller: bool = False):
        self.clients = clients
        self.bucket = bucket
        self.region = region
        self.endpoint_url = endpoint_url
        self.caller = caller
        self.owned = not caller

    @property
    def client(self) -> Any:
        return self.clients.get(self.region, self.endpoint_url)

    def store(self, temp_path: str, job: Job, *, sha256: str = "") -> None:
        try:
            checked = sha256 if os.path.getsize(temp_path) < S3_MULTIPART_THRESHOLD else ""
            self._upload(job, checked, lambda key, extra_args: self.client.upload_file(
                temp_path, self.bucket, key, ExtraArgs=extra_args, Config=_transfer_config()))
        finally:
            remove_quietly(temp_path)

    def store_bytes(self, data: bytes, job: Job, *, sha256: str = "") -> None:
        checked = sha256 if len(data) < S3_MULTIPART_THRESHOLD else ""
        self._upload(job, checked, lambda key, extra_args: self.client.upload_fileobj(
            io.BytesIO(data), self.bucket, key, ExtraArgs=extra_args, Config=_transfer_config()))

    def _upload(self, job: Job, sha256: str, upload: Callable[[str, dict], None]) -> None:
        key = path_for_id(job.id)
        extra_args: dict[str, Any] = {"Metadata": self.metadata(job)} if self.caller else {}
        if sha256:
            # S3 recomputes it and refuses the upload on a mismatch (BadDigest). Single-part
            # uploads only: a multipart upload's full-object checksum can only be a CRC.
            extra_args.update(ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum.base64_of_hex(sha256))
        try:
            upload(key, extra_args)
        except S3StorageError:
            raise
        except Exception as exc:
            raise self._error(f"cannot store s3://{self.bucket}/{key}", exc) from exc
        log.debug("job %s: stored as s3://%s/%s", job.id, self.bucket, key)

    def metadata(self, job: Job) -> dict[str, str]:
        """The job's ``extra`` as object metadata, when it is a JSON object (else none)."""
        try:
            data = json.loads(job.extra) if job.extra else None
        except ValueError:
            return {}
        if not isinstance(data, dict):
            return {}
        out = {}
        for name, value in data.items():
            if not _HEADER_TOKEN_RE.fullmatch(name):
                raise S3StorageError(f"extra: {name!r} cannot be an S3 metadata name", retriable=False,
                                     internal=False)
            text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
            out[name] = text if _PRINTABLE_ASCII_RE.fullmatch(text) else _rfc2047(text)
        return out

    def delete(self, job_id: str) -> bool:
        """Deletes the object; S3 does not say whether it was there, so True."""
        if not SAFE_ID_RE.fullmatch(job_id):
            return False
        key = path_for_id(job_id)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except S3StorageError:
            raise
        except Exception as exc:
            raise self._error(f"cannot delete s3://{self.bucket}/{key}", exc) from exc
        log.debug("job %s: deleted s3://%s/%s", job_id, self.bucket, key)
        return True

    def exists(self, job_id: str) -> bool:
        if not SAFE_ID_RE.fullmatch(job_id):
            return False
        key = path_for_id(job_id)
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except S3StorageError:
            raise
        except Exception as exc:
            if _client_error(exc) is not None and _s3_status(exc) == 404:
                return False
            raise self._error(f"cannot look up s3://{self.bucket}/{key}", exc) from exc
        return True

    def share(self, source_id: str, job: Job) -> bool:
        """A server-side copy (CopyObject) of ``source_id``'s object as the job's."""
        source, key = path_for_id(source_id), path_for_id(job.id)
        try:
            self.client.copy_object(Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": source})
        except Exception as exc:
            if _client_error(exc) is not None and _s3_status(exc) == 404:
                return False
            raise self._error(f"cannot copy s3://{self.bucket}/{source} to {key}", exc) from exc
        log.debug("job %s: copied s3://%s/%s to %s", job.id, self.bucket, source, key)
        return True

    def head(self, job_id: str, limit: int) -> bytes | None:
        key = path_for_id(job_id)
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes=0-{max(0, limit - 1)}")
            return answer["Body"].read()
        except Exception as exc:
            if _client_error(exc) is not None and _s3_status(exc) in (404, 416):
                return None if _s3_status(exc) == 404 else b""
            raise self._error(f"cannot read s3://{self.bucket}/{key}", exc) from exc

    def open(self, job_id: str) -> BinaryIO | None:
        """S3 objects are fetched from S3 (see :meth:`url`), not through gdl's API."""
        return None

    def url(self, job_id: str) -> str:
        """The object's URL: path-style on a custom endpoint, virtual-hosted on AWS."""
        key = path_for_id(job_id)
        endpoint = self.endpoint_url or self.client.meta.endpoint_url
        if endpoint.rstrip("/").endswith(".amazonaws.com") and "." not in self.bucket:
            return f"https://{self.bucket}.s3.{self.region}.amazonaws.com/{key}"
        return f"{endpoint.rstrip('/')}/{self.bucket}/{key}"

    def check(self) -> None:
        """The bucket answers: a definite no (missing, forbidden, no credentials) stops gdl."""
        where = "processor.filestorage.bucket"
        try:
            self.clients.probe(self.region, self.endpoint_url).head_bucket(Bucket=self.bucket)
        except Exception as exc:
            err = self._error(f"bucket {self.bucket}", exc)
            if _client_error(exc) is not None and not err.retriable:
                raise StartupError(f"{where}: {err}") from exc
            if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
                raise StartupError(f"processor.filestorage: no AWS credentials: {exc}") from exc
            log.warning("%s: cannot check bucket %s now: %s", where, self.bucket, err)

    def _error(self, what: str, exc: BaseException) -> S3StorageError:
        message, retriable = _describe(exc)
        return S3StorageError(f"{what}: {message}", retriable=retriable, internal=not self.caller)


def _boto3(key: str = "s3_bucket") -> tuple[Any, Any]:
    """boto3 and botocore.config, or an error saying how to get them."""
    try:
        import boto3
        import botocore.config
    except ImportError as exc:
        message = "S3 storage needs boto3: pip install 'gdl[s3]'"
        if key.startswith("processor."):
            raise ConfigError(f"{key}: {message}") from exc
        raise S3StorageError(message, retriable=False, internal=True) from exc
    return boto3, botocore.config


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=S3_MULTIPART_THRESHOLD, multipart_chunksize=S3_MULTIPART_CHUNKSIZE,
                          max_concurrency=S3_MAX_CONCURRENCY, preferred_transfer_client="classic")


def _client_error(exc: BaseException) -> Any:
    """The botocore ClientError (an S3 answer) behind ``exc``, if there is one.

    ``upload_file`` wraps it in ``S3UploadFailedError`` without ``from``, so
    the implicit context is searched too.
    """
    from botocore.exceptions import ClientError

    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, ClientError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _s3_status(exc: BaseException) -> int:
    error = _client_error(exc)
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0) if error is not None else 0


def _describe(exc: BaseException) -> tuple[str, bool]:
    """Words for an S3 failure, and whether trying again may help."""
    from botocore.exceptions import BotoCoreError, NoCredentialsError, ParamValidationError, PartialCredentialsError

    error = _client_error(exc)
    if error is not None:
        code = str(error.response.get("Error", {}).get("Code") or "")
        text = str(error.response.get("Error", {}).get("Message") or "")
        status = _s3_status(exc)
        retriable = status >= 500 or status == 429 or code in _S3_TRANSIENT_CODES
        label = f"HTTP {status}" if not code or code == str(status) else f"{code} ({status})"
        return label + (f": {text}" if text else ""), retriable
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError, ParamValidationError)):
        return f"{type(exc).__name__}: {exc}", False
    if isinstance(exc, BotoCoreError):  # connection refused or dropped, timeouts, a short read
        return f"{type(exc).__name__}: {exc}", True
    return f"{type(exc).__name__}: {exc}", True


def _rfc2047(text: str) -> str:
    """A metadata value outside printable ASCII, encoded as S3 decodes it (RFC 2047)."""
    return "=?UTF-8?B?" + base64.b64encode(text.encode()).decode() + "?="
