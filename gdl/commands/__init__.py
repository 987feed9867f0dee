"""Operator subcommands: ``gdl enqueue | status | job | retry-failed | fsck | keys | cancel | aggr``.

Each reads the same ``--config`` as the service and talks to Redis only
through :class:`gdl.store.Store` (``enqueue`` submits through the HTTP API).
None starts a Redis: with ``redis.url: embedded`` they join the server a
running gdl started in ``redis.embedded_dir``, or exit 2 saying none runs.

This package's top level imports nothing that opens sockets: ``gdl.cli``
imports it right after patching gevent, and the subcommands import their
modules (and redis, requests, tqdm) when they run.

Exit status: 0 done (and, for ``fsck``, nothing wrong; for ``enqueue
--wait``, every job succeeded), 1 when something was rejected, failed or
found wrong, 2 for a bad config or an unreachable Redis or API.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gdl.config import Config
    from gdl.store import Store

EXIT_OK = 0
EXIT_PROBLEMS = 1

# name -> (module under gdl.commands, one-line help)
COMMANDS = {
    "enqueue": ("enqueue", "submit URLs (one per line, or JSON lines) to the API, optionally --wait for them"),
    "status": ("status", "processes, aggregations and queue depths as tables (--watch refreshes)"),
    "job": ("status", "one job's full record and its attempts"),
    "retry-failed": ("repair", "queue every failed callback again (--aggr to pick one aggregation)"),
    "fsck": ("repair", "check Redis and the stored files against each other (--fix repairs)"),
    "keys": ("keys", "keys new: print a fresh secret for notifier.signing_secrets"),
    "cancel": ("controls", "cancel one job (queued: at once; downloading: aborted by its processor)"),
    "aggr": ("aggr", "show, pause, resume or purge one aggregation"),
}
# gdl aggr's actions: show, pause and resume are gdl/commands/aggr.py's ACTIONS; purge is
# gdl/commands/controls.py's, beside gdl cancel.
AGGR_ACTIONS = ("show", "pause", "resume", "purge")


# Defaults named once (the modules import them from here).
DEFAULT_CONNECTIONS = 4
DEFAULT_WATCH_INTERVAL = 2.0


def add_parsers(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add every subcommand's parser to ``sub`` (an argparse subparsers action).

    The parsers live here, not in the modules, so that building them imports
    nothing heavy: the service builds them too on every start.
    """
    parsers = {name: sub.add_parser(name, parents=parents, help=text, description=text)
               for name, (_, text) in COMMANDS.items()}

    p = parsers["enqueue"]
    p.add_argument("file", nargs="?", default="-", metavar="FILE",
                   help="URLs or JSON objects (any POST /download fields), one per line; - or nothing: stdin")
    p.add_argument("--aggr", metavar="ID", help="aggr_id for lines that give none")
    p.add_argument("--limit", type=int, metavar="N", help="aggr_limit for lines that give none")
    p.add_argument("--callback", metavar="URL", help="HTTP callback URL (callback_url) for lines that give none")
    p.add_argument("--extra", metavar="S", help="extra, passed back in the callback")
    p.add_argument("--mime", metavar="P", help="mime_type patterns, e.g. 'image/*'")
    p.add_argument("--wait", action="store_true", help="follow the jobs to their callbacks, then summarise")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="with --wait: give up after this long")
    p.add_argument("--api", metavar="URL", help="the API's base URL (default: http://<api.host>:<api.port>)")
    p.add_argument("--token", metavar="T", help="bearer token (default: the first of security.api_tokens)")
    p.add_argument("--connections", type=int, default=DEFAULT_CONNECTIONS, metavar="N",
                   help=f"keep-alive connections to the API (default {DEFAULT_CONNECTIONS})")
    p.add_argument("--print-ids", action="store_true", help="print '<job id> <url>' for each accepted line")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")

    p = parsers["status"]
    p.add_argument("--watch", "-w", action="store_true", help="refresh until Ctrl-C")
    p.add_argument("--interval", type=float, default=DEFAULT_WATCH_INTERVAL, metavar="S",
                   help=f"seconds between refreshes with --watch (default {DEFAULT_WATCH_INTERVAL:g})")
    p.add_argument("--json", action="store_true", help="the JSON of GET /api/overview instead of tables")

    p = parsers["job"]
    p.add_argument("job_id", metavar="ID", help="the id POST /download answered")
    p.add_argument("--json", action="store_true", help="the JSON of GET /jobs/<id> instead of text")

    p = parsers["retry-failed"]
    p.add_argument("--aggr", metavar="ID", help="only the failed callbacks of this aggregation")
    p.add_argument("--dry-run", "-n", action="store_true", help="list them, queue nothing")

    p = parsers["keys"]
    p.add_argument("action", choices=["new"], help="new: print a fresh whsec_ secret")

    p = parsers["cancel"]
    p.add_argument("job_id", metavar="ID", help="the id POST /download answered")
    p.add_argument("--no-callback", action="store_true", help="send no callback for the job cancelled")

    p = parsers["aggr"]
    p.add_argument("action", choices=AGGR_ACTIONS, help="show its state; pause or resume starting its downloads; "
                   "purge: cancel its jobs accepted before the command, queued or downloading")
    p.add_argument("aggr_id", metavar="ID", help="the aggregation (a job's aggr_id)")
    p.add_argument("--json", action="store_true", help="the JSON of GET /aggregations/<id> instead of text")
    p.add_argument("--no-callback", action="store_true", help="purge: send no callback for the jobs cancelled")

    p = parsers["fsck"]
    p.add_argument("--fix", action="store_true", help="repair what is found")
    p.add_argument("--verbose", "-v", action="store_true", help="list every id found, not a few")


