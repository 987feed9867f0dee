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

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_SUBJECT_RE = re.compile(r"(?:^|: )(aggr|job) (\S+?):")


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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # urllib3 logs every new connection at debug and retries at warning: our lines already say it.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
