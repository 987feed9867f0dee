"""The HTTP callback backend: a JSON POST; any 2xx is delivered.

Callback destinations are named by clients, so they get the downloads'
care: http and https only, redirects not followed, the answer's body
dropped after a few KiB, ``timeout`` a deadline on the whole delivery, no
proxy or credentials from the environment, and with a guard
(``security.block_private_networks``) no connection to a non-public
address: such a callback fails at once, not retried, saying why.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import gevent
import requests
import urllib3.exceptions

from gdl import __version__
from gdl.errors import BlockedAddress, CallbackError
from gdl.netguard import AddressGuard, HopSession, discard_body, mount_adapters


class HTTPBackend:
    name = "http"

    def __init__(self, *, timeout: float, guard: AddressGuard | None = None, pool_size: int = 10):
        self.timeout = timeout
        self.guard = guard
        self.pool_size = pool_size
        self.session: HopSession | None = None

    def start(self) -> None:
        self.session = HopSession()
        self.session.headers = {"Content-Type": "application/json", "User-Agent": f"gdl/{__version__}",
                                "Accept": "*/*"}
        self.session.trust_env = False  # no proxy or .netrc credentials picked from the environment
        mount_adapters(self.session, self.guard, pool_size=self.pool_size)

    def notify(self, destination: str, body: bytes) -> int:
        assert self.session is not None, "start() first"
        if urlsplit(destination).scheme.lower() not in ("http", "https"):
            raise CallbackError(f"callback to {destination} refused: only http and https URLs", retriable=False)
        deadline = gevent.Timeout(self.timeout)
        deadline.start()
        try:
            response = self.session.send_one("POST", destination, body=body, timeout=self.timeout)
            discard_body(response)
        except BlockedAddress as exc:
            raise CallbackError(f"callback to {destination} {exc}", retriable=False) from exc
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise CallbackError(f"callback to {destination} failed: {type(exc).__name__}: {exc}") from exc
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            raise CallbackError(f"callback to {destination} failed: no answer within {self.timeout:g}s") from exc
        finally:
            deadline.cancel()
        if not 200 <= response.status_code < 300:
            status = response.status_code
            raise CallbackError(f"callback to {destination} answered {status}", status=status)
        return response.status_code

    def stop(self) -> None:
        if self.session is not None:
            self.session.close()
