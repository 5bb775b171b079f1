"""The pause after a word: once a wake window is open, the model sees only what follows it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.audio import read_audio_file
from agent.config import VoiceSection
from agent.kws import KwsModel
from agent.recognizer import Command
from agent.voice import VoicePipeline, pause_start, tail_padding

REPO_ROOT = Path(__file__).resolve().parent.parent
LOUD, QUIET = 1.0, 1e-3  # 30 dB apart


def energies(*runs: tuple[float, int]) -> np.ndarray:
    return np.concatenate([np.full(count, level) for level, count in runs])


def test_the_first_finished_pause_after_the_word() -> None:
    frames = energies((LOUD, 10), (QUIET, 4), (LOUD, 5), (QUIET, 6), (LOUD, 2))
    assert pause_start(100, frames, 100, 3, 20.0) == 110
    assert pause_start(100, frames, 115, 3, 20.0) == 119  # searching after the first pause
    assert pause_start(100, frames, 112, 3, 20.0) == 119  # only 2 quiet frames left of the first


def test_no_pause_yet() -> None:
    assert pause_start(0, energies((LOUD, 10), (QUIET, 2), (LOUD, 5)), 0, 3, 20.0) is None  # too short
    assert pause_start(0, energies((LOUD, 10), (QUIET, 9)), 0, 3, 20.0) is None  # quiet, nothing after
    assert pause_start(0, energies((LOUD, 10), (0.1, 5), (LOUD, 2)), 0, 3, 20.0) is None  # only 10 dB
    assert pause_start(0, np.zeros(20), 0, 3, 20.0) is None  # nothing heard at all
    assert pause_start(0, np.zeros(0), 0, 3, 20.0) is None


def test_a_pause_that_began_before_the_search_counts_from_where_the_search_starts() -> None:
    frames = energies((LOUD, 10), (QUIET, 8), (LOUD, 3))
    assert pause_start(0, frames, 14, 3, 20.0) == 14


def test_the_command_after_the_wake_word_is_heard_with_the_wake_word_silenced() -> None:
    """"computer, heat up" (examples/, the demo's voice) through the real model: the intent fires, and the
    pipeline silenced the audio before the pause after the wake word while its window was open."""
    model = KwsModel.load(REPO_ROOT / "models" / "kws.tflite")
    pipeline = VoicePipeline(model, VoiceSection(), [Command(("heat", "up"), "heating_up")])
    audio = np.concatenate([read_audio_file(REPO_ROOT / "examples" / "computer_heat_up.wav"), tail_padding()])
    silenced: list[int] = []
    intents = []
    hop = pipeline.hop_samples
    for offset in range(0, len(audio) // hop * hop, hop):
        output = pipeline.feed(audio[offset : offset + hop])
        intents += output.intents
        if pipeline.silence_before is not None:
            silenced.append(pipeline.silence_before)
    assert [intent.action for intent in intents] == ["heating_up"]
    assert silenced, "no pause was found after the wake word"
    assert pipeline.silence_before is None  # the window closed: the model hears its whole window again
