"""The file storage interface, and where a job's file sits in any storage."""

from __future__ import annotations

import logging
import os
import re
from abc import ABC, abstractmethod
from typing import BinaryIO

from gdl.job import Job

log = logging.getLogger("gdl.filestorage")

# Ids that are safe as a file name: a job id (14 alphanumerics) passes, and
# nothing that could climb out of rootdir ("..", "/") does.
SAFE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

# Characters of the id naming the subdirectory, so no directory gets huge.
PREFIX_LENGTH = 3


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
    def store(self, temp_path: str, job: Job, *, sha256: str = "") -> None:
        """Move the complete file at ``temp_path`` to the job's place.

        ``temp_path`` is consumed: moved on success, removed on failure
        (:class:`~gdl.errors.StorageError`). ``sha256`` (hex, "" when not
        known) lets a storage that can check the bytes it receives do so.
        """

    @abstractmethod
    def store_bytes(self, data: bytes, job: Job, *, sha256: str = "") -> None:
        """Put a complete body held in memory at the job's place
        (:class:`~gdl.errors.StorageError` on failure)."""

    @abstractmethod
    def delete(self, job_id: str) -> bool:
        """Remove the job's file: True if it was there, False if already absent."""

    @abstractmethod
    def exists(self, job_id: str) -> bool:
        """Whether the job's file is stored."""

    @abstractmethod
    def open(self, job_id: str) -> BinaryIO | None:
        """The job's file opened for reading (the caller closes it), or None if absent."""

    def share(self, source_id: str, job: Job) -> bool:
        """Give ``job`` a file of its own with the bytes of ``source_id``'s, without
        copying them where the storage can (a hard link; a server-side copy), so
        that deleting either leaves the other. False when ``source_id``'s file is
        gone (or this storage cannot share); :class:`~gdl.errors.StorageError` on
        a failure."""
        return False

    def head(self, job_id: str, limit: int) -> bytes | None:
        """The first ``limit`` bytes of the job's file, or None if absent."""
        handle = self.open(job_id)
        if handle is None:
            return None
        with handle:
            return handle.read(limit)

    def url(self, job_id: str) -> str | None:
        """The file's own URL, or None when it is served under ``processor.download_url``."""
        return None

    def check(self) -> None:
        """Startup check; raises :class:`~gdl.errors.StartupError` naming the config key."""
        return None


def remove_quietly(path: str) -> None:
    """Remove ``path``: gone already is fine, another failure is logged, never raised."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc.strerror)
