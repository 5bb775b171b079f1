"""Home Assistant discovery payloads: golden JSON, the topic grammar, and the rules HA enforces silently.

Regenerate the golden files after an intended change with ``UPDATE_GOLDEN=1 pytest tests/test_discovery.py``
and review the diff.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jinja2
import pytest

from agent.config import Config, load_config, parse_config
from agent.discovery import (
    DIAGNOSTIC_KEYS,
    discovery_messages,
    discovery_topic_filter,
    stale_discovery_topics,
)
from agent.topics import Topics, topic_matches

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
SW = "0.0.0-test"  # fixed, so a version bump does not change the golden files

FULL = {
    "agent": {"id": "kitchen", "name": "Kitchen agent"},
    "mqtt": {},
    "telemetry": [
        {"topic": "zigbee2mqtt/living_room_sensor", "field": "temperature",
         "sensor": "living_room_temperature", "name": "Living room temperature", "unit": "°C",
         "device_class": "temperature"},
        {"topic": "tele/washer_plug/SENSOR", "field": "ENERGY.Total", "sensor": "washer_energy",
         "name": "Kitchen agent washer energy", "unit": "kWh", "device_class": "energy", "anomaly": False},
        {"topic": "homestate/sensor/outdoor/state", "sensor": "outdoor"},
    ],
    "actions": {
        "heating_up": {"topic": "zigbee2mqtt/living_room_trv/set",
                       "payload": '{"current_heating_setpoint": {{ setpoint + 1 }}}',
                       "state_topic": "zigbee2mqtt/living_room_trv"},
        "light_on": {"profile": "tasmota", "device": "lamp", "command": "on"},
    },
    "voice": {"commands": [{"say": "heat up", "action": "heating_up"},
                           {"say": "light on", "action": "light_on"},
                           {"say": "lights on", "action": "light_on"}]},
}
MINIMAL = {"agent": {"id": "garage"}, "mqtt": {}}


def config_of(data: dict[str, Any]) -> Config:
    return parse_config(data, "test.toml")


def voice_event_types(config: Config) -> list[str]:
    return [command.action for command in config.voice.commands]


def messages_of(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    config = config_of(data)
    return discovery_messages(config, event_types=voice_event_types(config), sw_version=SW)


@pytest.mark.parametrize(("name", "data"), [("full", FULL), ("minimal", MINIMAL)])
def test_golden(name: str, data: dict[str, Any]) -> None:
    path = GOLDEN / f"discovery_{name}.json"
    produced = json.loads(json.dumps(messages_of(data)))  # also proves it serializes
    if os.environ.get("UPDATE_GOLDEN"):
        text = json.dumps(produced, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
        path.write_text(text, encoding="utf-8")
    assert produced == json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("data", [FULL, MINIMAL])
def test_topic_grammar_and_required_keys(data: dict[str, Any]) -> None:
    config = config_of(data)
    prefix = config.homeassistant.discovery_prefix
    grammar = re.compile(
        rf"^{prefix}/(sensor|binary_sensor|switch|event)/[a-zA-Z0-9_-]+/[a-zA-Z0-9_-]+/config$")
    messages = messages_of(data)
    topics = Topics.from_config(config)
    for topic, payload in messages.items():
        assert grammar.match(topic), topic
        assert topic.split("/")[2] == config.agent.id
        assert topic_matches(discovery_topic_filter(config), topic)
        assert payload["unique_id"] == f"home_agent_{config.agent.id}_{topic.split('/')[3]}"
        assert payload["dev"] == {"ids": [f"home_agent_{config.agent.id}"], "name": config.agent.display_name,
                                  "mdl": "home-agent voice and sensor agent", "sw": SW, "mf": "home-agent"}
        assert payload["o"]["name"] == "home-agent" and payload["o"]["sw"] == SW and payload["o"]["url"]
        assert payload["availability_topic"] == topics.availability
        assert (payload["payload_available"], payload["payload_not_available"]) == ("online", "offline")
        assert payload["name"]
        assert not payload["name"].casefold().startswith(config.agent.display_name.casefold())
        assert "retain" not in payload
    unique_ids = [payload["unique_id"] for payload in messages.values()]
    assert len(unique_ids) == len(set(unique_ids))


def test_entities_of_the_full_config() -> None:
    config = config_of(FULL)
    topics = Topics.from_config(config)
    messages = messages_of(FULL)

    def entity(component: str, object_id: str) -> dict[str, Any]:
        return messages[f"homeassistant/{component}/kitchen/{object_id}/config"]

    for key in DIAGNOSTIC_KEYS:
        diagnostic = entity("sensor", key)
        assert diagnostic["entity_category"] == "diagnostic"
        assert diagnostic["state_topic"] == topics.diagnostics
        assert diagnostic["value_template"] == f"{{{{ value_json.{key} }}}}"
    assert entity("sensor", "uptime")["device_class"] == "duration"
    assert entity("sensor", "uptime")["unit_of_measurement"] == "s"

    mute = entity("switch", "mute")
    assert (mute["command_topic"], mute["state_topic"]) == (topics.mute_set, topics.mute_state)
    assert (mute["payload_on"], mute["payload_off"]) == ("ON", "OFF")
    assert mute["name"] == "Mute listening"

    event = entity("event", "voice_intent")
    assert event["state_topic"] == topics.event
    assert event["event_types"] == ["heating_up", "light_on"]  # each once, in config order

    temperature = entity("sensor", "sensor_living_room_temperature")
    assert temperature["state_topic"] == topics.sensor_state("living_room_temperature")
    assert (temperature["unit_of_measurement"], temperature["device_class"], temperature["state_class"]) == (
        "°C", "temperature", "measurement")
    assert entity("sensor", "sensor_outdoor")["name"] == "outdoor"  # name defaults to the sensor id
    assert "unit_of_measurement" not in entity("sensor", "sensor_outdoor")
    energy = entity("sensor", "sensor_washer_energy")
    assert energy["name"] == "washer energy"  # the device name is not repeated
    assert energy["state_class"] == "total_increasing"  # a meter reading

    anomaly = entity("binary_sensor", "anomaly_living_room_temperature")
    assert anomaly["device_class"] == "problem"
    assert anomaly["state_topic"] == topics.anomaly("living_room_temperature")
    assert (anomaly["payload_on"], anomaly["payload_off"]) == ("ON", "OFF")
    score = entity("sensor", "score_living_room_temperature")
    assert score["state_class"] == "measurement"
    assert score["state_topic"] == topics.anomaly("living_room_temperature")
    # anomaly = false on the stream: no anomaly entities for it.
    assert not any("washer_energy" in t for t in messages if "/binary_sensor/" in t or "/score_" in t)


def test_value_templates_render_what_home_assistant_accepts() -> None:
    # HA renders value_template with Jinja and a value_json variable; payloads are case-sensitive and a
    # sensor with a state_class must get a number.
    environment = jinja2.Environment(autoescape=False)
    messages = messages_of(FULL)

    def render(template: str, value_json: dict[str, Any]) -> str:
        return environment.from_string(template).render(value_json=value_json).strip()

    anomaly = messages["homeassistant/binary_sensor/kitchen/anomaly_living_room_temperature/config"]
    template = anomaly["value_template"]
    assert render(template, {"active": True, "score": 0.99, "kind": "spike"}) == anomaly["payload_on"] == "ON"
    assert render(template, {"active": False, "score": 0.2}) == anomaly["payload_off"] == "OFF"
    score = messages["homeassistant/sensor/kitchen/score_living_room_temperature/config"]
    assert float(render(score["value_template"], {"active": False, "score": 0.25})) == 0.25
    diagnostics = dict.fromkeys(DIAGNOSTIC_KEYS, 7)
    for key in DIAGNOSTIC_KEYS:
        payload = messages[f"homeassistant/sensor/kitchen/{key}/config"]
        assert float(render(payload["value_template"], diagnostics)) == 7


def test_event_entity_only_with_event_types() -> None:
    config = config_of(MINIMAL)
    assert not any("/event/" in t for t in discovery_messages(config, event_types=[], sw_version=SW))
    with_types = discovery_messages(config, event_types=["a", "b", "a"], sw_version=SW)
    assert with_types["homeassistant/event/garage/voice_intent/config"]["event_types"] == ["a", "b"]


def test_anomaly_entities_follow_the_anomaly_switch() -> None:
    data = {**FULL, "anomaly": {"enabled": False}}
    assert not any("/binary_sensor/" in topic or "/score_" in topic for topic in messages_of(data))


DEVICE_GROUPS: dict[str, Any] = {"groups": [{"name": "pump", "sensors": ["pump_power", "pump_current"]}]}
DEVICES: dict[str, Any] = {
    "agent": {"id": "kitchen"},
    "mqtt": {},
    "telemetry": [
        {"topic": "zigbee2mqtt/hall_sensor", "field": "temperature", "sensor": "hall_temperature"},
        {"topic": "zigbee2mqtt/hall_sensor", "field": "humidity", "sensor": "hall_humidity"},
        {"topic": "tele/pump/SENSOR", "field": "ENERGY.Power", "sensor": "pump_power"},
        {"topic": "tele/pump/SENSOR", "field": "ENERGY.Current", "sensor": "pump_current"},
        {"topic": "tele/pump/SENSOR", "field": "ENERGY.Voltage", "sensor": "pump_voltage", "anomaly": False},
    ],
    "anomaly": DEVICE_GROUPS,
}


def test_a_device_group_has_a_problem_sensor_on_its_own_topic() -> None:
    """A device group's alert (agent/anomaly/group.py) is published on ``Topics.anomaly(group)``: one binary
    sensor per group, explicit ([[anomaly.groups]]) or found from a topic's fields; no score entity."""
    config = config_of(DEVICES)
    topics = Topics.from_config(config)
    messages = messages_of(DEVICES)
    groups = {t.split("/")[3]: m for t, m in messages.items() if "/binary_sensor/" in t and
              t.split("/")[3] in ("anomaly_pump", "anomaly_zigbee2mqtt_hall_sensor")}
    assert set(groups) == {"anomaly_pump", "anomaly_zigbee2mqtt_hall_sensor"}
    pump = groups["anomaly_pump"]
    assert pump["name"] == "pump device anomaly" and pump["device_class"] == "problem"
    assert pump["state_topic"] == pump["json_attributes_topic"] == topics.anomaly("pump")
    assert pump["unique_id"] == "home_agent_kitchen_anomaly_pump"
    hall = groups["anomaly_zigbee2mqtt_hall_sensor"]
    assert hall["state_topic"] == topics.anomaly("zigbee2mqtt_hall_sensor")
    assert not any("/score_pump/" in t or "/score_zigbee2mqtt" in t for t in messages)
    # the streams keep their own entities
    assert "homeassistant/binary_sensor/kitchen/anomaly_hall_humidity/config" in messages
    without_found = messages_of({**DEVICES, "anomaly": {**DEVICE_GROUPS, "device_groups": False}})
    assert "homeassistant/binary_sensor/kitchen/anomaly_pump/config" in without_found
    assert "homeassistant/binary_sensor/kitchen/anomaly_zigbee2mqtt_hall_sensor/config" not in without_found
    off = messages_of({**DEVICES, "anomaly": {**DEVICE_GROUPS, "enabled": False}})
    assert not any("/binary_sensor/" in t for t in off)


