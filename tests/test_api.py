"""The HTTP API over real loopback HTTP, on the test Redis: every route, every
kind of refusal, and that a refused request leaves Redis untouched."""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from gdl import store as keys
from gdl.job import is_valid_id
from gdl.store import Store
from tests.conftest import RedisServer, make_config

JOB = {
    "url": "http://example.com/a.png",
    "aggr_id": "shop1",
    "aggr_limit": 3,
    "callback_type": "http",
    "callback_dst": "http://cb.example.com/done",
}
ONE_MIB = 1 << 20


@pytest.fixture
def api(run_service, store: Store):
    """An API-only service on the (emptied) test Redis."""
    return run_service(roles=("api",))


def nothing_enqueued(store: Store) -> bool:
    return (store.redis.keys(keys.PREFIX + "job:*") == [] and store.redis.keys(keys.PREFIX + "queue:*") == []
            and store.redis.keys(keys.PREFIX + "aggr:*") == [] and store.redis.zcard(keys.DUE_INDEX) == 0)


def assert_error(response: requests.Response, status: int, starts: str = "") -> str:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert isinstance(error, str) and error
    assert error.startswith(starts), error
    return error


# --------------------------------------------------------------------------- POST /download

def test_enqueue_answers_201_with_an_id(api, store: Store) -> None:
    response = api.post("/download", JOB)
    assert response.status_code == 201, response.text
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert list(body) == ["id"]
    assert is_valid_id(body["id"])


def test_enqueued_job_is_queued_with_its_fields(api) -> None:
    fields = {**JOB, "extra": "opaque", "mime_type": "image/*", "max_retries": 4, "extract_image_size": True,
              "download_timeout": 30, "request_headers": {"X-A": "b"}, "aggr_proxy": "http://proxy:3128",
              "ignored_field": [1, 2]}
    job_id = api.enqueue(**fields)
    response = api.get(f"/jobs/{job_id}")
    assert response.status_code == 200
    job = response.json()
    assert job["id"] == job_id
    assert job["state"] == "queued"
    assert (job["attempts"], job["error"], job["response_code"], job["bytes"]) == (0, "", 0, 0)
    assert job["callback_state"] == ""
    assert job["attempts_log"] == []
    for name, value in fields.items():
        if name != "ignored_field":
            assert job[name] == value, name
    assert "ignored_field" not in job


def test_enqueue_is_one_atomic_write(api, store: Store) -> None:
    before = keys.now_ms()
    job_id = api.enqueue(**{**JOB, "aggr_proxy": "http://proxy:3128"})
    assert store.redis.hget(keys.job_key(job_id), "state") == "queued"
    assert store.redis.hget(keys.job_key(job_id), "url") == JOB["url"]
    assert store.redis.hgetall(keys.aggr_key("shop1")) == {"limit": "3", "proxy": "http://proxy:3128"}
    due = store.redis.zscore(keys.queue_key("shop1"), job_id)
    assert due is not None and before <= due <= keys.now_ms()
    assert store.redis.zscore(keys.DUE_INDEX, "shop1") == due


def test_dashboard_counts_pending_jobs_per_aggregation(api) -> None:
    assert api.get("/dashboard/aggregations").json() == []
    for _ in range(3):
        api.enqueue(**JOB)
    api.enqueue(**{**JOB, "aggr_id": "shop2", "aggr_limit": 1})
    response = api.get("/dashboard/aggregations")
    assert response.status_code == 200
    assert sorted(response.json(), key=lambda a: a["name"]) == [
        {"name": "jobs:shop1", "size": 3}, {"name": "jobs:shop2", "size": 1}]


BAD_BODIES = [
    ({k: v for k, v in JOB.items() if k != "url"}, "url"),
    ({**JOB, "url": "ftp://example.com/a.png"}, "url"),
    ({**JOB, "url": "not a url"}, "url"),
    ({**JOB, "aggr_id": 5}, "aggr_id"),
    ({**JOB, "aggr_limit": "3"}, "aggr_limit"),
    ({**JOB, "aggr_limit": 0}, "aggr_limit"),
    ({**JOB, "aggr_limit": 1.5}, "aggr_limit"),
    ({**JOB, "callback_type": "smtp"}, "callback_type"),
    ({k: v for k, v in JOB.items() if k != "callback_dst"}, "callback_dst"),
    ({**JOB, "mime_type": "image"}, "mime_type"),
    ({**JOB, "request_headers": {"Host": "evil"}}, "request_headers"),
    ({**JOB, "request_headers": {"X-A": "a\r\nb"}}, "request_headers"),
    ({**JOB, "s3_bucket": "b-1"}, "s3_region"),
    ({**JOB, "extract_image_size": "yes"}, "extract_image_size"),
    # JSON null is not "absent" (the Go service refuses it too): a field is left out or of its type
    *[({**JOB, name: None}, name) for name in (
        "aggr_proxy", "max_retries", "extract_image_size", "download_timeout", "request_headers", "extra",
        "mime_type", "s3_bucket", "s3_region", "callback_url", "callback_type", "callback_dst", "url", "aggr_id",
        "aggr_limit")],
]


