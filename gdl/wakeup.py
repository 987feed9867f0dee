"""Wake-ups: one pub/sub listener per process, fanned out to local waiters.

Enqueues, retries and sweeps publish on the channels named in
:mod:`gdl.store`. This greenlet turns each message into a call to the local
handlers registered for its channel (the scanner for aggregations, the
notifier for callbacks), so work enqueued on an idle service starts within
milliseconds instead of at the next scan tick. Handlers must not block: they
set an event and return.

Messages can be lost while Redis is away; after every reconnect each handler
is called with ``None``, meaning "something may have changed, look again".
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable

import gevent
import gevent.event

from gdl.backoff import Backoff
from gdl.errors import StoreUnavailable
from gdl.store import Store

log = logging.getLogger(__name__)

Handler = Callable[[str | None], None]
POLL_SECONDS = 1.0


class Wakeup:
    def __init__(self, store: Store):
        self.store = store
        self._handlers: dict[str, list[Handler]] = defaultdict(list)
        self._stopping = gevent.event.Event()
        self.subscribed = gevent.event.Event()

    def on(self, channel: str, handler: Handler) -> None:
        self._handlers[channel].append(handler)

    @property
    def has_handlers(self) -> bool:
        return bool(self._handlers)

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        backoff = Backoff()
        while not self._stopping.is_set():
            try:
                pubsub = self.store.subscribe(*self._handlers)
                backoff.reset()
                self.subscribed.set()
                self._dispatch_all(None)
                self._listen(pubsub)
            except StoreUnavailable:  # logged once per outage by the store
                self.subscribed.clear()
                self._stopping.wait(backoff.next())

    def _listen(self, pubsub) -> None:
        try:
            while not self._stopping.is_set():
                message = self.store.next_message(pubsub, POLL_SECONDS)
                if message is not None:
                    channel, data = message
                    for handler in self._handlers.get(channel, ()):
                        handler(data)
        finally:
            try:
                pubsub.close()
            except Exception:  # closing a broken connection may fail again; nothing to keep
                pass

    def _dispatch_all(self, data: str | None) -> None:
        for handlers in self._handlers.values():
            for handler in handlers:
                handler(data)
