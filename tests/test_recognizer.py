"""The recognizer and the command matcher as pure units, driven by synthetic score sequences."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import numpy as np
import pytest

from agent.errors import ConfigError
from agent.messages import Detection, Scores
from agent.recognizer import (
    Command,
    CommandMatcher,
    MatchEvent,
    Recognizer,
    RecognizerSettings,
    check_vocabulary,
    effective_thresholds,
)

LABELS = ("computer", "on", "off", "up", "down", "stop", "go", "yes", "no", "left", "right",
          "light", "heat", "fan", "_silence_", "_unknown_")
HOP = 0.1


def settings(smoothing: float = 0.3, refractory: float = 1.0, **thresholds: float) -> RecognizerSettings:
    per_word = {label: 0.6 for label in LABELS if not label.startswith("_")}
    per_word.update(thresholds)
    return RecognizerSettings(labels=LABELS, thresholds=per_word, smoothing_seconds=smoothing,
                              refractory_seconds=refractory)


def frame(t: float, **word_scores: float) -> Scores:
    values = np.zeros(len(LABELS), dtype=np.float32)
    for word, score in word_scores.items():
        values[LABELS.index(word)] = score
    values[LABELS.index("_silence_")] = max(0.0, 1.0 - float(values.sum()))
    return Scores(labels=LABELS, values=values, t_audio=t)


def run(recognizer: Recognizer, frames: Iterable[dict[str, float]], start: float = 1.0) -> list[Detection]:
    """Feed one score dict per hop; returns the detections."""
    found = []
    for index, scores in enumerate(frames):
        detection = recognizer.process(frame(round(start + index * HOP, 3), **scores))
        if detection is not None:
            found.append(detection)
    return found


def silence(n: int) -> list[dict[str, float]]:
    return [{}] * n


def word(name: str, n: int = 5, score: float = 0.95) -> list[dict[str, float]]:
    return [{name: score}] * n


# ----------------------------------------------------------------------------- recognizer


def test_a_word_held_for_several_hops_is_detected_once() -> None:
    found = run(Recognizer(settings()), silence(5) + word("heat", 8) + silence(5))
    assert [d.word for d in found] == ["heat"]
    assert found[0].score >= 0.6


def test_a_single_hop_spike_is_smoothed_away() -> None:
    found = run(Recognizer(settings(smoothing=0.3)), silence(5) + word("stop", 1) + silence(5))
    assert found == []


def test_without_smoothing_a_single_hop_fires() -> None:
    found = run(Recognizer(settings(smoothing=0.0)), silence(5) + word("stop", 1) + silence(5))
    assert [d.word for d in found] == ["stop"]


def test_silence_and_unknown_never_become_detections() -> None:
    frames = [{"_unknown_": 0.99}] * 10 + silence(10)
    assert run(Recognizer(settings()), frames) == []


def test_per_word_threshold_decides() -> None:
    frames = silence(3) + word("fan", 6, score=0.7) + silence(3)
    assert run(Recognizer(settings(fan=0.8)), frames) == []
    assert [d.word for d in run(Recognizer(settings(fan=0.65)), frames)] == ["fan"]


def test_the_detection_fires_on_the_hop_the_smoothed_score_crosses_the_threshold() -> None:
    recognizer = Recognizer(settings(smoothing=0.3))
    times = []
    for index, scores in enumerate(silence(5) + word("go", 6) + silence(3)):
        t = round(1.0 + index * HOP, 3)
        if recognizer.process(frame(t, **scores)) is not None:
            times.append(t)
    # The word starts at hop 5 (t=1.5); the 3-hop mean of 0.95 passes 0.6 on the second hop (2 * 0.95 / 3).
    assert times == [1.6]


def test_start_and_end_bound_the_word() -> None:
    found = run(Recognizer(settings(smoothing=0.3)), silence(5) + word("go", 6) + silence(3))
    (detection,) = found
    assert detection.end == pytest.approx(1.5)  # the first window that scored "go" above its threshold
    assert detection.start == pytest.approx(0.5)  # that window's start
    assert detection.start <= detection.end


def test_repeat_after_a_pause_fires_again_but_not_within_refractory() -> None:
    # Two utterances 0.5 s apart: the second falls inside the 1 s refractory time.
    close = silence(3) + word("up", 4) + silence(2) + word("up", 4) + silence(3)
    assert [d.word for d in run(Recognizer(settings(refractory=1.0)), close)] == ["up"]
    apart = silence(3) + word("up", 4) + silence(12) + word("up", 4) + silence(3)
    assert [d.word for d in run(Recognizer(settings(refractory=1.0)), apart)] == ["up", "up"]


def test_a_long_plateau_fires_once_even_past_the_refractory_time() -> None:
    found = run(Recognizer(settings(refractory=0.5)), silence(3) + word("stop", 30) + silence(3))
    assert [d.word for d in found] == ["stop"]


def test_different_words_in_quick_succession_both_fire() -> None:
    found = run(Recognizer(settings()), silence(3) + word("heat", 4) + word("up", 4) + silence(3))
    assert [d.word for d in found] == ["heat", "up"]
    assert found[0].end < found[1].end


def test_refractory_zero_still_needs_the_score_to_drop() -> None:
    frames = silence(3) + word("no", 10) + silence(3) + word("no", 4)
    found = run(Recognizer(settings(refractory=0.0)), frames)
    assert [d.word for d in found] == ["no", "no"]


def test_the_best_label_wins_over_a_weaker_one_above_threshold() -> None:
    frames = silence(3) + [{"up": 0.62, "off": 0.35}] * 2 + [{"up": 0.3, "off": 0.68}] * 5 + silence(3)
    found = run(Recognizer(settings(up=0.6, off=0.6)), frames)
    assert [d.word for d in found] == ["off"]


def test_audio_time_must_increase_and_reset_restarts() -> None:
    recognizer = Recognizer(settings())
    recognizer.process(frame(1.0))
    with pytest.raises(ValueError, match="increase"):
        recognizer.process(frame(1.0))
    recognizer.reset()
    recognizer.process(frame(0.1))
    assert recognizer.smoothed().shape == (len(LABELS),)


def test_scores_of_another_model_are_rejected() -> None:
    with pytest.raises(ValueError, match="labels"):
        Recognizer(settings()).process(Scores(labels=("a", "b"), values=np.zeros(2, np.float32), t_audio=1.0))


def test_settings_need_a_threshold_for_every_word() -> None:
    with pytest.raises(ValueError, match="heat"):
        RecognizerSettings(labels=("heat", "_silence_"), thresholds={}, smoothing_seconds=0.2,
                           refractory_seconds=1.0)


# ----------------------------------------------------------------------------- matcher

COMMANDS = (
    Command(("heat", "up"), "heating_up"),
    Command(("heat", "down"), "heating_down"),
    Command(("light", "on"), "light_on"),
    Command(("light", "off"), "light_off", confirm=True),
    Command(("fan",), "fan_toggle"),
    Command(("stop",), "stop_all"),
    Command(("stop", "fan"), "fan_off"),
)


def matcher(**kwargs: float) -> CommandMatcher:
    return CommandMatcher("computer", COMMANDS, **kwargs)


def feed(m: CommandMatcher, words: Sequence[tuple[str, float]],
         tick_until: float | None = None) -> list[MatchEvent]:
    """Feed (word, time) pairs, ticking every hop in between like the pipeline does."""
    events: list[MatchEvent] = []
    t = 0.0
    for name, at in words:
        while t + HOP < at:
            t = round(t + HOP, 3)
            events += m.tick(t, wall_time=1000.0 + t, mono_time=50.0 + t)
        events += m.on_detection(Detection(name, 0.9, max(0.0, at - 1), at), wall_time=1000.0 + at,
                                 mono_time=50.0 + at)
        t = at
    if tick_until is not None:
        while t < tick_until:
            t = round(t + HOP, 3)
            events += m.tick(t, wall_time=1000.0 + t, mono_time=50.0 + t)
    return events


def intents(events: Iterable[MatchEvent]) -> list[tuple[str, tuple[str, ...]]]:
    return [(e.intent.action, e.intent.words) for e in events if e.intent is not None]


def test_wake_word_then_phrase_is_an_intent() -> None:
    events = feed(matcher(), [("computer", 1.0), ("heat", 1.6), ("up", 2.1)])
    assert intents(events) == [("heating_up", ("heat", "up"))]
    intent = next(e.intent for e in events if e.intent is not None)
    assert intent.t_audio == 2.1
    assert intent.time == pytest.approx(1002.1)
    assert intent.created_mono == pytest.approx(52.1)
    assert intent.scores == (0.9, 0.9)
    assert [e.kind for e in events] == ["wake", "intent"]


def test_a_phrase_without_the_wake_word_does_nothing() -> None:
    assert intents(feed(matcher(), [("heat", 1.0), ("up", 1.5)], tick_until=6)) == []


def test_the_wake_window_expires() -> None:
    events = feed(matcher(wake_window=3.0), [("computer", 1.0), ("heat", 3.5), ("up", 4.2)], tick_until=8)
    assert intents(events) == []
    assert any(e.kind == "expired" for e in events)


def test_words_out_of_order_do_not_match() -> None:
    assert intents(feed(matcher(), [("computer", 1.0), ("up", 1.5), ("heat", 2.0)], tick_until=6)) == []


def test_one_intent_per_wake_word() -> None:
    events = feed(matcher(), [("computer", 1.0), ("heat", 1.4), ("up", 1.8), ("heat", 2.2), ("up", 2.6)])
    assert intents(events) == [("heating_up", ("heat", "up"))]


def test_each_wake_word_allows_a_new_command() -> None:
    events = feed(matcher(), [("computer", 1.0), ("heat", 1.4), ("up", 1.8),
                              ("computer", 3.0), ("heat", 3.4), ("down", 3.8)])
    assert intents(events) == [("heating_up", ("heat", "up")), ("heating_down", ("heat", "down"))]


def test_a_stray_word_is_ignored() -> None:
    events = feed(matcher(), [("computer", 1.0), ("heat", 1.4), ("go", 1.7), ("up", 2.0)])
    assert intents(events) == [("heating_up", ("heat", "up"))]


def test_a_word_starting_another_phrase_starts_over() -> None:
    events = feed(matcher(), [("computer", 1.0), ("heat", 1.4), ("light", 1.8), ("on", 2.2)])
    assert intents(events) == [("light_on", ("light", "on"))]


def test_a_shorter_phrase_waits_for_a_longer_one() -> None:
    events = feed(matcher(), [("computer", 1.0), ("stop", 1.4), ("fan", 1.9)], tick_until=5)
    assert intents(events) == [("fan_off", ("stop", "fan"))]


def test_a_shorter_phrase_fires_when_no_continuation_comes() -> None:
    events = feed(matcher(continuation_seconds=1.0), [("computer", 1.0), ("stop", 1.4)], tick_until=5)
    assert intents(events) == [("stop_all", ("stop",))]
    intent = next(e.intent for e in events if e.intent is not None)
    assert intent.t_audio == 1.4  # the time of the phrase's last word, not of the timeout


def test_a_shorter_phrase_fires_when_a_non_continuing_word_comes() -> None:
    events = feed(matcher(), [("computer", 1.0), ("stop", 1.4), ("left", 1.8)])
    assert intents(events) == [("stop_all", ("stop",))]


def test_a_single_word_phrase() -> None:
    assert intents(feed(matcher(), [("computer", 1.0), ("fan", 1.5)])) == [("fan_toggle", ("fan",))]


def test_confirm_waits_for_yes() -> None:
    events = feed(matcher(), [("computer", 1.0), ("light", 1.4), ("off", 1.8), ("yes", 3.0)])
    assert [e.kind for e in events] == ["wake", "confirm_pending", "intent"]
    assert intents(events) == [("light_off", ("light", "off", "yes"))]


def test_confirm_no_cancels() -> None:
    events = feed(matcher(), [("computer", 1.0), ("light", 1.4), ("off", 1.8), ("no", 2.5), ("yes", 3.0)])
    assert intents(events) == []
    assert any(e.kind == "cancelled" and e.action == "light_off" for e in events)


def test_confirm_times_out() -> None:
    heard = [("computer", 1.0), ("light", 1.4), ("off", 1.8), ("yes", 4.5)]
    events = feed(matcher(confirm_window=2.0), heard)
    assert intents(events) == []
    assert any(e.kind == "expired" and e.action == "light_off" for e in events)


def test_a_new_wake_word_cancels_a_pending_confirmation() -> None:
    events = feed(matcher(), [("computer", 1.0), ("light", 1.4), ("off", 1.8),
                              ("computer", 2.5), ("heat", 2.9), ("up", 3.3), ("yes", 3.8)])
    assert intents(events) == [("heating_up", ("heat", "up"))]
    assert any(e.kind == "cancelled" and e.action == "light_off" for e in events)


def test_reset_forgets_the_wake_word() -> None:
    m = matcher()
    feed(m, [("computer", 1.0)])
    m.reset()
    assert m.state == "idle"
    assert intents(m.on_detection(Detection("fan", 0.9, 0.5, 1.5), wall_time=0.0, mono_time=0.0)) == []


# ----------------------------------------------------------------------------- vocabulary checks


def test_unknown_command_words_are_named() -> None:
    with pytest.raises(ConfigError) as info:
        check_vocabulary(LABELS, "computer", [Command(("heat", "max"), "a"), Command(("oven", "on"), "b")])
    message = str(info.value)
    assert "voice.commands.0.say: 'max' is not in the model's labels" in message
    assert "voice.commands.1.say: 'oven'" in message


def test_an_unknown_wake_word_is_named() -> None:
    with pytest.raises(ConfigError, match="'jarvis'"):
        check_vocabulary(LABELS, "jarvis", [Command(("fan",), "a")])


def test_confirm_needs_yes_and_no() -> None:
    labels = tuple(label for label in LABELS if label not in ("yes", "no"))
    with pytest.raises(ConfigError, match="yes, no"):
        check_vocabulary(labels, "computer", [Command(("fan",), "a", confirm=True)])
    check_vocabulary(labels, "computer", [Command(("fan",), "a")])


def test_threshold_overrides() -> None:
    model = {label: 0.5 for label in LABELS if not label.startswith("_")}
    merged = effective_thresholds(model, LABELS, {"heat": 0.9})
    assert merged["heat"] == 0.9 and merged["fan"] == 0.5
    assert "_silence_" not in merged
    with pytest.raises(ConfigError, match="'oven'"):
        effective_thresholds(model, LABELS, {"oven": 0.9})


def test_expected_words_are_smoothed_less() -> None:
    fast = RecognizerSettings(labels=LABELS, thresholds=settings().thresholds, smoothing_seconds=0.3,
                              refractory_seconds=1.0, listening_smoothing_seconds=0.1)
    frames = silence(5) + word("up", 6) + silence(3)
    for expected, fired_at in (((), 1.6), (("down",), 1.6), (("up", "down"), 1.5)):
        recognizer = Recognizer(fast)
        times = [round(1.0 + i * HOP, 3) for i, scores in enumerate(frames)
                 if recognizer.process(frame(round(1.0 + i * HOP, 3), **scores), expected=expected)]
        assert times == [fired_at]  # fires once either way, a hop earlier only when "up" is expected


def test_an_unexpected_spike_still_needs_the_full_smoothing() -> None:
    fast = RecognizerSettings(labels=LABELS, thresholds=settings().thresholds, smoothing_seconds=0.3,
                              refractory_seconds=1.0, listening_smoothing_seconds=0.1)
    frames = silence(5) + word("off", 1) + silence(3)
    assert run(Recognizer(fast), frames) == []
    recognizer = Recognizer(fast)
    found = [d for i, scores in enumerate(frames)
             if (d := recognizer.process(frame(round(1.0 + i * HOP, 3), **scores), expected=("up",)))]
    assert found == []
    recognizer = Recognizer(fast)
    found = [d for i, scores in enumerate(frames)
             if (d := recognizer.process(frame(round(1.0 + i * HOP, 3), **scores), expected=("off",)))]
    assert [d.word for d in found] == ["off"]


def fired_at(recognizer: Recognizer, frames: Sequence[dict[str, float]], *, expected: Sequence[str] = (),
             settled_from: int | None = None) -> list[float]:
    """The hop times of the detections; ``settled_from``: the hop from which the word is over."""
    times = []
    for index, scores in enumerate(frames):
        t = round(1.0 + index * HOP, 3)
        settled = settled_from is not None and index >= settled_from
        if recognizer.process(frame(t, **scores), expected=expected, settled=settled) is not None:
            times.append(t)
    return times


def listening_settings() -> RecognizerSettings:
    """The shipped model's timing: 0.5 s smoothing, 0.4 s for the words a wake window expects."""
    return RecognizerSettings(labels=LABELS, thresholds=settings().thresholds, smoothing_seconds=0.5,
                              refractory_seconds=1.0, listening_smoothing_seconds=0.4)


