"""Reuse of a fresh result for the same request (issue 20, job field ``reuse_ttl``).

Unit tests of the request key first, then the service in this process with
a real Redis, a counting loopback origin and the filesystem storage (the S3
storage's server-side copy is in tests/test_s3.py).
"""

from __future__ import annotations

import hashlib
import os

import pytest

from gdl import reuse
from gdl.filestorage import FilesystemStorage
from gdl.job import Job
from gdl.store import rate_key, reuse_key
from tests.conftest import wait_until
from tests.test_resume import metric
from tests.test_verifiable import DATA

HOUR = 3600


def job(url: str, **fields) -> Job:
    return Job(id="j", url=url, aggr_id="a", aggr_limit=1, **fields)


# --------------------------------------------------------------------------- the request key, unit


def test_the_url_is_normalised_but_its_path_and_query_are_kept() -> None:
    assert reuse.normalise_url("HTTP://Example.COM:80/a/B?x=1&y=%41#frag") == "http://example.com/a/B?x=1&y=%41"
    assert reuse.normalise_url("https://e.com:8443") == "https://e.com:8443/"


def test_the_request_key_covers_url_headers_credentials_and_proxy() -> None:
    defaults = {"User-Agent": "gdl"}
    key = reuse.request_key(job("http://e.com/a"), defaults)
    assert key == reuse.request_key(job("HTTP://E.COM/a#x"), defaults)
    assert key == reuse.request_key(job("http://e.com/a", request_headers={"user-agent": "gdl"}), defaults)
    others = [job("http://e.com/a?v=2"), job("http://e.com/a", request_headers={"Authorization": "Bearer x"}),
              job("http://e.com/a", request_headers={"Cookie": "s=1"}), job("http://e.com/a", aggr_proxy="http://p:1")]
    assert len({key, *(reuse.request_key(other, defaults) for other in others)}) == 5
    assert key != reuse.request_key(job("http://e.com/a"), {"User-Agent": "other"})


# --------------------------------------------------------------------------- the service


def done(running, job_id: str) -> dict:
    return wait_until(lambda: (r := running.get(f"/jobs/{job_id}").json())["callback_state"] == "delivered" and r,
                      timeout=20)


def run_one(running, url: str, receiver, **fields) -> dict:
    job_id = running.enqueue(url=url, aggr_id="a", aggr_limit=1, callback_url=receiver.url("/cb"), **fields)
    return done(running, job_id)


def callback_of(receiver, job_id: str) -> dict:
    [body] = receiver.by_job()[job_id]
    return body


def test_two_jobs_within_the_ttl_make_one_origin_request(run_service, files, receiver, tmp_path) -> None:
    files.add("/a.bin", DATA, headers={"ETag": '"v1"', "Content-Type": "application/x-test"})
    running = run_service()
    first = run_one(running, files.url("/a.bin"), receiver, reuse_ttl=HOUR)
    second = run_one(running, files.url("/a.bin"), receiver, reuse_ttl=HOUR)
    assert files.count("/a.bin") == 1
    one, two = callback_of(receiver, first["id"]), callback_of(receiver, second["id"])
    assert one["sha256"] == two["sha256"] == hashlib.sha256(DATA).hexdigest()
    assert (one["success"], one["reused"], one["attempts"]) == (True, False, 1)
    assert (two["success"], two["reused"], two["attempts"], two["resumed_bytes"]) == (True, True, 0, 0)
    assert (two["size"], two["etag"], two["content_type"], two["response_code"]) == \
        (len(DATA), '"v1"', "application/x-test", 200)
    assert one["job_id"] != two["job_id"] and one["download_url"] != two["download_url"]
    root = FilesystemStorage(str(tmp_path / "files"))
    assert open(root.path_for(first["id"]), "rb").read() == open(root.path_for(second["id"]), "rb").read() == DATA
    assert (second["reused"], second["attempts"]) == (True, 0)  # GET /jobs says so too

    # Reaping one (what the reaper does to a job's file) leaves the other whole, both ways.
    assert root.delete(first["id"])
    assert open(root.path_for(second["id"]), "rb").read() == DATA
    third = run_one(running, files.url("/a.bin"), receiver, reuse_ttl=HOUR)  # the record names the newest copy
    assert (files.count("/a.bin"), third["reused"]) == (1, True)
    assert root.delete(second["id"]) and open(root.path_for(third["id"]), "rb").read() == DATA
    assert wait_until(lambda: metric(running, 'gdl_bytes_saved_total{reason="reused"}') == 2 * len(DATA))


