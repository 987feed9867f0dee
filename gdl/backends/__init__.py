"""Callback backends: how a payload reaches a client.

A backend is named by a job's ``callback_type``. The notifier only knows
this interface; adding a transport means adding a module here and a line in
:func:`from_config`, nothing in the notifier loop.

- ``http`` (:mod:`gdl.backends.http`): always on; ``backends.http``.
- ``kafka`` (:mod:`gdl.backends.kafka`): on when ``backends.kafka`` holds
  librdkafka settings (at least ``bootstrap.servers``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gdl.config import Config


class Backend(Protocol):
    name: str

    def start(self) -> None:
        """Open connections; called once before the first notify."""

    def notify(self, destination: str, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> int:
        """Deliver ``body`` to ``destination`` with ``headers`` (the signature's: HTTP headers,
        or Kafka record headers); returns a status code (HTTP's, or 0).

        Raises :class:`~gdl.errors.CallbackError` when it was not delivered.
        """

    def stop(self) -> None:
        """Flush and close."""


def from_config(cfg: Config) -> dict[str, Backend]:
    """The backends this configuration enables, by callback type."""
    from gdl.backends.http import HTTPBackend
    from gdl.netguard import AddressGuard

    http = HTTPBackend(timeout=cfg.http_callback_timeout, guard=AddressGuard.from_config(cfg.security),
                       pool_size=cfg.notifier.concurrency, engine=cfg.http.engine)
    backends: dict[str, Backend] = {"http": http}
    if cfg.backends.kafka:
        from gdl.backends.kafka import KafkaBackend

        backends["kafka"] = KafkaBackend(cfg.backends.kafka)
    return backends
