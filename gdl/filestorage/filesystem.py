"""Files on a local (or shared) filesystem: ``<rootdir>/<id[0:3]>/<id>``.

Moved into place atomically and fsynced (the new directory too), served by
the API at ``processor.download_url``. Disk calls that may wait run off the
hub (:mod:`gdl.diskio`).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from typing import BinaryIO

from gdl import diskio
from gdl.errors import StorageError
from gdl.filestorage.base import PREFIX_LENGTH, SAFE_ID_RE, FileStorage, remove_quietly
from gdl.job import Job

log = logging.getLogger("gdl.filestorage")


class FilesystemStorage(FileStorage):
    """Files under ``rootdir`` at ``<id[0:3]>/<id>``."""

    def __init__(self, rootdir: str, temp_dir: str = ""):
        self.rootdir = rootdir
        self.temp_dir = temp_dir or rootdir  # where store_bytes writes before the rename

    def path_for(self, job_id: str) -> str:
        """``<rootdir>/<id[0:3]>/<id>``; ValueError for an id unsafe as a file name."""
        if not SAFE_ID_RE.fullmatch(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return os.path.join(self.rootdir, job_id[:PREFIX_LENGTH], job_id)

    def store(self, temp_path: str, job: Job, *, sha256: str = "") -> None:
        final = self.path_for(job.id)
        try:
            # One trip to the threadpool for the directory, the rename and their fsyncs.
            diskio.off_hub(_place, temp_path, final, self.rootdir)
        except OSError as exc:
            remove_quietly(temp_path)
            raise StorageError(f"cannot store {final}: {exc.strerror or exc}") from exc
        log.debug("job %s: stored at %s", job.id, final)

    def store_bytes(self, data: bytes, job: Job, *, sha256: str = "") -> None:
        final = self.path_for(job.id)
        try:
            # One trip to the threadpool, shared with other small files: the temp
            # file, its fsync, the directory, the rename.
            diskio.off_hub_shared(_write_and_place, data, self.temp_dir, job.id + ".", final, self.rootdir)
        except OSError as exc:
            raise StorageError(f"cannot store {final}: {exc.strerror or exc}") from exc
        log.debug("job %s: stored at %s", job.id, final)

    def share(self, source_id: str, job: Job) -> bool:
        """A hard link to ``source_id``'s file at the job's place."""
        if not SAFE_ID_RE.fullmatch(source_id):
            return False
        source, final = self.path_for(source_id), self.path_for(job.id)
        try:
            diskio.off_hub(_link_into_place, source, final, self.rootdir)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot link {final} to {source}: {exc.strerror or exc}") from exc
        log.debug("job %s: linked at %s to %s", job.id, final, source)
        return True

    def delete(self, job_id: str) -> bool:
        if not SAFE_ID_RE.fullmatch(job_id):
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
        return SAFE_ID_RE.fullmatch(job_id) is not None and os.path.isfile(self.path_for(job_id))

    def open(self, job_id: str) -> BinaryIO | None:
        if not SAFE_ID_RE.fullmatch(job_id):
            return None
        path = self.path_for(job_id)
        try:
            return open(path, "rb")
        except (FileNotFoundError, IsADirectoryError):
            return None
        except OSError as exc:
            raise StorageError(f"cannot open {path}: {exc.strerror}") from exc

    def check(self) -> None:
        """rootdir is made if missing and takes a new file, or gdl stops naming
        ``processor.filestorage.rootdir``."""
        diskio.check_writable("processor.filestorage.rootdir", self.rootdir)


def _write_and_place(data: bytes, temp_dir: str, prefix: str, target: str, rootdir: str) -> None:
    """Write ``data`` to a temp file named ``<prefix>*`` in ``temp_dir`` (so that
    the sweep of a dead process's jobs finds it), then move it to ``target``
    durably (blocking: run off the hub)."""
    temp = diskio.write_new_file(temp_dir, prefix, data)
    try:
        _place(temp, target, rootdir)
    except BaseException:
        remove_quietly(temp)
        raise


def _link_into_place(source: str, target: str, rootdir: str) -> None:
    """Link ``source`` at ``target`` durably (blocking: run off the hub). The link is
    made beside the target and renamed over it, so that a retry replaces a file
    left by an earlier one."""
    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
    temp = f"{target}.link-{os.getpid()}-{id(target):x}"
    os.link(source, temp)
    try:
        os.replace(temp, target)
    except BaseException:
        remove_quietly(temp)
        raise
    diskio.sync_directory(directory)


def _place(source: str, target: str, rootdir: str) -> None:
    """Move ``source`` to ``target`` durably (blocking: run off the hub)."""
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        os.makedirs(directory, exist_ok=True)
        diskio.sync_directory(rootdir)  # the new directory's entry must reach the disk too
    _move(source, target)
    diskio.sync_directory(directory)


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
        remove_quietly(partial)
        raise
    remove_quietly(source)
