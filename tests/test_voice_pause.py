"""The pause after a word: once a wake window is open, the model sees only what follows it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from agent.audio import read_audio_file
from agent.config import VoiceSection
from agent.kws import KwsModel
from agent.recognizer import Command
from agent.voice import VoicePipeline, pause_start, tail_padding, word_over

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


def test_a_word_is_over_at_the_start_of_the_next_pause() -> None:
    assert word_over(energies((QUIET, 2), (LOUD, 10), (QUIET, 3)), 3, 20.0)
    assert not word_over(energies((QUIET, 2), (LOUD, 10), (QUIET, 2)), 3, 20.0)  # not quiet long enough
    assert not word_over(energies((LOUD, 10), (0.1, 5)), 3, 20.0)  # only 10 dB down
    assert not word_over(energies((QUIET, 4), (LOUD, 1)), 3, 20.0)  # still sounding
    assert not word_over(np.zeros(8), 3, 20.0)  # nothing heard
    assert not word_over(energies((QUIET, 3)), 3, 20.0)


def test_the_command_after_the_wake_word_is_heard_with_the_wake_word_silenced() -> None:
    """"computer, heat up" (examples/, the demo's voice) through the real model: the intent fires, and the
    pipeline silenced the audio before the pause after the wake word while its window was open."""
    model = KwsModel.load(REPO_ROOT / "models" / "kws.tflite")
    pipeline = VoicePipeline(model, VoiceSection(), [Command(("heat", "up"), "heating_up")])
    audio = np.concatenate([read_audio_file(REPO_ROOT / "examples" / "computer_heat_up.wav"), tail_padding()])
    silenced: list[int] = []
    intents = []
    fired_at = []  # the end of the hop that emitted each intent, in audio seconds
    hop = pipeline.hop_samples
    for offset in range(0, len(audio) // hop * hop, hop):
        output = pipeline.feed(audio[offset : offset + hop])
        intents += output.intents
        fired_at += [(offset + hop) / 16000] * len(output.intents)
        if pipeline.silence_before is not None:
            silenced.append(pipeline.silence_before)
    assert [intent.action for intent in intents] == ["heating_up"]
    # "up" is over once the pause after it starts: the intent comes on the next hop, not when the 0.4 s
    # average catches up (0.2 s after the end).
    catalogue = json.loads((REPO_ROOT / "examples" / "examples.json").read_text(encoding="utf-8"))
    entry = next(f for f in catalogue["files"] if f["file"] == "computer_heat_up.wav")
    spoken_end = entry["commands"][0]["end"]
    assert fired_at[0] - spoken_end <= 0.1 + 1e-9
    assert silenced, "no pause was found after the wake word"
    assert pipeline.silence_before is None  # the window closed: the model hears its whole window again


@pytest.mark.parametrize("recording", ["demo_commands.wav", "heat_up_no_wake.wav", "computer_light_on.wav"])
def test_blocks_of_any_size_are_heard_as_hop_by_hop(recording: str) -> None:
    """The pipeline pushes a block's hops into the features at once (an idle read: one push, and while no wake
    window is open their windows in one model invocation) and analyses them hop by hop: posteriors, judged
    scores, the silenced front, detections and events are those of the same audio fed one hop at a time, for
    idle-sized blocks, ragged blocks, the whole recording at once, and the reads the voice stage makes
    (read_seconds), where the first hop of a two-hop read brings nothing."""
    model = KwsModel.load(REPO_ROOT / "models" / "kws.tflite")
    commands = [Command(("heat", "up"), "heating_up"), Command(("light", "on"), "light_on"),
                Command(("fan", "off"), "fan_off")]
    audio = np.concatenate([read_audio_file(REPO_ROOT / "examples" / recording), tail_padding()])
    hop = 1600

    def heard(block: Callable[[VoicePipeline], int]) -> tuple[list[object], list[str]]:
        pipeline = VoicePipeline(model, VoiceSection(), commands)
        hops: list[object] = []
        pipeline.on_hop = lambda scores, judged, detection: hops.append(
            (scores.t_audio, scores.values.tobytes(), judged.tobytes(), detection, pipeline.silence_before))
        said: list[str] = []
        offset = 0
        while offset < len(audio):
            size = block(pipeline)
            if size == 2 * hop:  # fed as two hops here, to see what the first one brings
                first = pipeline.feed(audio[offset : offset + hop])
                assert not first.detections and not first.events, f"the quiet hop at {offset / 16000} s"
                said += [repr(event) for event in first.events]
                offset += hop
                size = hop
            output = pipeline.feed(audio[offset : offset + size])
            offset += size
            said += [repr(event) for event in output.events]
        return hops, said

    reference = heard(lambda _pipeline: hop)
    if recording != "heat_up_no_wake.wav":
        assert sum(1 for event in reference[1] if "'intent'" in event) >= 1  # commands were heard
    rng = np.random.default_rng(2)
    ragged = iter([int(n) for n in rng.integers(1, 20000, len(audio))])
    two_hop_reads = 0

    def as_the_stage_reads(pipeline: VoicePipeline) -> int:
        nonlocal two_hop_reads
        size = round((pipeline.read_seconds() or pipeline.hop_seconds) * 16000)
        two_hop_reads += size == 2 * hop
        return size

    for block in (lambda _p: 8000, lambda _p: next(ragged), lambda _p: len(audio), as_the_stage_reads):
        assert heard(block) == reference
    assert two_hop_reads > 0 or recording == "heat_up_no_wake.wav"