@pytest.mark.parametrize(("first", "second"), [
    ({"request_headers": {"Authorization": "Bearer a"}}, {"request_headers": {"Authorization": "Bearer b"}}),
    ({}, {"reuse_ttl": 0}),
    ({}, {"aggr_proxy": "http://127.0.0.1:9"}),
], ids=["another-authorization", "no-reuse-ttl", "another-proxy"])
def test_another_request_is_downloaded_again(run_service, files, receiver, first, second) -> None:
    files.add("/a.bin", DATA, headers={"ETag": '"v1"'})
    running = run_service(security={"block_private_networks": False})
    run_one(running, files.url("/a.bin"), receiver, **{"reuse_ttl": HOUR, **first})
    if "aggr_proxy" in second:  # a proxy that is the origin itself: it answers the absolute-URI request
        second = {"aggr_proxy": files.base_url}
    later = run_one(running, files.url("/a.bin"), receiver, **{"reuse_ttl": HOUR, **second})
    assert (files.count("/a.bin"), later["reused"], later["attempts"]) == (2, False, 1)


def test_a_no_store_response_is_never_reused(run_service, files, receiver, store) -> None:
    files.add("/a.bin", DATA, headers={"ETag": '"v1"', "Cache-Control": "private, no-store"})
    running = run_service()
    run_one(running, files.url("/a.bin"), receiver, reuse_ttl=HOUR)
    later = run_one(running, files.url("/a.bin"), receiver, reuse_ttl=HOUR)
    assert (files.count("/a.bin"), later["reused"]) == (2, False)
    assert store.redis.keys(reuse_key("*")) == []


def test_a_failure_is_never_remembered(run_service, files, receiver, store) -> None:
    files.add("/a.bin", b"gone", status=404)
    running = run_service()
    failed = run_one(running, files.url("/a.bin"), receiver, reuse_ttl=HOUR)
    assert failed["state"] == "failed" and store.redis.keys(reuse_key("*")) == []


def age_records(store, seconds: int) -> None:
    """Make every reuse record ``seconds`` older (the origin answered that long ago)."""
    for key in store.redis.keys(reuse_key("*")):
        store.redis.hincrby(key, "stored_at", -seconds * 1000)


def test_past_the_ttl_one_conditional_request_and_a_304_reuses(run_service, files, receiver, store,
                                                              tmp_path) -> None:
    files.add("/a.bin", DATA, headers={"ETag": '"v1"'}, not_modified=True)
    running = run_service()
    first = run_one(running, files.url("/a.bin"), receiver, reuse_ttl=60)
    age_records(store, 61)
    later = run_one(running, files.url("/a.bin"), receiver, reuse_ttl=60)
    asked = files.requests_for("/a.bin")
    assert len(asked) == 2 and asked[1].headers["If-None-Match"] == '"v1"'
    assert "If-None-Match" not in asked[0].headers
    body = callback_of(receiver, later["id"])
    assert (body["success"], body["reused"], body["attempts"], body["response_code"]) == (True, True, 1, 200)
    assert body["sha256"] == callback_of(receiver, first["id"])["sha256"]
    assert (tmp_path / "files" / later["id"][:3] / later["id"]).read_bytes() == DATA
    # The 304 made the record fresh again: a third job within the TTL asks nothing.
    third = run_one(running, files.url("/a.bin"), receiver, reuse_ttl=60)
    assert (files.count("/a.bin"), third["reused"], third["attempts"]) == (2, True, 0)


