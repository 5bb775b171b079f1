"""Small immutable records passed between stages over bounded queues.

Stages do not import each other; they exchange these records. Times named ``*_mono`` are
``time.monotonic()`` seconds (for TTLs and latencies); ``time`` fields are wall-clock UNIX seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """A block of 16 kHz mono int16 samples as it came from the source."""

    samples: npt.NDArray[np.int16]
    sample_rate: int
    t_mono: float  # when the last sample of this chunk was captured


@dataclass(frozen=True, slots=True)
class Scores:
    """Per-label posteriors of one model invocation over the window ending at ``t_audio``."""

    labels: tuple[str, ...]
    values: npt.NDArray[np.float32]
    t_audio: float  # seconds of audio since the stream started, at the end of the window


@dataclass(frozen=True, slots=True)
class Detection:
    """A vocabulary word heard in the audio stream."""

    word: str
    score: float
    start: float  # seconds of audio since the stream started
    end: float


@dataclass(frozen=True, slots=True)
class Intent:
    """A recognised voice command: the wake word followed by a configured phrase."""

    action: str
    words: tuple[str, ...]
    scores: tuple[float, ...]
    time: float  # wall clock
    t_audio: float  # end of the last word, seconds of audio since the stream started
    created_mono: float


ActionSource = Literal["voice", "anomaly"]  # the stages that request actions


@dataclass(frozen=True, slots=True)
class ActionRequest:
    """A request to fire a named action. Voice requests expire ``ttl`` seconds after ``created_mono``."""

    action: str
    source: ActionSource
    created_mono: float
    ttl: float | None = None

    @property
    def expires_mono(self) -> float | None:
        """When the request goes stale (``time.monotonic()``); None: it never does."""
        return self.created_mono + self.ttl if self.ttl is not None else None


class Reading(NamedTuple):
    """One validated numeric telemetry value for a configured sensor (a tuple: one is made per reading, and a
    frozen dataclass costs twice as much to build)."""

    sensor: str
    value: float
    time: float  # wall clock at reception (or the payload's own timestamp when it carries one)
    topic: str


AnomalyKind = Literal["noise", "stuck", "dropout", "spike", "drift", "step"]


@dataclass(frozen=True, slots=True)
class AnomalyEvent:
    """A change of anomaly state (or a score update) for one sensor stream."""

    sensor: str
    score: float  # in [0, 1]
    value: float | None
    kind: AnomalyKind
    active: bool
    time: float
    # a device group's alert (``sensor`` is the group's name): the member streams it names, strongest first
    streams: tuple[str, ...] = ()


class InboundMessage(NamedTuple):
    """A message received from the broker, handed to subscription handlers (a tuple, as ``Reading``)."""

    topic: str
    payload: bytes
    retained: bool
    qos: int
    received_mono: float
