"""Telemetry in: subscribed sensor payloads -> ``TelemetryIntake.parse`` -> ``Reading``s.

Each reading goes to the anomaly stage's queue (drop oldest; only when the wiring built one) and, when its
value changed, to the sensor's state topic (retained) for Home Assistant, at most once a second per sensor
(``StateThrottle``: Home Assistant's recorder stores every state; the latest value follows the second).
Handlers run on paho's thread: parse, hand over, return.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.config import Config
from agent.counts import Counts
from agent.logutil import LogThrottle, suppressed_note
from agent.messages import InboundMessage, Reading
from agent.ports import Publisher, Resubscriber, Scheduler
from agent.queues import DropOldestQueue
from agent.telemetry import REJECT_REASONS, StateThrottle, TelemetryIntake
from agent.topics import Topics

log = logging.getLogger(__name__)


def format_reading(value: float) -> str:
    """A sensor state payload: the shortest text that round-trips the float (HA parses it as a number)."""
    return repr(float(value))


class TelemetryStage:
    """Parses telemetry, queues readings for the anomaly stage, republishes changed sensor states."""

    name = "telemetry"

    def __init__(self, config: Config, *, publish: Publisher, resubscribe: Resubscriber,
                 count_bad_payload: Callable[[], None],
                 readings: DropOldestQueue[Reading] | None, call_later: Scheduler) -> None:
        self.topics = Topics.from_config(config)
        self._publish = publish
        self._resubscribe = resubscribe
        self._count_bad_payload = count_bad_payload
        self._readings = readings
        self._intake = TelemetryIntake(list(config.telemetry),
                                       max_payload_bytes=config.mqtt.max_payload_bytes)
        self._sensors = {stream.sensor for stream in config.telemetry}
        self._throttle = LogThrottle()
        self._counts = Counts("readings", "telemetry_ignored", "readings_rejected",
                              *(f"rejected_{reason}" for reason in REJECT_REASONS))
        self._last_values: dict[str, str] = {}
        self._state_throttle = StateThrottle()
        self._call_later = call_later
        # The state timer runs only while the throttle holds a value back (one at a time): a daemon without
        # telemetry, or whose sensors report slower than the interval, never wakes for it.
        self._timer_lock = threading.Lock()
        self._timer_armed = False
        self._telemetry_subscriptions: list[Any] = []
        self._subscribe_telemetry()

    def start(self) -> None:
        """Nothing to start: the state timer is armed when a value is held back."""

    def stop(self) -> None:
        """Nothing to stop: the supervisor's timers end with its loop."""

    def healthy(self, now: float) -> bool:
        return True

    def counters(self) -> dict[str, int]:
        counts = self._counts.snapshot()
        counts["readings_dropped"] = self._readings.dropped if self._readings is not None else 0
        return counts

    def last_values(self) -> dict[str, str]:
        """Each sensor's last state payload (republished after a reconnect)."""
        return dict(self._last_values)

    def prepare_reload(self, new: Config) -> Callable[[], None]:
        intake = TelemetryIntake(list(new.telemetry), max_payload_bytes=new.mqtt.max_payload_bytes)

        def apply() -> None:
            self._intake = intake
            self._subscribe_telemetry()
            self._sensors = {stream.sensor for stream in new.telemetry}
            self._last_values = {k: v for k, v in self._last_values.items() if k in self._sensors}

        return apply

    def carry_over(self, previous: TelemetryStage) -> None:
        """The last readings of streams still configured, from the stage of the previous config."""
        self._last_values = {k: v for k, v in previous._last_values.items() if k in self._sensors}

    def _subscribe_telemetry(self) -> None:
        self._telemetry_subscriptions = self._resubscribe(self._telemetry_subscriptions,
                                                          self._intake.topic_filters(), self._on_telemetry, 0)

    def _on_telemetry(self, message: InboundMessage) -> None:
        outcome = self._intake.parse_detailed(message.topic, message.payload, message.retained, time.time())
        for reason, text in outcome.rejected:
            self._reject_reading(reason, text)
        readings = outcome.readings
        if not readings:
            if outcome.rejected:
                self._count_bad_payload()  # nothing usable in it (counted once per message)
            else:
                self._counts.add("telemetry_ignored")  # carries none of its streams' fields
            return
        self._counts.add("readings", len(readings))
        for reading in readings:
            if self._readings is not None:
                self._readings.offer(reading)
            value = format_reading(reading.value)
            if self._last_values.get(reading.sensor) == value:
                continue  # the broker retains this very state (and a reconnect republishes it): no repeat
            self._last_values[reading.sensor] = value
            if self._state_throttle.offer(reading.sensor, value, time.monotonic()):
                self._publish(self.topics.sensor_state(reading.sensor), value, retain=True)
            elif self._state_throttle.holding():
                self._arm_state_timer()

    def _arm_state_timer(self) -> None:
        """Run the state timer once the interval has passed, unless it is armed already."""
        with self._timer_lock:
            if self._timer_armed:
                return
            self._timer_armed = True
        self._call_later(self._state_throttle.interval, self._state_timer)

    def _state_timer(self) -> None:
        """Publish the sensor states the throttle held back (the latest value of each); again later while
        some are still held (their interval has not passed yet)."""
        with self._timer_lock:
            self._timer_armed = False  # a value held from now on arms it again
        try:
            for sensor, value in self._state_throttle.due(time.monotonic()):
                self._publish(self.topics.sensor_state(sensor), value, retain=True)
        finally:
            if self._state_throttle.holding():
                self._arm_state_timer()

    def _reject_reading(self, reason: str, text: str) -> None:
        """A stream refused a reading: counted per reason (diagnostics), logged once per reason and
        throttle interval."""
        self._counts.add("readings_rejected")
        self._counts.add(f"rejected_{reason}")
        suppressed = self._throttle.ready(f"rejected:{reason}")
        if suppressed is not None:
            log.warning("telemetry: rejected a reading (%s): %s%s", reason, text, suppressed_note(suppressed))
