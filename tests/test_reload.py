"""Reloads that cannot kill: the real daemon, a real mosquitto and SIGHUP. A config the validation rejects
leaves the agent online with its old config (journal, STATUS=, the diagnostics say why); a valid one that
changes what stages were built with rebuilds every stage; known thermostat setpoints survive a reload."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, Daemon, Mosquitto, MqttProbe, base_config, toml_dumps, wait_until
from test_service_signals import NotifyListener

from agent.app import RunOptions
from agent.config import parse_config
from agent.messages import ActionRequest
from agent.wiring import build, needs_new_app, next_daemon

BASE = "home-agent/testagent"
AVAILABILITY = f"{BASE}/availability"
DIAGNOSTICS = f"{BASE}/diagnostics"
EXAMPLE_WAV = REPO_ROOT / "examples" / "computer_light_on.wav"
SENSOR_TOPIC = "zigbee2mqtt/living_room_sensor"


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    notify = NotifyListener(tmp_path / "notify.sock")
    yield notify
    notify.close()


def voice_config(broker: Mosquitto, state_dir: Path) -> dict[str, Any]:
    """The base config with voice on (a file source: no microphone needed) and an anomaly-scored stream."""
    data = base_config(broker, state_dir)
    data["voice"]["enabled"] = True
    data["voice"]["commands"].append({"say": "fan off", "action": "lamp_on"})
    data["audio"] = {"source": f"file:{EXAMPLE_WAV}", "realtime": False}
    return data


def write(path: Path, data: dict[str, Any]) -> None:
    path.write_text(toml_dumps(data), encoding="utf-8")


def test_rejected_reloads_leave_the_agent_online_with_its_old_config(
        mosquitto: Mosquitto, daemon_factory: Callable[..., Daemon], mqtt_client: Callable[..., MqttProbe],
        listener: NotifyListener, tmp_path: Path) -> None:
    """Item 1 of issue 18: `say = "fan blast"` passed check-config, and SIGHUP then stopped the daemon
    (exit 2: systemd left it dead). Now the reload is rejected and nothing else changes."""
    config = tmp_path / "config.toml"
    good = voice_config(mosquitto, tmp_path / "state")
    write(config, good)
    probe = mqtt_client().subscribe(AVAILABILITY, DIAGNOSTICS)
    daemon = daemon_factory(config, env=listener.env())
    probe.wait_for(AVAILABILITY, b"online", timeout=15)
    listener.wait_for("READY", "1", daemon=daemon)

    bad_configs: dict[str, dict[str, Any]] = {
        "voice.commands.1.say": {"voice.commands": [{"say": "light on", "action": "lamp_on"},
                                                    {"say": "fan blast", "action": "lamp_on"}]},
        "mqtt.password_file": {"mqtt.username": "user", "mqtt.password_file": str(tmp_path / "missing")},
        "voice.commands.0.say": {"voice.commands": [{"say": "computer off", "action": "lamp_on"}]},
    }
    for failures, (key, change) in enumerate(bad_configs.items(), start=1):
        data = json.loads(json.dumps(good))
        for dotted, value in change.items():
            section, name = dotted.split(".")
            data[section][name] = value
        write(config, data)
        since = time.monotonic()
        daemon.signal(signal.SIGHUP)
        listener.wait_for("RELOADING", "1", since=since, daemon=daemon)
        ready = listener.wait_for("READY", "1", since=since, daemon=daemon)
        assert "new config rejected, old one running" in ready.fields["STATUS"]
        assert wait_until(lambda key=key: key in daemon.log_text(), 5), daemon.log_text()[-3000:]
        assert wait_until(
            lambda failures=failures: probe.last_json(DIAGNOSTICS).get("reload_failures") == failures, 5)
        assert probe.last_json(DIAGNOSTICS)["config_status"].startswith(f"reload rejected: {key}")
        assert daemon.alive(), daemon.log_text()[-3000:]
    # Never offline: the old config kept running throughout.
    assert [m.payload for m in probe.matching(AVAILABILITY)] == [b"online"]
    assert "restarting the agent" not in daemon.log_text()

    # The good config again: accepted, the status line and the diagnostics clear.
    write(config, good)
    since = time.monotonic()
    daemon.signal(signal.SIGHUP)
    ready = listener.wait_for("READY", "1", since=since, daemon=daemon)
    assert "rejected" not in ready.fields["STATUS"]
    assert wait_until(lambda: probe.last_json(DIAGNOSTICS).get("config_status") == "ok", 5)
    assert daemon.terminate(10) == 0


def test_a_stream_added_by_reload_is_scored(
        mosquitto: Mosquitto, daemon_factory: Callable[..., Daemon], mqtt_client: Callable[..., MqttProbe],
        tmp_path: Path) -> None:
    """Item 5: a stream added by SIGHUP used to be announced but never scored (the anomaly stage kept the
    streams it started with). Now a reload that changes what the anomaly stage scores rebuilds it."""
    config = tmp_path / "config.toml"
    data = base_config(mosquitto, tmp_path / "state")
    write(config, data)
    probe = mqtt_client().subscribe(AVAILABILITY, f"{BASE}/anomaly/+", f"{BASE}/sensor/+/state")
    daemon = daemon_factory(config)
    probe.wait_for(AVAILABILITY, b"online", timeout=15)
    probe.publish(SENSOR_TOPIC, json.dumps({"temperature": 21.0}))
    probe.wait_for(f"{BASE}/anomaly/living_room_temperature", timeout=5)

    data["telemetry"].append({"topic": "tele/plug/SENSOR", "field": "ENERGY.Power", "sensor": "plug_power",
                              "unit": "W"})
    write(config, data)
    daemon.signal(signal.SIGHUP)
    assert wait_until(lambda: "starting stage anomaly" in daemon.log_text().split("SIGHUP", 1)[-1], 10), \
        daemon.log_text()[-3000:]
    probe.wait_for(AVAILABILITY, b"online", count=2, timeout=10)
    probe.subscribe("homeassistant/sensor/testagent/+/config")  # announced once subscribed
    probe.wait_for("homeassistant/sensor/testagent/sensor_plug_power/config", timeout=10)
    probe.publish("tele/plug/SENSOR", json.dumps({"ENERGY": {"Power": 42}}))
    assert probe.wait_for(f"{BASE}/sensor/plug_power/state", timeout=5).payload == b"42.0"
    scored = probe.wait_for(f"{BASE}/anomaly/plug_power", timeout=5)
    assert json.loads(scored.payload)["value"] == 42
    assert daemon.terminate(10) == 0


def test_refused_readings_are_counted_per_reason_and_logged(
        mosquitto: Mosquitto, daemon_factory: Callable[..., Daemon], mqtt_client: Callable[..., MqttProbe],
        tmp_path: Path) -> None:
    """Item 7: the out-of-range temperature of {"temperature": 150, "humidity": 41} was dropped silently;
    a battery-only message counted as a bad payload."""
    config = tmp_path / "config.toml"
    data = base_config(mosquitto, tmp_path / "state")
    data["telemetry"].append({"topic": SENSOR_TOPIC, "field": "humidity", "sensor": "living_room_humidity"})
    write(config, data)
    probe = mqtt_client().subscribe(AVAILABILITY, DIAGNOSTICS, f"{BASE}/sensor/+/state")
    daemon = daemon_factory(config)
    probe.wait_for(AVAILABILITY, b"online", timeout=15)
    before = probe.last_json(DIAGNOSTICS) if probe.last(DIAGNOSTICS) else {}
    probe.publish(SENSOR_TOPIC, json.dumps({"temperature": 150, "humidity": 41}))
    probe.publish(SENSOR_TOPIC, json.dumps({"battery": 90}))
    probe.publish(SENSOR_TOPIC, json.dumps({"temperature": "hot", "humidity": 40}))
    assert probe.wait_for(f"{BASE}/sensor/living_room_humidity/state", count=2, timeout=5)

    def counted() -> bool:
        d = probe.last_json(DIAGNOSTICS)
        return bool(d["rejected_out_of_range"] == 1 and d["rejected_not_a_number"] == 1)

    assert wait_until(counted, 5), probe.last_json(DIAGNOSTICS)
    after = probe.last_json(DIAGNOSTICS)
    assert after["readings_rejected"] == 2
    assert after["bad_payloads"] == before.get("bad_payloads", 0)  # battery-only: ignored, not bad
    assert after["telemetry_ignored"] == before.get("telemetry_ignored", 0) + 1
    log = daemon.log_text()
    assert "rejected a reading (out_of_range)" in log and "above max 80" in log
    assert "rejected a reading (not_a_number)" in log
    assert daemon.terminate(10) == 0


THERMOSTAT_STATE = "zigbee2mqtt/living_room_trv"
HEAT_UP = {"topic": "zigbee2mqtt/living_room_trv/set",
           "payload": '{"current_heating_setpoint": {{ setpoint + 1 }}}', "state_topic": THERMOSTAT_STATE}


def test_known_setpoints_survive_both_kinds_of_reload(
        mosquitto: Mosquitto, mqtt_client: Callable[..., MqttProbe], tmp_path: Path) -> None:
    """Item 5: a reload forgot the thermostat's current setpoint (a device reports it when it changes, and
    a retained state is not delivered again), so "heat up" failed until the next report."""
    data = base_config(mosquitto, tmp_path / "state")
    data["actions"]["heat_up"] = HEAT_UP
    config_path = tmp_path / "config.toml"
    write(config_path, data)
    daemon = build(parse_config(data, "config.toml", config_path))
    app = daemon.app
    probe = mqtt_client()
    runner = threading.Thread(target=app.run, name="app-under-test")
    runner.start()
    try:
        assert app.link.wait_connected(5)
        time.sleep(0.3)  # the state subscription is in place
        probe.publish(THERMOSTAT_STATE, json.dumps({"current_heating_setpoint": 20}))
        request = ActionRequest("heat_up", "anomaly", created_mono=time.monotonic())
        assert wait_until(lambda: daemon.actions._actions.current_setpoint("heat_up") == 20, 3)

        # In place (telemetry changed): the new action table keeps the setpoint.
        data["telemetry"][0]["unit"] = "K"
        write(config_path, data)
        app.request_reload()
        assert wait_until(lambda: app.config.telemetry[0].unit == "K", 5)
        assert daemon.actions.request_action(request) == 1
    finally:
        app.request_stop()
        runner.join(10)
    assert not runner.is_alive()

    # Restart-type ([mqtt] changed): the next daemon takes over what this one knew.
    data["mqtt"]["keepalive"] = 7
    new = parse_config(data, "config.toml", config_path)
    successor = next_daemon(daemon, new, RunOptions())
    try:
        assert successor.app.config.mqtt.keepalive == 7
        assert successor.actions._actions.current_setpoint("heat_up") == 21  # 20, then "heat up" once
        request = ActionRequest("heat_up", "anomaly", created_mono=time.monotonic())
        assert successor.actions.request_action(request) == 1
    finally:
        successor.app.stop()


def test_a_new_config_that_cannot_be_built_falls_back_to_the_old_one(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    """Validated, but building it still fails (here: its audio file vanished in between): the previous
    config is built again, and the rejection is reported."""
    data = base_config(mosquitto, tmp_path / "state")
    config_path = tmp_path / "config.toml"
    daemon = build(parse_config(data, "config.toml", config_path))
    vanished = tmp_path / "gone.wav"
    data["voice"]["enabled"] = True
    data["audio"] = {"source": f"file:{vanished}"}
    successor = next_daemon(daemon, parse_config(data, "config.toml", config_path), RunOptions())
    try:
        assert successor.app.config is daemon.app.config
        assert successor.app.counters()["reload_failures"] == 1
        assert str(vanished) in successor.app.counters()["config_status"]
    finally:
        successor.app.stop()
        daemon.app.stop()


def test_what_the_anomaly_stage_was_built_with_rebuilds_it() -> None:
    """Streams scored and their on_anomaly actions are wired into the anomaly stage at start: changing
    them is a restart-type reload; a unit or a name applies in place."""
    data = base_config(None, Path("/tmp/state"))
    data["actions"]["siren"] = {"topic": "test/siren/set", "payload": "ON"}
    old = parse_config(data, "config.toml")

    def changed(**fields: Any) -> bool:
        copy = json.loads(json.dumps(data))
        copy["telemetry"][0].update(fields)
        return needs_new_app(old, parse_config(copy, "config.toml"))

    assert changed(on_anomaly="siren")
    assert changed(anomaly=False)
    assert not changed(unit="K", name="Kitchen")
    added = json.loads(json.dumps(data))
    added["telemetry"].append({"topic": "t/x", "sensor": "x"})
    assert needs_new_app(old, parse_config(added, "config.toml"))
