"""The real daemon (``python -m agent run``) against a real mosquitto: availability, discovery, last will,
re-announce on HA birth, the mute switch, broker restarts, bad credentials, SIGHUP, a payload flood and
``home-agent action``."""

from __future__ import annotations

import argparse
import json
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Daemon,
    Mosquitto,
    MqttProbe,
    base_config,
    make_password_file,
    retained_messages,
    run_cli,
    wait_until,
)

from agent import __version__
from agent.config import load_config, parse_config
from agent.discovery import discovery_messages
from agent.errors import ActionError
from agent.messages import ActionRequest
from agent.wiring import build

BASE = "home-agent/testagent"
AVAILABILITY = f"{BASE}/availability"
DIAGNOSTICS = f"{BASE}/diagnostics"
MUTE_SET = f"{BASE}/mute/set"
MUTE_STATE = f"{BASE}/mute/state"
TELEMETRY = "zigbee2mqtt/living_room_sensor"
SENSOR_STATE = f"{BASE}/sensor/living_room_temperature/state"
DISCOVERY = "homeassistant/+/testagent/+/config"


def expected_discovery(config_path: Path) -> dict[str, dict[str, Any]]:
    config = load_config(config_path)
    event_types = sorted({c.action for c in config.voice.commands}) if config.voice_active else []
    return dict(discovery_messages(config, event_types=event_types, sw_version=__version__))


def start_online(daemon_factory: Callable[..., Daemon], config: Path, probe: MqttProbe,
                 **kwargs: Any) -> Daemon:
    """Start the daemon and wait for its (new) ``online``."""
    before = len(probe.matching(AVAILABILITY, b"online"))
    daemon = daemon_factory(config, **kwargs)
    try:
        probe.wait_for(AVAILABILITY, b"online", timeout=5, count=before + 1)
    except AssertionError:
        raise AssertionError("daemon not online within 5 s; its log:\n" + daemon.log_text()) from None
    return daemon


def test_online_within_5s_with_every_discovery_config_retained(
        mosquitto: Mosquitto, write_config: Callable[..., Path], daemon_factory: Callable[..., Daemon],
        mqtt_client: Callable[..., MqttProbe]) -> None:
    config = write_config(mosquitto)
    probe = mqtt_client().subscribe(AVAILABILITY)
    t0 = time.monotonic()
    daemon = start_online(daemon_factory, config, probe)
    startup = probe.matching(AVAILABILITY, b"online")[0].at - t0
    assert startup < 5.0
    expected = expected_discovery(config)
    assert len(expected) >= 11  # 8 diagnostics, mute switch, event, sensor (+ anomaly entities)

    def all_retained() -> dict[str, bytes] | None:
        found = retained_messages(mosquitto, "homeassistant/#", settle=0.2)
        return found if set(found) == set(expected) else None

    retained = wait_until(all_retained, 5.0 - (time.monotonic() - t0), interval=0.1)
    assert retained, f"retained discovery configs {sorted(retained_messages(mosquitto, 'homeassistant/#'))}"
    for topic, payload in retained.items():
        assert json.loads(payload) == expected[topic]
    states = retained_messages(mosquitto, f"{BASE}/#")
    assert states[AVAILABILITY] == b"online"
    assert states[MUTE_STATE] == b"OFF"
    assert set(json.loads(states[DIAGNOSTICS])) >= {"uptime", "messages_in", "messages_out", "dropped",
                                                    "bad_payloads"}
    print(f"\nstartup to online: {startup:.2f} s, RSS {daemon.rss_kb() / 1024:.1f} MiB")


def test_clean_stop_publishes_offline_and_exits_0(
        mosquitto: Mosquitto, write_config: Callable[..., Path], daemon_factory: Callable[..., Daemon],
        mqtt_client: Callable[..., MqttProbe]) -> None:
    probe = mqtt_client().subscribe(AVAILABILITY)
    daemon = start_online(daemon_factory, write_config(mosquitto), probe)
    t0 = time.monotonic()
    assert daemon.terminate(timeout=5) == 0
    assert time.monotonic() - t0 < 5
    probe.wait_for(AVAILABILITY, b"offline", timeout=1)
    assert retained_messages(mosquitto, AVAILABILITY)[AVAILABILITY] == b"offline"
    # A clean DISCONNECT (not a dropped socket that would fire the last will).
    assert "Client home-agent-testagent disconnected." in mosquitto.log_text()


