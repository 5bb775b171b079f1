"""agent.features: parameters, the whole-window extractor and the streaming extractor (bit-identical)."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import numpy as np
import pytest

from agent.features import (
    FILTERBANKS,
    LABELS,
    MAX_GATHERED_FRAMES,
    FeatureParams,
    RowHistory,
    StreamingFeatures,
    _front_end,
    _mel_matrix,
    window_features,
)

PARAMS = FeatureParams()


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Bursts of harmonic sound with pauses and a noise floor, as int16 (not a constant signal)."""
    rng = np.random.default_rng(seed)
    n = round(seconds * PARAMS.sample_rate)
    t = np.arange(n) / PARAMS.sample_rate
    envelope = (np.sin(2 * np.pi * 1.3 * t) > 0.2).astype(np.float64) * rng.uniform(0.2, 1.0)
    tone = sum(
        np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) / k for k, f in enumerate((180, 360, 540, 900), 1)
    )
    signal = 0.25 * envelope * tone + rng.normal(0, 0.01, n)
    return np.clip(signal * 32767, -32768, 32767).astype(np.int16)


def test_default_shape_matches_the_teacher_recipe() -> None:
    assert PARAMS.window_samples == 16000
    assert PARAMS.shape == (49, 10)
    assert (PARAMS.num_frames, PARAMS.num_features) == (49, 10)
    features = window_features(speech_like(1.0), PARAMS)
    assert features.shape == (49, 10)
    assert features.dtype == np.float32
    assert np.isfinite(features).all()


def test_labels_contract() -> None:
    assert LABELS == (
        "computer", "on", "off", "up", "down", "stop", "go", "yes", "no", "left", "right",
        "light", "heat", "fan", "_silence_", "_unknown_",
    )  # fmt: skip


@pytest.mark.parametrize("hop", [1600, 320, 640])
def test_streaming_equals_whole_window_for_whole_hops(hop: int) -> None:
    audio = speech_like(3.3, seed=hop)
    stream = StreamingFeatures(PARAMS)
    for end in range(hop, len(audio) + 1, hop):
        stream.push(audio[end - hop : end])
        expected = window_features(audio[:end], PARAMS)
        np.testing.assert_array_equal(stream.features(), expected)
        assert stream.samples_seen == end
        assert stream.ready() == (end >= PARAMS.window_samples)


def test_streaming_with_ragged_pushes_describes_the_window_at_the_last_hop_boundary() -> None:
    audio = speech_like(4.0, seed=3)
    stream = StreamingFeatures(PARAMS)
    rng = np.random.default_rng(5)
    position = 0
    checked = 0
    while position < len(audio) - 5000:
        size = int(rng.integers(1, 5000))
        stream.push(audio[position : position + size])
        position += size
        boundary = position - position % PARAMS.hop_samples
        np.testing.assert_array_equal(stream.features(), window_features(audio[:boundary], PARAMS))
        checked += 1
    assert checked > 10


def test_streaming_reset_and_empty_push() -> None:
    audio = speech_like(2.0, seed=9)
    stream = StreamingFeatures(PARAMS)
    stream.push(speech_like(1.5, seed=1))
    stream.reset()
    assert stream.samples_seen == 0
    stream.push(np.zeros(0, np.int16))
    stream.push(audio[:16000])
    np.testing.assert_array_equal(stream.features(), window_features(audio[:16000], PARAMS))


def test_short_input_is_zero_padded_at_the_front() -> None:
    short = speech_like(0.4, seed=2)
    padded = np.concatenate([np.zeros(16000 - len(short), np.int16), short])
    np.testing.assert_array_equal(window_features(short, PARAMS), window_features(padded, PARAMS))


def test_longer_input_uses_the_last_window() -> None:
    audio = speech_like(1.7, seed=4)
    np.testing.assert_array_equal(window_features(audio, PARAMS), window_features(audio[-16000:], PARAMS))


def test_int16_and_float_input_agree_and_gain_does_not_matter() -> None:
    audio = speech_like(1.0, seed=6)
    as_float = audio.astype(np.float32) / 32768.0
    np.testing.assert_allclose(window_features(audio, PARAMS), window_features(as_float, PARAMS), atol=1e-4)
    # Peak normalisation: a quieter copy of the same sound gives (nearly) the same features.
    np.testing.assert_allclose(
        window_features(as_float * 0.3, PARAMS), window_features(as_float, PARAMS), atol=1e-3
    )


def test_silence_is_finite_and_distinct_from_sound() -> None:
    silent = window_features(np.zeros(16000, np.int16), PARAMS)
    assert np.isfinite(silent).all()
    assert not np.allclose(silent, window_features(speech_like(1.0), PARAMS))


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="1-D"):
        window_features(np.zeros((2, 16000), np.int16), PARAMS)
    with pytest.raises(ValueError, match="int16 or float"):
        window_features(np.zeros(16000, np.int32), PARAMS)
    with pytest.raises(ValueError, match="1-D"):
        StreamingFeatures(PARAMS).push(np.zeros((1600, 2), np.int16))


