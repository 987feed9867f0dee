"""The HTTP callback backend: a JSON POST; any 2xx is delivered.

Callback destinations are named by clients, so they get the downloads'
care: http and https only, redirects not followed, the answer's body
dropped after a few KiB, ``timeout`` a deadline on the whole delivery, no
proxy or credentials from the environment, and with a guard
(``security.block_private_networks``) no connection to a non-public
address: such a callback fails at once, not retried, saying why. The POST
goes through the process's HTTP engine (:mod:`gdl.http`, ``http.engine``).
"""

from __future__ import annotations

from urllib.parse import urlsplit

import gevent

from gdl import __version__
from gdl.errors import BlockedAddress, CallbackError, DownloadError, InvalidURL
from gdl.http import DEFAULT_ENGINE, Engine, Exchange, make_engine
from gdl.http.base import wire_url
from gdl.netguard import AddressGuard

HEADERS = [("Content-Type", "application/json"), ("User-Agent", f"gdl/{__version__}"), ("Accept", "*/*")]


class HTTPBackend:
    name = "http"

    def __init__(self, *, timeout: float, guard: AddressGuard | None = None, pool_size: int = 10,
                 engine: str = DEFAULT_ENGINE):
        self.timeout = timeout
        self.guard = guard
        self.pool_size = pool_size
        self.engine_name = engine
        self.engine: Engine | None = None

    def start(self) -> None:
        self.engine = make_engine(self.engine_name, guard=self.guard, pool_size=self.pool_size)

    def notify(self, destination: str, body: bytes) -> int:
        assert self.engine is not None, "start() first"
        try:
            url = wire_url(destination)
        except InvalidURL as exc:
            raise CallbackError(f"callback to {destination} refused: {exc}", retriable=False) from exc
        if urlsplit(url).scheme.lower() not in ("http", "https"):
            raise CallbackError(f"callback to {destination} refused: only http and https URLs", retriable=False)
        deadline = gevent.Timeout(self.timeout)
        deadline.start()
        try:
            exchange = Exchange("POST", url, HEADERS, body=body, timeout=self.timeout)
            response = self.engine.send(exchange)
            response.discard()
        except (BlockedAddress, InvalidURL) as exc:
            raise CallbackError(f"callback to {destination} {exc}", retriable=False) from exc
        except DownloadError as exc:
            raise CallbackError(f"callback to {destination} failed: {exc}") from exc
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            raise CallbackError(f"callback to {destination} failed: no answer within {self.timeout:g}s") from exc
        finally:
            deadline.cancel()
        if not 200 <= response.status < 300:
            status = response.status
            raise CallbackError(f"callback to {destination} answered {status}", status=status)
        return response.status

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.close()
