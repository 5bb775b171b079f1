"""The template path of household adaptation (agent/templates.py): cepstra of the voice path's own mel frames,
matched by open-begin dynamic time warping, frame by frame on a live stream and in batches at enrolment."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from agent.audio import read_audio_file
from agent.bank import Bank
from agent.config import VoiceSection
from agent.features import FeatureParams
from agent.kws import KwsModel, model_hop_seconds
from agent.sequence import RecentHops
from agent.templates import (
    COEFFICIENTS,
    LATCH_HOPS,
    CepstralMean,
    Templates,
    TemplateState,
    hop_mel,
    recording_cepstra,
)
from agent.voice import VoicePipeline

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"
MODEL = REPO_ROOT / "models" / "kws.tflite"


def walk(length: int, seed: int) -> np.ndarray:
    """A smooth random sequence of cepstra, like speech's (each frame near the last)."""
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.normal(0.0, 0.5, (length, COEFFICIENTS)), axis=0).astype(np.float32)


def test_batches_and_a_live_stream_measure_the_same_distances() -> None:
    templates = Templates.of([walk(30, 1), walk(24, 2)], [1.0, 2.0])
    streams = [walk(n, 10 + n) for n in (5, 40, 80, 61)]
    batched = templates.nearest(streams, batch=2)  # per template, in distance
    assert batched.shape == (4, 2) and np.isinf(batched[0]).all()  # 5 frames: too short for any match
    streamed = [float(templates.distances(s).min()) for s in streams]  # in limits
    assert (batched / [1.0, 2.0]).min(axis=1) == pytest.approx(streamed, rel=1e-5)
    assert templates.reach(streams) == pytest.approx(streamed, rel=1e-5)


def test_a_take_at_another_speed_matches_and_other_speech_does_not() -> None:
    word = walk(40, 3)
    templates = Templates.of([word], 1.0)
    silence = np.zeros((20, COEFFICIENTS), np.float32)
    faster = word[::2]  # twice as fast: every template frame is skipped or matched once
    half = np.repeat(word, 2, axis=0)[:40]  # slower than the template, cut at its middle
    assert float(templates.distances(np.concatenate([silence, word]))[-1]) == pytest.approx(0.0, abs=1e-3)
    other = float(templates.distances(walk(200, 4)).min())
    # A skipped frame costs its distance to the frame matched in its place: about a frame-to-frame step.
    assert float(templates.distances(np.concatenate([silence, faster])).min()) < other / 3
    assert float(templates.distances(np.concatenate([silence, np.repeat(word, 2, axis=0)])).min()) \
        == pytest.approx(0.0, abs=1e-3)
    assert float(templates.distances(half).min()) > 1.0  # the template's second half was never heard
    assert other > 2.0


def test_a_match_raises_the_word_for_the_latch_hops_on_its_stream_only() -> None:
    """Fed the mel frames of a stream hop by hop, a stream's state raises the word from the hop a template
    match ends on, for LATCH_HOPS hops; another stream of the same templates is untouched."""
    params = FeatureParams()
    samples = read_audio_file(EXAMPLES / "computer_heat_up.wav")
    mel = hop_mel(params, samples, 1600)
    cepstra = CepstralMean().push(mel.reshape(-1, params.num_mel_bands))
    word = cepstra[5:45]
    templates = Templates.of([word], 0.05)
    stream, other = RecentHops(1, {"computer": templates}), RecentHops(1, {"computer": templates})
    raised = [bool(stream.raised(hop)) for hop in mel]
    # From the hop holding the template's last frame (44 // 5), for LATCH_HOPS hops at least (the match may
    # go on ending within the limit while the stream stays on the template's last frames), then never again.
    first, last = raised.index(True), len(raised) - 1 - raised[::-1].index(True)
    assert first == 8 and last - first + 1 >= LATCH_HOPS and all(raised[first : last + 1])
    assert not any(other.raised(np.full_like(hop, 1e-3)) for hop in mel[:12])
    stream.reset()
    assert [bool(stream.raised(hop)) for hop in mel] == raised  # a reset stream starts afresh


