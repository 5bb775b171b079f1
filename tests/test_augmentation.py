"""Where training.data's augmentation puts a word in its 1 s window: the time shift around the centre, the
placement at the window's end (what makes a command fire as soon as it is spoken), and the preceding word."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from agent.audio import to_int16
from training.data import (
    CONTEXT,
    WINDOW,
    AugmentConfig,
    Augmenter,
    Clip,
    Dataset,
    microphone_eq,
    preceding_words,
    speech_span,
    warp,
    word_context,
)

RATE = 16000


def tone(seconds: float, amplitude: float = 0.5, hz: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def clip_with_word(start: float, length: float, total: float = 1.0) -> np.ndarray:
    """A quiet clip (faint noise) with a 'word' (a tone) from ``start`` for ``length`` seconds."""
    rng = np.random.default_rng(0)
    samples = rng.normal(0, 1e-4, round(total * RATE)).astype(np.float32)
    begin = round(start * RATE)
    word = tone(length)
    samples[begin : begin + len(word)] += word
    return samples


def plain(config: AugmentConfig, seed: int = 0) -> Augmenter:
    """No room, noise or gain: the word's position is all that changes."""
    quiet = AugmentConfig(**{**config.__dict__, "room_probability": 0.0, "noise_probability": 0.0,
                             "gain_db": (0.0, 0.0)})
    return Augmenter(quiet, np.zeros(4 * RATE, np.float32), seed)


def test_speech_span_finds_the_word() -> None:
    span = speech_span(to_int16(clip_with_word(0.3, 0.25)))
    assert span is not None
    assert span[0] == pytest.approx(0.3 * RATE, abs=0.011 * RATE)
    assert span[1] == pytest.approx(0.55 * RATE, abs=0.011 * RATE)
    assert speech_span(np.zeros(RATE, np.int16)) is None


def test_centred_shift_stays_within_its_range() -> None:
    context = word_context(clip_with_word(0.4, 0.2))
    augmenter = plain(AugmentConfig(end_probability=1.0))
    for _ in range(50):
        window = augmenter.word(context, 0.1, at_end=False)
        span = speech_span(window)
        assert span is not None and not augmenter.placed_at_end
        assert 0.3 * RATE - 10 * 160 <= span[0] <= 0.5 * RATE + 160


@pytest.mark.parametrize("start", [0.1, 0.4, 0.7])
def test_end_placement_puts_the_word_end_near_the_window_end(start: float) -> None:
    config = AugmentConfig(end_probability=1.0, preceding_probability=0.0)
    context = word_context(clip_with_word(start, 0.25))
    augmenter = plain(config)
    low, high = config.end_margin_seconds
    for _ in range(50):
        window = augmenter.word(context, 0.1, at_end=True)
        assert augmenter.placed_at_end
        span = speech_span(window)
        assert span is not None
        margin = (WINDOW - span[1]) / RATE
        assert low - 0.011 <= margin <= high + 0.011
        assert span[1] - span[0] == pytest.approx(0.25 * RATE, abs=0.011 * RATE)  # the whole word


def test_end_placement_share_and_shift_only_windows() -> None:
    context = word_context(clip_with_word(0.4, 0.2))
    augmenter = plain(AugmentConfig(end_probability=0.5, preceding_probability=0.0))
    placed = []
    for _ in range(400):
        augmenter.word(context, 0.1, at_end=True)
        placed.append(augmenter.placed_at_end)
    assert 0.4 < np.mean(placed) < 0.6
    for _ in range(50):
        augmenter.word(context, 0.1, at_end=False)  # only shifted around the centre
        assert not augmenter.placed_at_end


def test_too_long_a_word_is_not_end_placed() -> None:
    context = word_context(clip_with_word(0.05, 0.9))
    augmenter = plain(AugmentConfig(end_probability=1.0))
    augmenter.word(context, 0.1, at_end=True)
    assert not augmenter.placed_at_end