def test_sigint_also_stops_cleanly(mosquitto: Mosquitto, write_config: Callable[..., Path],
                                   daemon_factory: Callable[..., Daemon],
                                   mqtt_client: Callable[..., MqttProbe]) -> None:
    probe = mqtt_client().subscribe(AVAILABILITY)
    daemon = start_online(daemon_factory, write_config(mosquitto), probe)
    daemon.signal(signal.SIGINT)
    assert daemon.wait(5) == 0
    probe.wait_for(AVAILABILITY, b"offline", timeout=1)


def test_kill_9_leads_to_offline_by_last_will(
        mosquitto: Mosquitto, write_config: Callable[..., Path], daemon_factory: Callable[..., Daemon],
        mqtt_client: Callable[..., MqttProbe]) -> None:
    probe = mqtt_client().subscribe(AVAILABILITY)
    daemon = start_online(daemon_factory, write_config(mosquitto), probe)
    daemon.kill()
    message = probe.wait_for(AVAILABILITY, b"offline", timeout=3)
    assert retained_messages(mosquitto, AVAILABILITY)[AVAILABILITY] == b"offline"
    assert message.payload == b"offline"


def test_reannounces_discovery_when_home_assistant_comes_online(
        mosquitto: Mosquitto, write_config: Callable[..., Path], daemon_factory: Callable[..., Daemon],
        mqtt_client: Callable[..., MqttProbe]) -> None:
    config = write_config(mosquitto)
    probe = mqtt_client().subscribe(AVAILABILITY)
    start_online(daemon_factory, config, probe)
    expected = expected_discovery(config)
    watcher = mqtt_client().subscribe(DISCOVERY, MUTE_STATE)
    time.sleep(0.3)  # the initial announcement has settled; retained copies arrived on subscribe
    watcher.clear()
    probe.publish("homeassistant/status", b"Online")  # case matters: ignored
    time.sleep(0.5)
    assert watcher.matching(DISCOVERY) == []
    probe.publish("homeassistant/status", b"online")
    for topic in expected:
        watcher.wait_for(topic, timeout=2)  # announce_jitter is 0.2 s
    live = [m for m in watcher.matching(DISCOVERY) if not m.retained]
    assert {m.topic for m in live} == set(expected)
    watcher.wait_for(MUTE_STATE, b"OFF", timeout=1)  # states are re-published too


def test_mute_switch_round_trip_and_persistence(
        mosquitto: Mosquitto, write_config: Callable[..., Path], daemon_factory: Callable[..., Daemon],
        mqtt_client: Callable[..., MqttProbe], tmp_path: Path) -> None:
    config = write_config(mosquitto)
    probe = mqtt_client().subscribe(AVAILABILITY, MUTE_STATE, DIAGNOSTICS)
    daemon = start_online(daemon_factory, config, probe)
    probe.wait_for(MUTE_STATE, b"OFF")
    probe.publish(MUTE_SET, b"on")  # HA payloads are case-sensitive: rejected and counted
    probe.publish(MUTE_SET, b"ON")
    probe.wait_for(MUTE_STATE, b"ON", timeout=2)
    assert wait_until(lambda: probe.last_json(DIAGNOSTICS).get("bad_payloads", 0) >= 1, 3)
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["muted"] is True
    assert daemon.terminate(5) == 0

    mosquitto.restart()  # no persistence: the retained ON is gone; it must come from the state file
    probe = mqtt_client().subscribe(AVAILABILITY, MUTE_STATE)
    start_online(daemon_factory, config, probe)
    probe.wait_for(MUTE_STATE, b"ON", timeout=2)
    probe.publish(MUTE_SET, b"OFF")
    probe.wait_for(MUTE_STATE, b"OFF", timeout=2)


