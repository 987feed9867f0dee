"""The operator view: the reporter's heartbeats, throughput buckets and failure
records in Redis, the JSON endpoints built on them, and the dashboard page
driven in headless Chromium against a real gdl and loopback servers.

The browser test needs Debian's chromium at /usr/bin/chromium and the
playwright package (the `test` extra); without them it fails, it is never
skipped. Its screenshot is saved under the test's tmp_path, and also into the
directory named by GDL_SCREENSHOTS when that is set (`GDL_SCREENSHOTS=docs`
refreshes docs/dashboard.png, the picture in docs/operating.md).
"""

import os
import shutil
from pathlib import Path

import pytest

from gdl import store as keys
from gdl.dashboard import PROCESS_FORGET_AFTER_MS, overview, process_status, throughput
from gdl.stats import NotifierStats, ProcessorStats, Reporter
from gdl.store import Claim, ClaimOutcome, Store
from tests.conftest import wait_until
from tests.httpserver import LoopbackServer
from tests.servers import CallbackReceiver, HoldServer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
NOW = 1_700_000_000_000
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Clock:
    def __init__(self, now: int = NOW):
        self.now = now

    def __call__(self) -> int:
        return self.now


class FakeJob:
    def __init__(self, job_id: str, aggr_id: str = "shop", url: str = "http://example.com/a"):
        self.id, self.aggr_id, self.url = job_id, aggr_id, url


class FakeError(Exception):
    response_code = 503
    phase = "request"


# --------------------------------------------------------------------------- the reporter's writes

def test_reporter_writes_heartbeat_with_roles_host_pid_version_and_start(store: Store) -> None:
    clock = Clock()
    processor, notifier = ProcessorStats(), NotifierStats()
    reporter = Reporter(store, "host:1:abc", 0.5, [processor, notifier], roles=("processor", "notifier"),
                        clock=clock)
    processor.worker_started()
    clock.now += 1500
    reporter.report_once()
    [beat] = store.heartbeats(forget_before=0)
    assert beat["process"] == "host:1:abc"
    assert beat["roles"] == ["processor", "notifier"]
    assert (beat["pid"], beat["version"], beat["started_at"], beat["at"]) == (os.getpid(), "0.1.0", NOW, NOW + 1500)
    assert beat["host"] and beat["interval_ms"] == 500 and beat["state"] == "running"
    assert beat["components"]["processor"]["workers"] == 1
    assert beat["components"]["notifier"]["in_flight"] == 0
    assert store.reports("processor", newer_than=NOW + 1500) == [beat["components"]["processor"]]
    assert store.reports("processor", newer_than=NOW + 1501) == []
    reporter.stop()
    reporter.run()  # returns at once, with a last report marked stopped
    [beat] = store.heartbeats(forget_before=0)
    assert beat["state"] == "stopped"


