"""Disk calls run in gevent's threadpool: what they return or raise comes back
to the calling greenlet, and a failure reaches stderr only through gdl's
logging, once (gevent's hub would print its own traceback besides)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from gdl import diskio
from tests.conftest import free_port, make_config, wait_until


def test_a_result_comes_back_from_the_pool() -> None:
    assert diskio.off_hub(divmod, 17, 5) == (3, 2)


def test_an_exception_is_raised_in_the_caller(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError) as info:
        diskio.off_hub(os.listdir, str(blocker / "sub"))
    assert info.value.filename == str(blocker / "sub")


def test_mkstemp_failure_is_raised_in_the_caller(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        diskio.mkstemp(str(tmp_path / "missing"), "x.")


# The failure as a process shows it: a pool thread's NotADirectoryError, once, as gdl's JSON log line.
SCRIPT = """
import logging
from gevent import monkey
monkey.patch_all()
from gdl import diskio, logs
logs.setup("info", "json")
log = logging.getLogger("gdl.test")
try:
    diskio.off_hub(__import__("os").listdir, {path!r})
except NotADirectoryError as exc:
    log.warning("disk call failed: %s", exc)
import gevent
gevent.sleep(0.2)  # the hub's callbacks have run: anything it would print is printed
"""


def test_a_failed_disk_call_reaches_stderr_once_through_logging(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = subprocess.run([sys.executable, "-c", SCRIPT.format(path=str(blocker / "sub"))], capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    [line] = result.stderr.splitlines()
    record = json.loads(line)
    assert (record["level"], record["logger"]) == ("warning", "gdl.test")
    assert record["message"] == f"disk call failed: [Errno 20] Not a directory: '{blocker / 'sub'}'"


CRASH = """
from gevent import monkey
monkey.patch_all()
import gevent
from gdl import logs
logs.setup("info", "json")
gevent.spawn(lambda: 1 / 0).join()
"""


def test_anything_else_gevent_would_print_goes_through_logging_too() -> None:
    result = subprocess.run([sys.executable, "-c", CRASH], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    [line] = result.stderr.splitlines()  # the traceback is inside the one JSON line
    record = json.loads(line)
    assert (record["level"], record["logger"]) == ("error", "gdl.gevent")
    assert record["message"].endswith("failed with ZeroDivisionError: division by zero")
    assert record["exception"].startswith("Traceback") and "ZeroDivisionError" in record["exception"]


def test_storage_failing_under_a_running_service_is_logged_as_json_only(tmp_path: Path, redis_server, files,
                                                                        gdl_process) -> None:
    files.add("/a", b"small body")
    port = free_port()
    cfg = make_config(tmp_path, redis_server.url, api={"port": port}, processor={"retry_backoff": 0.2})
    proc = gdl_process(cfg, "--log-format", "json")  # every role in one process
    wait_until(lambda: _heartbeat(port) == 200, timeout=15)
    rootdir = Path(cfg.processor.filestorage["rootdir"])
    shutil.rmtree(rootdir, ignore_errors=True)
    rootdir.write_text("")  # the file storage's root is now a file: every store fails with NotADirectoryError
    response = requests.post(f"http://127.0.0.1:{port}/download", timeout=5, json={
        "url": files.url("/a"), "aggr_id": "disk", "aggr_limit": 1, "callback_url": "http://127.0.0.1:9/cb"})
    assert response.status_code == 201, response.text
    wait_until(lambda: proc.output().count("internal error") >= 2, timeout=20)  # retried: not one attempt counted
    proc.stop()
    lines = proc.output().splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON: nothing printed beside logging
    failures = [r for r in records if "internal error" in r["message"]]
    assert failures and all(r["message"].endswith("Not a directory") for r in failures), failures
    assert {(r["aggr_id"], len(r["job_id"])) for r in failures} == {("disk", 14)}  # both ids lifted into fields
    assert not any("Traceback" in line or "ThreadPoolWorker" in line for line in lines)


def _heartbeat(port: int) -> int:
    try:
        return requests.get(f"http://127.0.0.1:{port}/hb", timeout=2).status_code
    except requests.ConnectionError:
        return 0


def test_shared_trips_give_each_caller_its_own_result_or_error(tmp_path: Path) -> None:
    import gevent

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    sharer = diskio.TripSharer(gevent.get_hub())

    def call(i: int) -> object:
        if i % 5 == 0:
            with pytest.raises(NotADirectoryError):
                sharer.run(os.listdir, (str(blocker / "sub"),))
            return "raised"
        return sharer.run(divmod, (i, 3))

    calls = [gevent.spawn(call, i) for i in range(40)]
    gevent.joinall(calls, raise_error=True)

    assert [g.value for g in calls] == ["raised" if i % 5 == 0 else divmod(i, 3) for i in range(40)]
    assert sharer.calls == 40
    assert sharer.batches < 40  # calls queued behind a trip went together
    assert not sharer._pending and sharer._trips == 0


def test_shared_trip_is_taken_by_a_lone_call() -> None:
    assert diskio.off_hub_shared(divmod, 17, 5) == (3, 2)
