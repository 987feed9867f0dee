"""Patch first, and prove it: importing ``gdl.cli`` monkey-patches gevent
before anything imports socket, ssl, requests or redis, without gevent's
"patched too late" warning. Checked in fresh interpreters, where nothing has
been imported yet (this test process was patched by conftest long ago).

Note: ``-W error::gevent.monkey.MonkeyPatchWarning`` cannot do this: at
interpreter start the warnings machinery cannot import ``gevent.monkey`` and
drops the option ("Invalid -W option ignored"). ``-W error`` turns every
warning, MonkeyPatchWarning included, into an exception instead, and the
control test below shows that it does catch a late patch.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NETWORK_MODULES = ("socket", "ssl", "select", "selectors", "http.client", "urllib3", "requests", "redis")

PROBE = """
import json, sys, warnings
assert any(f[0] == "error" and f[2] is Warning for f in warnings.filters), warnings.filters
NETWORK = {network!r}
loaded = lambda: sorted(m for m in NETWORK if m in sys.modules)
out = {{"at_start": loaded()}}
{before}
import gdl
out["after_gdl_package"] = loaded()
import gdl.cli
import gevent.monkey, gevent.socket, socket
out["after_cli"] = loaded()
out["patched"] = {{m: gevent.monkey.is_module_patched(m) for m in ("socket", "ssl", "select", "threading", "time")}}
out["socket_is_gevent"] = socket.socket is gevent.socket.socket
import gdl.service, redis.connection, urllib3.util.connection
out["redis_socket_is_gevent"] = redis.connection.socket.socket is gevent.socket.socket
out["urllib3_socket_is_gevent"] = urllib3.util.connection.socket.socket is gevent.socket.socket
print(json.dumps(out))
"""


def probe(before: str = "") -> subprocess.CompletedProcess:
    code = PROBE.format(network=NETWORK_MODULES, before=textwrap.dedent(before))
    return subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=str(ROOT), capture_output=True,
                          text=True, timeout=60, check=False)


def test_gdl_cli_patches_before_any_network_import() -> None:
    result = probe()
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = json.loads(result.stdout)
    assert out["at_start"] == []
    assert out["after_gdl_package"] == []  # the console script imports `gdl` before `gdl.cli`
    assert "requests" not in out["after_cli"] and "redis" not in out["after_cli"]
    assert out["patched"] == {"socket": True, "ssl": True, "select": True, "threading": True, "time": True}
    assert out["socket_is_gevent"] is True
    assert out["redis_socket_is_gevent"] is True
    assert out["urllib3_socket_is_gevent"] is True


def test_late_patch_is_caught() -> None:
    """Control: with requests (and so ssl) imported first, the same probe fails on the warning."""
    result = probe(before="import requests")
    assert result.returncode != 0
    assert "MonkeyPatchWarning" in result.stderr
    assert result.stdout == ""


def test_console_script_entry_point_is_gdl_cli_main() -> None:
    """The `gdl` script imports gdl.cli first: keep setup.py pointing there."""
    assert '"gdl = gdl.cli:main"' in (ROOT / "setup.py").read_text()
