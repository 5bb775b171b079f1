"""Where an enrolment recording's utterance is: silence and steady sounds have none."""

from __future__ import annotations

import numpy as np

from agent.adaptation import speech_span


def test_a_word_between_silences_is_found() -> None:
    samples = np.zeros(16000, np.int16)
    samples[4000:8000] = (3000 * np.sin(np.arange(4000) / 5)).astype(np.int16)
    assert speech_span(samples) == (4000, 8000)


def test_silence_has_no_span() -> None:
    assert speech_span(np.zeros(16000, np.int16)) is None


def test_a_steady_tone_has_no_span() -> None:
    # Every frame is as loud as the background, so none clears the level (this raised IndexError).
    samples = np.full(16000, 1000, np.int16)
    assert speech_span(samples) is None
