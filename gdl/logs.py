"""Logging setup: one line per event, as text or JSON.

Lines name their subject first (``job <id>: ...``, ``aggr <id>: ...``); the
JSON format lifts those ids into ``job_id`` and ``aggr_id`` fields so log
pipelines can filter on them.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

import gevent

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_SUBJECT_RE = re.compile(r"(?:^|: )(aggr|job) (\S+?)(?=:)")  # lookahead: "aggr a: job j:" has both


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        for kind, value in _SUBJECT_RE.findall(message):
            line[f"{kind}_id"] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"))


def setup(level: str = "info", fmt: str = "text") -> None:
    _route_gevent_errors()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # urllib3 logs every new connection at debug and retries at warning: our lines already say it.
    logging.getLogger("urllib3").setLevel(logging.ERROR)


def _route_gevent_errors() -> None:
    """Errors gevent's hub would print to stderr itself (a greenlet that died of an
    exception nobody caught) go through logging instead, as one event in the
    chosen format. Disk calls never get there (:mod:`gdl.diskio` hands their
    exceptions back to the caller); this catches whatever else would."""
    def print_exception(context: object, kind: type, value: BaseException, tb: object) -> None:
        logging.getLogger("gdl.gevent").error("%s failed with %s: %s", context, kind.__name__, value,
                                              exc_info=(kind, value, tb))  # type: ignore[arg-type]

    gevent.get_hub().print_exception = print_exception
