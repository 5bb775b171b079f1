"""Broker faults: a real mosquitto killed (SIGKILL) and restarted on the same port, 20 times, under the
running agent (the real App, in-process, so anomaly events enter through its outbox path and voice
actions through ``request_action`` with known creation times and TTLs).

Done-when of the reliability issue: 20 kill/restart cycles, 0 anomaly events lost, 0 voice actions
published after their TTL; the agent reconnects within 10 s (capped backoff), resubscribes, re-announces
discovery and availability (also when the broker has no persistence and comes back empty) and delivers
its outbox.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from conftest import Mosquitto, base_config, retained_messages, wait_until
from paho.mqtt.enums import CallbackAPIVersion

from agent import __version__
from agent.config import Config, parse_config
from agent.discovery import discovery_messages
from agent.messages import ActionRequest, AnomalyEvent
from agent.wiring import Daemon, build

BASE = "home-agent/testagent"
ANOMALY = f"{BASE}/anomaly/#"
VOICE = "test/voice/#"
TELEMETRY = "zigbee2mqtt/living_room_sensor"
CYCLES = 20
MAX_RECONNECT = 10.0
DOWN_TIME = 0.7  # longer than every short TTL below: whatever was queued with one must be dropped
SHORT_TTL = 0.3
IN_FLIGHT_TTL = 0.5
LONG_TTL = 8.0
RECEIVED = re.compile(r"Received PUBLISH from home-agent-testagent \(d\d, q\d, r\d, m\d+, '([^']+)'")
ARRIVAL_SLACK = 0.1  # broker forwarding on localhost, between the agent's send and the observer's receipt


@dataclass(frozen=True)
class Arrival:
    topic: str
    payload: bytes
    retained: bool
    at: float


class Observer:
    """A subscriber with a durable session (clean_session False, fixed client id) on a persistent broker:
    the broker keeps its subscriptions across restarts and queues for it while it reconnects, so it misses
    nothing the broker acknowledged to the agent. It also resubscribes on every connect."""

    def __init__(self, broker: Mosquitto, client_id: str, *topic_filters: str, durable: bool = True) -> None:
        self.topic_filters = topic_filters
        self.arrivals: list[Arrival] = []
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not durable)
        self.client.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]  # floats work; stubs say int
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_args: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, 10)
        self.client.loop_start()
        if not self.subscribed.wait(5):
            raise RuntimeError("observer could not subscribe")

    def _on_connect(self, client: paho.Client, *_args: Any) -> None:
        client.subscribe([(topic_filter, 1) for topic_filter in self.topic_filters])

    def _on_message(self, _client: Any, _userdata: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.arrivals.append(Arrival(message.topic, bytes(message.payload), bool(message.retain),
                                         time.monotonic()))

    def matching(self, topic_filter: str) -> list[Arrival]:
        with self._lock:
            return [a for a in self.arrivals if paho.topic_matches_sub(topic_filter, a.topic)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class RunningApp:
    """The real App on a thread (signals stay with pytest; ``request_stop`` ends it)."""

    def __init__(self, config: Config) -> None:
        self.daemon = build(config)
        self.app = self.daemon.app
        self.connected_at: list[float] = []
        self.app.link.add_connect_listener(lambda: self.connected_at.append(time.monotonic()))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="app-under-test", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.app.run()
        except BaseException as err:  # noqa: BLE001 - surfaced by the test
            self.error = err

    def stop(self) -> None:
        self.app.request_stop()
        self.thread.join(15)
        assert not self.thread.is_alive(), "the app did not stop"
        assert self.error is None, self.error


@pytest.fixture
def run_app() -> Iterator[Callable[[Config], RunningApp]]:
    apps: list[RunningApp] = []

    def start(config: Config) -> RunningApp:
        running = RunningApp(config)
        apps.append(running)
        return running

    yield start
    for running in apps:
        if running.thread.is_alive():
            running.stop()


def fault_config(broker: Mosquitto, state_dir: Path, voice_actions: int) -> Config:
    data = base_config(broker, state_dir)
    data["mqtt"].update({"reconnect_min_delay": 0.1, "reconnect_max_delay": 0.5, "keepalive": 5})
    data["homeassistant"].update({"announce_jitter": 0.0, "diagnostics_interval": 30.0})
    data["service"] = {"stop_timeout": 1.0}
    for k in range(voice_actions):
        data["actions"][f"v{k}"] = {"topic": f"test/voice/v{k}", "payload": f'{{"n": {k}}}',
                                    "min_interval": 0.0}
    return parse_config(data, source="faults.toml")


def received_by_broker(broker: Mosquitto) -> set[str]:
    """Topics of every PUBLISH the agent's client delivered to the broker (from its debug log)."""
    return set(RECEIVED.findall(broker.log_text()))


def grown(get: Callable[[], int], baseline: int) -> Callable[[], bool]:
    """A ``wait_until`` predicate: the counter went past ``baseline``."""
    return lambda: get() > baseline


