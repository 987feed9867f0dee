"""Submitting at scale: ``Idempotency-Key`` on ``POST /download`` and
``POST /download/batch``, against a real Redis, real loopback origins and,
where processes are the subject, real API processes."""

from __future__ import annotations

import json

import gevent
import gevent.pool
import pytest
import requests

from gdl import store as keys
from tests.conftest import free_port, make_config, wait_until
from tests.origin import CountingOrigin

JOB = {"aggr_id": "idem", "aggr_limit": 2, "callback_url": "http://127.0.0.1:9/cb"}


def jobs_in_redis(store) -> set[str]:
    prefix = keys.job_key("")
    return {k[len(prefix):] for k in store.redis.keys(prefix + "*") if not k.endswith(keys.LOG_SUFFIX)}


def post(running, body, key: str | None = None, token: str | None = None) -> requests.Response:
    headers = {}
    if key is not None:
        headers["Idempotency-Key"] = key
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return running.post("/download", body, headers=headers)


# ---------------------------------------------------------------------- one key, POST /download

def test_the_same_key_twice_is_one_job_one_fetch_and_the_same_id(run_service, files, store):
    files.add("/a.bin", b"payload")
    running = run_service(("api", "processor"))
    body = {**JOB, "url": files.url("/a.bin")}
    first = post(running, body, key="order-17")
    wait_until(lambda: store.get_job(first.json()["id"]).status.state == "succeeded", timeout=10)
    again = post(running, body, key="order-17")
    assert (first.status_code, "Idempotent-Replayed" in first.headers) == (201, False)
    assert (again.status_code, again.headers["Idempotent-Replayed"]) == (201, "true")
    assert again.json() == {"id": first.json()["id"], "state": "succeeded"}
    assert jobs_in_redis(store) == {first.json()["id"]}
    assert files.count("/a.bin") == 1


def test_a_quoted_key_is_the_same_key_and_the_body_may_be_reordered(run_service, store):
    running = run_service(("api",))
    body = {**JOB, "url": "http://example.com/a"}
    first = post(running, body, key="abc").json()["id"]
    replay = post(running, dict(reversed(list(body.items()))), key='"abc"')
    assert (replay.status_code, replay.json()["id"]) == (201, first)
    assert jobs_in_redis(store) == {first}


def test_the_same_key_with_another_body_is_422_and_the_first_job_is_untouched(run_service, store):
    running = run_service(("api",))
    first = post(running, {**JOB, "url": "http://example.com/a"}, key="k1").json()["id"]
    other = post(running, {**JOB, "url": "http://example.com/b"}, key="k1")
    assert other.status_code == 422
    assert other.json()["error"] == (f"Idempotency-Key: already used with another request body (job {first}); "
                                     "a key is kept api.idempotency_ttl seconds")
    assert jobs_in_redis(store) == {first}
    assert store.get_job(first).url == "http://example.com/a"


def test_an_invalid_body_is_not_remembered_under_its_key(run_service, store):
    running = run_service(("api",))
    bad = post(running, {**JOB, "url": "ftp://example.com/a"}, key="k2")
    assert bad.status_code == 400 and bad.json()["error"].startswith("url: ")
    good = post(running, {**JOB, "url": "http://example.com/a"}, key="k2")
    assert good.status_code == 201 and "Idempotent-Replayed" not in good.headers
    assert jobs_in_redis(store) == {good.json()["id"]}


def test_keys_are_scoped_to_the_api_token(run_service, store):
    running = run_service(("api",), security={"api_tokens": ["token-one", "token-two"]})
    body = {**JOB, "url": "http://example.com/a"}
    one = post(running, body, key="shared", token="token-one").json()["id"]
    two = post(running, body, key="shared", token="token-two").json()["id"]
    assert one != two and jobs_in_redis(store) == {one, two}
    assert post(running, body, key="shared", token="token-one").json()["id"] == one
    assert not [k for k in store.redis.keys("*") if "token-one" in k]  # scoped by a digest, never the token


@pytest.mark.parametrize("key", ["", "a b", "x" * 256, "clé", '""'])
def test_a_malformed_key_is_a_400_naming_the_header(run_service, store, key):
    running = run_service(("api",))
    response = post(running, {**JOB, "url": "http://example.com/a"}, key=key)
    assert response.status_code == 400
    assert response.json()["error"].startswith("Idempotency-Key: must be 1 to 255 visible ASCII characters")
    assert jobs_in_redis(store) == set()


def test_a_key_is_kept_for_api_idempotency_ttl(run_service, store):
    running = run_service(("api",), api={"idempotency_ttl": 90})
    post(running, {**JOB, "url": "http://example.com/a"}, key="ttl")
    [record] = store.redis.keys(keys.PREFIX + "idem:*")
    assert 85_000 < store.redis.pttl(record) <= 90_000


