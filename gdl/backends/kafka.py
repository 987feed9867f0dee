"""The Kafka callback backend: the payload produced to the job's topic.

``backends.kafka`` holds librdkafka settings, passed to confluent-kafka's
``Producer`` as the Go service passed them to its producer. A callback is
delivered when, and only when, the broker's delivery report says so.

confluent-kafka's ``poll()`` and ``flush()`` are C calls that block the OS
thread, and so the whole gevent hub. So nothing here blocks: one poller
greenlet calls ``poll(0)`` (which returns at once) every few milliseconds
while messages await their reports, and sleeps on an event otherwise;
``notify`` produces (non-blocking) and waits on a gevent ``AsyncResult``
that the delivery callback sets (callbacks run inside ``poll()``, on the
poller greenlet). librdkafka's own threads do the network I/O.

Failures, by the delivery report's error:

- unknown topic or partition: :class:`~gdl.errors.UnknownTopic`, not
  retried, counted as ``kafka_unknown_topic`` in the notifier's stats;
- not authorized for the topic, invalid topic, message too large: not retried;
- anything else (broker down: the message times out after
  ``message.timeout.ms``): retried like an HTTP 5xx.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import gevent
import gevent.event

from gdl.errors import CallbackError, ConfigError, UnknownTopic

log = logging.getLogger(__name__)

# librdkafka settings gdl sets unless backends.kafka does.
DEFAULT_SETTINGS: dict[str, Any] = {
    # librdkafka's own default is 5 minutes: a notifier slot waits that long on a down broker.
    "message.timeout.ms": 30_000,
    # A topic missing from the metadata is reported unknown after this (librdkafka: 30 s,
    # as long as the message timeout above, so the message would time out first).
    "topic.metadata.propagation.max.ms": 10_000,
}
# Delivery errors, by confluent_kafka.KafkaError name, that fail a callback for good
# (any other is retried). Names missing from an older confluent-kafka are skipped.
UNKNOWN_TOPIC_ERRORS = ("_UNKNOWN_TOPIC", "UNKNOWN_TOPIC_OR_PART", "_UNKNOWN_PARTITION")
PERMANENT_ERRORS = ("TOPIC_AUTHORIZATION_FAILED", "TOPIC_EXCEPTION",  # TOPIC_EXCEPTION: an invalid topic name
                    "MSG_SIZE_TOO_LARGE", "RECORD_LIST_TOO_LARGE", "_INVALID_ARG", "INVALID_RECORD")
BUSY_POLL_INTERVAL = 0.005  # seconds between poll(0) calls while reports are awaited
IDLE_POLL_INTERVAL = 1.0  # seconds between poll(0) calls otherwise (serves librdkafka's logs and errors)
REPORT_GRACE = 5.0  # seconds past message.timeout.ms before giving up on a delivery report
STOP_FLUSH_TIMEOUT = 1.0  # seconds stop() lets outstanding messages finish before purging them


def _codes(*names: str) -> frozenset[int]:
    from confluent_kafka import KafkaError

    return frozenset(getattr(KafkaError, name) for name in names if hasattr(KafkaError, name))


class KafkaBackend:
    name = "kafka"

    def __init__(self, settings: Mapping[str, Any]):
        try:
            import confluent_kafka
        except ImportError as exc:
            raise ConfigError("backends.kafka: Kafka callbacks need confluent-kafka: pip install 'gdl[kafka]'") \
                from exc
        conf = _settings(settings)
        timeout_ms = float(conf.get("delivery.timeout.ms", conf["message.timeout.ms"]))
        # message.timeout.ms 0 is librdkafka's "forever": then so is the wait for the report.
        self.report_timeout: float | None = timeout_ms / 1000 + REPORT_GRACE if timeout_ms > 0 else None
        self.servers = str(conf.get("bootstrap.servers", ""))
        self._unknown = _codes(*UNKNOWN_TOPIC_ERRORS)
        self._permanent = _codes(*PERMANENT_ERRORS)
        self._kafka_error = confluent_kafka.KafkaError
        self._kafka_exception = confluent_kafka.KafkaException
        conf["error_cb"] = self._on_error
        conf["logger"] = logging.getLogger(f"{__name__}.librdkafka")
        try:
            self.producer = confluent_kafka.Producer(conf)
        except (confluent_kafka.KafkaException, ValueError, TypeError) as exc:
            raise ConfigError(f"backends.kafka: {_text(exc)}") from exc
        self._waiting = 0
        self._wake = gevent.event.Event()
        self._poller: gevent.Greenlet | None = None
        self._last_error = ""

    def start(self) -> None:
        if self._poller is None:
            self._poller = gevent.spawn(self._poll_forever)
            self._poller.name = "kafka-poller"
            log.info("kafka: producing callbacks to %s", self.servers)

    def notify(self, destination: str, body: bytes) -> int:
        """Produce ``body`` to the topic ``destination``; returns once the broker has it."""
        report = gevent.event.AsyncResult()

        def on_delivery(err: Any, _msg: Any) -> None:
            report.set(err)

        try:
            self.producer.produce(destination, value=body, on_delivery=on_delivery)
        except BufferError as exc:
            raise CallbackError(f"kafka: the producer's queue is full, topic {destination}: {exc}") from exc
        except self._kafka_exception as exc:
            raise self._error(destination, exc.args[0] if exc.args else exc) from exc
        self._waiting += 1
        self._wake.set()
        try:
            err = report.get(timeout=self.report_timeout)
        except gevent.Timeout as exc:
            raise CallbackError(f"kafka: no delivery report for topic {destination} "
                                f"within {self.report_timeout:.0f}s") from exc
        finally:
            self._waiting -= 1
        if err is not None:
            raise self._error(destination, err)
        return 0

    def stop(self) -> None:
        """Let outstanding messages finish for a moment, purge the rest, stop polling."""
        deadline = time.monotonic() + STOP_FLUSH_TIMEOUT
        while len(self.producer) and time.monotonic() < deadline:
            self.producer.poll(0)
            gevent.sleep(BUSY_POLL_INTERVAL)
        left = len(self.producer)
        if left:
            # Their callbacks were put back by the notifier: they are delivered again later.
            log.warning("kafka: %d message(s) not delivered at stop, purged", left)
            self.producer.purge()
            self.producer.poll(0)
        if self._poller is not None:
            self._poller.kill()
            self._poller = None

    def _poll_forever(self) -> None:
        while True:
            self.producer.poll(0)  # runs delivery callbacks, librdkafka's log lines and errors
            if self._waiting or len(self.producer):
                gevent.sleep(BUSY_POLL_INTERVAL)
            else:
                self._wake.wait(IDLE_POLL_INTERVAL)
                self._wake.clear()

    def _error(self, topic: str, err: Any) -> CallbackError:
        if not isinstance(err, self._kafka_error):
            return CallbackError(f"kafka: delivery to topic {topic} failed: {err}")
        text = f"kafka: delivery to topic {topic} failed: {err.name()}: {err.str()}"
        if err.code() in self._unknown:
            return UnknownTopic(text)
        if err.code() in self._permanent or err.fatal():
            return CallbackError(text, retriable=False)
        return CallbackError(text)

    def _on_error(self, err: Any) -> None:
        """librdkafka's client-wide errors (all brokers down, authentication): logged once per change."""
        text = f"{err.name()}: {err.str()}" if isinstance(err, self._kafka_error) else str(err)
        if text != self._last_error:
            log.warning("kafka: %s", text)
        self._last_error = text


def _settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``backends.kafka`` checked (names and scalar values) over gdl's defaults."""
    conf = dict(DEFAULT_SETTINGS)
    for name, value in settings.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"backends.kafka: setting names must be strings (got {name!r})")
        if isinstance(value, bool) or isinstance(value, (str, int, float)):
            conf[name] = value
        else:
            raise ConfigError(f"backends.kafka.{name}: must be a string, number or boolean")
    if not conf.get("bootstrap.servers") and not conf.get("metadata.broker.list"):
        raise ConfigError("backends.kafka.bootstrap.servers: required to enable Kafka callbacks")
    for name in ("message.timeout.ms", "delivery.timeout.ms"):
        if name in conf:
            try:
                conf[name] = int(float(conf[name]))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"backends.kafka.{name}: must be a number of milliseconds") from exc
    return conf


def _text(exc: BaseException) -> str:
    err = exc.args[0] if exc.args else exc
    return err.str() if hasattr(err, "str") else str(err)
