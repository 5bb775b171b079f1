"""Telemetry streams, fault injection and replay validation for the anomaly detector (the bench and the
tests use it).

A *stream* is one numeric column of one file of ``../shared/data/telemetry``: UCI occupancy detection
(three 1-minute office files: Temperature, Humidity, Light, CO2, HumidityRatio, Occupancy) and UCI
appliances energy (one 10-minute house file: power, lights, 9 rooms' temperature and humidity, weather,
two random variables). Timestamps are local wall clock without a zone; they are read as UTC so the time of
day stays the one written in the file.
"""

from __future__ import annotations

import copy
import csv
import datetime as dt
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.anomaly import KINDS, StreamDetector, StreamState, Tuning
from agent.anomaly.detector import TUNING
from agent.anomaly.group import GROUP_TUNING, GroupDetector, GroupTuning
from agent.config import AnomalySection
from agent.paths import REPO_ROOT

FloatArray = npt.NDArray[np.float64]

FAULT_KINDS = ("stuck", "dropout", "spike", "drift", "step")
DAY = 86400.0
DRIFT_DAYS = 3.0  # how long an injected drift may take to be detected (other faults: one day)


def default_telemetry_dir() -> Path:
    """$TELEMETRY_DIR, else ../shared/data/telemetry next to the repository."""
    env = os.environ.get("TELEMETRY_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "telemetry"


@dataclass(frozen=True)
class Stream:
    name: str
    times: FloatArray  # UNIX seconds (wall clock read as UTC)
    tods: FloatArray  # fraction of the day
    values: FloatArray

    @property
    def days(self) -> float:
        return float(self.times[-1] - self.times[0]) / DAY if len(self.times) > 1 else 0.0

    @property
    def interval(self) -> float:
        return float(np.median(np.diff(self.times)))


def _epoch_and_tod(stamps: Iterable[dt.datetime]) -> tuple[FloatArray, FloatArray]:
    items = list(stamps)
    times = np.array([s.replace(tzinfo=dt.UTC).timestamp() for s in items])
    tods = np.array([(s.hour * 3600 + s.minute * 60 + s.second) / DAY for s in items])
    return times, tods


def load_streams(data_dir: Path) -> list[Stream]:
    """Every numeric column of every telemetry file, in a fixed order."""
    streams: list[Stream] = []
    occupancy = data_dir / "occupancy_detection"
    for path in sorted(occupancy.glob("*.txt")):
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        header = rows[0]  # "date", columns... ; data rows carry a leading row number
        stamps = [dt.datetime.strptime(r[1], "%Y-%m-%d %H:%M:%S") for r in rows[1:]]
        times, tods = _epoch_and_tod(stamps)
        for col, name in enumerate(header[1:]):
            values = np.array([float(r[col + 2]) for r in rows[1:]])
            streams.append(Stream(f"occupancy/{path.stem}/{name}", times, tods, values))
    energy = data_dir / "appliances_energy" / "energydata_complete.csv"
    if energy.exists():
        with energy.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        header = rows[0]
        stamps = [dt.datetime.strptime(r[0], "%d-%m-%Y %H:%M") for r in rows[1:]]
        times, tods = _epoch_and_tod(stamps)
        for col, name in enumerate(header[1:]):
            values = np.array([float(r[col + 1]) for r in rows[1:]])
            streams.append(Stream(f"appliances/{name}", times, tods, values))
    if not streams:
        raise FileNotFoundError(f"no telemetry files under {data_dir}")
    return streams


# ------------------------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Fault:
    kind: str
    start: int  # index of the first faulty reading
    magnitude: float = 0.0


def inject(stream: Stream, fault: Fault, horizon: int) -> tuple[FloatArray, FloatArray, FloatArray]:
    """The stream from ``fault.start`` for ``horizon`` readings with the fault applied: times, tods, values.

    stuck: the value freezes at the last good reading. dropout: no readings for ``horizon`` readings' time
    (the rows are removed; the returned arrays hold the rows after the gap). spike: one reading off by
    ``magnitude``. step: every reading from the start off by ``magnitude``. drift: a linear ramp reaching
    ``magnitude`` after one day.
    """
    end = min(len(stream.values), fault.start + horizon)
    times = stream.times[fault.start:end].copy()
    tods = stream.tods[fault.start:end].copy()
    values = stream.values[fault.start:end].copy()
    if fault.kind == "stuck":
        values[:] = stream.values[fault.start - 1]
    elif fault.kind == "spike":
        values[0] += fault.magnitude
    elif fault.kind == "step":
        values += fault.magnitude
    elif fault.kind == "drift":
        values += fault.magnitude * (times - times[0] + stream.interval) / DAY
    elif fault.kind == "dropout":
        return times[:0], tods[:0], values[:0]
    else:
        raise ValueError(f"unknown fault kind {fault.kind!r}")
    return times, tods, values


def plan_faults(stream: Stream, rng: np.random.Generator, per_kind: int, first: int,
                horizon: int) -> list[Fault]:
    """``per_kind`` faults of each kind at random starts in [first, len - horizon); magnitudes relative to
    the stream's spread (spike 5 sigma, step 3 sigma, drift 3 sigma per day), random sign."""
    sigma = float(np.std(stream.values))
    last = len(stream.values) - horizon
    faults: list[Fault] = []
    if last <= first:
        return faults
    for kind in FAULT_KINDS:
        for _ in range(per_kind):
            start = int(rng.integers(first, last))
            sign = 1.0 if rng.random() < 0.5 else -1.0
            magnitude = {"spike": 5.0, "step": 3.0, "drift": 3.0}.get(kind, 0.0) * sigma * sign
            if kind == "stuck":
                # a frozen value is only a fault where the real stream moved: pick a start that changes
                for _attempt in range(50):
                    window = stream.values[start:start + horizon]
                    if np.ptp(window) > 0 and stream.values[start] != stream.values[start - 1]:
                        break
                    start = int(rng.integers(first, last))
            faults.append(Fault(kind, start, magnitude))
    return faults


# ------------------------------------------------------------------------------------------- replay


@dataclass
class Alert:
    index: int
    time: float
    kind: str
    score: float


@dataclass
class ReplayResult:
    stream: str
    days: float
    alerts: list[Alert]
    checkpoints: dict[int, StreamState] = field(default_factory=dict)


def replay(config: AnomalySection, stream: Stream, *, checkpoints: Iterable[int] = (),
           tuning: Tuning = TUNING) -> ReplayResult:
    """Fault-free replay; returns its alert starts and copies of the state just before each checkpoint."""
    detector = StreamDetector(config, tuning=tuning)
    points = {c for c in checkpoints if 0 < c < len(stream.values)}
    alerts: list[Alert] = []
    saved: dict[int, StreamState] = {}
    update = detector.update
    for index, (t, x) in enumerate(zip(stream.times.tolist(), stream.values.tolist(), strict=True)):
        if index in points:
            saved[index] = copy.deepcopy(detector.state)
        outcome = update(t, x)
        if outcome is not None and outcome.started:
            alerts.append(Alert(index, t, outcome.kind, outcome.score))
    return ReplayResult(stream.name, stream.days, alerts, saved)


@dataclass
class Detection:
    stream: str
    fault: Fault
    detected: bool
    delay: float  # seconds from the fault start to the alert (inf when missed)
    kind: str | None  # the alert's kind


def detect(config: AnomalySection, stream: Stream, fault: Fault, *, state: StreamState, horizon: int,
           check_interval: float = 60.0, tuning: Tuning = TUNING) -> Detection:
    """Replay ``horizon`` readings with ``fault`` from a clean checkpoint; the first alert start is the
    detection. For dropouts, the daemon's silence check runs every ``check_interval`` seconds over the gap."""
    state = copy.deepcopy(state)
    # measure the detector, not the cooldown of an unrelated earlier alert
    state.active, state.quiet, state.episode_end, state.armed = False, 0, -math.inf, True
    detector = StreamDetector(config, state, tuning=tuning)
    t0 = float(stream.times[fault.start])
    if fault.kind == "dropout":
        end = min(len(stream.times) - 1, fault.start + horizon)
        t_end = float(stream.times[end])
        t = float(stream.times[fault.start - 1])
        while t < t_end:
            t += check_interval
            if detector.silence(t) is not None:
                return Detection(stream.name, fault, True, max(0.0, t - t0), "dropout")
        return Detection(stream.name, fault, False, math.inf, None)
    times, _tods, values = inject(stream, fault, horizon)
    for t, x in zip(times.tolist(), values.tolist(), strict=True):
        outcome = detector.update(t, x)
        if outcome is not None and outcome.started:
            return Detection(stream.name, fault, True, t - t0, outcome.kind)
    return Detection(stream.name, fault, False, math.inf, None)


@dataclass
class Validation:
    false_alerts: dict[str, tuple[int, float]]  # stream -> (alerts, days)
    detections: list[Detection]

    def summary(self) -> dict[str, Any]:
        per_stream = {name: {"alerts": a, "days": round(d, 2), "per_day": a / d if d else 0.0}
                      for name, (a, d) in self.false_alerts.items()}
        total_alerts = sum(a for a, _ in self.false_alerts.values())
        total_days = sum(d for _, d in self.false_alerts.values())
        kinds: dict[str, Any] = {}
        for kind in FAULT_KINDS:
            rows = [d for d in self.detections if d.fault.kind == kind]
            kinds[kind] = _detection_summary(rows)
            for group in ("occupancy", "appliances"):  # 1-minute and 10-minute streams
                kinds[kind][group] = _detection_summary([d for d in rows if d.stream.startswith(group)])
        return {
            "false_alerts_total": total_alerts,
            "stream_days": round(total_days, 1),
            "false_alerts_per_stream_day": total_alerts / total_days if total_days else 0.0,
            "worst_stream_per_day": max((v["per_day"] for v in per_stream.values()), default=0.0),
            "faults_detected": sum(1 for d in self.detections if d.detected),
            "faults_injected": len(self.detections),
            "streams": per_stream,
            "faults": kinds,
        }


def _detection_summary(rows: list[Detection]) -> dict[str, Any]:
    hits = [d for d in rows if d.detected]
    delays = np.array([d.delay for d in hits]) / 60.0
    return {
        "injected": len(rows),
        "detected": len(hits),
        "rate": len(hits) / len(rows) if rows else 0.0,
        "delay_min_median": float(np.median(delays)) if hits else None,
        "delay_min_p90": float(np.percentile(delays, 90)) if hits else None,
        "alert_kinds": {k: n for k in dict.fromkeys(KINDS) if (n := sum(1 for d in hits if d.kind == k))},
    }


FAULT_FIRST_READINGS = 600  # faults start after this many readings (as in the first validation)


def validate(config: AnomalySection, streams: list[Stream], *, seed: int = 7, per_kind: int = 2,
             horizon_days: float = 1.0, tuning: Tuning = TUNING) -> Validation:
    """Fault-free replay of every stream (false alerts) and ``per_kind`` injected faults of each kind per
    stream, from clean checkpoints of that replay (same seed: the same faults as the earlier detector's
    validation)."""
    rng = np.random.default_rng(seed)
    false_alerts: dict[str, tuple[int, float]] = {}
    detections: list[Detection] = []
    for stream in streams:
        horizon = max(10, round(horizon_days * DAY / stream.interval))
        faults = plan_faults(stream, rng, per_kind, FAULT_FIRST_READINGS, horizon)
        clean = replay(config, stream, checkpoints=[f.start for f in faults], tuning=tuning)
        false_alerts[stream.name] = (len(clean.alerts), stream.days)
        for fault in faults:
            state = clean.checkpoints[fault.start]
            # a slow drift gets DRIFT_DAYS (or the rest of the stream) to show
            span = round(DRIFT_DAYS * DAY / stream.interval) if fault.kind == "drift" else horizon
            detections.append(detect(config, stream, fault, state=state, horizon=span, tuning=tuning))
    return Validation(false_alerts, detections)


# ------------------------------------------------------------------------------------- device groups


def home_device_groups(streams: list[Stream]) -> dict[str, tuple[str, ...]]:
    """The devices of the home logs: each office file is one sensor box (temperature, humidity, light, CO2,
    humidity ratio, occupancy); the house has a meter (appliances, lights), nine room sensors (T_i, RH_i)
    and a weather station. rv1 and rv2 (random numbers added to the data set) belong to no device."""
    names = {s.name for s in streams}
    groups: dict[str, tuple[str, ...]] = {}
    for name in names:
        if name.startswith("occupancy/"):
            device = name.rsplit("/", 1)[0]
            groups[device] = (*groups.get(device, ()), name)
    house = {"appliances/meter": ("Appliances", "lights"),
             "appliances/weather": ("T_out", "Press_mm_hg", "RH_out", "Windspeed", "Visibility", "Tdewpoint")}
    house |= {f"appliances/room{i}": (f"T{i}", f"RH_{i}") for i in range(1, 10)}
    for device, columns in house.items():
        members = tuple(f"appliances/{c}" for c in columns if f"appliances/{c}" in names)
        if len(members) >= 2:
            groups[device] = members
    order = {s.name: i for i, s in enumerate(streams)}
    return {device: tuple(sorted(members, key=order.__getitem__))
            for device, members in sorted(groups.items())}


@dataclass
class _GroupReplay:
    detectors: list[StreamDetector]
    group: GroupDetector


def _group_step(replay_state: _GroupReplay, names: tuple[str, ...], t: float, values: list[float], *,
                alerts: list[set[int]], index: int) -> None:
    """One tick of a device group: every member's reading, then the group; alert rows per member."""
    group = replay_state.group
    for j, detector in enumerate(replay_state.detectors):
        outcome = detector.update(t, values[j])
        if outcome is None:
            group.refused()
            continue
        if outcome.started:
            alerts[j].add(index)
        closed = group.observe(names[j], t, detector.decades)
        if closed is not None and closed.started:
            for sensor in closed.contributors:
                alerts[names.index(sensor)].add(index)


def validate_groups(config: AnomalySection, streams: list[Stream], groups: dict[str, tuple[str, ...]], *,
                    seed: int = 7, per_kind: int = 2, horizon_days: float = 1.0, tuning: Tuning = TUNING,
                    group_tuning: GroupTuning = GROUP_TUNING) -> Validation:
    """``validate`` with device groups: the same faults (the same seed and order), each group's members
    replayed in step (their rows share timestamps) with the group detector; a stream's alerts are its own
    and the group's alerts that name it. A fault is injected into one member, the others read as logged;
    it is detected by the first alert on that member. Dropouts are the member's own silence check (the
    group does not combine gaps). Streams in no group are validated as ``validate`` does."""
    rng = np.random.default_rng(seed)
    by_name = {s.name: s for s in streams}
    member_of = {sensor: device for device, members in groups.items() for sensor in members}
    planned: dict[str, tuple[int, list[Fault]]] = {}
    for stream in streams:
        horizon = max(10, round(horizon_days * DAY / stream.interval))
        planned[stream.name] = (horizon, plan_faults(stream, rng, per_kind, FAULT_FIRST_READINGS, horizon))
    false_alerts: dict[str, tuple[int, float]] = {}
    detections: list[Detection] = []
    for stream in streams:  # streams in no group: as validate
        if stream.name in member_of:
            continue
        horizon, faults = planned[stream.name]
        clean = replay(config, stream, checkpoints=[f.start for f in faults], tuning=tuning)
        false_alerts[stream.name] = (len(clean.alerts), stream.days)
        for fault in faults:
            span = round(DRIFT_DAYS * DAY / stream.interval) if fault.kind == "drift" else horizon
            detections.append(detect(config, stream, fault, state=clean.checkpoints[fault.start],
                                     horizon=span, tuning=tuning))
    for device, names in groups.items():
        members = [by_name[name] for name in names]
        times = members[0].times
        if any(len(m.times) != len(times) or not np.array_equal(m.times, times) for m in members):
            raise ValueError(f"{device}: its streams do not share timestamps")
        values = np.stack([m.values for m in members], axis=1)
        starts = {f.start for name in names for f in planned[name][1]}
        state = _GroupReplay([StreamDetector(config, tuning=tuning) for _ in names],
                             GroupDetector(device, names, config, tuning, group_tuning))
        saved: dict[int, _GroupReplay] = {}
        alerts: list[set[int]] = [set() for _ in names]
        rows = values.tolist()
        for index, t in enumerate(times.tolist()):
            if index in starts:
                saved[index] = copy.deepcopy(state)
            _group_step(state, names, t, rows[index], alerts=alerts, index=index)
        for j, member in enumerate(members):
            false_alerts[member.name] = (len(alerts[j]), member.days)
            horizon, faults = planned[member.name]
            for fault in faults:
                span = round(DRIFT_DAYS * DAY / member.interval) if fault.kind == "drift" else horizon
                if fault.kind == "dropout":
                    checkpoint = saved[fault.start].detectors[j].state
                    detections.append(detect(config, member, fault, state=checkpoint, horizon=span,
                                             tuning=tuning))
                    continue
                detections.append(_detect_in_group(saved[fault.start], names, j, member=member, fault=fault,
                                                   times=times, rows=rows, span=span))
    order = {s.name: i for i, s in enumerate(streams)}
    return Validation(dict(sorted(false_alerts.items(), key=lambda item: order[item[0]])), detections)


def _detect_in_group(checkpoint: _GroupReplay, names: tuple[str, ...], j: int, *, member: Stream,
                     fault: Fault, times: FloatArray, rows: list[list[float]], span: int) -> Detection:
    state = copy.deepcopy(checkpoint)
    # measure the detectors, not the cooldown of an unrelated earlier alert (as ``detect``)
    s = state.detectors[j].state
    s.active, s.quiet, s.episode_end, s.armed = False, 0, -math.inf, True
    g = state.group
    g.active, g.quiet, g.episode_end, g.armed = False, 0, -math.inf, True
    _times, _tods, faulty = inject(member, fault, span)
    t0 = float(times[fault.start])
    for offset, x in enumerate(faulty.tolist()):
        index = fault.start + offset
        alerts: list[set[int]] = [set() for _ in names]
        values = list(rows[index])
        values[j] = x
        _group_step(state, names, float(times[index]), values, alerts=alerts, index=index)
        if alerts[j]:
            kind = "group" if not state.detectors[j].state.active else KINDS[state.detectors[j].state.kind]
            return Detection(member.name, fault, True, float(times[index]) - t0, kind)
    return Detection(member.name, fault, False, math.inf, None)
