"""Where an enrolment recording's utterance is: silence and steady sounds have none."""

from __future__ import annotations

import numpy as np

from agent.utterance import speech_span


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


def test_the_room_is_the_takes_audio_outside_their_utterances_repeated_to_two_seconds() -> None:
    from agent.utterance import ROOM_SECONDS, room_background

    first = np.full(16000, 7, np.int16)
    first[4000:8000] = 3000  # the word, with 800 samples (50 ms) either side kept out of the room
    second = np.full(8000, -5, np.int16)
    second[2000:5000] = 3000
    room = room_background([(first, (4000, 8000)), (second, (2000, 5000))], 16000)
    assert room is not None and len(room) == round(ROOM_SECONDS * 16000)
    assert set(np.unique(room)) == {-5, 7}  # nothing of either word
    once = 16000 - 4000 - 1600 + 8000 - 3000 - 1600
    # All of the first take's room, then the second's, then again.
    assert int((room[:once] == 7).sum()) == 16000 - 4000 - 1600
    assert np.array_equal(room[once : 2 * once], room[:once][: len(room) - once])


def test_takes_cut_tight_around_the_word_have_no_room() -> None:
    from agent.utterance import room_background

    take = np.full(6000, 3000, np.int16)
    # 0.1 s outside the word, less the clearance either side.
    assert room_background([(take, (1000, 5000))], 16000) is None
    assert room_background([], 16000) is None