def test_30_concurrent_posts_with_one_key_through_two_api_processes_make_one_job(tmp_path, redis_server, store,
                                                                                   gdl_process):
    ports = [free_port(), free_port()]
    for n, port in enumerate(ports):
        gdl_process(make_config(tmp_path, redis_server.url, api={"port": port}), "api", name=f"api{n}.yaml")
    session = requests.Session()
    for port in ports:
        wait_until(lambda port=port: _answers(session, f"http://127.0.0.1:{port}/hb"), timeout=15)
    data = json.dumps({**JOB, "url": "http://example.com/same"}).encode()

    def send(n: int) -> requests.Response:
        return requests.post(f"http://127.0.0.1:{ports[n % 2]}/download", data=data,
                             headers={"Idempotency-Key": "burst"}, timeout=10)

    answers = gevent.pool.Pool(30).map(send, range(30))
    assert {a.status_code for a in answers} == {201}
    ids = {a.json()["id"] for a in answers}
    assert len(ids) == 1 and jobs_in_redis(store) == ids
    assert sum(a.headers.get("Idempotent-Replayed") == "true" for a in answers) == 29


def _answers(session: requests.Session, url: str) -> bool:
    try:
        return session.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


# ---------------------------------------------------------------------- POST /download/batch

def test_a_batch_of_1000_mixed_items_answers_each_in_order(run_service, store):
    running = run_service(("api",))
    items: list = []
    for i in range(1000):
        job = {**JOB, "url": f"http://example.com/{i}"}
        if i % 10 == 3:
            job.pop("url")  # invalid
        elif i % 10 == 7:
            job = ["not", "an", "object"]
        elif i % 10 == 5:
            job = {**items[i - 1], "idempotency_key": f"dup-{i}"}  # i - 1 ends in 4: a plain valid job
        items.append(job)
    items[4]["idempotency_key"] = "twice"
    items[14]["idempotency_key"] = "twice"  # same key, another url: 422
    items[24] = {**items[4]}  # same key, same body: a replay of item 4
    response = running.post("/download/batch", {"jobs": items})
    assert response.status_code == 200
    results = response.json()["jobs"]
    assert [r["index"] for r in results] == list(range(1000))
    expected = [400 if i % 10 in (3, 7) else 201 for i in range(1000)]
    expected[14] = 422
    assert [r["status"] for r in results] == expected
    assert results[3]["error"] == "url: is required"
    assert results[7]["error"] == "job: must be a JSON object"
    assert results[14]["error"].startswith(f"Idempotency-Key: already used with another request body "
                                           f"(job {results[4]['id']})")
    assert (results[24]["id"], results[24]["replayed"]) == (results[4]["id"], True)
    created = {r["id"] for r in results if r["status"] == 201}
    assert len(created) == 800 - 1 - 1 and jobs_in_redis(store) == created  # less the 422 and the replay


def test_more_jobs_than_the_limit_is_413_and_nothing_is_enqueued(run_service, store):
    running = run_service(("api",), api={"batch_max_jobs": 1000})
    response = running.post("/download/batch", {"jobs": [{**JOB, "url": "http://example.com/a"}] * 1001})
    assert response.status_code == 413
    assert response.json() == {"error": "jobs: 1001 jobs, more than api.batch_max_jobs (1000); nothing enqueued"}
    assert jobs_in_redis(store) == set()


def test_a_batch_body_over_max_body_bytes_is_413(run_service, store):
    running = run_service(("api",), api={"max_body_bytes": 10_000})
    response = running.post("/download/batch", {"jobs": [{**JOB, "url": "http://example.com/a"}] * 200})
    assert (response.status_code, response.json()) == (413, {"error": "body larger than 10000 bytes"})
    assert jobs_in_redis(store) == set()


@pytest.mark.parametrize("body", [[], {"jobs": {}}, {"no": "jobs"}])
def test_a_batch_without_a_list_of_jobs_is_400(run_service, body):
    running = run_service(("api",))
    response = running.post("/download/batch", body)
    assert (response.status_code, response.json()) == (400, {"error": "jobs: must be a list of jobs"})


def test_a_batch_spanning_50_aggregations_respects_every_limit(run_service, store):
    origin = CountingOrigin(duration=0.2, notice_disconnect=False)
    try:
        running = run_service(("api", "processor"))
        limits = {f"b{i}": 1 + i % 3 for i in range(50)}
        items = [{"url": origin.url(f"/{aggr}/{n}"), "aggr_id": aggr, "aggr_limit": limit,
                  "callback_url": "http://127.0.0.1:9/cb"} for aggr, limit in limits.items() for n in range(4)]
        results = running.post("/download/batch", {"jobs": items}).json()["jobs"]
        ids = [r["id"] for r in results]
        assert len(ids) == 200
        wait_until(lambda: all(store.get_job(i).status.state == "succeeded" for i in ids), timeout=60)
        assert origin.over(limits) == {}
        assert sum(origin.completed.values()) == 200
    finally:
        origin.stop()