def test_an_expected_word_that_is_over_fires_once_its_last_posteriors_clear_the_threshold() -> None:
    frames = silence(5) + word("up", 6, score=0.9) + silence(3)
    # Smoothed over 0.4 s, "up" reaches 0.6 on its third hop (0.675); once over, on its second.
    assert fired_at(Recognizer(listening_settings()), frames, expected=("up",)) == [1.7]
    assert fired_at(Recognizer(listening_settings()), frames, expected=("up",), settled_from=0) == [1.6]
    # Not while it is still being said, and never for a word the window does not expect.
    assert fired_at(Recognizer(listening_settings()), frames, expected=("up",), settled_from=7) == [1.7]
    assert fired_at(Recognizer(listening_settings()), frames, expected=("down",), settled_from=0) == [1.8]


def test_a_settled_word_needs_every_recent_posterior_above_threshold_plus_margin() -> None:
    # 0.64 is above the threshold (0.6) but within the margin (0.05): the listening smoothing decides.
    frames = silence(5) + word("up", 6, score=0.64) + silence(3)
    assert fired_at(Recognizer(listening_settings()), frames, expected=("up",), settled_from=0) == \
        fired_at(Recognizer(listening_settings()), frames, expected=("up",)) == [1.8]
    # One hop below the bar within the last 0.2 s is enough to wait.
    dip = silence(5) + word("up", 1, score=0.9) + word("up", 1, score=0.5) + word("up", 4, score=0.9)
    assert fired_at(Recognizer(listening_settings()), dip, expected=("up",), settled_from=0) == [1.8]


