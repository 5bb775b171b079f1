"""Arbitration: when several agents of one home hear the same utterance, exactly one of them acts on it.

Agents that share an ``[arbitration] group`` talk on one topic, ``Topics.arbitration``. Every message is JSON,
QoS 1, never retained, and one of:

- ``claim``: an agent recognised an intent. It says how well it heard it (``snr``: a signal-to-noise estimate
  in dB from its own audio, the ``wake`` and ``command`` scores) and ``ago``: the seconds between the moment
  its audio completed the intent and sending the claim. A claim expires after the window (never sent late).
- ``won``: the agent that acts says so, then publishes the intent and fires the action.
- ``withdrawn``: the agent whose claim was best cannot act after all (its claim never came back from the
  broker): the next best takes over.

Claims match up without synchronised clocks. A receiver places the utterance of every claim on its OWN
monotonic clock, at ``received - ago``; claims for the same intent that land within ``match_tolerance`` of
each other are one utterance (a repeated command comes at least a whole utterance, > 1 s, later). Rounds
follow the broker's order: a round opens with the first claim received for an utterance and closes ``window``
later; a claim that arrives after that is late and loses (the round's winner may have acted already). At the
close every agent ranks the claims it received (the same set everywhere: the broker sends them to all in one
order): higher SNR first, then the higher command score, the higher wake score, the lower agent id. Only the
best claim's agent acts; the others log and count a lost arbitration and publish nothing more.

Failures: an agent acts only once its own claim has come back from the broker (otherwise the others may never
have seen it and would act too); while the broker is down nothing is decided, and nothing is sent late.
A winner that dies before saying ``won`` (the broker publishes its last will, ``offline`` on its
availability topic) or withdraws is replaced by the best surviving claim of the round, until the intent's
time-to-live ends.

:class:`Arbitration` is the decision logic, pure (no I/O, the caller passes the time); :class:`LevelMeter`
estimates the SNR; :class:`GroupArbiter` wires both to the MQTT link and the supervisor's timers.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from agent.config import Config
from agent.errors import PayloadError
from agent.messages import Detection, Intent
from agent.mqtt_link import Handler, InboundMessage
from agent.topics import Topics

log = logging.getLogger(__name__)

MessageKind = Literal["claim", "won", "withdrawn"]
NOTICE_KINDS: tuple[MessageKind, ...] = ("won", "withdrawn")
# Foreign claims are remembered this long: a claim arriving after ours, from a slow agent, must still find
# its utterance; a command repeated later must not (it is matched by utterance time, not by this).
MEMORY_SECONDS = 10.0
MAX_AGO = 30.0  # a claim sent this long after its utterance is nonsense
_AGENT_ID = re.compile(r"^[a-z0-9_-]{1,64}$")
_MAX_TEXT = 200

# The SNR estimate: 20 ms frames; the speech level is a high percentile of the last seconds (the utterance
# that just completed), the noise floor a low percentile of a longer history (the room between words).
FRAME_SAMPLES = 320
SPEECH_SECONDS = 3.0
HISTORY_SECONDS = 8.0
SPEECH_PERCENTILE = 95.0
NOISE_PERCENTILE = 10.0
MIN_ENERGY = 1.0  # int16 LSB^2: digital silence counts as one LSB of noise (the SNR stays finite)


# --------------------------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Claim:
    """One agent's bid for one utterance."""

    id: str  # unique: <agent>-<process token>-<sequence number>
    agent: str
    intent: str  # the action name
    snr: float  # dB, from the claimant's own audio
    wake: float  # the wake word's score
    command: float  # the lowest score of the command's words
    ago: float  # seconds from the audio that completed the intent to sending the claim

    def rank(self) -> tuple[float, float, float, str, str]:
        """Sort key, best first; ties end on the (unique) agent id, so every agent ranks alike."""
        return (-self.snr, -self.command, -self.wake, self.agent, self.id)

    def payload(self) -> bytes:
        return _dumps({"type": "claim", "id": self.id, "agent": self.agent, "intent": self.intent,
                       "snr": self.snr, "wake": self.wake, "command": self.command, "ago": self.ago})

    def describe(self) -> str:
        return f"{self.agent} (snr {self.snr:.1f} dB, wake {self.wake:.2f}, command {self.command:.2f})"


