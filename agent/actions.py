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
``value``), ``+ - * /``, unary minus and parentheses, evaluated by the small parser below (never eval).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from agent.errors import ActionError, ConfigError, PayloadError
from agent.payloads import NUMBER_TEXT, decode_text, load_json, number_from_json, number_from_text, preview

if TYPE_CHECKING:
    from agent.config import ActionSection

log = logging.getLogger(__name__)

RPC_SOURCE = "home-agent"  # Shelly answers on <src>/rpc
SETPOINT_STEP = 0.5
SWITCH_WORDS = {"on": "ON", "off": "OFF", "toggle": "TOGGLE"}
SETPOINT_COMMAND = "setpoint"
TEMPLATE_VARIABLES = ("setpoint", "value")
ESPHOME_SWITCH_TYPES = ("switch", "fan", "light")
ESPHOME_ENTITY_TYPES = (*ESPHOME_SWITCH_TYPES, "climate")
MAX_EXPRESSION_CHARS = 200
MAX_EXPRESSION_DEPTH = 16
MAX_TOPIC_BYTES = 65535

# ---------------------------------------------------------------------------------------------------------
# The template language


@dataclass(frozen=True, slots=True)
class _Number:
    value: float


@dataclass(frozen=True, slots=True)
class _Variable:
    name: str


@dataclass(frozen=True, slots=True)
class _Negate:
    operand: _Expr


@dataclass(frozen=True, slots=True)
class _Binary:
    operator: str
    left: _Expr
    right: _Expr


_Expr = _Number | _Variable | _Negate | _Binary

_TOKEN = re.compile(
    r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>[-+*/()])"
)


