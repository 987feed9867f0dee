"""Where finished files live.

:class:`FileStorage` is the interface the processor (store), the reaper
(delete) and the API (open, for ``GET /files/...``) use. Two implementations:

- :class:`FilesystemStorage` keeps a job's file at ``<rootdir>/<id[0:3]>/<id>``,
  moved there atomically and fsynced, and served by the API at
  ``processor.download_url``.
- :class:`S3Storage` uploads it as the object ``<id[0:3]>/<id>`` of a bucket
  (multipart, streamed from the temp file), with boto3. The bucket is ours
  (``processor.filestorage: {type: s3, ...}``) or the caller's (a job's
  ``s3_bucket`` + ``s3_region``).

:class:`Storages` is the one place that decides which storage a job's file
goes to, whether the reaper deletes it and which URL the callback carries;
the pool, the reaper and the notifier all ask it.

Every OSError and every S3 failure is translated into
:class:`~gdl.errors.StorageError` (S3: :class:`~gdl.errors.S3StorageError`,
retriable or not by the failure's nature).
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from typing import Any, BinaryIO

from gdl import __version__, diskio
from gdl.config import Config, ProcessorConfig
from gdl.errors import ConfigError, S3StorageError, StartupError, StorageError
from gdl.job import Job

log = logging.getLogger(__name__)

# Ids that are safe as a file name: a job id (14 alphanumerics) passes, and
# nothing that could climb out of rootdir ("..", "/") does.
_SAFE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

# Characters of the id naming the subdirectory, so no directory gets huge.
PREFIX_LENGTH = 3

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
})
# An RFC 7230 token: what an S3 metadata name (an x-amz-meta-* header) may be.
_HEADER_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_PRINTABLE_ASCII_RE = re.compile(r"^[\x20-\x7e]*$")


def path_for_id(job_id: str) -> str:
    """A stored file's path: under the storage root, as an S3 key and under ``download_url``."""
    return f"{job_id[:PREFIX_LENGTH]}/{job_id}"


def join_url(base: str, job_id: str) -> str:
    return f"{base.rstrip('/')}/{path_for_id(job_id)}"


class FileStorage(ABC):
    """Keeps finished downloads, one file per job id."""

    #: The reaper deletes this storage's files once their jobs are due for deletion.
    owned = True

    @abstractmethod
    def store(self, temp_path: str, job: Job) -> None:
        """Move the complete file at ``temp_path`` to the job's place.

        ``temp_path`` is consumed: moved on success, removed on failure
        (:class:`~gdl.errors.StorageError`).
        """

    @abstractmethod
    def delete(self, job_id: str) -> bool:
        """Remove the job's file: True if it was there, False if already absent."""

    @abstractmethod
    def exists(self, job_id: str) -> bool:
        """Whether the job's file is stored."""

    @abstractmethod
    def open(self, job_id: str) -> BinaryIO | None:
        """The job's file opened for reading (the caller closes it), or None if absent."""

    def url(self, job_id: str) -> str | None:
        """The file's own URL, or None when it is served under ``processor.download_url``."""
        return None

    def check(self) -> None:
        """Startup check; raises :class:`~gdl.errors.StartupError` naming the config key."""
        return None


