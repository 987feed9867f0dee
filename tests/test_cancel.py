"""Cancel a job end to end: API -> Redis -> the pool holding it -> one callback.

Real Redis, real loopback origins (tests/origin.py trickles bodies and sees
the client go), the notifier delivering to a real receiver.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import gevent
import gevent.event
import pytest
from gevent.server import StreamServer

from gdl.store import CANCEL_CHANNEL
from gdl.wakeup import Wakeup
from tests.conftest import wait_until
from tests.origin import CountingOrigin

ROLES = ("api", "processor", "notifier")
TRICKLE = {"duration": 60, "size": 1024 * 1024, "ticks": 600}  # 1 MiB over a minute: never done in a test


@pytest.fixture
def origin():
    server = CountingOrigin(**TRICKLE)
    yield server
    server.stop()


def enqueue(running, receiver, url: str, aggr: str = "a1", limit: int = 1) -> str:
    return running.enqueue(url=url, aggr_id=aggr, aggr_limit=limit, callback_url=receiver.url("/cb"))


def state(running, job_id: str) -> str:
    return running.get(f"/jobs/{job_id}").json()["state"]


def callbacks_of(receiver, job_id: str) -> list[dict]:
    return receiver.by_job().get(job_id, [])


def temp_files(tmp_path: Path, job_id: str) -> list[str]:
    return [name for name in os.listdir(tmp_path / "tmp") if name.startswith(job_id + ".")]


def test_a_queued_job_is_cancelled_and_never_downloaded(run_service, receiver, origin):
    running = run_service(ROLES)
    holding = enqueue(running, receiver, origin.url("/a1/holding"))  # takes the aggregation's one slot
    wait_until(lambda: origin.total["a1"] == 1)
    queued = enqueue(running, receiver, origin.url("/a1/queued"))
    response = running.http.delete(running.url(f"/jobs/{queued}"))
    assert (response.status_code, response.json()) == (200, {"id": queued, "state": "cancelled"})
    record = running.get(f"/jobs/{queued}").json()
    assert (record["state"], record["error"], record["attempts"]) == ("cancelled", "cancelled by request", 0)
    [callback] = wait_until(lambda: callbacks_of(receiver, queued))
    assert (callback["success"], callback["error"], callback["download_url"]) == (False, "cancelled by request", "")
    # A repeat answers the same, and queues no second callback.
    again = running.http.delete(running.url(f"/jobs/{queued}"))
    assert (again.status_code, again.json()) == (200, {"id": queued, "state": "cancelled"})
    # The slot frees when the holding job is cancelled too; the origin never saw the queued one.
    assert running.http.delete(running.url(f"/jobs/{holding}")).status_code == 202
    wait_until(lambda: callbacks_of(receiver, holding))
    assert [path for path, _, _ in origin.served] == ["/a1/holding"]
    assert len(callbacks_of(receiver, queued)) == 1
    metrics = running.get("/metrics").text
    assert 'gdl_cancelled_jobs_total{how="queued"} 1.0' in metrics
    assert 'gdl_cancelled_jobs_total{how="in_flight"} 1.0' in metrics


def test_callback_false_cancels_without_a_callback(run_service, receiver):
    running = run_service(("api", "notifier"))  # no processor: both jobs stay queued
    quiet = enqueue(running, receiver, "http://127.0.0.1:9/quiet")
    loud = enqueue(running, receiver, "http://127.0.0.1:9/loud")
    assert running.http.delete(running.url(f"/jobs/{quiet}?callback=false")).json()["state"] == "cancelled"
    assert running.http.delete(running.url(f"/jobs/{loud}")).json()["state"] == "cancelled"
    wait_until(lambda: callbacks_of(receiver, loud))  # queued after the quiet one's would have been
    assert callbacks_of(receiver, quiet) == []
    assert running.get(f"/jobs/{quiet}").json()["callback_state"] == "none"
    assert running.http.delete(running.url(f"/jobs/{quiet}?callback=maybe")).json() == \
        {"error": "callback: must be true or false"}


def test_an_in_flight_download_is_aborted_its_temp_file_removed_and_its_slot_freed(run_service, receiver, origin,
                                                                                  tmp_path, engine):
    running = run_service(ROLES, http={"engine": engine})
    first = enqueue(running, receiver, origin.url("/a1/first"))
    second = enqueue(running, receiver, origin.url("/a1/second"))
    wait_until(lambda: temp_files(tmp_path, first))  # the body is being written
    assert origin.total["a1"] == 1  # limit 1: the second waits for the slot
    sent = time.monotonic()
    response = running.http.delete(running.url(f"/jobs/{first}"))
    assert (response.status_code, response.json()) == (202, {"id": first, "state": "cancelling"})
    wait_until(lambda: state(running, first) == "cancelled")
    # The origin saw the connection close: its serving of the first ended, unfinished. The
    # contract gives 1 s; the pub/sub message makes it milliseconds.
    [(path, _, ended)] = [s for s in origin.served if s[0] == "/a1/first"]
    assert ended - sent < 1.0
    assert origin.completed["a1"] == 0
    assert temp_files(tmp_path, first) == []
    # The freed slot runs the next job.
    wait_until(lambda: origin.total["a1"] == 2)
    assert state(running, second) == "in_flight"
    [callback] = wait_until(lambda: callbacks_of(receiver, first))
    assert (callback["success"], callback["error"]) == (False, "cancelled by request")
    assert running.http.delete(running.url(f"/jobs/{first}")).status_code == 200  # the repeat, once cancelled
    running.http.delete(running.url(f"/jobs/{second}"))
    wait_until(lambda: state(running, second) == "cancelled")


def test_a_lost_cancel_message_is_made_up_by_the_backstop_check(run_service, receiver, origin, tmp_path):
    running = run_service(ROLES, processor={"cancel_check_interval": 0.2})
    [wakeup] = [h for h in running.service.helpers if isinstance(h, Wakeup)]
    wakeup._handlers[CANCEL_CHANNEL].clear()  # every gdl:cancel message is now lost on this process
    job = enqueue(running, receiver, origin.url("/a1/lost"))
    wait_until(lambda: temp_files(tmp_path, job))
    assert running.http.delete(running.url(f"/jobs/{job}")).status_code == 202
    wait_until(lambda: state(running, job) == "cancelled", timeout=5)  # the trickle would take a minute
    assert origin.completed["a1"] == 0
    assert temp_files(tmp_path, job) == []


def test_the_backstop_reads_no_marks_until_one_is_made(run_service, receiver, origin, tmp_path):
    running = run_service(ROLES, processor={"cancel_check_interval": 0.1})
    [wakeup] = [h for h in running.service.helpers if isinstance(h, Wakeup)]
    wakeup._handlers[CANCEL_CHANNEL].clear()  # only the backstop can find the cancel below
    jobs = [enqueue(running, receiver, origin.url(f"/a1/held{i}"), limit=3) for i in range(3)]
    wait_until(lambda: all(temp_files(tmp_path, job) for job in jobs))
    redis = running.service.store.redis
    # Past the first two checks of the process, which read the marks whatever the count (as after a move).
    redis.config_resetstat()
    wait_until(lambda: redis.info("commandstats").get("cmdstat_get", {}).get("calls", 0) >= 5)
    redis.config_resetstat()
    time.sleep(1.0)  # ten checks, three downloads held in each
    stats = redis.info("commandstats")
    assert stats["cmdstat_get"]["calls"] >= 5  # the checks ran, each reading the count of marks
    assert "cmdstat_hexists" not in stats, stats["cmdstat_hexists"]  # and none read a mark: none was made
    assert running.http.delete(running.url(f"/jobs/{jobs[1]}")).status_code == 202
    wait_until(lambda: state(running, jobs[1]) == "cancelled", timeout=5)
    assert redis.info("commandstats")["cmdstat_hexists"]["calls"] >= 3  # the held marks, read once moved
    assert [state(running, job) for job in jobs] == ["in_flight", "cancelled", "in_flight"]


def test_finished_and_unknown_jobs(run_service, files):
    files.add("/done", b"done")
    running = run_service(("api", "processor"))
    job = running.enqueue(url=files.url("/done"), aggr_id="a1", aggr_limit=1, callback_url="http://127.0.0.1:9/")
    wait_until(lambda: state(running, job) == "succeeded")
    response = running.http.delete(running.url(f"/jobs/{job}"))
    assert (response.status_code, response.json()) == \
        (409, {"error": f"job {job} already finished: succeeded", "state": "succeeded"})
    assert state(running, job) == "succeeded"
    assert running.http.delete(running.url("/jobs/" + "x" * len(job))).status_code == 404
    assert running.http.delete(running.url("/jobs/not-an-id")).status_code == 404
    assert running.http.delete(running.url("/aggregations/never-seen")).status_code == 404


class GatedOrigin:
    """Sends all of a body but its last byte, then the last byte when :meth:`release` is called."""

    def __init__(self, body: bytes = b"x" * 4096) -> None:
        self.body = body
        self.waiting: dict[str, gevent.event.Event] = {}
        self.server = StreamServer(("127.0.0.1", 0), self._serve)
        self.server.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def release(self, path: str) -> None:
        self.waiting[path].set()

    def _serve(self, sock, _address) -> None:
        path = sock.makefile("rb").readline().split(b" ")[1].decode()
        gate = self.waiting.setdefault(path, gevent.event.Event())
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(self.body))
        sock.sendall(self.body[:-1])
        gate.wait()
        try:
            sock.sendall(self.body[-1:])
        except OSError:
            pass  # cancelled first: the client is gone
        sock.close()


def race_once(running, receiver, gated: GatedOrigin, n: int, lead: float, tmp_path: Path) -> str:
    """One job whose last byte goes ``lead`` seconds before its cancel is sent (negative: after);
    checks that the answer, the final state, the callback and the stored file agree."""
    path = f"/race/{n}"
    job = enqueue(running, receiver, gated.url(path), aggr=f"race{n}")
    wait_until(lambda: path in gated.waiting)
    if lead >= 0:
        gated.release(path)
        gevent.sleep(lead)
        response = running.http.delete(running.url(f"/jobs/{job}"))
    else:
        answer = gevent.spawn(running.http.delete, running.url(f"/jobs/{job}"))
        gevent.sleep(-lead)
        gated.release(path)
        response = answer.get()
    [callback] = wait_until(lambda: callbacks_of(receiver, job))
    final = running.get(f"/jobs/{job}").json()["state"]
    stored = (tmp_path / "files" / job[:3] / job).exists()
    if response.status_code == 202:
        assert (final, callback["success"], stored) == ("cancelled", False, False)
        assert "cancelled" in callback["error"]
    else:
        assert response.status_code == 409
        assert (response.json()["state"], final, callback["success"], stored) == ("succeeded", "succeeded", True, True)
    return final


def test_a_cancel_racing_a_finishing_download_ends_one_way_and_answers_it(run_service, receiver, tmp_path):
    gated = GatedOrigin()
    running = run_service(ROLES)
    try:
        # The last byte goes from 3 ms before the cancel is sent to 3 ms after.
        leads = [0.003, 0.002, 0.001, 0.0005, 0, 0, -0.0005, -0.001, -0.002, -0.003] * 3
        outcomes = [race_once(running, receiver, gated, n, lead, tmp_path) for n, lead in enumerate(leads)]
        wait_until(lambda: all(len(bodies) == 1 for bodies in receiver.by_job().values()))
        assert len(receiver.bodies()) == len(outcomes)  # one callback per job, never a second
        print("race outcomes:", {o: outcomes.count(o) for o in set(outcomes)})
    finally:
        gated.server.stop(timeout=1)
