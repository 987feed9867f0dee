"""The HTTP callback backend's own behaviour, against a real loopback receiver.

What every backend promises is in tests/test_backends_contract.py; here is
what is HTTP's alone: a JSON POST whose 2xx status is returned; any other
answer (redirects are not followed) a retriable :class:`CallbackError`
carrying the status; a deadline on the whole delivery; only http(s) URLs;
and with ``security.block_private_networks`` no delivery to a non-public
address, refused at once. The backend is built by
:func:`gdl.backends.from_config` on each HTTP engine (``http.engine``) and
used through ``notify`` only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gdl import __version__
from gdl.config import allowed_networks_hint
from gdl.errors import CallbackError
from tests.conftest import backend_from_config, free_port
from tests.servers import CallbackReceiver

BODY = b'{"success":true,"job_id":"6QEywYsd0jrKAg"}'


@pytest.fixture
def started(tmp_path: Path, request: pytest.FixtureRequest, engine: str) -> Callable[..., Any]:
    """``started(**sections)``: the HTTP backend of that config on ``engine``, started; stopped at the end."""

    def start(**sections: Any) -> Any:
        sections.setdefault("security", {"block_private_networks": False})
        sections.setdefault("http", {"engine": engine})
        backend = backend_from_config(tmp_path, "http", **sections)
        backend.start()
        request.addfinalizer(backend.stop)
        return backend

    return start


@pytest.fixture
def http(started: Any) -> Any:
    return started()


@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_any_2xx_is_delivered_and_returned(http: Any, receiver: CallbackReceiver, status: int) -> None:
    receiver.answer("/cb", status)
    assert http.notify(receiver.url("/cb"), BODY) == status
    assert receiver.raw["/cb"] == [BODY]


def test_the_body_goes_as_a_json_post_from_gdl(http: Any, receiver: CallbackReceiver) -> None:
    http.notify(receiver.url("/cb"), BODY)
    [headers] = receiver.headers["/cb"]
    assert (headers["Content-Type"], headers["User-Agent"], headers["Accept"]) == \
        ("application/json", f"gdl/{__version__}", "*/*")


@pytest.mark.parametrize("status", [400, 404, 410, 429, 500, 502, 503])
def test_any_other_status_is_a_retriable_callback_error_carrying_it(http: Any, receiver: CallbackReceiver,
                                                                     status: int) -> None:
    receiver.answer("/cb", status)
    with pytest.raises(CallbackError) as info:
        http.notify(receiver.url("/cb"), BODY)
    assert (str(info.value), info.value.retriable, info.value.status) == \
        (f"callback to {receiver.url('/cb')} answered {status}", True, status)


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_not_followed(http: Any, receiver: CallbackReceiver, status: int) -> None:
    receiver.answer("/cb", status)  # Location: /cb/moved, which would answer 200
    with pytest.raises(CallbackError) as info:
        http.notify(receiver.url("/cb"), BODY)
    assert (info.value.retriable, info.value.status) == (True, status)
    assert dict(receiver.raw) == {"/cb": [BODY]}


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/cb", "file:///etc/passwd", "gopher://127.0.0.1/", "/cb"])
def test_only_http_and_https_urls_are_called_back(http: Any, url: str) -> None:
    with pytest.raises(CallbackError) as info:
        http.notify(url, BODY)
    assert (str(info.value), info.value.retriable, info.value.status) == \
        (f"callback to {url} refused: only http and https URLs", False, 0)


def test_an_unreachable_destination_is_retried_saying_why(http: Any) -> None:
    port = free_port()  # bound and closed again: nothing listens there
    url = f"http://127.0.0.1:{port}/cb"
    with pytest.raises(CallbackError) as info:
        http.notify(url, BODY)
    assert (str(info.value), info.value.retriable, info.value.status) == \
        (f"callback to {url} failed: connection refused by 127.0.0.1:{port}", True, 0)


def test_a_url_that_does_not_parse_is_a_callback_error_not_retriable(http: Any) -> None:
    # Not reachable from POST /download (the API refuses the URL), but notify promises a CallbackError.
    with pytest.raises(CallbackError) as info:
        http.notify("http://[::1/cb", BODY)
    assert (info.value.retriable, info.value.status) == (False, 0)


def test_a_host_that_cannot_be_a_name_is_refused_at_once(http: Any) -> None:
    # POST /download accepts the URL (it has a host); both engines refuse it at the seam, the same way.
    with pytest.raises(CallbackError) as info:
        http.notify("http://a..b/cb", BODY)
    assert (info.value.retriable, info.value.status) == (False, 0)
    assert str(info.value) == ("callback to http://a..b/cb refused: invalid URL 'http://a..b/cb': "
                               "the host name has an empty label")


def test_no_answer_within_the_timeout_is_a_retriable_callback_error(started: Any) -> None:
    slow = CallbackReceiver(hold=2.0)
    try:
        backend = started(backends={"http": {"timeout": 0.3}})
        with pytest.raises(CallbackError) as info:
            backend.notify(slow.url("/cb"), BODY)
    finally:
        slow.stop()
    assert (str(info.value), info.value.retriable, info.value.status) == \
        (f"callback to {slow.url('/cb')} failed: no answer within 0.3s", True, 0)


def test_a_loopback_destination_is_refused_at_once_while_the_guard_is_on(started: Any,
                                                                          receiver: CallbackReceiver) -> None:
    guarded = started(security={"block_private_networks": True})
    with pytest.raises(CallbackError) as info:
        guarded.notify(receiver.url("/cb"), BODY)
    assert (info.value.retriable, info.value.status) == (False, 0)
    assert str(info.value) == (f"callback to {receiver.url('/cb')} refused: 127.0.0.1 is a loopback address "
                               f"({allowed_networks_hint('127.0.0.1')})")
    assert dict(receiver.raw) == {}


def test_allowed_networks_let_a_loopback_destination_through(started: Any, receiver: CallbackReceiver) -> None:
    allowed = started(security={"block_private_networks": True, "allowed_networks": ["127.0.0.0/8"]})
    assert allowed.notify(receiver.url("/cb"), BODY) == 200
    assert receiver.raw["/cb"] == [BODY]