def run(name: str, args: argparse.Namespace, cfg: Config) -> int:
    return int(_module(COMMANDS[name][0]).run(name, args, cfg))


def _module(name: str) -> Any:
    return importlib.import_module(f"gdl.commands.{name}")


def open_store(cfg: Config) -> Store:
    """A store on the configured Redis, which must already be running.

    Never starts the embedded server: a running gdl owns it. Raises
    :class:`~gdl.errors.StartupError` (exit 2) naming the key when there is none.
    """
    from gdl.errors import StartupError, StoreUnavailable
    from gdl.redis_server import SOCKET_NAME
    from gdl.store import Store

    url = cfg.redis.url
    key = "redis.cluster_nodes" if cfg.redis.cluster_nodes else "redis.sentinel" if cfg.redis.sentinel else "redis.url"
    if url == "embedded" and not cfg.redis.sentinel and not cfg.redis.cluster_nodes:
        data_dir = Path(cfg.redis.embedded_dir).resolve()
        sock = data_dir / SOCKET_NAME
        if not sock.exists():
            raise StartupError(f"redis.embedded_dir: no gdl is running on {data_dir} ({sock} does not exist); "
                               "start gdl first")
        url, key = f"unix://{sock}", "redis.embedded_dir"
    store = Store.connect(url, sentinel=cfg.redis.sentinel, master_name=cfg.redis.master_name,
                          cluster_nodes=cfg.redis.cluster_nodes)
    try:
        store.ping()
    except StoreUnavailable as exc:
        store.close()
        raise StartupError(f"{key}: cannot reach redis at {redacted(url)}: {exc}") from exc
    return store


def redacted(url: str) -> str:
    """``url`` without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, right: Sequence[int] = ()) -> str:
    """Rows under headers in aligned columns (``right``: indexes aligned right)."""
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def duration(ms: float) -> str:
    """``42s``, ``3m 5s``, ``2h 10m``, ``3d 4h``."""
    s = max(0, round(ms / 1000))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m {s}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h {m}m"
    d, h = divmod(h, 24)
    return f"{d}d {h}h"