def test_corrupt_state_file_is_moved_aside(
        mosquitto: Mosquitto, write_config: Callable[..., Path], daemon_factory: Callable[..., Daemon],
        mqtt_client: Callable[..., MqttProbe], tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "state.json").write_text('{"muted": tru', encoding="utf-8")
    probe = mqtt_client().subscribe(AVAILABILITY, MUTE_STATE)
    daemon = start_online(daemon_factory, write_config(mosquitto), probe)
    probe.wait_for(MUTE_STATE, b"OFF")
    aside = list(state_dir.glob("state.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == '{"muted": tru'
    assert "corrupt" in daemon.log_text()


def test_broker_restart_reconnects_and_resubscribes(
        mosquitto: Mosquitto, write_config: Callable[..., Path], daemon_factory: Callable[..., Daemon],
        mqtt_client: Callable[..., MqttProbe]) -> None:
    config = write_config(mosquitto)
    probe = mqtt_client().subscribe(AVAILABILITY)
    daemon = start_online(daemon_factory, config, probe)
    mosquitto.kill()
    time.sleep(0.3)
    mosquitto.start()  # same port, empty: no retained messages, no sessions
    probe = mqtt_client().subscribe(AVAILABILITY, SENSOR_STATE, MUTE_STATE)
    probe.wait_for(AVAILABILITY, b"online", timeout=5)
    # Discovery is back (re-announced on connect) and telemetry + mute subscriptions work again.
    assert wait_until(lambda: set(retained_messages(mosquitto, "homeassistant/#", 0.1))
                      == set(expected_discovery(config)), 3)
    probe.publish(TELEMETRY, json.dumps({"temperature": 19.25}))
    assert probe.wait_for(SENSOR_STATE, timeout=2).payload == b"19.25"
    probe.publish(MUTE_SET, b"ON")
    probe.wait_for(MUTE_STATE, b"ON", timeout=2)
    assert daemon.alive()


def test_bad_credentials_exit_1_without_retrying_and_password_never_logged(
        mosquitto_factory: Callable[..., Mosquitto], write_config: Callable[..., Path],
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    password = "s3cret-Pa55word"
    broker = mosquitto_factory(password_file=make_password_file(tmp_path / "passwd", "agent", password))
    config = write_config(broker, **{"mqtt.username": "agent"})
    daemon = daemon_factory(config, env={"HOME_AGENT_MQTT_PASSWORD": "wrong-" + password})
    assert daemon.wait(5) == 1
    log = daemon.log_text()
    assert "refused the connection" in log and ("not authorized" in log.lower() or "bad user" in log.lower())
    assert password not in log
    assert broker.log_text().count("New client connected") <= 1

    # The right password from a file: connects; still never logged (DEBUG logging).
    secret_file = tmp_path / "mqtt-password"
    secret_file.write_text(password + "\n", encoding="utf-8")
    config = write_config(broker, **{"mqtt.username": "agent", "mqtt.password_file": str(secret_file)})
    probe = MqttProbe(broker, username="agent", password=password).subscribe(AVAILABILITY)
    try:
        daemon = start_online(daemon_factory, config, probe)
        assert daemon.terminate(5) == 0
        assert password not in daemon.log_text()
    finally:
        probe.close()


def test_sighup_invalid_config_keeps_running_valid_config_applies(
        mosquitto: Mosquitto, write_config: Callable[..., Path], daemon_factory: Callable[..., Daemon],
        mqtt_client: Callable[..., MqttProbe], tmp_path: Path) -> None:
    config = write_config(mosquitto)
    good_text = config.read_text()
    probe = mqtt_client().subscribe(AVAILABILITY, MUTE_STATE, DISCOVERY)
    daemon = start_online(daemon_factory, config, probe)
    old_sensor_topic = "homeassistant/sensor/testagent/sensor_living_room_temperature/config"
    probe.wait_for(old_sensor_topic)

    config.write_text(good_text.replace("keepalive = 5", 'keepalive = "abc"'))
    daemon.signal(signal.SIGHUP)
    assert wait_until(lambda: "reload failed" in daemon.log_text(), 3), daemon.log_text()
    assert "mqtt.keepalive" in daemon.log_text()
    probe.publish(MUTE_SET, b"ON")
    probe.wait_for(MUTE_STATE, b"ON", timeout=2)  # still serving with the old config
    assert daemon.alive()

    # A valid new config: the telemetry stream is replaced -> new entity announced, the old one removed.
    new = base_config(mosquitto, tmp_path / "state")
    new["telemetry"] = [{"topic": "tele/plug/SENSOR", "field": "ENERGY.Power", "sensor": "plug_power",
                         "unit": "W", "device_class": "power"}]
    write_config(data=new)
    daemon.signal(signal.SIGHUP)
    new_topic = "homeassistant/sensor/testagent/sensor_plug_power/config"
    probe.wait_for(new_topic, timeout=3)
    assert wait_until(lambda: old_sensor_topic not in retained_messages(mosquitto, "homeassistant/#", 0.1), 3)
    assert new_topic in retained_messages(mosquitto, "homeassistant/#", 0.1)
    probe.subscribe(f"{BASE}/sensor/+/state")
    probe.publish("tele/plug/SENSOR", json.dumps({"ENERGY": {"Power": 42}}))
    assert probe.wait_for(f"{BASE}/sensor/plug_power/state", timeout=2).payload == b"42.0"
    assert daemon.alive()
    assert daemon.terminate(5) == 0


def test_stale_discovery_configs_are_removed_at_startup(
        mosquitto: Mosquitto, write_config: Callable[..., Path], daemon_factory: Callable[..., Daemon],
        mqtt_client: Callable[..., MqttProbe]) -> None:
    probe = mqtt_client().subscribe(AVAILABILITY)
    stale = "homeassistant/sensor/testagent/sensor_removed_stream/config"
    foreign = "homeassistant/sensor/other_agent/sensor_x/config"
    probe.publish(stale, b'{"name": "old"}', retain=True)
    probe.publish(foreign, b'{"name": "not ours"}', retain=True)
    config = write_config(mosquitto)
    start_online(daemon_factory, config, probe)
    assert wait_until(lambda: stale not in retained_messages(mosquitto, "homeassistant/#", 0.1), 4)
    retained = retained_messages(mosquitto, "homeassistant/#")
    assert foreign in retained
    assert set(expected_discovery(config)) <= set(retained)


def random_payloads(count: int, seed: int = 1234) -> list[bytes]:
    """Malformed, hostile and occasionally valid telemetry payloads."""
    rng = random.Random(seed)
    fixed = [b"", b"null", b"nan", b"NaN", b"inf", b"-Infinity", b"1e999", b'{"temperature": NaN}',
             b'{"temperature": "21.5"}', b'{"temperature": true}', b'{"temperature": null}', b"[1,2,3]",
             b'{"temperature": 1e400}', b'{"temperature": 500}', b"\xff\xfe\x00", b"{" * 10000,
             b'{"temperature": ' + b"[" * 5000, b"x" * 70000, b'{"temperature": 21.5}', b"21.5",
             b'{"other": 1}', b'{"temperature": {"nested": 1}}', b"\x00" * 100, "°C".encode()]
    payloads: list[bytes] = []
    for index in range(count):
        kind = index % 4
        if kind == 0:
            payloads.append(fixed[rng.randrange(len(fixed))])
        elif kind == 1:
            payloads.append(rng.randbytes(rng.randrange(0, 200)))
        elif kind == 2:
            value = rng.choice(["1", "-", ".", "e", "{", "}", '"', ":", ",", "temperature", " ", "[", "]"])
            payloads.append(b'{"temperature": ' + "".join(value for _ in range(rng.randrange(8))).encode())
        else:
            document = {"temperature": rng.uniform(-100, 150), "battery": rng.random()}
            payloads.append(json.dumps(document).encode())
    return payloads


def test_ten_thousand_malformed_payloads_are_all_counted(
        mosquitto: Mosquitto, write_config: Callable[..., Path], daemon_factory: Callable[..., Daemon],
        mqtt_client: Callable[..., MqttProbe]) -> None:
    config = write_config(mosquitto)
    probe = mqtt_client().subscribe(AVAILABILITY, DIAGNOSTICS)
    daemon = start_online(daemon_factory, config, probe)
    probe.wait_for(DIAGNOSTICS)
    before = probe.last_json(DIAGNOSTICS)
    payloads = random_payloads(10_000)
    for index, payload in enumerate(payloads):
        probe.client.publish(TELEMETRY, payload, qos=1 if index % 500 == 499 else 0).wait_for_publish(5)
    total = len(payloads)

    def all_counted() -> bool:
        d = probe.last_json(DIAGNOSTICS)
        handled = sum(int(d[k]) - int(before[k]) for k in ("bad_payloads", "readings", "telemetry_ignored"))
        return handled >= total

    assert wait_until(all_counted, 10, interval=0.2), (probe.last_json(DIAGNOSTICS),
                                                        daemon.log_text()[-3000:])
    after = probe.last_json(DIAGNOSTICS)
    keys = ("bad_payloads", "readings", "telemetry_ignored", "handler_errors")
    delta = {k: after[k] - before[k] for k in keys}
    assert delta["bad_payloads"] + delta["readings"] + delta["telemetry_ignored"] == total, delta
    assert delta["handler_errors"] == 0
    assert delta["bad_payloads"] > total / 2
    assert delta["readings"] > total / 10  # about half of the valid-JSON quarter is within [min, max]
    assert daemon.alive()
    # Still fully functional.
    probe.subscribe(SENSOR_STATE)
    probe.publish(TELEMETRY, b'{"temperature": 20.5}')
    probe.wait_for(SENSOR_STATE, b"20.5", timeout=2)
    print(f"\n10k payloads: {delta}, RSS {daemon.rss_kb() / 1024:.1f} MiB")


def test_action_command_publishes_exact_bytes(
        mosquitto: Mosquitto, write_config: Callable[..., Path],
        mqtt_client: Callable[..., MqttProbe]) -> None:
    config = write_config(mosquitto, **{"actions.heat_up": {
        "topic": "zigbee2mqtt/trv/set", "payload": '{"current_heating_setpoint": {{ setpoint + 1 }}}',
        "state_topic": "zigbee2mqtt/trv"}})
    probe = mqtt_client().subscribe("test/lamp/set", "zigbee2mqtt/trv/set", AVAILABILITY)
    result = run_cli("action", "lamp_on", "--config", str(config))
    assert result.returncode == 0, result.stderr
    message = probe.wait_for("test/lamp/set", timeout=2)
    assert message.payload == b'{"state": "ON"}'
    assert not message.retained
    assert probe.matching(AVAILABILITY) == []  # the one-shot client never touches availability

    # Relative setpoint: needs the device's current setpoint from its (retained) state topic.
    probe.publish("zigbee2mqtt/trv", b'{"current_heating_setpoint": 20.5}', retain=True)
    result = run_cli("action", "heat_up", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert probe.wait_for("zigbee2mqtt/trv/set", timeout=2).payload == b'{"current_heating_setpoint": 21.5}'

    result = run_cli("action", "no_such_action", "--config", str(config))
    assert result.returncode == 2
    assert "unknown action 'no_such_action'" in result.stderr and "lamp_on" in result.stderr


def test_action_command_without_broker_fails_clearly(write_config: Callable[..., Path],
                                                    mosquitto_factory: Callable[..., Mosquitto]) -> None:
    broker = mosquitto_factory(start=False)
    config = write_config(broker)
    t0 = time.monotonic()
    result = run_cli("action", "lamp_on", "--config", str(config), "--timeout", "1", timeout=30)
    assert result.returncode == 1
    assert "cannot connect to the MQTT broker" in result.stderr
    assert time.monotonic() - t0 < 5


def test_request_action_ttl_mute_and_never_retained(
        mosquitto: Mosquitto, tmp_path: Path, mqtt_client: Callable[..., MqttProbe]) -> None:
    """In-process: ActionDispatcher.request_action renders via the action table, never retains, drops
    expired voice requests and refuses voice while muted (other sources still act)."""
    data = base_config(mosquitto, tmp_path / "state")
    data["actions"]["lamp_on"]["ttl"] = 2.0
    config = parse_config(data, source="test.toml")
    daemon = build(config)
    app, actions = daemon.app, daemon.actions
    probe = mqtt_client().subscribe("test/lamp/set", MUTE_STATE)
    runner = threading.Thread(target=app.run, name="app-under-test")
    runner.start()
    try:
        assert app.link.wait_connected(5)
        now = time.monotonic()
        assert actions.request_action(ActionRequest("lamp_on", "voice", created_mono=now)) == 1
        message = probe.wait_for("test/lamp/set", timeout=2)
        assert message.payload == b'{"state": "ON"}' and not message.retained
        with pytest.raises(ActionError, match="expired"):  # the action's ttl (2 s) applies to voice
            actions.request_action(ActionRequest("lamp_on", "voice", created_mono=now - 3))
        with pytest.raises(ActionError, match="unknown action"):
            actions.request_action(ActionRequest("nope", "anomaly", created_mono=now))
        probe.publish(MUTE_SET, b"ON")
        probe.wait_for(MUTE_STATE, b"ON")
        assert wait_until(daemon.homeassistant.is_muted, 2)
        with pytest.raises(ActionError, match="muted"):
            actions.request_action(ActionRequest("lamp_on", "voice", created_mono=time.monotonic()))
        not_voice = ActionRequest("lamp_on", "anomaly", created_mono=time.monotonic())  # muting is for voice
        assert actions.request_action(not_voice) == 1
        probe.wait_for("test/lamp/set", count=2, timeout=2)
        assert app.counters()["actions_rejected"] == 3
    finally:
        app.request_stop()
        runner.join(10)
    assert not runner.is_alive()
    assert retained_messages(mosquitto, AVAILABILITY)[AVAILABILITY] == b"offline"


def test_sensor_state_is_republished_when_it_changes_at_most_once_a_second(
        mosquitto: Mosquitto, write_config: Callable[..., Path], daemon_factory: Callable[..., Daemon],
        mqtt_client: Callable[..., MqttProbe]) -> None:
    probe = mqtt_client().subscribe(AVAILABILITY, SENSOR_STATE, DIAGNOSTICS)
    daemon = start_online(daemon_factory, write_config(mosquitto), probe)
    for value in (21.5, 21.5, 21.5, 22.0, 22.0, 22.5):
        probe.publish(TELEMETRY, json.dumps({"temperature": value}))
    probe.wait_for(SENSOR_STATE, b"22.5", timeout=5)  # the latest value follows within the interval
    time.sleep(1.3)  # any repeat or held value would have arrived by now
    assert [m.payload for m in probe.matching(SENSOR_STATE)] == [b"21.5", b"22.5"]
    assert daemon.alive()


def test_mqtt_max_payload_bytes_also_applies_to_telemetry(
        mosquitto: Mosquitto, write_config: Callable[..., Path], daemon_factory: Callable[..., Daemon],
        mqtt_client: Callable[..., MqttProbe]) -> None:
    """Raising mqtt.max_payload_bytes lets a larger telemetry document through (the link and the parser
    share the one limit)."""
    probe = mqtt_client().subscribe(AVAILABILITY, SENSOR_STATE)
    config = write_config(mosquitto, **{"mqtt.max_payload_bytes": 200_000})
    daemon = start_online(daemon_factory, config, probe)
    probe.publish(TELEMETRY, json.dumps({"temperature": 23.25, "padding": "x" * 100_000}))
    probe.wait_for(SENSOR_STATE, b"23.25", timeout=5)
    assert daemon.alive()


def test_anomaly_stage_counters_reach_the_diagnostics(
        mosquitto: Mosquitto, write_config: Callable[..., Path], daemon_factory: Callable[..., Daemon],
        mqtt_client: Callable[..., MqttProbe]) -> None:
    config = write_config(mosquitto)
    probe = mqtt_client().subscribe(AVAILABILITY, DIAGNOSTICS)
    start_online(daemon_factory, config, probe)
    for value in (21.0, 21.5, 22.0):
        probe.publish(TELEMETRY, json.dumps({"temperature": value}))
    assert wait_until(lambda: probe.last_json(DIAGNOSTICS).get("anomaly_readings") == 3, 5), \
        probe.last_json(DIAGNOSTICS)
    assert {"anomaly_alerts", "anomaly_events"} <= set(probe.last_json(DIAGNOSTICS))
    sensors = retained_messages(mosquitto, "homeassistant/sensor/testagent/+/config")
    assert "homeassistant/sensor/testagent/anomaly_alerts/config" in sensors


def test_device_group_counters_reach_the_diagnostics(
        mosquitto: Mosquitto, write_config: Callable[..., Path], daemon_factory: Callable[..., Daemon],
        mqtt_client: Callable[..., MqttProbe]) -> None:
    """Two fields of one zigbee2mqtt device form a device group (on by default): each message is one tick,
    a message without one of the fields an incomplete one; both counted in the diagnostics."""
    config = write_config(mosquitto, overrides={"telemetry": [
        {"topic": TELEMETRY, "field": "temperature", "sensor": "living_room_temperature"},
        {"topic": TELEMETRY, "field": "humidity", "sensor": "living_room_humidity"}]})
    probe = mqtt_client().subscribe(AVAILABILITY, DIAGNOSTICS)
    start_online(daemon_factory, config, probe)
    for index, value in enumerate((21.0, 21.5, 22.0)):
        probe.publish(TELEMETRY, json.dumps({"temperature": value, "humidity": 40.0 + index}))
    probe.publish(TELEMETRY, json.dumps({"temperature": 22.5}))  # no humidity: an incomplete tick ...
    probe.publish(TELEMETRY, json.dumps({"temperature": 23.0, "humidity": 44.0}))  # ... closed by the next
    assert wait_until(lambda: probe.last_json(DIAGNOSTICS).get("anomaly_group_ticks") == 5, 5), \
        probe.last_json(DIAGNOSTICS)
    counts = probe.last_json(DIAGNOSTICS)
    assert counts["anomaly_group_incomplete_ticks"] == 1 and counts["anomaly_group_single_ticks"] == 1
    assert counts["anomaly_group_alerts"] == 0


def test_readings_are_queued_for_the_anomaly_stage_from_the_start(
        mosquitto: Mosquitto, tmp_path: Path, mqtt_client: Callable[..., MqttProbe]) -> None:
    """Whether readings are queued is decided when the daemon is built (a stream is scored), not by who
    asked for the queue when; the watchdog watches that queue from the start."""
    daemon = build(parse_config(base_config(mosquitto, tmp_path / "state"), source="test.toml"))
    app = daemon.app
    assert daemon.readings is not None
    probe = mqtt_client()
    runner = threading.Thread(target=app.run, name="app-under-test")
    runner.start()
    try:
        assert app.link.wait_connected(5)
        assert "readings" in app.health.stage_names()  # its queue is watched by the sd_notify watchdog
        time.sleep(0.3)  # the telemetry subscription is in place
        probe.publish(TELEMETRY, json.dumps({"temperature": 21.0}))
        assert wait_until(lambda: app.counters()["readings"] == 1, 5), app.counters()
        assert wait_until(lambda: app.counters()["anomaly_readings"] == 1, 5), app.counters()
    finally:
        app.request_stop()
        runner.join(10)


def test_action_command_waits_for_device_state_only_when_the_action_needs_it(
        mosquitto: Mosquitto, write_config: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    """A payload that merely contains the text "setpoint" needs no current setpoint: the action table
    decides (it once was a substring test here, which waited FIRE_STATE_WAIT for a state that never came)."""
    from agent.fire import FIRE_STATE_WAIT, fire_action

    config = write_config(mosquitto, **{
        "actions.heat_up": {"topic": "zigbee2mqtt/trv/set", "state_topic": "zigbee2mqtt/trv",
                            "payload": '{"current_heating_setpoint": {{ setpoint + 1 }}}'},
        "actions.hold": {"topic": "zigbee2mqtt/trv/set", "payload": '{"preset": "setpoint_hold"}'}})
    t0 = time.monotonic()
    assert fire_action(argparse.Namespace(config=str(config), name="hold", timeout=5.0)) == 0
    assert time.monotonic() - t0 < FIRE_STATE_WAIT
    assert capsys.readouterr().out == 'zigbee2mqtt/trv/set {"preset": "setpoint_hold"}\n'
