"""Configuration: pydantic models for ``config.toml``. The only place defaults live.

Every section except ``[agent]`` and ``[mqtt]`` is optional. Unknown keys are rejected. Errors name the
key path and the file, e.g. ``mqtt.port: Input should be a valid integer, got "abc" (config.toml)``.
Secrets never live in the file: the MQTT password comes from ``mqtt.password_file`` or the environment
variable ``HOME_AGENT_MQTT_PASSWORD``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.errors import ActionError, ConfigError
from agent.template import PayloadTemplate, check_renders_json
from agent.topics import topic_filter_problem, topic_name_problem

PASSWORD_ENV = "HOME_AGENT_MQTT_PASSWORD"
STATE_DIR_ENV = "STATE_DIRECTORY"  # set by systemd's StateDirectory=

log = logging.getLogger("agent.config")

AgentId = Annotated[str, Field(pattern=r"^[a-z0-9_-]{1,64}$")]
ObjectName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
# TOML has no path type: paths are strings, the one conversion strict mode must still allow.
FilePath = Annotated[Path, Strict(False)]


class Section(BaseModel):
    # Strict: `port = "18841"` or `anomaly = "yes"` is a typo to report, not a value to guess at
    # (integers are still accepted where a float is expected).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class AgentSection(Section):
    id: AgentId
    name: str | None = None  # defaults to the id
    # Where persistent state lives (mute switch, anomaly state, outbox). $STATE_DIRECTORY wins when set.
    state_dir: FilePath = Path("/var/lib/home-agent")

    @property
    def display_name(self) -> str:
        return self.name or self.id

    @property
    def resolved_state_dir(self) -> Path:
        env = os.environ.get(STATE_DIR_ENV)
        return Path(env.split(":")[0]) if env else self.state_dir


class TlsSection(Section):
    ca_file: FilePath | None = None  # CA bundle to verify the broker; system store when omitted
    cert_file: FilePath | None = None  # client certificate (mutual TLS)
    key_file: FilePath | None = None  # its private key, when not in cert_file; needs cert_file
    # Never disable in production: turns off the broker hostname check.
    insecure_skip_hostname_check: bool = False

    @model_validator(mode="after")
    def _key_needs_cert(self) -> TlsSection:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is set but cert_file is not (the key belongs to a client certificate)")
        return self


class MqttSection(Section):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password_file: FilePath | None = None
    tls: TlsSection | None = None
    client_id: str | None = None  # defaults to home-agent-<agent id>
    keepalive: int = Field(default=30, ge=5, le=3600)
    topic_prefix: str = "home-agent"  # our topics: <topic_prefix>/<agent id>/...
    reconnect_min_delay: float = Field(default=0.5, gt=0, le=60)
    reconnect_max_delay: float = Field(default=10.0, gt=0, le=600)  # capped backoff
    max_queued_messages: int = Field(default=1000, ge=10, le=1_000_000)  # outgoing queue bound
    max_payload_bytes: int = Field(default=65536, ge=256, le=16 * 1024 * 1024)  # larger inbound is rejected

    def password(self) -> str | None:
        """The password from ``password_file`` or $HOME_AGENT_MQTT_PASSWORD; never stored in the config."""
        if self.password_file is not None:
            try:
                return self.password_file.read_text(encoding="utf-8").strip()
            except OSError as err:
                raise ConfigError(
                    f"mqtt.password_file: cannot read {self.password_file}: {err.strerror}"
                ) from err
        return os.environ.get(PASSWORD_ENV)


class HomeAssistantSection(Section):
    enabled: bool = True
    discovery_prefix: ObjectName = "homeassistant"
    # Re-announce discovery this many seconds (at most, random) after HA's birth message.
    announce_jitter: float = Field(default=1.0, ge=0, le=60)
    diagnostics_interval: float = Field(default=60.0, ge=1, le=3600)  # how often diagnostic sensors update

    @property
    def status_topic(self) -> str:
        return f"{self.discovery_prefix}/status"


class TelemetryStream(Section):
    topic: str  # MQTT topic filter, wildcards allowed
    field: str | None = None  # dotted JSON path ("ENERGY.Power"); omit for plain-number payloads
    sensor: ObjectName
    name: str | None = None  # friendly name in Home Assistant; defaults to the sensor id
    unit: str | None = None  # unit_of_measurement for Home Assistant, e.g. "°C"
    device_class: str | None = None  # Home Assistant sensor device_class, e.g. "temperature"
    min: float | None = None  # readings below are rejected and counted
    max: float | None = None  # readings above are rejected and counted
    # Retained messages older than this (by their own timestamp, when they carry one) are ignored.
    max_age: float = Field(default=3600.0, gt=0)
    anomaly: bool = True  # score this stream with the anomaly detector
    on_anomaly: str | None = None  # an [actions.*] name fired when an anomaly starts

    @field_validator("topic")
    @classmethod
    def _topic_filter(cls, value: str) -> str:
        problem = topic_filter_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("field")
    @classmethod
    def _field_path(cls, value: str | None) -> str | None:
        from agent.payloads import split_path

        if value is not None:
            split_path(value)  # ValueError names the empty part
        return value

    @model_validator(mode="after")
    def _range(self) -> TelemetryStream:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


SWITCH_COMMANDS = ("on", "off", "toggle")
SETPOINT_COMMAND = "setpoint"
_SETPOINT_FIELDS = frozenset(
    {"value", "delta", "min_setpoint", "max_setpoint", "state_topic", "setpoint_key"})


def _check_topic(topic: str, what: str) -> None:
    problem = topic_name_problem(topic, what)
    if problem is not None:
        raise ValueError(problem)


class ActionBase(Section):
    """What every action has, whatever its profile (``ActionSection`` is one subclass per profile)."""

    qos: Literal[0, 1, 2] = 1
    confirm: bool = False  # voice: needs a spoken "yes" within voice.confirm_window
    ttl: float = Field(default=5.0, gt=0, le=3600)  # a voice action not sent within this is dropped
    min_interval: float = Field(default=1.0, ge=0)  # rate limit: at most one firing per interval


class _SetpointFields(ActionBase):
    """An action that can write a setpoint: clamped to [min_setpoint, max_setpoint], rounded to 0.5."""

    value: float | None = None  # absolute setpoint
    min_setpoint: float = 5.0
    max_setpoint: float = 30.0
    state_topic: str | None = None  # where the device reports its state (for the current setpoint)
    setpoint_key: str = "current_heating_setpoint"  # the setpoint's key in a JSON state (zigbee2mqtt)

    def _check_range(self) -> None:
        for name in ("min_setpoint", "max_setpoint", "value", "delta"):
            number = getattr(self, name, None)
            if number is not None and not math.isfinite(number):
                raise ValueError(f"{name} must be a finite number")
        if self.min_setpoint > self.max_setpoint:
            raise ValueError(f"min_setpoint ({self.min_setpoint:g}) is greater than "
                             f"max_setpoint ({self.max_setpoint:g})")
        if self.value is not None and not self.min_setpoint <= self.value <= self.max_setpoint:
            raise ValueError(f"value {self.value:g} is outside [min_setpoint, max_setpoint] = "
                             f"[{self.min_setpoint:g}, {self.max_setpoint:g}]")
        if self.state_topic is not None:
            _check_topic(self.state_topic, "state_topic")


class TemplateAction(_SetpointFields):
    """``topic`` + ``payload``, a safe template: every ``{{ expr }}`` is a setpoint (agent/template.py)."""

    profile: Literal["template"] = "template"
    topic: str  # where to publish
    payload: str  # e.g. '{"current_heating_setpoint": {{ setpoint + 1 }}}'

    @property
    def setpoint_state_topic(self) -> str | None:
        """Where ``{{ setpoint }}`` comes from: ``state_topic``, else (the zigbee2mqtt convention: a device
        commanded on <name>/set reports on <name>) ``topic`` without its ``/set``."""
        return self.state_topic or (self.topic.removesuffix("/set") if self.topic.endswith("/set") else None)

    @model_validator(mode="after")
    def _renderable(self) -> TemplateAction:
        _check_topic(self.topic, "topic")
        self._check_range()
        try:
            template = PayloadTemplate(self.payload)
            uses = template.variables
            if "setpoint" in uses and self.setpoint_state_topic is None:
                raise ValueError("payload uses {{ setpoint }}, so state_topic must say where the current "
                                 "setpoint comes from")
            if "setpoint" not in uses and self.state_topic is not None:
                raise ValueError("state_topic is only used when the payload contains {{ setpoint }}")
            if "value" in uses and self.value is None:
                raise ValueError("payload uses {{ value }} but no value is configured")
            if "value" not in uses and self.value is not None:
                raise ValueError("value is set but the payload never uses {{ value }}")
            check_renders_json(template, self.min_setpoint, self.max_setpoint)
        except ActionError as err:
            raise ValueError(str(err)) from err
        return self


class _DeviceAction(ActionBase):
    """A device profile: the agent writes the device's own command topic and payload."""

    device: str  # the device's name in its own MQTT world (z2m friendly name, Tasmota topic, ...)
    command: str | None = None  # "on" | "off" | "toggle" (| "setpoint"), any case

    @property
    def command_word(self) -> str:
        """The command, lower case; "setpoint" when omitted but a setpoint value or delta is set."""
        if self.command is not None:
            return self.command.strip().lower()
        implied = getattr(self, "value", None) is not None or getattr(self, "delta", None) is not None
        return SETPOINT_COMMAND if implied else ""

    def _check_device(self, choices: tuple[str, ...]) -> None:
        _check_topic(self.device, "device")
        prefix: str | None = getattr(self, "prefix", None)
        if prefix is not None:
            _check_topic(prefix, "prefix")
        if self.command is None and self.command_word not in choices:
            raise ValueError(f"needs command = {' | '.join(repr(c) for c in choices)}")
        if self.command_word not in choices:
            profile = getattr(self, "profile", "")
            raise ValueError(f"command {self.command!r} is not one of {', '.join(repr(c) for c in choices)} "
                             f"for profile = {profile!r}")


