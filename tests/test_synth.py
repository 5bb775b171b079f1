"""The project-made example WAVs and the synthetic-speech renderer (training/synth.py)."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from training.synth import (
    MAX_SECONDS,
    SAMPLE_RATE,
    Engines,
    SynthError,
    finish_clip,
    plan_jobs,
    run_job,
    trim_silence,
    write_manifest,
)

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
VOCABULARY_LABELS = {"computer", "on", "off", "up", "down", "stop", "go", "yes", "no", "left", "right",
                     "light", "heat", "fan"}  # fmt: skip


def _examples() -> list[dict[str, Any]]:
    metadata = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    assert metadata["sample_rate"] == SAMPLE_RATE
    files: list[dict[str, Any]] = metadata["files"]
    return files


def _rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))) if len(audio) else 0.0


def test_examples_folder_is_small_and_fully_described() -> None:
    wavs = {p.name for p in EXAMPLES_DIR.glob("*.wav")}
    assert wavs == {entry["file"] for entry in _examples()}
    assert {"computer_heat_up.wav", "heat_up_no_wake.wav", "demo_commands.wav"} <= wavs
    assert sum(p.stat().st_size for p in EXAMPLES_DIR.iterdir()) < 1_500_000


@pytest.mark.parametrize("entry", _examples(), ids=lambda entry: entry["file"])
def test_example_wav_is_16k_mono_int16_and_matches_its_timings(entry: dict[str, Any]) -> None:
    path = EXAMPLES_DIR / entry["file"]
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.format, info.subtype) == (SAMPLE_RATE, 1, "WAV", "PCM_16")
    assert info.frames / info.samplerate == pytest.approx(entry["duration"], abs=0.002)
    audio, _ = sf.read(str(path), dtype="float32")

    words = entry["words"]
    assert words, "every example says something"
    previous_end = 0.0
    for word in words:
        assert word["word"] in VOCABULARY_LABELS
        assert previous_end <= word["start"] < word["end"] <= entry["duration"]
        assert 0.1 <= word["end"] - word["start"] <= MAX_SECONDS
        previous_end = word["end"]
    # The recorded spans must really hold the speech: words loud, the pauses between them near the noise.
    spans = [(int(w["start"] * SAMPLE_RATE), int(w["end"] * SAMPLE_RATE)) for w in words]
    gaps = [(end, start) for (_, end), (start, _) in itertools.pairwise(spans)]
    gaps += [(0, spans[0][0]), (spans[-1][1], len(audio))]
    quietest_word = min(_rms(audio[start:end]) for start, end in spans)
    loudest_gap = max(_rms(audio[start:end]) for start, end in gaps if end - start > 0)
    assert quietest_word > 20 * loudest_gap

    spoken = " ".join(word["word"] for word in words)
    expected = " ".join(
        ("computer " if command["wake_word"] else "") + command["say"] for command in entry["commands"]
    )
    assert spoken == expected
    for command in entry["commands"]:
        assert command["start"] < command["end"] <= entry["duration"]


def test_no_wake_example_has_no_wake_word() -> None:
    entry = next(e for e in _examples() if e["file"] == "heat_up_no_wake.wav")
    assert all(word["word"] != "computer" for word in entry["words"])
    assert [command["wake_word"] for command in entry["commands"]] == [False]


def test_trim_silence_keeps_the_sound_and_a_little_padding() -> None:
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(4000) / SAMPLE_RATE).astype(np.float32)
    audio = np.concatenate([np.zeros(8000, np.float32), tone, np.zeros(8000, np.float32)])
    trimmed = trim_silence(audio)
    assert 4000 <= len(trimmed) <= 4000 + 2 * int(0.02 * SAMPLE_RATE) + 2 * 160
    assert _rms(trimmed) > 0.3


requires_sox = pytest.mark.skipif(shutil.which("sox") is None, reason="sox is not installed")


@requires_sox
def test_finish_clip_squeezes_slightly_long_words_and_rejects_silence() -> None:
    sox = shutil.which("sox")
    assert sox is not None
    rng = np.random.default_rng(0)
    long_word = (0.3 * rng.standard_normal(int(1.2 * SAMPLE_RATE))).astype(np.float32)
    squeezed = finish_clip(sox, long_word)
    assert 0.8 * SAMPLE_RATE < len(squeezed) <= MAX_SECONDS * SAMPLE_RATE
    with pytest.raises(SynthError, match="silent"):
        finish_clip(sox, np.zeros(SAMPLE_RATE, np.float32))
    with pytest.raises(SynthError, match="too long"):
        finish_clip(sox, (0.3 * rng.standard_normal(3 * SAMPLE_RATE)).astype(np.float32))


@requires_sox
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_render_one_word_with_espeak_then_skip_it_next_time(tmp_path: Path) -> None:
    engines = Engines(
        espeak_voices=(("en-us", "m3"),),
        flite_voices=(),
        festival_voices=(),
        piper_command=(),
        piper_model=None,
        sox=shutil.which("sox"),
    )
    jobs = plan_jobs(["yes"], tmp_path, engines, ["espeak"])
    assert len(jobs) == 1
    result = run_job(jobs[0], engines)
    assert not result.failures
    [(path, duration)] = result.written
    assert path.parent == tmp_path / "yes"
    assert path.name.startswith("espeak_en-us_m3-")
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
    assert info.frames / SAMPLE_RATE == pytest.approx(duration, abs=1e-3)
    assert 0.12 <= duration <= MAX_SECONDS
    audio, _ = sf.read(str(path), dtype="float32")
    assert float(np.max(np.abs(audio))) > 0.5  # normalized speech, not silence

    assert plan_jobs(["yes"], tmp_path, engines, ["espeak"]) == []  # already on disk: nothing to do
    assert write_manifest(tmp_path) == 1
    with (tmp_path / "manifest.csv").open() as handle:
        [row] = list(csv.DictReader(handle))
    assert row["word"] == "yes"
    assert (row["engine"], row["voice"]) == ("espeak", "en-us")
    assert tmp_path / row["path"] == path
    assert float(row["duration"]) == pytest.approx(duration, abs=1e-3)
