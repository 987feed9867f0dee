"""The notifier in this process: callbacks delivered, retried, re-delivered, then reaped."""

from __future__ import annotations

from tests.conftest import wait_until
from tests.samples import image_bytes

BASE = "http://files.test/files"  # processor.download_url in make_config
# The Go service's callback struct, field by field with its JSON type, in its order.
GO_FIELDS = {"success": bool, "error": str, "extra": str, "resource_url": str, "download_url": str,
             "job_id": str, "response_code": int, "delivered": bool, "delivery_error": str, "image_size": str}
RESULT_FIELDS = {"sha256", "size", "content_type", "final_url", "redirects", "etag", "last_modified", "attempts",
                 "resumed_bytes", "reused", "started_at", "finished_at", "timings"}


def callback_done(running, job_id: str) -> dict:
    def done():
        record = running.get(f"/jobs/{job_id}").json()
        return record if record["callback_state"] in ("delivered", "failed") else None
    return wait_until(done, timeout=15)


def test_success_payload_field_by_field(run_service, files, receiver):
    files.add("/a.png", image_bytes("PNG", 10, 7))
    running = run_service()
    extra = '{"sku": 42, "name": "caf\u00e9"}'
    job_id = running.enqueue(url=files.url("/a.png"), aggr_id="a", aggr_limit=1, callback_type="http",
                             callback_dst=receiver.url("/cb"), extra=extra, extract_image_size=True)
    record = callback_done(running, job_id)
    assert record["callback_state"] == "delivered"
    [body] = receiver.bodies()
    assert {name: body[name] for name in GO_FIELDS} == {
        "success": True, "error": "", "extra": extra, "resource_url": files.url("/a.png"),
        "download_url": f"{BASE}/{job_id[:3]}/{job_id}", "job_id": job_id, "response_code": 200,
        "delivered": True, "delivery_error": "", "image_size": "10x7",
    }
    assert set(body) == set(GO_FIELDS) | RESULT_FIELDS
    assert {name: type(body[name]) for name in GO_FIELDS} == GO_FIELDS  # the Go struct decodes it unchanged


def test_failure_payload(run_service, files, receiver):
    files.add("/missing", b"", status=404)
    running = run_service()
    job_id = running.enqueue(url=files.url("/missing"), aggr_id="a", aggr_limit=1,
                             callback_url=receiver.url("/cb"), extra="x")
    callback_done(running, job_id)
    [body] = receiver.bodies()
    assert (body["success"], body["response_code"], body["download_url"], body["delivered"]) == \
        (False, 404, "", True)
    assert body["error"] == "Received status code 404 Not Found"
    assert body["delivery_error"] == ""  # as in the Go service: these two describe the callback, not the download
    assert (body["job_id"], body["extra"], body["image_size"]) == (job_id, "x", "")


def test_500_twice_then_200_is_three_posts_and_delivered(run_service, files, receiver, engine):
    files.add("/a", b"data")
    receiver.answer("/cb", 500, 500)
    running = run_service(http={"engine": engine})
    job_id = running.enqueue(url=files.url("/a"), aggr_id="a", aggr_limit=1, callback_url=receiver.url("/cb"))
    record = callback_done(running, job_id)
    assert (record["callback_state"], record["callback_attempts"]) == ("delivered", 3)
    assert len(receiver.bodies()) == 3
    outcomes = [e["outcome"] for e in record["attempts_log"] if e["kind"] == "callback"]
    assert outcomes == ["retry", "retry", "delivered"]


def test_always_500_fails_then_retry_endpoint_redelivers(run_service, files, receiver):
    files.add("/a", b"data")
    receiver.answer("/cb", 500, 500, 500)
    running = run_service()
    job_id = running.enqueue(url=files.url("/a"), aggr_id="a", aggr_limit=1, callback_url=receiver.url("/cb"))
    record = callback_done(running, job_id)
    assert (record["callback_state"], record["callback_attempts"]) == ("failed", 3)
    assert "500" in record["callback_error"]
    assert len(receiver.bodies()) == 3
    assert running.post(f"/retry/{job_id}").status_code == 204
    record = wait_until(lambda: (r := running.get(f"/jobs/{job_id}").json())["callback_state"] == "delivered" and r)
    assert len(receiver.bodies()) == 4
    again = running.post(f"/retry/{job_id}")
    assert (again.status_code, again.json()["error"]) == (400, f"job {job_id}: callback has not failed")


def test_retry_of_an_unknown_job_is_400(run_service):
    running = run_service(("api",))
    response = running.post("/retry/AAAAAAAAAAAAAA")
    assert (response.status_code, response.json()["error"]) == (400, "job AAAAAAAAAAAAAA does not exist")


def test_file_and_job_are_reaped_after_deletion_interval(run_service, files, receiver, tmp_path):
    files.add("/a", b"data")
    running = run_service(notifier={"deletion_interval": 0.03})  # 1.8 s
    job_id = running.enqueue(url=files.url("/a"), aggr_id="a", aggr_limit=1, callback_url=receiver.url("/cb"))
    record = callback_done(running, job_id)
    path = tmp_path / "files" / job_id[:3] / job_id
    assert path.read_bytes() == b"data"
    delivered_at = record["delivered_at"]
    wait_until(lambda: not path.exists(), timeout=10)
    # The reaper deletes the file, then forgets the job: the record goes a moment later.
    wait_until(lambda: running.get(f"/jobs/{job_id}").status_code == 404, timeout=5)
    from gdl.store import now_ms
    assert now_ms() - delivered_at >= 1800


def test_each_callback_arrives_exactly_once(run_service, files, receiver):
    files.add("/a", b"data")
    running = run_service()
    ids = [running.enqueue(url=files.url("/a"), aggr_id=f"a{i % 5}", aggr_limit=3,
                           callback_url=receiver.url("/cb")) for i in range(60)]
    wait_until(lambda: len(receiver.bodies()) >= 60, timeout=20)
    by_job = receiver.by_job()
    assert sorted(by_job) == sorted(ids)
    assert {len(v) for v in by_job.values()} == {1}
    stats = wait_until(lambda: (s := running.get("/stats/notifier")).status_code == 200
                       and s.json().get("successful") == 60 and s.json())
    assert stats["successful"] == 60
    assert (stats["successfulCallbacks"], stats["failedCallbacks"]) == (60, 0)  # the Go service's names


def test_unconfigured_backend_fails_the_callback_with_a_reason(run_service, files):
    files.add("/a", b"data")
    running = run_service()
    job_id = running.enqueue(url=files.url("/a"), aggr_id="a", aggr_limit=1, callback_type="kafka",
                             callback_dst="downloads")
    record = callback_done(running, job_id)
    assert (record["callback_state"], record["callback_error"]) == \
        ("failed", "callback backend 'kafka' is not configured")
    assert record["callback_attempts"] == 1
    stats = wait_until(lambda: (s := running.get("/stats/notifier")).status_code == 200
                       and s.json().get("undefined_backend") and s.json())
    assert stats["undefined_backend"] == 1
    assert (stats["failedCallbacks"], stats["successfulCallbacks"]) == (1, 0)
