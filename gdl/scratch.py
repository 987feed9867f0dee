"""The temp file a download streams into, in the scratch directory
(``processor.storage_dir``).

:class:`TempFile` holds small bodies in memory, writes larger ones to
``<storage_dir>/<job id>.<random>`` (the name the scanner's sweep of a dead
process's jobs looks for), and can be kept after a failed attempt
(:meth:`TempFile.keep`) and opened again for appending by the retry
(:meth:`TempFile.reopen`): the partial file of a resumed download.

Writing a chunk to the file and hashing it run in the hub's threadpool, one
chunk behind the reader: the hub goes on receiving the next chunk meanwhile,
and a big download uses a second core for its page-cache copy and its
sha-256 (together about as much CPU as receiving it), not the hub's one.
"""

from __future__ import annotations

import logging
import os
from typing import BinaryIO

from gdl import diskio
from gdl.checksum import Digests
from gdl.errors import StorageError
from gdl.filestorage.base import remove_quietly

log = logging.getLogger("gdl.download")


class TempFile:
    """A temp file being written; OSErrors become :class:`StorageError`.

    Up to ``in_memory`` bytes stay in memory, and a body that fits never
    becomes a file here (:meth:`finish` returns it). ``path`` is set once the
    file exists.
    """

    def __init__(self, directory: str, *, prefix: str, in_memory: int):
        self.directory = directory
        self.prefix = prefix
        self.in_memory = in_memory
        self.buffer = bytearray()
        self.path = ""
        self.file: BinaryIO | None = None
        self.size = 0
        self.written_back = 0  # bytes whose writeback to disk was requested
        self._writing: diskio.Started | None = None  # the chunk being written and hashed, off the hub

    @classmethod
    def reopen(cls, path: str, size: int) -> TempFile:
        """The kept partial file at ``path``, its first ``size`` bytes kept, opened to append."""
        temp = cls(os.path.dirname(path), prefix="", in_memory=0)
        try:
            temp.file = open(path, "r+b")  # noqa: SIM115 - closed by finish or discard
            temp.file.truncate(size)
            temp.file.seek(size)
        except OSError as exc:
            raise StorageError(f"cannot reopen {path}: {exc.strerror}") from exc
        temp.path, temp.size, temp.written_back = path, size, size
        return temp

    def write(self, chunk: bytes, digests: Digests) -> None:
        """Append ``chunk`` and add it to ``digests``: in memory at once; to the file in
        the threadpool, after the previous chunk (an error of that one is raised here)."""
        if self.file is None and len(self.buffer) + len(chunk) <= self.in_memory:
            self.buffer += chunk
            self.size += len(chunk)
            digests.update(chunk)
            return
        self.wait_written()
        if self.file is None:
            self.file = self._create()
        held, self.buffer = self.buffer, bytearray()  # hashed already, as it was buffered
        self._writing = diskio.start_off_hub(_write_and_hash, self.file, held, chunk, digests)
        self.size += len(chunk)

    def wait_written(self) -> None:
        """Until the chunk in the threadpool is written and hashed. Interrupted, it is
        still awaited by :meth:`discard` or :meth:`keep`: the file is not closed under it."""
        if self._writing is None:
            return
        try:
            self._writing.wait()
        except OSError as exc:
            self._writing = None
            raise StorageError(f"cannot write {self.path}: {exc.strerror}") from exc
        self._writing = None
        # Every byte counted in size is written now: a chunk starts only once the last one is done.
        if self.size - self.written_back >= diskio.Writeback.STEP:  # big files only: see diskio.Writeback
            assert self.file is not None
            diskio.writeback.written(self.file.fileno(), self.written_back, self.size - self.written_back)
            self.written_back = self.size

    def _create(self) -> BinaryIO:
        try:
            fd, self.path = diskio.mkstemp(self.directory, self.prefix)
        except OSError as exc:
            raise StorageError(f"cannot create a temp file in {self.directory}: {exc.strerror}") from exc
        return os.fdopen(fd, "wb")

    def finish(self) -> bytes | None:
        """The body if it stayed in memory; else flush the file to disk and close
        it (it survives a crash from here on) and return None."""
        if self.file is None:
            return bytes(self.buffer)
        self.wait_written()
        try:
            diskio.flush_sync_close(self.file)
        except OSError as exc:
            raise StorageError(f"cannot write {self.path}: {exc.strerror}") from exc
        return None

    def keep(self) -> bool:
        """Close the file and leave it on disk for a later attempt to append to;
        False (and nothing kept) when it never reached the disk or cannot be flushed."""
        if self.file is None or not self.path:
            self.discard()
            return False
        try:
            self.wait_written()
            diskio.flush_sync_close(self.file)
        except (OSError, StorageError) as exc:
            log.warning("cannot keep partial file %s: %s", self.path, getattr(exc, "strerror", None) or exc)
            self.discard()
            return False
        return True

    def discard(self) -> None:
        self.buffer = bytearray()
        try:
            self.wait_written()
        except StorageError:
            pass  # the data is being thrown away
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass  # the data is being thrown away; a failed flush does not matter
        if self.path:
            remove_quietly(self.path)


def _write_and_hash(file: BinaryIO, held: bytearray, chunk: bytes, digests: Digests) -> None:
    """In a pool thread: the bytes held in memory until now (hashed already), then ``chunk``."""
    if held:
        file.write(held)
    file.write(chunk)
    digests.update(chunk)
