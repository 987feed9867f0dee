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

:class:`FileStorages` is the one place that decides which storage a job's file
goes to, whether the reaper deletes it and which URL the callback carries;
the pool, the reaper and the notifier all ask it.

Every OSError and every S3 failure is translated into
:class:`~gdl.errors.StorageError` (S3: :class:`~gdl.errors.S3StorageError`,
retriable or not by the failure's nature).
"""

from __future__ import annotations

import dataclasses

from gdl.config import Config, ProcessorConfig
from gdl.errors import ConfigError
from gdl.filestorage.base import PREFIX_LENGTH, FileStorage, join_url, path_for_id
from gdl.filestorage.filesystem import FilesystemStorage
from gdl.filestorage.s3 import S3_MULTIPART_CHUNKSIZE, S3Clients, S3Storage, _boto3
from gdl.job import Job

__all__ = ["PREFIX_LENGTH", "S3_MULTIPART_CHUNKSIZE", "FileStorage", "FilesystemStorage", "S3Clients",
           "S3Storage", "FileStorages", "from_config", "join_url", "path_for_id"]


class FileStorages:
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
    def from_config(cls, cfg: Config) -> FileStorages:
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
        return FilesystemStorage(settings["rootdir"], temp_dir=cfg.processor.storage_dir)
    if kind == "s3":
        for name in ("bucket", "region"):
            if not settings.get(name):
                raise ConfigError(f"processor.filestorage.{name}: required for s3 storage")
        _boto3(key="processor.filestorage.type")
        return S3Storage(clients or S3Clients(), settings["bucket"], settings["region"],
                         endpoint_url=settings.get("endpoint_url") or None)
    raise ConfigError(f"processor.filestorage.type: must be filesystem or s3 (got {kind!r})")
