"""Every stream's detector, the events the daemon publishes, and the state saved across restarts.

Publishing is throttled per stream: an alert starting or ending is an event at once; otherwise a stream's
score is published at most once per ``publish_interval`` seconds (its first reading is published at once,
so Home Assistant's sensor has a value). Home Assistant's recorder keeps every state change: a message per
reading would fill it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.anomaly.detector import KINDS, Outcome, StreamDetector, StreamState
from agent.anomaly.group import GroupDetector, GroupOutcome
from agent.atomic_file import replace_atomically
from agent.config import AnomalySection
from agent.errors import StateError
from agent.messages import AnomalyEvent, Reading

log = logging.getLogger(__name__)

STATE_FILE_NAME = "anomaly_state.json"
STATE_VERSION = 2  # 1: the int8-forecaster detector, whose state means nothing to this one


@dataclass(frozen=True, slots=True)
class Publication:
    """An event to publish; ``started``: it is a new alert (the daemon fires ``on_anomaly``)."""

    event: AnomalyEvent
    started: bool


def _summed(counters: Iterable[dict[str, int]]) -> dict[str, int]:
    """Counters by name, summed. The diagnostics thread calls this while the stage's thread may add a stream
    or a counter name: each dict is read through a snapshot of its items."""
    total: dict[str, int] = {}
    for counts in counters:
        for name, count in tuple(counts.items()):
            total[name] = total.get(name, 0) + count
    return total


class AnomalyDetector:
    """``score(reading)`` -> what to publish, or None. Not thread-safe (the stage's thread owns it)."""

    def __init__(self, config: AnomalySection, groups: dict[str, tuple[str, ...]] | None = None) -> None:
        self.config = config
        self.streams: dict[str, StreamDetector] = {}
        self._published: dict[str, float] = {}  # sensor -> time of its last event
        # device groups (``agent.anomaly.group``): their alerts wait in ``group_publications`` for the stage
        self.groups = {name: GroupDetector(name, members, config) for name, members in (groups or {}).items()}
        self._group_of = {sensor: group for group in self.groups.values() for sensor in group.members}
        self.group_publications: list[Publication] = []
        self._groups_published: set[str] = set()  # groups whose state was published since start

    def stream(self, sensor: str) -> StreamDetector:
        detector = self.streams.get(sensor)
        if detector is None:
            detector = self.streams[sensor] = StreamDetector(self.config)
        return detector

    def rejected(self) -> dict[str, int]:
        """Readings refused by the detectors, per reason, over every stream."""
        return _summed(detector.rejected for detector in tuple(self.streams.values()))

    def group_counters(self) -> dict[str, int]:
        """The device groups' counters (ticks, incomplete ticks, refused readings, alerts), summed (the groups
        are fixed at start)."""
        return _summed(group.counters for group in self.groups.values())

    def take_group_publications(self) -> list[Publication]:
        """The device alerts that started or ended since the last call, and each device's first state."""
        taken, self.group_publications = self.group_publications, []
        return taken

    def score(self, reading: Reading) -> Publication | None:
        """The stream's event to publish, if any; a device group's alert goes to ``group_publications``."""
        detector = self.stream(reading.sensor)
        outcome = detector.update(reading.time, reading.value)
        group = self._group_of.get(reading.sensor)
        if group is not None:
            if outcome is None:
                group.refused()
            else:
                self._group_event(group, group.observe(reading.sensor, reading.time, detector.decades))
        if outcome is None:
            return None
        last = self._published.get(reading.sensor)
        if outcome.started or outcome.ended or last is None or \
                reading.time - last >= self.config.publish_interval:
            event = self._event(reading.sensor, outcome, reading.value, detector.state.active, reading.time)
            return Publication(event, outcome.started)
        return None

    def _group_event(self, group: GroupDetector, closed: GroupOutcome | None) -> None:
        """Publish a device's alert starting or ending, and its state at its first tick since start (so its
        Home Assistant entity shows off, or on after a restart in alert, rather than unknown)."""
        if closed is None:
            return
        first = group.name not in self._groups_published
        if not (closed.started or closed.ended or first):
            return
        self._groups_published.add(group.name)
        strongest = self.streams.get(closed.contributors[0]) if closed.contributors else None
        kind = KINDS[strongest.state.kind] if strongest is not None else "step"
        event = AnomalyEvent(sensor=group.name, score=closed.score, value=None, kind=kind,
                             active=group.active, time=closed.time, streams=closed.contributors)
        self.group_publications.append(Publication(event, closed.started))

    def check_silence(self, now: float) -> list[AnomalyEvent]:
        """Streams that went silent: a dropout alert once the silence is improbable enough."""
        events = []
        for sensor, detector in self.streams.items():
            outcome = detector.silence(now)
            if outcome is not None:
                events.append(self._event(sensor, outcome, None, True, now))
        return events

    def _event(self, sensor: str, outcome: Outcome, value: float | None, active: bool,
               when: float) -> AnomalyEvent:
        self._published[sensor] = when
        return AnomalyEvent(sensor=sensor, score=outcome.score, value=value, kind=outcome.kind, active=active,
                            time=when)

    # ---- persistence

    def state_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"version": STATE_VERSION,
                                "streams": {name: det.state.to_dict() for name, det in self.streams.items()}}
        if self.groups:
            data["groups"] = {name: group.state_dict() for name, group in self.groups.items()}
        return data

    def load_state_dict(self, data: dict[str, Any]) -> bool:
        """Restore saved streams; False (logged) when the state was saved by the earlier detector."""
        version = data.get("version")
        if version == 1:
            log.warning("anomaly state was saved by the previous detector; every stream learns afresh")
            return False
        if version != STATE_VERSION:
            raise ValueError(f"unsupported state version {version!r}")
        streams = data.get("streams")
        if not isinstance(streams, dict):
            raise ValueError("'streams' is not an object")
        restored = {name: StreamState.from_dict(raw) for name, raw in streams.items()}
        groups = data.get("groups", {})
        if not isinstance(groups, dict):
            raise ValueError("'groups' is not an object")
        for name, raw in groups.items():
            group = self.groups.get(name)
            if group is not None and isinstance(raw, dict) and not group.load_state_dict(raw):
                log.info("anomaly group %s has other members now; it learns afresh", name)
        for name, state in restored.items():
            self.streams[name] = StreamDetector(self.config, state)
        return bool(restored)

    def save(self, path: Path) -> None:
        """Write the state atomically (temp file + rename). Raises StateError."""
        text = json.dumps(self.state_dict(), separators=(",", ":"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with replace_atomically(path, "w", encoding="utf-8") as handle:
                handle.write(text)
        except OSError as err:
            raise StateError(f"cannot write anomaly state {path}: {err.strerror}") from err

    def restore(self, path: Path) -> bool:
        """Load saved state if any. A corrupt file is moved aside (logged) and every stream starts
        learning; returns whether state was restored."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return False
        except OSError as err:
            raise StateError(f"cannot read anomaly state {path}: {err.strerror}") from err
        except UnicodeDecodeError as err:
            self._set_aside(path, f"not UTF-8 ({err.reason})")
            return False
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
            return self.load_state_dict(data)
        except (ValueError, TypeError, KeyError) as err:
            self.streams.clear()
            self._set_aside(path, str(err))
            return False

    @staticmethod
    def _set_aside(path: Path, reason: str) -> None:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            os.replace(path, aside)
        except OSError as err:
            raise StateError(f"anomaly state {path} is corrupt ({reason}) and cannot be moved aside: "
                             f"{err.strerror}") from err
        log.error("anomaly state %s is corrupt (%s); moved it to %s, every stream learns afresh",
                  path, reason, aside)
