"""From per-hop model scores to words, and from words to intents. Pure: no I/O, no clocks of its own.

Two small state machines, both driven by *audio time* (seconds of audio since the stream started, passed in),
so a file processed as fast as possible behaves exactly like the same audio heard live:

- :class:`Recognizer` (after tflite-micro's ``RecognizeCommands``): averages the posteriors of the last
  ``smoothing_seconds``, takes the best label, and reports a :class:`~agent.messages.Detection` when it is
  a vocabulary word above that word's threshold. A word is reported once per utterance: it fires again only
  after its refractory time AND after its smoothed score fell back below the threshold (or another label took
  over). The detection is reported on the hop where the smoothed score first crosses the threshold, which
  keeps the command latency low (a word a wake window expects fires sooner once it is over, see
  ``RecognizerSettings.settled_seconds``); ``end`` is the end of the first window that scored the word above
  its threshold (about where the word ended) and ``start`` the beginning of that 1 s window, a bound on where
  it began.
- :class:`CommandMatcher`: the wake word opens a window of ``wake_window`` seconds in which the words of a
  configured phrase must follow in order; a complete phrase becomes an :class:`~agent.messages.Intent`.
  Actions marked ``confirm`` wait up to ``confirm_window`` seconds for ``yes`` (``no`` cancels).
"""

from __future__ import annotations

import collections
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from agent.errors import ConfigError
from agent.features import NON_WORD_LABELS, RowHistory
from agent.messages import Detection, Intent, Scores

YES_WORD = "yes"
NO_WORD = "no"
# When a complete phrase is also the start of a longer one ("light" and "light on"), wait this long for the
# next word before firing the shorter one.
DEFAULT_CONTINUATION_SECONDS = 1.0
HISTORY_ROWS = 16  # posteriors kept at first (5 at the default 0.5 s smoothing, 100 ms hops); grows if needed
MAX_EXPECTED_SETS = 64  # the label indices of this many sets of expected words are kept
# The most a posterior can be (a probability): what may_detect_next assumes of posteriors not yet seen.
MAX_POSTERIOR = 1.0
REACH_SLACK = 1e-4  # may_detect_next's margin for the float32 rounding of the averages


@dataclass(frozen=True, slots=True)
class RecognizerSettings:
    labels: tuple[str, ...]
    thresholds: Mapping[str, float]  # per vocabulary word, in (0, 1]
    smoothing_seconds: float  # posteriors are averaged over this much audio (0: only the newest)
    refractory_seconds: float  # a word does not fire again within this time of its last detection
    window_seconds: float = 1.0  # the model's input window, to bound where a detected word began
    # Averaging for the words a wake window expects next (``process(..., expected=...)``): the words that can
    # continue a configured phrase are smoothed less, for a faster reaction; every other word keeps
    # smoothing_seconds, so an unexpected word needs the full evidence. None: smoothing_seconds for all.
    listening_smoothing_seconds: float | None = None
    # A word the wake window expects, once it is over (``process(..., settled=True)``), fires as soon as each
    # of its posteriors of the last settled_seconds is at least its threshold plus settled_margin, without
    # waiting for the listening smoothing to catch up: the whole word is in the model's window by then, so
    # the onset confusions (the "d" of "down" heard as "no") that smoothing guards against are past.
    settled_seconds: float = 0.2
    settled_margin: float = 0.05

    def __post_init__(self) -> None:
        missing = [w for w in self.labels if w not in NON_WORD_LABELS and w not in self.thresholds]
        if missing:
            raise ValueError(f"no threshold for {', '.join(missing)}")
        if self.smoothing_seconds < 0 or self.refractory_seconds < 0 or self.window_seconds <= 0:
            raise ValueError("smoothing and refractory times must be >= 0 and the window positive")
        if self.listening_smoothing_seconds is not None and not \
                0 <= self.listening_smoothing_seconds <= self.smoothing_seconds:
            raise ValueError("listening_smoothing_seconds must be in [0, smoothing_seconds]")
        if self.settled_seconds <= 0 or self.settled_margin < 0:
            raise ValueError("settled_seconds must be positive and settled_margin >= 0")


