"""Stage 1: clip inventory, speaker-disjoint split, augmentation and cached feature windows.

Splits (all deterministic, computed from file names and audio, so ``training.evaluate`` recomputes them):
- Speech Commands ``sc_<speaker>_*`` and FSDD ``fsdd_<speaker>_*``: by a hash of the speaker.
- Picovoice ``computer`` (no speaker ids): clips are clustered into approximate speaker groups (k-means on
  per-clip cepstral statistics) and whole groups are held out.
- Other wake words without speaker ids, ``real_long/`` and ``noise/``: by a hash of the file name.
- Mycroft Precise ``precise_<speaker>_*``: every speaker is held out ("new voices", issue 13): the model
  never hears a Precise clip. ``hey_computer`` (our wake word after "hey", one Precise speaker) is a held-out
  wake-word source; the other Precise words are false-wake material.
- Synthetic speech (``.cache/synth/<word>/``): training, except the voices of HELD_OUT_SYNTH_ENGINES and a
  hash-chosen share of the others, which are held out entirely and reported as synthetic, never as
  real-speaker accuracy.

``training.newvoices`` evaluates a model on everything held out here, source by source, through the runtime's
streaming path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.audio import to_int16
from agent.features import (
    COMMAND_WORDS,
    DEVICE_WORDS,
    INT16_SCALE,
    LABELS,
    SILENCE_LABEL,
    UNKNOWN_LABEL,
    WAKE_WORD,
    FeatureParams,
    window_features,
)
from agent.progress import progress
from training.common import CACHE_DIR, SAMPLE_RATE, SEED, SYNTH_DIR, file_key, read_audio, stable_fraction

log = logging.getLogger(__name__)

VALIDATION_FRACTION = 0.25  # of speakers (or speaker clusters) held out from training
WINDOW = SAMPLE_RATE  # 1 s
CONTEXT = SAMPLE_RATE // 4  # 250 ms either side of a word window, for time-shift augmentation
VOCABULARY = (WAKE_WORD, *COMMAND_WORDS, *DEVICE_WORDS)
# Real words whose clips contain one of our words: neither positive (not the whole label) nor negative, so
# never trained on; "hey computer" is held out as a wake-word source (label `computer`, split "validation").
HEY_WAKE_WORD = "hey_computer"
# Synthetic engines never trained on: their every voice is a held-out "new voice" (training.newvoices).
HELD_OUT_SYNTH_ENGINES = ("festival",)
SYNTH_VALIDATION_FRACTION = 0.15  # of the other engines' voices, also held out entirely
# Synthetic "confusables" that contain the wake word whole: as negatives they would teach the model to
# reject a real "computer" followed by any sound.
EXCLUDED_SYNTH = ("computers",)
# Confusables that hold most of the wake word ("computing", "commuter"): trained on as negatives, but not
# counted in the wake threshold's false-wake budget (a threshold high enough to reject them rejects
# "computer" too).
WAKE_FRAGMENT_WORDS = ("commuter", "compute", "puter", "commute", "computing", "competitor")
COMPUTER_CLUSTERS = 36
DATA_VERSION = 13  # bump when the windows or augmentation change (invalidates the cache)


@dataclass(frozen=True)
class Clip:
    path: str  # absolute
    label: str
    group: str  # speaker, speaker cluster, voice or file: what must not straddle the split
    split: str  # "train" | "validation" (held out, reported) | "tune" (negatives for thresholds)
    source: str  # "real" | "synth" | "long" | "noise"


def speaker_of(name: str) -> str | None:
    match = re.match(r"^(sc|fsdd|precise)_([^_]+)_", name)
    return f"{match.group(1)}_{match.group(2)}" if match else None


def synth_voice(name: str) -> str:
    stem = Path(name).stem
    if re.search(r"-s\d+-p\d+$", stem):
        return re.sub(r"-s\d+-p\d+$", "", stem)
    return "_".join(stem.split("_")[:2])


def _file_split(key: str) -> str:
    """Negatives without speakers: half for training, a quarter to tune thresholds, a quarter held out."""
    fraction = stable_fraction(key)
    if fraction < 0.5:
        return "train"
    return "tune" if fraction < 0.75 else "validation"


def best_window_start(samples: npt.NDArray[np.float32], size: int = WINDOW) -> int:
    """Start of the ``size``-sample window with the most energy (where the word is in a longer clip)."""
    if len(samples) <= size:
        return 0
    step = 160
    cumulative = np.concatenate([[0.0], np.cumsum(samples.astype(np.float64) ** 2)])
    starts = np.arange(0, len(samples) - size + 1, step)
    energy = cumulative[starts + size] - cumulative[starts]
    return int(starts[int(np.argmax(energy))])


def word_window(samples: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The 1 s evaluation window of a clip: the clip if it is 1 s or shorter, else its loudest second."""
    start = best_window_start(samples)
    window = samples[start : start + WINDOW]
    if len(window) < WINDOW:
        window = np.concatenate([np.zeros(WINDOW - len(window), dtype=np.float32), window])
    return window


def word_context(samples: npt.NDArray[np.float32]) -> npt.NDArray[np.int16]:
    """The loudest second plus CONTEXT either side (zeros past the ends), as int16."""
    start = best_window_start(samples)
    padded = np.concatenate([np.zeros(CONTEXT, np.float32), samples, np.zeros(WINDOW + CONTEXT, np.float32)])
    segment = padded[start : start + WINDOW + 2 * CONTEXT]
    if len(samples) < WINDOW:  # short clips sit centred in the window, as Speech Commands clips do
        offset = (WINDOW - len(samples)) // 2
        segment = np.zeros(WINDOW + 2 * CONTEXT, np.float32)
        segment[CONTEXT + offset : CONTEXT + offset + len(samples)] = samples
    return to_int16(segment)


def speech_span(samples: npt.NDArray[np.int16], floor_db: float = 30.0) -> tuple[int, int] | None:
    """First and one-past-last sample of the 10 ms frames within ``floor_db`` of the loudest one (and 10 dB
    over the quietest tenth): where the word is. None for silence."""
    frame = SAMPLE_RATE // 100
    count = len(samples) // frame
    if count == 0:
        return None
    frames = (samples[: count * frame].astype(np.float64) / INT16_SCALE).reshape(count, frame)
    power = np.mean(frames**2, axis=1)
    level = 10 * np.log10(power + 1e-10)
    loud = np.nonzero(level > max(level.max() - floor_db, np.percentile(level, 10) + 10))[0]
    if len(loud) == 0 or level.max() < -70:
        return None
    return int(loud[0]) * frame, (int(loud[-1]) + 1) * frame


