"""MQTT topics: their grammar (validity of topics and filters, matching, the size limit) and every topic the
agent itself uses, derived from the config in one place.

Imports nothing of the agent, so the config schema can check topics with the same rules the link and the
intake use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

AVAILABILITY = "availability"
MAX_TOPIC_BYTES = 65535  # MQTT: a topic is a UTF-8 string with a two-byte length


def _too_long(topic: str) -> bool:
    return len(topic.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES


def topic_filter_problem(topic_filter: str) -> str | None:
    """Why ``topic_filter`` is not a valid MQTT subscription filter, or None when it is."""
    if not topic_filter:
        return "topic filter is empty"
    if _too_long(topic_filter):
        return f"topic filter is longer than {MAX_TOPIC_BYTES} bytes"
    if "\x00" in topic_filter:
        return "topic filter contains a NUL character"
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return "'#' must be a whole level at the end of the filter"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


def topic_name_problem(topic: str, what: str = "topic") -> str | None:
    """Why ``topic`` (or a part of one, named ``what`` in the message) cannot be published to, or None.
    Broker-reserved ``$`` topics are refused too: the agent never commands the broker."""
    if not topic:
        return f"{what} is empty"
    if "+" in topic or "#" in topic:
        return f"{what} must not contain MQTT wildcards ('+', '#'): {topic!r}"
    if "\x00" in topic:
        return f"{what} contains a NUL character"
    if topic.startswith("$"):
        return f"{what} must not start with '$' (broker-reserved): {topic!r}"
    if _too_long(topic):
        return f"{what} is longer than {MAX_TOPIC_BYTES} bytes"
    return None


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches the subscription ``topic_filter`` (MQTT 3.1.1 / 5 semantics).

    ``+`` matches exactly one level (also an empty one), ``#`` matches the rest including the parent level
    (``a/#`` matches ``a``). Wildcards at the first level do not match topics starting with ``$``.
    Invalid filters and topics containing wildcards match nothing.
    """
    if not topic or "+" in topic or "#" in topic or topic_filter_problem(topic_filter) is not None:
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    if topic.startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)


# The parts of ``agent.config.Config`` the agent's topics derive from. A protocol, so that this module
# imports nothing and the config can use the grammar above.
class _MqttNaming(Protocol):
    @property
    def topic_prefix(self) -> str: ...


class _HomeAssistantNaming(Protocol):
    @property
    def discovery_prefix(self) -> str: ...


class _GroupNaming(Protocol):
    @property
    def group(self) -> str: ...


class TopicNaming(Protocol):
    @property
    def base_topic(self) -> str: ...

    @property
    def mqtt(self) -> _MqttNaming: ...

    @property
    def homeassistant(self) -> _HomeAssistantNaming: ...

    @property
    def arbitration(self) -> _GroupNaming | None: ...


@dataclass(frozen=True, slots=True)
class Topics:
    base: str  # <topic_prefix>/<agent id>
    discovery_prefix: str
    # <topic_prefix>/arbitration/<group>/claims: the [arbitration] group's claims, when on (never retained)
    arbitration: str | None = None

    @classmethod
    def from_config(cls, config: TopicNaming) -> Topics:
        group = config.arbitration.group if config.arbitration is not None else None
        arbitration = f"{config.mqtt.topic_prefix}/arbitration/{group}/claims" if group else None
        return cls(base=config.base_topic, discovery_prefix=config.homeassistant.discovery_prefix,
                   arbitration=arbitration)

    @property
    def availability(self) -> str:
        return f"{self.base}/{AVAILABILITY}"  # "online" / "offline" (retained, last will)

    @property
    def peers_availability(self) -> str:
        """Every agent's availability under our prefix: the level before the last is the agent id."""
        return f"{self.base.rsplit('/', 1)[0]}/+/{AVAILABILITY}"

    @property
    def instance(self) -> str:
        return f"{self.base}/instance"  # the running agent's claim: {nonce, host, pid, started}, retained

    @property
    def instance_ping(self) -> str:
        return f"{self.base}/instance/ping"  # a starting agent asks the claimant whether it is alive

    @property
    def diagnostics(self) -> str:
        return f"{self.base}/diagnostics"  # JSON counters, retained

    @property
    def intent(self) -> str:
        return f"{self.base}/intent"  # JSON per recognised intent, never retained

    @property
    def event(self) -> str:
        return f"{self.base}/event"  # HA event entity state: {"event_type": <action>, ...}, never retained

    @property
    def mute_state(self) -> str:
        return f"{self.base}/mute/state"  # "ON" / "OFF", retained

    @property
    def mute_set(self) -> str:
        return f"{self.base}/mute/set"  # HA switch command topic: "ON" / "OFF"

    @property
    def last_wake_false(self) -> str:
        return f"{self.base}/voice/last_wake_false"  # HA button command topic: "PRESS" ([voice] capture)

    @property
    def ha_status(self) -> str:
        return f"{self.discovery_prefix}/status"  # HA birth / last will: "online" / "offline"

    def sensor_state(self, sensor: str) -> str:
        return f"{self.base}/sensor/{sensor}/state"  # last accepted reading, retained

    def anomaly(self, sensor: str) -> str:
        return f"{self.base}/anomaly/{sensor}"  # JSON {score, value, kind, time, active, id}, retained

    def discovery_config(self, component: str, object_id: str, node_id: str) -> str:
        return f"{self.discovery_prefix}/{component}/{node_id}/{object_id}/config"

    @staticmethod
    def hermes_intent(action: str) -> str:
        return f"hermes/intent/{action}"  # Rhasspy/Node-RED compatible intent, never retained

    def is_own(self, topic: str) -> bool:
        """Topics the agent may publish besides configured action topics (the allow-list's fixed part)."""
        return (
            topic.startswith(self.base + "/")
            or topic.startswith(self.discovery_prefix + "/")
            or topic.startswith("hermes/intent/")
            or topic == self.arbitration
        )