@dataclass(frozen=True, slots=True)
class Notice:
    """``won`` or ``withdrawn`` for a claim."""

    kind: MessageKind
    agent: str
    claim: str  # the claim's id

    def payload(self) -> bytes:
        return _dumps({"type": self.kind, "agent": self.agent, "claim": self.claim})


def _dumps(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode("utf-8")


def _text(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value or len(value) > _MAX_TEXT:
        raise PayloadError(f"arbitration message: {key!r} must be a non-empty string")
    return value


def _number(data: dict[str, Any], key: str, low: float, high: float) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not low <= value <= high:
        raise PayloadError(f"arbitration message: {key!r} must be a number in [{low:g}, {high:g}], "
                           f"got {value!r}")
    return float(value)


def parse_message(payload: bytes) -> Claim | Notice:
    """A group message; PayloadError (counted by the link as a bad payload) when it is not one."""
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PayloadError(f"arbitration message is not JSON: {err}") from err
    if not isinstance(data, dict):
        raise PayloadError("arbitration message must be a JSON object")
    kind = data.get("type")
    agent = _text(data, "agent")
    if not _AGENT_ID.match(agent):
        raise PayloadError(f"arbitration message: invalid agent id {agent!r}")
    if kind in NOTICE_KINDS:
        return Notice(kind, agent, _text(data, "claim"))
    if kind != "claim":
        raise PayloadError(f"arbitration message: unknown type {kind!r}")
    return Claim(id=_text(data, "id"), agent=agent, intent=_text(data, "intent"),
                 snr=_number(data, "snr", -200.0, 200.0), wake=_number(data, "wake", 0.0, 1.0),
                 command=_number(data, "command", 0.0, 1.0), ago=_number(data, "ago", 0.0, MAX_AGO))


# --------------------------------------------------------------------------------------------- decisions


OutcomeKind = Literal["won", "lost", "took_over", "withdrawn"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """A decision about one of our claims. ``won``/``took_over``: say ``won``, then ``act``. ``lost``: a
    better claim (``winner``) acts. ``withdrawn``: we cannot act; say so, so the next best takes over."""

    kind: OutcomeKind
    claim: Claim
    act: Callable[[], None]
    expires: float
    winner: Claim | None = None
    rivals: int = 0  # other claims in the round
    reason: str = ""


@dataclass(slots=True, eq=False)
class _Seen:
    claim: Claim
    received: float  # on our clock
    gone: bool = False  # withdrawn, or its agent went offline without saying "won"
    acted: bool = False

    @property
    def ref(self) -> float:
        """When the claimant's audio completed the intent, on our clock."""
        return self.received - self.claim.ago


@dataclass(slots=True, eq=False)
class _Round:
    own: Claim
    ref: float
    deadline: float  # the round closes: window after its first claim
    expires: float  # the intent's time-to-live ends
    act: Callable[[], None]
    rivals: dict[str, _Seen] = field(default_factory=dict)  # claim id -> claim, received before the close
    echoed: bool = False  # our claim came back from the broker
    leader: _Seen | None = None  # lost to it; waiting for its "won" (or its departure)


class Arbitration:
    """The decisions of one agent. Pure: the caller passes ``now`` (monotonic seconds) everywhere, sends the
    claims it opens, feeds in what the group topic and the peers' availability say, calls ``due`` when
    ``next_due`` comes, and carries out the returned outcomes. Not thread-safe."""

    def __init__(self, agent_id: str, *, window: float, match_tolerance: float) -> None:
        self.agent_id = agent_id
        self.window = window
        self.match_tolerance = match_tolerance
        self._seen: dict[str, _Seen] = {}  # foreign claims by id
        self._rounds: dict[str, _Round] = {}  # our undecided (or waiting) claims by id

    @property
    def pending(self) -> int:
        """Our claims not yet done with (undecided, or lost and waiting for the winner to confirm)."""
        return len(self._rounds)

    @property
    def undecided(self) -> int:
        """Our claims whose round has not closed yet."""
        return sum(1 for current in self._rounds.values() if current.leader is None)

    def _matches(self, seen: _Seen, intent: str, ref: float) -> bool:
        return seen.claim.intent == intent and abs(seen.ref - ref) <= self.match_tolerance

    def open(self, claim: Claim, now: float, *, expires: float, act: Callable[[], None]) -> list[Outcome]:
        """Our own claim, about to be sent. Returns a ``lost`` outcome at once (send nothing) when the round
        for this utterance closed already; otherwise nothing until ``due``."""
        self._prune(now)
        ref = now - claim.ago
        matching = [seen for seen in self._seen.values() if self._matches(seen, claim.intent, ref)]
        first = min((seen.received for seen in matching), default=now)
        acted = next((seen for seen in matching if seen.acted), None)
        if acted is not None:
            return [Outcome("lost", claim, act, expires, winner=acted.claim, rivals=len(matching),
                            reason="it acted already")]
        if now > first + self.window:
            earliest = min(matching, key=lambda seen: seen.received)
            return [Outcome("lost", claim, act, expires, winner=earliest.claim, rivals=len(matching),
                            reason=f"late: {earliest.claim.agent} claimed it {now - first:.3f} s before us")]
        deadline = min(first, now) + self.window
        self._rounds[claim.id] = _Round(claim, ref, deadline, expires, act,
                                        {seen.claim.id: seen for seen in matching})
        return []

    def receive(self, message: Claim | Notice, now: float) -> list[Outcome]:
        """A message from the group topic (our own included: the broker echoes them)."""
        self._prune(now)
        if message.agent == self.agent_id:
            if isinstance(message, Claim) and message.id in self._rounds:
                self._rounds[message.id].echoed = True
                return self.due(now)
            return []
        if isinstance(message, Claim):
            seen = _Seen(message, now)
            self._seen[message.id] = seen
            for current in self._rounds.values():
                if current.leader is None and now <= current.deadline \
                        and self._matches(seen, current.own.intent, current.ref):
                    current.rivals[message.id] = seen
            return []
        target = self._seen.get(message.claim)
        if target is None or target.claim.agent != message.agent:
            return []
        if message.kind == "won":
            target.acted = True
            outcomes = []
            for claim_id, current in list(self._rounds.items()):
                if message.claim not in current.rivals:
                    continue
                del self._rounds[claim_id]  # someone acted on this utterance: it is done
                if current.leader is None:  # it closed its round before we did ours
                    outcomes.append(Outcome("lost", current.own, current.act, current.expires,
                                            winner=target.claim, rivals=len(current.rivals),
                                            reason="it acted before our round closed"))
            return outcomes
        target.gone = True
        return self._successions()

    def offline(self, agent: str, now: float) -> list[Outcome]:
        """``agent`` went offline (its last will): its claims that never said "won" no longer count."""
        self._prune(now)
        for seen in self._seen.values():
            if seen.claim.agent == agent and not seen.acted:
                seen.gone = True
        return self._successions()

    def due(self, now: float) -> list[Outcome]:
        """Close the rounds whose time has come."""
        outcomes: list[Outcome] = []
        for claim_id, current in list(self._rounds.items()):
            if current.leader is not None:
                if now >= current.expires:
                    del self._rounds[claim_id]  # the winner never confirmed; acting now would be late
                continue
            if now < current.deadline:
                continue
            if not current.echoed:
                if now < current.deadline + self.window:
                    continue  # the broker is slow: wait one more window for our claim to come back
                del self._rounds[claim_id]
                outcomes.append(Outcome("withdrawn", current.own, current.act, current.expires,
                                        rivals=len(current.rivals),
                                        reason="our claim did not come back from the broker in time"))
                continue
            outcomes.extend(self._decide(claim_id, current, "won"))
        return outcomes

    def next_due(self, now: float) -> float | None:
        """When ``due`` should run next (None: nothing pending)."""
        times = []
        for current in self._rounds.values():
            if current.leader is not None:
                times.append(current.expires)
            elif now < current.deadline or current.echoed:
                times.append(current.deadline)
            else:
                times.append(current.deadline + self.window)
        return min(times, default=None)

    def _decide(self, claim_id: str, current: _Round, win: OutcomeKind) -> list[Outcome]:
        standing = [seen for seen in current.rivals.values() if not seen.gone]
        best = min(standing, key=lambda seen: seen.claim.rank(), default=None)
        if best is None or current.own.rank() < best.claim.rank():
            del self._rounds[claim_id]
            return [Outcome(win, current.own, current.act, current.expires, rivals=len(current.rivals))]
        lost = current.leader is None
        current.leader = best
        if not lost:
            return []  # a successor that is not us: keep waiting
        return [Outcome("lost", current.own, current.act, current.expires, winner=best.claim,
                        rivals=len(current.rivals))]

    def _successions(self) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for claim_id, current in list(self._rounds.items()):
            if current.leader is not None and current.leader.gone:
                outcomes.extend(self._decide(claim_id, current, "took_over"))
        return outcomes

    def _prune(self, now: float) -> None:
        in_use = {claim_id for current in self._rounds.values() for claim_id in current.rivals}
        for claim_id in [claim_id for claim_id, seen in self._seen.items()
                         if seen.received < now - MEMORY_SECONDS and claim_id not in in_use]:
            del self._seen[claim_id]


# --------------------------------------------------------------------------------------------- SNR


class LevelMeter:
    """Energy of 20 ms frames over the last seconds of audio; ``snr_db`` compares the loud frames of the
    utterance just heard with the room's noise floor. Gain-independent: a louder microphone does not win."""

    def __init__(self, history_seconds: float = HISTORY_SECONDS, speech_seconds: float = SPEECH_SECONDS,
                 sample_rate: int = 16000) -> None:
        frames_per_second = sample_rate / FRAME_SAMPLES
        self._energies: deque[float] = deque(maxlen=max(1, round(history_seconds * frames_per_second)))
        self._speech_frames = max(1, round(speech_seconds * frames_per_second))
        self._partial = np.zeros(0, dtype=np.float64)

    def push(self, samples: npt.NDArray[np.int16]) -> None:
        block = np.concatenate([self._partial, np.asarray(samples, dtype=np.float64)])
        whole = len(block) // FRAME_SAMPLES * FRAME_SAMPLES
        if whole:
            frames = block[:whole].reshape(-1, FRAME_SAMPLES)
            self._energies.extend(np.mean(frames * frames, axis=1).tolist())
        self._partial = block[whole:]

    def snr_db(self) -> float:
        """Speech level over noise floor in dB (0.0 before any audio)."""
        if not self._energies:
            return 0.0
        energies = np.fromiter(self._energies, dtype=np.float64, count=len(self._energies))
        speech = float(np.percentile(energies[-self._speech_frames:], SPEECH_PERCENTILE))
        noise = float(np.percentile(energies, NOISE_PERCENTILE))
        return 10.0 * math.log10(max(speech, MIN_ENERGY) / max(noise, MIN_ENERGY))


# --------------------------------------------------------------------------------------------- MQTT


class Publisher(Protocol):
    def __call__(self, topic: str, payload: bytes | str, *, qos: int = 0, retain: bool = False,
                 expires_mono: float | None = None) -> bool: ...


Subscriber = Callable[[str, Handler, int], object]
Scheduler = Callable[[float, Callable[[], None]], None]


class GroupArbiter:
    """One agent's arbitration on the MQTT link. The voice stage feeds it what it hears (``hear``) and hands
    it each intent with the callable that acts on it (``submit``); the callable runs on the supervisor's
    main thread if and when this agent wins. Handlers on paho's thread only parse and hand over."""

    def __init__(self, config: Config, *, publish: Publisher, subscribe: Subscriber, call_later: Scheduler,
                 clock: Callable[[], float] = time.monotonic) -> None:
        settings = config.arbitration
        topics = Topics.from_config(config)
        if settings is None or topics.arbitration is None:
            raise ValueError("GroupArbiter needs an [arbitration] section")
        self.topic = topics.arbitration
        self.window = settings.window
        self.agent_id = config.agent.id
        self._wake_word = config.voice.wake_word
        self._publish = publish
        self._call_later = call_later
        self._clock = clock
        self._core = Arbitration(self.agent_id, window=settings.window,
                                 match_tolerance=settings.match_tolerance)
        self._lock = threading.Lock()
        self._pending: list[Outcome] = []
        self._timer_at: float | None = None
        self._token = secrets.token_hex(4)  # claim ids stay unique across restarts
        self._sequence = itertools.count(1)
        self._meter = LevelMeter()
        self._wake_score = 0.0
        self._counts = {"arbitrations_won": 0, "arbitrations_lost": 0, "arbitration_takeovers": 0}
        subscribe(self.topic, self._on_message, 1)
        subscribe(topics.peers_availability, self._on_availability, 1)

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    @property
    def undecided(self) -> int:
        """Intents still waiting for the group's decision (``--exit-at-end`` waits for them)."""
        with self._lock:
            return self._core.undecided + len(self._pending)

    # ----------------------------------------------------------------- the voice thread

    def hear(self, samples: npt.NDArray[np.int16], detections: Sequence[Detection]) -> None:
        """Every block of audio the pipeline was fed, and the words it detected in it."""
        self._meter.push(samples)
        for detection in detections:
            if detection.word == self._wake_word:
                self._wake_score = detection.score

    def submit(self, intent: Intent, act: Callable[[], None], *, expires: float) -> Claim:
        """Claim ``intent`` for this agent; ``act()`` runs later on the main thread if we win."""
        now = self._clock()
        claim = Claim(id=f"{self.agent_id}-{self._token}-{next(self._sequence)}", agent=self.agent_id,
                      intent=intent.action, snr=round(self._meter.snr_db(), 2),
                      wake=round(self._wake_score, 4),
                      command=round(min(intent.scores, default=0.0), 4),
                      ago=round(min(MAX_AGO, max(0.0, now - intent.created_mono)), 4))
        self._wake_score = 0.0
        with self._lock:
            outcomes = self._core.open(claim, now, expires=expires, act=act)
        if not outcomes:
            # Never delivered after the window: a claim the others see late would only lose.
            self._publish(self.topic, claim.payload(), qos=1, expires_mono=now + self.window)
            log.info("arbitration: claimed %s as %s", claim.intent, claim.describe())
        self._hand_over(outcomes)
        return claim

    # ----------------------------------------------------------------- paho's thread

    def _on_message(self, message: InboundMessage) -> None:
        parsed = parse_message(message.payload)
        with self._lock:
            outcomes = self._core.receive(parsed, message.received_mono)
        self._hand_over(outcomes)

    def _on_availability(self, message: InboundMessage) -> None:
        if message.payload != b"offline":
            return
        agent = message.topic.split("/")[-2]
        if agent == self.agent_id:
            return
        with self._lock:
            outcomes = self._core.offline(agent, message.received_mono)
        self._hand_over(outcomes)

    # ----------------------------------------------------------------- the main thread

    def _hand_over(self, outcomes: Iterable[Outcome]) -> None:
        """Queue outcomes for the main thread and make sure it looks at the rounds again."""
        with self._lock:
            self._pending.extend(outcomes)
        self._call_later(0.0, self._run)

    def _run(self) -> None:
        now = self._clock()
        with self._lock:
            outcomes = [*self._pending, *self._core.due(now)]
            self._pending.clear()
            due = self._core.next_due(now)
            if due is not None and (self._timer_at is None or due < self._timer_at or self._timer_at <= now):
                self._timer_at = due
            else:
                due = None
        if due is not None:
            self._call_later(max(0.0, due - now), self._run)
        for outcome in outcomes:
            self._carry_out(outcome)

    def _carry_out(self, outcome: Outcome) -> None:
        claim = outcome.claim
        if outcome.kind in ("won", "took_over"):
            # "won" first: if we die before it leaves, neither does the action (queued after it) and the next
            # best takes over; once it has left, the others stand down.
            self._publish(self.topic, Notice("won", self.agent_id, claim.id).payload(), qos=1,
                          expires_mono=outcome.expires)
            self._count("arbitrations_won")
            if outcome.kind == "took_over":
                self._count("arbitration_takeovers")
                log.warning("arbitration: took over %s (the better claimant left without acting)",
                            claim.intent)
            else:
                log.info("arbitration: won %s against %d other claim(s)", claim.intent, outcome.rivals)
            outcome.act()
            return
        self._count("arbitrations_lost")
        if outcome.kind == "withdrawn":
            self._publish(self.topic, Notice("withdrawn", self.agent_id, claim.id).payload(), qos=1,
                          expires_mono=outcome.expires)
            log.warning("arbitration: not acting on %s: %s", claim.intent, outcome.reason)
        elif outcome.winner is not None:
            log.info("arbitration: lost %s to %s; ours: snr %.1f dB%s", claim.intent,
                     outcome.winner.describe(), claim.snr, f" ({outcome.reason})" if outcome.reason else "")

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1