def test_params_round_trip_and_strict_keys() -> None:
    data = PARAMS.to_dict()
    assert FeatureParams.from_dict(data) == PARAMS
    with pytest.raises(ValueError, match="unknown keys \\['nfft'\\]"):
        FeatureParams.from_dict({**data, "nfft": 512})
    incomplete = dict(data)
    del incomplete["num_coefficients"]
    with pytest.raises(ValueError, match="missing keys \\['num_coefficients'\\]"):
        FeatureParams.from_dict(incomplete)


@pytest.mark.parametrize(
    "change",
    [
        {"hop_samples": 330},  # the window is no longer whole hops
        {"frame_samples": 600},  # longer than the FFT
        {"upper_hz": 9000.0},
        {"filterbank": "bark"},
        {"num_coefficients": 41},
    ],
)
def test_invalid_params_are_rejected(change: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="invalid feature parameters"):
        replace(PARAMS, **change)  # type: ignore[arg-type]


def test_psf_filterbank_variant_streams_exactly_too() -> None:
    params = replace(PARAMS, filterbank="psf", peak_normalize=False)
    audio = speech_like(2.0, seed=8)
    stream = StreamingFeatures(params)
    for end in range(1600, len(audio) + 1, 1600):
        stream.push(audio[end - 1600 : end])
    np.testing.assert_array_equal(stream.features(), window_features(audio, params))


@pytest.mark.parametrize("filterbank", FILTERBANKS)
@pytest.mark.parametrize(("upper_hz", "weighted_bins"), [(4000.0, 128), (6000.0, 192)])
def test_the_spectrum_stops_at_the_last_bin_with_mel_weight(filterbank: str, upper_hz: float,
                                                             weighted_bins: int) -> None:
    """The bins from upper_hz up (bin 128 is 4 kHz) carry no weight in any band, so the front end leaves
    them out of the magnitude and mel product; the streaming tests above show the values are unchanged."""
    params = replace(PARAMS, filterbank=filterbank, upper_hz=upper_hz)
    full = _mel_matrix(params)
    used = _front_end(params).mel_matrix
    assert len(used) == weighted_bins
    np.testing.assert_array_equal(used, full[:weighted_bins])
    assert used[-1].any()
    assert not full[weighted_bins:].any()
    audio = speech_like(1.5, seed=9)
    stream = StreamingFeatures(params)
    stream.push(audio)
    np.testing.assert_array_equal(stream.features(), window_features(audio, params))


@pytest.mark.train
@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="tensorflow is not installed")
def test_matches_the_teachers_tf_signal_recipe() -> None:
    """The MLPerf Tiny KWS front end in tf.signal (peak-normalised clip, stft 480/320, 40 mel 20-4000 Hz,
    log(x+1e-6), mfccs_from_log_mel_spectrograms, 10 coefficients) gives the same features."""
    import os

    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf

    audio = speech_like(1.0, seed=11).astype(np.float32) / 32768.0
    clip = tf.constant(audio / np.abs(audio).max())
    stft = tf.signal.stft(clip, frame_length=480, frame_step=320, fft_length=512)
    mel_matrix = tf.signal.linear_to_mel_weight_matrix(40, 257, 16000, 20.0, 4000.0)
    mel = tf.tensordot(tf.abs(stft), mel_matrix, 1)
    expected = tf.signal.mfccs_from_log_mel_spectrograms(tf.math.log(mel + 1e-6))[..., :10].numpy()
    np.testing.assert_allclose(window_features(audio, PARAMS), expected, atol=2e-3, rtol=1e-3)


def test_silence_before_a_position_is_as_if_the_stream_started_there() -> None:
    """The voice path silences what came before the pause after a word: the frames from that position on
    (and the peak they are normalised by) are those of a stream that heard only the later audio."""
    params = FeatureParams()
    rng = np.random.default_rng(4)
    loud = (rng.normal(0, 8000, 8000)).astype(np.int16)  # a loud "first word"
    later = (rng.normal(0, 800, 12800)).astype(np.int16)  # a quieter one after it
    boundary = len(loud)  # on the 320-sample hop grid
    heard, alone = StreamingFeatures(params), StreamingFeatures(params)
    heard.push(np.concatenate([loud, later]))
    alone.push(np.concatenate([np.zeros_like(loud), later]))
    masked = heard.features(silence_before=boundary)
    first_kept = boundary // params.hop_samples - (len(loud) + len(later) - params.window_samples) // \
        params.hop_samples
    np.testing.assert_array_equal(masked[first_kept:], alone.features()[first_kept:])
    assert not np.array_equal(masked[first_kept:], heard.features()[first_kept:])  # the peak changed
    np.testing.assert_array_equal(masked[:first_kept], np.repeat(masked[:1], first_kept, axis=0))  # silence
    # a position before the window, or none, changes nothing
    np.testing.assert_array_equal(heard.features(silence_before=0), heard.features())
    np.testing.assert_array_equal(heard.features(silence_before=None), window_features(
        np.concatenate([loud, later]), params))


