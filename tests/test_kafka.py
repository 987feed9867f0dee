"""Kafka callbacks against a real Kafka-protocol broker (tansu) on loopback."""

from __future__ import annotations

import gevent
import pytest
from confluent_kafka import KafkaError

from gdl.backends.kafka import PERMANENT_ERRORS, UNKNOWN_TOPIC_ERRORS, KafkaBackend
from gdl.errors import CallbackError, ConfigError, UnknownTopic
from tests.brokers import KafkaBroker
from tests.conftest import free_port, wait_until
from tests.httpserver import LoopbackServer

BASE = "http://files.test/files"  # processor.download_url in make_config
TOPIC = "downloads"


# Tests take ``store`` for an empty Redis: no stats of an earlier test's processes.
@pytest.fixture
def broker(tmp_path):
    server = KafkaBroker(tmp_path).start()
    yield server
    server.close()


@pytest.fixture
def files():
    with LoopbackServer() as server:
        server.add("/a.png", b"a file")
        yield server


def kafka(broker: KafkaBroker, **settings) -> dict:
    """backends.kafka for the tests: quick timeouts and reconnects; no topic auto-creation."""
    return {"kafka": {"bootstrap.servers": broker.address, "message.timeout.ms": 2500,
                      "allow.auto.create.topics": False, "topic.metadata.propagation.max.ms": 300,
                      "reconnect.backoff.ms": 50, "reconnect.backoff.max.ms": 200, **settings}}


def callback_done(running, job_id: str) -> dict:
    def done():
        record = running.get(f"/jobs/{job_id}").json()
        return record if record["callback_state"] in ("delivered", "failed") else None
    return wait_until(done, timeout=20)


def notifier_stats(running, name: str) -> dict:
    return wait_until(lambda: (s := running.get("/stats/notifier")).status_code == 200
                      and s.json().get(name) and s.json())


def test_the_callback_arrives_on_the_topic_with_the_contract_payload(store, run_service, broker, files):
    broker.create_topic(TOPIC)
    running = run_service(backends=kafka(broker))
    job_id = running.enqueue(url=files.url("/a.png"), aggr_id="a", aggr_limit=1, callback_type="kafka",
                             callback_dst=TOPIC, extra='{"sku": 1}')
    record = callback_done(running, job_id)
    assert (record["callback_state"], record["callback_attempts"], record["callback_code"]) == ("delivered", 1, 0)
    assert broker.consume(TOPIC) == [{
        "success": True, "error": "", "extra": '{"sku": 1}', "resource_url": files.url("/a.png"),
        "download_url": f"{BASE}/{job_id[:3]}/{job_id}", "job_id": job_id, "response_code": 200,
        "delivered": True, "delivery_error": "", "image_size": "",
    }]
    assert notifier_stats(running, "successful")["successful"] == 1


def test_a_down_broker_is_retried_then_failed_and_retry_redelivers(store, run_service, broker, files):
    broker.create_topic(TOPIC)
    running = run_service(backends=kafka(broker), notifier={"max_retries": 1})
    broker.stop()
    job_id = running.enqueue(url=files.url("/a.png"), aggr_id="a", aggr_limit=1, callback_type="kafka",
                             callback_dst=TOPIC)
    record = callback_done(running, job_id)
    error = f"kafka: delivery to topic {TOPIC} failed: _MSG_TIMED_OUT: Local: Message timed out"
    assert (record["callback_state"], record["callback_attempts"], record["callback_error"]) == \
        ("failed", 2, error)
    assert [e["outcome"] for e in record["attempts_log"] if e["kind"] == "callback"] == ["retry", "failed"]

    broker.start()  # memory storage: the topic is made again
    broker.create_topic(TOPIC)
    assert running.post(f"/retry/{job_id}").status_code == 204
    record = callback_done(running, job_id)
    assert (record["callback_state"], record["callback_attempts"], record["callback_error"]) == \
        ("delivered", 1, "")  # POST /retry starts the count again
    [payload] = broker.consume(TOPIC)
    assert (payload["job_id"], payload["success"]) == (job_id, True)


