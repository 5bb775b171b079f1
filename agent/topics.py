"""Every MQTT topic the agent itself uses, derived from the config in one place."""

from __future__ import annotations

from dataclasses import dataclass

from agent.config import Config

AVAILABILITY = "availability"


@dataclass(frozen=True, slots=True)
class Topics:
    base: str  # <topic_prefix>/<agent id>
    discovery_prefix: str
    # <topic_prefix>/arbitration/<group>/claims: the [arbitration] group's claims, when on (never retained)
    arbitration: str | None = None

    @classmethod
    def from_config(cls, config: Config) -> Topics:
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