class Recognizer:
    """Posterior smoothing, per-word thresholds and refractory time over a stream of :class:`Scores`."""

    def __init__(self, settings: RecognizerSettings) -> None:
        self.settings = settings
        self._labels = settings.labels
        # Per label, as Python objects: process() reads one entry per hop (a numpy scalar costs more).
        self._is_word = tuple(label not in NON_WORD_LABELS for label in self._labels)
        # float64, compared with float32 scores as float64 (a float32 threshold would be rounded); a label
        # that is no word never fires
        self._threshold = np.array([settings.thresholds[label] if is_word else np.inf
                                    for label, is_word in zip(self._labels, self._is_word, strict=True)])
        self._index = {label: i for i, label in enumerate(self._labels) if label not in NON_WORD_LABELS}
        self._indices: dict[frozenset[str], npt.NDArray[np.intp]] = {}  # expected words -> their labels
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new stream starts at audio time 0)."""
        # The posteriors of the last smoothing_seconds, oldest first: their times, and the values as rows of
        # one array (averaging them is then one reduction, not a stack of arrays per hop).
        self._times: collections.deque[float] = collections.deque()
        self._rows = RowHistory(HISTORY_ROWS, (len(self._labels),), dtype=np.float32)
        self._last_time: float | None = None
        self._last_fired: dict[str, float] = {}
        # A word may fire (again) when it tops; every label is re-armed on each hop it is not confidently on
        # top, so at most one (the top one, after it fired) is not armed at a time.
        self._disarmed: int | None = None
        self.detections = 0
        # What the last hop was judged on: each label's smoothed score (an expected word's over the listening
        # smoothing). Read by `transcribe --plot`.
        self.judged: npt.NDArray[np.float64] = np.zeros(len(self._labels))

    def _recent(self, count: int) -> npt.NDArray[np.float32]:
        """The newest ``count`` posteriors, oldest first, as rows."""
        if count > self._rows.keep:  # more hops in the smoothing time than ever before: a bigger buffer
            grown = RowHistory(max(count, 2 * self._rows.keep), (len(self._labels),), dtype=np.float32)
            grown.extend(self._rows.latest())
            self._rows = grown
        return self._rows.latest(count)

    def _average(self, count: int) -> npt.NDArray[Any]:
        """Mean of the newest ``count`` posteriors (float32), computed as np.mean of their stack computes it:
        the float32 sum over the rows in order, divided by the count as an intp, cast back to float32."""
        total: npt.NDArray[Any] = np.add.reduce(self._rows.latest(count), axis=0)
        np.true_divide(total, np.intp(count), out=total, casting="unsafe")
        return total

    def smoothed(self, seconds: float | None = None) -> npt.NDArray[np.float64]:
        """The posteriors averaged over the last ``seconds`` (default: smoothing_seconds); zeros before the
        first scores."""
        times = self._times
        if not times:
            return np.zeros(len(self._labels))
        count = len(times)
        if seconds is not None and seconds < self.settings.smoothing_seconds:
            count = max(1, self._count_since(seconds, times[-1]))
        return self._average(count)

    def may_detect_next(self, now: float) -> bool:
        """Whether :meth:`process` of the next hop (scores of audio time ``now``) could report a word,
        whatever its posteriors (each at most MAX_POSTERIOR) and the ``expected`` and ``settled`` it is given:
        False only when no word can reach its threshold even so, by the full or the listening smoothing, nor
        settle (its lowest posterior of the last settled_seconds already known to be below its threshold plus
        settled_margin). A bound for the voice stage, which then reads two hops at once (nothing can be heard
        on the first)."""
        settings = self.settings
        fast = settings.listening_smoothing_seconds
        if fast is None or fast >= settings.smoothing_seconds:
            fast = settings.smoothing_seconds
        # The posteriors each average then keeps besides the next one (the newest ones): with none, the next
        # one alone decides.
        full, quick = self._count_since(settings.smoothing_seconds, now), self._count_since(fast, now)
        settling = self._count_since(settings.settled_seconds, now)
        if not (full and quick and settling):
            return True
        rows = self._rows.latest(max(full, quick, settling))
        # The most each word can reach: by either smoothing, the next posterior at its largest; by settling,
        # the lowest posterior already known less the margin.
        reach = (np.add.reduce(rows[-full:], axis=0, dtype=np.float64) + MAX_POSTERIOR) / (full + 1)
        quickly = (np.add.reduce(rows[-quick:], axis=0, dtype=np.float64) + MAX_POSTERIOR) / (quick + 1)
        np.maximum(reach, quickly, out=reach)
        np.maximum(reach, np.minimum.reduce(rows[-settling:], axis=0) - settings.settled_margin, out=reach)
        reachable = reach >= self._threshold - REACH_SLACK
        for word, last in self._last_fired.items():
            if now - last < settings.refractory_seconds:  # still in its refractory time: cannot fire
                reachable[self._index[word]] = False
        return bool(reachable.any())

    def _expected_indices(self, expected: Collection[str]) -> npt.NDArray[np.intp]:
        """The label indices of the ``expected`` words (a wake window expects a few sets, over and over)."""
        key = expected if isinstance(expected, frozenset) else frozenset(expected)
        indices = self._indices.get(key)
        if indices is None:
            if len(self._indices) >= MAX_EXPECTED_SETS:
                self._indices.clear()
            indices = np.array(sorted(self._index[w] for w in key if w in self._index), dtype=np.intp)
            self._indices[key] = indices
        return indices

    def _count_since(self, seconds: float, now: float) -> int:
        """How many of the kept posteriors are from the last ``seconds`` before ``now`` (the newest first)."""
        horizon = now - seconds + 1e-6
        count = 0
        for t in reversed(self._times):
            if t <= horizon:
                break
            count += 1
        return count

    def _settle(self, average: npt.NDArray[Any], indices: npt.NDArray[np.intp], now: float) -> None:
        """An expected word (``indices``) whose smoothed score is still below its threshold is judged by its
        lowest posterior of the last settled_seconds instead, when that is at least its threshold plus
        settled_margin (a word the smoothing already passes keeps its score)."""
        recent = self._rows.latest(self._count_since(self.settings.settled_seconds, now))
        floor = np.min(recent, axis=0)[indices]
        threshold = self._threshold[indices]
        # as for each word alone: float32 score < float64 threshold <= float32 (floor - margin)
        settles = (average[indices] < threshold) & (threshold <= floor - self.settings.settled_margin)
        average[indices[settles]] = floor[settles]

    def process(self, scores: Scores, *, expected: Collection[str] = (),
                settled: bool = False) -> Detection | None:
        """Feed one model invocation; returns the word heard on this hop, if any. ``expected``: the words a
        wake window waits for (``listening_smoothing_seconds`` applies to them); ``settled``: the word now in
        the model's window is over (see ``settled_seconds``)."""
        if scores.labels is not self._labels and scores.labels != self._labels:
            raise ValueError("scores come from a model with different labels")
        now = scores.t_audio
        if self._last_time is not None and now <= self._last_time:
            raise ValueError(f"audio time must increase: {now} after {self._last_time} (call reset() first)")
        self._last_time = now
        times = self._times
        times.append(now)
        horizon = now - self.settings.smoothing_seconds + 1e-6  # tolerate float drift of summed hop times
        while len(times) > 1 and times[0] <= horizon:
            times.popleft()
        if len(times) > self._rows.keep:
            self._recent(len(times))  # room for the whole smoothing history
        self._rows.append(np.asarray(scores.values, dtype=np.float32))
        average = self._average(len(times))
        if expected:
            indices = self._expected_indices(expected)
            fast = self.settings.listening_smoothing_seconds
            if fast is not None and fast < self.settings.smoothing_seconds:
                average[indices] = self._average(max(1, self._count_since(fast, now)))[indices]
            if settled:
                self._settle(average, indices, now)
        self.judged = average

        top = int(average.argmax())
        # Re-arm every word that is not (or no longer) confidently on top: the next utterance may fire it.
        top_was_armed = self._disarmed != top
        self._disarmed = None
        # Both as Python floats: compared as float64, as with the array of thresholds
        if not self._is_word[top] or float(average[top]) < self._threshold.item(top):
            return None
        if not top_was_armed:
            self._disarmed = top
            return None
        top_label = self._labels[top]
        last = self._last_fired.get(top_label)
        if last is not None and now - last < self.settings.refractory_seconds:
            return None
        self._disarmed = top
        self._last_fired[top_label] = now
        self.detections += 1
        # The first window in the smoothing history that scored the word above its threshold ends about where
        # the word ended; its start bounds where the word began.
        threshold = self._threshold[top]
        rows = self._rows.latest(len(times))
        end = next((t for t, row in zip(times, rows, strict=True) if row[top] >= threshold), now)
        start = max(0.0, end - self.settings.window_seconds)
        return Detection(word=top_label, score=round(float(average[top]), 4), start=round(start, 3),
                         end=round(end, 3))