class TasmotaAction(_DeviceAction):
    """``cmnd/<device>/POWER`` with ON / OFF / TOGGLE."""

    profile: Literal["tasmota"]

    @model_validator(mode="after")
    def _renderable(self) -> TasmotaAction:
        self._check_device(SWITCH_COMMANDS)
        return self


class ShellyGen2Action(_DeviceAction):
    """A Shelly Gen2 RPC ``Switch.Set`` / ``Switch.Toggle`` on ``<prefix or device>/rpc``."""

    profile: Literal["shelly_gen2"]
    prefix: str | None = None  # the device's MQTT topic prefix, when not its name
    switch_id: int = Field(default=0, ge=0)  # Switch.Set id

    @model_validator(mode="after")
    def _renderable(self) -> ShellyGen2Action:
        self._check_device(SWITCH_COMMANDS)
        return self


class SetpointDeviceAction(_DeviceAction, _SetpointFields):
    delta: float | None = None  # relative setpoint change (needs the current setpoint)

    def _check_command(self, choices: tuple[str, ...]) -> None:
        self._check_device(choices)
        if self.command_word != SETPOINT_COMMAND:
            unused = sorted(self.model_fields_set & _SETPOINT_FIELDS)
            if unused:
                raise ValueError(f"{unused[0]!r} has no effect with command = {self.command_word!r} "
                                 f"(it only applies to command = 'setpoint')")
            return
        self._check_range()
        if (self.value is None) == (self.delta is None):
            raise ValueError("command = 'setpoint' needs exactly one of value (absolute) or delta (relative)")
        if self.delta == 0:
            raise ValueError("delta must not be 0")