def test_past_the_ttl_a_200_is_a_new_download(run_service, files, receiver, store) -> None:
    files.add("/a.bin", DATA, headers={"Last-Modified": "Sat, 05 Dec 2026 10:00:00 GMT"})
    running = run_service()
    run_one(running, files.url("/a.bin"), receiver, reuse_ttl=60)
    age_records(store, 61)
    later = run_one(running, files.url("/a.bin"), receiver, reuse_ttl=60)
    asked = files.requests_for("/a.bin")
    assert asked[1].headers["If-Modified-Since"] == "Sat, 05 Dec 2026 10:00:00 GMT"
    assert (len(asked), later["reused"], later["attempts"]) == (2, False, 1)


def test_a_reused_job_keeps_its_own_mime_check_and_image_size(run_service, files, receiver) -> None:
    from tests.samples import image_bytes

    png = image_bytes("PNG", 40, 30)
    files.add("/i.png", png, headers={"ETag": '"p"'})
    running = run_service()
    run_one(running, files.url("/i.png"), receiver, reuse_ttl=HOUR)
    sized = run_one(running, files.url("/i.png"), receiver, reuse_ttl=HOUR, extract_image_size=True,
                    mime_type="image/*")
    assert (sized["state"], sized["reused"], sized["image_size"]) == ("succeeded", True, "40x30")
    refused = run_one(running, files.url("/i.png"), receiver, reuse_ttl=HOUR, mime_type="text/*")
    assert refused["state"] == "failed" and "Expected mime-type" in refused["error"]
    assert files.count("/i.png") == 1


def test_a_gone_copy_means_a_download(run_service, files, receiver, tmp_path) -> None:
    files.add("/a.bin", DATA, headers={"ETag": '"v1"'})
    running = run_service()
    first = run_one(running, files.url("/a.bin"), receiver, reuse_ttl=HOUR)
    os.unlink(tmp_path / "files" / first["id"][:3] / first["id"])
    later = run_one(running, files.url("/a.bin"), receiver, reuse_ttl=HOUR)
    assert (files.count("/a.bin"), later["reused"], later["state"]) == (2, False, "succeeded")


@pytest.mark.parametrize(("value", "error"), [
    (HOUR * 24 * 8, "reuse_ttl: must be between 0 and 604800 (processor.reuse_max_ttl), got 691200"),
    (-1, "reuse_ttl: must be between 0 and 31536000, got -1"),
    ("1", "reuse_ttl: must be an integer, not a string"),
])
def test_a_bad_reuse_ttl_is_a_400_naming_it(run_service, value, error) -> None:
    running = run_service(("api",))
    response = running.post("/download", {"url": "http://e.com/a", "aggr_id": "a", "aggr_limit": 1,
                                          "callback_url": "http://e.com/cb", "reuse_ttl": value})
    assert (response.status_code, response.json()["error"]) == (400, error)


def test_jobs_answered_from_the_stored_copy_give_their_rate_start_back(run_service, files, receiver, store) -> None:
    """A rate counts requests to the origin: a reused job's take charges a start, and
    the pool gives it back (refund_start.lua), so the rate's clock ends idle."""
    files.add("/a.bin", DATA, headers={"ETag": '"v1"'})
    running = run_service()
    shaped = {"reuse_ttl": HOUR, "aggr_rate": 0.5, "aggr_burst": 1}  # one start every 2 s
    run_one(running, files.url("/a.bin"), receiver, **shaped)
    assert store.redis.get(rate_key("a")) is not None  # the download's start, charged
    ids = [running.enqueue(url=files.url("/a.bin"), aggr_id="a", aggr_limit=1, callback_url=receiver.url("/cb"),
                           **shaped) for _ in range(4)]
    reused = [done(running, job_id) for job_id in ids]
    assert [(r["reused"], r["attempts"]) for r in reused] == [(True, 0)] * 4
    assert files.count("/a.bin") == 1
    # Charged and not given back, the four starts would hold the GCRA time 8 s ahead.
    assert store.redis.get(rate_key("a")) is None
