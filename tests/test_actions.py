"""Actions: every profile's exact bytes, the safe template language, setpoints, allow-list, rate limits,
validation of the config, and the documented example config.toml."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from agent.actions import ActionTable, OutgoingCommand, parse_switch_command
from agent.config import Config, TemplateAction, load_config, parse_action, parse_config
from agent.errors import ActionError, ConfigError, PayloadError
from agent.template import PayloadTemplate, clamp_setpoint

REPO = Path(__file__).resolve().parent.parent
TRV_STATE = "zigbee2mqtt/living_room_trv"


def table(**actions: dict[str, Any]) -> ActionTable:
    return ActionTable({name: parse_action(fields) for name, fields in actions.items()})


def fire(actions: ActionTable, name: str, now: float = 0.0, **kwargs: Any) -> tuple[str, bytes, int]:
    (command,) = actions.render(name, now, **kwargs)
    return command.topic, command.payload, command.qos


def config_error(actions: dict[str, dict[str, Any]]) -> str:
    """The message check-config prints for these actions (validated at config load)."""
    with pytest.raises(ConfigError) as info:
        parse_config({"agent": {"id": "k"}, "mqtt": {}, "actions": actions}, "config.toml")
    return str(info.value)


# --- exact bytes of every profile ---------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "topic", "payload"), [
    ({"profile": "zigbee2mqtt", "device": "lamp", "command": "on"},
     "zigbee2mqtt/lamp/set", b'{"state": "ON"}'),
    ({"profile": "zigbee2mqtt", "device": "lamp", "command": "off"},
     "zigbee2mqtt/lamp/set", b'{"state": "OFF"}'),
    ({"profile": "zigbee2mqtt", "device": "lamp", "command": "TOGGLE"}, "zigbee2mqtt/lamp/set",
     b'{"state": "TOGGLE"}'),
    ({"profile": "zigbee2mqtt", "device": "hall/lamp", "prefix": "z2m", "command": "on"}, "z2m/hall/lamp/set",
     b'{"state": "ON"}'),
    ({"profile": "zigbee2mqtt", "device": "trv", "command": "setpoint", "value": 21.5}, "zigbee2mqtt/trv/set",
     b'{"current_heating_setpoint": 21.5}'),
    ({"profile": "zigbee2mqtt", "device": "trv", "value": 21, "setpoint_key": "occupied_heating_setpoint"},
     "zigbee2mqtt/trv/set", b'{"occupied_heating_setpoint": 21.0}'),
    ({"profile": "tasmota", "device": "plug", "command": "on"}, "cmnd/plug/POWER", b"ON"),
    ({"profile": "tasmota", "device": "plug", "command": "off"}, "cmnd/plug/POWER", b"OFF"),
    ({"profile": "tasmota", "device": "plug", "command": "toggle"}, "cmnd/plug/POWER", b"TOGGLE"),
    ({"profile": "shelly_gen2", "device": "shellyplus1-a8032ab1", "command": "on", "switch_id": 1},
     "shellyplus1-a8032ab1/rpc",
     b'{"id": 1, "src": "home-agent", "method": "Switch.Set", "params": {"id": 1, "on": true}}'),
    ({"profile": "shelly_gen2", "device": "shellyplus1-a8032ab1", "command": "off"},
     "shellyplus1-a8032ab1/rpc",
     b'{"id": 1, "src": "home-agent", "method": "Switch.Set", "params": {"id": 0, "on": false}}'),
    ({"profile": "shelly_gen2", "device": "kitchen", "prefix": "shellies/kitchen", "command": "toggle"},
     "shellies/kitchen/rpc",
     b'{"id": 1, "src": "home-agent", "method": "Switch.Toggle", "params": {"id": 0}}'),
    ({"profile": "esphome", "device": "kitchen-fan", "entity": "ceiling_fan", "entity_type": "fan",
      "command": "on"},
     "kitchen-fan/fan/ceiling_fan/command", b"ON"),
    ({"profile": "esphome", "device": "node", "entity": "relay", "command": "off"},
     "node/switch/relay/command",
     b"OFF"),
    ({"profile": "esphome", "device": "node", "prefix": "esp/node", "entity": "relay", "command": "toggle"},
     "esp/node/switch/relay/command", b"TOGGLE"),
    ({"profile": "esphome", "device": "node", "entity": "lamp", "entity_type": "light", "command": "on"},
     "node/light/lamp/command", b'{"state": "ON"}'),
    ({"profile": "esphome", "device": "node", "entity": "heater", "entity_type": "climate", "value": 19.5},
     "node/climate/heater/target_temperature/command", b"19.5"),
    ({"topic": "cmnd/plug/POWER", "payload": "ON"}, "cmnd/plug/POWER", b"ON"),
    ({"topic": "a/b", "payload": '{"t": {{ value }}, "unit": "C"}', "value": 20},
     "a/b", b'{"t": 20.0, "unit": "C"}'),
    ({"topic": "a/b", "payload": "{{ value * 2 - 19 }}", "value": 12.25}, "a/b", b"5.5"),
])
def test_profile_bytes(fields: dict[str, Any], topic: str, payload: bytes) -> None:
    actions = table(a=fields)
    assert fire(actions, "a") == (topic, payload, 1)
    assert actions.allowed_topics == frozenset({topic})


def test_qos_is_passed_and_commands_are_never_retained() -> None:
    actions = table(a={"profile": "tasmota", "device": "p", "command": "on", "qos": 0})
    assert fire(actions, "a")[2] == 0
    # No retain flag exists to set: the link publishes every command with retain = False.
    assert [f.name for f in dataclasses.fields(OutgoingCommand)] == ["topic", "payload", "qos"]


# --- setpoints ----------------------------------------------------------------------------------------

HEATING_UP = {"topic": "zigbee2mqtt/living_room_trv/set",
              "payload": '{"current_heating_setpoint": {{ setpoint + 1 }}}', "state_topic": TRV_STATE,
              "min_setpoint": 12, "max_setpoint": 25}
HEATING_DOWN = {"profile": "zigbee2mqtt", "device": "living_room_trv", "command": "setpoint", "delta": -1,
                "min_setpoint": 12, "max_setpoint": 25}


def thermostat() -> ActionTable:
    return table(heating_up=HEATING_UP, heating_down=HEATING_DOWN)


def test_relative_change_needs_the_current_setpoint() -> None:
    actions = thermostat()
    assert actions.state_topics() == [TRV_STATE]
    assert actions.needs_current_setpoint("heating_up") and actions.needs_current_setpoint("heating_down")
    with pytest.raises(ActionError, match="current setpoint is unknown"):
        actions.render("heating_up", 0.0)
    with pytest.raises(ActionError, match="current setpoint is unknown"):
        actions.render("heating_down", 0.0)
    actions.observe_state(TRV_STATE, b'{"current_heating_setpoint": 20, "local_temperature": 19.3}')
    assert fire(actions, "heating_up", 10.0) == (
        "zigbee2mqtt/living_room_trv/set", b'{"current_heating_setpoint": 21.0}', 1)
    # Assumed taken until the device says otherwise: "heat up" twice means +2.
    assert fire(actions, "heating_up", 20.0)[1] == b'{"current_heating_setpoint": 22.0}'
    actions.observe_state(TRV_STATE, b'{"current_heating_setpoint": 18.5}')
    assert fire(actions, "heating_down", 30.0)[1] == b'{"current_heating_setpoint": 17.5}'
    assert actions.current_setpoint("heating_up") == 17.5


def test_setpoints_are_clamped_and_rounded() -> None:
    actions = thermostat()
    actions.observe_state(TRV_STATE, b"24.5")
    assert fire(actions, "heating_up", 0.0)[1] == b'{"current_heating_setpoint": 25.0}'
    assert fire(actions, "heating_up", 10.0)[1] == b'{"current_heating_setpoint": 25.0}'  # stays at max
    actions.observe_state(TRV_STATE, b'"12.2"')
    assert fire(actions, "heating_down", 20.0)[1] == b'{"current_heating_setpoint": 12.0}'
    actions.observe_state(TRV_STATE, b"21.3")
    assert fire(actions, "heating_up", 30.0)[1] == b'{"current_heating_setpoint": 22.5}'  # 22.3 -> 22.5
    assert clamp_setpoint(21.25, 5, 30) == 21.5  # half up
    assert clamp_setpoint(21.24, 5, 30) == 21.0
    assert clamp_setpoint(-100, 5, 30) == 5.0
    assert clamp_setpoint(1e300, 5, 30) == 30.0


@pytest.mark.parametrize(("payload", "reason"), [
    (b"\xff", "UTF-8"), (b"ON", "neither a JSON object nor a number"),
    (b"{}", "state has no 'current_heating_setpoint'"),
    (b'{"current_heating_setpoint": true}', "boolean"), (b'{"current_heating_setpoint": null}', "null"),
    (b'{"current_heating_setpoint": NaN}', "invalid JSON"), (b"nan", "neither"), (b"1e999", "not a finite"),
    (b"[20]", "neither"), (b"true", "neither"), (b'"warm"', "not a number"), (b"", "neither"),
    (b"[" * 1000, "nested deeper"), (b"1" * 70000, "too large"),
])
def test_observe_state_rejects_garbage(payload: bytes, reason: str) -> None:
    actions = thermostat()
    actions.observe_state(TRV_STATE, b'{"current_heating_setpoint": 20}')
    with pytest.raises(PayloadError, match=re.escape(reason)):
        actions.observe_state(TRV_STATE, payload)
    assert actions.current_setpoint("heating_down") == 20.0  # the good value survives
    actions.observe_state("some/other/topic", b"garbage")  # not watched: ignored


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(payload=st.binary(max_size=200))
def test_observe_state_raises_only_payload_error(payload: bytes) -> None:
    actions = thermostat()
    with contextlib.suppress(PayloadError):
        actions.observe_state(TRV_STATE, payload)
    setpoint = actions.current_setpoint("heating_up")
    assert setpoint is None or abs(setpoint) < float("inf")


def test_absolute_setpoints_need_no_current_setpoint() -> None:
    actions = table(comfort={"profile": "zigbee2mqtt", "device": "trv", "value": 21, "max_setpoint": 30},
                    lamp={"profile": "tasmota", "device": "p", "command": "on"})
    assert not actions.needs_current_setpoint("comfort") and not actions.needs_current_setpoint("lamp")
    assert actions.state_topics() == ["zigbee2mqtt/trv"]  # watched, for the next relative change
    assert fire(actions, "comfort")[1] == b'{"current_heating_setpoint": 21.0}'


@pytest.mark.parametrize(("payload", "expected"), [(b"ON", True), (b"OFF", False)])
def test_switch_commands(payload: bytes, expected: bool) -> None:
    assert parse_switch_command(payload) is expected


@pytest.mark.parametrize("payload", [b"on", b"Off", b"ON ", b"true", b"1", b"", b"\xff"])
def test_switch_commands_are_exact(payload: bytes) -> None:
    with pytest.raises(PayloadError, match="expected ON or OFF"):
        parse_switch_command(payload)


# --- allow-list, rate limit, time-to-live ----------------------------------------------------------------


def test_unknown_action() -> None:
    with pytest.raises(ActionError, match=r"unknown action 'nope' \(configured: heating_down, heating_up\)"):
        thermostat().render("nope", 0.0)


def test_rate_limit_uses_the_given_clock() -> None:
    actions = table(a={"profile": "tasmota", "device": "p", "command": "on", "min_interval": 2})
    actions.render("a", 100.0)
    with pytest.raises(ActionError, match=r"rate limited: fired 1.50 s ago \(min_interval 2 s\)"):
        actions.render("a", 101.5)
    with pytest.raises(ActionError, match="rate limited"):
        actions.render("a", 101.9)  # a refused firing does not restart the interval
    actions.render("a", 102.0)
    unlimited = table(a={"profile": "tasmota", "device": "p", "command": "on", "min_interval": 0})
    assert len(unlimited.render("a", 1.0) + unlimited.render("a", 1.0)) == 2


def test_failed_render_is_not_a_firing() -> None:
    actions = thermostat()
    with pytest.raises(ActionError):
        actions.render("heating_up", 0.0)
    actions.observe_state(TRV_STATE, b"20")
    actions.render("heating_up", 0.1)  # not rate limited by the failed attempt


def test_allow_list_is_exactly_the_rendered_topics_of_the_example_config() -> None:
    config = load_config(REPO / "config.toml")
    actions = ActionTable(config.actions)
    for topic in actions.state_topics():
        actions.observe_state(topic, b"20")
    rendered = {command.topic for name in config.actions for command in actions.render(name, 0.0)}
    assert rendered == actions.allowed_topics
    assert not any("+" in t or "#" in t for t in rendered)
    assert "zigbee2mqtt/bridge/request/restart" not in actions.allowed_topics


# --- the template language ------------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "setpoint", "expected"), [
    ("{{ setpoint + 1 }}", 20, "21.0"),
    ("{{setpoint-1}}", 20, "19.0"),
    ("{{ (setpoint + 1) * 2 / 2 - -1 }}", 20, "22.0"),
    ("{{ setpoint + 1 * 2 }}", 20, "22.0"),  # precedence
    ("{{ 100 / 4 / 5 }}", 0, "5.0"),  # left associative
    ("{{ -(-setpoint) }}", 20, "20.0"),
    ("{{ +setpoint }}", 20.5, "20.5"),
    ("{{ 2 - 3 - 4 }} {{ .5 + 20. }}", 0, "5.0 20.5"),  # clamped to [5, 30]
    ('{"a": {"b": {{ setpoint }}}}', 21, '{"a": {"b": 21.0}}'),
    ("no holes }} at all", 0, "no holes }} at all"),
])
def test_template_evaluation(source: str, setpoint: float, expected: str) -> None:
    text, _ = PayloadTemplate(source).evaluate({"setpoint": setpoint, "value": 0},
                                              lambda v: clamp_setpoint(v, 5, 30))
    assert text == expected


@pytest.mark.parametrize(("payload", "reason"), [
    ("{{ setpoint + }}", "ends too early"),
    ("{{ }}", "empty expression"),
    ("{{ setpoint", "never closed"),
    ("{{ (setpoint + 1 }}", "missing ')'"),
    ("{{ setpoint + 1) }}", "unexpected ')'"),
    ("{{ 1 2 }}", "unexpected '2'"),
    ("{{ x + 1 }}", "unknown name 'x'"),
    ("{{ __import__ }}", "unknown name '__import__'"),
    ("{{ __import__('os').system('true') }}", "unexpected character"),
    ("{{ setpoint.__class__ }}", "unexpected character '.'"),
    ("{{ setpoint ** 2 }}", "unexpected '*'"),
    ("{{ setpoint % 2 }}", "unexpected character '%'"),
    ("{{ 1e3 }}", "unexpected 'e3'"),
    ("{{ " + "(" * 20 + "1" + ")" * 20 + " }}", "nested too deeply"),
    ("{{ " + "1 + " * 60 + "1 }}", "longer than 200"),
    ('{"current_heating_setpoint": {{ setpoint + 1 }}', "renders to invalid JSON"),
    ('{"t": "{{ setpoint }}}', "renders to invalid JSON"),
])
def test_bad_templates_fail_at_config_load(payload: str, reason: str) -> None:
    fields: dict[str, Any] = {"topic": "a/b", "payload": payload, "state_topic": "a/state"}
    message = config_error({"heat": fields})
    assert message.startswith("actions.heat: ")
    assert reason in message
    assert "(config.toml)" in message


@settings(max_examples=500, deadline=None, database=None, derandomize=True)
@given(source=st.text(alphabet=st.sampled_from("{} ()+-*/.0123456789setpoinvalux_#'\"\\"), max_size=80))
def test_template_parser_raises_only_action_error(source: str) -> None:
    try:
        template = PayloadTemplate(source)
    except ActionError:
        return
    try:
        text, values = template.evaluate({"setpoint": 21.0, "value": 19.0},
                                         lambda v: clamp_setpoint(v, 5, 30))
    except ActionError:
        return
    assert len(values) == template.expression_count
    assert all(math.isfinite(v) and 5 <= v <= 30 for v in values)  # every number written is a safe setpoint
    assert isinstance(text, str)


def test_division_by_zero_is_reported_at_firing() -> None:
    actions = table(a={"topic": "a/b", "payload": "{{ value / (setpoint - setpoint) }}", "value": 20,
                       "state_topic": "a/state"})
    actions.observe_state("a/state", b"21")
    with pytest.raises(ActionError, match="division by zero"):
        actions.render("a", 0.0)


# --- validation of sections -----------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "reason"), [
    ({}, "actions.bad.topic: required with profile = 'template'"),
    ({"topic": "a/b"}, "actions.bad.payload: required with profile = 'template'"),
    ({"payload": "ON"}, "actions.bad.topic: required"),
    ({"topic": "a/+", "payload": "ON"}, "wildcards"),
    ({"topic": "a/#", "payload": "ON"}, "wildcards"),
    ({"topic": "$SYS/x", "payload": "ON"}, "must not start with '$'"),
    ({"topic": "", "payload": "ON"}, "topic is empty"),
    ({"topic": "a", "payload": "{{ setpoint + 1 }}"}, "state_topic must say"),
    ({"topic": "a/set", "payload": "{{ setpoint }}", "state_topic": "a/#"}, "state_topic must not contain"),
    ({"topic": "a", "payload": "ON", "state_topic": "s"},
     "only used when the payload contains {{ setpoint }}"),
    ({"topic": "a", "payload": "{{ value }}"}, "no value is configured"),
    ({"topic": "a", "payload": "ON", "value": 20}, "never uses {{ value }}"),
    ({"topic": "a", "payload": "{{ value }}", "value": 40}, "value 40 is outside"),
    ({"topic": "a", "payload": "ON", "delta": 1}, "write the change into the payload"),
    ({"topic": "a", "payload": "ON", "device": "x"},
     "actions.bad.device: has no effect with profile = 'template'"),
    ({"topic": "a", "payload": "ON", "command": "on"}, "actions.bad.command: has no effect"),
    ({"profile": "tasmota", "command": "on"}, "actions.bad.device: required with profile = 'tasmota'"),
    ({"profile": "tasmota", "device": "p"}, "needs command = 'on' | 'off' | 'toggle'"),
    ({"profile": "tasmota", "device": "p", "command": "blink"}, "command 'blink' is not one of"),
    ({"profile": "tasmota", "device": "p", "command": "setpoint"}, "command 'setpoint' is not one of"),
    ({"profile": "tasmota", "device": "p", "command": "on", "topic": "x"},
     "topic and payload are for profile"),
    ({"profile": "tasmota", "device": "p", "command": "on", "value": 3},
     "actions.bad.value: has no effect with profile = 'tasmota'"),
    ({"profile": "tasmota", "device": "a/+", "command": "on"}, "device must not contain MQTT wildcards"),
    ({"profile": "zigbee2mqtt", "device": "trv", "command": "on", "delta": 1},
     "only applies to command = 'setpoint'"),
    ({"profile": "zigbee2mqtt", "device": "trv", "command": "setpoint"}, "needs exactly one of value"),
    ({"profile": "zigbee2mqtt", "device": "trv", "value": 20, "delta": 1}, "needs exactly one of value"),
    ({"profile": "zigbee2mqtt", "device": "trv", "delta": 0}, "delta must not be 0"),
    ({"profile": "zigbee2mqtt", "device": "trv", "delta": float("nan")}, "finite"),
    ({"profile": "zigbee2mqtt", "device": "trv", "value": 20, "min_setpoint": 35},
     "greater than max_setpoint"),
    ({"profile": "zigbee2mqtt", "device": "trv", "value": 31},
     "value 31 is outside [min_setpoint, max_setpoint]"),
    ({"profile": "zigbee2mqtt", "device": "trv", "value": 20, "prefix": "a/#"}, "prefix must not contain"),
    ({"profile": "shelly_gen2", "device": "s", "command": "on", "switch_id": -1},
     "actions.bad.switch_id: Input should be greater than or equal to 0, got -1"),
    ({"profile": "shelly_gen2", "device": "s", "command": "on", "entity": "x"},
     "actions.bad.entity: has no effect with profile = 'shelly_gen2'"),
    ({"profile": "esphome", "device": "n", "command": "on"},
     "actions.bad.entity: required with profile = 'esphome'"),
    ({"profile": "esphome", "device": "n", "entity": "a/b", "command": "on"}, "one topic level"),
    ({"profile": "esphome", "device": "n", "entity": "x", "entity_type": "cover", "command": "on"},
     "actions.bad.entity_type: Input should be 'switch', 'light', 'fan' or 'climate', got \"cover\""),
    ({"profile": "esphome", "device": "n", "entity": "x", "entity_type": "climate", "command": "on"},
     "command 'on' is not one of 'setpoint'"),
    ({"profile": "esphome", "device": "n", "entity": "x", "command": "on", "value": 20},
     "only applies to command"),
])
def test_invalid_sections(fields: dict[str, Any], reason: str) -> None:
    message = config_error({"bad": fields})
    assert message.startswith("actions.bad")
    assert reason in message


@pytest.mark.parametrize(("fields", "message"), [
    ({"profile": "blink"}, "actions.bad.profile: must be one of 'template', 'zigbee2mqtt', 'tasmota', "
                           "'shelly_gen2', 'esphome', got \"blink\" (config.toml)"),
    ("lamp", "actions.bad: must be a table of the action's keys, got \"lamp\" (config.toml)"),
    ({"profile": "tasmota", "device": "p", "command": "on", "value": 3, "payload": "x"},
     "actions.bad.value: has no effect with profile = 'tasmota' (config.toml)\n"
     "actions.bad.payload: has no effect with profile = 'tasmota' (topic and payload are for profile = "
     "'template') (config.toml)"),
])
def test_profile_errors_name_the_key_and_the_profile(fields: Any, message: str) -> None:
    assert config_error({"bad": fields}) == message


def test_a_section_that_bypassed_validation_is_refused_by_the_table() -> None:
    with pytest.raises(ConfigError, match=r"^actions\.bad: expression ends too early"):
        ActionTable({"bad": TemplateAction.model_construct(topic="a", payload="{{ 1 + }}")})


def test_state_topic_defaults_and_overrides() -> None:
    template = table(up={"topic": "zigbee2mqtt/trv/set", "payload": '{"x": {{ setpoint + 1 }}}'})
    assert template.state_topics() == ["zigbee2mqtt/trv"]
    actions = table(
        z2m={"profile": "zigbee2mqtt", "device": "trv", "prefix": "zb", "delta": 1},
        own={"profile": "zigbee2mqtt", "device": "trv2", "delta": 1, "state_topic": "custom/state"},
        esp={"profile": "esphome", "device": "n", "entity": "heater", "entity_type": "climate", "delta": 0.5},
    )
    assert actions.state_topics() == ["custom/state", "n/climate/heater/target_temperature/state", "zb/trv"]
    actions.observe_state("n/climate/heater/target_temperature/state", b"19.0")
    assert fire(actions, "esp") == ("n/climate/heater/target_temperature/command", b"19.5", 1)


# --- the documented example config ------------------------------------------------------------------------


def test_example_config_parses_and_every_action_builds() -> None:
    config = load_config(REPO / "config.toml")
    assert config.agent.id == "kitchen"
    assert config.telemetry[0].topic == "zigbee2mqtt/living_room_sensor"
    assert config.telemetry[0].field == "temperature"
    assert config.telemetry[0].sensor == "living_room_temperature"
    heating_up = config.actions["heating_up"]
    assert isinstance(heating_up, TemplateAction)
    assert heating_up.topic == "zigbee2mqtt/living_room_trv/set"
    assert heating_up.payload == '{"current_heating_setpoint": {{ setpoint + 1 }}}'
    said = {command.say: command.action for command in config.voice.commands}
    for phrase in ("heat up", "heat down", "light on", "light off", "fan on", "fan off", "stop"):
        assert phrase in said
    assert config.anomaly.enabled
    for name, section in config.actions.items():
        assert len(ActionTable({name: section}).allowed_topics) == 1


def _option_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of the config schema, e.g. "mqtt.tls.ca_file" (list items and dict values included)."""
    paths = []
    for name, info in model.model_fields.items():
        if info.exclude:
            continue
        paths.append(prefix + name)
        annotation = info.annotation
        candidates = [annotation]
        for candidate in candidates:  # grows: dict values, unions and Annotated (the action union) unpacked
            candidates.extend(typing.get_args(candidate))
        for candidate in candidates:
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                paths.extend(_option_paths(candidate, f"{prefix}{name}."))
    return paths