@pytest.mark.parametrize(("body", "field"), BAD_BODIES, ids=[f for _, f in BAD_BODIES])
def test_bad_field_is_400_naming_it_and_enqueues_nothing(api, store: Store, body: dict, field: str) -> None:
    assert_error(api.post("/download", body), 400, f"{field}: ")
    assert nothing_enqueued(store)


@pytest.mark.parametrize(("data", "starts"), [
    (b"{not json", "body: "),
    (b"", "body: "),
    (b"\xff\xfe{}", "body: "),
    (b"[]", "body: "),
    (json.dumps([JOB]).encode(), "body: "),
    (b'"a string"', "body: "),
    (b"null", "body: "),
    (json.dumps(JOB).replace('"aggr_limit": 3', '"aggr_limit": Infinity').encode(), "aggr_limit: "),
    (json.dumps(JOB).replace('"aggr_limit": 3', '"aggr_limit": NaN').encode(), "aggr_limit: "),
])
def test_body_not_a_json_object_is_400(api, store: Store, data: bytes, starts: str) -> None:
    assert_error(api.post("/download", data, headers={"Content-Type": "application/json"}), 400, starts)
    assert nothing_enqueued(store)


def _big_body() -> bytes:
    return json.dumps({**JOB, "extra": "x" * ONE_MIB}).encode()


def _chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def test_body_over_one_mib_with_content_length_is_413(api, store: Store) -> None:
    response = requests.post(api.url("/download"), data=_big_body(), timeout=10)
    assert "Content-Length" in response.request.headers
    assert_error(response, 413)
    assert nothing_enqueued(store)


def test_body_over_one_mib_chunked_is_413(api, store: Store) -> None:
    response = requests.post(api.url("/download"), data=_chunks(_big_body()), timeout=10)
    assert response.request.headers.get("Transfer-Encoding") == "chunked"
    assert_error(response, 413)
    assert nothing_enqueued(store)


def test_body_just_under_the_limit_is_accepted(api) -> None:
    body = json.dumps({**JOB, "extra": ""}).encode()
    body = json.dumps({**JOB, "extra": "x" * (ONE_MIB - len(body))}).encode()
    assert len(body) == ONE_MIB
    response = requests.post(api.url("/download"), data=_chunks(body), timeout=10)
    assert response.status_code == 400  # extra is longer than 64 KiB: read whole, then refused by field
    assert response.json()["error"].startswith("extra: ")


def test_chunked_small_body_is_accepted(api) -> None:
    response = requests.post(api.url("/download"), data=_chunks(json.dumps(JOB).encode(), 16), timeout=10)
    assert response.request.headers.get("Transfer-Encoding") == "chunked"
    assert response.status_code == 201, response.text


# --------------------------------------------------------------------------- reads

def test_heartbeat_follows_the_heartbeat_file(api) -> None:
    response = api.get("/hb")
    assert (response.status_code, response.text) == (200, "OK")
    path = Path(api.service.cfg.api.heartbeat_path)
    path.write_text("")
    try:
        assert api.get("/hb").status_code == 503
    finally:
        path.unlink()
    assert api.get("/hb").status_code == 200


@pytest.mark.parametrize("job_id", ["short", "a" * 15, "AbCdEfGhIjKl-n", "AbCdEfGhIjKlMn%0A"])
def test_job_with_a_malformed_id_is_404(api, job_id: str) -> None:
    assert_error(api.get(f"/jobs/{job_id}"), 404)


def test_unknown_job_is_404(api) -> None:
    assert_error(api.get("/jobs/AbCdEfGhIjKlMn"), 404)


def test_retry_of_unknown_or_malformed_job_is_400(api) -> None:
    assert_error(api.post("/retry/AbCdEfGhIjKlMn"), 400)
    assert_error(api.post("/retry/not-an-id"), 400)


def test_retry_with_an_empty_id_is_400(api) -> None:
    assert assert_error(api.post("/retry/"), 400) == "job id: missing (POST /retry/<job id>)"


def test_null_is_refused_naming_its_type(api, store: Store) -> None:
    error = assert_error(api.post("/download", {**JOB, "max_retries": None}), 400, "max_retries: ")
    assert error == "max_retries: must be an integer, not null (leave the field out instead)"
    assert nothing_enqueued(store)


def test_retry_of_a_job_whose_callback_has_not_failed_is_400(api, store: Store) -> None:
    job_id = api.enqueue(**JOB)
    assert "not failed" in assert_error(api.post(f"/retry/{job_id}"), 400)
    assert store.redis.zcard(keys.CALLBACK_QUEUE) == 0
    assert store.redis.hget(keys.job_key(job_id), "state") == "queued"


