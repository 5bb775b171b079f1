"""Copies of one recording (the Picovoice benchmark holds groups of identical waveforms under different file
names): training.data.recording_copies finds them, and the split holds a recording out only when no copy of it
is trained on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from agent.audio import read_audio_file
from training.common import stable_fraction
from training.data import VALIDATION_FRACTION, inventory, recording_copies, recording_split

RATE = 16000
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def recording(name: str) -> np.ndarray:
    return read_audio_file(EXAMPLES / name).astype(np.float64)


def copy_of(samples: np.ndarray, seed: int, *, gain: float, lead: float) -> np.ndarray:
    """The same recording as another upload of it: other gain, other leading silence, its own faint hiss."""
    rng = np.random.default_rng(seed)
    padded = np.concatenate([np.zeros(round(lead * RATE)), samples * gain])
    return padded + rng.normal(0, 30, len(padded))


def write(folder: Path, name: str, samples: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    sf.write(path, np.clip(samples, -32768, 32767).astype(np.int16), RATE)
    return path


def test_copies_with_other_gain_noise_and_offset_are_one_recording_and_other_takes_are_not(
        tmp_path: Path) -> None:
    first = recording("computer_light_on.wav")
    other = recording("heat_up_no_wake.wav")
    paths = [write(tmp_path, "c.flac", copy_of(first, 1, gain=0.6, lead=0.3)),
             write(tmp_path, "a.flac", first),
             write(tmp_path, "b.flac", other),
             write(tmp_path, "d.flac", copy_of(first, 2, gain=1.4, lead=0.05)),
             write(tmp_path, "e.flac", copy_of(other, 3, gain=0.8, lead=0.5))]
    copies = recording_copies(paths)
    assert copies == {"a.flac": "a.flac", "c.flac": "a.flac", "d.flac": "a.flac",
                      "b.flac": "b.flac", "e.flac": "b.flac"}


def test_a_lone_file_is_its_own_recording(tmp_path: Path) -> None:
    path = write(tmp_path, "a.flac", recording("computer_light_on.wav"))
    assert recording_copies([path]) == {"a.flac": "a.flac"}
    assert recording_copies([]) == {}


def names_held(held: bool, count: int) -> list[str]:
    """File names of Picovoice's kind whose own hash puts them in (or out of) the validation split."""
    names = (f"pvwwb_unknown_{n:08x}.flac" for n in range(10_000))
    return [n for n in names if (stable_fraction(n) < VALIDATION_FRACTION) == held][:count]


def test_a_recording_is_held_out_only_when_no_copy_of_it_is_trained_on(tmp_path: Path) -> None:
    """Other wake words are split by file name; a copy trained on puts every copy of its recording in training
    (a held-out copy would test a recording the model learnt as a negative)."""
    data = tmp_path / "data"
    folder = data / "real" / "jarvis"
    (data / "real_long").mkdir(parents=True)
    (data / "noise").mkdir()
    held, trained = names_held(True, 3), names_held(False, 1)
    first, other = recording("computer_light_on.wav"), recording("heat_up_no_wake.wav")
    write(folder, held[0], first)
    write(folder, trained[0], copy_of(first, 1, gain=0.7, lead=0.2))  # a copy in training
    write(folder, held[1], other)
    write(folder, held[2], copy_of(other, 2, gain=1.2, lead=0.1))  # both copies held out
    clips = {Path(c.path).name: c for c in inventory(data, synth_dir=None)}
    assert clips[held[0]].split == clips[trained[0]].split == "train"
    assert clips[held[0]].group == clips[trained[0]].group
    assert clips[held[1]].split == clips[held[2]].split == "validation"
    assert clips[held[1]].group == clips[held[2]].group != clips[held[0]].group


def test_a_recording_takes_the_split_of_its_copy_nearest_training() -> None:
    """Long speech and noise are split three ways by file name: a copy in training puts the recording in
    training, a copy among the threshold-tuning clips keeps it out of the held-out set."""
    copies = {"a": "a", "b": "a", "c": "c", "d": "d", "e": "d"}
    split_of = {"a": "validation", "b": "tune", "c": "validation", "d": "tune", "e": "train"}.__getitem__
    assert recording_split(copies, split_of) == {"a": "tune", "c": "validation", "d": "train"}
