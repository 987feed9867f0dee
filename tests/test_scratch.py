"""The temp file a download streams into: chunks written and hashed in the
threadpool stay in order, and a failed write comes back to the reader."""

from __future__ import annotations

import hashlib
import os
import random

import pytest

from gdl.checksum import Digests
from gdl.errors import StorageError
from gdl.scratch import TempFile


def test_chunks_written_off_the_hub_land_in_order_and_hashed(tmp_path) -> None:
    rng = random.Random(7)
    chunks = [rng.randbytes(rng.randrange(1, 300_000)) for _ in range(60)]
    temp, digests = TempFile(str(tmp_path), prefix="job.", in_memory=0), Digests()
    for chunk in chunks:
        temp.write(chunk, digests)
    assert temp.finish() is None
    body = b"".join(chunks)
    assert (temp.size, open(temp.path, "rb").read()) == (len(body), body)
    assert digests.check() == hashlib.sha256(body).hexdigest()


def test_a_body_that_outgrows_memory_is_written_whole_and_hashed_once(tmp_path) -> None:
    temp, digests = TempFile(str(tmp_path), prefix="job.", in_memory=10), Digests()
    for chunk in (b"abcdef", b"ghij", b"klmnop"):  # 6 and 4 fit in memory, the third spills
        temp.write(chunk, digests)
    assert temp.finish() is None
    assert open(temp.path, "rb").read() == b"abcdefghijklmnop"
    assert digests.check() == hashlib.sha256(b"abcdefghijklmnop").hexdigest()


def test_a_body_that_fits_stays_in_memory(tmp_path) -> None:
    temp, digests = TempFile(str(tmp_path), prefix="job.", in_memory=10), Digests()
    temp.write(b"abc", digests)
    temp.write(b"def", digests)
    assert (temp.finish(), temp.path, os.listdir(tmp_path)) == (b"abcdef", "", [])
    assert digests.check() == hashlib.sha256(b"abcdef").hexdigest()


def test_a_failed_write_in_the_threadpool_is_raised_to_the_reader(tmp_path) -> None:
    temp, digests = TempFile(str(tmp_path), prefix="job.", in_memory=0), Digests()
    temp.write(b"x" * 100_000, digests)
    temp.wait_written()
    assert temp.file is not None
    temp.file.close()
    temp.file = open("/dev/full", "wb")  # noqa: SIM115 - a real ENOSPC for every write
    temp.write(b"y" * 100_000, digests)  # fails in the threadpool ...
    with pytest.raises(StorageError, match="No space left on device"):
        temp.write(b"z", digests)  # ... and is raised with the next chunk
    temp.discard()
    assert os.listdir(tmp_path) == []