def test_row_history_holds_the_newest_rows_oldest_first() -> None:
    """Appends and extends of every size, across many moves back to the buffer's front, against a list."""
    rng = np.random.default_rng(6)
    history = RowHistory(7, (3,), spare=5)
    reference = [np.zeros(3)] * 7
    for _ in range(300):
        if rng.random() < 0.5:
            row = rng.normal(size=3)
            history.append(row)
            reference.append(row)
        else:
            rows = rng.normal(size=(int(rng.integers(0, 12)), 3))
            history.extend(rows)
            reference.extend(rows)
        reference = reference[-7:]
        np.testing.assert_array_equal(history.latest(), np.array(reference))
        count = int(rng.integers(1, 8))
        np.testing.assert_array_equal(history.latest(count), np.array(reference[-count:]))
    history.clear()
    np.testing.assert_array_equal(history.latest(), np.zeros((7, 3)))


def test_a_long_push_equals_hop_pushes_and_the_whole_window() -> None:
    """A block of more than MAX_GATHERED_FRAMES frames is framed by a strided view instead of a gather:
    the same numbers."""
    audio = speech_like(3.0, seed=12)
    assert len(audio) // PARAMS.hop_samples > MAX_GATHERED_FRAMES
    whole, hops = StreamingFeatures(PARAMS), StreamingFeatures(PARAMS)
    whole.push(audio)
    for end in range(1600, len(audio) + 1, 1600):
        hops.push(audio[end - 1600 : end])
    np.testing.assert_array_equal(whole.features(), hops.features())
    np.testing.assert_array_equal(whole.features(), window_features(audio, PARAMS))
    np.testing.assert_array_equal(whole.recent_frame_energies()[1], hops.recent_frame_energies()[1])


def test_the_windows_of_a_block_computed_together_are_those_asked_one_by_one() -> None:
    """``recent_windows``: the windows ending at each hop of the last push (the voice path's idle block),
    computed together, are exactly what ``features(end=...)`` answers for each, from the very first block
    (front still zeros) on; a window further back than ``behind`` is refused."""
    audio = speech_like(4.0, seed=23)
    block, hop = 8000, 1600
    stream = StreamingFeatures(PARAMS, behind=block - hop)
    for start in range(0, len(audio) // block * block, block):
        stream.push(audio[start : start + block])
        together = stream.recent_windows(block // hop, hop)
        assert together.shape == (block // hop, *PARAMS.shape) and together.dtype == np.float32
        for index, end in enumerate(range(start + hop, start + block + 1, hop)):
            np.testing.assert_array_equal(together[index], stream.features(end=end))
    np.testing.assert_array_equal(stream.recent_windows(1, hop)[0], stream.features())
    with pytest.raises(ValueError, match="behind"):
        stream.recent_windows(block // hop + 1, hop)


def test_an_earlier_hop_boundary_is_answered_as_when_the_stream_had_only_reached_it() -> None:
    """``behind``: several hops pushed at once, then features and frame energies asked hop by hop (the
    voice path does this with a whole idle block), are exactly what a stream pushed hop by hop answered,
    silenced fronts included; a boundary further back than ``behind`` is refused."""
    audio = speech_like(4.0, seed=21)
    block, hop = 8000, 1600
    batched = StreamingFeatures(PARAMS, behind=block - hop)
    single = StreamingFeatures(PARAMS)
    for start in range(0, len(audio) // block * block, block):
        batched.push(audio[start : start + block])
        for end in range(start + hop, start + block + 1, hop):
            single.push(audio[end - hop : end])
            silence = max(0, end - 9600)  # a pause found 0.6 s back: some of the window silenced
            np.testing.assert_array_equal(batched.features(end=end), single.features())
            np.testing.assert_array_equal(batched.features(silence, end=end), single.features(silence))
            first, energies = batched.recent_frame_energies(end=end)
            assert first == single.recent_frame_energies()[0]
            np.testing.assert_array_equal(energies, single.recent_frame_energies()[1])
    newest = batched.samples_seen
    np.testing.assert_array_equal(batched.features(end=newest), batched.features())
    for wrong in (newest - block, newest - hop + PARAMS.hop_samples // 2, newest + hop):
        with pytest.raises(ValueError, match="whole number of hops"):
            batched.features(end=wrong)