def test_the_voice_path_hands_the_adaptation_the_mel_frames_a_recording_is_learned_from() -> None:
    """Enrolment takes templates from hop_mel / recording_cepstra; the live voice path hands each hop's new
    frames (StreamingFeatures.recent_mel, fed in batches of hops): the same frames, the same cepstra."""
    model = KwsModel.load(MODEL, embedding=True)
    samples = read_audio_file(EXAMPLES / "computer_heat_up.wav")
    pipeline = VoicePipeline(model, VoiceSection(), hop_seconds=model_hop_seconds(model))
    seen: list[np.ndarray] = []

    class Recording(RecentHops):
        matching = True

        def raised(self, mel: np.ndarray, scores: Mapping[str, float] | None = None) -> frozenset[str]:
            seen.append(np.array(mel))
            return frozenset()

    class Adaptation:
        def apply(self, labels: tuple[str, ...], probabilities: np.ndarray, embedding: np.ndarray,
                  recent: RecentHops, mel: np.ndarray | None = None) -> np.ndarray:
            assert mel is not None
            recent.raised(mel)
            return probabilities

    pipeline.adaptation = Adaptation()  # type: ignore[assignment]
    pipeline.recent_hops = Recording(1)
    pipeline.feed(samples)
    expected = hop_mel(model.params, samples, pipeline.hop_samples)
    assert len(seen) == len(expected)
    assert np.stack(seen) == pytest.approx(expected, rel=1e-9)
    assert recording_cepstra(model.params, samples, pipeline.hop_samples).shape == \
        (len(expected) * 5, COEFFICIENTS)


def test_templates_survive_saving_and_a_corrupt_set_is_refused() -> None:
    templates = Templates.of([walk(30, 1), walk(1, 9), walk(24, 2)], 2.5)  # a one-frame take is dropped
    arrays = templates.arrays("h0_")
    loaded = Templates.from_arrays(arrays, "h0_")
    assert loaded is not None and loaded.limits.tolist() == [2.5, 2.5] and loaded.lengths.tolist() == [30, 24]
    assert np.array_equal(loaded.stacked, templates.stacked)
    assert Templates.from_arrays(Templates.of([], 0.0).arrays("h0_"), "h0_") is None
    arrays["h0_cepstral_lengths"] = np.array([30.0, 20.0], np.float32)
    with pytest.raises(ValueError, match="cepstral_templates"):
        Templates.from_arrays(arrays, "h0_")


def test_a_near_match_raises_the_word_only_where_the_head_agrees() -> None:
    """A match beyond its template's limit but within ``near_limit`` of it raises the word on a hop the head
    scores at ``near_score`` or more, and on no other; without a near limit it never does."""
    word = walk(40, 3)
    stream = np.concatenate([np.zeros((10, COEFFICIENTS), np.float32), word + walk(40, 5) * 0.1])
    distance = float(Templates.of([word], 1.0).distances(stream).min())
    plain = Templates.of([word], distance / 1.1)  # the stream's best match: 1.1 limits
    near = plain.with_near(1.2, 0.95)

    def raised(templates: Templates, score: float) -> bool:
        return TemplateState(templates).hop(stream, score)

    assert not raised(plain, 1.0)
    assert raised(near, 0.95) and raised(near, 1.0)
    assert not raised(near, 0.9) and not raised(near, -np.inf)
    assert not raised(Templates.of([word], distance / 1.3).with_near(1.2, 0.95), 1.0)  # beyond the near limit
    live = RecentHops(1, {"computer": near})
    assert not live.raised(np.zeros((5, 40)))  # the mel path: no score, no near match


def test_the_near_rule_is_saved_with_the_templates_and_a_bad_one_is_refused() -> None:
    templates = Templates.of([walk(30, 1), walk(24, 2)], 2.5).with_near(1.2, 0.95)
    arrays = templates.arrays("h0_")
    loaded = Templates.from_arrays(arrays, "h0_")
    assert loaded is not None and (loaded.near_limit, loaded.near_score) == pytest.approx((1.2, 0.95))
    assert loaded.with_limits(3.0).near_limit == pytest.approx(1.2)
    off = Templates.from_arrays(Templates.of([walk(30, 1), walk(24, 2)], 2.5).arrays("h0_"), "h0_")
    assert off is not None and off.near_limit == 1.0 and np.isinf(off.near_score)
    arrays["h0_cepstral_near"] = np.array([0.5, 0.95], np.float32)
    with pytest.raises(ValueError, match="cepstral_near"):
        Templates.from_arrays(arrays, "h0_")


def test_bank_recording_peaks_follow_the_recordings_order() -> None:
    """Bank.recording_peaks: per recording of another label, in recordings_cepstra's order, its best row."""
    bank = Bank(np.zeros((5, 4), np.float32), np.array(["computer", "_unknown_", "_unknown_", "on", "on"]),
                np.array([0, 1, 1, 2, 2], np.int32), np.ones(3, np.float32), "sha",
                cepstra=np.arange(18, dtype=np.float32).reshape(6, 3).repeat(4, axis=1)[:, :COEFFICIENTS],
                cepstra_items=np.array([0, 0, 1, 1, 2, 2], np.int32))
    scores = np.array([0.99, 0.2, 0.7, 0.4, 0.1], np.float32)
    assert len(bank.recordings_cepstra("computer")) == 2
    assert bank.recording_peaks(scores, "computer").tolist() == pytest.approx([0.7, 0.4])
