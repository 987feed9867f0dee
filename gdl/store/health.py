"""Redis health as one process sees it: which errors mean "not now", and one
log line when an outage starts and one when it ends.

Every store method is wrapped by :func:`translated`: an error of
``UNAVAILABLE`` becomes :class:`~gdl.errors.StoreUnavailable` and is counted
by the store's :class:`Health`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis.exceptions

from gdl.errors import StoreUnavailable

log = logging.getLogger("gdl.store")


# Redis failures that mean "not now" rather than "wrong": translated to StoreUnavailable.
# (A ReadOnlyError is a master demoted by a failover: the next connection finds the new one.)
UNAVAILABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,  # a cluster still forming, or failing over a master
    redis.exceptions.OutOfMemoryError,
    OSError,
)

F = TypeVar("F", bound=Callable[..., Any])


class Health:
    """Whether Redis answers, as this process last saw it.

    Every greenlet meets an outage; only this object logs it: one line when
    it starts, one when it ends (once :meth:`watch` is called: before that,
    at start-up or in a one-shot command, the caller reports the failure).
    ``errors`` counts failed calls for metrics.
    """

    def __init__(self) -> None:
        self.down_since: float | None = None
        self.errors = 0
        self.outages = 0
        self.watching = False

    def watch(self) -> None:
        self.watching = True

    def failed(self, exc: BaseException) -> None:
        self.errors += 1
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.outages += 1
            if self.watching:
                log.warning("redis: unavailable (%s); work pauses and resumes when it is back", exc)

    def answered(self) -> None:
        if self.down_since is not None:
            if self.watching:
                log.warning("redis: back after %.1fs", time.monotonic() - self.down_since)
            self.down_since = None


def translated(fn: F) -> F:
    """Translate "not now" errors of a store method (whose object has a ``health``)."""
    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            result = fn(self, *args, **kwargs)
        except UNAVAILABLE as exc:
            self.health.failed(exc)
            raise StoreUnavailable(f"redis: {exc}") from exc
        if self.health.down_since is not None:
            self.health.answered()
        return result
    return wrapper  # type: ignore[return-value]



def now_ms() -> int:
    return int(time.time() * 1000)
