"""Outgoing commands and events: named actions (voice, anomaly, Home Assistant) and anomaly events.

``ActionDispatcher.request_action`` renders a named action through the action table and queues its
commands, never retained; ``AnomalyPublisher.publish_anomaly`` sends anomaly events, the alert changes
through the outbox. Both are handed the link's callables by ``agent.wiring``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from agent.actions import ActionTable
from agent.config import Config
from agent.counts import Counts
from agent.errors import ActionError
from agent.messages import ActionRequest, AnomalyEvent, InboundMessage
from agent.ports import Publisher, Resubscriber
from agent.topics import Topics

log = logging.getLogger(__name__)


class ActionDispatcher:
    """Fires named actions and keeps the action table's device state (current setpoints) up to date."""

    def __init__(self, config: Config, table: ActionTable, *, publish: Publisher, resubscribe: Resubscriber,
                 allow_topics: Callable[[Iterable[str]], None], is_muted: Callable[[], bool]) -> None:
        self.config = config
        self._actions = table
        self._publish = publish
        self._resubscribe = resubscribe
        self._allow_topics = allow_topics
        self._is_muted = is_muted
        self._actions_lock = threading.Lock()
        self._counts = Counts("actions_sent", "actions_rejected")
        self._action_subscriptions: list[Any] = []
        self._subscribe_action_states()

    def request_action(self, request: ActionRequest) -> int:
        """Render a named action and queue its commands (never retained). Voice requests expire
        ``ttl`` seconds (the request's, else the action's) after ``created_mono`` and are dropped rather
        than sent late. Returns the number of messages queued; raises ActionError when refused."""
        now = time.monotonic()
        try:
            if request.source == "voice" and self._is_muted():
                raise ActionError(f"action {request.action!r} refused: listening is muted")
            section = self.config.actions.get(request.action)
            if request.ttl is None and request.source == "voice" and section is not None:
                request = dataclasses.replace(request, ttl=section.ttl)
            expires = request.expires_mono
            if expires is not None and now >= expires:
                raise ActionError(f"action {request.action!r} expired {now - expires:.2f} s before it "
                                  "could be sent")
            with self._actions_lock:
                commands = self._actions.render(request.action, now)
            for command in commands:
                self._publish(command.topic, command.payload, qos=command.qos, retain=False,
                              expires_mono=expires)
        except ActionError as err:
            self._counts.add("actions_rejected")
            log.warning("%s (requested by %s)", err, request.source)
            raise
        self._counts.add("actions_sent")
        log.info("action %s (%s): %d message(s) queued", request.action, request.source, len(commands))
        return len(commands)

    def counters(self) -> dict[str, int]:
        return self._counts.snapshot()

    def prepare_reload(self, new: Config) -> Callable[[], None]:
        """Build the new action table (ActionError if it cannot be); the returned callable swaps it in."""
        actions = ActionTable(dict(new.actions))

        def apply() -> None:
            self.config = new
            with self._actions_lock:
                actions.carry_setpoints(self._actions)
                self._actions = actions
            self._allow_topics(actions.allowed_topics)
            self._subscribe_action_states()

        return apply

    def carry_over(self, previous: ActionDispatcher) -> None:
        """Take over the thermostats' setpoints the dispatcher of the previous config knew."""
        with previous._actions_lock, self._actions_lock:
            self._actions.carry_setpoints(previous._actions)

    def _subscribe_action_states(self) -> None:
        self._action_subscriptions = self._resubscribe(self._action_subscriptions,
                                                       self._actions.state_topics(), self._on_action_state, 0)

    def _on_action_state(self, message: InboundMessage) -> None:  # paho's thread
        with self._actions_lock:
            self._actions.observe_state(message.topic, message.payload)


class _Sender(Protocol):
    def __call__(self, topic: str, payload: Mapping[str, Any] | bytes | str, *, qos: int = 1,
                 retain: bool = False) -> str: ...


class AnomalyPublisher:
    """Publishes anomaly events on ``Topics.anomaly(sensor)``: ``store`` is the outbox's durable publish,
    ``send`` its volatile one."""

    def __init__(self, config: Config, *, store: _Sender, send: _Sender) -> None:
        self.topics = Topics.from_config(config)
        self._store = store
        self._send = send
        self._lock = threading.Lock()
        self._anomaly_active: dict[str, bool] = {}  # per sensor, as last published

    def publish_anomaly(self, event: AnomalyEvent) -> str:
        """Publish an anomaly event on ``Topics.anomaly(sensor)`` (retained, QoS 1). Alerts starting or
        ending (``active`` changed, or the first event of a stream since start) go through the outbox:
        stored before they are sent, sent again after an outage or a restart until the broker acknowledged
        them. Score refreshes within an unchanged state are sent without storing: the next refresh
        supersedes them, and a durable write per reading would wear an SD card. Every payload carries a
        unique ``id`` for de-duplication; returns it. Thread-safe."""
        payload: dict[str, object] = {"score": event.score, "value": event.value, "kind": event.kind,
                                      "active": event.active, "time": event.time}
        if event.streams:  # a device group's alert names its streams
            payload["streams"] = list(event.streams)
        topic = self.topics.anomaly(event.sensor)
        with self._lock:
            changed = self._anomaly_active.get(event.sensor) != event.active
            self._anomaly_active[event.sensor] = event.active
        if changed:
            return self._store(topic, payload, qos=1, retain=True)
        return self._send(topic, payload, qos=1, retain=True)
