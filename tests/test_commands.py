"""The operator commands run for real, as subprocesses, against a real gdl
(a process or an in-process service), the test Redis and loopback servers:
enqueue (with --wait), status, job, retry-failed, fsck, and how they reach
an embedded Redis without ever starting one."""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from gdl import store as keys
from gdl.job import Job, JobState, new_id
from gdl.store import CallbackOutcome, DownloadOutcome, Store, now_ms
from tests.conftest import config_file, free_port, make_config, wait_until
from tests.httpserver import LoopbackServer
from tests.samples import take_holding_lease
from tests.servers import CallbackReceiver, HoldServer

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2


def gdl(cfg_path: Path, *args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """``gdl --config cfg_path ARGS``; the test's hub keeps serving while it runs (subprocess is patched)."""
    return subprocess.run([sys.executable, "-m", "gdl.cli", "--config", str(cfg_path), *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout, check=False, cwd=str(cfg_path.parent))


def table_rows(text: str, header: str) -> dict[str, list[str]]:
    """The rows of the table whose header line starts with ``header``, keyed by first column."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows


def heartbeat(port: int) -> int:
    try:
        return requests.get(f"http://127.0.0.1:{port}/hb", timeout=2).status_code
    except requests.ConnectionError:
        return 0


@pytest.fixture
def cfg_path(tmp_path: Path, redis_server, store: Store) -> Path:
    """A config file on the (emptied) test Redis."""
    return config_file(tmp_path, make_config(tmp_path, redis_server.url), name="cli.yaml")


# --------------------------------------------------------------------------- the parser

@pytest.mark.parametrize(("argv", "command", "config"), [
    (["--config", "a.yaml"], None, "a.yaml"),
    (["--config", "a.yaml", "api"], "api", "a.yaml"),
    (["-c", "a.yaml", "notifier"], "notifier", "a.yaml"),
    (["processor", "--config", "b.yaml"], "processor", "b.yaml"),
    (["--config", "a.yaml", "status", "--watch"], "status", "a.yaml"),
    (["status", "--config", "b.yaml"], "status", "b.yaml"),
    (["--config", "a.yaml", "fsck", "--fix"], "fsck", "a.yaml"),
    (["--config", "a.yaml", "job", "AbCdEfGhIjKlMn"], "job", "a.yaml"),
])
def test_roles_and_commands_share_the_global_options(argv: list[str], command: str | None, config: str) -> None:
    from gdl.cli import build_parser

    args = build_parser().parse_args(argv)
    assert (args.command, args.config) == (command, config)


def test_unknown_role_or_command_is_a_usage_error(cfg_path: Path) -> None:
    result = gdl(cfg_path, "scheduler")
    assert result.returncode == EXIT_USAGE
    assert "invalid choice: 'scheduler'" in result.stderr


# --------------------------------------------------------------------------- enqueue

@pytest.mark.timeout(120)
def test_enqueue_1000_urls_then_wait_reports_1000_succeeded(tmp_path: Path, redis_server, store: Store,
                                                           gdl_process, receiver: CallbackReceiver) -> None:
    port = free_port()
    cfg = make_config(tmp_path, redis_server.url, api={"port": port, "batch_max_jobs": 300},
                      notifier={"concurrency": 20})
    proc = gdl_process(cfg)
    wait_until(lambda: heartbeat(port) == 200 or proc.process.poll() is not None, timeout=15)
    assert heartbeat(port) == 200, proc.output()
    with LoopbackServer() as files:
        files.add("/f", body=b"0123456789" * 100)
        urls = tmp_path / "urls.txt"
        urls.write_text("# a comment, then a blank line\n\n"
                        + "".join(f"{files.url('/f')}?n={i}\n" for i in range(1000)))
        result = gdl(proc.cfg_path, "enqueue", str(urls), "--aggr", "bulk", "--limit", "50",
                     "--callback", receiver.url("/cb"), "--extra", "batch-7", "--wait", "--timeout", "90",
                     timeout=110)
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert files.count("/f") == 1000
    assert table_rows(result.stdout, "result") == {"succeeded": ["1000"]}
    assert result.stdout.rstrip().endswith("1000 succeeded, 0 not")
    assert "accepted 1000 of 1000 job(s)" in result.stderr
    assert re.search(r"enqueue: 100%\|.*\| 1000/1000 .*accepted/s\]", result.stderr), result.stderr
    assert re.search(r"finished: 100%\|.*\| 1000/1000 ", result.stderr), result.stderr
    bodies = receiver.bodies("/cb")
    assert len(bodies) == 1000 and len({b["job_id"] for b in bodies}) == 1000
    assert {(b["success"], b["extra"]) for b in bodies} == {(True, "batch-7")}
    assert {b["resource_url"] for b in bodies} == {f"{files.url('/f')}?n={i}" for i in range(1000)}
    # Submitted api.batch_max_jobs at a time through POST /download/batch.
    assert sorted(re.findall(r"api: batch of (\d+) job\(s\): \1 accepted", proc.output())) == \
        ["100", "300", "300", "300"]


def test_enqueue_json_lines_rejections_and_a_failure_summary(run_service, store: Store,
                                                             receiver: CallbackReceiver) -> None:
    api = run_service()
    cfg_path = config_file(Path(api.service.cfg.processor.storage_dir).parent, api.service.cfg, name="cli.yaml")
    with LoopbackServer() as files:
        files.add("/ok", body=b"ok")
        lines = "\n".join([
            files.url("/ok"),
            json.dumps({"url": files.url("/ok"), "aggr_id": "other", "extra": "per-line"}),
            json.dumps({"url": files.url("/gone")}),
            "ftp://example.com/x",
            "{not json",
            json.dumps({"url": files.url("/ok"), "aggr_limit": 0}),
        ]) + "\n"
        result = gdl(cfg_path, "enqueue", "-", "--api", api.base, "--aggr", "main", "--limit", "2",
                     "--callback", receiver.url("/cb"), "--wait", "--print-ids", "--quiet", stdin=lines)
    assert result.returncode == EXIT_PROBLEMS, result.stderr
    assert "accepted 3 of 6 job(s)" in result.stderr
    assert "  line 4: 400 url: must be an http:// or https:// URL" in result.stderr
    assert "  line 5: not a JSON object: " in result.stderr
    assert "  line 6: 400 aggr_limit: must be between 1 and 10000, got 0" in result.stderr
    ids = [line.split("\t") for line in result.stdout.splitlines() if "\t" in line]
    assert [url for _, url in ids] == [files.url("/ok"), files.url("/ok"), files.url("/gone")]
    second = api.get(f"/jobs/{ids[1][0]}").json()
    assert (second["aggr_id"], second["aggr_limit"], second["extra"]) == ("other", 2, "per-line")
    assert table_rows(result.stdout, "result") == {
        "succeeded": ["2"], "download failed: Received status code 404 Not Found": ["1"]}


def test_enqueue_without_a_reachable_api_is_exit_2(cfg_path: Path) -> None:
    result = gdl(cfg_path, "enqueue", "-", "--api", f"http://127.0.0.1:{free_port()}", "--aggr", "a", "--limit", "1",
                 "--callback", "http://cb.example/", "--quiet", stdin="http://example.com/a\n")
    assert result.returncode == EXIT_USAGE
    assert "cannot reach the API at http://127.0.0.1:" in result.stderr


# --------------------------------------------------------------------------- status and job

@pytest.fixture
def slow_server():
    server = HoldServer(hold=60)
    yield server
    server.stop()


def test_status_shows_processes_aggregations_and_queue_depths(slow_server: HoldServer, run_service,
                                                              store: Store) -> None:
    running = run_service()
    cfg_path = config_file(Path(running.service.cfg.processor.storage_dir).parent, running.service.cfg,
                           name="cli.yaml")
    for aggr, limit, count in (("alpha", 2, 5), ("beta", 1, 2)):
        for i in range(count):
            running.enqueue(url=slow_server.url(f"/hold/{aggr}/{i}"), aggr_id=aggr, aggr_limit=limit,
                            callback_url="http://cb.example/")
    wait_until(lambda: sum(slow_server.current.values()) == 3)
    wait_until(lambda: store.heartbeats(forget_before=0))
    result = gdl(cfg_path, "status")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("gdl status at ")
    procs = table_rows(result.stdout, "process")
    token = running.service.token
    assert procs[token][:3] == ["live", "api,processor,notifier", str(os.getpid())]
    aggrs = table_rows(result.stdout, "aggregation")
    # pending, due now, in flight, limit, lease holder
    assert [row[:5] for row in (aggrs["alpha"], aggrs["beta"])] == [
        ["3", "3", "2", "2", token], ["1", "1", "1", "1", token]]
    assert aggrs["alpha"][5].endswith(" ago")
    queues = table_rows(result.stdout, "queue")
    assert queues["aggregations with queued jobs"] == ["2"]
    assert queues["downloads queued"] == ["4"]
    assert queues["downloads in flight"] == ["3"]
    assert queues["callbacks failed"] == ["0"]
    as_json = json.loads(gdl(cfg_path, "status", "--json").stdout)
    assert [(a["aggr_id"], a["in_flight"]) for a in as_json["aggregations"]] == [("alpha", 2), ("beta", 1)]


def test_job_shows_its_record_and_attempts(run_service, store: Store, receiver: CallbackReceiver) -> None:
    running = run_service(processor={"max_retries": 1})
    cfg_path = config_file(Path(running.service.cfg.processor.storage_dir).parent, running.service.cfg,
                           name="cli.yaml")
    receiver.answer("/cb", 502)
    with LoopbackServer() as files:
        files.add("/busy", b"", status=503)
        job_id = running.enqueue(url=files.url("/busy"), aggr_id="a", aggr_limit=1, callback_url=receiver.url("/cb"))
        wait_until(lambda: store.redis.hget(keys.job_key(job_id), "callback_state") == "delivered", timeout=15)
    result = gdl(cfg_path, "job", job_id)
    assert result.returncode == 0, result.stderr
    fields = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in result.stdout.split("\n\n")[0].splitlines())
    assert (fields["id"], fields["state"], fields["attempts"], fields["response_code"]) == (job_id, "failed", "2",
                                                                                            "503")
    assert fields["url"] == files.url("/busy")
    assert (fields["callback_state"], fields["callback_attempts"], fields["callback_code"]) == ("delivered", "2",
                                                                                               "200")
    attempts = table_rows(result.stdout, "#")
    assert [row[:3] for row in attempts.values()] == [
        ["download", "1", "retry"], ["download", "2", "failed"], ["callback", "1", "retry"],
        ["callback", "2", "delivered"]]
    error = "Received status code 503 Service Unavailable"
    assert [row[-2:] for row in attempts.values()][:2] == [["503", error], ["503", error]]
    assert attempts["3"][-2] == "502" and attempts["4"][-1] == "200"
    data = json.loads(gdl(cfg_path, "job", job_id, "--json").stdout)
    assert [a["outcome"] for a in data["attempts_log"]] == ["retry", "failed", "retry", "delivered"]
    missing = gdl(cfg_path, "job", "AbCdEfGhIjKlMn")
    assert (missing.returncode, missing.stderr) == (EXIT_PROBLEMS, "gdl: job AbCdEfGhIjKlMn does not exist\n")


# --------------------------------------------------------------------------- retry-failed

def test_job_shows_when_the_next_callback_retry_is_due(run_service, store: Store, files, caplog,
                                                      receiver: CallbackReceiver) -> None:
    caplog.set_level(logging.INFO, logger="gdl.notifier")
    running = run_service(notifier={"retry_backoff": 600})
    cfg_path = config_file(Path(running.service.cfg.processor.storage_dir).parent, running.service.cfg,
                           name="cli.yaml")
    receiver.answer("/cb", 503)
    files.add("/a", b"data")
    job_id = running.enqueue(url=files.url("/a"), aggr_id="a", aggr_limit=1, callback_url=receiver.url("/cb"))
    record = wait_until(lambda: (r := running.get(f"/jobs/{job_id}").json())["callback_attempts"] == 1 and r)
    failed_at = record["attempts_log"][-1]["at"]
    assert record["callback_state"] == "queued"
    assert record["callback_due_at"] == failed_at + 600_000  # the first retry waits 1 * retry_backoff
    assert record["attempts_log"][-1]["next_at"] == failed_at + 600_000
    [line] = [m for m in caplog.messages if m.startswith(f"job {job_id}: ") and "retry" in m]
    assert line.endswith("503; retry 1 of 2 in 600s"), line  # the error's words are the HTTP backend's
    result = gdl(cfg_path, "job", job_id)
    fields = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in result.stdout.split("\n\n")[0].splitlines())
    assert re.fullmatch(rf"{failed_at + 600_000} \(\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d, in (10m( 0s)?|9m \d+s)\)",
                        fields["callback_due_at"]), fields["callback_due_at"]


def plant_failed_callback(store: Store, aggr: str, callback: str, error: str = "callback answered 500") -> str:
    """A job whose download succeeded and whose callback then failed, through the store's own steps."""
    job = store.enqueue(Job(id=new_id(), url="http://example.com/a", aggr_id=aggr, aggr_limit=5,
                            callback_type="http", callback_dst=callback), now=now_ms())
    [held] = take_holding_lease(store, aggr, "planter", now=now_ms(), count=1, deadline=now_ms() + 60_000).jobs
    assert store.finish_download(held, "planter", state=JobState.SUCCEEDED, outcome=DownloadOutcome(1), now=now_ms(),
                                 forget_at=now_ms() + 60_000, log_entry={})
    taken = store.take_callbacks("planter", now=now_ms(), count=100, deadline=now_ms() + 60_000).jobs
    [cb] = [j for j in taken if j.id == job.id]
    assert store.callback_failed(cb, "planter", outcome=CallbackOutcome(3, error=error, code=500), now=now_ms(),
                                 log_entry={})
    return job.id


def test_retry_failed_reschedules_planted_failed_callbacks(run_service, store: Store, cfg_path: Path,
                                                           receiver: CallbackReceiver) -> None:
    shop = [plant_failed_callback(store, "shop", receiver.url("/cb")) for _ in range(3)]
    other = plant_failed_callback(store, "other", receiver.url("/cb"))
    assert store.failed_callback_count() == 4

    dry = gdl(cfg_path, "retry-failed", "--aggr", "shop", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert set(table_rows(dry.stdout, "job")) == set(shop)
    assert all(row == ["shop", "500", "callback answered 500"] for row in table_rows(dry.stdout, "job").values())
    assert dry.stdout.rstrip().endswith("3 failed callback(s) of aggregation shop would be queued again (dry run)")
    assert store.redis.zcard(keys.CALLBACK_QUEUE) == 0

    run_service(roles=("notifier",))  # a real notifier delivers what is queued again
    result = gdl(cfg_path, "retry-failed", "--aggr", "shop")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("queued 3 failed callback(s) of aggregation shop again")
    wait_until(lambda: len(receiver.bodies()) == 3)
    assert sorted(b["job_id"] for b in receiver.bodies()) == sorted(shop)
    wait_until(lambda: all(store.redis.hget(keys.job_key(i), "callback_state") == "delivered" for i in shop))
    assert [job.id for job, _ in store.failed_callbacks()] == [other]

    rest = gdl(cfg_path, "retry-failed")
    assert rest.stdout.rstrip().endswith("queued 1 failed callback(s) again")
    wait_until(lambda: len(receiver.bodies()) == 4)
    assert store.failed_callback_count() == 0


def test_retry_failed_dry_run_marks_a_cut_error(store: Store, cfg_path: Path) -> None:
    long_error = "callback to http://hooks.example/cb failed: " + "x" * 100
    job_id = plant_failed_callback(store, "long", "http://hooks.example/cb", error=long_error)
    short_id = plant_failed_callback(store, "short", "http://hooks.example/cb", error="callback answered 500")
    dry = gdl(cfg_path, "retry-failed", "--dry-run")
    rows = table_rows(dry.stdout, "job")
    assert rows[job_id][2] == long_error[:79] + "…"
    assert len(rows[job_id][2]) == 80
    assert rows[short_id][2] == "callback answered 500"  # not cut: no ellipsis


# --------------------------------------------------------------------------- fsck

def test_fsck_finds_then_fixes_orphan_file_dangling_entry_and_more(cfg_path: Path, store: Store,
                                                                   tmp_path: Path) -> None:
    rootdir = tmp_path / "files"
    now = now_ms()
    # Healthy: a queued job, and a stored file whose job exists.
    healthy = store.enqueue(Job(id=new_id(), url="http://example.com/a", aggr_id="fine", aggr_limit=1,
                                callback_type="http", callback_dst="http://cb.example/"), now=now)
    (rootdir / healthy.id[:3]).mkdir(parents=True)
    (rootdir / healthy.id[:3] / healthy.id).write_bytes(b"kept")
    # Planted: a file with no job, a queue entry with no job (and its due index entry),
    # a download held past its deadline, a failed callback missing from the retry list.
    orphan = rootdir / "Orp" / "OrphanFile0001"
    orphan.parent.mkdir()
    orphan.write_bytes(b"nobody's")
    store.redis.zadd(keys.queue_key("ghost"), {"DanglingEntry1": now})
    store.redis.zadd(keys.DUE_INDEX, {"ghost": now})
    expired = store.enqueue(Job(id=new_id(), url="http://example.com/b", aggr_id="held", aggr_limit=1,
                                callback_type="http", callback_dst="http://cb.example/"), now=now)
    take_holding_lease(store, "held", "dead-process", now=now, count=1, deadline=now - 1)
    legacy = store.enqueue(Job(id=new_id(), url="http://example.com/c", aggr_id="legacy", aggr_limit=1,
                               callback_type="http", callback_dst="http://cb.example/"), now=now)
    store.redis.hset(keys.job_key(legacy.id), mapping={"state": "failed", "callback_state": "failed"})
    store.redis.zrem(keys.queue_key("legacy"), legacy.id)
    store.redis.zrem(keys.DUE_INDEX, "legacy")

    check = gdl(cfg_path, "fsck")
    assert check.returncode == EXIT_PROBLEMS, check.stderr
    found = table_rows(check.stdout, "check")
    assert {name: row[0] for name, row in found.items()} == {
        "orphan files": "1", "missing files": "0", "expired in-flight": "1", "dangling entries": "1",
        "stale due index": "0", "failed index": "1"}
    assert "  OrphanFile0001" in check.stdout
    assert "  queue:ghost DanglingEntry1" in check.stdout
    assert f"  downloads {expired.id}" in check.stdout
    assert check.stdout.rstrip().endswith("4 problem(s) found; gdl fsck --fix repairs them")
    assert orphan.exists() and store.redis.zcard(keys.queue_key("ghost")) == 1  # a check changes nothing

    fix = gdl(cfg_path, "fsck", "--fix")
    assert fix.returncode == 0, (fix.stdout, fix.stderr)
    fixed = table_rows(fix.stdout, "check")
    assert {name: row[:2] for name, row in fixed.items() if row[0] != "0"} == {
        "orphan files": ["1", "1"], "expired in-flight": ["1", "1"], "dangling entries": ["1", "1"],
        "failed index": ["1", "1"]}
    assert fix.stdout.rstrip().endswith("4 problem(s) found, 4 fixed")
    assert not orphan.exists()
    assert (rootdir / healthy.id[:3] / healthy.id).read_bytes() == b"kept"
    assert store.redis.exists(keys.queue_key("ghost")) == 0
    assert store.redis.zscore(keys.DUE_INDEX, "ghost") is None
    assert store.redis.zscore(keys.queue_key("fine"), healthy.id) == now
    assert store.redis.zscore(keys.DUE_INDEX, "fine") == now
    assert store.redis.zscore(keys.queue_key("held"), expired.id) is not None  # swept back to its queue
    assert [job.id for job, _ in store.failed_callbacks()] == [legacy.id]

    again = gdl(cfg_path, "fsck")
    assert again.returncode == 0, again.stdout
    assert again.stdout.rstrip().endswith("all consistent")


# --------------------------------------------------------------------------- embedded Redis

def test_commands_join_a_running_embedded_redis_and_never_start_one(tmp_path: Path, gdl_process) -> None:
    data_dir = tmp_path / "redis"
    port = free_port()
    cfg = make_config(tmp_path, "embedded", redis={"embedded_dir": str(data_dir)}, api={"port": port})
    path = config_file(tmp_path, cfg, name="embedded.yaml")

    alone = gdl(path, "status")
    assert alone.returncode == EXIT_USAGE
    assert alone.stderr.splitlines() == [
        f"gdl: redis.embedded_dir: no gdl is running on {data_dir} ({data_dir / 'redis.sock'} does not exist); "
        "start gdl first"]
    assert not (data_dir / "redis.sock").exists() and not (data_dir / "redis.pid").exists()

    proc = gdl_process(path, "api")
    wait_until(lambda: heartbeat(port) == 200 or proc.process.poll() is not None, timeout=15)
    assert heartbeat(port) == 200, proc.output()
    pid = int((data_dir / "redis.pid").read_text())
    result = gdl(path, "status")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: "live" in gdl(path, "status").stdout)
    [row] = table_rows(gdl(path, "status").stdout, "process").values()
    assert row[:3] == ["live", "api", str(proc.process.pid)]
    assert int((data_dir / "redis.pid").read_text()) == pid  # the same server, joined


# --------------------------------------------------------------------------- cancel, aggr purge

def test_cancel_and_aggr_purge_from_the_shell(run_service, store: Store, cfg_path: Path) -> None:
    api = run_service(("api",))  # no processor: the jobs stay queued
    jobs = [api.enqueue(url=f"http://127.0.0.1:9/{n}", aggr_id="shop", aggr_limit=1,
                        callback_url="http://127.0.0.1:9/cb") for n in range(4)]
    result = gdl(cfg_path, "cancel", jobs[0], "--no-callback")
    assert (result.returncode, result.stdout) == (EXIT_OK, f"job {jobs[0]}: cancelled\n"), result.stderr
    assert store.get_job(jobs[0]).status.callback_state == "none"
    result = gdl(cfg_path, "aggr", "purge", "shop")
    assert (result.returncode, result.stdout) == \
        (EXIT_OK, "aggregation shop: purging 3 queued job(s) and 0 in flight\n")
    assert len(store.purges()) == 1  # left to the processors
    assert gdl(cfg_path, "aggr", "purge", "never-seen").returncode == EXIT_PROBLEMS
    unknown = gdl(cfg_path, "cancel", "x" * 14)
    assert (unknown.returncode, unknown.stdout) == (EXIT_PROBLEMS, f"job {'x' * 14}: no such job\n")


def test_enqueue_wait_counts_a_cancelled_job_as_finished_with_its_reason() -> None:
    from gdl.commands.enqueue import outcome

    record = {"state": "cancelled", "callback_state": "delivered", "error": "cancelled by request",
              "callback_error": ""}
    assert outcome(record) == "cancelled by request"
    assert outcome({**record, "callback_state": "queued"}) is None  # its callback is still to come
    assert outcome({**record, "callback_state": "none", "error": "cancelled: aggregation shop purged"}) == \
        "cancelled: aggregation shop purged"