def test_the_matcher_says_which_words_it_expects() -> None:
    m = matcher()
    assert m.expected_words() == frozenset()
    feed(m, [("computer", 1.0)])
    assert m.expected_words() == {"heat", "light", "fan", "stop"}
    feed(m, [("light", 1.4)])
    assert m.expected_words() == {"on", "off", "heat", "light", "fan", "stop"}
    feed(m, [("off", 1.8)])  # a confirm action
    assert m.expected_words() == {"yes", "no"}


def test_a_hop_the_bound_calls_out_of_reach_never_reports_a_word() -> None:
    """may_detect_next(t) False (the voice stage then reads two hops at once): whatever the next posteriors
    (any word at 1.0), whichever words are expected and whether the word is over, process() at t reports
    nothing. Over a stream of words at random levels, some firing, and the bound is often False."""
    rng = np.random.default_rng(8)
    recognizer = Recognizer(listening_settings())
    words = [label for label in LABELS if not label.startswith("_")]
    everything = frozenset(words)
    out_of_reach = detections = 0
    speaking: str | None = None
    for step in range(800):
        now = round(1.0 + step * HOP, 6)
        if not recognizer.may_detect_next(now):
            out_of_reach += 1
            for name in words:
                for expected, settled in ((frozenset(), False), (everything, False), (everything, True)):
                    probe = copy.deepcopy(recognizer)
                    heard = probe.process(frame(now, **{name: 1.0}), expected=expected, settled=settled)
                    assert heard is None, (now, name, expected, settled)
        if rng.random() < 0.15:  # a word starts, or silence
            speaking = str(rng.choice(words)) if rng.random() < 0.6 else None
        level = float(rng.uniform(0.3, 1.0))
        expected = frozenset(rng.choice(words, size=3, replace=False)) if step % 2 else frozenset()
        scores = frame(now, **({speaking: level} if speaking else {}))
        detection = recognizer.process(scores, expected=expected, settled=bool(rng.random() < 0.3))
        detections += detection is not None
    assert detections > 20 and out_of_reach > 200


