"""The sequence gate of household adaptation (agent.sequence, agent.adaptation.WordHead): a template match
over the recent hops, which hears a new take whose single nearest hop lies outside the distance gate and
leaves a word alone that shares one similar hop with the enrolled word."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import numpy as np
import pytest

from agent import sequence
from agent.adaptation import Adaptation, WordHead
from agent.head import Head
from agent.sequence import SequenceGate

WORD = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]], np.float32)  # a path through four hops


def test_a_template_matches_itself_at_half_and_twice_its_speed_and_not_backwards() -> None:
    silence = np.full((3, 2), 9.0, np.float32)
    slower = np.repeat(WORD, 2, axis=0)
    for take in (WORD, slower):
        stream = np.concatenate([silence, take])
        distances = sequence.distances([WORD], stream)
        assert distances[-1] == pytest.approx(0.0, abs=1e-5)  # ends on the last hop, whatever came before
        assert np.all(distances[: len(silence)] > 1.0)
    faster = WORD[::2]  # every other hop: twice as fast
    assert sequence.distances([WORD], faster)[-1] == pytest.approx(0.5, abs=1e-5)  # hops 1 and 3 off by 1
    backwards = np.concatenate([silence, WORD[::-1]])
    assert sequence.distances([WORD], backwards)[-1] >= 1.0
    assert sequence.distances([], WORD).tolist() == [np.inf] * len(WORD)


def test_a_match_latches_for_the_smoothing_time() -> None:
    values = np.array([5.0, 0.1, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0], np.float32)
    assert sequence.latched(values, 3).tolist() == pytest.approx([5.0, 0.1, 0.1, 0.1, 5.0, 5.0, 5.0, 5.0])


def test_the_template_is_the_word_like_hops_and_one_either_side() -> None:
    scores = np.array([0.1, 0.2, 0.6, 0.3, 0.9, 0.2, 0.1], np.float32)
    points = np.arange(14, dtype=np.float32).reshape(7, 2)
    assert sequence.template(points, scores).tolist() == points[1:6].tolist()
    assert len(sequence.template(points, np.zeros(7, np.float32))) == 0


def test_the_threshold_is_the_median_own_distance_bounded_by_the_bank() -> None:
    assert sequence.threshold([3.0, 4.0, 5.0, np.inf], 10.0, 0.75) == pytest.approx(4.0)
    assert sequence.threshold([3.0, 4.0, 5.0], 5.0, 0.75) == pytest.approx(3.75)
    assert sequence.threshold([3.0, np.inf], 10.0, 0.75) == 0.0  # one recording matched: no sequence gate


def test_the_voice_paths_hop_is_a_whole_number_of_feature_hops() -> None:
    """agent.kws.hop_samples: the one hop the voice path runs at and enrolment cuts its templates at."""
    from agent.config import VoiceSection
    from agent.features import FeatureParams
    from agent.kws import KwsModel, hop_samples, model_hop_seconds
    from agent.voice import VoicePipeline

    path = Path(__file__).resolve().parent.parent / "models" / "kws.tflite"
    model = KwsModel.load(path)
    pipeline = VoicePipeline(model, VoiceSection(), hop_seconds=model_hop_seconds(model))
    assert hop_samples(model_hop_seconds(model), model.params) == pipeline.hop_samples == 1600
    params = FeatureParams()
    assert hop_samples(0.04, params) == 640
    assert hop_samples(0.001, params) == params.hop_samples  # at least one feature hop


def _entry(limit: float) -> WordHead:
    """A head that scores 1.0 wherever the second coordinate is 0 (the word's hops) and 0 elsewhere, a
    distance gate of radius 0.5 around the word's last hop only, and a sequence gate on WORD."""
    head = Head(np.zeros(2, np.float32), np.ones(2, np.float32), np.array([[0.0], [-1.0]], np.float32),
                np.array([0.5], np.float32), np.array([60.0], np.float32), 0.0)
    return WordHead("computer", head, 0.9, None, 0, 1.0, 5, 0, WORD[-1:], 0.5, np.zeros((0, 2), np.float32),
                    0.0, SequenceGate((WORD,), limit))


def test_a_take_outside_the_distance_gate_is_raised_only_when_its_hops_follow_a_template() -> None:
    entry = _entry(limit=0.4)
    silence = np.full((3, 2), [0.0, 5.0], np.float32)
    # A new take: every hop 0.2 from the word's, its last one 0.7 from the gate's centre (outside 0.5).
    take = np.concatenate([silence, WORD + np.array([0.0, 0.2], np.float32)])
    take[-1] = [2.3, 0.0]
    scores = entry.head.score(take)
    assert scores[-1] >= 0.9 and entry.boosts(take, scores)[-1]
    without = _entry(limit=0.0)  # no sequence gate: the distance gate alone misses it
    assert not without.boosts(take, scores)[-1]
    # Another word: the same hops in another order; its last hop is as near the gate's centre as the take's.
    other = np.concatenate([silence, WORD[::-1] + np.array([0.0, 0.2], np.float32)])
    other[-1] = [2.3, 0.0]
    assert not entry.boosts(other, entry.head.score(other))[-1]


def test_the_live_stream_raises_the_same_hops_as_the_whole_clip_and_a_new_stream_forgets() -> None:
    entry = _entry(limit=0.3)
    adaptation = Adaptation("sha", (entry,), 1.0)
    labels = ("computer", "_unknown_")
    rng = np.random.default_rng(0)
    take = np.concatenate([np.full((4, 2), [0.0, 5.0]), WORD, rng.normal(0, 0.2, (6, 2)), WORD[::-1],
                           [[2.3, 0.0]]]).astype(np.float32)
    take[7] = [2.3, 0.0]
    offline = entry.boosts(take, entry.head.score(take))
    live = []
    recent = adaptation.recent_hops()
    for point in take:
        probabilities = adaptation.apply(labels, np.array([0.0, 1.0], np.float32), point, recent)
        live.append(bool(probabilities[0] > 0))
    assert live == offline.tolist() and any(live)
    assert entry.sequence is not None and recent.held == entry.sequence.history_hops  # no more than it needs

    def last(points: np.ndarray, *, reset_before_last: bool) -> float:
        recent = adaptation.recent_hops()
        for point in points[:-1]:
            adaptation.apply(labels, np.array([0.0, 1.0], np.float32), point, recent)
        if reset_before_last:
            recent.reset()
        return float(adaptation.apply(labels, np.array([0.0, 1.0], np.float32), points[-1], recent)[0])

    ending = np.concatenate([WORD[:3], [[2.3, 0.0]]]).astype(np.float32)
    assert last(ending, reset_before_last=False) > 0.9
    assert last(ending, reset_before_last=True) == 0.0  # a new stream: no match behind its first hop


def test_bank_recordings_are_matched_one_by_one() -> None:
    """The activation check counts false wakes per bank recording: a match must not run across two."""
    entry = _entry(limit=0.3)
    rows = np.concatenate([WORD[:2], WORD[2:]])
    rows[-1] = [2.3, 0.0]
    scores = entry.head.score(rows)
    assert entry.boosts(rows, scores)[-1]
    split = entry.boosts_items(rows, scores, np.array([0, 0, 1, 1], np.int32))
    assert not split.any()


def test_the_sequence_gate_survives_saving(tmp_path: Path) -> None:
    entry = _entry(limit=0.3)
    Adaptation("sha", (replace(entry, sequence=SequenceGate((WORD, WORD[:2]), 0.3)),), 1.0).save(tmp_path)
    loaded = Adaptation.load(tmp_path)
    assert loaded is not None and loaded.heads[0].sequence is not None
    assert [t.tolist() for t in loaded.heads[0].sequence.templates] == [WORD.tolist(), WORD[:2].tolist()]
    assert loaded.heads[0].sequence.limit == pytest.approx(0.3)
    Adaptation("sha", (replace(entry, sequence=None),), 1.0).save(tmp_path)
    loaded = Adaptation.load(tmp_path)
    assert loaded is not None and loaded.heads[0].sequence is not None
    assert not loaded.heads[0].sequence.active


def test_the_gate_and_the_adaptation_are_immutable() -> None:
    """What a stream changes is the stream's own (RecentHops): the gate, its word's head and the adaptation
    cannot be changed, so one adaptation serves every stream at once."""
    entry = _entry(limit=0.3)
    adaptation = Adaptation("sha", (entry,), 1.0)
    assert entry.sequence is not None
    for target, field in ((entry.sequence, "limit"), (entry, "sequence"), (adaptation, "heads")):
        with pytest.raises(FrozenInstanceError):
            setattr(target, field, None)


def test_the_voice_path_starts_every_stream_with_an_empty_history_of_its_own() -> None:
    from agent.config import VoiceSection
    from agent.kws import KwsModel
    from agent.voice import VoicePipeline

    adaptation = Adaptation("sha", (_entry(limit=0.3),), 1.0)
    elsewhere = adaptation.recent_hops()  # another stream of the same adaptation
    for point in WORD:
        adaptation.apply(("computer", "_unknown_"), np.array([0.0, 1.0], np.float32), point, elsewhere)
    assert elsewhere.held == len(WORD)
    path = Path(__file__).resolve().parent.parent / "models" / "kws.tflite"
    pipeline = VoicePipeline(KwsModel.load(path, embedding=True), VoiceSection(), adaptation=adaptation)
    assert pipeline.recent_hops is not None and pipeline.recent_hops.held == 0
    pipeline.recent_hops.push(WORD[0])
    pipeline.reset()  # a new file, or a gap in the stream
    assert pipeline.recent_hops.held == 0 and elsewhere.held == len(WORD)


def test_a_sequence_gate_that_would_wake_on_held_back_bank_speech_is_left_out() -> None:
    """The activation check judges the gates it will run with: a sequence gate that raises a held-back bank
    recording of another label beyond the budget is left out (the distance gate alone is then judged), and
    kept, with that false wake counted, under a budget that allows it."""
    from agent.adaptation import checked_sequence
    from agent.bank import Bank

    entry = _entry(limit=0.4)
    gated = replace(entry, sequence=None)
    rows = np.concatenate([WORD[:3], [[2.3, 0.0]], np.full((2, 2), [0.0, 5.0])]).astype(np.float32)
    check = Bank(rows, np.array(["_unknown_"] * 6), np.array([2, 2, 2, 2, 5, 5], np.int32),
                 np.full(6, 1800.0, np.float32), "sha")  # two recordings of 30 min: 1 h
    scores = entry.head.score(rows)
    assert check.false_wakes(np.where(gated.boosts(rows, scores), scores, 0.0), "computer", 0.9) == 0
    assert checked_sequence(gated, entry.sequence, check, scores, budget_per_hour=0.0,
                            false_wakes=0) == (None, 0)
    assert checked_sequence(gated, entry.sequence, check, scores, budget_per_hour=1.0,
                            false_wakes=0) == (entry.sequence, 1)
    assert checked_sequence(gated, None, check, scores, budget_per_hour=1.0, false_wakes=0) == (None, 0)