def test_example_config_documents_every_option() -> None:
    text = (REPO / "config.toml").read_text(encoding="utf-8")
    tomllib.loads(text)
    missing = []
    for path in _option_paths(Config):
        key = re.escape(path.rsplit(".", 1)[-1])
        # Set, shown commented out (`# key = ...`), described in a key list (`#   key  ...`), or a table.
        pattern = rf"^\s*#?\s*{key}\s*=|^#\s+{key}\b|\b{key},|^#?\s*\[\[?{re.escape(path)}[\].]"
        if not re.search(pattern, text, re.M):
            missing.append(path)
    assert not missing, f"config.toml does not document: {', '.join(missing)}"


ISSUE_CONTRACT = """
[agent]
id = "kitchen"            # [a-z0-9_-]; used in topics and unique_ids
name = "Kitchen agent"
[mqtt]
host = "127.0.0.1"
port = 1883
# username, password_file, tls = {ca_file, cert_file, key_file}, client_id, keepalive
[homeassistant]
discovery_prefix = "homeassistant"
[[telemetry]]
topic = "zigbee2mqtt/living_room_sensor"   # wildcards allowed
field = "temperature"                       # JSON path; omit for plain-number payloads
sensor = "living_room_temperature"
[actions.heating_up]
topic = "zigbee2mqtt/living_room_trv/set"
payload = '{"current_heating_setpoint": {{ setpoint + 1 }}}'   # or a profile, see below
"""


def test_the_issue_contract_snippet_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(ISSUE_CONTRACT, encoding="utf-8")
    actions = ActionTable(load_config(path).actions)
    assert actions.state_topics() == [TRV_STATE]
    actions.observe_state(TRV_STATE, b'{"current_heating_setpoint": 20.5}')
    assert fire(actions, "heating_up") == (
        "zigbee2mqtt/living_room_trv/set", b'{"current_heating_setpoint": 21.5}', 1)
