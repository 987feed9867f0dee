"""S3 file storage against moto's S3 server on loopback: our bucket, the caller's
bucket, a large multipart upload with flat memory, and S3's errors."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from gdl.api import make_server
from gdl.config import Config, ProcessorConfig
from gdl.errors import S3StorageError, StartupError
from gdl.filestorage import S3_MULTIPART_CHUNKSIZE, FileStorages, FilesystemStorage
from gdl.job import Job
from tests.brokers import REGION, MotoServer
from tests.conftest import config_file, wait_until

BUCKET = "gdl-files"
DEFAULT_DOWNLOAD_URL = "http://localhost:8000/files"  # processor.download_url's default: S3 URLs in callbacks


def our_bucket(s3: MotoServer, bucket: str = BUCKET) -> dict[str, Any]:
    return {"type": "s3", "bucket": bucket, "region": REGION, "endpoint_url": s3.url}


def finished(running, job_id: str, *, callback: bool = True) -> dict:
    def done():
        record = running.get(f"/jobs/{job_id}").json()
        ended = record["callback_state"] in (("delivered", "failed") if callback else ("none",))
        return record if ended else None
    return wait_until(done, timeout=20)


def key(job_id: str) -> str:
    return f"{job_id[:3]}/{job_id}"


def test_our_bucket_stores_serves_and_reaps_the_object(store, run_service, s3, files, receiver, tmp_path):
    client = s3.create_bucket(BUCKET)
    # Objects are private; the operator lets clients read them (here: a public-read bucket policy).
    client.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{BUCKET}/*"}]}))
    body = bytes(range(256)) * 400
    files.add("/a.bin", body)
    running = run_service(processor={"filestorage": our_bucket(s3), "download_url": DEFAULT_DOWNLOAD_URL},
                          notifier={"deletion_interval": 0.03})  # 1.8 s
    job_id = running.enqueue(url=files.url("/a.bin"), aggr_id="a", aggr_limit=1, callback_url=receiver.url("/cb"))
    record = finished(running, job_id)
    assert (record["state"], record["callback_state"], record["bytes"]) == ("succeeded", "delivered", len(body))

    assert client.get_object(Bucket=BUCKET, Key=key(job_id))["Body"].read() == body
    [payload] = receiver.bodies()
    assert payload["download_url"] == f"{s3.url}/{BUCKET}/{key(job_id)}"
    # The digest in the callback is the one the upload sent for S3 to check.
    head = client.head_object(Bucket=BUCKET, Key=key(job_id), ChecksumMode="ENABLED")
    assert payload["sha256"] == hashlib.sha256(body).hexdigest() == base64.b64decode(head["ChecksumSHA256"]).hex()
    assert requests.get(payload["download_url"], timeout=5).content == body
    assert not (tmp_path / "files" / job_id[:3] / job_id).exists()  # S3 only: nothing on local disk
    assert running.get(f"/files/{key(job_id)}").status_code == 404  # GET /files serves the filesystem storage

    wait_until(lambda: running.get(f"/jobs/{job_id}").status_code == 404, timeout=10)
    assert client.list_objects_v2(Bucket=BUCKET)["KeyCount"] == 0
    stats = wait_until(lambda: (s := running.get("/stats/processor").json()).get("reaper_deleted") and s)
    assert stats["reaper_deleted"] == 1


def test_callers_bucket_gets_json_extra_as_metadata_and_keeps_the_object(
        run_service, s3, files, receiver, tmp_path, monkeypatch):
    # Our storage is the filesystem; the caller's bucket is found through the AWS chain.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.url)
    client = s3.create_bucket("caller-bucket", "eu-central-1")
    files.add("/a.bin", b"the caller's file")
    running = run_service(notifier={"deletion_interval": 0.03})
    extra = json.dumps({"sku": 42, "name": "caf\u00e9", "tags": ["a", "b"], "ok": True, "note": "plain"})
    job_id = running.enqueue(url=files.url("/a.bin"), aggr_id="a", aggr_limit=1, callback_url=receiver.url("/cb"),
                             s3_bucket="caller-bucket", s3_region="eu-central-1", extra=extra)
    silent = running.enqueue(url=files.url("/a.bin"), aggr_id="a", aggr_limit=1,
                             s3_bucket="caller-bucket", s3_region="eu-central-1", extra="not json")
    bad = running.enqueue(url=files.url("/a.bin"), aggr_id="a", aggr_limit=1, max_retries=2,
                          s3_bucket="caller-bucket", s3_region="eu-central-1", extra='{"bad name": 1}')
    assert finished(running, job_id)["callback_state"] == "delivered"
    assert finished(running, silent, callback=False)["state"] == "succeeded"  # no callback needed
    record = finished(running, bad, callback=False)
    assert (record["state"], record["attempts"], record["error"]) == \
        ("failed", 1, "extra: 'bad name' cannot be an S3 metadata name")

    head = client.head_object(Bucket="caller-bucket", Key=key(job_id))
    assert head["Metadata"] == {"sku": "42", "name": "=?UTF-8?B?Y2Fmw6k=?=", "tags": '["a","b"]', "ok": "true",
                                "note": "plain"}
    assert client.head_object(Bucket="caller-bucket", Key=key(silent))["Metadata"] == {}
    [payload] = receiver.bodies()
    assert (payload["download_url"], payload["extra"]) == (f"{s3.url}/caller-bucket/{key(job_id)}", extra)
    assert not (tmp_path / "files" / job_id[:3]).exists()

    # Reaped: the job is forgotten, the object stays in the caller's bucket.
    wait_until(lambda: running.get(f"/jobs/{job_id}").status_code == 404, timeout=10)
    assert client.get_object(Bucket="caller-bucket", Key=key(job_id))["Body"].read() == b"the caller's file"


def test_a_missing_callers_bucket_fails_the_job_without_retry(run_service, s3, files, receiver, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.url)
    files.add("/a.bin", b"data")
    running = run_service()
    job_id = running.enqueue(url=files.url("/a.bin"), aggr_id="a", aggr_limit=1, callback_url=receiver.url("/cb"),
                             s3_bucket="no-such-bucket", s3_region=REGION, max_retries=3)
    record = finished(running, job_id)
    error = (f"cannot store s3://no-such-bucket/{key(job_id)}: NoSuchBucket (404): "
             "The specified bucket does not exist")
    assert (record["state"], record["attempts"], record["error"]) == ("failed", 1, error)
    assert [(e["outcome"], e["phase"]) for e in record["attempts_log"] if e["kind"] == "download"] == \
        [("failed", "storage")]
    [payload] = receiver.bodies()
    assert (payload["success"], payload["error"], payload["download_url"]) == (False, error, "")


def test_a_missing_bucket_of_ours_stops_the_processor_at_startup(run_service, s3):
    with pytest.raises(StartupError, match=r"^processor\.filestorage\.bucket: bucket nope: HTTP 404"):
        run_service(("processor",), processor={"filestorage": our_bucket(s3, "nope")})


def test_deleting_an_object_that_is_gone_says_true_as_s3_cannot_tell(s3):
    s3.create_bucket(BUCKET)
    storage = storages(endpoint_url=s3.url).default
    storage.store_bytes(b"doomed", a_job())
    assert (storage.delete("6QEywYsd0jrKAg"), storage.delete("6QEywYsd0jrKAg")) == (True, True)
    assert storage.delete("neverStored123") is True


def test_a_missing_bucket_of_ours_is_a_permanent_internal_storage_error(s3):
    storage = storages(endpoint_url=s3.url, bucket="nope").default
    with pytest.raises(S3StorageError) as info:
        storage.store_bytes(b"data", a_job())
    assert (str(info.value), info.value.retriable, info.value.internal) == (
        "cannot store s3://nope/6QE/6QEywYsd0jrKAg: NoSuchBucket (404): The specified bucket does not exist",
        False, True)


def test_objects_are_served_by_s3_not_opened_through_gdl(s3):
    s3.create_bucket(BUCKET)
    storage = storages(endpoint_url=s3.url).default
    storage.store_bytes(b"in the bucket", a_job())
    assert (storage.exists("6QEywYsd0jrKAg"), storage.open("6QEywYsd0jrKAg")) == (True, None)


class FlakyS3:
    """A loopback proxy to moto that answers 503 SlowDown-style to the first ``fail`` PUTs."""

    def __init__(self, target: str, fail: int = 1):
        self.target = target
        self.fail = fail
        self.puts = 0
        self.session = requests.Session()
        self.server = make_server(("127.0.0.1", 0), self.app, log=None, error_log=None)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def app(self, environ: dict, start_response: Any) -> list[bytes]:
        method = environ["REQUEST_METHOD"]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        if method == "PUT":
            self.puts += 1
            if self.puts <= self.fail:
                error = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>ServiceUnavailable</Code>"
                         b"<Message>Please reduce your request rate.</Message></Error>")
                start_response("503 Service Unavailable", [("Content-Type", "application/xml"),
                                                           ("Content-Length", str(len(error)))])
                return [error]
        headers = {name[5:].replace("_", "-").title(): value for name, value in environ.items()
                   if name.startswith("HTTP_") and name not in ("HTTP_HOST", "HTTP_CONNECTION", "HTTP_EXPECT")}
        if environ.get("CONTENT_TYPE"):
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        query = environ.get("QUERY_STRING")
        url = self.target + environ["PATH_INFO"] + (f"?{query}" if query else "")
        answer = self.session.request(method, url, data=body, headers=headers, timeout=10)
        drop = {"connection", "transfer-encoding", "content-length", "content-encoding", "keep-alive"}
        out = [(k, v) for k, v in answer.headers.items() if k.lower() not in drop]
        start_response(f"{answer.status_code} {answer.reason}", out + [("Content-Length", str(len(answer.content)))])
        return [answer.content]

    def stop(self) -> None:
        self.server.stop(timeout=1)
        self.session.close()


def test_a_5xx_from_our_bucket_is_retried_without_counting_an_attempt(run_service, s3, files, receiver,
                                                                      monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # boto3 tries once: the retry shown is gdl's
    client = s3.create_bucket(BUCKET)
    flaky = FlakyS3(s3.url, fail=1)
    try:
        files.add("/a.bin", b"after a 503")
        storage = {**our_bucket(s3), "endpoint_url": flaky.url}
        running = run_service(processor={"filestorage": storage})  # make_config's download_url: explicit
        job_id = running.enqueue(url=files.url("/a.bin"), aggr_id="a", aggr_limit=1,
                                 callback_url=receiver.url("/cb"), max_retries=0)
        record = finished(running, job_id)
    finally:
        flaky.stop()
    assert (record["state"], record["attempts"], flaky.puts) == ("succeeded", 1, 2)
    downloads = [e for e in record["attempts_log"] if e["kind"] == "download"]
    assert [e["outcome"] for e in downloads] == ["retry", "succeeded"]
    assert downloads[0]["error"] == (f"cannot store s3://{BUCKET}/{key(job_id)}: ServiceUnavailable (503): "
                                     "Please reduce your request rate.")
    assert client.get_object(Bucket=BUCKET, Key=key(job_id))["Body"].read() == b"after a 503"
    [payload] = receiver.bodies()
    # processor.download_url set by the operator (make_config's) wins over the object's URL.
    assert payload["download_url"] == f"http://files.test/files/{key(job_id)}"


# --------------------------------------------------------------------------- a large file, memory flat

LARGE_MIB = 256
BLOCK = hashlib.sha256(b"gdl").digest() * 2048  # 64 KiB, not all zeros


class LargeFile:
    """Serves ``/large`` of ``LARGE_MIB`` MiB, generated as it is sent."""

    def __init__(self) -> None:
        self.size = LARGE_MIB * 1024 * 1024
        self.server = make_server(("127.0.0.1", 0), self.app, log=None, error_log=None)
        self.server.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def app(self, environ: dict, start_response: Any) -> Any:
        size = self.size if environ["PATH_INFO"] == "/large" else len(BLOCK)
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))])
        return (BLOCK for _ in range(size // len(BLOCK)))

    def stop(self) -> None:
        self.server.stop(timeout=1)


def peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1))


def test_a_large_file_goes_up_in_parts_with_flat_memory(run_service, s3, make_cfg, gdl_process, tmp_path):
    client = s3.create_bucket(BUCKET)
    large = LargeFile()
    try:
        api = run_service(("api",))
        cfg = make_cfg(processor={"filestorage": our_bucket(s3), "download_timeout": 120})
        processor = gdl_process(config_file(tmp_path, cfg, "processor.yaml"), "processor")
        # A small file first, so that boto3 and its clients are loaded before the measure starts.
        # No notifier runs: the callbacks stay queued.
        warm = api.enqueue(url=large.url("/small"), aggr_id="big", aggr_limit=1, callback_url=large.url("/cb"))
        wait_until(lambda: api.get(f"/jobs/{warm}").json()["state"] == "succeeded", timeout=30)
        before = peak_rss_kib(processor.process.pid)
        job_id = api.enqueue(url=large.url("/large"), aggr_id="big", aggr_limit=1, callback_url=large.url("/cb"))
        started = time.monotonic()
        record = wait_until(lambda: (r := api.get(f"/jobs/{job_id}").json())["state"] != "queued"
                            and r["state"] != "in_flight" and r, timeout=120, interval=0.2)
        after = peak_rss_kib(processor.process.pid)
        took = time.monotonic() - started
    finally:
        large.stop()
    assert (record["state"], record["bytes"], record["attempts"]) == ("succeeded", large.size, 1), processor.output()
    # The upload never blocked the hub: the keeper renewed the 3 s leases throughout.
    assert "lease lost" not in processor.output() and "put back" not in processor.output()
    head = client.head_object(Bucket=BUCKET, Key=key(job_id))
    parts = large.size // S3_MULTIPART_CHUNKSIZE
    assert (head["ContentLength"], head["ETag"].strip('"').split("-")[1]) == (large.size, str(parts))
    tail = client.get_object(Bucket=BUCKET, Key=key(job_id), Range=f"bytes={large.size - 100}-")["Body"].read()
    assert tail == BLOCK[-100:]
    growth_mib = (after - before) / 1024
    print(f"{LARGE_MIB} MiB in {took:.1f}s; peak RSS {before // 1024} -> {after // 1024} MiB")
    assert growth_mib < LARGE_MIB / 4, f"peak RSS grew {growth_mib:.0f} MiB for a {LARGE_MIB} MiB file"


# --------------------------------------------------------------------------- choices, no server


def a_job(**fields: Any) -> Job:
    return Job(id="6QEywYsd0jrKAg", url="http://example.com/a", aggr_id="a", aggr_limit=1, **fields)


def storages(download_url: str = DEFAULT_DOWNLOAD_URL, **filestorage: Any) -> FileStorages:
    settings = {"type": "s3", "bucket": BUCKET, "region": REGION, **filestorage}
    cfg = dataclasses.replace(Config(), processor=ProcessorConfig(filestorage=settings, download_url=download_url))
    return FileStorages.from_config(cfg)


def test_urls_in_callbacks(s3, tmp_path) -> None:
    path = "6QE/6QEywYsd0jrKAg"
    aws = storages()
    assert aws.url_for(a_job()) == f"https://{BUCKET}.s3.{REGION}.amazonaws.com/{path}"
    assert aws.url_for(a_job(s3_bucket="their.bucket", s3_region="us-west-2")) == \
        f"https://s3.us-west-2.amazonaws.com/their.bucket/{path}"  # dotted names: path-style
    assert storages("https://cdn.example/f/").url_for(a_job()) == f"https://cdn.example/f/{path}"
    assert storages(endpoint_url="http://minio:9000").url_for(a_job(s3_bucket="theirs", s3_region="x-1")) == \
        f"http://minio:9000/theirs/{path}"  # the callers' buckets live on our endpoint too
    local = FileStorages(FilesystemStorage(str(tmp_path)), download_url="http://gdl/files")
    assert local.url_for(a_job()) == f"http://gdl/files/{path}"


def test_who_owns_what(tmp_path) -> None:
    chosen = storages(endpoint_url="http://minio:9000")
    ours, theirs = chosen.for_job(a_job()), chosen.for_job(a_job(s3_bucket="theirs", s3_region="x-1"))
    assert (ours.owned, ours.bucket, theirs.owned, theirs.bucket, theirs.region) == \
        (True, BUCKET, False, "theirs", "x-1")
    assert chosen.for_job(None) is chosen.default  # a job whose record is gone: ours
    assert theirs.client is chosen.for_job(a_job(s3_bucket="other", s3_region="x-1")).client  # one client


def test_extra_as_metadata() -> None:
    theirs = storages().for_job(a_job(s3_bucket="theirs", s3_region="x-1"))
    # A control character (or any non-ASCII) is RFC 2047 encoded, as S3 expects.
    assert theirs.metadata(a_job(extra='{"a": "b\\nc", "n": null}')) == {"a": "=?UTF-8?B?Ygpj?=", "n": "null"}
    assert theirs.metadata(a_job(extra='["not", "an", "object"]')) == {}
    with pytest.raises(S3StorageError) as info:
        theirs.metadata(a_job(extra='{"bad name": 1}'))
    assert (str(info.value), info.value.retriable, info.value.internal) == \
        ("extra: 'bad name' cannot be an S3 metadata name", False, False)


def test_uploads_send_checksum_sha256_and_s3_checks_it(s3, tmp_path):
    s3.create_bucket(BUCKET)
    storage = storages(endpoint_url=s3.url).default
    data = b"checked by S3" * 1000
    sha256 = hashlib.sha256(data).hexdigest()
    storage.store_bytes(data, a_job(), sha256=sha256)
    head = s3.client().head_object(Bucket=BUCKET, Key=key("6QEywYsd0jrKAg"), ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(data).digest()).decode()
    temp = tmp_path / "temp"
    temp.write_bytes(data)  # the same through the file path
    storage.store(str(temp), dataclasses.replace(a_job(), id="fromAFileAbcde"), sha256=sha256)
    head = s3.client().head_object(Bucket=BUCKET, Key=key("fromAFileAbcde"), ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(data).digest()).decode()
    # (moto keeps the checksum sent but does not check it against the bytes, as S3 does: not shown here.)


def test_a_reused_result_is_a_server_side_copy_in_our_bucket(run_service, s3, files, receiver):
    """Reuse (issue 20) on S3: the second job's object is a CopyObject of the first's, its
    mime type checked on a ranged read of it; each object is deleted on its own."""
    client = s3.create_bucket(BUCKET)
    body = bytes(range(256)) * 400
    files.add("/a.bin", body, headers={"ETag": '"v1"'})
    running = run_service(processor={"filestorage": our_bucket(s3)})

    def enqueue() -> str:
        return running.enqueue(url=files.url("/a.bin"), aggr_id="a", aggr_limit=1, callback_url=receiver.url("/cb"),
                               reuse_ttl=3600, mime_type="image/*")  # these bytes sniff as image/x-tga

    first = finished(running, enqueue())
    second = finished(running, enqueue())
    assert (files.count("/a.bin"), second["state"], second["reused"], second["attempts"], second["error"]) == \
        (1, "succeeded", True, 0, "")
    client.delete_object(Bucket=BUCKET, Key=key(first["id"]))
    assert client.get_object(Bucket=BUCKET, Key=key(second["id"]))["Body"].read() == body