class Zigbee2MqttAction(SetpointDeviceAction):
    """``<prefix>/<device>/set``: ``{"state": "ON"}`` or ``{"<setpoint_key>": 21.5}``."""

    profile: Literal["zigbee2mqtt"]
    prefix: str | None = None  # the zigbee2mqtt base topic, when not "zigbee2mqtt"

    @model_validator(mode="after")
    def _renderable(self) -> Zigbee2MqttAction:
        self._check_command((*SWITCH_COMMANDS, SETPOINT_COMMAND))
        return self


class EsphomeAction(SetpointDeviceAction):
    """``<prefix or device>/<entity_type>/<entity>/command``; a climate entity takes setpoints."""

    profile: Literal["esphome"]
    prefix: str | None = None  # the node's MQTT topic prefix, when not its name
    entity_type: Literal["switch", "light", "fan", "climate"] = "switch"
    entity: str  # the entity's object id, e.g. "ceiling_fan"

    @model_validator(mode="after")
    def _renderable(self) -> EsphomeAction:
        _check_topic(self.entity, "entity")
        if "/" in self.entity:
            raise ValueError(f"entity must be one topic level (no '/'): {self.entity!r}")
        climate = self.entity_type == "climate"
        self._check_command((SETPOINT_COMMAND,) if climate else SWITCH_COMMANDS)
        return self


