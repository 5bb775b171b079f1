"""The daemon's anomaly worker: readings from a queue in, events and ``on_anomaly`` actions out.

The stage is handed plain callables (publish an event, request an action) rather than the supervisor, so
it can be built, rebuilt on reload and tested without an App.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from agent.anomaly.group import device_groups
from agent.anomaly.streams import STATE_FILE_NAME, AnomalyDetector
from agent.config import Config
from agent.errors import ActionError, StateError
from agent.messages import ActionRequest, AnomalyEvent, Reading

log = logging.getLogger(__name__)

SILENCE_CHECK_INTERVAL = 10.0  # seconds between checks of silent streams
POLL_INTERVAL = 0.1  # seconds between drains of the readings queue


class AnomalyStage:
    """Scores ``Reading``s from a bounded queue and hands events to ``publish``; ``on_anomaly(sensor)``
    when an alert starts; checks silent streams; saves state every ``save_interval`` seconds and at stop.
    Callbacks run on the stage's thread; their errors are logged and counted, never fatal."""

    name = "anomaly"

    def __init__(self, detector: AnomalyDetector, readings: queue.Queue[Reading],
                 publish: Callable[[AnomalyEvent], object],
                 on_anomaly: Callable[[str], None] | None = None, *,
                 state_path: Path | None = None, sensors: Iterable[str] | None = None,
                 silence_check_interval: float = SILENCE_CHECK_INTERVAL) -> None:
        self.detector = detector
        self.readings = readings
        self.publish = publish
        self.on_anomaly = on_anomaly
        self.state_path = state_path
        self.sensors = set(sensors) if sensors is not None else None  # None: every sensor is scored
        self.silence_check_interval = silence_check_interval
        self.counts = {"readings": 0, "ignored": 0, "events": 0, "alerts": 0, "callback_errors": 0,
                       "save_errors": 0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_progress = time.monotonic()
        if state_path is not None:
            try:
                if detector.restore(state_path):
                    log.info("anomaly state restored for %d streams from %s", len(detector.streams),
                             state_path)
            except StateError as err:
                log.error("%s; streams learn afresh", err)

    def rejected(self) -> dict[str, int]:
        """Readings the detectors refused, per reason (diagnostics)."""
        return self.detector.rejected()

    def counters(self) -> dict[str, int]:
        """The diagnostics' anomaly counters: the stage's (``anomaly_``), the readings the detectors refused
        per reason (``anomaly_rejected_``) and the device groups' ticks, incomplete and single ticks, refused
        readings and alerts, summed over the groups (``anomaly_group_``)."""
        return {**{f"anomaly_{name}": count for name, count in self.counts.items()},
                **{f"anomaly_rejected_{reason}": count for reason, count in self.rejected().items()},
                **{f"anomaly_group_{name}": count for name, count in self.detector.group_counters().items()}}

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="anomaly", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the worker, score what is still queued (bounded by the queue), save the state."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("the anomaly worker did not stop within %.1f s", timeout)
        if self._thread is None or not self._thread.is_alive():
            self._drain()
        self.save()

    def healthy(self, now: float | None = None) -> bool:
        """The worker thread is alive and turned within the last minute (it wakes at least every second)."""
        now = time.monotonic() if now is None else now
        alive = self._thread is not None and self._thread.is_alive()
        return alive and now - self._last_progress < 60.0

    def save(self) -> None:
        if self.state_path is None:
            return
        try:
            self.detector.save(self.state_path)
        except StateError as err:
            self.counts["save_errors"] += 1
            log.error("%s", err)

    def handle(self, reading: Reading) -> None:
        """Score one reading and emit its event (public for tests and synchronous use)."""
        if self.sensors is not None and reading.sensor not in self.sensors:
            self.counts["ignored"] += 1
            return
        self.counts["readings"] += 1
        publication = self.detector.score(reading)
        if publication is not None:
            self._emit(publication.event, started=publication.started)
        if self.detector.group_publications:  # a device group's alert started or ended, or its first state
            for device in self.detector.take_group_publications():
                self._emit(device.event, started=device.started)

    def _emit(self, event: AnomalyEvent, *, started: bool) -> None:
        self.counts["events"] += 1
        try:
            self.publish(event)
        except Exception:  # a broken publisher must not kill the stage
            self.counts["callback_errors"] += 1
            log.exception("publishing the anomaly event for %s failed", event.sensor)
        if not started:
            return
        self.counts["alerts"] += 1
        if event.streams:
            log.warning("anomaly on device %s: %s (score %.4f) in %s", event.sensor, event.kind, event.score,
                        ", ".join(event.streams))
        else:
            log.warning("anomaly on %s: %s (score %.4f, value %s)", event.sensor, event.kind, event.score,
                        event.value)
        if self.on_anomaly is not None:
            try:
                self.on_anomaly(event.sensor)
            except Exception:  # an action failing must not stop the scoring
                self.counts["callback_errors"] += 1
                log.exception("the on_anomaly action for %s failed", event.sensor)

    def _drain(self) -> None:
        while True:
            try:
                reading = self.readings.get_nowait()
            except queue.Empty:
                return
            self.handle(reading)

    def _run(self) -> None:
        last_save = last_check = time.monotonic()
        while not self._stop.is_set():
            self._last_progress = time.monotonic()
            # Batches, not a wake-up per reading: at hundreds of readings/s a blocking get() per reading
            # costs more in thread switches than the scoring itself; alerts wait at most one poll.
            self._stop.wait(POLL_INTERVAL)
            self._drain()
            now = time.monotonic()
            if now - last_check >= self.silence_check_interval:
                last_check = now
                for event in self.detector.check_silence(time.time()):
                    self._emit(event, started=True)
            if now - last_save >= self.detector.config.save_interval:
                last_save = now
                self.save()


def build_stage(config: Config, readings: queue.Queue[Reading], publish: Callable[[AnomalyEvent], object],
                request_action: Callable[[ActionRequest], object]) -> AnomalyStage:
    """The daemon's stage for ``config``: its streams (``anomaly = true``), their ``on_anomaly`` actions,
    its state file. Called again with the new config on reload."""
    actions = {s.sensor: s.on_anomaly for s in config.telemetry if s.anomaly and s.on_anomaly}
    actions |= {g.name: g.on_anomaly for g in config.anomaly.groups if g.on_anomaly}

    def on_anomaly(sensor: str) -> None:
        action = actions.get(sensor)
        if action is None:
            return
        # refused (rate limit, allow-list): the action path has logged and counted it
        with contextlib.suppress(ActionError):
            request_action(ActionRequest(action=action, source="anomaly", created_mono=time.monotonic()))

    detector = AnomalyDetector(config.anomaly, device_groups(config))
    return AnomalyStage(detector, readings, publish, on_anomaly,
                        state_path=config.agent.resolved_state_dir / STATE_FILE_NAME,
                        sensors=[s.sensor for s in config.telemetry if s.anomaly])