def test_reporter_adds_only_the_increase_since_its_last_flush_into_the_bucket(store: Store) -> None:
    clock = Clock()
    processor, notifier = ProcessorStats(), NotifierStats()
    reporter = Reporter(store, "p1", 5, [processor, notifier], clock=clock)
    processor.download_finished("succeeded", 200, 1000, 0.1)
    processor.download_finished("succeeded", 200, 500, 0.1)
    processor.download_finished("retry", 503, 0, 0.1)
    notifier.incr("successful", 2)
    notifier.incr("retried")
    reporter.report_once()
    bucket = keys.tput_key(NOW // keys.TPUT_BUCKET_MS)
    assert store.redis.hgetall(bucket) == {"downloads": "2", "bytes": "1500", "failures": "1", "callbacks": "2",
                                           "callback_failures": "1"}
    assert 0 < store.redis.ttl(bucket) <= keys.TPUT_TTL_S
    reporter.report_once()  # nothing new: nothing added
    assert store.redis.hget(bucket, "downloads") == "2"
    processor.download_finished("failed", 404, 0, 0.1)
    clock.now += keys.TPUT_BUCKET_MS
    reporter.report_once()
    later = keys.tput_key(NOW // keys.TPUT_BUCKET_MS + 1)
    assert store.redis.hgetall(later) == {"failures": "1"}
    # A second process adds into the same bucket.
    other_stats = ProcessorStats()
    other = Reporter(store, "p2", 5, [other_stats], clock=clock)
    other_stats.download_finished("succeeded", 200, 10, 0.1)
    other.report_once()
    assert store.redis.hgetall(later) == {"failures": "1", "downloads": "1", "bytes": "10"}


def test_failures_are_flushed_newest_first_and_capped(store: Store) -> None:
    stats = ProcessorStats()
    reporter = Reporter(store, "p1", 5, [stats], clock=Clock())
    for i in range(keys.FAILURES_KEPT + 5):
        stats.download_failed(FakeJob(f"job{i:011d}"), FakeError(f"boom {i}"), "retry", NOW + i)
    reporter.report_once()
    assert len(stats.failures) == 0
    failures = store.recent_failures()
    assert len(failures) == keys.FAILURES_KEPT
    assert failures[0] == {"job_id": f"job{keys.FAILURES_KEPT + 4:011d}", "aggr_id": "shop",
                           "url": "http://example.com/a", "outcome": "retry", "at": NOW + keys.FAILURES_KEPT + 4,
                           "error": f"boom {keys.FAILURES_KEPT + 4}", "response_code": 503, "phase": "request"}
    assert failures[-1]["job_id"] == "job00000000005"  # the deque kept the latest 100 only


def test_failures_survive_a_flush_that_could_not_reach_redis(store: Store) -> None:
    dead = Store.connect("redis://127.0.0.1:1/0")
    stats = ProcessorStats()
    stats.download_failed(FakeJob("jobAAAAAAAAAAA"), FakeError("x"), "failed", NOW)
    stats.download_finished("failed", 404, 0, 0.1)
    reporter = Reporter(dead, "p1", 5, [stats], clock=Clock())
    reporter.report_once()
    assert [f["job_id"] for f in stats.failures] == ["jobAAAAAAAAAAA"]
    reporter.store = store
    reporter.report_once()
    assert [f["job_id"] for f in store.recent_failures()] == ["jobAAAAAAAAAAA"]
    assert store.redis.hget(keys.tput_key(NOW // keys.TPUT_BUCKET_MS), "failures") == "1"


def test_process_status_live_dead_stopped() -> None:
    beat = {"at": NOW, "interval_ms": 1000, "state": "running"}
    assert process_status(beat, NOW + 3000) == "live"
    assert process_status(beat, NOW + 3001) == "dead"
    assert process_status({**beat, "state": "stopped"}, NOW + 1) == "stopped"


def test_overview_lists_dead_processes_then_forgets_them(store: Store) -> None:
    store.heartbeat("old", {"roles": ["api"], "interval_ms": 1000, "started_at": NOW - 1}, now=NOW)
    store.heartbeat("new", {"roles": ["processor"], "interval_ms": 1000, "started_at": NOW,
                            "components": {"processor": {"disk_used_percent": 42.5, "disk_paused": 1}}},
                    now=NOW + 10_000)
    view = overview(store, NOW + 10_500)
    assert [(p["process"], p["status"]) for p in view["processes"]] == [("old", "dead"), ("new", "live")]
    assert view["disk"] == [{"process": "new", "host": "", "status": "live", "used_percent": 42.5, "paused": True,
                             "pauses": 0}]
    view = overview(store, NOW + PROCESS_FORGET_AFTER_MS + 1)
    assert [p["process"] for p in view["processes"]] == ["new"]
    assert store.redis.hkeys(keys.HEARTBEATS) == ["new"]


def test_throughput_is_fifteen_minutes_of_ten_second_buckets(store: Store) -> None:
    store.heartbeat("p", {}, now=NOW, throughput={"downloads": 3, "bytes": 2048})
    store.heartbeat("p", {}, now=NOW - 60_000, throughput={"callbacks": 2})
    data = throughput(store, NOW + 5)
    assert data["bucket_seconds"] == 10
    assert len(data["buckets"]) == 90
    assert data["buckets"][-1] == {"t": NOW // 10_000 * 10_000, "downloads": 3, "bytes": 2048, "failures": 0,
                                   "callbacks": 0, "callback_failures": 0}
    assert data["buckets"][-7]["callbacks"] == 2
    assert data["totals"] == {"downloads": 3, "bytes": 2048, "failures": 0, "callbacks": 2, "callback_failures": 0}


def test_aggregations_view_drops_an_active_pool_whose_process_died(store: Store) -> None:
    store.redis.hset(keys.ACTIVE, "ghost", "dead-process")  # no lease, no queue: its process died
    store.redis.hset(keys.aggr_key("live"), mapping={"limit": 2, "proxy": ""})
    assert store.claim("live", "p1", 60_000) == Claim(ClaimOutcome.CLAIMED, 2, "")
    rows, queued = store.aggregations_view(now=NOW)
    assert [r["aggr_id"] for r in rows] == ["live"]
    assert rows[0]["lease_holder"] == "p1" and queued == 0
    assert store.redis.hgetall(keys.ACTIVE) == {"live": "p1"}
    store.release("live", "someone-else")
    assert store.redis.hgetall(keys.ACTIVE) == {"live": "p1"}
    store.release("live", "p1")
    assert store.redis.hgetall(keys.ACTIVE) == {}


# --------------------------------------------------------------------------- JSON endpoints

JOB = {"url": "http://example.com/a.png", "aggr_id": "shop", "aggr_limit": 4, "callback_url": "http://cb.example/"}


def test_api_overview_throughput_failures_on_an_api_only_process(run_service, store: Store) -> None:
    api = run_service(roles=("api",))
    for _ in range(3):
        api.enqueue(**JOB)
    api.enqueue(**{**JOB, "aggr_id": "other", "aggr_limit": 1})
    view = api.get("/api/overview").json()
    assert [(a["aggr_id"], a["pending"], a["due_now"], a["in_flight"], a["limit"], a["lease_holder"])
            for a in view["aggregations"]] == [("shop", 3, 3, 0, 4, ""), ("other", 1, 1, 0, 1, "")]
    assert view["aggregations_queued"] == 2
    assert view["queues"] == {"downloads_queued": 4, "downloads_in_flight": 0, "callbacks_queued": 0,
                              "callbacks_in_flight": 0, "deletions_scheduled": 0, "aggregations_pending": 2,
                              "callbacks_failed": 0}
    wait_until(lambda: api.get("/api/overview").json()["processes"])
    [proc] = api.get("/api/overview").json()["processes"]
    assert (proc["process"], proc["status"], proc["roles"], proc["pid"]) == (
        api.service.token, "live", ["api"], os.getpid())
    assert proc["disk"] is None and proc["workers"] is None
    data = api.get("/api/throughput?minutes=5").json()
    assert len(data["buckets"]) == 30 and data["totals"]["downloads"] == 0
    assert api.get("/api/failures").json() == {"downloads": [], "callbacks": [], "callbacks_total": 0}
    assert api.get("/api/throughput?minutes=16").status_code == 400
    assert api.get("/api/failures?limit=x").json()["error"] == "limit: must be a whole number"


def test_page_loads_without_a_token_but_its_data_needs_one(run_service, store: Store) -> None:
    api = run_service(roles=("api",), security={"api_tokens": [TOKEN], "api_tokens_read": True})
    page = api.get("/")
    assert page.status_code == 200 and "<h1>gdl 0.1.0</h1>" in page.text
    assert "https://" not in page.text and "http://" not in page.text.replace("http://www.w3.org/2000/svg", "")
    assert api.get("/api/overview").status_code == 401
    assert api.get("/api/overview", headers=AUTH).status_code == 200


# --------------------------------------------------------------------------- the page in Chromium

@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright  # the `test` extra; missing means a failure, not a skip

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install chromium"
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def slow_server():
    server = HoldServer(hold=60)
    yield server
    server.stop()


def cell(page, row: str, column: str) -> str:
    return page.inner_text(f"{row} td.{column}").strip()


@pytest.mark.timeout(90)
def test_dashboard_in_chromium(slow_server: HoldServer, receiver: CallbackReceiver, browser, run_service,
                               store: Store, tmp_path: Path) -> None:
    gdl = run_service(notifier={"max_retries": 0}, security={"api_tokens": [TOKEN]})

    def enqueue(**fields) -> str:
        response = gdl.post("/download", fields, headers=AUTH)
        assert response.status_code == 201, response.text
        return response.json()["id"]

    # Finished work first: four downloads, a 404, and a callback answered 500 (no retries: it fails).
    with LoopbackServer() as fast:
        fast.add("/ok.bin", body=b"x" * 250_000)
        quick = {"aggr_id": "quick", "aggr_limit": 2}
        done = [enqueue(url=fast.url("/ok.bin"), callback_url=receiver.url("/cb"), **quick) for _ in range(3)]
        receiver.answer("/cb-fail", 500)
        failing_cb = enqueue(url=fast.url("/ok.bin"), callback_url=receiver.url("/cb-fail"), **quick)
        not_found = enqueue(url=fast.url("/missing"), callback_url=receiver.url("/cb"), **quick)
        wait_until(lambda: store.redis.hget(keys.job_key(failing_cb), "callback_state") == "failed", timeout=15)
        wait_until(lambda: len(receiver.bodies("/cb")) == 4, timeout=15)
    assert store.job_fields(done + [not_found], "state") == [{"state": "succeeded"}] * 3 + [{"state": "failed"}]

    # Then three aggregations held by the slow server: limit in flight, the rest pending.
    plan = {"alpha": (2, 5), "beta": (1, 3), "gamma": (3, 4)}
    held = {aggr: [enqueue(url=slow_server.url(f"/hold/{aggr}/{i}"), aggr_id=aggr, aggr_limit=limit,
                           callback_url=receiver.url("/cb")) for i in range(count)]
            for aggr, (limit, count) in plan.items()}
    wait_until(lambda: sum(slow_server.current.values()) == 6, timeout=15)
    wait_until(lambda: sum(b["downloads"] for b in throughput(store, keys.now_ms())["buckets"]) == 4)

    page = browser.new_page(viewport={"width": 1440, "height": 1100})
    page.goto(gdl.url("/?refresh=1"))
    page.wait_for_function("document.querySelectorAll('#aggregations tbody tr[data-aggr]').length === 3",
                           timeout=15_000)  # "quick" is gone once its idle pool ended
    for aggr, (limit, count) in plan.items():
        row = f'#aggregations tr[data-aggr="{aggr}"]'
        assert cell(page, row, "name") == aggr
        assert (cell(page, row, "pending"), cell(page, row, "in-flight"), cell(page, row, "limit")) == (
            str(count - limit), str(limit), str(limit))
        assert cell(page, row, "holder") == gdl.service.token
        assert cell(page, row, "oldest").startswith("due ")

    process = f'#processes tr[data-process="{gdl.service.token}"]'
    assert page.get_attribute(process, "data-status") == "live"
    assert page.inner_text(f"{process} td:nth-child(5)") == str(os.getpid())
    assert page.inner_text(f"{process} td:nth-child(3)") == "api, processor, notifier"
    disk = page.inner_text(f'#disk tr[data-process="{gdl.service.token}"] td:nth-child(3)')
    assert 0 < float(disk) < 100
    assert page.inner_text('[data-queue="downloads_in_flight"] .value') == "6"
    assert page.inner_text('[data-queue="callbacks_failed"] .value') == "1"

    # The chart: every bucket drawn, a point per non-empty one, adding up to what happened.
    def series(name: str) -> list[float]:
        return page.eval_on_selector_all(f'[data-chart="{name}"] circle.pt',
                                         "dots => dots.map(d => Number(d.dataset.value))")

    assert page.eval_on_selector('[data-chart="downloads"] polyline',
                                 "p => p.getAttribute('points').trim().split(' ').length") == 90
    assert len(series("downloads")) >= 1
    assert round(sum(series("downloads")) * 10) == 4
    assert round(sum(series("failures")) * 10) == 1
    assert round(sum(series("callbacks")) * 10) == 4
    assert round(sum(series("bytes")) * 10 * 1e6) == 4 * 250_000

    failure = f'#failures tr[data-job="{not_found}"]'
    assert "Received status code 404" in page.inner_text(failure)
    failed_row = f'#callbacks tr[data-job="{failing_cb}"]'
    assert "500" in page.inner_text(failed_row)

    # The disk panel fits its column at every width of the three-column layout: no sideways
    # scrolling, its last column (pauses) inside the panel.
    disk_row = f'#disk tr[data-process="{gdl.service.token}"]'
    for width in (1101, 1200, 1300, 1400, 1440, 1920):
        page.set_viewport_size({"width": width, "height": 1100})
        assert page.eval_on_selector("#disk-section", "s => s.scrollWidth - s.clientWidth") == 0, width
        assert page.eval_on_selector(f"{disk_row} td:last-child", """cell => {
            const c = cell.getBoundingClientRect(), s = cell.closest('section').getBoundingClientRect();
            return c.left >= s.left && c.right <= s.right; }"""), width
        if width == 1400:
            page.screenshot(path=str(tmp_path / "dashboard-1400.png"), full_page=True)
    page.set_viewport_size({"width": 1440, "height": 1100})

    screenshot = tmp_path / "dashboard.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("GDL_SCREENSHOTS"):
        target = Path(os.environ["GDL_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, target / "dashboard.png")

    # Retry without the token: refused, and nothing is sent.
    page.click(f"{failed_row} button.retry")
    page.wait_for_function(f"document.querySelector('{failed_row} .note').textContent.startsWith('401')")
    assert len(receiver.bodies("/cb-fail")) == 1
    # With the token typed in (kept in localStorage), the callback is delivered again.
    page.fill("#token", TOKEN)
    page.click("#token-save")
    assert page.evaluate("localStorage.getItem('gdl.token')") == TOKEN
    page.click(f"{failed_row} button.retry")
    wait_until(lambda: len(receiver.bodies("/cb-fail")) == 2, timeout=10)
    assert [b["job_id"] for b in receiver.bodies("/cb-fail")] == [failing_cb, failing_cb]
    wait_until(lambda: store.redis.hget(keys.job_key(failing_cb), "callback_state") == "delivered")
    page.wait_for_selector(failed_row, state="detached", timeout=10_000)
    assert page.inner_text("#callbacks tbody") == "no failed callbacks"
    assert store.redis.zcard(keys.FAILED_CALLBACKS) == 0

    # Purge beta (one job downloading, two queued): nothing until the confirmation is accepted.
    beta = '#aggregations tr[data-aggr="beta"]'
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.click(f"{beta} button.purge")
    assert store.job_fields(held["beta"], "state") == [{"state": "in_flight"}] + [{"state": "queued"}] * 2
    page.once("dialog", lambda dialog: dialog.accept())
    page.click(f"{beta} button.purge")
    # Two queued: the dismissed click purged nothing (a purge then would have left this one none).
    page.wait_for_function(f"document.querySelector('{beta} .note').textContent === 'purging 2 queued'")
    wait_until(lambda: store.job_fields(held["beta"], "state") == [{"state": "cancelled"}] * 3, timeout=10)
    wait_until(lambda: all(receiver.by_job().get(job) for job in held["beta"]), timeout=10)
    assert {receiver.by_job()[job][0]["error"] for job in held["beta"]} == {"cancelled: aggregation beta purged"}
    assert store.job_fields(held["alpha"][:2], "state") == [{"state": "in_flight"}] * 2  # the others go on
    # Pause and resume an aggregation (the token is still in localStorage).
    gamma = '#aggregations tr[data-aggr="gamma"]'
    page.click(f"{gamma} button.pause")
    wait_until(lambda: store.redis.hget(keys.aggr_key("gamma"), "paused") == "1")
    page.wait_for_selector(f'{gamma}[data-paused="1"] button.resume', timeout=10_000)
    assert cell(page, gamma, "oldest") == "paused"
    assert store.redis.zscore(keys.DUE_INDEX, "gamma") is None
    page.click(f"{gamma} button.resume")
    wait_until(lambda: store.redis.hget(keys.aggr_key("gamma"), "paused") is None)
    page.wait_for_selector(f'{gamma}[data-paused="0"] button.pause', timeout=10_000)
    assert store.redis.zscore(keys.DUE_INDEX, "gamma") is not None
    page.close()
