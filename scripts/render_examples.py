"""Render the project-made demo WAVs in examples/ and their word timings in examples/examples.json.

Each file is built from single-word renders (training.synth: piper's joe voice, flite's slt voice) placed with
controlled pauses, so every word's start and end is known exactly; a little seeded white noise runs under the
whole file so that "silence" is not digital zero. Run from the repository root:

    .venv/bin/python scripts/render_examples.py [--out examples]

piper (GPL-3.0) runs as a separate command inside training.synth; it is never imported.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # training/ is a source folder, not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from training.synth import (  # noqa: E402
    SAMPLE_RATE,
    Clip,
    Engines,
    Job,
    discover_engines,
    render_words,
    write_wav,
)

log = logging.getLogger(__name__)

WAKE_WORD = "computer"
LEAD_S = 0.5  # silence before the first word
WAKE_PAUSE_S = 0.6  # between the wake word and the command
WORD_PAUSE_S = 0.3  # between the words of a command
COMMAND_GAP_S = 1.5  # between commands in demo_commands.wav
TAIL_S = 1.0  # after the last word: a 1 s model window must be able to slide past it
NOISE_DBFS = -60.0  # RMS of the background noise
NOISE_SEED = 20240611

# Voice settings not on training.synth's training grid (piper noise_w 0.8, flite f0 170 Hz at stretch 1.0),
# although the speakers themselves are in the synthetic training data.
PIPER_SETTINGS = (("length_scale", 1.0), ("noise_scale", 0.667), ("noise_w", 0.8))
FLITE_SETTINGS = (("f0", 170.0), ("stretch", 1.0))
VOICES: dict[str, tuple[str, str, tuple[tuple[str, float], ...], str]] = {
    # key: (engine, voice, settings, license of the voice)
    "piper-joe": (
        "piper",
        "joe",
        PIPER_SETTINGS,
        "piper-tts (GPL-3.0, run as a command); voice en_US-joe-medium (MIT, trained on CC0 data)",
    ),
    "flite-slt": ("flite", "slt", FLITE_SETTINGS, "flite and its slt voice (CMU, BSD-style licence)"),
}


@dataclass(frozen=True)
class Command:
    """One spoken command: optional wake word, then the command words, in one voice."""

    say: str
    voice: str
    wake_word: bool = True


@dataclass(frozen=True)
class Example:
    file: str
    commands: tuple[Command, ...]
    description: str


EXAMPLES: tuple[Example, ...] = (
    Example("computer_heat_up.wav", (Command("heat up", "piper-joe"),), "wake word + 'heat up'"),
    Example("computer_light_on.wav", (Command("light on", "piper-joe"),), "wake word + 'light on'"),
    Example(
        "computer_fan_off.wav", (Command("fan off", "flite-slt"),), "wake word + 'fan off', second voice"
    ),
    Example(
        "heat_up_no_wake.wav",
        (Command("heat up", "piper-joe", wake_word=False),),
        "'heat up' without the wake word: must not trigger an action",
    ),
    Example(
        "demo_commands.wav",
        (
            Command("light on", "piper-joe"),
            Command("heat up", "piper-joe"),
            Command("heat up", "piper-joe", wake_word=False),
        ),
        "two commands and one without the wake word (must do nothing), 1.5 s apart, for make demo",
    ),
)


def render_vocabulary(engines: Engines) -> dict[tuple[str, str], np.ndarray]:
    """Every word the examples need, once per voice: {(voice key, word): float32 16 kHz audio}."""
    words_by_voice: dict[str, set[str]] = {}
    for example in EXAMPLES:
        for command in example.commands:
            spoken = command.say.split() + ([WAKE_WORD] if command.wake_word else [])
            words_by_voice.setdefault(command.voice, set()).update(spoken)
    rendered: dict[tuple[str, str], np.ndarray] = {}
    for key, words in words_by_voice.items():
        engine, voice, settings, _ = VOICES[key]
        clips = tuple(Clip(word, Path(f"{word}.wav")) for word in sorted(words))
        for (word, _cents, _tempo), audio in render_words(
            Job(engine, voice, settings, clips), engines
        ).items():
            rendered[(key, word)] = audio
    return rendered


def assemble(
    example: Example, words: dict[tuple[str, str], np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, object]]:
    """The example's audio and its examples.json entry (word and command times in seconds)."""
    pieces: list[np.ndarray] = [np.zeros(int(LEAD_S * SAMPLE_RATE), np.float32)]
    cursor = len(pieces[0])
    word_times: list[dict[str, object]] = []
    command_times: list[dict[str, object]] = []

    def place(audio: np.ndarray) -> tuple[int, int]:
        nonlocal cursor
        pieces.append(audio.astype(np.float32))
        start, cursor = cursor, cursor + len(audio)
        return start, cursor

    def pause(seconds: float) -> None:
        nonlocal cursor
        pieces.append(np.zeros(int(seconds * SAMPLE_RATE), np.float32))
        cursor += len(pieces[-1])

    for index, command in enumerate(example.commands):
        if index:
            pause(COMMAND_GAP_S)
        spoken = ([WAKE_WORD] if command.wake_word else []) + command.say.split()
        command_start = cursor
        for position, word in enumerate(spoken):
            if position:
                pause(WAKE_PAUSE_S if command.wake_word and position == 1 else WORD_PAUSE_S)
            start, end = place(words[(command.voice, word)])
            word_times.append(
                {"word": word, "start": round(start / SAMPLE_RATE, 3), "end": round(end / SAMPLE_RATE, 3)}
            )
        engine, voice, _, _ = VOICES[command.voice]
        command_times.append(
            {
                "say": command.say,
                "wake_word": command.wake_word,
                "engine": engine,
                "voice": voice,
                "start": round(command_start / SAMPLE_RATE, 3),
                "end": round(cursor / SAMPLE_RATE, 3),
            }
        )
    pause(TAIL_S)
    audio = np.concatenate(pieces)
    audio = audio + rng.normal(0.0, 10 ** (NOISE_DBFS / 20), len(audio)).astype(np.float32)
    entry: dict[str, object] = {
        "file": example.file,
        "description": example.description,
        "duration": round(len(audio) / SAMPLE_RATE, 3),
        "commands": command_times,
        "words": word_times,
    }
    return audio, entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "examples")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    engines = discover_engines()
    if engines.piper_model is None or not engines.flite_voices or engines.sox is None:
        log.error(
            "needs piper with the joe voice, flite and sox (training extra + scripts/bootstrap-system.sh)"
        )
        return 1
    words = render_vocabulary(engines)
    rng = np.random.default_rng(NOISE_SEED)
    entries = []
    for example in EXAMPLES:
        audio, entry = assemble(example, words, rng)
        write_wav(args.out / example.file, audio)
        entries.append(entry)
        log.info(
            "%s: %.2f s, %s", example.file, entry["duration"], " / ".join(c.say for c in example.commands)
        )
    metadata = {
        "sample_rate": SAMPLE_RATE,
        "made_by": "scripts/render_examples.py",
        "voices": {
            key: {"engine": engine, "voice": voice, "settings": dict(settings), "license": license_text}
            for key, (engine, voice, settings, license_text) in VOICES.items()
        },
        "files": entries,
    }
    (args.out / "examples.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
