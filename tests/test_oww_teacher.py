"""The speech-embedding teacher's alignment with the student: the teacher's view of a 1 s training window
(zeros in front) is the same as streaming a recording and reading the 16 embeddings that end where the
window ends."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from training import oww_teacher
from training.common import soft_labels

pytestmark = [
    pytest.mark.data,
    pytest.mark.skipif(not oww_teacher.available(), reason="needs ../shared/peers/openwakeword"),
]


def _speech_like(seconds: float, seed: int) -> np.ndarray:
    """Noise bursts with a pitch-like modulation (the embedding needs something that is not silence)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    voiced = np.sin(2 * np.pi * 140 * t) + 0.5 * np.sin(2 * np.pi * 280 * t)
    return np.round((voiced + 0.3 * rng.normal(size=len(t))) * envelope * 6000).astype(np.int16)


def test_window_and_stream_see_the_same_audio_ending_at_the_same_point() -> None:
    embedding = oww_teacher.SpeechEmbedding()
    window = _speech_like(1.0, seed=1)
    batch = embedding.embed(oww_teacher.teacher_input(window[None, :]))
    assert batch.shape == (1, oww_teacher.HEAD_EMBEDDINGS, oww_teacher.EMBEDDING_DIM)

    # The same window inside a recording with zeros before it and other, quieter sound after it (the
    # melspectrogram's floor follows the loudest sample, which stays the window's).
    lead = np.zeros(oww_teacher.TEACHER_SAMPLES - len(window), np.int16)
    recording = np.concatenate([lead, window, _speech_like(0.6, seed=2) // 2])
    streamed = embedding.stream_embeddings(recording)
    end = len(lead) + len(window)
    last = (end - oww_teacher.EMBEDDING_SPAN) // oww_teacher.EMBEDDING_HOP  # the embedding ending at `end`
    assert last * oww_teacher.EMBEDDING_HOP + oww_teacher.EMBEDDING_SPAN == end
    aligned = streamed[last - oww_teacher.HEAD_EMBEDDINGS + 1 : last + 1]
    np.testing.assert_allclose(aligned, batch[0], atol=1e-3)
    # One embedding later already hears the sound after the window: the alignment is not vacuous.
    assert np.abs(streamed[last + 1] - batch[0, -1]).max() > 1e-2


def test_each_window_is_embedded_on_its_own() -> None:
    """A quiet window's embeddings do not change when a loud one shares the call."""
    embedding = oww_teacher.SpeechEmbedding()
    loud = oww_teacher.teacher_input(_speech_like(1.0, seed=3)[None, :])
    quiet = oww_teacher.teacher_input((_speech_like(1.0, seed=4) // 300)[None, :])
    together = embedding.embed(np.concatenate([loud, quiet]))
    np.testing.assert_allclose(together[1], embedding.embed(quiet)[0], atol=1e-4)
    np.testing.assert_allclose(together[0], embedding.embed(loud)[0], atol=1e-4)


@pytest.mark.train
@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="tensorflow is not installed")
def test_numpy_head_matches_the_trained_keras_head(tmp_path: Path) -> None:
    """The head trained on standardised embeddings, saved as arrays, scores like Keras does."""
    rng = np.random.default_rng(0)
    count = 64
    shape = (count, oww_teacher.HEAD_EMBEDDINGS, oww_teacher.EMBEDDING_DIM)
    embeddings = (rng.normal(size=shape) * 17).astype(np.float16)
    labels = np.arange(count, dtype=np.int64) % 16
    origins = np.array([f"clip{i}.flac" for i in range(count)])
    config = oww_teacher.HeadConfig(epochs=1)
    head_path, out_of_fold = oww_teacher.train_teacher(embeddings, labels, origins, "test", config, tmp_path)
    assert out_of_fold.shape == (count, 16)
    head = oww_teacher.load_head(head_path)
    probabilities = oww_teacher.head_probabilities(head, embeddings)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    keras = oww_teacher.build_head(config)
    keras.set_weights([head["w1"], head["b1"], head["w2"], head["b2"]])
    standardized = (embeddings.astype(np.float32) - head["mean"]) / head["std"]
    expected = soft_labels(np.asarray(keras.predict(standardized, verbose=0)), 1.0)
    np.testing.assert_allclose(probabilities, expected, atol=1e-4)
