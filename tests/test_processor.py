"""The processor end to end in this process: API -> Redis -> scanner -> pool -> file.

Real Redis, real loopback HTTP servers; the notifier role is left out so
each job's final state can be read before anything reaps it.
"""

from __future__ import annotations

import os
from pathlib import Path

import gevent
import pytest

from gdl import store as keys
from gdl.diskcheck import DiskChecker
from gdl.errors import HTTPStatusError, StorageError, TLSError
from gdl.job import Job
from gdl.stats import ProcessorStats
from tests.conftest import wait_until
from tests.origin import CountingOrigin
from tests.samples import image_bytes, tiny_pdf
from tests.servers import HoldServer

ROLES = ("api", "processor")
CALLBACK = "http://127.0.0.1:9/cb"  # never called: no notifier in these tests


def finished(running, job_id: str) -> dict:
    """Wait until the job's download ended; return its record."""
    def done():
        record = running.get(f"/jobs/{job_id}").json()
        return record if record["state"] in ("succeeded", "failed") else None
    return wait_until(done, timeout=15)


def enqueue(running, url: str, aggr: str = "a1", limit: int = 2, **fields) -> str:
    return running.enqueue(url=url, aggr_id=aggr, aggr_limit=limit, callback_url=CALLBACK, **fields)


def test_success_stores_the_exact_bytes(run_service, files, tmp_path):
    body = os.urandom(300_000)
    files.add("/a.bin", body)
    running = run_service(ROLES)
    job_id = enqueue(running, files.url("/a.bin"))
    record = finished(running, job_id)
    assert (record["state"], record["response_code"], record["bytes"], record["attempts"]) == \
        ("succeeded", 200, 300_000, 1)
    assert (tmp_path / "files" / job_id[:3] / job_id).read_bytes() == body
    assert running.get(f"/files/{job_id[:3]}/{job_id}").content == body
    assert record["callback_state"] == "queued"
    assert os.listdir(tmp_path / "tmp") == []


def test_404_fails_at_once(run_service, files):
    files.add("/gone", b"no", status=404)
    running = run_service(ROLES)
    record = finished(running, enqueue(running, files.url("/gone")))
    assert (record["state"], record["response_code"], record["attempts"]) == ("failed", 404, 1)
    assert "404" in record["error"]
    assert files.count("/gone") == 1


@pytest.mark.parametrize("max_retries,requests_made", [(0, 1), (1, 2), (None, 3)])
def test_500_is_retried_up_to_max_retries(run_service, files, max_retries, requests_made):
    files.add("/err", b"oops", status=500)
    running = run_service(ROLES)
    extra = {} if max_retries is None else {"max_retries": max_retries}
    record = finished(running, enqueue(running, files.url("/err"), **extra))
    assert (record["state"], record["response_code"], record["attempts"]) == ("failed", 500, requests_made)
    assert files.count("/err") == requests_made
    outcomes = [entry["outcome"] for entry in running.get(f"/jobs/{record['id']}").json()["attempts_log"]]
    assert outcomes == ["retry"] * (requests_made - 1) + ["failed"]


def test_a_body_cut_mid_stream_is_retried(run_service, files, tmp_path):
    files.add_truncated("/cut", b"x" * 1000, declared_length=5000)
    running = run_service(ROLES)
    record = finished(running, enqueue(running, files.url("/cut"), max_retries=1))
    assert (record["state"], record["attempts"]) == ("failed", 2)
    assert files.count("/cut") == 2
    assert os.listdir(tmp_path / "tmp") == []


def test_429_waits_for_retry_after_and_counts_throttled_attempts_not_retries(run_service, files):
    files.add("/busy", b"", status=429, headers={"Retry-After": "1"})
    running = run_service(ROLES, processor={"max_throttled_attempts": 2})
    record = finished(running, enqueue(running, files.url("/busy"), max_retries=0))
    assert (record["state"], record["response_code"], files.count("/busy")) == ("failed", 429, 2)
    assert record["error"].startswith("throttled: Received status code 429")
    assert record["throttled_attempts"] == 1  # the second throttled response failed it
    first, second = record["attempts_log"]
    assert (first["outcome"], second["outcome"]) == ("throttled", "failed")
    # retry_backoff is 0.05 s, but the server asked for 1 s.
    assert second["at"] - second["duration_ms"] - first["at"] >= 1000


