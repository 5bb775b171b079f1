"""``home-agent enroll``: teach the agent a household's voices and unteach the sounds that wake it by mistake.

Needs no broker and no daemon. The household's recordings (16 kHz mono, trimmed, mode 0600) and the heads
learned from them live in ``<state_dir>/adaptation/``; the shipped model is never changed. A running daemon
picks a new adaptation up on SIGHUP. Nothing is written unless every file is accepted and the new heads pass
the false-wake check (see :mod:`agent.adaptation`).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from agent.adaptation import (
    SPAN_FRAME,
    Adaptation,
    EnrollError,
    frame_energies,
    learn,
    load_model_and_bank,
    stream_embeddings,
    utterance_span,
)
from agent.adaptation_store import Store
from agent.audio import SAMPLE_RATE, read_audio_file
from agent.bank import Bank
from agent.capture import CaptureStore
from agent.config import Config, load_config
from agent.errors import AudioError
from agent.features import INT16_SCALE
from agent.kws import KwsModel

log = logging.getLogger(__name__)

EXIT_USAGE = 2
# A take is refused when: shorter than this, its peak is below QUIET_PEAK (about -36 dBFS), more than
# CLIPPED_FRACTION of its samples sit at full scale, it holds no sound above its own floor, or the utterance
# lasts longer than MAX_UTTERANCE_SECONDS (more than one word, or no silence around it).
MIN_SECONDS = 0.3
QUIET_PEAK = 500
CLIP_LEVEL = 32000
CLIPPED_FRACTION = 0.001
MIN_DYNAMIC_DB = 10.0
MAX_UTTERANCE_SECONDS = 2.5
OTHER_SOUND_DB = 10.0  # a sound outside the utterance this close to its loudest frame: another word
# Another word: the base model is this sure of a different vocabulary word and gives the enrolled one almost
# nothing. (A hard speaker's "computer" heard as "yes" keeps some "computer": it is the case to adapt to.)
# Two words: the voice path (shipped model, smoothing, thresholds) hears the enrolled word and, at least
# SEPARATE_SECONDS from it, another one ("computer heat up" as "heat": 0.9 s; a part of a word heard as
# another, as "on" in some Picovoice speakers' "computer": 0.4-0.5 s).
SEPARATE_SECONDS = 0.75
OTHER_WORD_SCORE = 0.9
OWN_WORD_FLOOR = 0.05
RECORD_SECONDS = 2.5
COUNTDOWN_SECONDS = 3
# A take whose background lies less than NOISY_ROOM_DB below the voice (:func:`background_db`) gets a note: in
# such a room enrolment is heard less reliably (held-out bench, 15 dB below: an adult 85.7 %, a child-like
# voice 25-62.5 %). On development takes with noise added 20 dB below the voice it reads a median of 24 dB,
# a quarter under 19 dB (15 dB: 16 and 14); quiet takes measure 38 dB or more (5th percentile).
NOISY_ROOM_DB = 25.0
MIN_BACKGROUND_FRAMES = 20  # 0.2 s outside the utterance, else no estimate
WORD_FRAMES_DB = 20.0  # the voice's level: the utterance's frames within this much of its loudest


@dataclass(frozen=True)
class Take:
    name: str
    samples: npt.NDArray[np.int16]
    span: tuple[int, int]


def check_take(name: str, samples: npt.NDArray[np.int16], *, need_utterance: bool = True) -> Take:
    """One recording, validated (EnrollError says what is wrong with it)."""
    if len(samples) < MIN_SECONDS * SAMPLE_RATE:
        raise EnrollError(f"{name}: empty or too short ({len(samples) / SAMPLE_RATE:.2f} s)")
    magnitude = np.abs(samples.astype(np.int32))
    peak = int(magnitude.max())
    if peak < QUIET_PEAK:
        raise EnrollError(f"{name}: too quiet (peak {20 * math.log10(max(peak, 1) / INT16_SCALE):.0f} dBFS); "
                          "speak closer to the microphone")
    if float(np.mean(magnitude >= CLIP_LEVEL)) > CLIPPED_FRACTION:
        raise EnrollError(f"{name}: clipped (the level hit full scale); speak further from the microphone "
                          "or lower the gain")
    energy = frame_energies(samples)
    floor = float(np.percentile(energy, 10)) + 1e-9
    if 10 * math.log10(float(energy.max()) / floor + 1e-12) < MIN_DYNAMIC_DB:
        raise EnrollError(f"{name}: no speech stands out of the background (silence or steady noise)")
    span = utterance_span(samples)
    if span is None:
        raise EnrollError(f"{name}: silence")
    # Another sound nearly as loud as the utterance (within OTHER_SOUND_DB) is another word, not the room.
    near_peak = np.flatnonzero(energy >= float(energy.max()) * 10 ** (-OTHER_SOUND_DB / 10))
    extent = (max(span[1], (int(near_peak[-1]) + 1) * SPAN_FRAME)
              - min(span[0], int(near_peak[0]) * SPAN_FRAME)) / SAMPLE_RATE
    if need_utterance and extent > MAX_UTTERANCE_SECONDS:
        raise EnrollError(f"{name}: the sound lasts {extent:.1f} s; record one word with silence around it")
    return Take(name, samples, span)


def background_db(take: Take) -> float | None:
    """How far the room's background lies below the voice in ``take``, in dB: the mean energy of the
    utterance's 10 ms frames within WORD_FRAMES_DB of its loudest, against the median frame outside the
    utterance; None with less than MIN_BACKGROUND_FRAMES outside it."""
    energy = frame_energies(take.samples)
    first, last = take.span[0] // SPAN_FRAME, -(-take.span[1] // SPAN_FRAME)
    word, background = energy[first:last], np.concatenate([energy[:first], energy[last:]])
    if len(background) < MIN_BACKGROUND_FRAMES or not len(word):
        return None
    voice = float(word[word >= float(word.max()) * 10 ** (-WORD_FRAMES_DB / 10)].mean())
    return 10 * math.log10(voice / (float(np.median(background)) + 1e-9))


def noisy_background_db(take: Take) -> float | None:
    """:func:`background_db` of a take whose background lies less than NOISY_ROOM_DB below the voice, else
    None."""
    level = background_db(take)
    return level if level is not None and level < NOISY_ROOM_DB else None


def noisy_room_note(takes: Sequence[Take]) -> str | None:
    """What to tell a household whose takes hold a noisy background (:data:`NOISY_ROOM_DB`), or None."""
    levels = [db for take in takes if (db := noisy_background_db(take)) is not None]
    if not levels:
        return None
    return (f"note: in {len(levels)} of your {len(takes)} recordings the background is only "
            f"{min(levels):.0f}-{max(levels):.0f} dB below your voice. In a room this noisy the word is "
            "heard less reliably, also after enrolment; recordings made when the room is quieter help.")


def read_take(path: Path, *, need_utterance: bool = True) -> Take:
    try:
        samples = read_audio_file(path)
    except AudioError as err:
        raise EnrollError(f"{path}: cannot read: {err}") from err
    return check_take(str(path), samples, need_utterance=need_utterance)


# --------------------------------------------------------------------------------------------- the store


# --------------------------------------------------------------------------------------------- learning


# --------------------------------------------------------------------------------------------- the CLI


def enroll_main(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    store = Store.of(config)
    if args.reset:
        print("household adaptation removed" if store.reset() else "no household adaptation to remove")
        return 0
    if args.list:
        return _list(store, CaptureStore.of(config))
    model, bank = load_model_and_bank(config)
    if args.not_word is not None:
        if not args.not_word:
            return _usage("--not-word needs at least one file")
        takes = [read_take(p, need_utterance=False) for p in args.not_word]
        return _update(config, store, model, bank, positives=[], negatives=takes, word=None)
    if args.word is None:
        return _usage("give --word WORD with FILE... or --record N (or --not-word, --list, --reset)")
    if args.word not in model.words:
        return _usage(f"{args.word!r} is not a word of the keyword model; it knows: {', '.join(model.words)}")
    word = args.word
    if args.record is not None:
        takes = record_takes(args.record, config, lambda take: check_word(model, take, word, config))
    elif not args.files:
        return _usage("no recordings given: name one or more WAV/FLAC files, or use --record N")
    else:
        takes = [read_take(p) for p in args.files]
        for take in takes:
            check_word(model, take, word, config)
    return _update(config, store, model, bank, positives=takes, negatives=[], word=args.word)


def _usage(message: str) -> int:
    print(f"home-agent enroll: {message}", file=sys.stderr)
    return EXIT_USAGE


def check_word(model: KwsModel, take: Take, word: str, config: Config) -> None:
    """Refuse a take the model hears as another of its words, or that holds another word besides ``word``."""
    _, posteriors, _ = stream_embeddings(model, take.samples, model.params.hop_samples * 5,
                                         tail_samples=model.params.window_samples)
    own = float(posteriors[:, model.labels.index(word)].max())
    for other in model.words:
        score = float(posteriors[:, model.labels.index(other)].max())
        if other != word and score >= OTHER_WORD_SCORE and own < OWN_WORD_FLOOR:
            raise EnrollError(f"{take.name}: this sounds like {other!r} ({score:.2f}), not {word!r} "
                              f"({own:.2f}); record {word!r} alone")
    heard = heard_words(model, take, config)
    own_ends = [end for heard_word, end in heard if heard_word == word]
    apart = sorted({other for other, end in heard if other != word
                    and all(abs(end - own) >= SEPARATE_SECONDS for own in own_ends)})
    if own_ends and apart:
        raise EnrollError(f"{take.name}: this holds {', '.join(map(repr, apart))} as well as {word!r}; "
                          f"record {word!r} alone")


@dataclass(frozen=True)
class Update:
    adaptation: Adaptation
    seconds: float
    still_waking: list[tuple[str, list[str]]]  # not-word recordings that still wake, and what


def update_adaptation(config: Config, store: Store, model: KwsModel, bank: Bank, *, positives: Sequence[Take],
                      negatives: Sequence[Take], word: str | None) -> Update:
    """Re-learn with the new takes added; store them and the new heads only when learning succeeded (an
    EnrollError or StateError changes nothing). ``enroll --word``, ``enroll --not-word`` and a capture
    marked as a false wake (:mod:`agent.capture`) all come through here."""
    store.check_writable()
    started = time.monotonic()
    stored = store.positives()
    if word is not None:
        stored.setdefault(word, [])
        stored[word] = stored[word] + [t.samples for t in positives]
    all_negatives = store.negatives() + [t.samples for t in negatives]
    adaptation = learn(model, bank, stored, all_negatives, budget=config.voice.enroll_false_wake_budget,
                       check=(word,) if word is not None else ())
    still = _still_waking(model, adaptation, negatives, config)
    if word is not None:
        store.add(store.positive_dir / word, [(t.samples, t.span) for t in positives], SAMPLE_RATE)
    store.add(store.negative_dir, [(t.samples, t.span) for t in negatives], SAMPLE_RATE)
    adaptation.save(store.directory)
    return Update(adaptation, time.monotonic() - started, still)


def _update(config: Config, store: Store, model: KwsModel, bank: Bank, *, positives: Sequence[Take],
            negatives: Sequence[Take], word: str | None) -> int:
    update = update_adaptation(config, store, model, bank, positives=positives, negatives=negatives,
                               word=word)
    print(f"learned in {update.seconds:.1f} s:")
    for line in update.adaptation.describe():
        print(f"  {line}")
    if (note := noisy_room_note(positives)) is not None:
        print(f"  {note}")
    for name, words in update.still_waking:
        print(f"  warning: {name} still wakes {', '.join(words)} (its windows are too close to real "
              "recordings of the word to reject without losing them)")
    print("a running daemon uses it after a reload (systemctl reload home-agent, or SIGHUP)")
    return 0


def _still_waking(model: KwsModel, adaptation: Adaptation, takes: Sequence[Take],
                  config: Config) -> list[tuple[str, list[str]]]:
    """Replay each not-word recording through the voice path with the new adaptation."""
    result = []
    for take in takes:
        words = {word for word, _ in heard_words(model, take, config, adaptation)}
        if words:
            result.append((take.name, sorted(words)))
    return result


def heard_words(model: KwsModel, take: Take, config: Config,
                adaptation: Adaptation | None = None) -> list[tuple[str, float]]:
    """The words the voice path (with ``adaptation``, if any) hears in one recording, with their end times."""
    from agent.kws import model_hop_seconds
    from agent.voice import VoicePipeline

    pipeline = VoicePipeline(model, config.voice, hop_seconds=model_hop_seconds(model), adaptation=adaptation)
    detections = pipeline.feed(take.samples).detections + pipeline.finish().detections
    return [(d.word, d.end) for d in detections]


def _list(store: Store, captures: CaptureStore) -> int:
    adaptation = Adaptation.load(store.directory)
    if adaptation is None:
        print(f"no household adaptation in {store.directory}")
    else:
        print(f"household adaptation in {store.directory} (model sha256 {adaptation.model_sha256[:12]}...):")
        for line in adaptation.describe():
            print(f"  {line}")
    listed = captures.list()
    if not listed:
        print(f"no captured wakes in {captures.directory} ([voice] capture = true keeps them; they never "
              "leave this machine)")
        return 0
    print(f"captured wakes in {captures.directory} (they never leave this machine):")
    for capture in listed:
        state = "marked as a false wake (learned)" if capture.marked else "not marked"
        print(f"  {capture.path.name}  {capture.seconds:.1f} s  {state}")
    return 0


# --------------------------------------------------------------------------------------------- microphone


def level_meter(samples: npt.NDArray[np.int16], width: int = 30) -> str:
    peak = int(np.abs(samples.astype(np.int32)).max()) if len(samples) else 0
    db = 20 * math.log10(max(peak, 1) / INT16_SCALE)
    filled = max(0, min(width, round((db + 60) / 60 * width)))
    return f"[{'#' * filled}{'.' * (width - filled)}] {db:5.0f} dBFS"


def record_takes(count: int, config: Config,
                 accept: Callable[[Take], None] = lambda take: None) -> list[Take]:
    """``count`` accepted takes from the microphone; a take that :func:`check_take` or ``accept`` refuses (an
    EnrollError) is explained and asked for again, so one bad take does not cost the others."""
    from agent.audio import MicSource

    if count < 1:
        raise EnrollError("--record needs a positive number of takes")
    source = MicSource(config.audio.device, buffer_seconds=RECORD_SECONDS + 1)
    takes: list[Take] = []
    with source:
        while len(takes) < count:
            for n in range(COUNTDOWN_SECONDS, 0, -1):
                print(f"take {len(takes) + 1} of {count}: speak in {n}...", end="\r", file=sys.stderr)
                time.sleep(1.0)
            print("now!" + " " * 40, file=sys.stderr)
            parts: list[npt.NDArray[np.int16]] = []
            deadline = time.monotonic() + RECORD_SECONDS
            while time.monotonic() < deadline:
                chunk = source.read(0.2)
                if chunk is not None:
                    parts.append(chunk.samples)
                    print(level_meter(chunk.samples), end="\r", file=sys.stderr)
            samples = np.concatenate(parts) if parts else np.zeros(0, np.int16)
            try:
                take = check_take(f"take {len(takes) + 1}", samples)
                accept(take)
                takes.append(take)
                level = noisy_background_db(take)
                noisy = f" (the background is only {level:.0f} dB below your voice: a noisy room)" \
                    if level is not None else ""
                print(f"\nok{noisy}", file=sys.stderr)
            except EnrollError as err:
                print(f"\n{err}; again", file=sys.stderr)
    return takes
