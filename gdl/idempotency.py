"""Idempotency keys: what a client's ``Idempotency-Key`` means to gdl.

A key is 1 to 255 visible ASCII characters (a quoted string is accepted:
``"abc"`` and ``abc`` are one key), scoped to the API token that sent it (a
digest of it, never the token) or to anonymous, and kept
``api.idempotency_ttl`` seconds. The request it first came with is
remembered by a fingerprint of its JSON body (keys sorted, no spaces), so
that the same body sent again is a replay and another body a conflict. The
check and the record are made by the enqueue script itself (``enqueue.lua``):
see :meth:`gdl.store.core.JobStore.enqueue_many`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from gdl.errors import ValidationError
from gdl.store import Idempotency

HEADER = "Idempotency-Key"
MAX_LENGTH = 255
ANONYMOUS = "anon"


def parse_key(raw: str, field: str = HEADER) -> str:
    """The key in ``raw``, or a ValidationError naming ``field``."""
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        raw = raw[1:-1]
    if not 1 <= len(raw) <= MAX_LENGTH or not all("!" <= c <= "~" for c in raw):
        raise ValidationError(field, f"must be 1 to {MAX_LENGTH} visible ASCII characters (got {raw[:40]!r})")
    return raw


def scope_of(token: str) -> str:
    """Where a key lives: per API token (by digest), or anonymous."""
    if not token:
        return ANONYMOUS
    return "t" + hashlib.sha256(token.encode()).hexdigest()[:24]


def fingerprint(body: Any) -> str:
    """The digest a request's JSON body is compared by (key order and spacing do not count)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def idempotency(key: str | None, body: Any, *, scope: str, ttl: float) -> Idempotency | None:
    if key is None:
        return None
    return Idempotency(scope, key, fingerprint(body), int(ttl * 1000))
