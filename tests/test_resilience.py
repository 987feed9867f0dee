"""Every way gdl can be stopped, starved or surprised ends with nothing lost.

gdl runs as real subprocesses; Redis servers (plain, with AOF, and a
Sentinel group) are started, stopped and failed over for real; the test
process serves downloads, receives callbacks and stands in for Sentry.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import gevent
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from gdl import store as keys
from gdl.redis_server import find_binary
from gdl.store import Store
from tests.conftest import RedisServer, free_port, make_config, wait_until
from tests.httpserver import LoopbackServer
from tests.servers import CallbackReceiver, HoldServer, _Server

FAST = {"lease_ttl": 2, "scan_interval": 0.3, "pool_idle_timeout": 1}


@pytest.fixture
def served(make_cfg):
    """Configs (on this test's Redis: standalone here, a cluster in tests/test_cluster.py) whose
    API listens on a known free port."""
    def make(**sections):
        sections.setdefault("processor", FAST)
        return make_cfg(api={"port": free_port()}, **sections)
    return make


def serve_cfg(tmp: Path, redis_url: str, **sections):
    """A config whose API listens on a known free port (for subprocesses)."""
    sections.setdefault("processor", FAST)
    return make_config(tmp, redis_url, api={"port": free_port()}, **sections)


def api_base(cfg) -> str:
    return f"http://127.0.0.1:{cfg.api.port}"


def wait_for_api(cfg) -> None:
    def up():
        try:
            return requests.get(api_base(cfg) + "/hb", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False
    wait_until(up, timeout=15)


def post_job(session: requests.Session, cfg, url: str, aggr: str, limit: int, callback: str) -> requests.Response:
    body = json.dumps({"url": url, "aggr_id": aggr, "aggr_limit": limit, "callback_url": callback}).encode()
    return session.post(api_base(cfg) + "/download", data=body, timeout=10)


def enqueue_jobs(cfg, server, receiver, aggrs: dict[str, int], per_aggr: int) -> list[str]:
    session = requests.Session()
    ids = []
    for aggr, limit in aggrs.items():
        for n in range(per_aggr):
            response = post_job(session, cfg, server.url(f"/hold/{aggr}/{n}"), aggr, limit, receiver.url("/cb"))
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
    return ids


def field_counts(store: Store, ids: list[str], field: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job_id in ids:
        value = store.redis.hget(keys.job_key(job_id), field) or "gone"
        counts[value] = counts.get(value, 0) + 1
    return counts


def assert_one_successful_callback_each(receiver: CallbackReceiver, ids: list[str]) -> None:
    by_job = receiver.by_job()
    assert sorted(by_job) == sorted(ids)
    assert {len(bodies) for bodies in by_job.values()} == {1}
    assert all(bodies[0]["success"] for bodies in by_job.values())


# ---------------------------------------------------------------------------- signals


def test_sigterm_during_50_slow_downloads_then_a_restart_completes_them(served, store, gdl_process, receiver):
    files = HoldServer(hold=60, body=os.urandom(100_000), midway=True)
    try:
        cfg = served()
        proc = gdl_process(cfg)
        wait_for_api(cfg)
        ids = enqueue_jobs(cfg, files, receiver, {f"s{i}": 10 for i in range(5)}, per_aggr=10)
        wait_until(lambda: sum(files.current.values()) == 50, timeout=15)
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 10
        assert field_counts(store, ids, "state") == {"queued": 50}
        assert os.listdir(cfg.processor.storage_dir) == []
        files.hold = 0.01
        gdl_process(cfg, name="restarted.yaml")
        wait_until(lambda: field_counts(store, ids, "callback_state") == {"delivered": 50}, timeout=30)
        assert_one_successful_callback_each(receiver, ids)
        assert {int(store.redis.hget(keys.job_key(i), "attempts")) for i in ids} == {1}
    finally:
        files.stop()


def test_a_second_signal_exits_at_once_and_the_sweep_recovers(served, store, gdl_process, receiver):
    files = HoldServer(hold=60, body=os.urandom(10_000), midway=True)
    try:
        cfg = served()
        proc = gdl_process(cfg)
        wait_for_api(cfg)
        ids = enqueue_jobs(cfg, files, receiver, {"x": 5}, per_aggr=5)
        wait_until(lambda: files.current["x"] == 5, timeout=15)
        # Two different signals: two of the same kind may merge into one pending signal.
        proc.signal(signal.SIGTERM)
        proc.signal(signal.SIGINT)
        assert proc.wait(timeout=3) == 1
        assert field_counts(store, ids, "state") == {"in_flight": 5}  # left for the sweep
        files.hold = 0.01
        gdl_process(cfg, name="after.yaml")
        wait_until(lambda: field_counts(store, ids, "callback_state") == {"delivered": 5}, timeout=30)
        assert_one_successful_callback_each(receiver, ids)
    finally:
        files.stop()


# ---------------------------------------------------------------------------- redis outages


def test_redis_down_for_5s_under_load_loses_no_accepted_job(tmp_path, gdl_process, receiver):
    redis = RedisServer(tmp_path / "redis", aof=True).start()
    files = HoldServer(hold=0.05)
    try:
        cfg = serve_cfg(tmp_path, redis.url)
        proc = gdl_process(cfg)
        wait_for_api(cfg)
        answers: list[tuple[float, int, str]] = []

        def load() -> None:
            session = requests.Session()
            for n in range(260):  # 20 jobs/s for 13 s
                try:
                    response = post_job(session, cfg, files.url(f"/hold/o{n % 4}/{n}"), f"o{n % 4}", 3,
                                        receiver.url("/cb"))
                    job_id = response.json().get("id", "") if response.status_code == 201 else ""
                    answers.append((time.monotonic(), response.status_code, job_id))
                except requests.RequestException:
                    answers.append((time.monotonic(), 0, ""))
                gevent.sleep(0.05)

        loader = gevent.spawn(load)
        gevent.sleep(3)
        down_at = time.monotonic()
        redis.stop()
        gevent.sleep(5)
        redis.start()
        up_at = time.monotonic()
        loader.join(timeout=30)
        statuses = {status for _, status, _ in answers}
        assert statuses == {201, 503}, statuses
        assert any(status == 503 and down_at < t < up_at for t, status, _ in answers)
        assert any(status == 201 and t > up_at + 1 for t, status, _ in answers)
        accepted = [job_id for _, status, job_id in answers if status == 201]
        wait_until(lambda: set(receiver.by_job()) >= set(accepted), timeout=60)
        assert all(bodies[0]["success"] for bodies in receiver.by_job().values())
        log = proc.output()
        assert log.count("redis: unavailable") == 1, log
        assert log.count("redis: back after") == 1
    finally:
        files.stop()
        redis.stop()


# ---------------------------------------------------------------------------- sentinel


class Sentinels:
    """One master, one replica and three sentinels on loopback."""

    def __init__(self, tmp: Path):
        self.master = RedisServer(tmp / "master").start()
        self.replica = RedisServer(tmp / "replica",
                                   extra=("--replicaof", "127.0.0.1", str(self.master.port))).start()
        self.ports = [free_port() for _ in range(3)]
        self.processes = []
        for port in self.ports:
            conf = tmp / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {tmp}\n"
                f"sentinel monitor mymaster 127.0.0.1 {self.master.port} 2\n"
                "sentinel down-after-milliseconds mymaster 1000\n"
                "sentinel failover-timeout mymaster 5000\n"
            )
            self.processes.append(subprocess.Popen([find_binary(), str(conf), "--sentinel"],
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.sentinel = Store.connect(f"redis://127.0.0.1:{self.ports[0]}")
        replica = Store.connect(self.replica.url)
        wait_until(lambda: replica.redis.info("replication").get("master_link_status") == "up", timeout=20)
        wait_until(lambda: self._known_replicas() == 1, timeout=20)

    def _known_replicas(self) -> int:
        try:
            return len(self.sentinel.redis.execute_command("SENTINEL", "REPLICAS", "mymaster"))
        except Exception:
            return 0

    def master_port(self) -> int:
        return int(self.sentinel.redis.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")[1])

    def failover(self) -> None:
        self.sentinel.redis.execute_command("SENTINEL", "FAILOVER", "mymaster")

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
            process.wait(timeout=10)
        self.replica.stop()
        self.master.stop()


def test_a_sentinel_failover_during_500_jobs(tmp_path, gdl_process, receiver):
    group = Sentinels(tmp_path)
    files = HoldServer(hold=0.02)
    try:
        cfg = serve_cfg(tmp_path, "embedded", redis={
            "url": "embedded", "sentinel": [f"127.0.0.1:{p}" for p in group.ports], "master_name": "mymaster",
            "wait_replicas": 1})
        proc = gdl_process(cfg)
        wait_for_api(cfg)
        ids: list[str] = []
        refused = []

        def load() -> None:
            # During the failover the API may answer 503 (not confirmed by a replica): the client retries.
            session = requests.Session()
            for n in range(500):
                aggr = f"f{n % 10}"
                for _ in range(50):
                    response = post_job(session, cfg, files.url(f"/hold/{aggr}/{n}"), aggr, 5, receiver.url("/cb"))
                    if response.status_code == 201:
                        ids.append(response.json()["id"])
                        break
                    refused.append(response.status_code)
                    gevent.sleep(0.1)

        loader = gevent.spawn(load)
        wait_until(lambda: len(receiver.bodies()) >= 100, timeout=30)
        group.failover()
        wait_until(lambda: group.master_port() == group.replica.port, timeout=20)
        loader.join(timeout=60)
        assert len(ids) == 500
        assert set(refused) <= {503}
        wait_until(lambda: set(receiver.by_job()) >= set(ids), timeout=90)
        assert all(bodies[0]["success"] for bodies in receiver.by_job().values())
        proc.stop()  # while its Redis is still there
    finally:
        files.stop()
        group.stop()


# ---------------------------------------------------------------------------- sentry


class FakeSentry(_Server):
    """Receives sentry-sdk's envelopes and keeps their event items."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        super().__init__()

    def dsn(self) -> str:
        return f"http://publickey@127.0.0.1:{self.server.server_port}/1"

    def app(self, environ: dict, start_response) -> list[bytes]:
        raw = environ["wsgi.input"].read()
        if environ.get("HTTP_CONTENT_ENCODING") == "gzip":
            raw = gzip.decompress(raw)
        lines = raw.split(b"\n")
        for header, payload in zip(lines[1::2], lines[2::2]):
            if json.loads(header).get("type") == "event":
                self.events.append(json.loads(payload))
        start_response("200 OK", [("Content-Length", "2")])
        return [b"{}"]


def test_sentry_gets_internal_errors_with_tags_and_not_404s(served, store, gdl_process):
    sentry = FakeSentry()
    try:
        with LoopbackServer() as files:
            files.add("/gone", b"", status=404)
            files.add("/ok", b"fine")
            cfg = served(sentry={"dsn": sentry.dsn()})
            gdl_process(cfg, "--log-level", "debug")
            wait_for_api(cfg)
            session = requests.Session()
            missing = post_job(session, cfg, files.url("/gone"), "e", 1, "http://127.0.0.1:9/cb").json()["id"]
            wait_until(lambda: store.redis.hget(keys.job_key(missing), "state") == "failed", timeout=15)
            storage = Path(cfg.processor.storage_dir)
            storage.rmdir()
            storage.write_text("not a directory")  # our disk breaks mid-run
            broken = post_job(session, cfg, files.url("/ok"), "e", 1, "http://127.0.0.1:9/cb").json()["id"]
            event = wait_until(lambda: next((e for e in sentry.events if e["tags"].get("job_id") == broken), None),
                               timeout=15)
            assert (event["tags"]["component"], event["tags"]["aggr_id"]) == ("processor", "e")
            assert event["exception"]["values"][-1]["type"] == "StorageError"
            assert not [e for e in sentry.events if e["tags"].get("job_id") == missing]
            storage.unlink()
            storage.mkdir()
            wait_until(lambda: store.redis.hget(keys.job_key(broken), "state") == "succeeded", timeout=15)
            assert store.redis.hget(keys.job_key(broken), "attempts") == "1"  # internal errors are not attempts
    finally:
        sentry.stop()


# ---------------------------------------------------------------------------- metrics


def test_metrics_parse_and_match_the_jobs_run(run_service, receiver, store):
    with LoopbackServer() as files:
        files.add("/ok", b"x" * 1000)
        files.add("/gone", b"", status=404)
        running = run_service()
        for path in ["/ok"] * 5 + ["/gone"] * 2:
            running.enqueue(url=files.url(path), aggr_id="m", aggr_limit=2, callback_url=receiver.url("/cb"))
        wait_until(lambda: len(receiver.bodies()) == 7, timeout=20)

        def scraped() -> dict:
            text = running.get("/metrics").text
            samples = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
            # Reports reach Redis every stats_interval: wait until one shows every job's end, its
            # download's as well as its callback's, before reading the rest of them.
            downloads = sum(samples.get(("gdl_downloads_total", (("outcome", o),)), 0) for o in ("succeeded", "failed"))
            settled = samples.get(("gdl_callbacks_total", (("outcome", "successful"),))) == 7 and downloads == 7
            return samples if settled else {}

        samples = wait_until(scraped, timeout=10)
        assert samples[("gdl_downloads_total", (("outcome", "succeeded"),))] == 5
        assert samples[("gdl_downloads_total", (("outcome", "failed"),))] == 2
        assert samples[("gdl_download_responses_total", (("class", "2xx"),))] == 5
        assert samples[("gdl_download_responses_total", (("class", "4xx"),))] == 2
        assert samples[("gdl_download_bytes_total", ())] == 5000
        assert samples[("gdl_download_duration_seconds_count", ())] == 7
        assert samples[("gdl_queue_depth", (("queue", "deletions_scheduled"),))] == 7
        assert samples[("gdl_queue_depth", (("queue", "downloads_queued"),))] == 0
        assert samples[("gdl_processes", (("component", "processor"),))] == 1
