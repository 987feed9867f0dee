"""The callback backend contract: every backend keeps the same promises.

Each test runs once per backend (ids ``http-curl``, ``http-requests``: the
HTTP backend on each HTTP engine; ``kafka``), built as gdl
builds them (:func:`gdl.backends.from_config` on a YAML config) and used
through the :class:`~gdl.backends.Backend` interface only: ``start``,
``notify(destination, body)``, ``stop``. The HTTP backend POSTs to a real
loopback receiver (tests/servers.py); the Kafka backend produces to a real
tansu broker (tests/brokers.py), read back with a consumer.

What every backend promises:

- It is named by the callback type that selects it.
- ``notify`` returns once the body is delivered, with the backend's
  delivered code (HTTP: the 2xx status; Kafka: 0), and what arrives is
  exactly the body's bytes: UTF-8 JSON, a large body, an empty body.
- Deliveries one after another arrive in order, each once; deliveries made
  at once from many greenlets each arrive exactly once.
- A destination the backend can never deliver to (empty; malformed: not a
  URL, the topic name ``..``; missing: not an http(s) URL, a topic the
  broker does not have) fails at once with a
  :class:`~gdl.errors.CallbackError` that is not retriable and has no
  status; an unreachable one (nothing listening) with a retriable one. Either way
  nothing arrives, and the backend goes on delivering elsewhere.
- ``stop`` lets a delivery already under way finish.

What differs on purpose is tested in each backend's module
(tests/test_http_callbacks.py, tests/test_kafka.py): HTTP's status codes,
headers, redirects, deadline and address guard; Kafka's unknown-topic type,
its delivery-report errors and the purge at stop.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest

from gdl.backends import Backend
from gdl.errors import CallbackError
from gdl.http import ENGINES
from tests.brokers import KafkaBroker
from tests.conftest import backend_from_config, free_port, wait_until
from tests.servers import CallbackReceiver

# librdkafka settings for the tests: quick timeouts and reconnects; no topic auto-creation.
KAFKA_SETTINGS = {"message.timeout.ms": 2500, "allow.auto.create.topics": False,
                  "topic.metadata.propagation.max.ms": 300, "reconnect.backoff.ms": 50,
                  "reconnect.backoff.max.ms": 200}


def build(directory: Path, kind: str, *, kafka_servers: str = "", engine: str = "") -> Backend:
    """The ``kind`` backend as gdl makes it from its config file (on HTTP ``engine``), started."""
    kafka = {"bootstrap.servers": kafka_servers, **KAFKA_SETTINGS} if kafka_servers else {}
    sections: dict[str, Any] = {"http": {"engine": engine}} if engine else {}
    backend = backend_from_config(directory, kind, backends={"http": {"timeout": 5}, "kafka": kafka},
                                  security={"block_private_networks": False}, **sections)
    backend.start()
    return backend


class Harness:
    """One backend, the place it delivers to, and a way to read what arrived."""

    kind = ""
    delivered_code = 0

    def __init__(self, directory: Path):
        self.directory = directory
        self.started: list[Backend] = []
        self.backend = self.make()

    def make(self, servers: str | None = None) -> Backend:
        raise NotImplementedError

    def destination(self, name: str) -> str:
        """A destination that accepts deliveries."""
        raise NotImplementedError

    def arrived(self, destination: str, count: int) -> list[bytes]:
        """The bodies that arrived at ``destination``, once ``count`` have (and a moment for extras)."""
        raise NotImplementedError

    def nothing_arrived(self, destination: str) -> bool:
        """Nothing at all arrived for a destination that was refused."""
        raise NotImplementedError

    def refused(self) -> dict[str, str]:
        """Destinations this backend can never deliver to: empty, malformed, missing."""
        raise NotImplementedError

    def unreachable(self) -> tuple[Backend, str]:
        """A backend and destination with nothing listening behind them."""
        raise NotImplementedError

    def close(self) -> None:
        for backend in self.started:
            backend.stop()


class HTTPHarness(Harness):
    kind = "http"
    delivered_code = 200

    def __init__(self, directory: Path, engine: str):
        self.receiver = CallbackReceiver()
        self.engine = engine
        super().__init__(directory)

    def make(self, servers: str | None = None) -> Backend:
        backend = build(self.directory, "http", engine=self.engine)
        self.started.append(backend)
        return backend

    def destination(self, name: str) -> str:
        return self.receiver.url(f"/{name}")

    def arrived(self, destination: str, count: int) -> list[bytes]:
        path = "/" + destination.rsplit("/", 1)[1]
        wait_until(lambda: len(self.receiver.raw[path]) >= count)
        gevent.sleep(0.2)
        return list(self.receiver.raw[path])

    def nothing_arrived(self, destination: str) -> bool:
        return dict(self.receiver.raw) == {}

    def refused(self) -> dict[str, str]:
        return {"empty": "", "malformed": "not a URL", "missing": "ftp://127.0.0.1/cb"}

    def unreachable(self) -> tuple[Backend, str]:
        return self.backend, f"http://127.0.0.1:{free_port()}/cb"

    def close(self) -> None:
        super().close()
        self.receiver.stop()


class KafkaHarness(Harness):
    kind = "kafka"
    delivered_code = 0

    def __init__(self, directory: Path, broker: KafkaBroker):
        self.broker = broker
        self.topics = 0
        super().__init__(directory)

    def make(self, servers: str | None = None) -> Backend:
        backend = build(self.directory, "kafka", kafka_servers=servers or self.broker.address)
        self.started.append(backend)
        return backend

    def destination(self, name: str) -> str:
        self.topics += 1
        topic = f"{name}-{self.directory.name}-{self.topics}"[:200]
        self.broker.create_topic(topic)
        return topic

    def arrived(self, destination: str, count: int) -> list[bytes]:
        return self.broker.values(destination, at_least=count, settle=0.2)

    def nothing_arrived(self, destination: str) -> bool:
        """A refused topic was not made (by auto-creation) to take the message."""
        return destination not in self.broker.topics()

    def refused(self) -> dict[str, str]:
        # "..": a name the API's topic pattern lets through, which Kafka refuses.
        return {"empty": "", "malformed": "..", "missing": f"no-such-topic-{self.directory.name}"}

    def unreachable(self) -> tuple[Backend, str]:
        return self.make(servers=f"127.0.0.1:{free_port()}"), "downloads"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    server = KafkaBroker(tmp_path_factory.mktemp("tansu")).start()
    yield server
    server.close()


# The ids: http-<engine> for the HTTP backend on each of gdl's HTTP engines (http.engine), and kafka.
KINDS = [f"http-{engine}" for engine in sorted(ENGINES)] + ["kafka"]


@pytest.fixture(params=KINDS)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    kind: str = request.param
    if kind == "kafka":
        made: Harness = KafkaHarness(tmp_path, request.getfixturevalue("broker"))
    else:
        made = HTTPHarness(tmp_path, engine=kind.removeprefix("http-"))
    yield made
    made.close()


def payload(n: int = 0, **extra: Any) -> bytes:
    """A callback body as the notifier sends it: compact UTF-8 JSON."""
    body = {"success": True, "error": "", "extra": "caf\u00e9 \u2603", "job_id": f"job{n:011d}",
            "response_code": 200, **extra}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


# --------------------------------------------------------------------------- delivering


def test_each_backend_is_named_by_its_callback_type(harness: Harness) -> None:
    assert harness.backend.name == harness.kind


def test_notify_returns_once_delivered_and_exactly_the_body_bytes_arrive(harness: Harness) -> None:
    destination = harness.destination("exact")
    body = payload()
    assert harness.backend.notify(destination, body) == harness.delivered_code
    assert harness.arrived(destination, 1) == [body]


def test_a_large_body_arrives_whole(harness: Harness) -> None:
    destination = harness.destination("large")
    body = payload(extra="\u00e9x" * 170_000)  # about 512 KiB
    assert harness.backend.notify(destination, body) == harness.delivered_code
    assert harness.arrived(destination, 1) == [body]


def test_an_empty_body_arrives_empty(harness: Harness) -> None:
    destination = harness.destination("empty")
    assert harness.backend.notify(destination, b"") == harness.delivered_code
    assert harness.arrived(destination, 1) == [b""]


def test_deliveries_one_after_another_arrive_in_order_each_once(harness: Harness) -> None:
    destination = harness.destination("sequence")
    bodies = [payload(n) for n in range(5)]
    assert [harness.backend.notify(destination, body) for body in bodies] == [harness.delivered_code] * 5
    assert harness.arrived(destination, 5) == bodies


def test_deliveries_at_once_each_arrive_exactly_once(harness: Harness) -> None:
    destination = harness.destination("at-once")
    bodies = [payload(n) for n in range(20)]
    greenlets = [gevent.spawn(harness.backend.notify, destination, body) for body in bodies]
    gevent.joinall(greenlets, raise_error=True)
    assert [g.value for g in greenlets] == [harness.delivered_code] * 20
    assert sorted(harness.arrived(destination, 20)) == sorted(bodies)


# --------------------------------------------------------------------------- failing


@pytest.mark.parametrize("which", ["empty", "malformed", "missing"])
def test_a_destination_the_backend_can_never_deliver_to_fails_at_once_not_retriable(harness: Harness,
                                                                                     which: str) -> None:
    refused = harness.refused()[which]
    with pytest.raises(CallbackError) as info:
        harness.backend.notify(refused, payload())
    assert (info.value.retriable, info.value.status) == (False, 0)
    assert f" {refused} " in str(info.value)
    assert harness.nothing_arrived(refused) is True
    destination = harness.destination("after-refusal")
    assert harness.backend.notify(destination, payload(1)) == harness.delivered_code
    assert harness.arrived(destination, 1) == [payload(1)]


def test_an_unreachable_destination_is_a_retriable_callback_error_without_status(harness: Harness) -> None:
    backend, unreachable = harness.unreachable()
    with pytest.raises(CallbackError) as info:
        backend.notify(unreachable, payload())
    assert (info.value.retriable, info.value.status) == (True, 0)
    assert unreachable in str(info.value)
    destination = harness.destination("after-unreachable")
    assert harness.backend.notify(destination, payload(2)) == harness.delivered_code
    assert harness.arrived(destination, 1) == [payload(2)]


# --------------------------------------------------------------------------- life cycle


def test_stop_lets_a_delivery_under_way_finish(harness: Harness) -> None:
    destination = harness.destination("stopping")
    under_way = gevent.spawn(harness.backend.notify, destination, payload(3))
    gevent.sleep(0)  # the greenlet sends, then waits for the answer
    harness.backend.stop()
    assert under_way.get(timeout=30) == harness.delivered_code
    assert harness.arrived(destination, 1) == [payload(3)]