def inject_event(daemon: Daemon, sensor: str, n: int) -> str:
    event = AnomalyEvent(sensor=sensor, score=0.5 + (n % 50) / 100, value=20.0 + n, kind="spike",
                         active=n % 2 == 0, time=time.time())
    return daemon.anomaly_events.publish_anomaly(event)


def test_twenty_broker_crashes_lose_no_anomaly_event_and_send_no_stale_voice_action(
        mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path,
        run_app: Callable[[Config], RunningApp]) -> None:
    # "log_type debug": the broker logs every PUBLISH it receives (flushed per line, before its PUBACK).
    broker = mosquitto_factory(persistence=True, extra_lines=("log_type debug",))
    observer = Observer(broker, "fault-observer", ANOMALY, VOICE)
    # A clean restart (SIGTERM) saves the observer's durable session; every crash below restores it from
    # there (a broker alive for ~1 s between crashes never reaches its own autosave).
    observer.subscribed.clear()
    broker.stop()
    broker.start()
    assert observer.subscribed.wait(5)
    running = run_app(fault_config(broker, tmp_path / "state", voice_actions=3 * CYCLES))
    app, daemon = running.app, running.daemon
    assert app.link.wait_connected(5)

    sent_events: dict[str, str] = {}  # event id -> its topic (one sensor per event: unique topics)
    sent_while_down: list[str] = []
    voice_expiry: dict[str, float] = {}  # action topic -> monotonic time its TTL ran out
    must_arrive: list[str] = []
    reconnect_times: list[float] = []
    readings_before = 0
    try:
        for cycle in range(CYCLES):
            # Up: events and a voice action that are likely in flight when the broker dies.
            for n in range(2):
                sensor = f"e{len(sent_events)}"
                sent_events[inject_event(daemon, sensor, n)] = f"{BASE}/anomaly/{sensor}"
            in_flight = f"v{3 * cycle}"
            now = time.monotonic()
            daemon.actions.request_action(ActionRequest(in_flight, "voice", now, ttl=IN_FLIGHT_TTL))
            voice_expiry[f"test/voice/{in_flight}"] = now + IN_FLIGHT_TTL
            broker.kill()
            killed = time.monotonic()

            # Down: events go to the outbox; a short-TTL action must expire, a long-TTL one must arrive.
            for n in range(3):
                sensor = f"e{len(sent_events)}"
                message_id = inject_event(daemon, sensor, n)
                sent_events[message_id] = f"{BASE}/anomaly/{sensor}"
                sent_while_down.append(message_id)
            short, long = f"v{3 * cycle + 1}", f"v{3 * cycle + 2}"
            now = time.monotonic()
            daemon.actions.request_action(ActionRequest(short, "voice", now, ttl=SHORT_TTL))
            voice_expiry[f"test/voice/{short}"] = now + SHORT_TTL
            daemon.actions.request_action(ActionRequest(long, "voice", now, ttl=LONG_TTL))
            voice_expiry[f"test/voice/{long}"] = now + LONG_TTL
            must_arrive.append(f"test/voice/{long}")
            time.sleep(max(0.0, killed + DOWN_TIME - time.monotonic()))

            connects = len(running.connected_at)
            broker.start()
            started = time.monotonic()
            assert wait_until(grown(lambda: len(running.connected_at), connects), MAX_RECONNECT), \
                f"cycle {cycle}: no reconnect within {MAX_RECONNECT} s"
            reconnect_times.append(running.connected_at[-1] - started)

            # Every event acknowledged to the caller so far has reached the broker (its PUBACK deletes it
            # from the outbox, so the broker's receipt is what the agent answers for)...
            def not_at_broker(sent: tuple[str, ...] = tuple(sent_events.values())) -> set[str]:
                return set(sent) - received_by_broker(broker)

            assert wait_until(lambda: not not_at_broker(), 10), \
                f"cycle {cycle}: lost {sorted(not_at_broker())}"
            # ...and those stored during the outage reach the subscriber, through the replayed outbox.
            def not_at_observer(sent: tuple[str, ...] = tuple(sent_while_down)) -> set[str]:
                return set(sent) - {json.loads(a.payload)["id"] for a in observer.matching(ANOMALY)}

            assert wait_until(lambda: not not_at_observer(), 10), \
                f"cycle {cycle}: not delivered {sorted(not_at_observer())}"
            assert wait_until(lambda: app.outbox.depth == 0, 5), \
                f"cycle {cycle}: {app.outbox.stats()}, pending {app.outbox.pending()}"
            assert wait_until(lambda: observer.matching(must_arrive[-1]), 5), f"cycle {cycle}: {long} missing"

            # Resubscribed: telemetry is received again after the restart.
            readings_before = app.counters()["readings"]
            publisher = paho.Client(CallbackAPIVersion.VERSION2)
            publisher.connect(broker.host, broker.port)
            publisher.loop_start()
            reading = json.dumps({"temperature": 20 + cycle % 10})
            publisher.publish(TELEMETRY, reading, qos=1).wait_for_publish(5)
            publisher.disconnect()
            publisher.loop_stop()
            assert wait_until(grown(lambda: app.counters()["readings"], readings_before), 5), f"cycle {cycle}"
    finally:
        observer.close()

    counters = app.counters()
    running.stop()

    # 0 anomaly events lost (checked per cycle above).
    assert len(sent_events) == 5 * CYCLES
    assert not set(sent_events.values()) - received_by_broker(broker)
    received_ids = [json.loads(a.payload)["id"] for a in observer.matching(ANOMALY)]
    # Events the broker acknowledged and then lost in its own crash (before forwarding them): not the
    # agent's to resend; counted to show what a broker crash costs.
    lost_by_broker = set(sent_events) - set(received_ids)
    assert not lost_by_broker & set(sent_while_down)
    # 0 voice actions published after their TTL: judge each action by its first arrival.
    first_arrival: dict[str, float] = {}
    for arrival in observer.matching(VOICE):
        first_arrival.setdefault(arrival.topic, arrival.at)
    late = {topic: round(at - voice_expiry[topic], 3) for topic, at in first_arrival.items()
            if at > voice_expiry[topic] + ARRIVAL_SLACK}
    assert late == {}, f"voice actions published after their TTL (seconds late): {late}"
    assert not [t for t in first_arrival if t.endswith(tuple(f"/v{3 * c + 1}" for c in range(CYCLES)))]
    assert all(topic in first_arrival for topic in must_arrive)
    assert counters["expired"] >= CYCLES  # at least every short-TTL action was dropped by the link
    assert counters["connects"] >= CYCLES + 1
    assert counters["announcements"] >= CYCLES + 1  # discovery and states re-announced on every connect
    assert max(reconnect_times) < MAX_RECONNECT
    assert counters["outbox_depth"] == 0
    print(f"\n{CYCLES} broker crashes: {len(sent_events)} events, 0 lost by the agent "
          f"({len(received_ids) - len(set(received_ids))} duplicates at the subscriber, "
          f"{len(lost_by_broker)} acknowledged by the broker but lost in its crash), "
          f"{counters['expired']} expired voice messages, 0 late; reconnect after restart "
          f"median {sorted(reconnect_times)[CYCLES // 2]:.2f} s, max {max(reconnect_times):.2f} s; "
          f"outbox resent {counters['outbox_resent']}")