_ACTION_MODELS: dict[str, type[ActionBase]] = {
    "template": TemplateAction, "zigbee2mqtt": Zigbee2MqttAction, "tasmota": TasmotaAction,
    "shelly_gen2": ShellyGen2Action, "esphome": EsphomeAction,
}
ACTION_PROFILES = tuple(_ACTION_MODELS)


def _action_profile(data: Any) -> Any:
    """The union's tag: ``profile``, "template" when the key is absent."""
    if isinstance(data, dict):
        return data.get("profile", "template")
    return getattr(data, "profile", None)


# A named action: a topic + payload template, or a device profile that renders both; one model per profile.
ActionSection = Annotated[
    Annotated[TemplateAction, Tag("template")]
    | Annotated[Zigbee2MqttAction, Tag("zigbee2mqtt")]
    | Annotated[TasmotaAction, Tag("tasmota")]
    | Annotated[ShellyGen2Action, Tag("shelly_gen2")]
    | Annotated[EsphomeAction, Tag("esphome")],
    Discriminator(_action_profile, custom_error_type="unknown_profile",
                  custom_error_message=f"must be one of {', '.join(map(repr, ACTION_PROFILES))}"),
]


def parse_action(fields: dict[str, Any]) -> ActionSection:
    """One ``[actions.*]`` table, validated (pydantic's ValidationError when invalid)."""
    return _ACTION_ADAPTER.validate_python(fields)


_ACTION_ADAPTER: TypeAdapter[ActionSection] = TypeAdapter(ActionSection)


class VoiceCommand(Section):
    say: str  # words from the model's labels, after the wake word, e.g. "heat up"
    action: str  # an [actions.*] name

    @field_validator("say")
    @classmethod
    def _words(cls, value: str) -> str:
        words = value.split()
        if not words:
            raise ValueError("must name at least one word")
        return " ".join(words)

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(self.say.split())


class VoiceSection(Section):
    enabled: bool = True  # listening also needs [[voice.commands]] or explicit enabled = true
    model: FilePath = Path("models/kws.tflite")  # relative paths: config dir, then the shipped models
    wake_word: str = "computer"
    wake_window: float = Field(default=3.0, gt=0, le=30)  # seconds after the wake word for a command
    thresholds: dict[str, float] = Field(default_factory=dict)  # per-word override of the model's own
    refractory: float | None = Field(default=None, ge=0, le=5)  # override of the model's refractory time
    confirm_window: float = Field(default=5.0, gt=0, le=30)  # seconds to say "yes" for confirm actions
    commands: list[VoiceCommand] = Field(default_factory=list)
    # ``home-agent enroll``: false wakes per hour of the built-in reference speech a household head may add
    # (its threshold is set to stay within it; an enrolment that cannot is refused).
    enroll_false_wake_budget: float = Field(default=0.0, ge=0, le=100)
    # Keep the audio around each wake word (2 s before it and the wake window after) in state_dir/captures,
    # so a false wake can be marked and unlearned (agent.capture). Off by default; captures never leave the
    # machine.
    capture: bool = False
    capture_max_files: int = Field(default=20, ge=1, le=1000)
    capture_max_mb: float = Field(default=10.0, gt=0, le=1000)

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, value: dict[str, float]) -> dict[str, float]:
        for word, threshold in value.items():
            if not 0.0 < threshold <= 1.0:
                raise ValueError(f"threshold for {word!r} must be in (0, 1], got {threshold}")
        return value

    @model_validator(mode="after")
    def _phrases(self) -> VoiceSection:
        """Problems the model's vocabulary cannot settle: the wake word inside a phrase (it would only ever
        open a new window) and one phrase twice (``say`` is whitespace-normalised, so "light  on" is
        "light on")."""
        problems: list[str] = []
        first: dict[str, int] = {}
        for index, command in enumerate(self.commands):
            if self.wake_word in command.words:
                problems.append(f"voice.commands.{index}.say: must not contain the wake word "
                                f"{self.wake_word!r}")
            if command.say in first:
                problems.append(f"voice.commands.{index}.say: phrase {command.say!r} is configured twice "
                                f"(also voice.commands.{first[command.say]})")
            first.setdefault(command.say, index)
        if problems:
            raise ValueError("\n".join(problems))
        return self


