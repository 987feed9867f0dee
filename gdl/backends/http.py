"""The HTTP callback backend: a JSON POST; any 2xx is delivered."""

from __future__ import annotations

import requests

from gdl import __version__
from gdl.errors import CallbackError


class HTTPBackend:
    name = "http"

    def __init__(self, *, timeout: float):
        self.timeout = timeout
        self.session: requests.Session | None = None

    def start(self) -> None:
        self.session = requests.Session()
        self.session.headers = {"Content-Type": "application/json", "User-Agent": f"gdl/{__version__}",
                                "Accept": "*/*"}  # type: ignore[assignment]

    def notify(self, destination: str, body: bytes) -> int:
        assert self.session is not None, "start() first"
        try:
            response = self.session.post(destination, data=body, timeout=self.timeout, allow_redirects=False)
            response.close()
        except requests.RequestException as exc:
            raise CallbackError(f"callback to {destination} failed: {type(exc).__name__}: {exc}") from exc
        if not 200 <= response.status_code < 300:
            status = response.status_code
            raise CallbackError(f"callback to {destination} answered {status}", status=status)
        return response.status_code

    def stop(self) -> None:
        if self.session is not None:
            self.session.close()
