"""The file storage contract: every implementation keeps the same promises.

Each test runs once per implementation (ids ``filesystem`` and ``s3``), both
built as gdl builds them, from ``processor.filestorage`` in a YAML config,
and both used through the public interface only (:class:`FileStorages` and
:class:`FileStorage`): the filesystem storage on a temporary directory,
served by gdl's API at ``processor.download_url``; the S3 storage on moto's
S3 server, its objects served by moto. A file is read back the way a client
reads it: by GET of the ``download_url`` its callback carries.

What every storage promises:

- ``store`` moves a complete temp file to the job's place and consumes it;
  ``store_bytes`` puts a body held in memory there; either way the bytes
  read back at the download URL are exactly the bytes stored (empty, small,
  larger than one multipart part), and ``exists`` says so.
- The download URL ends with ``<id[0:3]>/<id>``; before the file is stored
  and after it is deleted, it answers 404.
- Storing again replaces the file; files of different jobs (even under
  the same prefix) are independent, also when stored at once.
- ``delete`` removes the file and says True; deleting what is gone does
  not fail. An id unsafe as a file name is never a file: not there, not
  deleted, not opened.
- A broken destination (filesystem: the root is not a directory; S3: the
  bucket does not exist) makes ``store``, ``store_bytes`` and ``delete``
  raise :class:`~gdl.errors.StorageError`, internal (the fault is ours),
  naming the place; ``store`` consumes the temp file even then, and
  ``store_bytes`` leaves nothing in ``processor.storage_dir``.
- ``check()`` passes on a working destination and raises
  :class:`~gdl.errors.StartupError` naming the config key on a broken one.
- gdl's own storage is owned: the reaper deletes its files.

What differs on purpose is tested in each implementation's module
(tests/test_filestorage.py, tests/test_s3.py): the on-disk layout and
``open``; S3's object metadata, the caller's buckets, which S3 failures are
retriable, and that a delete cannot tell whether the object was there.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import pytest
import requests
import yaml

from gdl import config
from gdl.api import API, make_server
from gdl.errors import StartupError, StorageError
from gdl.filestorage import FileStorage, FileStorages, path_for_id
from gdl.job import Job
from tests.brokers import REGION

JOB_ID = "6QEywYsd0jrKAg"
NEIGHBOUR_ID = "6QEzzzzzzzzzzz"  # same <id[0:3]> directory or key prefix
BUCKET = "gdl-contract"
UNSAFE_IDS = ["", "..", "../etc/passwd", "a/b", "a\0b", ".hidden"]


def a_job(job_id: str = JOB_ID) -> Job:
    return Job(id=job_id, url="http://example.com/a", aggr_id="aggr", aggr_limit=1)


def load_config(directory: Path, filestorage: dict[str, Any], download_url: str | None = None) -> config.Config:
    """A config as an operator writes it, loaded as gdl loads it."""
    processor: dict[str, Any] = {"storage_dir": str(directory / "tmp"), "filestorage": filestorage}
    if download_url is not None:
        processor["download_url"] = download_url
    path = directory / "gdl.yaml"
    path.write_text(yaml.safe_dump({"processor": processor}))
    return config.load(path, environ={})


@dataclass
class Place:
    """One implementation, configured as in production, and its broken twin."""

    storages: FileStorages
    broken: FileStorages  # the same implementation on a destination that cannot work
    broken_place: str  # how errors about ``broken`` name its destination
    temp_dir: Path

    @property
    def storage(self) -> FileStorage:
        return self.storages.default

    def url(self, job_id: str = JOB_ID) -> str:
        return self.storages.url_for(a_job(job_id))

    def fetch(self, job_id: str = JOB_ID) -> tuple[int, bytes]:
        """GET of the download URL the callback would carry: (status, body)."""
        response = requests.get(self.url(job_id), timeout=30)
        return response.status_code, response.content

    def temp_file(self, data: bytes, name: str = "partial.tmp") -> str:
        path = self.temp_dir / name
        path.write_bytes(data)
        return str(path)


def filesystem_place(tmp_path: Path, request: pytest.FixtureRequest) -> Place:
    """Files under a temp dir, served by gdl's API on loopback at ``download_url``."""
    store = request.getfixturevalue("store")
    rootdir = tmp_path / "files"
    rootdir.mkdir()
    server = make_server(("127.0.0.1", 0), lambda environ, start: app(environ, start), log=None, error_log=None)
    server.start()
    request.addfinalizer(lambda: server.stop(timeout=1))
    download_url = f"http://127.0.0.1:{server.server_port}/files"
    cfg = load_config(tmp_path, {"type": "filesystem", "rootdir": str(rootdir)}, download_url)
    storages = FileStorages.from_config(cfg)
    app = API(cfg, store, storages.default)
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")
    broken = FileStorages.from_config(load_config(tmp_path, {"type": "filesystem", "rootdir": str(blocker)}))
    return Place(storages, broken, str(blocker), Path(cfg.processor.storage_dir))