@dataclass(frozen=True, slots=True)
class Command:
    """A configured phrase and the action it fires."""

    words: tuple[str, ...]
    action: str
    confirm: bool = False


MatchKind = Literal["wake", "intent", "confirm_pending", "cancelled", "expired"]


@dataclass(frozen=True, slots=True)
class MatchEvent:
    """Something the command matcher decided, for the voice stage to act on and log."""

    kind: MatchKind
    t_audio: float
    action: str | None = None
    words: tuple[str, ...] = ()
    intent: Intent | None = None
    reason: str = ""


@dataclass(slots=True)
class PipelineOutput:
    """What one feed of the voice pipeline produced: the words heard and the matcher's events."""

    detections: list[Detection] = field(default_factory=list)
    events: list[MatchEvent] = field(default_factory=list)

    @property
    def intents(self) -> list[Intent]:
        return [event.intent for event in self.events if event.intent is not None]


@dataclass(slots=True)
class _Heard:
    words: list[str]
    scores: list[float]
    last_end: float


class CommandMatcher:
    """Wake word, then the words of a configured phrase in order, then (for confirm actions) "yes".

    States: *idle* (only the wake word counts), *listening* (until ``wake_window`` seconds after the wake
    word; command words accumulate), *confirming* (a matched confirm action waits for yes/no). Words that
    continue no phrase are ignored rather than aborting (a stray false detection should not eat a command);
    a word that cannot continue the current phrase but starts another one starts over with it.
    """

    def __init__(
        self,
        wake_word: str,
        commands: Sequence[Command],
        *,
        wake_window: float = 3.0,
        confirm_window: float = 5.0,
        continuation_seconds: float = DEFAULT_CONTINUATION_SECONDS,
    ) -> None:
        self.wake_word = wake_word
        self.commands = tuple(commands)
        self.wake_window = wake_window
        self.confirm_window = confirm_window
        self.continuation_seconds = continuation_seconds
        # Phrases are unique and never contain the wake word: config.VoiceSection refuses both.
        self._by_words = {command.words: command for command in self.commands}
        self._prefixes = {command.words[:n] for command in self.commands
                          for n in range(1, len(command.words) + 1)}
        self._first_words = frozenset(command.words[0] for command in self.commands)
        self.reset()

    def reset(self) -> None:
        self._state: Literal["idle", "listening", "confirming"] = "idle"
        self._deadline = 0.0
        self._heard: _Heard | None = None
        self._pending: tuple[Command, _Heard] | None = None  # a complete phrase that a longer one extends
        self._confirming: tuple[Command, _Heard] | None = None
        self._expected: frozenset[str] | None = None  # expected_words() until a word or a tick changes it

    @property
    def state(self) -> str:
        return self._state

    def expected_words(self) -> frozenset[str]:
        """The words that would make progress now: continuations of the phrase heard so far and the first
        words of every phrase while listening; yes/no while confirming; nothing while idle."""
        expected = self._expected
        if expected is None:
            expected = self._expected = self._expected_now()
        return expected

    def _expected_now(self) -> frozenset[str]:
        if self._state == "confirming":
            return frozenset((YES_WORD, NO_WORD))
        if self._state != "listening" or self._heard is None:
            return frozenset()
        heard = tuple(self._heard.words)
        return self._first_words | {p[len(heard)] for p in self._prefixes
                                    if len(p) == len(heard) + 1 and p[: len(heard)] == heard}

    def on_detection(self, detection: Detection, *, wall_time: float, mono_time: float) -> list[MatchEvent]:
        """Feed one detected word (in audio-time order)."""
        events = self._on_detection(detection, wall_time=wall_time, mono_time=mono_time)
        self._expected = None  # the word may have changed what comes next
        return events

    def _on_detection(self, detection: Detection, *, wall_time: float, mono_time: float) -> list[MatchEvent]:
        now = detection.end
        events = self.tick(now, wall_time=wall_time, mono_time=mono_time)
        word = detection.word
        if word == self.wake_word:
            if self._state == "confirming" and self._confirming is not None:
                events.append(self._cancel(self._confirming[0], now, "a new wake word"))
            self._state = "listening"
            self._deadline = now + self.wake_window
            self._heard = _Heard([], [], now)
            self._pending = None
            self._confirming = None
            events.append(MatchEvent("wake", now, words=(word,)))
            return events
        if self._state == "confirming" and self._confirming is not None:
            command, heard = self._confirming
            if word == YES_WORD:
                self._go_idle()
                words = (*heard.words, word)
                scores = (*heard.scores, detection.score)
                events.append(self._intent(command, words, scores, now, wall_time=wall_time,
                                           mono_time=mono_time))
            elif word == NO_WORD:
                self._go_idle()
                events.append(self._cancel(command, now, 'heard "no"'))
            return events
        if self._state != "listening" or self._heard is None:
            return events
        heard = self._heard
        candidate = (*heard.words, word)
        if candidate not in self._prefixes:
            if self._pending is not None:
                # The longer phrase did not come: fire the complete shorter one.
                command, pending_heard = self._pending
                events.extend(self._complete(command, pending_heard, wall_time, mono_time))
                return events
            if (word,) not in self._prefixes:
                return events  # continues nothing and starts nothing: ignore it
            heard.words.clear()
            heard.scores.clear()
            candidate = (word,)
        heard.words.append(word)
        heard.scores.append(detection.score)
        heard.last_end = now
        command_match = self._by_words.get(candidate)
        if command_match is None:
            return events  # a longer phrase is under way (a pending shorter one still fires if it stalls)
        extendable = any(len(p) > len(candidate) and p[: len(candidate)] == candidate for p in self._prefixes)
        if extendable:
            self._pending = (command_match, _Heard(list(heard.words), list(heard.scores), now))
            return events
        events.extend(self._complete(command_match, heard, wall_time, mono_time))
        return events

    def quiet_at(self, t_audio: float) -> bool:
        """Whether :meth:`tick` at ``t_audio`` (with no word heard since) would change nothing: no pending
        phrase is due and no window expires."""
        if self._state == "idle":
            return True
        pending = self._pending if self._state == "listening" else None
        if pending is not None and t_audio >= self._pending_due(pending):
            return False
        return t_audio <= self._deadline

    def _pending_due(self, pending: tuple[Command, _Heard]) -> float:
        """When a complete phrase that a longer one extends fires if the longer one does not come."""
        return min(pending[1].last_end + self.continuation_seconds, self._deadline)

    def tick(self, t_audio: float, *, wall_time: float, mono_time: float) -> list[MatchEvent]:
        """Advance audio time: fire a pending phrase whose continuation did not come, expire windows."""
        events: list[MatchEvent] = []
        if self._state == "listening":
            if self._pending is not None:
                command, heard = self._pending
                if t_audio >= self._pending_due(self._pending):
                    self._expected = None
                    events.extend(self._complete(command, heard, wall_time, mono_time))
                    return events
            if t_audio > self._deadline:
                self._expected = None
                partial = tuple(self._heard.words) if self._heard else ()
                self._go_idle()
                events.append(MatchEvent("expired", t_audio, words=partial,
                                         reason="no command after the wake word"))
        elif self._state == "confirming" and self._confirming is not None and t_audio > self._deadline:
            self._expected = None
            command = self._confirming[0]
            self._go_idle()
            events.append(self._cancel(command, t_audio, 'no "yes" in time', kind="expired"))
        return events

    def _complete(self, command: Command, heard: _Heard, wall_time: float,
                  mono_time: float) -> list[MatchEvent]:
        now = heard.last_end
        if command.confirm:
            self._state = "confirming"
            self._deadline = now + self.confirm_window
            self._confirming = (command, _Heard(list(heard.words), list(heard.scores), now))
            self._heard = None
            self._pending = None
            return [MatchEvent("confirm_pending", now, action=command.action, words=command.words)]
        self._go_idle()
        return [self._intent(command, tuple(heard.words), tuple(heard.scores), now, wall_time=wall_time,
                             mono_time=mono_time)]

    def _intent(self, command: Command, words: tuple[str, ...], scores: tuple[float, ...], t_audio: float, *,
                wall_time: float, mono_time: float) -> MatchEvent:
        intent = Intent(action=command.action, words=words, scores=scores, time=wall_time, t_audio=t_audio,
                        created_mono=mono_time)
        return MatchEvent("intent", t_audio, action=command.action, words=words, intent=intent)

    def _cancel(self, command: Command, t_audio: float, reason: str,
                kind: MatchKind = "cancelled") -> MatchEvent:
        return MatchEvent(kind, t_audio, action=command.action, words=command.words, reason=reason)

    def _go_idle(self) -> None:
        self._state = "idle"
        self._heard = None
        self._pending = None
        self._confirming = None


