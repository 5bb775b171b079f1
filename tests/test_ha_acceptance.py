"""Acceptance against a real, headless Home Assistant (../shared/tools/ha harness): HA 2024.3.3 (the newest on
Python 3.11) and HA 2025.4.4 (the newest the harness runs, on Python 3.13), every test on both.

Proves what HA does with our discovery, not what we think it should do: HA creates the agent's device and
entities with the right states; availability offline makes them unavailable and online brings them back;
an HA service call on the mute switch reaches the agent, and so does a press of the "Last wake was false"
button (``[voice] capture`` is on); a device group's problem sensor shows its state.

Each HA venv is installed once into .cache/ (2024: .cache/ha-venv, about 100 s; 2025: .cache/ha2025-venv,
about 120-170 s; both need PyPI) and reused; tests/ha_install.py starts the installs in the background at the
start of the session. Skipped when the harness is absent (a clone without ../shared);
SHARED_DIR overrides where ../shared is. HA 2025 needs a Python 3.13 (pyenv or PATH): skipped without one,
except in CI.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    REPO_ROOT,
    Daemon,
    Mosquitto,
    MqttProbe,
    base_config,
    require_python,
    toml_dumps,
    wait_until,
)
from ha_install import HA_RELEASES, HARNESS, HaRelease, wait_installed

from agent import __version__
from agent.config import load_config
from agent.discovery import MODEL, discovery_messages

HA_RUN_ROOT = REPO_ROOT / ".cache" / "ha-run"
AGENT_ID = "hatest"
BASE = f"home-agent/{AGENT_ID}"

pytestmark = [
    pytest.mark.ha,
    pytest.mark.skipif(not HARNESS.exists(),
                       reason=f"Home Assistant harness not found at {HARNESS} (set SHARED_DIR to ../shared)"),
]


@dataclass
class HomeAssistant:
    release: HaRelease
    broker: Mosquitto
    env: dict[str, str]
    workdir: Path
    log_path: Path | None = None

    def harness(self, *args: str, timeout: float = 60.0) -> str:
        result = subprocess.run([str(HARNESS), *args], env=self.env, capture_output=True, text=True,
                                timeout=timeout, check=False)
        if result.returncode != 0:
            raise AssertionError(f"ha_harness.sh {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        return result.stdout

    def entities(self) -> list[dict[str, Any]]:
        return list(json.loads(self.harness("entities", "--compact")))

    def ours(self) -> dict[str, dict[str, Any]]:
        """Our entities by unique_id."""
        prefix = f"home_agent_{AGENT_ID}_"
        return {e["unique_id"]: e for e in self.entities() if (e.get("unique_id") or "").startswith(prefix)}

    def call(self, domain: str, service: str, data: dict[str, Any]) -> None:
        self.harness("call", domain, service, json.dumps(data))


@pytest.fixture(scope="module", params=HA_RELEASES, ids=[f"ha{r.version}" for r in HA_RELEASES])
def home_assistant(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[HomeAssistant]:
    release: HaRelease = request.param
    python = require_python(release.python)
    error = wait_installed(release, python)
    if error is not None:
        pytest.fail(f"installing Home Assistant {release.version} into {release.venv} failed: {error}")
    run_dir = HA_RUN_ROOT / f"pytest-{os.getpid()}-{release.version}"  # parallel runs do not collide
    env = release.env(python, run_dir)
    workdir = tmp_path_factory.mktemp("ha")
    broker = Mosquitto(workdir / "broker")
    broker.start()
    ha = HomeAssistant(release, broker, env, workdir)
    try:
        started = ha.harness("start", broker.host, str(broker.port), timeout=300)
        ha.log_path = next((Path(line.split("=", 1)[1]) for line in started.splitlines()
                            if line.startswith("HA_LOG=")), None)
        yield ha
    finally:
        subprocess.run([str(HARNESS), "stop", "ha"], env=env, capture_output=True, timeout=60, check=False)
        broker.kill()
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def agent(home_assistant: HomeAssistant) -> Iterator[Callable[[], Daemon]]:
    """Starts the daemon (voice on, so the intent event entity exists; capture on, so the false-wake button
    does) and waits for ``online``."""
    data = base_config(home_assistant.broker, home_assistant.workdir / "state", agent_id=AGENT_ID)
    data["agent"]["name"] = "HA Test agent"
    data["voice"]["enabled"] = True
    data["voice"]["capture"] = True
    # a second field of the sensor's topic: the two streams are a device group with an entity of its own
    data["telemetry"].append({"topic": "zigbee2mqtt/living_room_sensor", "field": "humidity",
                              "sensor": "living_room_humidity", "unit": "%", "device_class": "humidity"})
    config_path = home_assistant.workdir / "config.toml"
    config_path.write_text(toml_dumps(data), encoding="utf-8")
    daemons: list[Daemon] = []
    probe = MqttProbe(home_assistant.broker).subscribe(f"{BASE}/availability")

    def start() -> Daemon:
        before = len(probe.matching(f"{BASE}/availability", b"online"))
        daemon = Daemon(config_path, log_level="INFO")
        daemons.append(daemon)
        probe.wait_for(f"{BASE}/availability", b"online", timeout=10, count=before + 1)
        return daemon

    yield start
    probe.close()
    for daemon in daemons:
        if daemon.alive():
            daemon.terminate(5)
        daemon.close()


def expected_unique_ids(home_assistant: HomeAssistant) -> dict[str, dict[str, Any]]:
    config = load_config(home_assistant.workdir / "config.toml")
    messages = discovery_messages(config, event_types=sorted({c.action for c in config.voice.commands}),
                                  sw_version=__version__)
    return {payload["unique_id"]: payload for payload in messages.values()}


def wait_for_entities(ha: HomeAssistant, expected: set[str], available: bool,
                      timeout: float = 30.0) -> dict[str, dict[str, Any]]:
    def check() -> dict[str, dict[str, Any]] | None:
        ours = ha.ours()
        if set(ours) != expected:
            return None
        states = [e["state"] for e in ours.values()]
        if available and all(s not in (None, "unavailable") for s in states):
            return ours
        if not available and all(s == "unavailable" for s in states):
            return ours
        return None

    found = wait_until(check, timeout, interval=0.5)
    assert found, f"HA entities not {'available' if available else 'unavailable'}: " + json.dumps(
        {uid: e["state"] for uid, e in ha.ours().items()})
    return dict(found)


def test_home_assistant_creates_device_and_entities_with_states(
        home_assistant: HomeAssistant, agent: Callable[[], Daemon]) -> None:
    probe = MqttProbe(home_assistant.broker)
    reading = b'{"temperature": 21.5, "humidity": 48, "linkquality": 90}'
    probe.publish("zigbee2mqtt/living_room_sensor", reading, retain=True)
    probe.close()
    agent()
    expected = expected_unique_ids(home_assistant)
    assert f"home_agent_{AGENT_ID}_voice_intent" in expected
    ours = wait_for_entities(home_assistant, set(expected), available=True)

    devices = {json.dumps(e["device"], sort_keys=True) for e in ours.values()}
    assert len(devices) == 1, devices  # every entity joined the one device
    device = next(iter(ours.values()))["device"]
    assert device["name"] == "HA Test agent"
    assert device["identifiers"] == [["mqtt", f"home_agent_{AGENT_ID}"]]
    assert device["model"] == MODEL and device["sw_version"] == __version__
    assert all(e["in_registry"] for e in ours.values())

    def state(object_id: str) -> str:
        return str(ours[f"home_agent_{AGENT_ID}_{object_id}"]["state"])

    # The mirrored reading is its own MQTT message after the entity's config: HA may show the entity
    # ("unknown") a moment before its state.
    temperature = f"home_agent_{AGENT_ID}_sensor_living_room_temperature"
    assert wait_until(lambda: home_assistant.ours()[temperature]["state"] == "21.5", 10), \
        home_assistant.ours()[temperature]["state"]
    attributes = ours[f"home_agent_{AGENT_ID}_sensor_living_room_temperature"]["attributes"]
    assert attributes["unit_of_measurement"] == "°C" and attributes["device_class"] == "temperature"
    # The device group's problem sensor: off once the device's first reading (both fields) was scored.
    device_anomaly = f"home_agent_{AGENT_ID}_anomaly_zigbee2mqtt_living_room_sensor"
    assert ours[device_anomaly]["attributes"]["device_class"] == "problem"
    assert wait_until(lambda: home_assistant.ours()[device_anomaly]["state"] == "off", 10), \
        home_assistant.ours()[device_anomaly]
    assert state("mute") == "off"
    assert float(state("uptime")) >= 0
    # The diagnostics update every second (diagnostics_interval = 1 in the test config).
    messages_in = f"home_agent_{AGENT_ID}_messages_in"
    assert wait_until(lambda: float(home_assistant.ours()[messages_in]["state"]) >= 1, 10)
    for key in ("messages_out", "dropped", "bad_payloads"):
        float(state(key))
    assert state("voice_intent") == "unknown"  # an event entity before its first event
    assert ours[f"home_agent_{AGENT_ID}_voice_intent"]["attributes"]["event_types"] == ["lamp_on"]


def test_availability_makes_entities_unavailable_and_back(
        home_assistant: HomeAssistant, agent: Callable[[], Daemon]) -> None:
    expected = set(expected_unique_ids(home_assistant))
    daemon = agent()
    wait_for_entities(home_assistant, expected, available=True)
    assert daemon.terminate(5) == 0
    wait_for_entities(home_assistant, expected, available=False, timeout=15)
    daemon = agent()
    wait_for_entities(home_assistant, expected, available=True, timeout=15)
    daemon.signal(signal.SIGKILL)  # now the broker's last will says offline
    wait_for_entities(home_assistant, expected, available=False, timeout=15)


def test_service_call_on_mute_switch_reaches_the_agent(
        home_assistant: HomeAssistant, agent: Callable[[], Daemon]) -> None:
    expected = set(expected_unique_ids(home_assistant))
    agent()
    ours = wait_for_entities(home_assistant, expected, available=True)
    switch = ours[f"home_agent_{AGENT_ID}_mute"]["entity_id"]
    probe = MqttProbe(home_assistant.broker).subscribe(f"{BASE}/mute/state", f"{BASE}/mute/set")
    try:
        probe.clear()
        home_assistant.call("switch", "turn_on", {"entity_id": switch})
        assert probe.wait_for(f"{BASE}/mute/set", timeout=5).payload == b"ON"  # HA's command
        probe.wait_for(f"{BASE}/mute/state", b"ON", timeout=5)  # the agent's answer
        assert wait_until(lambda: home_assistant.ours()[f"home_agent_{AGENT_ID}_mute"]["state"] == "on", 10)
        home_assistant.call("switch", "turn_off", {"entity_id": switch})
        probe.wait_for(f"{BASE}/mute/state", b"OFF", timeout=5)
        assert wait_until(lambda: home_assistant.ours()[f"home_agent_{AGENT_ID}_mute"]["state"] == "off", 10)
    finally:
        probe.close()


def test_the_false_wake_button_press_reaches_the_agent(
        home_assistant: HomeAssistant, agent: Callable[[], Daemon]) -> None:
    """HA's button.press sends PRESS on the command topic; the agent takes it (with no capture yet it refuses,
    says why and counts it: the diagnostics show the refusal)."""
    expected = set(expected_unique_ids(home_assistant))
    daemon = agent()
    ours = wait_for_entities(home_assistant, expected, available=True)
    button = ours[f"home_agent_{AGENT_ID}_last_wake_false"]
    assert button["entity_id"].startswith("button.") and button["name"] == "Last wake was false"
    probe = MqttProbe(home_assistant.broker).subscribe(f"{BASE}/voice/last_wake_false", f"{BASE}/diagnostics")
    try:
        home_assistant.call("button", "press", {"entity_id": button["entity_id"]})
        assert probe.wait_for(f"{BASE}/voice/last_wake_false", timeout=5).payload == b"PRESS"
        assert wait_until(lambda: any(json.loads(m.payload).get("false_wakes_refused") == 1
                                      for m in probe.matching(f"{BASE}/diagnostics")), 10)
        assert "false wake not marked: no capture to mark" in daemon.log_text()
    finally:
        probe.close()


def test_home_assistant_logs_no_warning_about_our_entities(
        home_assistant: HomeAssistant, agent: Callable[[], Daemon]) -> None:
    """Runs after the others on the same HA: nothing we announced or published made HA warn (a deprecation
    here is what breaks in the next release)."""
    agent()
    wait_for_entities(home_assistant, set(expected_unique_ids(home_assistant)), available=True)
    assert home_assistant.log_path is not None and home_assistant.log_path.is_file()
    ours = (AGENT_ID, BASE, "home_agent_", "ha_test_agent")
    complaints = [line for line in home_assistant.log_path.read_text(errors="replace").splitlines()
                  if (" WARNING " in line or " ERROR " in line) and any(key in line for key in ours)]
    assert complaints == [], f"Home Assistant {home_assistant.release.version}:\n" + "\n".join(complaints)
