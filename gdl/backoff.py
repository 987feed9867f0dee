"""Waits between tries while something (Redis) is away: doubling, with jitter.

Jitter keeps the greenlets and processes that lost Redis together from
coming back all at the same instant.
"""

from __future__ import annotations

import random


def retry_delay(attempt: int, step: float, *, at_least: float | None = None) -> float:
    """The Go service's linear backoff: retry N waits ``N * step`` seconds (an
    uncounted retry, attempt 0, waits one step), or ``at_least`` if longer (a
    ``Retry-After``)."""
    delay = max(attempt, 1) * step
    return delay if at_least is None else max(delay, at_least)


class Backoff:
    def __init__(self, first: float = 0.1, most: float = 5.0):
        self.first = first
        self.most = most
        self._next = first

    def next(self) -> float:
        """The wait before the next try (0.5x to 1.5x the current step), doubling the step."""
        delay = self._next * random.uniform(0.5, 1.5)
        self._next = min(self._next * 2, self.most)
        return delay

    def reset(self) -> None:
        self._next = self.first
