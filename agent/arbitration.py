"""Arbitration: when several agents of one home hear the same utterance, exactly one of them acts on it.

Agents that share an ``[arbitration] group`` talk on one topic, ``Topics.arbitration``. Every message is JSON,
QoS 1, never retained, and one of:

- ``claim``: an agent recognised an intent. It says how well it heard it (``snr``: a signal-to-noise estimate
  in dB from its own audio, the ``wake`` and ``command`` scores) and ``ago``: the seconds between the moment
  its audio completed the intent and sending the claim. A claim expires after the window (never sent late).
- ``close``: ends the round that a claim opened. Whatever the broker delivered before it belongs to the round.
- ``won``: the winner says so, then publishes the intent and fires the action.

Decisions follow the broker's ORDER, never clocks compared across machines: the broker delivers the messages
of one topic to every subscriber in the same order, so every agent sees the same rounds and the same winner. A
claim whose utterance matches no round still open opens one; its agent publishes ``close`` ``window`` seconds
after publishing the claim (less the broker's round trips, so that a lone agent's action leaves one window
after its claim, no later). The claims delivered between a round's first claim and its first ``close`` are the
round; the best of them wins: higher SNR, then higher command score, higher wake score, lower agent id. A
claim delivered after the close is late and loses (the winner has acted); an agent that sees the round closed
already does not even send its claim. Claims match one utterance without synchronised clocks: each receiver
places a claim's utterance on its OWN monotonic clock at ``received - ago``, and claims for the same intent
within ``match_tolerance`` of a round's first claim belong to it (a repeated command comes a whole utterance,
more than a second, later).

Failures: a round whose first claimant goes silent is closed by the next claimant (at once when the broker
announces the first one's last will, ``offline`` on its availability topic; otherwise one window later per
place in the round); any close will do, since only the first one in the broker's order counts. A winner that
goes offline before saying ``won`` is replaced by the best remaining claim of the round, until the intent's
time-to-live ends. While the broker is down claims expire unsent: nothing is decided and nothing is sent late.

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
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from agent.config import Config
from agent.counts import Counts
from agent.errors import PayloadError
from agent.messages import Detection, InboundMessage, Intent
from agent.ports import Publisher, Scheduler, Subscriber
from agent.topics import Topics

log = logging.getLogger(__name__)

NoticeKind = Literal["close", "won"]
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
    """``close`` (``claim``: the round's first claim) or ``won`` (``claim``: the winning claim)."""

    kind: NoticeKind
    agent: str  # who sends it
    claim: str  # a claim's id

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
    if kind in {"close", "won"}:
        return Notice("close" if kind == "close" else "won", agent, _text(data, "claim"))
    if kind != "claim":
        raise PayloadError(f"arbitration message: unknown type {kind!r}")
    return Claim(id=_text(data, "id"), agent=agent, intent=_text(data, "intent"),
                 snr=_number(data, "snr", -200.0, 200.0), wake=_number(data, "wake", 0.0, 1.0),
                 command=_number(data, "command", 0.0, 1.0), ago=_number(data, "ago", 0.0, MAX_AGO))


# --------------------------------------------------------------------------------------------- decisions


OutcomeKind = Literal["close", "won", "took_over", "lost", "unheard"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the caller must do about one of our claims. ``close``: publish ``close`` for the round ``claim``
    opened (a claim of any agent). ``won``/``took_over``: publish ``won``, then ``act()``. ``lost``: a better
    claim (``winner``) acts, or ours came too late. ``unheard``: our claim never came back from the broker."""

    kind: OutcomeKind
    claim: Claim
    act: Callable[[], None]
    expires: float
    winner: Claim | None = None
    rivals: int = 0  # other claims in the round
    reason: str = ""


@dataclass(slots=True, eq=False)
class _Entry:
    claim: Claim
    received: float  # on our clock
    gone: bool = False  # its agent went offline before this claim's round was done


@dataclass(slots=True, eq=False)
class _Round:
    entries: list[_Entry]  # in the broker's order; the first opened the round
    closed: bool = False
    winner: _Entry | None = None
    done: bool = False  # the winner said "won"

    @property
    def opener(self) -> _Entry:
        return self.entries[0]

    @property
    def ref(self) -> float:
        """When the first claimant's audio completed the intent, on our clock."""
        return self.opener.received - self.opener.claim.ago

    def best(self) -> _Entry | None:
        return min((e for e in self.entries if not e.gone), key=lambda e: e.claim.rank(), default=None)


@dataclass(slots=True, eq=False)
class _Mine:
    claim: Claim
    sent: float  # when we published it
    expires: float  # the intent's time-to-live ends
    act: Callable[[], None]
    round: _Round | None = None  # once it came back from the broker
    closed_by_us: bool = False
    finished: bool = False  # won, lost, or given up


class Arbitration:
    """The decisions of one agent. Pure: the caller passes ``now`` (monotonic seconds) everywhere, publishes
    the claims ``open`` accepts, feeds in everything from the group topic (ours included: the broker echoes
    them) and the peers' last wills, calls ``due`` at ``next_due``, and carries out the outcomes. Not
    thread-safe."""

    def __init__(self, agent_id: str, *, window: float, match_tolerance: float) -> None:
        self.agent_id = agent_id
        self.window = window
        self.match_tolerance = match_tolerance
        self._rounds: list[_Round] = []  # oldest first
        self._mine: dict[str, _Mine] = {}  # our claims not finished yet, by id

    @property
    def undecided(self) -> int:
        """Our claims whose round has not closed yet."""
        return sum(1 for mine in self._mine.values() if mine.round is None or not mine.round.closed)

    def _round_for(self, claim: Claim, ref: float) -> _Round | None:
        """The round of this utterance: same intent, its first claim's utterance nearest to ``ref``."""
        candidates = [r for r in self._rounds if r.opener.claim.intent == claim.intent
                      and abs(r.ref - ref) <= self.match_tolerance]
        return min(candidates, key=lambda r: abs(r.ref - ref), default=None)

    def open(self, claim: Claim, now: float, *, expires: float, act: Callable[[], None]) -> list[Outcome]:
        """Our own claim, about to be published. Returns ``lost`` at once (publish nothing) when its round
        closed already; otherwise the claim is published and its fate follows."""
        self._prune(now)
        current = self._round_for(claim, now - claim.ago)
        if current is not None and current.closed:
            winner = current.winner.claim if current.winner is not None else None
            return [Outcome("lost", claim, act, expires, winner=winner, rivals=len(current.entries),
                            reason="late: the round was closed before we heard it")]
        self._mine[claim.id] = _Mine(claim, now, expires, act)
        return []

    def receive(self, message: Claim | Notice, now: float) -> list[Outcome]:
        """A message from the group topic, in the broker's order."""
        self._prune(now)
        if isinstance(message, Claim):
            return self._on_claim(message, now)
        current = next((r for r in self._rounds
                        if any(e.claim.id == message.claim for e in r.entries)), None)
        if current is None:
            return []
        if message.kind == "won":
            current.done = True
            for entry in current.entries:  # nothing left to wait for
                if entry.claim.id in self._mine:
                    self._mine[entry.claim.id].finished = True
            return []
        if current.closed or message.claim != current.opener.claim.id:
            return []  # only the first close of a round counts
        current.closed = True
        current.winner = current.best()
        return self._settle(current)

    def offline(self, agent: str, now: float) -> list[Outcome]:
        """``agent`` went offline (its last will): its claims in rounds not done no longer count."""
        self._prune(now)
        outcomes: list[Outcome] = []
        for current in self._rounds:
            if current.done:
                continue
            for entry in current.entries:
                if entry.claim.agent == agent:
                    entry.gone = True
            if current.closed and current.winner is not None and current.winner.gone:
                current.winner = current.best()  # a successor, if any claimant is left
                outcomes.extend(self._settle(current, took_over=True))
        return outcomes

    def due(self, now: float) -> list[Outcome]:
        """Close the rounds whose time has come; give up on claims the broker never returned."""
        outcomes: list[Outcome] = []
        for mine in list(self._mine.values()):
            current = mine.round
            if current is None:
                if now >= mine.expires:
                    mine.finished = True
                    outcomes.append(Outcome("unheard", mine.claim, mine.act, mine.expires,
                                            reason="our claim never came back from the broker"))
                continue
            if not current.closed and not mine.closed_by_us:
                at = self._close_at(mine, current)
                if at is not None and now >= at:
                    mine.closed_by_us = True
                    outcomes.append(Outcome("close", current.opener.claim, mine.act, mine.expires))
            if current.closed and now >= mine.expires:
                mine.finished = True  # lost, waiting for a winner that never confirmed: too late now
        self._mine = {k: m for k, m in self._mine.items() if not m.finished}
        return outcomes

    def next_due(self, now: float) -> float | None:
        """When ``due`` should run next (None: nothing pending)."""
        times = []
        for mine in self._mine.values():
            times.append(mine.expires)
            if mine.round is not None and not mine.round.closed and not mine.closed_by_us:
                at = self._close_at(mine, mine.round)
                if at is not None:
                    times.append(at)
        return min(times, default=None)

    def _close_at(self, mine: _Mine, current: _Round) -> float | None:
        """When we close a round we have a claim in: the first claimant one window after sending its claim,
        less two broker round trips (its claim reached the others that much earlier, and the close must come
        back before we act: the action leaves one window after the claim); if it went offline,
        the next one at once; every later claimant one window later per place, in case the ones before went
        silent without going offline."""
        standing = [e for e in current.entries if not e.gone]
        place = next((i for i, e in enumerate(standing) if e.claim.id == mine.claim.id), None)
        if place is None:
            return None
        if current.opener.claim.id == mine.claim.id:
            round_trip = min(max(0.0, current.opener.received - mine.sent), self.window / 4)
            return mine.sent + self.window - 2 * round_trip
        return current.opener.received + self.window * (1 + place)

    def _on_claim(self, claim: Claim, now: float) -> list[Outcome]:
        entry = _Entry(claim, now)
        current = self._round_for(claim, now - claim.ago)
        mine = self._mine.get(claim.id) if claim.agent == self.agent_id else None
        if current is None:
            current = _Round([entry])
            self._rounds.append(current)
        elif current.closed:
            if mine is None:
                return []  # late; its agent sees the same and stands down
            mine.finished = True
            del self._mine[claim.id]
            winner = current.winner.claim if current.winner is not None else None
            return [Outcome("lost", claim, mine.act, mine.expires, winner=winner, rivals=len(current.entries),
                            reason="late: it reached the broker after the round was closed")]
        else:
            current.entries.append(entry)
        if mine is not None:
            mine.round = current
        return []

    def _settle(self, current: _Round, *, took_over: bool = False) -> list[Outcome]:
        """Outcomes for our claims in a round that now has a winner (or a new one)."""
        outcomes: list[Outcome] = []
        winner = current.winner
        rivals = len(current.entries) - 1
        for entry in current.entries:
            mine = self._mine.get(entry.claim.id)
            if mine is None or mine.finished:
                continue
            if entry is winner:
                mine.finished = True
                outcomes.append(Outcome("took_over" if took_over else "won", entry.claim, mine.act,
                                        mine.expires, rivals=rivals))
            elif not took_over:  # lost once; a later succession only matters to the new winner
                outcomes.append(Outcome("lost", entry.claim, mine.act, mine.expires,
                                        winner=winner.claim if winner is not None else None, rivals=rivals))
        return outcomes

    def _prune(self, now: float) -> None:
        live = {id(mine.round) for mine in self._mine.values() if mine.round is not None}
        self._rounds = [r for r in self._rounds if id(r) in live or r.opener.received >= now - MEMORY_SECONDS]
        self._mine = {k: m for k, m in self._mine.items() if not m.finished}


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


class GroupArbiter:
    """One agent's arbitration on the MQTT link. The voice stage feeds it what it hears (``hear``) and hands
    it each intent with the callable that acts on it (``submit``); the callable runs if and when this agent
    wins, on the thread that learnt it (paho's, or the main thread's timer): it must only queue messages."""

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
        self._timer_at: float | None = None
        self._token = secrets.token_hex(4)  # claim ids stay unique across restarts
        self._sequence = itertools.count(1)
        self._meter = LevelMeter()
        self._wake_score = 0.0
        self._counts = Counts("arbitrations_won", "arbitrations_lost", "arbitration_takeovers")
        subscribe(self.topic, self._on_message, 1)
        subscribe(topics.peers_availability, self._on_availability, 1)

    def counters(self) -> dict[str, int]:
        return self._counts.snapshot()

    @property
    def undecided(self) -> int:
        """Intents still waiting for the group's decision (``--exit-at-end`` waits for them)."""
        with self._lock:
            return self._core.undecided

    # ----------------------------------------------------------------- the voice thread

    def hear(self, samples: npt.NDArray[np.int16], detections: Sequence[Detection]) -> None:
        """Every block of audio the pipeline was fed, and the words it detected in it."""
        self._meter.push(samples)
        for detection in detections:
            if detection.word == self._wake_word:
                self._wake_score = detection.score

    def submit(self, intent: Intent, act: Callable[[], None], *, expires: float) -> Claim:
        """Claim ``intent`` for this agent; ``act()`` runs later (on paho's thread) if we win."""
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

    # ----------------------------------------------------------------- any thread

    def _hand_over(self, outcomes: Iterable[Outcome]) -> None:
        """Carry out outcomes at once, on the thread that decided them (paho's, when the close arrives: no
        hand-over to the main thread on the way to the action; carrying out only queues messages), and have
        the main thread look at the timers again."""
        for outcome in outcomes:
            self._carry_out(outcome)
        self._call_later(0.0, self._run)

    def _run(self) -> None:
        """The main thread's timer: close rounds, give up claims, schedule the next look."""
        now = self._clock()
        with self._lock:
            outcomes = self._core.due(now)
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
        if outcome.kind == "close":  # may arrive late: only the first close of a round counts, for everyone
            self._publish(self.topic, Notice("close", self.agent_id, claim.id).payload(), qos=1,
                          expires_mono=outcome.expires)
            return
        if outcome.kind in ("won", "took_over"):
            # "won" first: if we die before it leaves, neither does the action (queued after it) and the next
            # best takes over; once it has left, the others stand down.
            self._publish(self.topic, Notice("won", self.agent_id, claim.id).payload(), qos=1,
                          expires_mono=outcome.expires)
            self._counts.add("arbitrations_won")
            if outcome.kind == "took_over":
                self._counts.add("arbitration_takeovers")
                log.warning("arbitration: took over %s (the better claimant left without acting)",
                            claim.intent)
            else:
                log.info("arbitration: won %s against %d other claim(s)", claim.intent, outcome.rivals)
            outcome.act()
            return
        self._counts.add("arbitrations_lost")
        if outcome.kind == "unheard":
            log.warning("arbitration: not acting on %s: %s", claim.intent, outcome.reason)
            return
        winner = outcome.winner.describe() if outcome.winner is not None else "nobody left"
        log.info("arbitration: lost %s to %s; ours: snr %.1f dB%s", claim.intent, winner, claim.snr,
                 f" ({outcome.reason})" if outcome.reason else "")