def test_the_matcher_says_when_a_tick_would_change_nothing() -> None:
    """quiet_at(t): tick(t) emits nothing and leaves the state alone, exactly then (pending phrases that
    a longer one extends, open wake windows, confirmations, idle)."""
    rng = np.random.default_rng(3)
    m = matcher(wake_window=2.0, confirm_window=1.5, continuation_seconds=0.7)
    now = 0.0
    checked = {True: 0, False: 0}
    for _ in range(300):
        now = round(now + float(rng.uniform(0.05, 1.2)), 3)
        spoken = str(rng.choice(["computer", "computer", "heat", "up", "light", "off", "on", "stop", "fan",
                                 "yes", "no"]))
        m.on_detection(Detection(spoken, 0.9, max(0.0, now - 1), now), wall_time=now, mono_time=now)
        for later in np.arange(now, now + 3.0, 0.1):
            probe = copy.deepcopy(m)
            changed = bool(probe.tick(float(later), wall_time=0.0, mono_time=0.0))
            assert m.quiet_at(float(later)) is not changed, (spoken, later, m.state)
            checked[changed] += 1
    assert min(checked.values()) > 100


def test_listening_smoothing_cannot_exceed_the_smoothing() -> None:
    with pytest.raises(ValueError, match="listening_smoothing_seconds"):
        RecognizerSettings(labels=LABELS, thresholds=settings().thresholds, smoothing_seconds=0.2,
                           refractory_seconds=1.0, listening_smoothing_seconds=0.3)


