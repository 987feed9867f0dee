"""The store's reuse records: the last stored result of a request, kept for
later jobs that ask for the same (see :mod:`gdl.reuse`).

A record is one hash, ``reuse:<request key>``, replaced whole by
``remember.lua`` and gone ``processor.reuse_max_ttl`` after it was last
written. Reading one is one HGETALL: a stale read only means a download.
"""

from __future__ import annotations

from typing import Any

from gdl.store.core import JobStore, _translated
from gdl.store.layout import reuse_key


class ReuseRecords(JobStore):
    """Reading and writing reuse records."""

    @_translated
    def reuse_record(self, request_key: str) -> dict[str, str] | None:
        """The record of ``request_key``, or None when there is none."""
        return self.redis.hgetall(reuse_key(request_key)) or None

    @_translated
    def remember(self, request_key: str, record: dict[str, Any], *, ttl_ms: int) -> None:
        """Replace the record of ``request_key`` with ``record``, kept for ``ttl_ms``."""
        pairs = [x for name, value in record.items() for x in (name, str(value))]
        self._run("remember", [reuse_key(request_key)], [ttl_ms, *pairs])
