"""bench/broker.py: the private broker of a bench run and of ``make demo`` (scripts/demo.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bench import broker as bench_broker
from bench.broker import BenchBroker


def test_the_embedded_broker_is_used_when_asked_for_even_with_mosquitto_installed(tmp_path: Path) -> None:
    broker = BenchBroker(tmp_path, embedded=True)
    try:
        assert broker.process is None and broker.kind == "embedded mini broker"
        client = paho.Client(CallbackAPIVersion.VERSION2)
        connected = threading.Event()
        client.on_connect = lambda *_args: connected.set()
        client.connect("127.0.0.1", broker.port, 30)
        client.loop_start()
        try:
            assert connected.wait(5)
        finally:
            client.disconnect()
            client.loop_stop()
    finally:
        broker.stop()


def test_a_mosquitto_that_exits_at_once_is_reported_without_waiting(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_broker, "find_mosquitto", lambda: "/bin/false")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="mosquitto exited with status 1"):
        BenchBroker(tmp_path)
    assert time.monotonic() - started < bench_broker.START_TIMEOUT / 2
