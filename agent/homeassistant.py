"""Home Assistant: discovery, the mute switch and state republishing, as one small stage.

On every connect it announces the discovery configs (retained) and republishes the states HA shows (mute
switch, sensor values, diagnostics), then removes retained configs of ours the current config no longer
has. It re-announces when HA comes online again (birth message, with jitter), publishes the diagnostics
every ``homeassistant.diagnostics_interval`` and keeps the mute switch (persisted in the state store).
Handlers run on paho's thread and only schedule work onto the main thread (``call_soon``).
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable, Mapping
from typing import Any

from agent import __version__
from agent.actions import parse_switch_command
from agent.config import Config
from agent.counts import Counts
from agent.discovery import discovery_messages, discovery_topic_filter, stale_discovery_topics
from agent.errors import StateError
from agent.messages import InboundMessage
from agent.ports import Publisher, Scheduler, Subscriber
from agent.state import StateStore
from agent.topics import Topics

log = logging.getLogger(__name__)

STALE_SCAN_DELAY = 1.0  # after connecting, collect retained discovery configs this long before cleaning up
MUTE_KEY = "muted"


class HomeAssistantStage:
    """Discovery, the mute switch and the states Home Assistant shows."""

    name = "homeassistant"

    def __init__(self, config: Config, state: StateStore, *, publish: Publisher, subscribe: Subscriber,
                 call_later: Scheduler, counters: Callable[[], Mapping[str, Any]],
                 sensor_values: Callable[[], Mapping[str, str]], connected: Callable[[], bool]) -> None:
        self.config = config
        self.topics = Topics.from_config(config)
        self.state = state
        self._publish = publish
        self._call_later = call_later
        self._counters = counters
        self._sensor_values = sensor_values
        self._connected = connected
        self._counts = Counts("announcements", "stale_configs_removed")
        self._muted = self._load_muted()
        # Discovery bookkeeping: what we announced, and retained configs of ours seen on the broker.
        self._discovery_lock = threading.Lock()
        self._announced: set[str] = set()
        self._seen_configs: set[str] = set()
        subscribe(self.topics.mute_set, self._on_mute_set, 1)
        if config.homeassistant.enabled:
            subscribe(self.topics.ha_status, self._on_ha_status, 0)
        subscribe(discovery_topic_filter(config), self._on_discovery_config, 0)

    @property
    def muted(self) -> bool:
        return self._muted

    def is_muted(self) -> bool:
        return self._muted

    def counters(self) -> dict[str, Any]:
        return {**self._counts.snapshot(), "muted": self._muted}

    # ----------------------------------------------------------------- stage

    def start(self) -> None:
        self._call_later(self.config.homeassistant.diagnostics_interval, self._diagnostics_timer)

    def stop(self) -> None:
        """Nothing to stop: the supervisor's timers end with its loop."""

    def healthy(self, _now: float) -> bool:
        return True

    def on_connected(self) -> None:
        """After every (re)connect, on the main thread."""
        self._announce()
        self._call_later(STALE_SCAN_DELAY, self._remove_stale_configs)

    def publish_diagnostics(self) -> None:
        payload = json.dumps(self._counters(), separators=(",", ":"), sort_keys=True)
        self._publish(self.topics.diagnostics, payload, retain=True)

    def prepare_reload(self, new: Config) -> Callable[[], None]:
        def apply() -> None:
            old_announced = set(self._announced)
            self.config = new
            if self._connected():
                self._announce()
                with self._discovery_lock:
                    self._seen_configs |= old_announced
                self._remove_stale_configs()

        return apply

    # ----------------------------------------------------------------- discovery

    def _event_types(self) -> list[str]:
        """The voice intent event entity's types: the actions voice commands can fire (none: no entity)."""
        if not self.config.voice_active:
            return []
        return sorted({command.action for command in self.config.voice.commands})

    def _announce(self) -> None:
        """Publish every discovery config (retained), then the current states HA should show."""
        if self.config.homeassistant.enabled:
            messages = discovery_messages(self.config, event_types=self._event_types(),
                                          sw_version=__version__)
        else:
            messages = {}
        for topic, payload in messages.items():
            self._publish(topic, json.dumps(payload, separators=(",", ":")), qos=1, retain=True)
        with self._discovery_lock:
            self._announced = set(messages)
        self._counts.add("announcements")
        self._publish_states()

    def _remove_stale_configs(self) -> None:
        """Delete (empty retained payload) our discovery configs the current config no longer has."""
        with self._discovery_lock:
            stale = stale_discovery_topics(self.config, self._seen_configs, dict.fromkeys(self._announced))
            self._seen_configs -= set(stale)
        for topic in stale:
            log.info("removing stale Home Assistant entity config %s", topic)
            self._publish(topic, b"", qos=1, retain=True)
        if stale:
            self._counts.add("stale_configs_removed", len(stale))

    def _publish_states(self) -> None:
        self._publish(self.topics.mute_state, b"ON" if self._muted else b"OFF", qos=1, retain=True)
        for sensor, value in self._sensor_values().items():
            self._publish(self.topics.sensor_state(sensor), value, retain=True)
        self.publish_diagnostics()

    def _diagnostics_timer(self) -> None:
        try:
            self.publish_diagnostics()
        finally:
            self._call_later(self.config.homeassistant.diagnostics_interval, self._diagnostics_timer)

    # ----------------------------------------------------------------- mute switch

    def _load_muted(self) -> bool:
        value = self.state.get(MUTE_KEY, False)
        if not isinstance(value, bool):
            log.error("ignoring invalid %r in %s: %r (expected true/false)", MUTE_KEY, self.state.path, value)
            return False
        return value

    def _set_muted(self, muted: bool) -> None:
        changed = muted != self._muted
        self._muted = muted
        if changed:
            log.info("listening %s", "muted" if muted else "unmuted")
            try:
                self.state.set(MUTE_KEY, muted)
            except StateError as err:
                log.error("mute switch: %s (the new state holds until the daemon restarts)", err)
        self._publish(self.topics.mute_state, b"ON" if muted else b"OFF", qos=1, retain=True)

    # The handlers below run on paho's thread: parse, hand over, return. PayloadError -> bad_payloads.

    def _on_mute_set(self, message: InboundMessage) -> None:
        muted = parse_switch_command(message.payload)  # PayloadError unless exactly ON or OFF
        self._call_later(0.0, lambda: self._set_muted(muted))

    def _on_ha_status(self, message: InboundMessage) -> None:
        if message.payload == b"online":
            delay = random.uniform(0.0, self.config.homeassistant.announce_jitter)
            log.info("Home Assistant is online: re-announcing in %.2f s", delay)
            self._call_later(delay, self._announce)

    def _on_discovery_config(self, message: InboundMessage) -> None:
        with self._discovery_lock:
            if not message.payload:
                self._seen_configs.discard(message.topic)
            elif message.retained:
                self._seen_configs.add(message.topic)