# ---------------------------------------------------------------------------------------------- inventory


def _cepstral_signature(samples: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """Mean and spread of 2..20th cepstra over the voiced frames: a cheap, channel-and-timbre speaker cue."""
    from python_speech_features import mfcc

    cepstra = mfcc(samples, SAMPLE_RATE, numcep=20, nfilt=40, nfft=512, winfunc=np.hamming, appendEnergy=True)
    energy = cepstra[:, 0]
    voiced = cepstra[energy >= np.percentile(energy, 60)][:, 1:]
    return np.concatenate([voiced.mean(axis=0), voiced.std(axis=0)])


def kmeans(
    points: npt.NDArray[np.float64], k: int, seed: int = SEED, rounds: int = 50
) -> npt.NDArray[np.int64]:
    """Plain k-means with k-means++ seeding (no scikit-learn in the stack)."""
    rng = np.random.default_rng(seed)
    centers = [points[rng.integers(len(points))]]
    for _ in range(1, k):
        distance = np.min([np.sum((points - c) ** 2, axis=1) for c in centers], axis=0)
        centers.append(points[rng.choice(len(points), p=distance / distance.sum())])
    center_array = np.array(centers)
    assignment = np.zeros(len(points), dtype=np.int64)
    for _ in range(rounds):
        distances = ((points[:, None, :] - center_array[None, :, :]) ** 2).sum(axis=2)
        new_assignment = distances.argmin(axis=1)
        if np.array_equal(new_assignment, assignment):
            break
        assignment = new_assignment
        for cluster in range(k):
            members = points[assignment == cluster]
            if len(members):
                center_array[cluster] = members.mean(axis=0)
    return assignment


def cluster_speakers(paths: list[Path], k: int = COMPUTER_CLUSTERS) -> dict[str, str]:
    """{file name: cluster id} for clips without speaker ids (deterministic for a given set of files)."""
    if not paths:
        return {}
    signatures = np.array([_cepstral_signature(read_audio(p)) for p in paths])
    standardized = (signatures - signatures.mean(axis=0)) / (signatures.std(axis=0) + 1e-9)
    assignment = kmeans(standardized, min(k, len(paths)))
    return {p.name: f"cluster{int(c):02d}" for p, c in zip(paths, assignment, strict=True)}


def _cluster_validation(groups: dict[str, str]) -> set[str]:
    """Hold out whole clusters, in a hash order, until about VALIDATION_FRACTION of the clips."""
    sizes = Counter(groups.values())
    held: set[str] = set()
    total = sum(sizes.values())
    for cluster in sorted(sizes, key=lambda c: stable_fraction("computer-" + c)):
        if sum(sizes[c] for c in held) >= VALIDATION_FRACTION * total:
            break
        held.add(cluster)
    return held


# Copies of one recording: the Picovoice benchmark holds 5-9 groups of 2-16 identical waveforms per wake word
# (other noise or gain at most). Copies correlate at 0.98-1.0 over their loudest 1.4 s; different takes, even
# one speaker's, at most 0.74. A copy on each side of the split would test a recording the model trained on.
COPY_CORRELATION = 0.9
COPY_SECONDS = 1.4
# The cheap first test: block means of 8 samples (2 kHz). Copies correlate there at 0.82 or more, other takes
# at most 0.74; pairs above COPY_COARSE are then compared at the full rate.
COPY_COARSE_BLOCK = 8
COPY_COARSE = 0.6


def _loudest(samples: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """The loudest COPY_SECONDS of a clip, zero mean and unit norm (zero-padded when shorter)."""
    size = round(COPY_SECONDS * SAMPLE_RATE) // COPY_COARSE_BLOCK * COPY_COARSE_BLOCK
    centred = samples.astype(np.float64) - float(np.mean(samples))
    width = SAMPLE_RATE // 10  # the loudest 100 ms (its energy from a running sum) is the segment's middle
    cumulative = np.concatenate([[0.0], np.cumsum(centred**2)])
    energy = cumulative[width:] - cumulative[:-width]  # of the width samples from each start
    middle = int(np.argmax(energy)) + width // 2 - 1 if len(energy) else 0
    segment = centred[max(0, middle - size // 2) : middle + size // 2]
    segment = np.pad(segment, (0, size - len(segment)))
    normalised: npt.NDArray[np.float64] = segment / (np.linalg.norm(segment) + 1e-12)
    return normalised


def _correlations(spectra: npt.NDArray[np.complex128], first: int, others: npt.NDArray[np.intp],
                  size: int) -> npt.NDArray[np.float64]:
    """The largest absolute cross-correlation of segment ``first`` with each of ``others`` at any lag."""
    products = spectra[first][None, :] * np.conj(spectra[others])
    peaks: npt.NDArray[np.float64] = np.abs(np.fft.irfft(products, n=2 * size)).max(axis=1)
    return peaks


def recording_copies(paths: list[Path]) -> dict[str, str]:
    """{file name: the first file name of its recording}: files holding the same recording map to one name."""
    names = [p.name for p in paths]
    first = {name: name for name in names}
    if len(paths) < 2:
        return first
    segments = np.array([_loudest(read_audio(p)) for p in paths])
    coarse = segments.reshape(len(paths), -1, COPY_COARSE_BLOCK).mean(axis=2)
    coarse /= np.linalg.norm(coarse, axis=1, keepdims=True) + 1e-12
    coarse_spectra = np.fft.rfft(coarse, n=2 * coarse.shape[1])
    spectra = np.fft.rfft(segments, n=2 * segments.shape[1])

    def root(name: str) -> str:
        while first[name] != name:
            name = first[name]
        return name

    for i in range(len(paths) - 1):
        later = np.arange(i + 1, len(paths))
        candidates = later[_correlations(coarse_spectra, i, later, coarse.shape[1]) >= COPY_COARSE]
        if not len(candidates):
            continue
        copies = candidates[_correlations(spectra, i, candidates, segments.shape[1]) >= COPY_CORRELATION]
        for j in copies:
            a, b = sorted((root(names[i]), root(names[int(j)])))
            first[b] = a
    return {name: root(name) for name in names}


SPLIT_ORDER = ("train", "tune", "validation")  # a recording takes the first of its copies' splits here


def recording_split(copies: dict[str, str], split_of: Callable[[str], str]) -> dict[str, str]:
    """{recording: split}: each copy's file name gives a split (``split_of``) and the recording takes the one
    nearest training, so it is held out only if every copy is (and the models trained before copies were
    known never trained on what is now held out)."""
    splits: dict[str, str] = {}
    for name, recording in copies.items():
        splits[recording] = min(splits.get(recording, SPLIT_ORDER[-1]), split_of(name), key=SPLIT_ORDER.index)
    return splits


def _name_split(name: str) -> str:
    """Clips of words without speaker ids: a quarter of the file names held out."""
    return "validation" if stable_fraction(name) < VALIDATION_FRACTION else "train"


def _recordings(paths: list[Path], split_of: Callable[[str], str]) -> dict[str, tuple[str, str]]:
    """{file name: (recording, split)}, every copy of a recording on one side (:func:`recording_split`)."""
    copies = recording_copies(paths)
    splits = recording_split(copies, split_of)
    return {name: (recording, splits[recording]) for name, recording in copies.items()}


def inventory(
    data_dir: Path, synth_dir: Path | None = SYNTH_DIR, limit: int | None = None
) -> list[Clip]:
    """Every clip with label, group and split. ``limit`` keeps only a few files per folder (smoke runs)."""
    clips: list[Clip] = []
    real = data_dir / "real"
    if not real.is_dir():
        raise FileNotFoundError(f"{real} does not exist (is DATA_DIR right?)")
    for folder in sorted(p for p in real.iterdir() if p.is_dir()):
        word = folder.name
        if word in DEVICE_WORDS:
            continue
        files = sorted(folder.glob("*.flac"))
        if word == HEY_WAKE_WORD:
            for path in _limit(files, limit):
                group = speaker_of(path.name) or path.name
                clips.append(Clip(str(path), WAKE_WORD, group, "validation", "real"))
            continue
        label = word if word in VOCABULARY else UNKNOWN_LABEL
        if word == WAKE_WORD:
            copies = recording_copies(files)
            clusters = cluster_speakers(files)
            groups = {name: clusters[recording] for name, recording in copies.items()}  # copies stay together
            held = _cluster_validation(groups)
            chosen = _limit(files, limit)
            for path in chosen:
                group = groups[path.name]
                split = "validation" if group in held else "train"
                clips.append(Clip(str(path), label, f"computer-{group}", split, "real"))
            continue
        chosen = _limit(files, limit)
        recordings = _recordings([p for p in chosen if speaker_of(p.name) is None], _name_split)
        for path in chosen:
            speaker = speaker_of(path.name)
            if speaker is not None and speaker.startswith("precise"):
                split, group = "validation", speaker  # every Precise speaker is a new voice
            elif speaker is not None:
                split = "validation" if stable_fraction(speaker) < VALIDATION_FRACTION else "train"
                group = speaker
            else:
                group, split = recordings[path.name]
            clips.append(Clip(str(path), label, group, split, "real"))
    for subdir, label, source in (("real_long", UNKNOWN_LABEL, "long"), ("noise", SILENCE_LABEL, "noise")):
        paths = _limit(sorted((data_dir / subdir).rglob("*.flac")), limit)
        recordings = _recordings(paths, _file_split)
        clips.extend(Clip(str(p), label, *recordings[p.name], source) for p in paths)
    if synth_dir is not None and synth_dir.is_dir():
        for folder in sorted(p for p in synth_dir.iterdir() if p.is_dir() and p.name not in EXCLUDED_SYNTH):
            label = folder.name if folder.name in VOCABULARY else UNKNOWN_LABEL
            for path in _limit(sorted(folder.glob("*.wav")), limit):
                voice = synth_voice(path.name)
                split = "synth_validation" if synth_held_out(voice) else "train"
                clips.append(Clip(str(path), label, voice, split, "synth"))
    return clips


def synth_held_out(voice: str) -> bool:
    """A synthetic voice (``engine_voice``) never trained on."""
    engine = voice.split("_", maxsplit=1)[0]
    return engine in HELD_OUT_SYNTH_ENGINES or stable_fraction("voice-" + voice) < SYNTH_VALIDATION_FRACTION


def _limit(files: list[Path], limit: int | None) -> list[Path]:
    if limit is None or len(files) <= limit:
        return files
    step = len(files) / limit
    return [files[int(i * step)] for i in range(limit)]


def summarize(clips: list[Clip]) -> dict[str, Any]:
    counts: dict[str, dict[str, int]] = {}
    for clip in clips:
        key = f"{clip.source}/{clip.split}"
        counts.setdefault(key, Counter())[clip.label] += 1
    speakers = {
        split: len({c.group for c in clips if c.split == split and c.group.startswith("sc_")})
        for split in ("train", "validation")
    }
    return {"clips": {k: dict(sorted(v.items())) for k, v in sorted(counts.items())}, "sc_speakers": speakers}


# -------------------------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class AugmentConfig:
    word_copies: int = 6  # augmented windows per real training word clip
    computer_copies: int = 14  # per real `computer` clip (few speakers: more variety per clip)
    synth_copies: int = 2  # device words (synthetic only)
    synth_command_copies: int = 1  # the ten words have real speakers; synthetic voices only add variety
    synth_computer_copies: int = 4
    unknown_copies: int = 2  # real other words and other wake words
    long_hop_seconds: float = 0.25  # windows cut from real_long/ (unknown) and noise/ (silence)
    shift_seconds: float = 0.1
    # The wake word must score high wherever it sits in the streamed window (and its clips have real audio
    # around the word), so it moves further.
    wake_shift_seconds: float = 0.25
    # Streaming wants a word recognised as soon as it is complete, i.e. when it sits at the END of the 1 s
    # window, not only centred as in the clips: this share of the windows of every word but the wake word
    # (command words, device words and the other words, so a whole "often" at the end still reads unknown)
    # places the word's end this many seconds before the window's end. Without it a command fired only once
    # it had moved towards the middle of the window (0.3-0.5 s after it was said). The wake word's latency
    # does not matter; end-placing it too (tried) let false wakes through at the wake threshold's floor.
    end_probability: float = 0.5
    end_margin_seconds: tuple[float, float] = (0.02, 0.2)
    # Commands are phrases ("heat up"): when "up" ends, "heat" is still in the window. This share of the
    # end-placed windows gets another training word (any label, often cut by the window's left edge) before
    # the word, so the label is the word that has just ended, whatever precedes it.
    preceding_probability: float = 0.5
    preceding_gap_seconds: tuple[float, float] = (0.03, 0.35)
    preceding_level_db: tuple[float, float] = (-6.0, 3.0)  # its peak relative to the word's
    preceding_pool: int = 3000  # words (speech only) drawn from the training clips
    # A command follows the wake word after a short pause ("computer, lights on"), and the wake word fires
    # on the smoothed posterior of the hops in which that command's onset is already entering the window.
    # This share of the wake word's windows ends inside such a following word (its first part, cut by the
    # window's right edge), still labelled `computer`: the word that has ended is the wake word. Tried at 0.5
    # on 72 channels (session 10, candidate A in the model card): the wider model's wake-word losses inside
    # held-out whole commands stayed (109 of 794 at a 0.54 threshold, isolated clips 93 %), so it is off in
    # the shipped recipe; `python -m training.kws --wake-following P` turns it on.
    following_probability: float = 0.0
    following_gap_seconds: tuple[float, float] = (0.1, 0.4)
    following_visible: tuple[float, float] = (0.1, 0.8)  # share of the following word inside the window
    # After the wake word has fired, its end ("...puter") stays in the model's window, followed by the pause,
    # while the window's left edge has already cut off its start: with one held-out speaker, every model but
    # the shipped one took that for "up" (control D: 87 wrong intents after one `hey computer` clip). This
    # many windows per `computer` clip (real and synthetic) hold only its end: the window's left edge cuts
    # off wake_tail_cut of the word's speech, the rest of the window is what followed the word; labelled
    # _unknown_. The cut starts past the wake word's own time shift (+-250 ms of a ~0.6 s word), so no window
    # labelled `computer` loses as much of its start. Off in the shipped recipe (`python -m training.kws
    # --wake-tail N`): candidate E (session 12, model card) kept the "up", which comes from the whole word.
    wake_tail_copies: int = 0
    wake_tail_cut: tuple[float, float] = (0.45, 0.8)
    # Candidate E (session 12) showed where that "up" comes from: the whole "computer" with its end near the
    # window's end (the wake word is never end-placed, every command word is, often after another word).
    # This many extra windows per `computer` clip are end-placed like a command word's (end_margin_seconds,
    # preceding_probability), still labelled `computer`, from the same own generator. Off in the shipped
    # recipe (`python -m training.kws --wake-end N`): candidate F (4 copies, session 12) cut the wrong
    # intents after that clip from 87 to 12 but missed more of the Picovoice speakers' `computer` (81.9 %);
    # candidate G (1 copy) kept that word (97.2 %) and all 87.
    wake_end_copies: int = 0
    noise_probability: float = 0.8
    snr_db: tuple[float, float] = (0.0, 25.0)
    room_probability: float = 0.3
    gain_db: tuple[float, float] = (-20.0, 0.0)
    rooms: int = 40
    quiet_silence: int = 400  # synthetic near-silence windows (zeros, faint white/pink noise)
    synth_negatives_per_word: int = 100  # synthetic confusables kept per word (there are ~75 words x 426)
    # Speaker perturbation (issue 13: voices the model has never heard): this share of the word windows is
    # resampled by a factor in warp_range (speed, pitch and formants move together, as in a longer or
    # shorter vocal tract) and gets a random microphone EQ (a peaking band, a low and a high roll-off).
    warp_probability: float = 0.0
    warp_range: tuple[float, float] = (0.87, 1.15)
    eq_probability: float = 0.0
    eq_gain_db: tuple[float, float] = (-9.0, 9.0)


def room_impulse_responses(count: int, seed: int = SEED) -> list[npt.NDArray[np.float32]]:
    """Simulated small rooms (pyroomacoustics shoebox, image source method), cached on disk."""
    cache = CACHE_DIR / f"rirs-{count}-{seed}.npz"
    if cache.exists():
        with np.load(cache) as data:
            return [data[k] for k in sorted(data.files, key=int)]
    import pyroomacoustics as pra

    rng = np.random.default_rng(seed)
    responses: list[npt.NDArray[np.float32]] = []
    for _ in progress(range(count), total=count, desc="rooms"):
        size = rng.uniform([3.0, 3.0, 2.4], [8.0, 6.0, 3.2])
        rt60 = rng.uniform(0.2, 0.7)
        absorption, max_order = pra.inverse_sabine(rt60, size)
        room = pra.ShoeBox(
            size, fs=SAMPLE_RATE, materials=pra.Material(absorption), max_order=min(max_order, 12)
        )
        room.add_source(rng.uniform([0.5, 0.5, 1.0], size - 0.5))
        room.add_microphone(rng.uniform([0.5, 0.5, 0.8], size - 0.5))
        room.compute_rir()
        rir = np.asarray(room.rir[0][0], dtype=np.float32)[: SAMPLE_RATE // 2]
        responses.append(rir / np.abs(rir).max())
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, **{str(i): r for i, r in enumerate(responses)})  # type: ignore[arg-type]
    return responses


def warp(context: npt.NDArray[np.int16], factor: float) -> npt.NDArray[np.int16]:
    """``context`` played ``factor`` times faster (pitch and formants up by ``factor``), kept centred and at
    its length (zeros where it became shorter)."""
    from scipy.signal import resample_poly

    down = max(1, round(100 * factor))
    warped = resample_poly(context.astype(np.float32), 100, down).astype(np.float32)
    size = len(context)
    if len(warped) >= size:
        start = (len(warped) - size) // 2
        out: npt.NDArray[np.float32] = warped[start : start + size]
    else:
        out = np.zeros(size, np.float32)
        start = (size - len(warped)) // 2
        out[start : start + len(warped)] = warped
    return np.clip(np.round(out), -32768, 32767).astype(np.int16)


def _biquad(kind: str, hz: float, q: float, gain_db: float = 0.0) -> tuple[Any, Any]:
    """RBJ audio-EQ-cookbook coefficients (b, a) at SAMPLE_RATE."""
    w0 = 2 * np.pi * hz / SAMPLE_RATE
    alpha = np.sin(w0) / (2 * q)
    cos = np.cos(w0)
    if kind == "peak":
        amp = 10 ** (gain_db / 40)
        b = [1 + alpha * amp, -2 * cos, 1 - alpha * amp]
        a = [1 + alpha / amp, -2 * cos, 1 - alpha / amp]
    elif kind == "highpass":
        b = [(1 + cos) / 2, -(1 + cos), (1 + cos) / 2]
        a = [1 + alpha, -2 * cos, 1 - alpha]
    else:  # lowpass
        b = [(1 - cos) / 2, 1 - cos, (1 - cos) / 2]
        a = [1 + alpha, -2 * cos, 1 - alpha]
    return np.array(b) / a[0], np.array(a) / a[0]


def microphone_eq(
    speech: npt.NDArray[np.float32], rng: np.random.Generator, gain_db: tuple[float, float]
) -> npt.NDArray[np.float32]:
    """A random microphone and loudspeaker colouring: a peaking band (300-3500 Hz), a low roll-off
    (60-400 Hz) and a high roll-off (2.5-7 kHz); the peak level is kept."""
    from scipy.signal import lfilter

    out = speech.astype(np.float64)
    for kind, hz, q, gain in (
        ("peak", rng.uniform(300, 3500), rng.uniform(0.5, 2.0), rng.uniform(*gain_db)),
        ("highpass", rng.uniform(60, 400), 0.707, 0.0),
        ("lowpass", rng.uniform(2500, 7000), 0.707, 0.0),
    ):
        b, a = _biquad(kind, hz, q, gain)
        out = lfilter(b, a, out)
    peak = float(np.abs(out).max())
    scale = float(np.abs(speech).max()) / peak if peak > 0 else 0.0
    return (out * scale).astype(np.float32)


def _window_from(context: npt.NDArray[np.int16], start: int) -> npt.NDArray[np.float32]:
    """The 1 s window of ``context`` from sample ``start``, as floats; where it lies outside the context
    (before its start or after its end) it holds zeros, as around a clip."""
    padded = np.concatenate([np.zeros(WINDOW, np.int16), context, np.zeros(WINDOW, np.int16)])
    return padded[WINDOW + start : 2 * WINDOW + start].astype(np.float32) / INT16_SCALE


class Augmenter:
    def __init__(self, config: AugmentConfig, noise_pool: npt.NDArray[np.float32], seed: int) -> None:
        self.config = config
        self.noise = noise_pool
        self.rng = np.random.default_rng(seed)
        self.rooms = room_impulse_responses(config.rooms) if config.room_probability > 0 else []
        self.preceding: list[npt.NDArray[np.int16]] = []  # words that may precede an end-placed word
        self.placed_at_end = False  # where word() put its last word
        self.followed = False  # whether word() put the start of another word after it

    def noise_window(self, size: int = WINDOW) -> npt.NDArray[np.float32]:
        start = int(self.rng.integers(0, len(self.noise) - size))
        return self.noise[start : start + size]

    def word(
        self,
        context: npt.NDArray[np.int16],
        shift_seconds: float,
        at_end: bool = False,
        followed: bool = False,
    ) -> npt.NDArray[np.int16]:
        """One augmented 1 s window from a word's 1.5 s context; ``at_end``: a share of the windows (see
        AugmentConfig.end_probability) put the word's end near the window's end; ``followed``: a share (see
        AugmentConfig.following_probability) end inside the start of another word that follows it."""
        config, rng = self.config, self.rng
        if rng.random() < config.warp_probability:
            context = warp(context, float(rng.uniform(*config.warp_range)))
        self.followed = False
        # no draw when it is off: the shipped recipe's windows stay what they were
        following = followed and self.preceding and config.following_probability > 0
        if following and rng.random() < config.following_probability:
            follow_span = speech_span(context)
            window = self._followed(context, follow_span) if follow_span is not None else None
            if window is not None:
                self.placed_at_end, self.followed = False, True
                return self._finish(window)
        span = speech_span(context) if at_end and rng.random() < config.end_probability else None
        longest = WINDOW - round(config.end_margin_seconds[1] * SAMPLE_RATE)
        self.placed_at_end = span is not None and span[1] - span[0] <= longest
        if span is not None and self.placed_at_end:
            margin = round(rng.uniform(*config.end_margin_seconds) * SAMPLE_RATE)
            start = span[1] + margin - WINDOW
            speech = _window_from(context, start)
            if self.preceding and rng.random() < config.preceding_probability:
                self._precede(speech, span[0] - start)
        else:
            max_shift = min(round(shift_seconds * SAMPLE_RATE), CONTEXT)
            offset = CONTEXT + int(rng.integers(-max_shift, max_shift + 1))
            speech = context[offset : offset + WINDOW].astype(np.float32) / INT16_SCALE
        return self._finish(speech)

    def wake_tail(self, context: npt.NDArray[np.int16]) -> npt.NDArray[np.int16] | None:
        """A window holding only the end of the word in ``context``: its left edge cuts off a share
        (AugmentConfig.wake_tail_cut) of the word's speech, the rest is what followed the word. None for
        silence."""
        span = speech_span(context)
        if span is None:
            return None
        cut = span[0] + round(self.rng.uniform(*self.config.wake_tail_cut) * (span[1] - span[0]))
        return self._finish(_window_from(context, cut))

    def _finish(self, speech: npt.NDArray[np.float32]) -> npt.NDArray[np.int16]:
        """Room, microphone, gain and noise on a placed window."""
        config, rng = self.config, self.rng
        if self.rooms and rng.random() < config.room_probability:
            rir = self.rooms[int(rng.integers(len(self.rooms)))]
            from scipy.signal import fftconvolve

            wet = fftconvolve(speech, rir)[:WINDOW].astype(np.float32)
            speech = wet * (np.abs(speech).max() / max(float(np.abs(wet).max()), 1e-9))
        if rng.random() < config.eq_probability:
            speech = microphone_eq(speech, rng, config.eq_gain_db)
        speech *= np.float32(10 ** (rng.uniform(*config.gain_db) / 20))
        if rng.random() < config.noise_probability:
            speech = self._mix(speech, self.noise_window(), rng.uniform(*config.snr_db))
        return to_int16(speech)

    def _followed(
        self, context: npt.NDArray[np.int16], span: tuple[int, int]
    ) -> npt.NDArray[np.float32] | None:
        """The word of ``context`` (at ``span``), a short gap, then the first part of a random training word
        up to the window's right edge; None when the word leaves no room for it."""
        rng, config = self.rng, self.config
        other = self._other_word()
        gap = round(rng.uniform(*config.following_gap_seconds) * SAMPLE_RATE)
        room = WINDOW - (span[1] - span[0]) - gap
        visible = min(round(rng.uniform(*config.following_visible) * len(other)), room)
        if visible <= 0:
            return None
        start = span[1] + gap + visible - WINDOW
        speech = _window_from(context, start)
        peak = float(np.abs(speech[span[0] - start : span[1] - start]).max())
        speech[WINDOW - visible :] += other[:visible] * self._level_to(other, peak)
        return speech

    def _precede(self, speech: npt.NDArray[np.float32], word_start: int) -> None:
        """Add a random training word ending a short gap before ``word_start`` (in place; its front may fall
        off the window's left edge)."""
        other = self._other_word()
        end = word_start - round(self.rng.uniform(*self.config.preceding_gap_seconds) * SAMPLE_RATE)
        if end <= 0:
            return
        visible = other[max(0, len(other) - end) :]
        peak = float(np.abs(speech[word_start:]).max()) if word_start < len(speech) else 0.0
        speech[end - len(visible) : end] += visible * self._level_to(other, peak)

    def _other_word(self) -> npt.NDArray[np.float32]:
        """A random word of the pool (``preceding``) that may precede or follow a placed word, as floats."""
        return self.preceding[int(self.rng.integers(len(self.preceding)))].astype(np.float32) / INT16_SCALE

    def _level_to(self, other: npt.NDArray[np.float32], peak: float) -> np.float32:
        """The gain that puts ``other``'s peak at a random level (``preceding_level_db``) relative to
        ``peak``, the placed word's."""
        level = 10 ** (self.rng.uniform(*self.config.preceding_level_db) / 20)
        return np.float32(peak / max(float(np.abs(other).max()), 1e-9) * level)

    def negative(self, window: npt.NDArray[np.float32], noisy: bool = True) -> npt.NDArray[np.int16]:
        rng = self.rng
        window = window * np.float32(10 ** (rng.uniform(*self.config.gain_db) / 20))
        if noisy and rng.random() < self.config.noise_probability / 2:
            window = self._mix(window, self.noise_window(), rng.uniform(5.0, 30.0))
        return to_int16(window)

    def quiet(self) -> npt.NDArray[np.int16]:
        """Near-silence: zeros, faint white or pink noise, or faint recorded noise."""
        rng = self.rng
        kind = int(rng.integers(4))
        level = 10 ** rng.uniform(-4.5, -2.0)
        if kind == 0:
            return np.zeros(WINDOW, np.int16)
        if kind == 1:
            return to_int16(rng.normal(0, level, WINDOW))
        if kind == 2:
            white = np.fft.rfft(rng.normal(0, 1, WINDOW))
            pink = np.fft.irfft(white / np.sqrt(np.arange(1, len(white) + 1)), WINDOW)
            return to_int16(pink / (np.abs(pink).max() + 1e-9) * level * 3)
        noise = self.noise_window()
        return to_int16(noise / (np.abs(noise).max() + 1e-9) * level * 3)

    @staticmethod
    def _mix(speech: npt.NDArray[np.float32], noise: npt.NDArray[np.float32], snr_db: float) -> Any:
        speech_power = float(np.mean(speech**2)) + 1e-12
        noise_power = float(np.mean(noise**2)) + 1e-12
        scale = np.sqrt(speech_power / (noise_power * 10 ** (snr_db / 10)))
        mixed = speech + noise * np.float32(scale)
        peak = float(np.abs(mixed).max())
        return mixed / peak * 0.99 if peak > 0.99 else mixed


# -------------------------------------------------------------------------------------------- the dataset


@dataclass
class Dataset:
    """Feature windows with integer labels (indices into LABELS) and where each came from."""

    features: npt.NDArray[np.float32]  # (N, frames, features)
    labels: npt.NDArray[np.int64]
    sources: npt.NDArray[np.str_]  # "real" | "synth" | "long" | "noise" | "quiet" | "mined"
    origin: npt.NDArray[np.str_]  # the clip's file name, for reports
    # The word was placed at the window's end (AugmentConfig.end_probability): no teacher trained on centred
    # words knows these windows, so they are never distilled from one.
    at_end: npt.NDArray[np.bool_] | None = None

    def __post_init__(self) -> None:
        if self.at_end is None:
            self.at_end = np.zeros(len(self.labels), dtype=bool)

    @property
    def end_placed(self) -> npt.NDArray[np.bool_]:
        assert self.at_end is not None
        return self.at_end

    def __len__(self) -> int:
        return len(self.labels)

    def concat(self, other: Dataset) -> Dataset:
        return Dataset(
            np.concatenate([self.features, other.features]),
            np.concatenate([self.labels, other.labels]),
            np.concatenate([self.sources, other.sources]),
            np.concatenate([self.origin, other.origin]),
            np.concatenate([self.end_placed, other.end_placed]),
        )

    def subset(self, mask: npt.NDArray[np.bool_]) -> Dataset:
        return Dataset(self.features[mask], self.labels[mask], self.sources[mask], self.origin[mask],
                       self.end_placed[mask])

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, features=self.features, labels=self.labels, sources=self.sources, origin=self.origin,
                 at_end=self.end_placed)

    @classmethod
    def load(cls, path: Path) -> Dataset:
        with np.load(path) as data:
            at_end = data["at_end"] if "at_end" in data.files else None
            return cls(data["features"], data["labels"], data["sources"], data["origin"], at_end)


def _long_windows(samples: npt.NDArray[np.float32], hop: int) -> list[tuple[npt.NDArray[np.float32], bool]]:
    """1 s windows of a long recording and whether each holds sound (vs the pauses between utterances)."""
    if len(samples) < WINDOW:
        samples = np.concatenate([np.zeros(WINDOW - len(samples), np.float32), samples])
    cumulative = np.concatenate([[0.0], np.cumsum(samples.astype(np.float64) ** 2)])
    ends = np.minimum(np.arange(len(samples)) + 200, len(samples))
    begins = np.maximum(np.arange(len(samples)) - 200, 0)
    frame_rms = np.sqrt(np.maximum(cumulative[ends] - cumulative[begins], 0.0) / 400)
    loudest = float(frame_rms.max()) + 1e-9
    windows = []
    for start in range(0, len(samples) - WINDOW + 1, hop):
        window = samples[start : start + WINDOW]
        active = float(frame_rms[start : start + WINDOW].max()) > 0.15 * loudest
        windows.append((window, active))
    return windows


def cache_key(clips: list[Clip], params: FeatureParams, config: AugmentConfig, extra: str = "") -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([asdict(c) for c in clips]).encode())
    digest.update(json.dumps(params.to_dict(), sort_keys=True).encode())
    digest.update(json.dumps(asdict(config), sort_keys=True).encode())
    digest.update(f"{DATA_VERSION}{SEED}{extra}".encode())
    return digest.hexdigest()[:16]


def hash_ordered(clips: Iterable[Clip]) -> list[Clip]:
    """``clips`` in a stable pseudo-random order of their files' names (:func:`training.common.file_key`),
    the same wherever the checkout, its synthetic cache or the data are."""
    return sorted(clips, key=lambda c: stable_fraction(file_key(c.path)))


def _cap_synthetic_negatives(clips: list[Clip], per_word: int) -> list[Clip]:
    """Keep ``per_word`` synthetic confusables per word (a stable, hash-ordered choice of voices)."""
    by_word: dict[str, list[Clip]] = {}
    kept: list[Clip] = []
    for clip in clips:
        if clip.source == "synth" and clip.label == UNKNOWN_LABEL:
            by_word.setdefault(Path(clip.path).parent.name, []).append(clip)
        else:
            kept.append(clip)
    for group in by_word.values():
        kept.extend(hash_ordered(group)[:per_word])
    return kept


def tuning_confusables(clips: list[Clip], trained_per_word: int, per_word: int) -> list[Clip]:
    """Synthetic confusables of the TRAINING voices that training never uses: per word the ``per_word`` clips
    that come right after the ``trained_per_word`` that :func:`_cap_synthetic_negatives` keeps (same order).
    They choose the wake threshold (training.kws): confusable words, voices the model knows, clips it has
    not heard. Words that hold most of the wake word (WAKE_FRAGMENT_WORDS) are left out."""
    by_word: dict[str, list[Clip]] = {}
    for clip in clips:
        word = Path(clip.path).parent.name
        if (
            clip.split == "train"
            and clip.source == "synth"
            and clip.label == UNKNOWN_LABEL
            and word not in WAKE_FRAGMENT_WORDS
        ):
            by_word.setdefault(word, []).append(clip)
    chosen: list[Clip] = []
    for _, group in sorted(by_word.items()):
        ordered = hash_ordered(group)
        chosen.extend(ordered[trained_per_word : trained_per_word + per_word])
    return chosen


def _noise_pool(train: list[Clip]) -> npt.NDArray[np.float32]:
    noise_files = [c for c in train if c.source == "noise"]
    pool = np.concatenate([read_audio(Path(c.path)) for c in noise_files]).astype(np.float32)
    pool /= np.float32(max(float(np.abs(pool).max()), 1e-9))
    return pool


def mine_hard_negatives(  # noqa: PLR0917
    clips: list[Clip],
    params: FeatureParams,
    predict: Any,
    config: AugmentConfig,
    key: str,
    wake_probability: float = 0.2,
    word_probability: float = 0.5,
    copies: int = 2,
    cache_dir: Path = CACHE_DIR,
    synth_words_per_word: int = 30,
    other_words: bool = False,
) -> Dataset:
    """Windows of the TRAINING negatives at a 100 ms hop that ``predict`` (the distilled student) still takes
    for the wake word (p >= wake_probability) or another word (p >= word_probability): the hard negatives,
    kept as they are plus ``copies`` augmented versions, labelled as negatives. The negatives: long speech,
    noise, and with ``other_words`` the clips of other words (other wake words, digits, synthetic confusables
    such as "commuter": ``synth_words_per_word`` of each), each with 0.5 s of silence either side so that
    every position of the word in the window is tried."""
    cache = cache_dir / f"mined-{key}.npz"
    if cache.exists():
        return Dataset.load(cache)
    train = [c for c in clips if c.split == "train"]
    augmenter = Augmenter(config, _noise_pool(train), SEED + 7)
    vocabulary = [LABELS.index(word) for word in VOCABULARY]
    wake = LABELS.index(WAKE_WORD)
    windows: list[npt.NDArray[np.int16]] = []
    labels: list[int] = []
    origins: list[str] = []
    negatives = [c for c in train if c.source in ("long", "noise")]
    if other_words:
        words = [c for c in train if c.label == UNKNOWN_LABEL and c.source in ("real", "synth")]
        negatives += _cap_synthetic_negatives(words, synth_words_per_word)
    pad = np.zeros(SAMPLE_RATE // 2, np.float32)
    for clip in progress(negatives, total=len(negatives), desc="mining"):
        samples = read_audio(Path(clip.path))
        if clip.source in ("real", "synth"):
            samples = np.concatenate([pad, samples, pad])
        cut = _long_windows(samples, SAMPLE_RATE // 10)
        if not cut:
            continue
        features = np.stack([window_features(window, params) for window, _ in cut])
        probabilities = predict(features)
        hard = (probabilities[:, wake] >= wake_probability) | (
            probabilities[:, vocabulary].max(axis=1) >= word_probability
        )
        for (window, active), is_hard in zip(cut, hard, strict=True):
            if not is_hard:
                continue
            label = LABELS.index(clip.label if (active or clip.source == "noise") else SILENCE_LABEL)
            versions = [to_int16(window)] + [augmenter.negative(window) for _ in range(copies)]
            windows.extend(versions)
            labels.extend([label] * len(versions))
            origins.extend([Path(clip.path).name] * len(versions))
    features_out = (
        np.stack([window_features(w, params) for w in windows]) if windows else np.zeros((0, *params.shape))
    )
    dataset = Dataset(
        features_out.astype(np.float32),
        np.array(labels, dtype=np.int64),
        np.array(["mined"] * len(labels)),
        np.array(origins),
    )
    dataset.save(cache)
    return dataset


def preceding_words(train: list[Clip], count: int) -> list[npt.NDArray[np.int16]]:
    """The speech of ``count`` training word clips (a seeded draw over every label), at most 0.8 s each."""
    words = [c for c in train if c.source in ("real", "synth")]
    if not words or count <= 0:
        return []
    rng = np.random.default_rng(SEED + 11)
    chosen = rng.choice(len(words), min(count, len(words)), replace=False)
    pool = []
    for index in progress(sorted(chosen), total=len(chosen), desc="preceding words"):
        context = word_context(read_audio(Path(words[index].path)))
        span = speech_span(context)
        if span is not None:
            pool.append(context[max(span[0], span[1] - round(0.8 * SAMPLE_RATE)) : span[1]])
    return pool


def _augmented_copies(clip: Clip, config: AugmentConfig) -> int:
    """How many augmented windows a training word clip gets."""
    if clip.label == UNKNOWN_LABEL:
        return config.unknown_copies if clip.source == "real" else 1
    if clip.source == "synth":
        if clip.label == WAKE_WORD:
            return config.synth_computer_copies
        return config.synth_command_copies if clip.label in COMMAND_WORDS else config.synth_copies
    return config.computer_copies if clip.label == WAKE_WORD else config.word_copies


def build_training_set(
    clips: list[Clip], params: FeatureParams, config: AugmentConfig, cache_dir: Path = CACHE_DIR
) -> Dataset:
    """Augmented feature windows of every training clip (cached by inventory + parameters + config)."""
    key = cache_key(clips, params, config, "train")
    cache = cache_dir / f"train-{key}.npz"
    if cache.exists() and training_audio_path(key, cache_dir).exists():
        log.info("training windows from cache %s", cache)
        return Dataset.load(cache)
    started = time.monotonic()
    train = _cap_synthetic_negatives(
        [c for c in clips if c.split == "train"], config.synth_negatives_per_word
    )
    noise_pool = _noise_pool(train)
    augmenter = Augmenter(config, noise_pool, SEED)
    augmenter.preceding = preceding_words(train, config.preceding_pool)
    # The wake word's extra windows (end only, end-placed) draw from a generator of their own: every other
    # window stays the same as without them.
    extra = None
    if config.wake_tail_copies > 0 or config.wake_end_copies > 0:
        extra = Augmenter(replace(config, end_probability=1.0), noise_pool, SEED + 31)
        extra.preceding = augmenter.preceding
    hop = round(config.long_hop_seconds * SAMPLE_RATE)
    windows: list[npt.NDArray[np.int16]] = []
    labels: list[int] = []
    sources: list[str] = []
    origins: list[str] = []

    at_end: list[bool] = []

    def add(window: npt.NDArray[np.int16], label: str, source: str, origin: str, end: bool = False) -> None:
        windows.append(window)
        labels.append(LABELS.index(label))
        sources.append(source)
        origins.append(origin)
        at_end.append(end)

    for clip in progress(train, total=len(train), desc="augment"):
        samples = read_audio(Path(clip.path))
        name = Path(clip.path).name
        if clip.source in ("long", "noise"):
            for window, active in _long_windows(samples, hop):
                label = clip.label if (active or clip.source == "noise") else SILENCE_LABEL
                add(augmenter.negative(window, noisy=clip.source == "long"), label, clip.source, name)
            continue
        context = word_context(samples)
        shift = config.wake_shift_seconds if clip.label == WAKE_WORD else config.shift_seconds
        for _ in range(_augmented_copies(clip, config)):
            placed = augmenter.word(
                context, shift, at_end=clip.label != WAKE_WORD, followed=clip.label == WAKE_WORD
            )
            add(placed, clip.label, clip.source, name, augmenter.placed_at_end)
        if extra is not None and clip.label == WAKE_WORD:
            for _ in range(config.wake_tail_copies):
                tail = extra.wake_tail(context)
                if tail is not None:
                    add(tail, UNKNOWN_LABEL, clip.source, name, True)
            for _ in range(config.wake_end_copies):
                placed = extra.word(context, shift, at_end=True)
                add(placed, WAKE_WORD, clip.source, name, extra.placed_at_end)
    for index in range(config.quiet_silence):
        add(augmenter.quiet(), SILENCE_LABEL, "quiet", f"quiet{index}")
    features = np.stack([window_features(w, params) for w in progress(windows, len(windows), "features")])
    dataset = Dataset(features, np.array(labels), np.array(sources), np.array(origins), np.array(at_end))
    # The windows' audio too: the speech-embedding teacher (training.oww_teacher) judges the same samples.
    stored = np.lib.format.open_memmap(
        training_audio_path(key, cache_dir), mode="w+", dtype=np.int16, shape=(len(windows), WINDOW)
    )
    for index in range(len(windows)):
        stored[index] = windows[index]
    stored.flush()
    del stored
    dataset.save(cache)
    log.info("%d training windows in %.0f s -> %s", len(dataset), time.monotonic() - started, cache)
    return dataset


def training_audio_path(key: str, cache_dir: Path = CACHE_DIR) -> Path:
    """The int16 samples of the training windows with cache key ``key`` (same order as their features)."""
    return cache_dir / f"train-audio-{key}.npy"


def build_eval_set(
    clips: list[Clip], params: FeatureParams, split: str, cache_dir: Path = CACHE_DIR
) -> Dataset:
    """Un-augmented word windows of one split (real and synthetic clips; long recordings are streamed)."""
    chosen = [c for c in clips if c.split == split and c.source in ("real", "synth")]
    key = cache_key(chosen, params, AugmentConfig(), split)
    cache = cache_dir / f"eval-{split}-{key}.npz"
    if cache.exists():
        return Dataset.load(cache)
    features = [
        window_features(word_window(read_audio(Path(c.path))), params) for c in progress(chosen, desc=split)
    ]
    dataset = Dataset(
        np.stack(features) if features else np.zeros((0, *params.shape), np.float32),
        np.array([LABELS.index(c.label) for c in chosen], dtype=np.int64),
        np.array([c.source for c in chosen]),
        np.array([Path(c.path).name for c in chosen]),
    )
    dataset.save(cache)
    return dataset