class _StackedMeanRecognizer:
    """The recognizer as it was before its history became one preallocated array: a deque of (time, scores)
    averaged by np.mean(np.stack(...)), and a dict of armed words. The reference for the equivalence test."""

    def __init__(self, config: RecognizerSettings) -> None:
        self.settings = config
        self.history: list[tuple[float, np.ndarray]] = []
        self.armed: dict[str, bool] = {}
        self.last_fired: dict[str, float] = {}
        self.is_word = [label not in ("_silence_", "_unknown_") for label in LABELS]
        self.threshold = [config.thresholds.get(label, 1.0) for label in LABELS]

    def mean(self, entries: list[tuple[float, np.ndarray]]) -> np.ndarray:
        mean: np.ndarray = np.mean(np.stack([v for _, v in entries]), axis=0)
        return mean

    def process(self, scores: Scores, expected: frozenset[str]) -> tuple[np.ndarray, Detection | None]:
        now = scores.t_audio
        self.history.append((now, np.asarray(scores.values, dtype=np.float32)))
        horizon = now - self.settings.smoothing_seconds + 1e-6
        while len(self.history) > 1 and self.history[0][0] <= horizon:
            self.history.pop(0)
        average = self.mean(self.history)
        fast = self.settings.listening_smoothing_seconds
        if expected and fast is not None and fast < self.settings.smoothing_seconds:
            recent = [e for e in self.history if e[0] > now - fast + 1e-6] or [self.history[-1]]
            quick = self.mean(recent)
            for word in expected:
                average[LABELS.index(word)] = quick[LABELS.index(word)]
        top = int(np.argmax(average))
        for index, label in enumerate(LABELS):
            if self.is_word[index] and (index != top or average[index] < self.threshold[index]):
                self.armed[label] = True
        label = LABELS[top]
        if not self.is_word[top] or average[top] < self.threshold[top] or not self.armed.get(label, True):
            return average, None
        last = self.last_fired.get(label)
        if last is not None and now - last < self.settings.refractory_seconds:
            return average, None
        self.armed[label] = False
        self.last_fired[label] = now
        end = next((t for t, v in self.history if v[top] >= self.threshold[top]), now)
        return average, Detection(word=label, score=round(float(average[top]), 4),
                                  start=round(max(0.0, end - 1.0), 3), end=round(end, 3))


