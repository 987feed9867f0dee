"""gdl.filestorage: what is the filesystem storage's own (the layout on disk, atomic
moves across filesystems, ``open``, which failures are retried, a delete that knows
whether the file was there) and the config factory. What every storage promises is
in tests/test_filestorage_contract.py."""

from __future__ import annotations

import dataclasses
import errno
import os

import pytest

from gdl import filestorage
from gdl.config import Config, ProcessorConfig
from gdl.errors import ConfigError, StorageError
from gdl.filestorage import FilesystemStorage
from gdl.job import Job


def make_job(job_id: str = "6QEywYsd0jrKAg") -> Job:
    return Job(id=job_id, url="http://example.com/a", aggr_id="aggr", aggr_limit=1)


@pytest.fixture
def storage(tmp_path) -> FilesystemStorage:
    return FilesystemStorage(str(tmp_path / "files"))


def write_temp(tmp_path, data: bytes = b"payload") -> str:
    path = tmp_path / "partial.tmp"
    path.write_bytes(data)
    return str(path)


def test_path_layout(storage, tmp_path) -> None:
    assert storage.path_for("6QEywYsd0jrKAg") == str(tmp_path / "files" / "6QE" / "6QEywYsd0jrKAg")


@pytest.mark.parametrize("bad", ["", "..", "../etc/passwd", "a/b", "a\0b", ".hidden"])
def test_path_for_refuses_unsafe_ids(storage, bad) -> None:
    with pytest.raises(ValueError):
        storage.path_for(bad)


def test_store_moves_the_temp_file(storage, tmp_path) -> None:
    temp = write_temp(tmp_path, b"the bytes")
    storage.store(temp, make_job())
    assert not os.path.exists(temp)
    assert (tmp_path / "files" / "6QE" / "6QEywYsd0jrKAg").read_bytes() == b"the bytes"
    assert storage.exists("6QEywYsd0jrKAg") is True
    with storage.open("6QEywYsd0jrKAg") as f:
        assert f.read() == b"the bytes"


def test_store_across_filesystems_copies_then_renames(storage, tmp_path, monkeypatch) -> None:
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append((os.path.basename(src), os.path.basename(dst)))
        if len(calls) == 1:  # the direct move: pretend the temp dir is another filesystem
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    temp = write_temp(tmp_path, b"x" * 100_000)
    storage.store(temp, make_job())

    assert not os.path.exists(temp)
    assert (tmp_path / "files" / "6QE" / "6QEywYsd0jrKAg").read_bytes() == b"x" * 100_000
    assert calls[0] == ("partial.tmp", "6QEywYsd0jrKAg")
    assert calls[1][0].startswith("6QEywYsd0jrKAg.") and calls[1][1] == "6QEywYsd0jrKAg"
    assert os.listdir(tmp_path / "files" / "6QE") == ["6QEywYsd0jrKAg"]  # no copy left behind


def test_a_disk_failure_is_retried_without_counting_an_attempt(tmp_path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")  # rootdir is a file: its subdirectory cannot be made
    storage = FilesystemStorage(str(blocker))
    with pytest.raises(StorageError) as info:
        storage.store(write_temp(tmp_path), make_job())
    assert (type(info.value), info.value.retriable, info.value.internal) == (StorageError, True, True)
    assert str(info.value) == f"cannot store {blocker}/6QE/6QEywYsd0jrKAg: Not a directory"


def test_store_bytes_writes_through_a_temp_file_in_temp_dir(tmp_path) -> None:
    (tmp_path / "tmp").mkdir()
    storage = FilesystemStorage(str(tmp_path / "files"), temp_dir=str(tmp_path / "tmp"))
    storage.store_bytes(b"in memory", make_job())
    assert (tmp_path / "files" / "6QE" / "6QEywYsd0jrKAg").read_bytes() == b"in memory"
    assert os.listdir(tmp_path / "tmp") == []


def test_store_bytes_into_a_missing_temp_dir_is_a_storage_error(tmp_path) -> None:
    missing = FilesystemStorage(str(tmp_path / "files"), temp_dir=str(tmp_path / "no-such-dir"))
    with pytest.raises(StorageError, match="cannot store"):
        missing.store_bytes(b"in memory", make_job())
    assert missing.exists("6QEywYsd0jrKAg") is False


def test_deleting_a_file_that_is_gone_says_false(storage, tmp_path) -> None:
    storage.store(write_temp(tmp_path), make_job())
    assert storage.delete("6QEywYsd0jrKAg") is True
    assert storage.delete("6QEywYsd0jrKAg") is False
    assert storage.delete("neverStored123") is False


def test_check_makes_a_missing_rootdir(tmp_path) -> None:
    storage = FilesystemStorage(str(tmp_path / "new" / "files"))
    storage.check()
    assert os.listdir(tmp_path / "new" / "files") == []  # made, and the probe file gone


def with_filestorage(settings: dict) -> Config:
    return dataclasses.replace(Config(), processor=ProcessorConfig(filestorage=settings))


def test_from_config_filesystem(tmp_path) -> None:
    storage = filestorage.from_config(with_filestorage({"type": "filesystem", "rootdir": str(tmp_path)}))
    assert isinstance(storage, FilesystemStorage)
    assert storage.rootdir == str(tmp_path)


def test_from_config_s3_needs_a_region() -> None:
    with pytest.raises(ConfigError, match=r"^processor\.filestorage\.region: required for s3 storage$"):
        filestorage.from_config(with_filestorage({"type": "s3", "bucket": "b"}))


def test_from_config_s3() -> None:
    storage = filestorage.from_config(with_filestorage({"type": "s3", "bucket": "b", "region": "eu-west-1"}))
    assert isinstance(storage, filestorage.S3Storage)
    assert (storage.bucket, storage.region) == ("b", "eu-west-1")
