"""Liveness of the pipeline's stages, for the systemd watchdog.

Each stage registers once and then reports from its own thread: ``beat(name)`` whenever it makes
progress (an audio frame arrived, the MQTT loop turned), optionally with the depth of the queue it
feeds. ``healthy(now)`` names the wedged stages:

- *silent*: a stage registered with ``max_silence`` has not beaten for longer than that (audio frames
  must arrive at least every 2 s while voice is on; the MQTT network loop must keep turning);
- *stuck queue*: a stage registered with ``max_full`` has reported its queue at capacity for longer than
  that (a bounded queue that stays full is not draining: the consumer is wedged).

A stage can be suspended (e.g. the microphone is closed while muted) and resumed; resuming restarts its
silence timer. Every method is thread-safe; times are ``time.monotonic()`` seconds, passed in for tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class _Stage:
    name: str
    max_silence: float | None
    max_full: float | None
    last_beat: float  # the registration (or resume) time until the first beat
    beats: int = 0
    suspended: bool = False
    queue_depth: int | None = None
    queue_capacity: int | None = None
    full_since: float | None = None


@dataclass(frozen=True, slots=True)
class StageProblem:
    """Why a stage counts as wedged, in words a person can read in ``systemctl status``."""

    stage: str
    reason: str

    def __str__(self) -> str:
        return f"{self.stage}: {self.reason}"


class HealthRegistry:
    """Thread-safe registry of stage heartbeats and queue depths."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._stages: dict[str, _Stage] = {}

    def register(self, name: str, max_silence: float | None = None, max_full: float | None = None,
                 now: float | None = None) -> None:
        """Add a stage (or replace its limits). ``max_silence``: longest allowed gap between beats, None for
        no limit. ``max_full``: longest time its queue may stay at capacity, None for no limit. The silence
        timer starts now, so a stage gets ``max_silence`` to deliver its first beat."""
        if max_silence is not None and max_silence <= 0:
            raise ValueError(f"max_silence must be positive, got {max_silence}")
        if max_full is not None and max_full <= 0:
            raise ValueError(f"max_full must be positive, got {max_full}")
        now = self._clock() if now is None else now
        with self._lock:
            self._stages[name] = _Stage(name=name, max_silence=max_silence, max_full=max_full, last_beat=now)

    def unregister(self, name: str) -> None:
        with self._lock:
            self._stages.pop(name, None)

    def beat(self, name: str, now: float | None = None, queue_depth: int | None = None,
             queue_capacity: int | None = None) -> None:
        """The stage made progress. Unknown names are registered on the fly without limits."""
        now = self._clock() if now is None else now
        with self._lock:
            stage = self._stage_locked(name, now)
            stage.last_beat = now
            stage.beats += 1
            if queue_depth is not None:
                self._set_queue(stage, queue_depth, queue_capacity, now)

    def report_queue(self, name: str, depth: int, capacity: int | None = None,
                     now: float | None = None) -> None:
        """The depth of the bounded queue this stage feeds (or drains); not a heartbeat by itself."""
        now = self._clock() if now is None else now
        with self._lock:
            self._set_queue(self._stage_locked(name, now), depth, capacity, now)

    def _stage_locked(self, name: str, now: float) -> _Stage:
        """The stage called ``name``; an unknown one is registered on the fly, without limits."""
        stage = self._stages.get(name)
        if stage is None:
            stage = self._stages[name] = _Stage(name=name, max_silence=None, max_full=None, last_beat=now)
        return stage

    @staticmethod
    def _set_queue(stage: _Stage, depth: int, capacity: int | None, now: float) -> None:
        stage.queue_depth = depth
        if capacity is not None:
            stage.queue_capacity = capacity
        full = stage.queue_capacity is not None and depth >= stage.queue_capacity
        if not full:
            stage.full_since = None
        elif stage.full_since is None:
            stage.full_since = now

    def suspend(self, name: str) -> None:
        """Stop checking a stage (its source is closed on purpose, e.g. while muted)."""
        with self._lock:
            stage = self._stages.get(name)
            if stage is not None:
                stage.suspended = True

    def resume(self, name: str, now: float | None = None) -> None:
        """Check the stage again; it gets a fresh ``max_silence`` from now and its queue state is reset."""
        now = self._clock() if now is None else now
        with self._lock:
            stage = self._stages.get(name)
            if stage is not None:
                stage.suspended = False
                stage.last_beat = now
                stage.full_since = None

    def problems(self, now: float | None = None) -> list[StageProblem]:
        """Every wedged stage with the reason, in registration order."""
        now = self._clock() if now is None else now
        found: list[StageProblem] = []
        with self._lock:
            for stage in self._stages.values():
                if stage.suspended:
                    continue
                silence = now - stage.last_beat
                if stage.max_silence is not None and silence > stage.max_silence:
                    what = "no heartbeat yet" if stage.beats == 0 else "silent"
                    found.append(StageProblem(stage.name, f"{what} for {silence:.1f} s "
                                                          f"(limit {stage.max_silence:g} s)"))
                    continue
                if stage.max_full is not None and stage.full_since is not None:
                    full_for = now - stage.full_since
                    if full_for > stage.max_full:
                        found.append(StageProblem(stage.name, f"queue full ({stage.queue_depth}/"
                                                              f"{stage.queue_capacity}) for {full_for:.1f} s "
                                                              f"(limit {stage.max_full:g} s)"))
        return found

    def healthy(self, now: float | None = None) -> tuple[bool, list[str]]:
        """(True, []) when every checked stage is alive, else (False, names of the wedged stages)."""
        problems = self.problems(now)
        return (not problems, [problem.stage for problem in problems])

    def describe(self, now: float | None = None) -> tuple[bool, list[str]]:
        """Like ``healthy`` but with readable reasons (``"audio: silent for 3.2 s (limit 2 s)"``)."""
        problems = self.problems(now)
        return (not problems, [str(problem) for problem in problems])

    def stage_names(self) -> list[str]:
        with self._lock:
            return list(self._stages)


class CounterWatch:
    """Heartbeats derived from a stage's own counters, for stages that do not call ``beat`` themselves.

    Polled from the supervisor's tick: a *progress* counter that moved is a beat (audio frames arrived);
    a *retrying* counter that moved suspends the check (the stage is recovering on its own, e.g.
    reopening an unplugged microphone every few seconds: a restart would not help); ``paused()`` True
    suspends it too (muted, finished). The check starts suspended and begins with the first progress,
    so start-up time is never counted as silence."""

    def __init__(self, registry: HealthRegistry, name: str, read: Callable[[], Mapping[str, int]], *,
                 progress: Sequence[str], retrying: Sequence[str] = (),
                 paused: Callable[[], bool] = lambda: False, max_silence: float) -> None:
        self.name = name
        self._registry = registry
        self._read = read
        self._progress = tuple(progress)
        self._retrying = tuple(retrying)
        self._paused = paused
        self._last: tuple[int, int] | None = None
        registry.register(name, max_silence=max_silence)
        registry.suspend(name)

    def poll(self, now: float) -> None:
        counts = self._read()
        progress = sum(int(counts.get(key, 0)) for key in self._progress)
        retrying = sum(int(counts.get(key, 0)) for key in self._retrying)
        last, self._last = self._last, (progress, retrying)
        if last is None:
            return
        if self._paused() or retrying != last[1]:
            self._registry.suspend(self.name)
        elif progress != last[0]:
            self._registry.resume(self.name, now)  # a no-op for the timer when it was not suspended
            self._registry.beat(self.name, now)