def test_stats_without_reports_are_404(api) -> None:
    assert_error(api.get("/stats/processor"), 404)
    assert_error(api.get("/stats/notifier"), 404)
    assert_error(api.get("/stats/scanner"), 404)


def test_metrics(api) -> None:
    api.enqueue(**JOB)
    api.enqueue(**{**JOB, "aggr_id": "shop2"})
    response = api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    lines = response.text.splitlines()
    assert "# TYPE gdl_queue_depth gauge" in lines
    assert 'gdl_queue_depth{queue="aggregations_pending"} 2.0' in lines
    assert 'gdl_queue_depth{queue="downloads_in_flight"} 0.0' in lines


def test_index_page(api) -> None:
    response = api.get("/")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    assert "<h1>gdl 0.1.0</h1>" in response.text


# --------------------------------------------------------------------------- files

def write_file(running, job_id: str, data: bytes) -> Path:
    path = Path(running.service.cfg.processor.filestorage["rootdir"]) / job_id[:3] / job_id
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_stored_file_is_served(api) -> None:
    data = bytes(range(256)) * 1000
    write_file(api, "Fil3Abcdefghij", data)
    response = api.get("/files/Fil/Fil3Abcdefghij")
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["Content-Length"] == str(len(data))


def test_missing_file_is_404(api) -> None:
    write_file(api, "Fil3Abcdefghij", b"x")
    assert_error(api.get("/files/Fil/Fil3Abcdefghik"), 404)
    assert_error(api.get("/files/Fix/Fil3Abcdefghij"), 404)  # prefix not the id's


@pytest.mark.parametrize("path", [
    "/files/../secret",
    "/files/..%2F..%2Fsecret",
    "/files/Fil/..%2F..%2Fsecret",
    "/files/Fil/../../secret",
    "/files/%2E%2E/secret",
    "/files/..%2Fsecret/Fil3Abcdefghij",
    "/files/sec/..%2Fsecret",
    "/files//secret",
    "/files/Fil/Fil3Abcdefghij%0A",
    "/jobs/..%2F..%2Fsecret",
    "/jobs/../../secret",
    "/jobs/%2E%2E%2Fsecret",
])
def test_path_traversal_is_404(api, path: str) -> None:
    rootdir = Path(api.service.cfg.processor.filestorage["rootdir"])
    (rootdir.parent / "secret").write_bytes(b"TOP SECRET")
    write_file(api, "Fil3Abcdefghij", b"x")
    status, body = api.raw("GET", path)
    assert status == 404
    assert b"TOP SECRET" not in body
    assert "error" in json.loads(body)


# --------------------------------------------------------------------------- routing and auth

def test_unknown_path_is_404_json(api) -> None:
    assert "/nope" in assert_error(api.get("/nope"), 404)
    assert_error(api.post("/downloads", JOB), 404)


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("GET", "/download", "POST"), ("PUT", "/download", "POST"), ("POST", "/hb", "GET, HEAD"),
    ("PUT", "/jobs/AbCdEfGhIjKlMn", "DELETE, GET, HEAD"), ("GET", "/retry/AbCdEfGhIjKlMn", "POST"),
    ("POST", "/metrics", "GET, HEAD"),
])
def test_wrong_method_is_405(api, method: str, path: str, allow: str) -> None:
    response = api.http.request(method, api.url(path))
    assert_error(response, 405)
    assert response.headers["Allow"] == allow


def test_tokens_guard_posts_only(run_service, store: Store) -> None:
    api = run_service(roles=("api",), security={"api_tokens": ["s3cret", "other"]})
    assert_error(api.post("/download", JOB), 401)
    assert_error(api.post("/download", JOB, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(api.post("/download", JOB, headers={"Authorization": "Basic czNjcmV0"}), 401)
    assert_error(api.post("/download", JOB, headers={"Authorization": "s3cret"}), 401)
    assert_error(api.post("/retry/AbCdEfGhIjKlMn"), 401)
    assert nothing_enqueued(store)
    response = api.post("/download", JOB, headers={"Authorization": "Bearer s3cret"})
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    assert api.post("/download", JOB, headers={"Authorization": "bearer other"}).status_code == 201
    assert api.get("/hb").status_code == 200
    assert api.get(f"/jobs/{job_id}").status_code == 200
    assert api.get("/dashboard/aggregations").json() == [{"name": "jobs:shop1", "size": 2}]


def test_redis_down_is_503_json(run_service, tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis2").start()
    try:
        api = run_service(roles=("api",), cfg=make_config(tmp_path, server.url))
        job_id = api.enqueue(**JOB)
        server.stop()
        assert "unavailable" in assert_error(api.post("/download", JOB), 503)
        assert_error(api.get(f"/jobs/{job_id}"), 503)
        assert_error(api.get("/dashboard/aggregations"), 503)
        assert_error(api.get("/metrics"), 503)
        assert api.get("/hb").status_code == 200  # the heartbeat does not need Redis
    finally:
        server.stop()
