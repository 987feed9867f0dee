"""Callback backends: how a payload reaches a client.

A backend is named by a job's ``callback_type``. The notifier only knows
this interface; adding a transport (Kafka, a queue) means adding a module
here and a line in :func:`from_config`, nothing in the notifier loop.
"""

from __future__ import annotations

from typing import Protocol

from gdl.config import Config


class Backend(Protocol):
    name: str

    def start(self) -> None:
        """Open connections; called once before the first notify."""

    def notify(self, destination: str, body: bytes) -> int:
        """Deliver ``body`` to ``destination``; returns a status code (HTTP's, or 0).

        Raises :class:`~gdl.errors.CallbackError` when it was not delivered.
        """

    def stop(self) -> None:
        """Flush and close."""


def from_config(cfg: Config) -> dict[str, Backend]:
    """The backends this configuration enables, by callback type."""
    from gdl.backends.http import HTTPBackend

    backends: dict[str, Backend] = {"http": HTTPBackend(timeout=cfg.http_callback_timeout)}
    return backends