def test_a_preceding_word_ends_a_gap_before_the_word() -> None:
    config = AugmentConfig(end_probability=1.0, preceding_probability=1.0)
    augmenter = plain(config)
    augmenter.preceding = [to_int16(tone(0.3, 0.4, 300.0))]
    context = word_context(clip_with_word(0.4, 0.2))
    low, high = config.preceding_gap_seconds
    for _ in range(30):
        window = augmenter.word(context, 0.1, at_end=True).astype(np.float32) / 32768
        frames = np.mean(window[: len(window) // 160 * 160].reshape(-1, 160) ** 2, axis=1)
        loud = frames > 1e-3
        # two loud runs (preceding word, then the word) and the gap between; the window's edge may cut
        # the first
        edges = np.flatnonzero(np.diff(loud.astype(int)))
        rises, falls = edges[loud[edges + 1]] + 1, edges[~loud[edges + 1]] + 1
        assert len(falls) >= 1 and len(rises) >= 1
        gap = (rises[-1] - falls[0]) * 160 / RATE
        assert low - 0.02 <= gap <= high + 0.02


def test_preceding_words_are_speech_of_training_clips(tmp_path: Path) -> None:
    folder = tmp_path
    clips = []
    for index in range(4):
        path = folder / f"w{index}.wav"
        sf.write(path, clip_with_word(0.2 + 0.1 * index, 0.3), RATE)
        clips.append(Clip(str(path), "up", "g", "train", "real"))
    clips.append(Clip(str(folder / "long.wav"), "_unknown_", "g", "train", "long"))  # never drawn
    pool = preceding_words(clips, 10)
    assert len(pool) == 4
    assert all(0.28 * RATE <= len(word) <= 0.32 * RATE for word in pool)


def test_dataset_keeps_the_placement_through_concat_subset_and_disk(tmp_path: Path) -> None:
    features = np.zeros((3, 49, 10), np.float32)
    first = Dataset(features, np.array([0, 1, 2]), np.array(["real"] * 3), np.array(["a", "b", "c"]),
                    np.array([True, False, True]))
    second = Dataset(features[:1], np.array([3]), np.array(["mined"]), np.array(["d"]))  # old caches: none
    both = first.concat(second)
    assert both.end_placed.tolist() == [True, False, True, False]
    assert both.subset(np.array([True, True, False, False])).end_placed.tolist() == [True, False]
    path = tmp_path / "set.npz"
    both.save(path)
    assert Dataset.load(path).end_placed.tolist() == [True, False, True, False]
    assert CONTEXT < WINDOW


@pytest.mark.parametrize("factor", [0.87, 1.15])
def test_warp_moves_pitch_by_its_factor_and_keeps_the_length_and_centre(factor: float) -> None:
    context = word_context(clip_with_word(0.4, 0.2))
    warped = warp(context, factor)
    assert len(warped) == len(context) and warped.dtype == np.int16

    def dominant_hz(samples: np.ndarray) -> float:
        spectrum = np.abs(np.fft.rfft(samples.astype(np.float64)))
        return float(np.argmax(spectrum)) * RATE / len(samples)

    assert dominant_hz(warped) == pytest.approx(440.0 * factor, rel=0.02)
    before, after = speech_span(context), speech_span(warped)
    assert before is not None and after is not None
    centre = (before[0] + before[1]) / 2
    assert (after[0] + after[1]) / 2 == pytest.approx(len(context) / 2 + (centre - len(context) / 2) / factor,
                                                      abs=0.011 * RATE)
    assert (after[1] - after[0]) == pytest.approx((before[1] - before[0]) / factor, abs=0.021 * RATE)


def test_microphone_eq_colours_the_spectrum_and_keeps_the_peak() -> None:
    rng = np.random.default_rng(3)
    speech = rng.normal(0, 0.1, RATE).astype(np.float32)
    coloured = microphone_eq(speech, np.random.default_rng(4), (-9.0, 9.0))
    assert len(coloured) == len(speech) and coloured.dtype == np.float32
    assert float(np.abs(coloured).max()) == pytest.approx(float(np.abs(speech).max()), rel=1e-5)
    spectrum = np.abs(np.fft.rfft(coloured)) / (np.abs(np.fft.rfft(speech)) + 1e-9)
    band = spectrum.reshape(-1)[: 8000].reshape(40, 200).mean(axis=1)  # 40 bands of 200 Hz
    assert band[0] < 0.5 * band[10], "the low roll-off is missing"
    assert band[39] < 0.5 * band[10], "the high roll-off is missing"


def test_word_windows_are_warped_and_equalised_when_asked() -> None:
    context = word_context(clip_with_word(0.4, 0.2))
    still = plain(AugmentConfig(end_probability=0.0, shift_seconds=0.0))
    moved = plain(AugmentConfig(end_probability=0.0, shift_seconds=0.0, warp_probability=1.0,
                                eq_probability=1.0))
    same = still.word(context, 0.0)
    assert np.array_equal(same, still.word(context, 0.0))
    assert not np.array_equal(same, moved.word(context, 0.0))


def test_a_following_word_starts_a_gap_after_the_wake_word_and_is_cut_by_the_window() -> None:
    config = AugmentConfig(following_probability=1.0)
    augmenter = plain(config)
    other_seconds = 0.4
    augmenter.preceding = [to_int16(tone(other_seconds, 0.4, 300.0))]
    word_seconds = 0.5
    context = word_context(clip_with_word(0.3, word_seconds))
    low, high = config.following_gap_seconds
    for _ in range(30):
        window = augmenter.word(context, 0.25, followed=True).astype(np.float32) / 32768
        assert augmenter.followed and not augmenter.placed_at_end
        frames = np.mean(window[: len(window) // 160 * 160].reshape(-1, 160) ** 2, axis=1)
        loud = np.concatenate([[False], frames > 1e-3])  # the word may start at the window's first sample
        edges = np.flatnonzero(np.diff(loud.astype(int)))
        rises, falls = edges[loud[edges + 1]] + 1, edges[~loud[edges + 1]] + 1
        # the whole wake word, then a gap, then the other word running into the window's right edge
        assert len(rises) == 2 and len(falls) == 1 and loud[-1]
        assert (falls[0] - rises[0]) * 160 / RATE == pytest.approx(word_seconds, abs=0.02)
        assert low - 0.02 <= (rises[1] - falls[0]) * 160 / RATE <= high + 0.02
        visible = (len(loud) - rises[1]) * 160 / RATE
        assert 0.1 * other_seconds - 0.02 <= visible <= 0.8 * other_seconds + 0.02


def test_only_wake_word_windows_are_followed() -> None:
    augmenter = plain(AugmentConfig(following_probability=1.0, end_probability=0.0))
    augmenter.preceding = [to_int16(tone(0.4, 0.4, 300.0))]
    context = word_context(clip_with_word(0.3, 0.5))
    augmenter.word(context, 0.1, at_end=True)
    assert not augmenter.followed
    augmenter.word(context, 0.25, followed=True)
    assert augmenter.followed


def test_a_wake_tail_window_holds_only_the_end_of_the_word() -> None:
    """The window's left edge cuts off 45-80 % of the word; the rest of the word starts the window and what
    followed it (quiet here) fills the rest."""
    config = AugmentConfig(wake_tail_copies=1)
    augmenter = plain(config)
    word_seconds = 0.6
    context = word_context(clip_with_word(0.2, word_seconds, total=1.4))
    low, high = config.wake_tail_cut
    for _ in range(30):
        window = augmenter.wake_tail(context)
        assert window is not None and len(window) == WINDOW
        samples = window.astype(np.float32) / 32768
        frames = np.mean(samples[: len(samples) // 160 * 160].reshape(-1, 160) ** 2, axis=1)
        loud = np.flatnonzero(frames > 1e-3)
        assert loud[0] == 0, "the word's end starts the window"
        assert np.all(np.diff(loud) == 1), "one stretch of the word, nothing after it"
        kept = len(loud) * 160 / RATE
        assert (1 - high) * word_seconds - 0.02 <= kept <= (1 - low) * word_seconds + 0.02
    assert augmenter.wake_tail(np.zeros(WINDOW + 2 * CONTEXT, np.int16)) is None


def test_the_wake_words_extra_windows_leave_every_other_window_as_it_was(tmp_path: Path) -> None:
    """--wake-tail and --wake-end add windows from a generator of their own: the training set gains exactly
    those (end-only windows as _unknown_, end-placed ones as computer) and every other window is the same."""
    from agent.features import LABELS, UNKNOWN_LABEL, WAKE_WORD, FeatureParams
    from training.data import build_training_set

    rng = np.random.default_rng(3)
    clips = []
    for name, label, source, samples in (
        ("noise.wav", "_silence_", "noise", rng.normal(0, 0.05, 3 * RATE).astype(np.float32)),
        ("computer.wav", WAKE_WORD, "real", clip_with_word(0.3, 0.6, total=1.2)),
        ("up.wav", "up", "real", clip_with_word(0.4, 0.3)),
    ):
        sf.write(tmp_path / name, samples, RATE)
        clips.append(Clip(str(tmp_path / name), label, name, "train", source))
    base = AugmentConfig(word_copies=2, computer_copies=3, quiet_silence=2, room_probability=0.0,
                         preceding_pool=3)
    params = FeatureParams()
    (tmp_path / "plain").mkdir()
    (tmp_path / "extra").mkdir()
    plain_set = build_training_set(clips, params, base, tmp_path / "plain")
    extra_set = build_training_set(
        clips, params, AugmentConfig(**{**base.__dict__, "wake_tail_copies": 1, "wake_end_copies": 2}),
        tmp_path / "extra")
    wake, unknown = LABELS.index(WAKE_WORD), LABELS.index(UNKNOWN_LABEL)
    added = len(extra_set.labels) - len(plain_set.labels)
    assert added == 3
    # the computer clip's windows: its 3 copies, then 1 end-only (_unknown_) and 2 end-placed (computer)
    first = int(np.flatnonzero(plain_set.labels == wake)[0])
    assert list(extra_set.labels[first : first + 6]) == [wake] * 3 + [unknown] + [wake] * 2
    assert extra_set.end_placed[first + 3 : first + 6].all()
    kept = np.r_[0 : first + 3, first + 6 : len(extra_set.labels)]
    assert np.array_equal(extra_set.features[kept], plain_set.features)
    assert np.array_equal(extra_set.labels[kept], plain_set.labels)
