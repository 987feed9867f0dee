"""The ``gdl`` command run for real: its version, the one-line exit-2 failures
the contract promises, a clean SIGTERM, and the embedded Redis shared by two
processes and stopped by the last one."""

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import requests
import yaml

from tests.conftest import config_file, free_port, make_config, wait_until

EXIT_USAGE = 2
ROOT = Path(__file__).resolve().parent.parent
JOB = {"url": "http://example.com/a.png", "aggr_id": "cli", "aggr_limit": 1, "callback_url": "http://cb.example/"}


def run_gdl(cwd: Path, *args: str, env: dict[str, str] | None = None,
            timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gdl.cli", *args], cwd=str(cwd), capture_output=True, text=True,
                          check=False, timeout=timeout, env={**os.environ, **(env or {})})


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """Exit status 2 and exactly one line on stderr, which is returned."""
    assert result.returncode == EXIT_USAGE, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    return lines[0]


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def heartbeat(port: int) -> int:
    try:
        return requests.get(f"http://127.0.0.1:{port}/hb", timeout=2).status_code
    except requests.ConnectionError:
        return 0


def stop(proc, timeout: float = 10) -> int:
    """SIGTERM ``proc`` and return its exit status, which must come within ``timeout``."""
    proc.signal(signal.SIGTERM)
    started = time.monotonic()
    status = proc.wait(timeout=timeout)
    assert time.monotonic() - started < timeout
    return status


def test_version_names_both_engines(tmp_path: Path) -> None:
    import pycurl

    result = run_gdl(tmp_path, "--version")
    libcurl = pycurl.version_info()[1]
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (f"gdl 0.1.0 (engines: curl available (libcurl {libcurl}), "
                             f"requests available (requests {requests.__version__}))\n")


def test_version_says_when_pycurl_is_missing(tmp_path: Path) -> None:
    result = run_python_without_pycurl(tmp_path, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("gdl 0.1.0 (engines: curl unavailable: pycurl cannot be imported (")
    assert result.stdout.endswith(f"), requests available (requests {requests.__version__}))\n")


def test_the_curl_engine_without_pycurl_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "gdl.yaml", {"http": {"engine": "curl"}})
    line = one_error_line(run_python_without_pycurl(tmp_path, "--config", str(path), "api"))
    assert line.startswith("gdl: http.engine: curl cannot run: pycurl cannot be imported ("), line
    assert line.endswith("; install it (pip install pycurl) or set http.engine: requests"), line


def test_an_unknown_engine_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "gdl.yaml", {"http": {"engine": "urllib"}})
    line = one_error_line(run_gdl(tmp_path, "--config", str(path), "api"))
    assert line == "gdl: http.engine: must be curl or requests (got 'urllib')"


