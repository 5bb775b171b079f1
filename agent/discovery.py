"""Home Assistant MQTT discovery: the config payloads, as pure functions of the config.

One device per agent, announced with per-entity discovery topics
``<prefix>/<component>/<agent id>/<object>/config`` (every HA release since 2022 understands them). The
caller publishes every payload retained with QoS 1, re-publishes them when ``<prefix>/status`` says
``online``, and clears configs it finds under ``discovery_topic_filter`` that are no longer produced here
(``stale_discovery_topics``) with an empty retained payload. Whether to announce at all
(``homeassistant.enabled``) is the caller's decision.

Rules Home Assistant enforces silently (see ../shared/tools/ha/README.txt), kept here:
every entity has a ``unique_id`` (else it does not join the device); an event entity needs non-empty
``event_types``; payloads are case-sensitive exact matches ("ON", "online"); sensors with a
``state_class`` get numbers only (value templates pick numeric JSON keys); entity names do not repeat
the device name (HA prefixes it itself).

What the agent must publish on the state topics these payloads point to:

- ``Topics.availability``: ``online`` / ``offline`` (retained; last will);
- ``Topics.diagnostics``: a JSON object with the numeric keys ``DIAGNOSTIC_KEYS``
  (``uptime`` in seconds, ``messages_in``, ``messages_out``, ``dropped``, ``bad_payloads``,
  ``readings_rejected``, ``reload_failures``; with ``[arbitration]`` also ``arbitrations_won`` and
  ``arbitrations_lost``) and the text ``config_status`` (``ok`` or why the last reload was rejected);
- ``Topics.sensor_state(sensor)``: the last accepted reading as a plain number;
- ``Topics.mute_state``: ``ON`` / ``OFF`` (retained); commands arrive on ``Topics.mute_set``;
- with ``[voice] capture``: the button "Last wake was false" sends ``PRESS_PAYLOAD`` to
  ``Topics.last_wake_false`` (a command topic only; a button has no state);
- ``Topics.event``: ``{"event_type": <one of event_types>, ...}``, never retained;
- ``Topics.anomaly(sensor)``: JSON with ``active`` (bool) and ``score`` (number), plus anything else
  (shown as attributes); the same for a device group (``Topics.anomaly(group)``, with ``streams``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from agent.anomaly.group import device_groups
from agent.config import Config, TelemetryStream
from agent.errors import ConfigError
from agent.topics import Topics, topic_matches

ORIGIN_NAME = "home-agent"
# Where HA's device page links ("origin" support URL). Placeholder until the project has a public home.
PROJECT_URL = "https://github.com/home-agent/home-agent"
MANUFACTURER = "home-agent"
MODEL = "home-agent voice and sensor agent"
PAYLOAD_ON = "ON"
PAYLOAD_OFF = "OFF"
AVAILABLE = "online"
NOT_AVAILABLE = "offline"
COMPONENTS = ("sensor", "binary_sensor", "switch", "event", "button")
PRESS_PAYLOAD = "PRESS"

# (key in the diagnostics JSON = object id, entity name, extra discovery fields)
DIAGNOSTIC_SENSORS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("uptime", "Uptime",
     {"unit_of_measurement": "s", "device_class": "duration", "state_class": "measurement"}),
    ("messages_in", "Messages in", {"state_class": "total_increasing", "icon": "mdi:message-arrow-left"}),
    ("messages_out", "Messages out", {"state_class": "total_increasing", "icon": "mdi:message-arrow-right"}),
    ("dropped", "Dropped messages", {"state_class": "total_increasing", "icon": "mdi:message-alert"}),
    ("bad_payloads", "Bad payloads", {"state_class": "total_increasing", "icon": "mdi:alert-circle-outline"}),
    ("readings_rejected", "Rejected readings",
     {"state_class": "total_increasing", "icon": "mdi:thermometer-alert"}),
    ("reload_failures", "Rejected config reloads",
     {"state_class": "total_increasing", "icon": "mdi:file-alert"}),
)
DIAGNOSTIC_KEYS = tuple(key for key, _, _ in DIAGNOSTIC_SENSORS)
# Text diagnostics (no state_class): "ok", or why the last reload was rejected.
CONFIG_STATUS_KEY = "config_status"
DIAGNOSTIC_TEXT_SENSORS: tuple[tuple[str, str, dict[str, str]], ...] = (
    (CONFIG_STATUS_KEY, "Configuration", {"icon": "mdi:file-cog"}),
)
# With [arbitration]: how often this agent acted on an utterance the group heard, and how often another did.
ARBITRATION_SENSORS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("arbitrations_won", "Arbitrations won", {"state_class": "total_increasing", "icon": "mdi:trophy"}),
    ("arbitrations_lost", "Arbitrations lost",
     {"state_class": "total_increasing", "icon": "mdi:account-voice-off"}),
)
# With the voice stage: what it heard and what the audio source lost (it could not keep up).
VOICE_SENSORS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("intents", "Voice intents", {"state_class": "total_increasing", "icon": "mdi:account-voice"}),
    ("dropped_samples", "Dropped audio samples",
     {"state_class": "total_increasing", "icon": "mdi:microphone-question"}),
)
# With the anomaly stage: readings scored and alerts started.
ANOMALY_SENSORS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("anomaly_readings", "Readings scored",
     {"state_class": "total_increasing", "icon": "mdi:chart-bell-curve"}),
    ("anomaly_alerts", "Anomaly alerts", {"state_class": "total_increasing", "icon": "mdi:alert"}),
)
MUTE_OBJECT = "mute"
FALSE_WAKE_OBJECT = "last_wake_false"
EVENT_OBJECT = "voice_intent"
# Per-stream objects get a prefix per kind; built-in objects use none of these prefixes, and sensor ids
# are unique, so no two entities can share an object id (and thus a unique_id).
SENSOR_PREFIX = "sensor_"
ANOMALY_PREFIX = "anomaly_"
SCORE_PREFIX = "score_"
# Meter readings only grow; Home Assistant warns about them with state_class "measurement".
_TOTAL_DEVICE_CLASSES = frozenset({"energy", "gas", "water"})


def unique_id(config: Config, object_id: str) -> str:
    return f"home_agent_{config.agent.id}_{object_id}"


def discovery_topic_filter(config: Config) -> str:
    """Matches every discovery config this agent may ever have published (to find and clear stale ones)."""
    return f"{config.homeassistant.discovery_prefix}/+/{config.agent.id}/+/config"


def stale_discovery_topics(
    config: Config, retained_topics: Iterable[str], current: Mapping[str, object]
) -> list[str]:
    """Retained discovery topics of this agent that the current config no longer produces; publish an empty
    retained payload to each to remove the entity from Home Assistant."""
    topic_filter = discovery_topic_filter(config)
    return sorted({t for t in retained_topics if topic_matches(topic_filter, t) and t not in current})


def _entity_name(label: str, device_name: str, fallback: str) -> str:
    """``label`` without a leading device name: HA prefixes the device name itself."""
    if device_name and label.casefold().startswith(device_name.casefold()):
        rest = label[len(device_name):].strip(" -_:")
        return rest or fallback
    return label


def _state_class(stream: TelemetryStream) -> str:
    return "total_increasing" if stream.device_class in _TOTAL_DEVICE_CLASSES else "measurement"


def discovery_messages(
    config: Config, *, event_types: Sequence[str], sw_version: str
) -> dict[str, dict[str, Any]]:
    """Discovery topic -> config payload for every entity of this agent.

    ``event_types``: the configured voice action names; the event entity exists only when it is non-empty.
    """
    topics = Topics.from_config(config)
    agent_id = config.agent.id
    device_name = config.agent.display_name
    device = {"ids": [f"home_agent_{agent_id}"], "name": device_name, "mdl": MODEL, "sw": sw_version,
              "mf": MANUFACTURER}
    origin = {"name": ORIGIN_NAME, "sw": sw_version, "url": PROJECT_URL}
    messages: dict[str, dict[str, Any]] = {}

    def add(component: str, object_id: str, name: str, fields: Mapping[str, Any]) -> None:
        topic = topics.discovery_config(component, object_id, agent_id)
        if topic in messages:  # unreachable with the prefixes above; guards against future edits
            raise ConfigError(f"two Home Assistant entities would share the object id {object_id!r}")
        messages[topic] = {
            "name": name,
            "unique_id": unique_id(config, object_id),
            **fields,
            "availability_topic": topics.availability,
            "payload_available": AVAILABLE,
            "payload_not_available": NOT_AVAILABLE,
            "dev": device,
            "o": origin,
        }

    for key, name, extra in (*DIAGNOSTIC_SENSORS, *DIAGNOSTIC_TEXT_SENSORS,
                             *(ARBITRATION_SENSORS if config.arbitration else ()),
                             *(VOICE_SENSORS if config.voice_active else ()),
                             *(ANOMALY_SENSORS if config.anomaly_active else ())):
        add("sensor", key, name, {
            "state_topic": topics.diagnostics,
            "value_template": f"{{{{ value_json.{key} }}}}",
            "entity_category": "diagnostic",
            **extra,
        })

    add("switch", MUTE_OBJECT, "Mute listening", {
        "command_topic": topics.mute_set,
        "state_topic": topics.mute_state,
        "payload_on": PAYLOAD_ON,
        "payload_off": PAYLOAD_OFF,
        "icon": "mdi:microphone-off",
    })

    if config.voice_active and config.voice.capture:
        add("button", FALSE_WAKE_OBJECT, "Last wake was false", {
            "command_topic": topics.last_wake_false,
            "payload_press": PRESS_PAYLOAD,
            "icon": "mdi:account-voice-off",
        })

    types = [event_type for event_type in dict.fromkeys(event_types) if event_type]
    if types:
        add("event", EVENT_OBJECT, "Voice intent", {
            "state_topic": topics.event,
            "event_types": types,
            "icon": "mdi:account-voice",
        })

    def problem(state_topic: str) -> dict[str, Any]:
        """A binary sensor of an anomaly topic: on while its alert lasts, the payload's keys as attributes."""
        return {
            "state_topic": state_topic,
            "value_template": "{{ 'ON' if value_json.active else 'OFF' }}",
            "payload_on": PAYLOAD_ON,
            "payload_off": PAYLOAD_OFF,
            "device_class": "problem",
            "json_attributes_topic": state_topic,
        }

    for stream in config.telemetry:
        label = _entity_name(stream.name or stream.sensor, device_name, stream.sensor)
        sensor_fields: dict[str, Any] = {"state_topic": topics.sensor_state(stream.sensor)}
        if stream.unit is not None:
            sensor_fields["unit_of_measurement"] = stream.unit
        if stream.device_class is not None:
            sensor_fields["device_class"] = stream.device_class
        sensor_fields["state_class"] = _state_class(stream)
        add("sensor", SENSOR_PREFIX + stream.sensor, label, sensor_fields)

        if not (stream.anomaly and config.anomaly.enabled):
            continue
        anomaly_topic = topics.anomaly(stream.sensor)
        add("binary_sensor", ANOMALY_PREFIX + stream.sensor, f"{label} anomaly", problem(anomaly_topic))
        add("sensor", SCORE_PREFIX + stream.sensor, f"{label} anomaly score", {
            "state_topic": anomaly_topic,
            "value_template": "{{ value_json.score }}",
            "state_class": "measurement",
            "icon": "mdi:chart-bell-curve",
        })

    # A device group's alert (its own topic; "streams" names the members that moved, an attribute). No score
    # entity: a device's topic carries its alert starting and ending, not a running score.
    if config.anomaly_active:
        for group in device_groups(config):
            label = _entity_name(group, device_name, group)
            add("binary_sensor", ANOMALY_PREFIX + group, f"{label} device anomaly",
                problem(topics.anomaly(group)))
    return messages