def s3_place(tmp_path: Path, request: pytest.FixtureRequest) -> Place:
    """Objects in a bucket of moto's S3 server; callbacks carry the objects' URLs."""
    s3 = request.getfixturevalue("s3")
    client = s3.create_bucket(BUCKET)
    # Objects are private; the operator lets clients read them (here: a public-read bucket policy).
    client.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{BUCKET}/*"}]}))
    ours = {"type": "s3", "bucket": BUCKET, "region": REGION, "endpoint_url": s3.url}
    storages = FileStorages.from_config(load_config(tmp_path, ours))
    broken = FileStorages.from_config(load_config(tmp_path, {**ours, "bucket": "no-such-bucket"}))
    return Place(storages, broken, "no-such-bucket", tmp_path / "tmp")


PLACES: dict[str, Callable[[Path, pytest.FixtureRequest], Place]] = {
    "filesystem": filesystem_place,
    "s3": s3_place,
}


@pytest.fixture(params=sorted(PLACES))
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Place]:
    made = PLACES[request.param](tmp_path, request)
    made.temp_dir.mkdir(parents=True, exist_ok=True)
    yield made


# --------------------------------------------------------------------------- storing and reading back


def test_a_stored_file_reads_back_byte_for_byte_at_its_download_url(place: Place) -> None:
    data = bytes(range(256)) * 40
    temp = place.temp_file(data)
    place.storage.store(temp, a_job())
    assert place.fetch() == (200, data)
    assert place.storage.exists(JOB_ID) is True


def test_store_consumes_the_temp_file(place: Place) -> None:
    temp = place.temp_file(b"moved, not copied")
    place.storage.store(temp, a_job())
    assert os.path.exists(temp) is False
    assert os.listdir(place.temp_dir) == []


def test_stored_bytes_read_back_byte_for_byte_at_their_download_url(place: Place) -> None:
    data = "caf\u00e9 \u2603\n".encode() + bytes(range(256))
    place.storage.store_bytes(data, a_job())
    assert place.fetch() == (200, data)
    assert place.storage.exists(JOB_ID) is True
    assert os.listdir(place.temp_dir) == []


def test_an_empty_file_is_stored_as_an_empty_file(place: Place) -> None:
    place.storage.store(place.temp_file(b""), a_job())
    assert place.fetch() == (200, b"")
    place.storage.store_bytes(b"", a_job(NEIGHBOUR_ID))
    assert place.fetch(NEIGHBOUR_ID) == (200, b"")


def test_a_file_larger_than_a_multipart_part_reads_back_exactly(place: Place) -> None:
    block = hashlib.sha256(b"contract").digest() * 2048  # 64 KiB, not all zeros
    data = block * 320 + b"tail"  # 20 MiB and 4 bytes: three parts of 8 MiB in S3
    place.storage.store(place.temp_file(data), a_job())
    status, body = place.fetch()
    assert (status, len(body), hashlib.sha256(body).hexdigest()) == \
        (200, len(data), hashlib.sha256(data).hexdigest())


def test_the_download_url_ends_with_the_files_place_and_is_404_until_stored(place: Place) -> None:
    assert place.url().endswith(f"/{path_for_id(JOB_ID)}")
    assert place.url().endswith("/6QE/6QEywYsd0jrKAg")
    assert place.fetch()[0] == 404
    assert place.storage.exists(JOB_ID) is False
    place.storage.store_bytes(b"now there", a_job())
    assert place.fetch() == (200, b"now there")


def test_storing_again_replaces_the_file(place: Place) -> None:
    place.storage.store(place.temp_file(b"first version, longer than the second"), a_job())
    place.storage.store(place.temp_file(b"second"), a_job())
    assert place.fetch() == (200, b"second")
    place.storage.store_bytes(b"third, from memory", a_job())
    assert place.fetch() == (200, b"third, from memory")


def test_files_of_different_jobs_under_one_prefix_are_independent(place: Place) -> None:
    place.storage.store_bytes(b"mine", a_job())
    place.storage.store(place.temp_file(b"my neighbour's"), a_job(NEIGHBOUR_ID))
    assert place.storage.delete(JOB_ID) is True
    assert place.fetch()[0] == 404
    assert place.fetch(NEIGHBOUR_ID) == (200, b"my neighbour's")
    assert (place.storage.exists(JOB_ID), place.storage.exists(NEIGHBOUR_ID)) == (False, True)


def test_files_stored_at_once_each_read_back_as_their_own(place: Place) -> None:
    ids = [f"6QEconcurrent{n:x}" for n in range(8)]

    def store(job_id: str) -> None:
        if int(job_id[-1], 16) % 2:
            place.storage.store_bytes(job_id.encode() * 1000, a_job(job_id))
        else:
            place.storage.store(place.temp_file(job_id.encode() * 1000, job_id + ".tmp"), a_job(job_id))

    gevent.joinall([gevent.spawn(store, job_id) for job_id in ids], raise_error=True)
    assert {job_id: place.fetch(job_id) for job_id in ids} == {job_id: (200, job_id.encode() * 1000) for job_id in ids}
    assert os.listdir(place.temp_dir) == []


# --------------------------------------------------------------------------- deleting


def test_delete_removes_the_file_and_says_it_was_there(place: Place) -> None:
    place.storage.store_bytes(b"doomed", a_job())
    assert place.storage.delete(JOB_ID) is True
    assert place.storage.exists(JOB_ID) is False
    assert place.storage.open(JOB_ID) is None
    assert place.fetch()[0] == 404


def test_deleting_a_file_that_is_gone_does_not_fail(place: Place) -> None:
    place.storage.store_bytes(b"doomed", a_job())
    place.storage.delete(JOB_ID)
    again = place.storage.delete(JOB_ID)
    never = place.storage.delete("neverStored123")
    assert (type(again), type(never)) == (bool, bool)  # which bool: each implementation's own test
    assert (place.storage.exists(JOB_ID), place.storage.exists("neverStored123")) == (False, False)


def test_a_file_never_stored_does_not_exist_and_does_not_open(place: Place) -> None:
    assert place.storage.exists(JOB_ID) is False
    assert place.storage.open(JOB_ID) is None


@pytest.mark.parametrize("bad", UNSAFE_IDS)
def test_an_id_unsafe_as_a_file_name_is_never_a_file(place: Place, bad: str) -> None:
    assert place.storage.exists(bad) is False
    assert place.storage.delete(bad) is False
    assert place.storage.open(bad) is None


# --------------------------------------------------------------------------- a broken destination


def test_storing_into_a_broken_destination_is_an_internal_storage_error_that_consumes_the_temp_file(
        place: Place) -> None:
    temp = place.temp_file(b"nowhere to go")
    with pytest.raises(StorageError) as info:
        place.broken.default.store(temp, a_job())
    assert info.value.internal is True
    assert str(info.value).startswith("cannot store ")
    assert place.broken_place in str(info.value) and path_for_id(JOB_ID) in str(info.value)
    assert os.path.exists(temp) is False


def test_storing_bytes_into_a_broken_destination_is_an_internal_storage_error_leaving_no_temp_file(
        place: Place) -> None:
    with pytest.raises(StorageError) as info:
        place.broken.default.store_bytes(b"nowhere to go", a_job())
    assert info.value.internal is True
    assert str(info.value).startswith("cannot store ")
    assert place.broken_place in str(info.value) and path_for_id(JOB_ID) in str(info.value)
    assert os.listdir(place.temp_dir) == []


def test_deleting_from_a_broken_destination_is_a_storage_error(place: Place) -> None:
    with pytest.raises(StorageError) as info:
        place.broken.default.delete(JOB_ID)
    assert str(info.value).startswith("cannot delete ")
    assert place.broken_place in str(info.value) and path_for_id(JOB_ID) in str(info.value)
    assert place.broken.default.exists(JOB_ID) is False


def test_check_passes_on_a_working_destination(place: Place) -> None:
    assert place.storage.check() is None
    place.storage.store_bytes(b"after the check", a_job())
    assert place.fetch() == (200, b"after the check")


def test_check_stops_startup_on_a_broken_destination_naming_the_config_key(place: Place) -> None:
    with pytest.raises(StartupError) as info:
        place.broken.default.check()
    assert str(info.value).startswith("processor.filestorage.")
    assert place.broken_place in str(info.value)


def test_gdls_own_storage_is_reaped(place: Place) -> None:
    assert place.storage.owned is True
    assert place.storages.for_job(a_job()) is place.storage
    assert place.storages.for_job(None) is place.storage
