"""The embedded demo broker (scripts/mini_broker.py) speaks enough MQTT 3.1.1 for paho and the agent."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from mini_broker import MiniBroker, topic_matches


class Client:
    def __init__(self, port: int, client_id: str, will: tuple[str, bytes] | None = None) -> None:
        self.messages: list[tuple[str, bytes, bool, int]] = []
        self._cond = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.on_message = self._on_message
        connected = threading.Event()
        self.client.on_connect = lambda *_a: connected.set()
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        assert connected.wait(5)

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((message.topic, bytes(message.payload), bool(message.retain), message.qos))
            self._cond.notify_all()

    def wait(self, count: int, timeout: float = 5.0) -> list[tuple[str, bytes, bool, int]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < count and time.monotonic() < deadline:
                self._cond.wait(0.05)
            return list(self.messages)

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.client.subscribe(topic_filter, qos)
        time.sleep(0.1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker() -> Iterator[MiniBroker]:
    server = MiniBroker(port=0)
    server.start()
    yield server
    server.stop()


def test_topic_matching() -> None:
    assert topic_matches("a/+/c", "a/b/c") and not topic_matches("a/+/c", "a/b/d")
    assert topic_matches("a/#", "a/b/c") and topic_matches("a/#", "a") and topic_matches("#", "x/y")
    assert not topic_matches("a/b", "a/b/c") and not topic_matches("a/b/c", "a/b")
    assert not topic_matches("#", "$SYS/x") and not topic_matches("+/x", "$SYS/x")


def test_publish_subscribe_qos_and_retained(broker: MiniBroker) -> None:
    publisher = Client(broker.port, "pub")
    publisher.client.publish("home/retained", b"kept", qos=1, retain=True).wait_for_publish(5)
    subscriber = Client(broker.port, "sub")
    subscriber.subscribe("home/#", qos=1)
    publisher.client.publish("home/live", b"now", qos=1).wait_for_publish(5)
    publisher.client.publish("home/zero", b"q0", qos=0)
    publisher.client.publish("elsewhere", b"no", qos=1).wait_for_publish(5)
    messages = subscriber.wait(3)
    assert ("home/retained", b"kept", True, 1) in messages
    assert ("home/live", b"now", False, 1) in messages
    assert ("home/zero", b"q0", False, 0) in messages
    assert all(topic != "elsewhere" for topic, *_ in messages)
    publisher.client.publish("home/retained", b"", qos=1, retain=True).wait_for_publish(5)  # clears it
    late = Client(broker.port, "late")
    late.subscribe("home/#")
    time.sleep(0.2)
    assert late.messages == []
    for client in (publisher, subscriber, late):
        client.close()


def test_last_will_on_an_abrupt_disconnect(broker: MiniBroker) -> None:
    watcher = Client(broker.port, "watcher")
    watcher.subscribe("agent/availability")
    doomed = Client(broker.port, "doomed", will=("agent/availability", b"offline"))
    doomed.client.loop_stop()
    sock = doomed.client.socket()
    assert sock is not None
    sock.close()  # no DISCONNECT packet: the broker must send the will
    assert ("agent/availability", b"offline", False, 1) in watcher.wait(1)
    watcher.close()


def test_a_clean_disconnect_sends_no_will(broker: MiniBroker) -> None:
    watcher = Client(broker.port, "watcher")
    watcher.subscribe("agent/availability")
    polite = Client(broker.port, "polite", will=("agent/availability", b"offline"))
    polite.close()
    time.sleep(0.3)
    assert watcher.messages == []
    watcher.close()
