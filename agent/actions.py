"""Actions: named ``[actions.*]`` sections -> exact MQTT command bytes, behind an allow-list and rate limits.

Pure: no MQTT client, no threads; the monotonic clock is passed in. Each action renders to one command on
a fixed topic known at config load, so the allow-list (``ActionTable.allowed_topics``) is exact.
Commands are always published with retain = False (a retained command would fire again on every
reconnect of the device).

Profiles and what they send (``device`` = the device's name in its own MQTT world):

============  =============================================  ==============================================
profile       topic                                          payload
============  =============================================  ==============================================
template      ``topic``                                      ``payload`` with ``{{ expr }}`` filled in;
                                                             current setpoint from ``state_topic``, by
                                                             default ``topic`` without a trailing ``/set``
zigbee2mqtt   ``<prefix or zigbee2mqtt>/<device>/set``       ``{"state": "ON"}`` / OFF / TOGGLE,
                                                             ``{"<setpoint_key>": 21.5}``
tasmota       ``cmnd/<device>/POWER``                        ``ON`` / ``OFF`` / ``TOGGLE``
shelly_gen2   ``<prefix or device>/rpc``                     ``{"id": 1, "src": "home-agent", "method":
                                                             "Switch.Set", "params": {"id": 0, "on": true}}``
                                                             (toggle: ``Switch.Toggle``)
esphome       ``<prefix or device>/<entity_type>/<entity>/   switch, fan: ``ON`` / ``OFF`` / ``TOGGLE``;
              command``                                      light: ``{"state": "ON"}`` (ESPHome lights
                                                             take JSON); climate: ``.../target_temperature
                                                             /command`` with ``21.5``
============  =============================================  ==============================================

Setpoints (absolute ``value`` or relative ``delta`` from the current setpoint, which comes from the
device's state topic) are clamped to [min_setpoint, max_setpoint] and rounded to 0.5. In a template every
``{{ expr }}`` is such a setpoint. After a setpoint command the table assumes the device took it (so
"heat up" twice quickly means +2) until the device's next state report says otherwise.

Template expressions: numbers, the variables ``setpoint`` (current setpoint) and ``value`` (the action's
``value``), ``+ - * /``, unary minus and parentheses (``agent/template.py``, never eval). Each profile's
keys and rules are its model in ``agent/config.py``; this module only renders validated sections.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from agent.config import (
    SETPOINT_COMMAND,
    ActionBase,
    ActionSection,
    EsphomeAction,
    SetpointDeviceAction,
    ShellyGen2Action,
    TasmotaAction,
    TemplateAction,
    Zigbee2MqttAction,
)
from agent.errors import ActionError, ConfigError, PayloadError
from agent.payloads import NUMBER_TEXT, decode_text, load_json, number_from_json, number_from_text, preview
from agent.template import PayloadTemplate, clamp_setpoint, format_number
from agent.topics import topic_name_problem

log = logging.getLogger(__name__)

RPC_SOURCE = "home-agent"  # Shelly answers on <src>/rpc
SWITCH_WORDS = {"on": "ON", "off": "OFF", "toggle": "TOGGLE"}

# ---------------------------------------------------------------------------------------------------------
# A validated ActionSection -> what rendering it needs

Kind = Literal["switch", "setpoint", "template"]


@dataclass(frozen=True, slots=True)
class _Plan:
    section: ActionBase
    topic: str
    kind: Kind
    switch_word: str | None = None  # ON / OFF / TOGGLE
    template: PayloadTemplate | None = None
    state_topic: str | None = None  # where the current setpoint comes from
    setpoint_key: str = ""  # the setpoint's key in a JSON state on state_topic
    needs_current: bool = False  # a relative change: cannot render without the current setpoint

    @property
    def state_key(self) -> tuple[str, str] | None:
        return None if self.state_topic is None else (self.state_topic, self.setpoint_key)


def _compile(section: ActionSection) -> _Plan:
    """Raises ActionError only for a section that bypassed validation (``model_construct``)."""
    if isinstance(section, TemplateAction):
        template = PayloadTemplate(section.payload)
        uses_setpoint = "setpoint" in template.variables
        return _Plan(section, section.topic, "template", template=template,
                     state_topic=section.setpoint_state_topic if uses_setpoint else None,
                     setpoint_key=section.setpoint_key, needs_current=uses_setpoint)
    if isinstance(section, Zigbee2MqttAction):
        base = f"{section.prefix or 'zigbee2mqtt'}/{section.device}"
        return _device_plan(section, f"{base}/set", base)
    if isinstance(section, TasmotaAction):
        return _switch_plan(section, f"cmnd/{section.device}/POWER")
    if isinstance(section, ShellyGen2Action):
        return _switch_plan(section, f"{section.prefix or section.device}/rpc")
    base = f"{section.prefix or section.device}/{section.entity_type}/{section.entity}"
    if section.entity_type == "climate":
        target = f"{base}/target_temperature"
        return _device_plan(section, f"{target}/command", f"{target}/state")
    return _switch_plan(section, f"{base}/command")


def _switch_plan(section: TasmotaAction | ShellyGen2Action | SetpointDeviceAction, topic: str) -> _Plan:
    word = SWITCH_WORDS.get(section.command_word)
    if word is None:
        raise ActionError(f"command {section.command!r} is not one of {', '.join(map(repr, SWITCH_WORDS))}")
    return _Plan(section, topic, "switch", switch_word=word)


def _device_plan(section: SetpointDeviceAction, topic: str, state_topic: str) -> _Plan:
    """A device that takes setpoints; ``state_topic``: where it reports them unless configured."""
    if section.command_word != SETPOINT_COMMAND:
        return _switch_plan(section, topic)
    return _Plan(section, topic, "setpoint", state_topic=section.state_topic or state_topic,
                 setpoint_key=section.setpoint_key, needs_current=section.delta is not None)


# ---------------------------------------------------------------------------------------------------------
# Commands from Home Assistant (or anything else outside): validated before acting


def parse_switch_command(payload: bytes) -> bool:
    """An HA switch command: exactly ``ON`` -> True or ``OFF`` -> False (HA payloads are case-sensitive)."""
    if payload == b"ON":
        return True
    if payload == b"OFF":
        return False
    raise PayloadError(f"expected ON or OFF, got {preview(payload)}")


# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutgoingCommand:
    """One MQTT message to publish. Always retain = False."""

    topic: str
    payload: bytes
    qos: int


class ActionTable:
    """The configured actions: renders them to commands, enforces the allow-list and rate limits, and
    tracks thermostats' current setpoints from their state topics.

    Not thread-safe: call it from one thread (or behind one lock).
    """

    def __init__(self, actions: Mapping[str, ActionSection]) -> None:
        plans: dict[str, _Plan] = {}
        for name, section in actions.items():
            try:
                plans[name] = _compile(section)
            except ActionError as err:
                raise ConfigError(f"actions.{name}: {err}") from err
            problem = topic_name_problem(plans[name].topic)  # e.g. a prefix and a device too long together
            if problem is not None:
                raise ConfigError(f"actions.{name}: {problem}")
        self._plans = plans
        self._allowed = frozenset(plan.topic for plan in plans.values())
        self._state_keys: dict[str, set[str]] = {}
        for plan in plans.values():
            if plan.state_topic is not None:
                self._state_keys.setdefault(plan.state_topic, set()).add(plan.setpoint_key)
        self._setpoints: dict[tuple[str, str], float] = {}
        self._last_fired: dict[str, float] = {}

    @property
    def allowed_topics(self) -> frozenset[str]:
        """Exactly the topics the configured actions can publish to."""
        return self._allowed

    def state_topics(self) -> list[str]:
        """Topics carrying thermostats' current setpoints: subscribe and feed them to ``observe_state``."""
        return sorted(self._state_keys)

    def needs_current_setpoint(self, name: str) -> bool:
        """Whether ``render(name)`` fails until the device's current setpoint has been observed."""
        return self._plan(name).needs_current

    def current_setpoint(self, name: str) -> float | None:
        """The setpoint last reported for this action's device (or last commanded), None when unknown."""
        key = self._plan(name).state_key
        return None if key is None else self._setpoints.get(key)

    def carry_setpoints(self, previous: ActionTable) -> None:
        """Keep the setpoints ``previous`` (the table of the config before a reload) knew, for the state
        topics and keys this table still watches: a retained state is not delivered again on reload."""
        self._setpoints.update({
            (topic, key): value for (topic, key), value in previous._setpoints.items()
            if key in self._state_keys.get(topic, ())
        })

    def observe_state(self, topic: str, payload: bytes) -> None:
        """Remember the current setpoint from a device state message (zigbee2mqtt JSON with the
        setpoint_key, or a plain number). Topics no action watches are ignored. Raises PayloadError."""
        keys = self._state_keys.get(topic)
        if not keys:
            return
        text = decode_text(payload)
        stripped = text.strip(" \t\r\n")
        if NUMBER_TEXT.fullmatch(stripped):
            number = number_from_text(stripped, "state")
            self._setpoints.update({(topic, key): number for key in keys})
            return
        data = load_json(text) if stripped[:1] in ("{", "[", '"') else None
        if isinstance(data, dict):
            found = {key: data[key] for key in keys if key in data}
            if not found:
                raise PayloadError(f"state has no {' or '.join(repr(k) for k in sorted(keys))}")
            numbers = {key: number_from_json(raw, f"state field {key!r}") for key, raw in found.items()}
            self._setpoints.update({(topic, key): number for key, number in numbers.items()})
            return
        if isinstance(data, str):
            number = number_from_text(data, "state")
            self._setpoints.update({(topic, key): number for key in keys})
            return
        raise PayloadError(f"state is neither a JSON object nor a number: {preview(stripped)}")

    def render(self, name: str, now_mono: float) -> list[OutgoingCommand]:
        """The commands for one firing of ``name``; records the firing for the rate limit.

        Raises ActionError: unknown action, rate limited, or current setpoint unknown. (The ``ttl`` is
        applied by ``agent.dispatch.ActionDispatcher``, through ``ActionRequest.expires_mono``.)
        """
        plan = self._plan(name)
        section = plan.section
        last = self._last_fired.get(name)
        if last is not None and 0 <= now_mono - last < section.min_interval:
            raise ActionError(f"action {name!r} is rate limited: fired {now_mono - last:.2f} s ago "
                              f"(min_interval {section.min_interval:g} s)")
        payload, new_setpoint = self._payload(name, plan)
        if plan.topic not in self._allowed:  # cannot happen: the allow-list is built from the same plans
            raise ActionError(f"topic {plan.topic!r} is not on the allow-list")
        self._last_fired[name] = now_mono
        key = plan.state_key
        if new_setpoint is not None and key is not None:
            self._setpoints[key] = new_setpoint  # optimistic until the device reports its state
        log.debug("action %s -> %s %r", name, plan.topic, payload)
        return [OutgoingCommand(plan.topic, payload, section.qos)]

    def _plan(self, name: str) -> _Plan:
        plan = self._plans.get(name)
        if plan is None:
            known = ", ".join(sorted(self._plans)) or "none"
            raise ActionError(f"unknown action {name!r} (configured: {known})")
        return plan

    def _current(self, name: str, plan: _Plan) -> float:
        key = plan.state_key
        current = None if key is None else self._setpoints.get(key)
        if current is None:
            raise ActionError(f"action {name!r} changes the setpoint relatively, but the current setpoint is "
                              f"unknown (nothing usable received on {plan.state_topic!r} yet)")
        return current

    def _payload(self, name: str, plan: _Plan) -> tuple[bytes, float | None]:
        """The payload, and the setpoint it sets (None: none, or not one telling which)."""
        section = plan.section
        if isinstance(section, TemplateAction):
            assert plan.template is not None
            low, high = section.min_setpoint, section.max_setpoint
            variables: dict[str, float] = {}
            if plan.needs_current:
                variables["setpoint"] = self._current(name, plan)
            if section.value is not None:
                variables["value"] = section.value
            text, results = plan.template.evaluate(variables, lambda v: clamp_setpoint(v, low, high))
            # One number in the payload is the new setpoint; with several there is no telling which.
            return text.encode("utf-8"), results[0] if len(results) == 1 else None
        if plan.kind == "setpoint":
            assert isinstance(section, SetpointDeviceAction)
            low, high = section.min_setpoint, section.max_setpoint
            if section.delta is not None:
                target = clamp_setpoint(self._current(name, plan) + section.delta, low, high)
            else:
                assert section.value is not None  # validated: value xor delta
                target = clamp_setpoint(section.value, low, high)
            if isinstance(section, Zigbee2MqttAction):
                return _json_bytes({section.setpoint_key: target}), target
            return format_number(target).encode("ascii"), target  # esphome climate
        word = plan.switch_word
        assert word is not None
        esphome_light = isinstance(section, EsphomeAction) and section.entity_type == "light"
        if isinstance(section, Zigbee2MqttAction) or esphome_light:
            return _json_bytes({"state": word}), None
        if isinstance(section, ShellyGen2Action):
            if word == "TOGGLE":
                return _json_bytes({"id": 1, "src": RPC_SOURCE, "method": "Switch.Toggle",
                                    "params": {"id": section.switch_id}}), None
            return _json_bytes({"id": 1, "src": RPC_SOURCE, "method": "Switch.Set",
                                "params": {"id": section.switch_id, "on": word == "ON"}}), None
        return word.encode("ascii"), None  # tasmota, esphome switch / fan


def _json_bytes(document: object) -> bytes:
    return json.dumps(document, allow_nan=False).encode("utf-8")
