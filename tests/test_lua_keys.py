"""Every Lua script declares every key it touches (Redis Cluster's rule).

A script that builds a key name from ARGV works on one Redis but not on a
cluster, where a node can only check (and route) the keys it is given. This
reads each script in ``gdl/lua/`` and fails on a key argument that is neither
``KEYS[...]`` nor a local taken from ``KEYS`` (the scripts before this check
built job and queue names from ARGV in take, sweep, forget and drop_dangling).
"""

from __future__ import annotations

import re
from importlib import resources

import pytest

SCRIPTS = sorted(p for p in resources.files("gdl").joinpath("lua").iterdir() if p.name.endswith(".lua"))
CALL = re.compile(r"redis\.call\('(\w+)',\s*([^,)]+)")
KEY_LOCAL = re.compile(r"local (\w+) = KEYS\[|for \w+, (\w+) in ipairs\(KEYS\)")
# Commands whose first argument is not a key.
KEYLESS = {"PUBLISH"}


def key_arguments_not_declared(source: str) -> list[str]:
    code = "\n".join(line.split("--", 1)[0] for line in source.splitlines())
    declared = {name for pair in KEY_LOCAL.findall(code) for name in pair if name}
    bad = []
    for command, first in CALL.findall(code):
        first = first.strip()
        if command.upper() in KEYLESS:
            continue
        if not (first.startswith("KEYS[") or first in declared):
            bad.append(f"{command} {first}")
    return bad


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_the_script_touches_only_declared_keys(script):
    assert key_arguments_not_declared(script.read_text()) == []


def test_the_check_catches_a_key_built_from_argv():
    built = "local key = ARGV[5] .. id\nredis.call('HSET', key, 'state', 'queued')\n"
    assert key_arguments_not_declared(built) == ["HSET key"]
    assert key_arguments_not_declared("redis.call('ZADD', ARGV[4] .. aggr, 1, id)") == ["ZADD ARGV[4] .. aggr"]
    assert key_arguments_not_declared("local q = KEYS[2]\nredis.call('ZADD', q, 1, 'x')") == []