def test_download_timeout_covers_the_whole_body(run_service, files, tmp_path):
    files.add_drip("/drip", b"x" * 100, interval=0.1)
    running = run_service(ROLES)
    record = finished(running, enqueue(running, files.url("/drip"), download_timeout=1, max_retries=0))
    assert record["state"] == "failed"
    assert record["error"] == "download did not finish within 1s"
    log = record["attempts_log"]
    assert 900 <= log[0]["duration_ms"] < 2500
    assert os.listdir(tmp_path / "tmp") == []


@pytest.mark.parametrize("pattern,body,state", [
    ("image/png", image_bytes("PNG", 4, 3), "succeeded"),
    ("image/*", image_bytes("GIF", 4, 3), "succeeded"),
    ("!image/png,image/*", image_bytes("PNG", 4, 3), "failed"),
    ("!image/png,image/*", image_bytes("JPEG", 4, 3), "succeeded"),
    ("image/*", tiny_pdf(), "failed"),
])
def test_mime_patterns(run_service, files, pattern, body, state):
    files.add("/file", body)
    running = run_service(ROLES)
    record = finished(running, enqueue(running, files.url("/file"), mime_type=pattern))
    assert record["state"] == state
    if state == "failed":
        assert "Expected mime-type" in record["error"]
        assert record["attempts"] == 1


@pytest.mark.parametrize("fmt,size", [("PNG", "10x7"), ("JPEG", "33x20"), ("GIF", "1x2")])
def test_image_size(run_service, files, fmt, size):
    width, height = map(int, size.split("x"))
    files.add("/img", image_bytes(fmt, width, height))
    running = run_service(ROLES)
    record = finished(running, enqueue(running, files.url("/img"), extract_image_size=True))
    assert (record["state"], record["image_size"]) == ("succeeded", size)


def test_image_size_ignores_a_pdf(run_service, files):
    files.add("/doc.pdf", tiny_pdf())
    running = run_service(ROLES)
    record = finished(running, enqueue(running, files.url("/doc.pdf"), extract_image_size=True))
    assert (record["state"], record["image_size"], record["mime"]) == ("succeeded", "", "application/pdf")


def test_a_kept_connection_serves_the_next_aggregation(run_service, files):
    files.add("/one", b"first")
    files.add("/two", b"second")
    running = run_service(ROLES)
    assert finished(running, enqueue(running, files.url("/one"), aggr="shop-a"))["state"] == "succeeded"
    assert finished(running, enqueue(running, files.url("/two"), aggr="shop-b"))["state"] == "succeeded"
    [one], [two] = files.requests_for("/one"), files.requests_for("/two")
    assert one.client_port == two.client_port  # one session for the process, not one per aggregation
    wait_until(lambda: running.service.scanner.pools == {})
    assert len(running.service.scanner.downloaders) == 0  # closed with the last pool using it


def test_request_headers_reach_the_server(run_service, files):
    files.add("/h", b"ok")
    running = run_service(ROLES, processor={"request_headers": {"User-Agent": "gdl-test", "X-Default": "d"}})
    finished(running, enqueue(running, files.url("/h"), request_headers={"X-Job": "j", "X-Default": "override"}))
    [seen] = files.requests_for("/h")
    assert (seen.headers["User-Agent"], seen.headers["X-Job"], seen.headers["X-Default"]) == \
        ("gdl-test", "j", "override")


def test_aggregation_proxy_is_used(run_service, files):
    files.add("/via-proxy", b"proxied")
    running = run_service(ROLES)
    # The loopback server stands in for the proxy: it receives the absolute URI.
    record = finished(running, enqueue(running, "http://origin.invalid/via-proxy", aggr_proxy=files.base_url))
    assert (record["state"], record["bytes"]) == ("succeeded", 7)
    [seen] = files.requests_for("/via-proxy")
    assert seen.target == "http://origin.invalid/via-proxy"