AudioSourceSpec = Annotated[str, Field(pattern=r"^(mic|stdin|file:.+)$")]


class AudioSection(Section):
    source: AudioSourceSpec = "mic"  # "mic" | "stdin" (raw S16_LE 16 kHz mono) | "file:PATH"
    device: str | int | None = None  # microphone by name substring or index; default input when omitted
    realtime: bool = True  # file source: play at real-time pace (False: as fast as possible)
    buffer_seconds: float = Field(default=2.0, gt=0, le=30)  # bounded audio buffer; oldest audio dropped
    retry_interval: float = Field(default=5.0, gt=0, le=300)  # wait between microphone reopen attempts


# Keys that older configs may still carry: accepted, ignored, warned about once per process.
# [anomaly] model: the int8 forecaster was retired in issue 15 (models/anomaly.md).
DEPRECATED_ANOMALY_KEYS = {"model": "the anomaly detector no longer uses a model file"}
_warned_deprecated: set[str] = set()


class AnomalyGroup(Section):
    """Streams of one device scored together as well as one by one (``agent/anomaly/group.py``)."""

    name: ObjectName  # the device: its alerts are published on <base>/anomaly/<name>
    sensors: list[ObjectName] = Field(min_length=2)  # telemetry sensor ids (each scored: anomaly = true)
    on_anomaly: str | None = None  # an [actions.*] name fired when the device's alert starts

    @field_validator("sensors")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        repeated = sorted({s for s in value if value.count(s) > 1})
        if repeated:
            raise ValueError(f"a sensor is listed twice: {', '.join(repeated)}")
        return value