class FilesystemStorage(FileStorage):
    """Files under ``rootdir`` at ``<id[0:3]>/<id>``."""

    def __init__(self, rootdir: str):
        self.rootdir = rootdir

    def path_for(self, job_id: str) -> str:
        """``<rootdir>/<id[0:3]>/<id>``; ValueError for an id unsafe as a file name."""
        if not _SAFE_ID_RE.fullmatch(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return os.path.join(self.rootdir, job_id[:PREFIX_LENGTH], job_id)

    def store(self, temp_path: str, job: Job) -> None:
        final = self.path_for(job.id)
        try:
            self._ensure_dir(os.path.dirname(final))
            diskio.off_hub(_move, temp_path, final)
            diskio.fsync_dir(os.path.dirname(final))
        except OSError as exc:
            _remove_quietly(temp_path)
            raise StorageError(f"cannot store {final}: {exc.strerror or exc}") from exc
        log.debug("job %s: stored at %s", job.id, final)

    def delete(self, job_id: str) -> bool:
        if not _SAFE_ID_RE.fullmatch(job_id):
            return False
        path = self.path_for(job_id)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot delete {path}: {exc.strerror}") from exc
        log.debug("job %s: deleted %s", job_id, path)
        return True

    def exists(self, job_id: str) -> bool:
        return _SAFE_ID_RE.fullmatch(job_id) is not None and os.path.isfile(self.path_for(job_id))

    def open(self, job_id: str) -> BinaryIO | None:
        if not _SAFE_ID_RE.fullmatch(job_id):
            return None
        path = self.path_for(job_id)
        try:
            return open(path, "rb")
        except (FileNotFoundError, IsADirectoryError):
            return None
        except OSError as exc:
            raise StorageError(f"cannot open {path}: {exc.strerror}") from exc

    def _ensure_dir(self, directory: str) -> None:
        if os.path.isdir(directory):
            return
        diskio.makedirs(directory)
        # The new directory's entry in rootdir must reach the disk too.
        diskio.fsync_dir(self.rootdir)


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

    def store(self, temp_path: str, job: Job) -> None:
        key = path_for_id(job.id)
        try:
            extra_args = {"Metadata": self.metadata(job)} if self.caller else {}
            self.client.upload_file(temp_path, self.bucket, key, ExtraArgs=extra_args, Config=_transfer_config())
        except S3StorageError:
            raise
        except Exception as exc:
            raise self._error(f"cannot store s3://{self.bucket}/{key}", exc) from exc
        finally:
            _remove_quietly(temp_path)
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
        if not _SAFE_ID_RE.fullmatch(job_id):
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
        if not _SAFE_ID_RE.fullmatch(job_id):
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


class Storages:
    """The storage of each job: the one place that decides.

    - A job with ``s3_bucket`` + ``s3_region`` goes to the caller's bucket
      (on ``processor.filestorage.endpoint_url`` when our storage is S3 with
      one, else wherever the AWS chain points, ``AWS_ENDPOINT_URL_S3``
      included); the reaper leaves it there; the callback carries the
      object's URL in that bucket.
    - Any other job goes to ``default`` (``processor.filestorage``); the
      reaper deletes it; the callback carries ``processor.download_url`` +
      ``<id[0:3]>/<id>``, except for our own S3 storage with
      ``processor.download_url`` left at its default (a URL of gdl's API,
      which does not serve S3): then the object's URL.
    """

    def __init__(self, default: FileStorage, *, download_url: str, use_download_url: bool = True,
                 clients: S3Clients | None = None, endpoint_url: str | None = None):
        self.default = default
        self.download_url = download_url
        self.use_download_url = use_download_url
        self.clients = clients or S3Clients()
        self.endpoint_url = endpoint_url

    @classmethod
    def from_config(cls, cfg: Config) -> Storages:
        clients = S3Clients()
        default = from_config(cfg, clients=clients)
        s3 = isinstance(default, S3Storage)
        return cls(default, download_url=cfg.processor.download_url,
                   use_download_url=not s3 or cfg.processor.download_url != _DEFAULT_DOWNLOAD_URL,
                   clients=clients, endpoint_url=default.endpoint_url if isinstance(default, S3Storage) else None)

    def for_job(self, job: Job | None) -> FileStorage:
        """Where ``job``'s file goes (None: a job whose record is gone, so ours)."""
        if job is not None and job.s3_bucket:
            return S3Storage(self.clients, job.s3_bucket, job.s3_region, endpoint_url=self.endpoint_url, caller=True)
        return self.default

    def url_for(self, job: Job) -> str:
        """The ``download_url`` of a stored file, as put in the callback."""
        storage = self.for_job(job)
        own = None if storage is self.default and self.use_download_url else storage.url(job.id)
        return own or join_url(self.download_url, job.id)


_DEFAULT_DOWNLOAD_URL = {f.name: f.default for f in dataclasses.fields(ProcessorConfig)}["download_url"]


def from_config(cfg: Config, *, clients: S3Clients | None = None) -> FileStorage:
    """The storage named by ``processor.filestorage``."""
    settings = cfg.processor.filestorage
    kind = settings.get("type")
    if kind == "filesystem":
        return FilesystemStorage(settings["rootdir"])
    if kind == "s3":
        for name in ("bucket", "region"):
            if not settings.get(name):
                raise ConfigError(f"processor.filestorage.{name}: required for s3 storage")
        _boto3(key="processor.filestorage.type")
        return S3Storage(clients or S3Clients(), settings["bucket"], settings["region"],
                         endpoint_url=settings.get("endpoint_url") or None)
    raise ConfigError(f"processor.filestorage.type: must be filesystem or s3 (got {kind!r})")


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


def _move(source: str, target: str) -> None:
    """Put ``source`` at ``target`` atomically; readers never see a partial file."""
    try:
        os.replace(source, target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    # Another filesystem: copy next to the target, fsync, then rename into place.
    fd, partial = tempfile.mkstemp(dir=os.path.dirname(target), prefix=os.path.basename(target) + ".")
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)
    except BaseException:
        _remove_quietly(partial)
        raise
    _remove_quietly(source)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc.strerror)
