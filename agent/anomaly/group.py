"""A device group: the streams of one device (a zigbee2mqtt device's JSON fields, a Tasmota SENSOR message's
fields, an explicit ``[[anomaly.groups]]``; for SKAB one run's sensors) scored together, strictly online.

Each member stream keeps its own detector (``StreamDetector``) and its own alerts, unchanged. The group
combines the members' evidence of one *tick* (the readings that share a timestamp: the fields of one
message) with Fisher's method: each member's reading brings the decades of its p (``StreamDetector.decades``:
its statistics' p with persistence, at most ``evidence_cap`` decades; not its dropout and range
probabilities: a gap in a device's messages is one event, not one per field), the sum is a chi-square with
2 m degrees of freedom for the m members that reported, and its tail probability is the group's p. Two
corrections learnt online keep that p honest on real streams (running means over ``span`` ticks, starting at
the independent, uniform values, learnt while the device is not in alert): a member's decades are scaled so
that their usual mean is a uniform p's (1 / ln 10: a stream whose p's are usually small counts for what it
usually says), and the sum is read as a scaled chi-square whose scale and degrees of freedom match its learnt
mean and variance (Brown's method: members that move together, a room's temperature and humidity, count
for fewer independent ones). Several members each moderately unusual at once (a device whose readings all
moved a little) make a small group p where no member alerts on its own. The group's evidence is the
posterior at its own prior rate (``prior_rate``, a tenth of a stream's: a device anomaly is rarer than one
stream's odd reading); the same ``threshold``, ``clear_threshold``, learning period and cooldown as a
stream's apply, and one alert is raised per episode for the device.

The alert names the members that contributed most: those of the tick whose scaled evidence reached
``contributor_decades`` (at least the strongest one). The daemon publishes one event for the device that
lists them; ``home-agent anomaly-score --group`` puts ``alert`` = 1 on their rows of that tick.

A tick closes when every member reported at its time, or when a reading with another time arrives (a member
missing from a message, members at different rates: counted ``incomplete_ticks``). A tick with fewer than
two members is no group evidence (counted ``single_ticks``). A member's refused reading (NaN, a duplicate or
backwards time) is not part of any tick (counted ``refused``). State: a few numbers per member and the
episode tracker, bounded by the group's size.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from agent.anomaly.detector import (
    EPISODE_ENDED,
    EPISODE_STARTED,
    TUNING,
    Tuning,
    calibrated,
    capped_cooldown,
    episode_step,
    learning_period,
)
from agent.config import AnomalySection, Config

LN10: Final = math.log(10.0)
SQRT2: Final = math.sqrt(2.0)


@dataclass(frozen=True, slots=True)
class GroupTuning:
    """Constants of the group detector (chosen on the SKAB development runs and the home logs:
    ``bench/anomaly_bench.py --groups``; models/anomaly.md has the variants tried)."""

    evidence_cap: float = 8.0  # decades one member's reading brings at most (a spike alerts on its own)
    contributor_decades: float = 1.0  # a member is named in the device's alert from this much evidence
    prior_rate: float = 0.002  # prior probability that a tick is a device anomaly (a stream's: 0.02)
    span: float = 2000.0  # ticks behind the learnt scale of each member's evidence and of the sum ...
    prior_ticks: float = 100.0  # ... which start at the values for independent, uniform p's, worth this many
    min_mean: float = 0.05  # a member's usual evidence is at least this (a stream that never says anything)


GROUP_TUNING = GroupTuning()


def log10_chi2_sf(x: float, dof: float) -> float:
    """log10 of the chi-square survival function at ``x`` with ``dof`` degrees of freedom (Wilson-Hilferty's
    normal approximation; its tail, far out, from the normal's asymptotic form)."""
    if x <= 0.0:
        return 0.0
    a = 2.0 / (9.0 * dof)
    z = ((x / dof) ** (1.0 / 3.0) - (1.0 - a)) / math.sqrt(a)
    if z < 8.0:
        return math.log10(0.5 * math.erfc(z / SQRT2))
    return float(-(0.5 * z * z + math.log(z * math.sqrt(2.0 * math.pi))) / LN10)


class GroupOutcome(NamedTuple):
    """What closing one tick did: the tick's time, the group's evidence (posterior) and its calibrated score,
    whether the device's alert started or ended, and the members named (strongest first)."""

    time: float
    evidence: float
    score: float
    started: bool = False
    ended: bool = False
    contributors: tuple[str, ...] = ()


class GroupDetector:
    """One device group. ``observe(sensor, time, decades)`` after each member's reading was scored (its
    detector's ``decades``); returns the outcome of the tick it closed, if any. ``flush()`` closes the last
    tick (end of a file). Not thread-safe (one owner)."""

    def __init__(self, name: str, members: tuple[str, ...] | list[str], config: AnomalySection,
                 tuning: Tuning = TUNING, group_tuning: GroupTuning = GROUP_TUNING) -> None:
        if len(members) < 2 or len(set(members)) != len(members):
            raise ValueError(f"group {name!r}: at least two distinct members, got {list(members)}")
        self.name = name
        self.members = tuple(members)
        self.config = config
        self.tuning = tuning
        self.group_tuning = group_tuning
        self.counters = {"ticks": 0, "incomplete_ticks": 0, "single_ticks": 0, "refused": 0, "alerts": 0}
        self._log_prior = math.log10(group_tuning.prior_rate / (1.0 - group_tuning.prior_rate))
        self._pending: dict[str, float] = {}  # member -> decades, for the open tick
        self.tick_time = math.nan
        # learnt scales: each member's usual decades, and the mean and variance of the (scaled) sum
        self.means = {sensor: 1.0 / LN10 for sensor in self.members}
        self.sum_mean = 2.0 * len(self.members)
        self.sum_var = 4.0 * len(self.members)
        self.learnt = 0
        # the episode tracker (as a stream's: ``StreamDetector._track``)
        self.ticks = 0
        self.active = False
        self.armed = True
        self.quiet = 0
        self.episode_end = -math.inf
        self.last_tick = math.nan
        self.log_interval = math.nan  # usual time between ticks (log seconds): the cooldown in ticks

    # ---- evidence in, ticks out

    @property
    def pending(self) -> bool:
        """A tick is open: some member reported at ``tick_time`` and it is not decided yet."""
        return bool(self._pending)

    def refused(self) -> None:
        """A member's reading was refused by its detector: it is no part of a tick (counted)."""
        self.counters["refused"] += 1

    def observe(self, sensor: str, t: float, decades: float) -> GroupOutcome | None:
        """A member's reading at ``t`` was scored; ``decades``: its detector's ``decades`` (-log10 p)."""
        closed = None
        if self._pending and t != self.tick_time:
            closed = self._close()
        if not self._pending:
            self.tick_time = t
        cap = self.group_tuning.evidence_cap
        self._pending[sensor] = 0.0 if decades <= 0.0 else (cap if decades > cap else decades)
        if len(self._pending) == len(self.members):
            return self._close() if closed is None else closed
        return closed

    def flush(self) -> GroupOutcome | None:
        """Close the open tick (the end of the input)."""
        return self._close() if self._pending else None

    def _close(self) -> GroupOutcome | None:
        pending, t = self._pending, self.tick_time
        self._pending = {}
        self.counters["ticks"] += 1
        complete = len(pending) == len(self.members)
        if not complete:
            self.counters["incomplete_ticks"] += 1
        if len(pending) < 2:
            self.counters["single_ticks"] += 1
            return None
        gt = self.group_tuning
        means = self.means
        scaled = {sensor: d / LN10 / max(means[sensor], gt.min_mean) for sensor, d in pending.items()}
        statistic = 2.0 * LN10 * sum(scaled.values())
        # Brown's method: the sum as c x chi-square(f) with the learnt mean and variance (scaled to the
        # members present when some are missing)
        share = len(pending) / len(self.members)
        scale = self.sum_var / (2.0 * self.sum_mean)
        dof = 2.0 * self.sum_mean * self.sum_mean / self.sum_var * share
        log10_p = log10_chi2_sf(statistic / scale, dof)
        exponent = log10_p - self._log_prior
        evidence = 0.0 if exponent > 300.0 else 1.0 / (1.0 + math.pow(10.0, exponent))
        if not self.active:
            self._learn(pending, statistic, complete)
        return self._track(t, evidence, scaled)

    def _learn(self, pending: dict[str, float], statistic: float, complete: bool) -> None:
        gt = self.group_tuning
        self.learnt += 1
        a = max(1.0 / (self.learnt + gt.prior_ticks), 1.0 / gt.span)
        for sensor, d in pending.items():
            self.means[sensor] += a * (d - self.means[sensor])
        if complete:
            deviation = statistic - self.sum_mean
            self.sum_mean += a * deviation
            self.sum_var += a * (deviation * deviation - self.sum_var)
            self.sum_var = max(self.sum_var, 1e-6)

    def _track(self, t: float, evidence: float, pending: dict[str, float]) -> GroupOutcome:
        cfg = self.config
        if not math.isnan(self.last_tick) and t > self.last_tick:
            gap = math.log(t - self.last_tick)
            self.log_interval = gap if math.isnan(self.log_interval) else \
                self.log_interval + 0.04 * (gap - self.log_interval)
        self.last_tick = t if math.isnan(self.last_tick) else max(t, self.last_tick)
        self.ticks += 1
        score = calibrated(evidence)
        learnt = self.ticks > cfg.learning_readings or \
            self.ticks > learning_period(cfg.learning_readings, math.exp(self.log_interval), self.tuning)
        step = episode_step(self, t, evidence, cfg, learnt=learnt,
                            cooldown=self.cooldown, end_readings=self.tuning.end_readings)
        if step is EPISODE_STARTED:
            self.counters["alerts"] += 1
            return GroupOutcome(t, evidence, score, started=True, contributors=self._contributors(pending))
        return GroupOutcome(t, evidence, score, ended=step is EPISODE_ENDED)

    def _contributors(self, pending: dict[str, float]) -> tuple[str, ...]:
        ranked = sorted(pending.items(), key=lambda item: -item[1])
        named = tuple(sensor for sensor, d in ranked if d >= self.group_tuning.contributor_decades)
        return named or (ranked[0][0],)

    def cooldown(self) -> float:
        """The configured cooldown, at most ``cooldown_readings`` of the group's usual tick intervals."""
        return capped_cooldown(self.config.cooldown, self.tuning.cooldown_readings, self.log_interval)

    # ---- persistence (the daemon's saved state)

    def state_dict(self) -> dict[str, Any]:
        def finite(value: float) -> float | None:
            return value if math.isfinite(value) else None

        return {"members": list(self.members), "ticks": self.ticks, "active": self.active,
                "armed": self.armed, "quiet": self.quiet, "episode_end": finite(self.episode_end),
                "last_tick": finite(self.last_tick), "log_interval": finite(self.log_interval),
                "means": [self.means[sensor] for sensor in self.members], "sum_mean": self.sum_mean,
                "sum_var": self.sum_var, "learnt": self.learnt}

    def load_state_dict(self, data: dict[str, Any]) -> bool:
        """Restore a saved group; False (nothing restored) when it was saved with other members. Raises
        ValueError/TypeError on a malformed entry."""
        if list(data.get("members", [])) != list(self.members):
            return False

        def number(key: str, missing: float) -> float:
            value = data.get(key)
            return missing if value is None else float(value)

        self.ticks = int(data["ticks"])
        self.active, self.armed, self.quiet = bool(data["active"]), bool(data["armed"]), int(data["quiet"])
        self.episode_end = number("episode_end", -math.inf)
        self.last_tick = number("last_tick", math.nan)
        self.log_interval = number("log_interval", math.nan)
        means = [float(v) for v in data["means"]]
        if len(means) != len(self.members) or not all(math.isfinite(v) and v >= 0.0 for v in means):
            raise ValueError(f"group {self.name}: means: expected {len(self.members)} non-negative numbers")
        self.means = dict(zip(self.members, means, strict=True))
        self.sum_mean, self.sum_var = float(data["sum_mean"]), float(data["sum_var"])
        if not (self.sum_mean > 0.0 and self.sum_var > 0.0):
            raise ValueError(f"group {self.name}: sum_mean and sum_var must be positive")
        self.learnt = int(data["learnt"])
        return True


def device_groups(config: Config) -> dict[str, tuple[str, ...]]:
    """Device group name -> its sensors: the explicit ``[[anomaly.groups]]``, then (``anomaly.device_groups``)
    the scored streams reading two or more fields of one topic without wildcards (a zigbee2mqtt device's
    JSON, a Tasmota SENSOR message), named after the topic (characters outside [a-zA-Z0-9_-] as '_'),
    unless one of those streams is in an explicit group."""
    groups = {group.name: tuple(group.sensors) for group in config.anomaly.groups}
    if not config.anomaly.device_groups:
        return groups
    taken = {sensor for members in groups.values() for sensor in members}
    taken_names = set(groups) | {stream.sensor for stream in config.telemetry}
    by_topic: dict[str, list[str]] = {}
    for stream in config.telemetry:
        wildcard = "+" in stream.topic or "#" in stream.topic
        if stream.anomaly and stream.field is not None and not wildcard:
            by_topic.setdefault(stream.topic, []).append(stream.sensor)
    for topic, members in by_topic.items():
        if len(members) < 2 or any(sensor in taken for sensor in members):
            continue
        name = re.sub(r"[^a-zA-Z0-9_-]", "_", topic)[:64]
        while name in taken_names:
            name = f"{name[:60]}_dev"
        taken_names.add(name)
        groups[name] = tuple(members)
    return groups