class AnomalySection(Section):
    enabled: bool = True
    # Device groups: the streams of one device also raise one alert for the device when their evidence
    # together is improbable (agent/anomaly/group.py). ``device_groups``: the telemetry streams reading fields
    # of one MQTT topic without wildcards (a zigbee2mqtt device's JSON, a Tasmota SENSOR message) form a group
    # named after their topic (on since session 8: models/anomaly.md has the rule it passed); ``groups``:
    # explicit ones.
    device_groups: bool = True
    groups: list[AnomalyGroup] = Field(default_factory=list)
    # The thresholds apply to the detector's evidence (its posterior at a 2 % prior), not to the published,
    # calibrated score (agent/anomaly/detector.py CALIBRATION maps one to the other).
    threshold: float = Field(default=0.99, gt=0, le=1)  # evidence at which an anomaly starts
    clear_threshold: float = Field(default=0.9, gt=0, le=1)  # hysteresis: the anomaly ends below this
    cooldown: float = Field(default=3600.0, ge=0)  # quiet period after an episode (seconds)
    # readings per stream before any alert; a stream sampled faster than every 13.5 s learns for a third of
    # them (agent/anomaly/detector.py learning_period)
    learning_readings: int = Field(default=300, ge=10)
    save_interval: float = Field(default=300.0, gt=0)  # how often per-stream state is saved
    publish_interval: float = Field(default=60.0, ge=0)  # seconds between a stream's scores (alerts: at once)

    @model_validator(mode="before")
    @classmethod
    def _drop_deprecated(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        kept = dict(data)
        for key, why in DEPRECATED_ANOMALY_KEYS.items():
            if kept.pop(key, None) is not None and key not in _warned_deprecated:
                _warned_deprecated.add(key)
                log.warning("config: anomaly.%s is deprecated and ignored (%s); remove it from the file",
                            key, why)
        return kept

    @model_validator(mode="after")
    def _hysteresis(self) -> AnomalySection:
        if self.clear_threshold > self.threshold:
            raise ValueError("clear_threshold must not exceed threshold")
        return self


class OutboxSection(Section):
    max_messages: int = Field(default=10_000, ge=10, le=10_000_000)  # oldest dropped (and counted) past it


class ServiceSection(Section):
    # READY=1 is sent once the first MQTT connection succeeds, or after this grace period.
    # At most 100 s: the unit's TimeoutStartSec=120 must not kill a start that is still waiting.
    ready_grace: float = Field(default=15.0, ge=0, le=100)
    stop_timeout: float = Field(default=4.0, gt=0, le=60)  # seconds to flush and say "offline" on SIGTERM


class ArbitrationSection(Section):
    """Agents of one group decide together which of them acts on an utterance they all heard."""

    group: ObjectName  # agents sharing this name arbitrate on <topic_prefix>/arbitration/<group>
    window: float = Field(default=0.15, gt=0, le=2)  # seconds to collect the group's claims
    # Claims whose utterances ended (on each agent's own audio clock) this close together are one utterance.
    match_tolerance: float = Field(default=1.0, gt=0, le=5)


class Config(Section):
    agent: AgentSection
    mqtt: MqttSection
    homeassistant: HomeAssistantSection = Field(default_factory=HomeAssistantSection)
    telemetry: list[TelemetryStream] = Field(default_factory=list)
    actions: dict[ObjectName, ActionSection] = Field(default_factory=dict)
    voice: VoiceSection = Field(default_factory=VoiceSection)
    audio: AudioSection = Field(default_factory=AudioSection)
    anomaly: AnomalySection = Field(default_factory=AnomalySection)
    outbox: OutboxSection = Field(default_factory=OutboxSection)
    service: ServiceSection = Field(default_factory=ServiceSection)
    arbitration: ArbitrationSection | None = None  # on when the table is present

    # Not part of the file: where it came from (for resolving relative paths and error messages).
    source_path: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _references(self) -> Config:
        sensors = [stream.sensor for stream in self.telemetry]
        duplicates = sorted({s for s in sensors if sensors.count(s) > 1})
        if duplicates:
            raise ValueError(f"telemetry: sensor ids must be unique, repeated: {', '.join(duplicates)}")
        for index, command in enumerate(self.voice.commands):
            if command.action not in self.actions:
                raise ValueError(
                    f"voice.commands.{index}.action: no [actions.{command.action}] is configured"
                )
        for index, stream in enumerate(self.telemetry):
            if stream.on_anomaly is not None and stream.on_anomaly not in self.actions:
                raise ValueError(
                    f"telemetry.{index}.on_anomaly: no [actions.{stream.on_anomaly}] is configured"
                )
        self._check_groups(set(sensors))
        return self

    def _check_groups(self, sensors: set[str]) -> None:
        scored = {stream.sensor for stream in self.telemetry if stream.anomaly}
        member_of: dict[str, str] = {}
        names: set[str] = set()
        for index, group in enumerate(self.anomaly.groups):
            where = f"anomaly.groups.{index}"
            if group.name in names:
                raise ValueError(f"{where}.name: the group {group.name!r} is defined twice")
            if group.name in sensors:
                raise ValueError(f"{where}.name: {group.name!r} is a telemetry sensor id (they share the "
                                 "anomaly topics); pick another name")
            names.add(group.name)
            for sensor in group.sensors:
                if sensor not in sensors:
                    raise ValueError(f"{where}.sensors: no telemetry stream has the sensor id {sensor!r}")
                if sensor not in scored:
                    raise ValueError(f"{where}.sensors: {sensor!r} has anomaly = false (not scored)")
                if sensor in member_of:
                    raise ValueError(f"{where}.sensors: {sensor!r} is already in the group "
                                     f"{member_of[sensor]!r}; a stream belongs to one group")
                member_of[sensor] = group.name
            if group.on_anomaly is not None and group.on_anomaly not in self.actions:
                raise ValueError(f"{where}.on_anomaly: no [actions.{group.on_anomaly}] is configured")

    @property
    def base_topic(self) -> str:
        return f"{self.mqtt.topic_prefix}/{self.agent.id}"

    @property
    def voice_active(self) -> bool:
        return self.voice.enabled and bool(self.voice.commands)

    @property
    def anomaly_active(self) -> bool:
        """The anomaly stage runs: detection is on and at least one stream is scored."""
        return self.anomaly.enabled and any(stream.anomaly for stream in self.telemetry)

    def resolve_path(self, path: Path) -> Path:
        """Resolve a configured file path: absolute, relative to the config file, or a shipped model."""
        from agent.paths import resolve_data_path

        return resolve_data_path(path, self.source_path.parent if self.source_path else None)


_SUFFIXES = re.compile(r", (unable to parse string as an? \w+|invalid number|input is not .*)$")


_KEYED = re.compile(r"^[A-Za-z_][\w.-]*: ")


# Why a key a profile does not have may have been written (the error names the key and the profile).
_MISPLACED_HINTS = {
    "topic": "topic and payload are for profile = 'template'",
    "payload": "topic and payload are for profile = 'template'",
    "delta": "write the change into the payload, e.g. {{ setpoint + 1 }}",
}


def _action_error(error: Any) -> tuple[tuple[Any, ...], str | None]:
    """An error inside an ``[actions.*]`` table: its location without the union's profile tag
    (``actions.x.tasmota.value`` is ``actions.x.value``), and a message naming the profile for keys
    the profile lacks or needs."""
    loc = tuple(error.get("loc", ()))
    if error.get("type") == "unknown_profile":
        data = error.get("input")
        if not isinstance(data, dict):
            got = json.dumps(data) if isinstance(data, (str, int, float, bool)) else type(data).__name__
            return loc, f"must be a table of the action's keys, got {got}"
        return (*loc, "profile"), f"{error['msg']}, got {json.dumps(str(data.get('profile')))}"
    if len(loc) < 3 or loc[0] != "actions" or loc[2] not in ACTION_PROFILES:
        return loc, None
    profile, loc = loc[2], (*loc[:2], *loc[3:])
    if error.get("type") == "extra_forbidden":
        hint = _MISPLACED_HINTS.get(str(loc[-1]))
        return loc, f"has no effect with profile = {profile!r}" + (f" ({hint})" if hint else "")
    if error.get("type") == "missing":
        return loc, f"required with profile = {profile!r}"
    return loc, None


def _format_error(error: Any, source: str) -> list[str]:
    """One line per problem, each naming its key. A validator that names keys itself (a check across
    entries, such as voice.commands.3.say) keeps them rather than being prefixed with its section."""
    parts, action_message = _action_error(error)
    loc = ".".join(str(part) for part in parts) or "(top level)"
    if action_message is not None:
        return [f"{loc}: {action_message} ({source})"]
    message = _SUFFIXES.sub("", str(error.get("msg", "invalid")))
    message = message.removeprefix("Value error, ")
    got = ""
    if error.get("type") not in {"missing", "model_type"} and "input" in error:
        value = error["input"]
        if isinstance(value, (str, int, float, bool)) or value is None:
            got = f", got {json.dumps(value)}"
    lines = message.split("\n")
    if all(_KEYED.match(line) for line in lines):
        return [f"{line} ({source})" for line in lines]
    return [f"{loc}: {message}{got} ({source})"]


def parse_config(data: dict[str, Any], source: str = "<config>", source_path: Path | None = None) -> Config:
    """Validate a parsed TOML document. Raises ConfigError with one line per problem."""
    try:
        config = Config.model_validate(data)
    except ValidationError as err:
        lines = [line for e in err.errors(include_url=False) for line in _format_error(e, source)]
        raise ConfigError("\n".join(lines)) from err
    return config.model_copy(update={"source_path": source_path})


def load_config(path: Path | str) -> Config:
    """Read and validate a TOML config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ConfigError(f"config file not found: {path}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"invalid TOML: {err} ({path.name})") from err
    return parse_config(data, source=path.name, source_path=path.resolve())