def test_an_empty_broker_gets_discovery_availability_subscriptions_and_outbox_back(
        mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path,
        run_app: Callable[[Config], RunningApp]) -> None:
    broker = mosquitto_factory(persistence=False)  # a restart wipes every retained message
    config = fault_config(broker, tmp_path / "state", voice_actions=0)
    expected_discovery = set(discovery_messages(config, event_types=[], sw_version=__version__))
    running = run_app(config)
    app, daemon = running.app, running.daemon
    assert app.link.wait_connected(5)
    for cycle in range(3):
        broker.kill()
        assert wait_until(lambda: not app.link.connected, 5)
        # One event per sensor while the broker is away: the broker must end up retaining each of them.
        latest = {f"c{cycle}s{n}": inject_event(daemon, f"c{cycle}s{n}", n) for n in range(4)}
        time.sleep(0.3)
        broker.start()
        started = time.monotonic()
        assert app.link.wait_connected(MAX_RECONNECT)
        reconnect = time.monotonic() - started

        def retained_back(latest: dict[str, str] = latest) -> dict[str, bytes] | None:
            retained = retained_messages(broker, "#", settle=0.2)
            complete = (expected_discovery <= set(retained)
                        and retained.get(f"{BASE}/availability") == b"online"
                        and retained.get(f"{BASE}/mute/state") == b"OFF"
                        and all(f"{BASE}/anomaly/{sensor}" in retained for sensor in latest))
            return retained if complete else None

        retained = wait_until(retained_back, 5, interval=0.1)
        assert retained, f"cycle {cycle}: not restored: {sorted(retained_messages(broker, '#'))}"
        for sensor, message_id in latest.items():
            assert json.loads(retained[f"{BASE}/anomaly/{sensor}"])["id"] == message_id
        before = app.counters()["readings"]
        publisher = paho.Client(CallbackAPIVersion.VERSION2)
        publisher.connect(broker.host, broker.port)
        publisher.loop_start()
        publisher.publish(TELEMETRY, b'{"temperature": 21.0}', qos=1).wait_for_publish(5)
        publisher.disconnect()
        publisher.loop_stop()
        assert wait_until(grown(lambda: app.counters()["readings"], before), 5)
        assert reconnect < MAX_RECONNECT
    assert app.counters()["outbox_depth"] == 0
    running.stop()