def test_every_aggregation_reaches_its_limit_and_never_passes_it(run_service):
    server = HoldServer(hold=0.2)
    try:
        running = run_service(ROLES)
        limits = {f"ag{i:02d}": 1 + i % 8 for i in range(20)}
        ids = []
        for aggr, limit in limits.items():
            for n in range(limit * 3):
                ids.append(enqueue(running, server.url(f"/hold/{aggr}/{n}"), aggr=aggr, limit=limit))
        for job_id in ids:
            assert finished(running, job_id)["state"] == "succeeded"
        assert dict(server.peak) == limits
        assert sum(server.total.values()) == len(ids)
    finally:
        server.stop()


def test_disk_checker_pauses_and_resumes_on_thresholds():
    readings = iter([50.0, 96.0, 93.0, 90.0, 97.0])
    checker = DiskChecker("/", high=95, low=90, interval=1, stats=ProcessorStats(), usage=lambda _: next(readings))
    assert [checker.check_once() for _ in range(5)] == [True, False, False, True, False]
    assert checker.stats.snapshot()["disk_pauses"] == 2


def test_a_full_disk_keeps_jobs_queued(run_service, files, store):
    files.add("/a", b"data")
    running = run_service(ROLES, processor={"disk": {"high": 0.001, "low": 0.0005, "interval": 0.1}})
    job_id = enqueue(running, files.url("/a"))
    gevent.sleep(1.0)
    assert running.get(f"/jobs/{job_id}").json()["state"] == "queued"
    assert files.count("/a") == 0
    assert wait_until(lambda: running.get("/stats/processor").json().get("disk_paused")) == 1
    # Paused, it no longer counts in other processors' fair shares (see the scanner).
    wait_until(lambda: store.redis.zscore(keys.PROCESSORS, running.service.token) is None, timeout=5)


def test_reaper_deletes_a_due_file(run_service, tmp_path, store):
    from gdl.job import new_id
    from gdl.store import DELETIONS, job_key, now_ms

    running = run_service(("processor",))
    job_id = new_id()
    path = Path(tmp_path / "files" / job_id[:3] / job_id)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"old")
    store.redis.hset(job_key(job_id), mapping={"id": job_id, "aggr_id": "a"})
    store.redis.zadd(DELETIONS, {job_id: now_ms() + 800})
    gevent.sleep(0.3)
    assert path.exists()
    wait_until(lambda: not path.exists(), timeout=5)
    assert store.get_job(job_id) is None
    assert running.service.scanner is not None


def test_a_changed_limit_takes_effect_on_a_busy_aggregation(run_service):
    server = HoldServer(hold=0.3)
    try:
        running = run_service(ROLES)
        first = [enqueue(running, server.url(f"/hold/g/{n}"), aggr="g", limit=2) for n in range(4)]
        wait_until(lambda: server.current["g"] == 2)
        later = [enqueue(running, server.url(f"/hold/g/x{n}"), aggr="g", limit=5) for n in range(10)]
        for job_id in first + later:
            assert finished(running, job_id)["state"] == "succeeded"
        assert server.peak["g"] == 5
    finally:
        server.stop()


def test_work_left_to_a_processor_that_does_not_take_it_is_claimed_anyway(run_service, store, caplog):
    store.register_processor("ghost", until=keys.now_ms() + 600_000, slots=0)  # registered, never claims
    server = HoldServer(hold=3)
    try:
        running = run_service(ROLES)
        with caplog.at_level("DEBUG", logger="gdl.scanner"):
            for aggr in ("f1", "f2", "f3"):
                for n in range(4):
                    enqueue(running, server.url(f"/hold/{aggr}/{n}"), aggr=aggr, limit=4)
                wait_until(lambda a=aggr: server.current[a] == 4)
        # The third was over this process's share (8 > (8 + 0 + 4) / 2), left to the ghost, then claimed.
        assert [r.getMessage() for r in caplog.records if "share" in r.getMessage()] == \
            ["aggr f3: left to a processor below its share for 0.25s"]
        assert store.redis.hgetall(keys.PROCESSOR_SLOTS) == {running.service.token: "12", "ghost": "0"}
        # Once the pools end (downloads done, then idle), the next registration says so.
        wait_until(lambda: store.redis.hget(keys.PROCESSOR_SLOTS, running.service.token) == "0", timeout=10)
        assert running.service.scanner.slots == 0 and running.service.scanner.pools == {}
    finally:
        server.stop()


