"""``gdl aggr ACTION ID``: one aggregation's controls, from the command line.

    gdl aggr show ID [--json]     its state, limits, rate and work (as GET /aggregations/<id>)
    gdl aggr pause ID             stop starting its downloads (those in flight finish)
    gdl aggr resume ID            start again
    gdl aggr purge ID             cancel its jobs accepted before the command (gdl/commands/controls.py)

Each action is one function in :data:`ACTIONS`, taking the store, the
aggregation id and the config, and answering the aggregation's view (None:
unknown, exit 1); a new action is one more entry there and in
:data:`gdl.commands.AGGR_ACTIONS`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from gdl.commands import EXIT_OK, EXIT_PROBLEMS, controls, open_store
from gdl.config import Config
from gdl.store import AggregationView, Store, now_ms
from gdl.store.aggregations import idle_view


def show(store: Store, aggr_id: str, cfg: Config) -> AggregationView | None:
    return store.aggregation(aggr_id, now=now_ms())


def pause(store: Store, aggr_id: str, cfg: Config) -> AggregationView | None:
    store.pause_aggregation(aggr_id)
    return show(store, aggr_id, cfg)


def resume(store: Store, aggr_id: str, cfg: Config) -> AggregationView | None:
    if not store.resume_aggregation(aggr_id, now=now_ms(), state_ttl_ms=int(cfg.processor.aggr_state_ttl * 1000)):
        return None
    return show(store, aggr_id, cfg) or idle_view(aggr_id)


ACTIONS: dict[str, Callable[[Store, str, Config], AggregationView | None]] = {
    "show": show, "pause": pause, "resume": resume}


def run(name: str, args: argparse.Namespace, cfg: Config) -> int:
    store = open_store(cfg)
    try:
        if args.action == "purge":
            return controls.purge(store, args.aggr_id, callback=not args.no_callback)
        view = ACTIONS[args.action](store, args.aggr_id, cfg)
    finally:
        store.close()
    if view is None:
        print(f"gdl aggr {args.action}: aggregation {args.aggr_id} is unknown (never seen, or forgotten)",
              file=sys.stderr)
        return EXIT_PROBLEMS
    body = view.public()
    print(json.dumps(body, indent=2) if args.json else render(body))
    return EXIT_OK


def render(body: dict) -> str:
    width = max(len(name) for name in body)
    return "\n".join(f"{name.ljust(width)}  {'' if value is None else value}" for name, value in body.items())