def test_custom_prefixes() -> None:
    data = {"agent": {"id": "hall-2"}, "mqtt": {"topic_prefix": "ha-agents"},
            "homeassistant": {"discovery_prefix": "ha_disc"},
            "telemetry": [{"topic": "t", "sensor": "uptime"}]}  # a sensor id equal to a diagnostic's
    config = config_of(data)
    messages = messages_of(data)
    assert discovery_topic_filter(config) == "ha_disc/+/hall-2/+/config"
    assert all(t.startswith("ha_disc/") for t in messages)
    telemetry = messages["ha_disc/sensor/hall-2/sensor_uptime/config"]
    assert telemetry["state_topic"] == "ha-agents/hall-2/sensor/uptime/state"
    uptime = messages["ha_disc/sensor/hall-2/uptime/config"]
    assert uptime["state_topic"] == "ha-agents/hall-2/diagnostics"
    assert uptime["availability_topic"] == "ha-agents/hall-2/availability"


def test_stale_topics() -> None:
    config = config_of(FULL)
    current = messages_of(FULL)
    retained = [*current, "homeassistant/sensor/kitchen/sensor_removed/config",
                "homeassistant/sensor/other_agent/uptime/config", "homeassistant/sensor/kitchen/uptime/state",
                "homeassistant/binary_sensor/kitchen/anomaly_old/config"]
    assert stale_discovery_topics(config, retained, current) == [
        "homeassistant/binary_sensor/kitchen/anomaly_old/config",
        "homeassistant/sensor/kitchen/sensor_removed/config",
    ]


def test_example_config_announces() -> None:
    config = load_config(REPO / "config.toml")
    messages = discovery_messages(config, event_types=voice_event_types(config), sw_version=SW)
    assert "homeassistant/sensor/kitchen/sensor_living_room_temperature/config" in messages
    assert "homeassistant/event/kitchen/voice_intent/config" in messages
    assert "homeassistant/binary_sensor/kitchen/anomaly_washer_power/config" in messages
    assert not any("outdoor_temperature" in t and "/binary_sensor/" in t for t in messages)