def run_python_without_pycurl(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``gdl ARGS`` in a Python where ``import pycurl`` fails, as on a platform without its wheel."""
    code = f"import sys; sys.modules['pycurl'] = None; from gdl.cli import main; sys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=str(cwd), capture_output=True, text=True, check=False,
                          timeout=20)


@pytest.mark.parametrize(("data", "env", "key"), [
    ({"processor": {"disk": {"high": 150}}}, {}, "processor.disk.high"),
    ({"processor": {"disk": {"high": 80, "low": 85}}}, {}, "processor.disk.low"),
    ({"api": {"prot": 8000}}, {}, "api.prot"),
    ({"redis": {"url": "http://localhost"}}, {}, "redis.url"),
    ({}, {"GDL_API_PORT": "eighty"}, "GDL_API_PORT (api.port)"),
])
def test_bad_config_value_is_one_line_and_exit_2(tmp_path: Path, data: dict, env: dict, key: str) -> None:
    path = write_yaml(tmp_path / "gdl.yaml", data)
    line = one_error_line(run_gdl(tmp_path, "--config", str(path), env=env))
    assert line.startswith(f"gdl: {key}: "), line


def test_typo_in_an_environment_variable_is_one_line_and_exit_2(tmp_path: Path) -> None:
    line = one_error_line(run_gdl(tmp_path, env={"GDL_PROCESOR_DISK_HIGH": "80"}))
    assert line == "gdl: GDL_PROCESOR_DISK_HIGH: no such setting; did you mean GDL_PROCESSOR_DISK_HIGH?"


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    line = one_error_line(run_gdl(tmp_path, env={"GDL_PROCESSOR_DISK_HIGH": "abc"}))
    assert line == "gdl: GDL_PROCESSOR_DISK_HIGH (processor.disk.high): must be a number (got 'abc')"


def test_bad_log_level_from_the_environment_is_one_line_and_exit_2(tmp_path: Path) -> None:
    line = one_error_line(run_gdl(tmp_path, "status", env={"GDL_LOG_LEVEL": "loud"}))
    assert line == "gdl: GDL_LOG_LEVEL: must be one of debug, info, warning, error (got 'loud')"


# Makes python-magic's own loader find no libmagic, as on a machine without the package:
# find_library answers None and loading the library by name fails.
HIDE_LIBMAGIC = """
import ctypes, ctypes.util
_find, _init = ctypes.util.find_library, ctypes.CDLL.__init__
ctypes.util.find_library = lambda name: None if name == "magic" else _find(name)
def _refuse(self, name, *args, **kwargs):
    if name and "magic" in str(name):
        raise OSError(f"{name}: cannot open shared object file: No such file or directory")
    _init(self, name, *args, **kwargs)
ctypes.CDLL.__init__ = _refuse
"""


@pytest.mark.parametrize("role", [[], ["processor"]])
def test_without_libmagic_the_service_says_how_to_install_it(tmp_path: Path, role: list[str]) -> None:
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE_LIBMAGIC)
    path = config_file(tmp_path, make_config(tmp_path, f"redis://127.0.0.1:{free_port()}/0"))
    pythonpath = os.pathsep.join([str(hide), str(ROOT), os.environ.get("PYTHONPATH", "")])
    line = one_error_line(run_gdl(tmp_path, "--config", str(path), *role, env={"PYTHONPATH": pythonpath}))
    assert line == ("gdl: libmagic, needed to sniff mime types, cannot be loaded (failed to find libmagic.  Check "
                    "your installation): install it with `apt-get install libmagic1` (Debian, Ubuntu) or "
                    "`brew install libmagic` (macOS)")


def test_without_the_magic_database_the_processor_says_how_to_install_it(tmp_path: Path) -> None:
    path = config_file(tmp_path, make_config(tmp_path, f"redis://127.0.0.1:{free_port()}/0"))
    # libmagic reads its database from $MAGIC when set: here, from nowhere
    line = one_error_line(run_gdl(tmp_path, "--config", str(path), "processor",
                                  env={"MAGIC": str(tmp_path / "no-such.mgc")}))
    assert line == ("gdl: libmagic cannot load its database (could not find any valid magic files!): install it "
                    "with `apt-get install libmagic1` (Debian, Ubuntu) or `brew install libmagic` (macOS)")


def test_with_libmagic_left_visible_the_same_setup_gets_as_far_as_redis(tmp_path: Path) -> None:
    # The control for the test above: the same sitecustomize with the hiding left out starts gdl
    # as far as Redis (absent here), so the line above is the library's doing.
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import ctypes\n")
    port = free_port()
    path = config_file(tmp_path, make_config(tmp_path, f"redis://127.0.0.1:{port}/0"))
    pythonpath = os.pathsep.join([str(hide), str(ROOT), os.environ.get("PYTHONPATH", "")])
    line = one_error_line(run_gdl(tmp_path, "--config", str(path), env={"PYTHONPATH": pythonpath}))
    assert line.startswith("gdl: redis.url: "), line


def test_invalid_yaml_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "gdl.yaml"
    path.write_text("api: {port: 8000\n")
    line = one_error_line(run_gdl(tmp_path, "--config", str(path)))
    assert str(path) in line and "YAML" in line


def test_missing_config_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "gdl.yaml"
    line = one_error_line(run_gdl(tmp_path, "--config", str(path)))
    assert str(path) in line


def test_unreachable_redis_names_the_address(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    path = config_file(tmp_path, make_config(tmp_path, f"redis://127.0.0.1:{port}/0"))
    started = time.monotonic()
    line = one_error_line(run_gdl(tmp_path, "--config", str(path), timeout=15))
    assert time.monotonic() - started < 10
    assert line.startswith("gdl: redis.url: "), line
    assert f"127.0.0.1:{port}" in line


@pytest.mark.parametrize(("role", "key", "dir_key"), [
    ("processor", "processor.storage_dir", "storage_dir"),
    ("api", "processor.filestorage.rootdir", "rootdir"),
])
def test_unwritable_directory_names_its_key(tmp_path: Path, redis_server, role: str, key: str,
                                            dir_key: str) -> None:
    blocker = tmp_path / "a-regular-file"
    blocker.write_text("")  # tests run as root: a file in the way stops even root
    bad = str(blocker / "sub")
    section = {"storage_dir": bad} if dir_key == "storage_dir" else {"filestorage": {"rootdir": bad}}
    path = config_file(tmp_path, make_config(tmp_path, redis_server.url, processor=section))
    line = one_error_line(run_gdl(tmp_path, "--config", str(path), role))
    assert line.startswith(f"gdl: {key}: "), line
    assert bad in line


def test_port_in_use_names_api_port(tmp_path: Path, redis_server) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = config_file(tmp_path, make_config(tmp_path, redis_server.url, api={"port": port}))
        line = one_error_line(run_gdl(tmp_path, "--config", str(path), "api"))
    assert line.startswith("gdl: api.port: "), line
    assert str(port) in line


def test_api_role_serves_then_exits_0_on_sigterm(tmp_path: Path, redis_server, gdl_process) -> None:
    port = free_port()
    proc = gdl_process(make_config(tmp_path, redis_server.url, api={"port": port}), "api")
    wait_until(lambda: heartbeat(port) == 200, timeout=15)
    response = requests.post(f"http://127.0.0.1:{port}/download", json=JOB, timeout=5)
    assert response.status_code == 201, response.text
    assert stop(proc) == 0, proc.output()
    assert heartbeat(port) == 0


def test_the_service_lifts_its_open_files_limit_to_the_hard_one(tmp_path: Path, redis_server) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        hard = 4096  # the child may lower its hard limit, not raise it
    port = free_port()
    path = config_file(tmp_path, make_config(tmp_path, redis_server.url, api={"port": port}))
    proc = subprocess.Popen([sys.executable, "-m", "gdl.cli", "--config", str(path), "api"], cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
    try:
        wait_until(lambda: heartbeat(port) == 200, timeout=15)
        assert resource.prlimit(proc.pid, resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=15)
    assert f"open files: limit raised from 256 to {hard}" in output


# --------------------------------------------------------------------------- embedded Redis

def socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(2)
        try:
            sock.connect(str(path))
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


def appendfsync(path: Path) -> str:
    client = redis.Redis(unix_socket_path=str(path), decode_responses=True)
    try:
        return client.config_get("appendfsync")["appendfsync"]
    finally:
        client.close()


def process_gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaped yet (its parent gdl exited first)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_embedded_redis_shared_and_stopped_by_the_last_process(tmp_path: Path, gdl_process) -> None:
    data_dir = tmp_path / "redis"
    sock = data_dir / "redis.sock"
    assert len(str(sock)) < 100

    def start(name: str):
        port = free_port()
        cfg = make_config(tmp_path, "embedded", redis={"embedded_dir": str(data_dir)}, api={"port": port})
        proc = gdl_process(cfg, "api", name=name)
        wait_until(lambda: heartbeat(port) == 200 or proc.process.poll() is not None, timeout=15)
        assert heartbeat(port) == 200, proc.output()
        return proc, f"http://127.0.0.1:{port}"

    first, first_url = start("first.yaml")
    assert socket_answers(sock)
    assert appendfsync(sock) == "always"  # a 201 means the job is on disk (redis.embedded_fsync)
    pid = int((data_dir / "redis.pid").read_text())
    assert not process_gone(pid)

    second, second_url = start("second.yaml")
    assert int((data_dir / "redis.pid").read_text()) == pid  # joined, not started anew
    assert "joining" in second.output()

    response = requests.post(f"{first_url}/download", json=JOB, timeout=5)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    job = requests.get(f"{second_url}/jobs/{job_id}", timeout=5)
    assert job.status_code == 200 and job.json()["url"] == JOB["url"]

    # The process that started the server leaves it running for the other one.
    assert stop(first) == 0, first.output()
    assert not process_gone(pid)
    assert requests.get(f"{second_url}/jobs/{job_id}", timeout=5).json()["state"] == "queued"

    # The last one shuts it down.
    assert stop(second) == 0, second.output()
    wait_until(lambda: process_gone(pid), timeout=10)
    assert not socket_answers(sock)

    # And the data outlives the server: a new process starts it again and finds the job.
    third, third_url = start("third.yaml")
    assert requests.get(f"{third_url}/jobs/{job_id}", timeout=5).json()["id"] == job_id
    new_pid = int((data_dir / "redis.pid").read_text())
    assert new_pid != pid
    assert stop(third) == 0, third.output()
    wait_until(lambda: process_gone(new_pid), timeout=10)
    assert not socket_answers(sock)