@pytest.mark.parametrize("smoothing", [0.0, 0.3, 0.5, 2.5])
def test_smoothing_equals_the_mean_of_the_stacked_history(smoothing: float) -> None:
    """The same averages, bit for bit, and the same detections as np.mean over a stack of the history, on
    random posteriors at uneven hop times (more hops in the smoothing time than the first buffer holds),
    with and without a listening smoothing for expected words."""
    rng = np.random.default_rng(int(smoothing * 10))
    config = RecognizerSettings(labels=LABELS, thresholds={w: 0.4 for w in LABELS if not w.startswith("_")},
                                smoothing_seconds=smoothing, refractory_seconds=0.3,
                                listening_smoothing_seconds=smoothing * 0.6)
    recognizer, reference = Recognizer(config), _StackedMeanRecognizer(config)
    t = 0.0
    detections = 0
    speaking = 0
    for step in range(2000):
        t = round(t + float(rng.choice([0.01, 0.05, 0.1, 0.3])), 6)
        if rng.random() < 0.05:  # another label takes over for a while, as a spoken word does
            speaking = int(rng.integers(len(LABELS)))
        values = rng.dirichlet(np.full(len(LABELS), 0.2))
        values[speaking] += 3.0
        values = (values / values.sum()).astype(np.float32)
        expected = frozenset(rng.choice(LABELS[:14], size=int(rng.integers(0, 4)), replace=False)) \
            if step % 3 else frozenset()
        scores = Scores(labels=LABELS, values=values, t_audio=t)
        detection = recognizer.process(scores, expected=expected)
        average, expected_detection = reference.process(scores, expected)
        np.testing.assert_array_equal(recognizer.judged, average)
        assert recognizer.judged.dtype == average.dtype
        assert detection == expected_detection
        detections += detection is not None
    assert detections > 20