def test_a_disk_pause_that_begins_while_the_pool_is_full_holds_when_a_slot_frees(run_service, store):
    origin = CountingOrigin(duration=0.4, notice_disconnect=False)
    try:
        # One disk check, at start: the test then pauses the pools as the checker would.
        running = run_service(("api", "processor"), processor={"disk": {"interval": 3600}})
        ids = [running.enqueue(url=origin.url(f"/p/{n}"), aggr_id="p", aggr_limit=2,
                               callback_url="http://127.0.0.1:9/cb") for n in range(5)]
        wait_until(lambda: origin.current["p"] == 2, timeout=10)
        healthy = running.service.scanner.healthy
        healthy.clear()
        wait_until(lambda: sum(store.get_job(i).status.state == "succeeded" for i in ids) == 2, timeout=10)
        gevent.sleep(0.5)  # what the pool would take in that time, it takes now
        assert origin.total["p"] == 2
        healthy.set()
        wait_until(lambda: all(store.get_job(i).status.state == "succeeded" for i in ids), timeout=15)
        assert (origin.total["p"], origin.peak["p"]) == (5, 2)
    finally:
        origin.stop()


def test_stats_carry_the_go_service_names(run_service, files):
    files.add("/ok", b"fine")
    files.add("/gone", b"no", status=404)
    files.add("/text", b"plain words, not an image")
    running = run_service(ROLES)
    ids = [enqueue(running, files.url("/ok"), aggr="go", limit=1),
           enqueue(running, files.url("/gone"), aggr="go", limit=1),
           enqueue(running, files.url("/text"), aggr="go", limit=1, mime_type="image/*")]
    assert [finished(running, job_id)["state"] for job_id in ids] == ["succeeded", "failed", "failed"]
    stats = wait_until(lambda: (s := running.get("/stats/processor").json()).get("spawnedWorkers") == 3 and s)
    assert stats["download.response.200"] == 2  # the mime mismatch was a 200 too, as Go counts it
    assert (stats["download.response.404"], stats["download.response.mime"]) == (1, 1)
    assert (stats["workers"], stats["maxWorkers"], stats["spawnedWorkers"]) == (0, 1, 3)
    assert (stats["spawnedWorkerPools"], stats["maxWorkerPools"]) == (1, 1)
    assert stats["workerPools"] in (0, 1)  # the pool ends after pool_idle_timeout
    # failures counts failures on our side, as in Go: a 404 or a mime mismatch is the origin's
    assert (stats["failures"], stats["invalidProxies"]) == (0, 0)
    assert (stats["reaperFailures"], stats["reaperSuccessfulDeletions"]) == (0, 0)
    assert (stats["spawned"], stats["max"]) == (1, 1)  # gdl's own names stay


def test_go_failures_count_our_own_failures_only():
    stats = ProcessorStats()
    job = Job(id="AbCdEfGhIjKlMn", url="http://example.com/", aggr_id="a", aggr_limit=1)
    stats.download_failed(job, StorageError("disk full"), "retry", 0)
    stats.download_failed(job, HTTPStatusError(500), "retry", 0)
    stats.download_failed(job, TLSError("certificate has expired"), "failed", 0)
    snapshot = stats.snapshot()
    assert (snapshot["failures"], snapshot["download.response.tls"]) == (1, 1)
    assert "download.response.body" not in snapshot


def test_a_file_is_served_with_its_sniffed_type(run_service, files):
    png = image_bytes("PNG", 3, 2)
    files.add("/a.png", png, headers={"Content-Type": "application/octet-stream"})
    files.add("/b.png", png)
    running = run_service(ROLES)
    sniffed = enqueue(running, files.url("/a.png"), extract_image_size=True)
    plain = enqueue(running, files.url("/b.png"))  # neither mime_type nor extract_image_size: not sniffed
    assert finished(running, sniffed)["mime"] == "image/png"
    assert finished(running, plain)["mime"] == ""
    response = running.get(f"/files/{sniffed[:3]}/{sniffed}")
    assert (response.status_code, response.content) == (200, png)
    assert response.headers["Content-Type"] == "image/png"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Content-Security-Policy"] == "sandbox; default-src 'none'"
    assert running.get(f"/files/{plain[:3]}/{plain}").headers["Content-Type"] == "application/octet-stream"