def effective_thresholds(model_thresholds: Mapping[str, float], labels: Iterable[str],
                         overrides: Mapping[str, float]) -> dict[str, float]:
    """The model's per-word thresholds with the config's overrides; an override for a word the model does not
    know is a ConfigError naming it."""
    words = [label for label in labels if label not in NON_WORD_LABELS]
    unknown = sorted(set(overrides) - set(words))
    if unknown:
        raise ConfigError(f"voice.thresholds: the model has no word {', '.join(map(repr, unknown))} "
                          f"(its words: {', '.join(words)})")
    thresholds = {word: float(model_thresholds[word]) for word in words if word in model_thresholds}
    thresholds.update({word: float(value) for word, value in overrides.items()})
    return thresholds


def check_vocabulary(labels: Iterable[str], wake_word: str, commands: Sequence[Command]) -> None:
    """Every word the configuration relies on must be one of the model's labels (ConfigError naming them).
    What needs no model (the wake word inside a phrase, a phrase twice) config.VoiceSection checks."""
    words = {label for label in labels if label not in NON_WORD_LABELS}
    problems: list[str] = []
    if wake_word not in words:
        problems.append(f"voice.wake_word: {wake_word!r} is not a word of the model")
    for index, command in enumerate(commands):
        unknown = [w for w in command.words if w not in words]
        if unknown:
            problems.append(f"voice.commands.{index}.say: {', '.join(map(repr, unknown))} "
                            f"{'is' if len(unknown) == 1 else 'are'} not in the model's labels")
    if any(command.confirm for command in commands):
        missing = [w for w in (YES_WORD, NO_WORD) if w not in words]
        if missing:
            problems.append(f"actions with confirm = true need the words {', '.join(missing)} in the model")
    if problems:
        problems.append(f"(the model's words: {', '.join(sorted(words))})")
        raise ConfigError("\n".join(problems))