def test_an_unknown_topic_fails_the_callback_at_once_and_is_counted(store, run_service, broker, files):
    running = run_service(backends=kafka(broker))
    job_id = running.enqueue(url=files.url("/a.png"), aggr_id="a", aggr_limit=1, callback_type="kafka",
                             callback_dst="no-such-topic")
    record = callback_done(running, job_id)
    assert (record["callback_state"], record["callback_attempts"], record["callback_error"]) == (
        "failed", 1, "kafka: delivery to topic no-such-topic failed: UNKNOWN_TOPIC_OR_PART: "
                     "Broker: Unknown topic or partition")
    stats = notifier_stats(running, "kafka_unknown_topic")
    assert (stats["kafka_unknown_topic"], stats["failed"], stats.get("retried", 0)) == (1, 1, 0)


# --------------------------------------------------------------------------- the backend alone, on the broker
# (what every backend promises is in tests/test_backends_contract.py)


def test_an_unknown_topic_is_an_unknown_topic_error(broker):
    backend = KafkaBackend(kafka(broker)["kafka"])
    backend.start()
    try:
        with pytest.raises(UnknownTopic) as info:
            backend.notify("no-such-topic", b"{}")
    finally:
        backend.stop()
    assert (str(info.value), info.value.retriable, info.value.status) == (
        "kafka: delivery to topic no-such-topic failed: UNKNOWN_TOPIC_OR_PART: Broker: Unknown topic or partition",
        False, 0)


def test_stop_purges_what_cannot_be_delivered_and_its_notify_fails_retriable(tmp_path):
    backend = KafkaBackend({"bootstrap.servers": f"127.0.0.1:{free_port()}", "message.timeout.ms": 60_000})
    backend.start()
    waiting = gevent.spawn(backend.notify, TOPIC, b"{}")
    gevent.sleep(0.1)  # produced; no broker to take it
    backend.stop()
    with pytest.raises(CallbackError) as info:
        waiting.get(timeout=10)
    assert (type(info.value), info.value.retriable) == (CallbackError, True)
    assert str(info.value).startswith(f"kafka: delivery to topic {TOPIC} failed: _PURGE_QUEUE: ")


# --------------------------------------------------------------------------- the backend alone, no broker


def backend() -> KafkaBackend:
    return KafkaBackend({"bootstrap.servers": "127.0.0.1:9"})


@pytest.mark.parametrize(("code", "kind", "retriable"), [
    (KafkaError.UNKNOWN_TOPIC_OR_PART, UnknownTopic, False),
    (KafkaError._UNKNOWN_TOPIC, UnknownTopic, False),
    (KafkaError._UNKNOWN_PARTITION, UnknownTopic, False),
    (KafkaError.TOPIC_AUTHORIZATION_FAILED, CallbackError, False),
    (KafkaError.TOPIC_EXCEPTION, CallbackError, False),  # an invalid topic name
    (KafkaError.MSG_SIZE_TOO_LARGE, CallbackError, False),
    (KafkaError._MSG_TIMED_OUT, CallbackError, True),
    (KafkaError._TRANSPORT, CallbackError, True),
    (KafkaError.NOT_ENOUGH_REPLICAS, CallbackError, True),
])
def test_delivery_errors_are_typed_by_code(code: int, kind: type, retriable: bool) -> None:
    err = backend()._error("t", KafkaError(code))
    assert (type(err), err.retriable) == (kind, retriable)
    assert str(err).startswith(f"kafka: delivery to topic t failed: {KafkaError(code).name()}: ")


def test_every_error_name_the_backend_classifies_is_one_of_confluent_kafkas() -> None:
    # A misspelt name would be skipped in silence, and its error retried.
    names = UNKNOWN_TOPIC_ERRORS + PERMANENT_ERRORS
    assert [name for name in names if not hasattr(KafkaError, name)] == []


@pytest.mark.parametrize(("settings", "message"), [
    ({"message.timeout.ms": 1000}, "backends.kafka.bootstrap.servers: required to enable Kafka callbacks"),
    ({"bootstrap.servers": "b:9092", "sasl": {"x": 1}}, "backends.kafka.sasl: must be a string, number or boolean"),
    ({"bootstrap.servers": "b:9092", "no.such.setting": 1},
     'backends.kafka: No such configuration property: "no.such.setting"'),
])
def test_bad_settings_are_config_errors(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        KafkaBackend(settings)
    assert str(info.value) == message


def test_the_report_wait_follows_message_timeout() -> None:
    assert backend().report_timeout == 35.0  # gdl's default 30 s + 5 s grace
    assert KafkaBackend({"bootstrap.servers": "b:1", "message.timeout.ms": "2000"}).report_timeout == 7.0
    assert KafkaBackend({"bootstrap.servers": "b:1", "message.timeout.ms": 0}).report_timeout is None
