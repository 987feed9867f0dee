"""Where finished files live.

:class:`FileStorage` is the interface the processor (store), the reaper
(delete) and the API (open, for ``GET /files/...``) use; :func:`from_config`
picks the implementation. :class:`FilesystemStorage` keeps a job's file at
``<rootdir>/<id[0:3]>/<id>``, moved there atomically and fsynced. An S3
storage will implement the same interface.

Every OSError is translated into :class:`~gdl.errors.StorageError`.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from typing import BinaryIO

from gdl.config import Config
from gdl.errors import ConfigError, StorageError
from gdl.job import Job

log = logging.getLogger(__name__)

# Ids that are safe as a file name: a job id (14 alphanumerics) passes, and
# nothing that could climb out of rootdir ("..", "/") does.
_SAFE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

# Characters of the id naming the subdirectory, so no directory gets huge.
PREFIX_LENGTH = 3


class FileStorage(ABC):
    """Keeps finished downloads, one file per job id."""

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
            _move(temp_path, final)
            _fsync_dir(os.path.dirname(final))
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
        os.makedirs(directory, exist_ok=True)
        # The new directory's entry in rootdir must reach the disk too.
        _fsync_dir(self.rootdir)


def from_config(cfg: Config) -> FileStorage:
    """The storage named by ``processor.filestorage``."""
    settings = cfg.processor.filestorage
    kind = settings.get("type")
    if kind == "filesystem":
        return FilesystemStorage(settings["rootdir"])
    if kind == "s3":
        raise ConfigError("processor.filestorage.type: s3 storage is not available yet")
    raise ConfigError(f"processor.filestorage.type: must be filesystem or s3 (got {kind!r})")


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


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc.strerror)