class _ExpressionParser:
    """Recursive descent over: expr := term (('+'|'-') term)*; term := unary (('*'|'/') unary)*;
    unary := ('-'|'+') unary | atom; atom := number | variable | '(' expr ')'."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.tokens: list[tuple[str, str, int]] = []  # (kind, text, position)
        position = 0
        while position < len(source):
            if source[position] in " \t\r\n":
                position += 1
                continue
            match = _TOKEN.match(source, position)
            if match is None:
                raise ActionError(f"unexpected character {source[position]!r} in expression {source!r}")
            kind = match.lastgroup or "op"
            self.tokens.append((kind, match.group(), position))
            position = match.end()
        self.index = 0
        self.depth = 0

    def parse(self) -> _Expr:
        if not self.tokens:
            raise ActionError("empty expression in '{{ }}'")
        expr = self._expr()
        if self.index < len(self.tokens):
            raise ActionError(f"unexpected {self.tokens[self.index][1]!r} in expression {self.source!r}")
        return expr

    def _peek(self) -> str | None:
        return self.tokens[self.index][1] if self.index < len(self.tokens) else None

    def _expr(self) -> _Expr:
        left = self._term()
        while self._peek() in ("+", "-"):
            operator = self.tokens[self.index][1]
            self.index += 1
            left = _Binary(operator, left, self._term())
        return left

    def _term(self) -> _Expr:
        left = self._unary()
        while self._peek() in ("*", "/"):
            operator = self.tokens[self.index][1]
            self.index += 1
            left = _Binary(operator, left, self._unary())
        return left

    def _unary(self) -> _Expr:
        self.depth += 1
        if self.depth > MAX_EXPRESSION_DEPTH:
            raise ActionError(f"expression nested too deeply: {self.source!r}")
        try:
            token = self._peek()
            if token in ("-", "+"):
                self.index += 1
                operand = self._unary()
                return _Negate(operand) if token == "-" else operand
            return self._atom()
        finally:
            self.depth -= 1

    def _atom(self) -> _Expr:
        if self.index >= len(self.tokens):
            raise ActionError(f"expression ends too early: {self.source!r}")
        kind, text, _ = self.tokens[self.index]
        self.index += 1
        if kind == "number":
            return _Number(float(text))
        if kind == "name":
            if text not in TEMPLATE_VARIABLES:
                raise ActionError(f"unknown name {text!r} in expression {self.source!r} "
                                  f"(only {' and '.join(TEMPLATE_VARIABLES)} are defined)")
            return _Variable(text)
        if text == "(":
            inner = self._expr()
            if self._peek() != ")":
                raise ActionError(f"missing ')' in expression {self.source!r}")
            self.index += 1
            return inner
        raise ActionError(f"unexpected {text!r} in expression {self.source!r}")


def _variables_of(expr: _Expr) -> set[str]:
    if isinstance(expr, _Variable):
        return {expr.name}
    if isinstance(expr, _Negate):
        return _variables_of(expr.operand)
    if isinstance(expr, _Binary):
        return _variables_of(expr.left) | _variables_of(expr.right)
    return set()


def _evaluate(expr: _Expr, variables: Mapping[str, float]) -> float:
    if isinstance(expr, _Number):
        return expr.value
    if isinstance(expr, _Variable):
        return variables[expr.name]
    if isinstance(expr, _Negate):
        return -_evaluate(expr.operand, variables)
    left = _evaluate(expr.left, variables)
    right = _evaluate(expr.right, variables)
    if expr.operator == "+":
        return left + right
    if expr.operator == "-":
        return left - right
    if expr.operator == "*":
        return left * right
    if right == 0:
        raise ActionError("division by zero in payload template")
    return left / right


class PayloadTemplate:
    """Literal text with ``{{ expr }}`` holes. Parsing errors raise ActionError."""

    def __init__(self, source: str) -> None:
        self.source = source
        parts: list[str | _Expr] = []
        position = 0
        while True:
            start = source.find("{{", position)
            if start < 0:
                parts.append(source[position:])
                break
            end = source.find("}}", start + 2)
            if end < 0:
                raise ActionError(f"'{{{{' at position {start} is never closed with '}}}}'")
            expression = source[start + 2 : end].strip(" \t\r\n")
            if len(expression) > MAX_EXPRESSION_CHARS:
                raise ActionError(
                    f"expression at position {start} is longer than {MAX_EXPRESSION_CHARS} characters")
            parts.append(source[position:start])
            parts.append(_ExpressionParser(expression).parse())
            position = end + 2
        self._parts = tuple(part for part in parts if part != "")
        names: set[str] = set()
        for part in self._parts:
            if not isinstance(part, str):
                names |= _variables_of(part)
        self.variables = frozenset(names)
        self.expression_count = sum(1 for part in self._parts if not isinstance(part, str))

    def evaluate(
        self, variables: Mapping[str, float], finish: Callable[[float], float]
    ) -> tuple[str, list[float]]:
        """The rendered text and the (finished) value of each expression."""
        out: list[str] = []
        values: list[float] = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part)
                continue
            raw = _evaluate(part, variables)
            if not math.isfinite(raw):
                raise ActionError("payload template produced a number that is not finite")
            value = finish(raw)
            values.append(value)
            out.append(format_number(value))
        return "".join(out), values


def format_number(value: float) -> str:
    """A JSON-valid number: ``22.0``, ``21.5`` (never ``-0.0``, ``nan`` or ``inf``)."""
    return repr(float(value) + 0.0)


def clamp_setpoint(value: float, low: float, high: float) -> float:
    """Round half up to SETPOINT_STEP, then clamp to [low, high]."""
    rounded = math.floor(value / SETPOINT_STEP + 0.5) * SETPOINT_STEP
    return min(max(rounded, low), high)


# ---------------------------------------------------------------------------------------------------------
# Validation and compilation of one ActionSection

_COMMON_FIELDS = frozenset({"profile", "qos", "confirm", "ttl", "min_interval"})
_SETPOINT_FIELDS = frozenset(
    {"value", "delta", "min_setpoint", "max_setpoint", "state_topic", "setpoint_key"}
)
_PROFILE_FIELDS: dict[str, frozenset[str]] = {
    "template": frozenset({"topic", "payload", "value", "min_setpoint", "max_setpoint", "state_topic",
                           "setpoint_key"}),
    "zigbee2mqtt": frozenset({"device", "command", "prefix"}) | _SETPOINT_FIELDS,
    "tasmota": frozenset({"device", "command"}),
    "shelly_gen2": frozenset({"device", "command", "prefix", "switch_id"}),
    "esphome": frozenset({"device", "command", "prefix", "entity", "entity_type"}) | _SETPOINT_FIELDS,
}
# Fields this module interprets; others (added for other features) are not checked here.
_KNOWN_FIELDS = _COMMON_FIELDS.union(*_PROFILE_FIELDS.values())

Kind = Literal["switch", "setpoint", "template"]


@dataclass(frozen=True, slots=True)
class _Plan:
    """A validated action: everything needed to render it."""

    section: ActionSection
    topic: str
    kind: Kind
    switch_word: str | None = None  # ON / OFF / TOGGLE
    template: PayloadTemplate | None = None
    state_topic: str | None = None  # where the current setpoint comes from
    needs_current: bool = False  # a relative change: cannot render without the current setpoint

    @property
    def state_key(self) -> tuple[str, str] | None:
        return None if self.state_topic is None else (self.state_topic, self.section.setpoint_key)

    @property
    def takes_value(self) -> bool:
        """Whether an absolute setpoint drives it (so an external value may replace the configured one)."""
        if self.template is not None:
            return "value" in self.template.variables
        return self.kind == "setpoint" and self.section.delta is None


def _topic_problem(topic: str, what: str) -> str | None:
    if not topic:
        return f"{what} is empty"
    if "+" in topic or "#" in topic:
        return f"{what} must not contain MQTT wildcards ('+', '#'): {topic!r}"
    if "\x00" in topic:
        return f"{what} contains a NUL character"
    if topic.startswith("$"):
        return f"{what} must not start with '$' (broker-reserved): {topic!r}"
    if len(topic.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        return f"{what} is longer than 65535 bytes"
    return None


def _require_topic(topic: str | None, what: str) -> str:
    if topic is None:
        raise ActionError(f"needs {what}")
    problem = _topic_problem(topic, what)
    if problem is not None:
        raise ActionError(problem)
    return topic


def _check_fields(section: ActionSection, allowed: frozenset[str]) -> None:
    for name in sorted((section.model_fields_set & _KNOWN_FIELDS) - allowed - _COMMON_FIELDS):
        hint = ""
        if name in ("topic", "payload"):
            hint = " (topic and payload are for profile = 'template')"
        elif name == "delta" and section.profile == "template":
            hint = " (write the change into the payload, e.g. {{ setpoint + 1 }})"
        elif name in _SETPOINT_FIELDS and section.profile in ("zigbee2mqtt", "esphome"):
            hint = " (it only applies to command = 'setpoint')"
        raise ActionError(f"{name!r} has no effect with profile = {section.profile!r}{hint}")


def _check_setpoint_range(section: ActionSection) -> None:
    for name in ("min_setpoint", "max_setpoint", "value", "delta"):
        number = getattr(section, name)
        if number is not None and not math.isfinite(number):
            raise ActionError(f"{name} must be a finite number")
    if section.min_setpoint > section.max_setpoint:
        raise ActionError(f"min_setpoint ({section.min_setpoint:g}) is greater than "
                          f"max_setpoint ({section.max_setpoint:g})")
    if section.value is not None and not section.min_setpoint <= section.value <= section.max_setpoint:
        raise ActionError(f"value {section.value:g} is outside [min_setpoint, max_setpoint] = "
                          f"[{section.min_setpoint:g}, {section.max_setpoint:g}]")


def _command(section: ActionSection, choices: tuple[str, ...]) -> str:
    if section.command is None:
        if SETPOINT_COMMAND in choices and (section.value is not None or section.delta is not None):
            return SETPOINT_COMMAND
        raise ActionError(f"needs command = {' | '.join(repr(c) for c in choices)}")
    command = section.command.strip().lower()
    if command not in choices:
        raise ActionError(f"command {section.command!r} is not one of {', '.join(repr(c) for c in choices)} "
                          f"for profile = {section.profile!r}")
    return command


def _setpoint_plan(section: ActionSection, topic: str, state_topic: str) -> _Plan:
    _check_setpoint_range(section)
    if (section.value is None) == (section.delta is None):
        raise ActionError("command = 'setpoint' needs exactly one of value (absolute) or delta (relative)")
    if section.delta == 0:
        raise ActionError("delta must not be 0")
    state = _require_topic(section.state_topic or state_topic, "state_topic")
    return _Plan(section, topic, "setpoint", state_topic=state, needs_current=section.delta is not None)


def _compile_template(section: ActionSection) -> _Plan:
    topic = _require_topic(section.topic, "topic")
    if section.payload is None:
        raise ActionError("needs payload (profile = 'template')")
    template = PayloadTemplate(section.payload)
    _check_setpoint_range(section)
    uses = template.variables
    state_topic: str | None = None
    if "setpoint" in uses:
        # zigbee2mqtt convention: a device commanded on <name>/set reports its state on <name>.
        state_topic = section.state_topic or (topic.removesuffix("/set") if topic.endswith("/set") else None)
        if state_topic is None:
            raise ActionError(
                "payload uses {{ setpoint }}, so state_topic must say where the current setpoint comes from")
        state_topic = _require_topic(state_topic, "state_topic")
    elif section.state_topic is not None:
        raise ActionError("state_topic is only used when the payload contains {{ setpoint }}")
    if "value" in uses and section.value is None:
        raise ActionError("payload uses {{ value }} but no value is configured")
    if "value" not in uses and section.value is not None:
        raise ActionError("value is set but the payload never uses {{ value }}")
    # Render once with in-range numbers so a payload that looks like JSON is known to stay JSON.
    sample = dict.fromkeys(TEMPLATE_VARIABLES, section.min_setpoint)
    low, high = section.min_setpoint, section.max_setpoint
    try:
        text, _ = template.evaluate(sample, lambda v: clamp_setpoint(v, low, high))
    except ActionError:
        text = ""  # e.g. division by zero for these sample numbers; reported when it happens at firing
    if text.lstrip(" \t\r\n")[:1] in ("{", "["):
        try:
            json.loads(text)
        except ValueError as err:
            raise ActionError(
                f"payload looks like JSON but renders to invalid JSON ({err}): {text!r}") from err
    return _Plan(section, topic, "template", template=template, state_topic=state_topic,
                 needs_current="setpoint" in uses)


def _compile(section: ActionSection) -> _Plan:
    profile = section.profile
    _check_fields(section, _PROFILE_FIELDS[profile])
    if profile == "template":
        return _compile_template(section)
    if section.device is None:
        raise ActionError(f"profile = {profile!r} needs device")
    device = section.device
    problem = _topic_problem(device, "device")
    if problem is not None:
        raise ActionError(problem)
    if section.prefix is not None and (problem := _topic_problem(section.prefix, "prefix")) is not None:
        raise ActionError(problem)
    switches = tuple(SWITCH_WORDS)

    if profile == "zigbee2mqtt":
        base = f"{section.prefix or 'zigbee2mqtt'}/{device}"
        command = _command(section, (*switches, SETPOINT_COMMAND))
        if command == SETPOINT_COMMAND:
            return _setpoint_plan(section, f"{base}/set", base)
        _check_fields(section, _PROFILE_FIELDS[profile] - _SETPOINT_FIELDS)
        return _Plan(section, f"{base}/set", "switch", switch_word=SWITCH_WORDS[command])

    if profile == "tasmota":
        command = _command(section, switches)
        return _Plan(section, f"cmnd/{device}/POWER", "switch", switch_word=SWITCH_WORDS[command])

    if profile == "shelly_gen2":
        if section.switch_id < 0:
            raise ActionError(f"switch_id must be >= 0, got {section.switch_id}")
        command = _command(section, switches)
        return _Plan(section, f"{section.prefix or device}/rpc", "switch", switch_word=SWITCH_WORDS[command])

    # esphome
    if section.entity_type not in ESPHOME_ENTITY_TYPES:
        raise ActionError(
            f"entity_type {section.entity_type!r} is not one of {', '.join(ESPHOME_ENTITY_TYPES)}")
    if section.entity is None:
        raise ActionError("profile = 'esphome' needs entity (the entity's object id, e.g. \"ceiling_fan\")")
    problem = _topic_problem(section.entity, "entity")
    if problem is None and "/" in section.entity:
        problem = f"entity must be one topic level (no '/'): {section.entity!r}"
    if problem is not None:
        raise ActionError(problem)
    base = f"{section.prefix or device}/{section.entity_type}/{section.entity}"
    if section.entity_type == "climate":
        command = _command(section, (SETPOINT_COMMAND,))
        target = f"{base}/target_temperature"
        return _setpoint_plan(section, f"{target}/command", f"{target}/state")
    command = _command(section, switches)
    _check_fields(section, _PROFILE_FIELDS[profile] - _SETPOINT_FIELDS)
    return _Plan(section, f"{base}/command", "switch", switch_word=SWITCH_WORDS[command])


def check_action(section: ActionSection) -> None:
    """Raise ActionError (message without the key path) if ``section`` cannot be rendered. Used by config."""
    _compile(section)


# ---------------------------------------------------------------------------------------------------------
# Commands from Home Assistant (or anything else outside): validated before acting


def parse_switch_command(payload: bytes) -> bool:
    """An HA switch command: exactly ``ON`` -> True or ``OFF`` -> False (HA payloads are case-sensitive)."""
    if payload == b"ON":
        return True
    if payload == b"OFF":
        return False
    raise PayloadError(f"expected ON or OFF, got {preview(payload)}")


def parse_number_payload(payload: bytes, what: str = "value") -> float:
    """A finite number from a plain or JSON payload (``21.5``, ``"21.5"``); never a boolean."""
    text = decode_text(payload)
    stripped = text.strip(" \t\r\n")
    if NUMBER_TEXT.fullmatch(stripped):
        return number_from_text(stripped, what)
    try:
        data = load_json(text)
    except PayloadError as err:
        raise PayloadError(f"{what} is not a number: {preview(stripped)}") from err
    return number_from_json(data, what)


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
        self._plans = plans
        self._allowed = frozenset(plan.topic for plan in plans.values())
        self._state_keys: dict[str, set[str]] = {}
        for plan in plans.values():
            if plan.state_topic is not None:
                self._state_keys.setdefault(plan.state_topic, set()).add(plan.section.setpoint_key)
        self._setpoints: dict[tuple[str, str], float] = {}
        self._last_fired: dict[str, float] = {}

    @property
    def names(self) -> list[str]:
        return list(self._plans)

    @property
    def allowed_topics(self) -> frozenset[str]:
        """Exactly the topics the configured actions can publish to."""
        return self._allowed

    def is_allowed(self, topic: str) -> bool:
        return topic in self._allowed

    def section(self, name: str) -> ActionSection:
        return self._plan(name).section

    def state_topics(self) -> list[str]:
        """Topics carrying thermostats' current setpoints: subscribe and feed them to ``observe_state``."""
        return sorted(self._state_keys)

    def needs_current_setpoint(self, name: str) -> bool:
        """Whether ``render(name)`` fails until the device's current setpoint has been observed."""
        return self._plan(name).needs_current

    def state_topic_for(self, name: str) -> str | None:
        """The topic this action's current setpoint comes from (None: the action has no setpoint)."""
        return self._plan(name).state_topic

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

    def parse_setpoint_command(self, name: str, payload: bytes) -> float:
        """Validate a setpoint that arrived from outside (Home Assistant forwards out-of-range values
        unchanged): a finite number within [min_setpoint, max_setpoint], rounded to 0.5. Raises
        PayloadError for a bad or out-of-range payload, ActionError when the action takes no value."""
        plan = self._plan(name)
        if not plan.takes_value:
            raise ActionError(f"action {name!r} takes no setpoint value")
        low, high = plan.section.min_setpoint, plan.section.max_setpoint
        number = parse_number_payload(payload, "setpoint")
        if not low <= number <= high:
            raise PayloadError(f"setpoint {number:g} is outside the allowed range [{low:g}, {high:g}]")
        return clamp_setpoint(number, low, high)

    def render(self, name: str, now_mono: float, *, value: float | None = None) -> list[OutgoingCommand]:
        """The commands for one firing of ``name``; records the firing for the rate limit.

        ``value`` replaces the configured absolute setpoint (validate it with ``parse_setpoint_command``
        first). Raises ActionError: unknown action, rate limited, or current setpoint unknown. (The ``ttl``
        is applied by ``agent.dispatch.ActionDispatcher``, through ``ActionRequest.expires_mono``.)
        """
        plan = self._plan(name)
        section = plan.section
        last = self._last_fired.get(name)
        if last is not None and 0 <= now_mono - last < section.min_interval:
            raise ActionError(f"action {name!r} is rate limited: fired {now_mono - last:.2f} s ago "
                              f"(min_interval {section.min_interval:g} s)")
        if value is not None and not plan.takes_value:
            raise ActionError(f"action {name!r} takes no setpoint value")
        if value is not None and not math.isfinite(value):
            raise ActionError(f"setpoint for {name!r} must be a finite number")
        payload, new_setpoint = self._payload(name, plan, value)
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

    def _payload(self, name: str, plan: _Plan, value: float | None) -> tuple[bytes, float | None]:
        section = plan.section
        low, high = section.min_setpoint, section.max_setpoint
        absolute = value if value is not None else section.value
        if plan.template is not None:
            variables: dict[str, float] = {}
            if "setpoint" in plan.template.variables:
                variables["setpoint"] = self._current(name, plan)
            if absolute is not None:
                variables["value"] = absolute
            text, results = plan.template.evaluate(variables, lambda v: clamp_setpoint(v, low, high))
            # One number in the payload is the new setpoint; with several there is no telling which.
            return text.encode("utf-8"), results[0] if len(results) == 1 else None
        if plan.kind == "setpoint":
            if section.delta is not None:
                target = clamp_setpoint(self._current(name, plan) + section.delta, low, high)
            else:
                assert absolute is not None  # validated at compile time: value xor delta
                target = clamp_setpoint(absolute, low, high)
            if section.profile == "zigbee2mqtt":
                return _json_bytes({section.setpoint_key: target}), target
            return format_number(target).encode("ascii"), target  # esphome climate
        word = plan.switch_word
        assert word is not None
        esphome_light = section.profile == "esphome" and section.entity_type == "light"
        if section.profile == "zigbee2mqtt" or esphome_light:
            return _json_bytes({"state": word}), None
        if section.profile == "shelly_gen2":
            if word == "TOGGLE":
                return _json_bytes({"id": 1, "src": RPC_SOURCE, "method": "Switch.Toggle",
                                    "params": {"id": section.switch_id}}), None
            return _json_bytes({"id": 1, "src": RPC_SOURCE, "method": "Switch.Set",
                                "params": {"id": section.switch_id, "on": word == "ON"}}), None
        return word.encode("ascii"), None  # tasmota, esphome switch / fan


def _json_bytes(document: object) -> bytes:
    return json.dumps(document, allow_nan=False).encode("utf-8")
