"""The development split for household enrolment (``agent/adaptation.py``): where its parameters are chosen.

    python -m training.enrol_dev [--data DIR] [--cache FILE]

Everything here is training-side, and none of it is in the negative bank or in what ``bench/enroll_bench.py``
reports (see :func:`training.enrol_bank.bank_part`):

- enrolment targets: training-split Picovoice ``computer`` speaker clusters with at least MIN_CLIPS recordings
  (copies of one recording count once, :func:`training.data.recording_copies`; DRAWS choices of five
  recordings enrolled per cluster, as the bench draws them; the cluster's other recordings tested), and the
  same clusters with their voice changed (VOICES: pitch and formants 1.3x higher,
  a child-like voice the model misses; the recordings played 1.3x faster, the other voice it misses; 1.15x
  higher or lower, voices it misses sometimes, as it does a new speaker: the training clusters themselves are
  all heard by the model that was trained on them). The target cluster's own recordings are taken out of
  the bank's word positives for its enrolments (the bank holds 80 training ``computer`` clips; a target whose
  other recordings the head was trained on is heard too easily);
- the child-like voice in a noisy room (NOISY_VOICES: the ``tune`` quarter of ``noise/`` at 20, 15 and 10 dB
  in every recording, enrolled, tested and same-voice confusable alike). Each draw passes over the takes
  ``home-agent enroll`` refuses (:func:`bench.enroll_bench.usable_take`) for the cluster's next
  recordings, as a household records another take, and enrols what is left;
- confusable speech: the development half of the training-split clips of the five other wake words (the bank
  holds the other half; the bench holds out the validation split), and the ``tune`` quarter of
  ``real_long/``: wakes per hour before and after enrolment;
- same-voice confusables: those development clips of the other wake words with the target's voice change
  (VOICES), replayed after each enrolment of a changed voice. On held-out data, enrolling a voice the model
  misses woke on another speaker's "smart mirror" whose windows lay near that voice's own (closer than any
  bank speech, so the bank-side checks could not see it); the plain confusables, in the voices the bank
  also holds, lie far from a changed voice and did not warn either. A wake added here is that failure's
  development counterpart.

- the speaker check (``--speaker``, :func:`speaker_check`): the Precise speaker of ``hey_computer`` enrolled
  in the bench's draws, then his own recordings of other wake words (``athena``, ``hey_chatterbox``: his
  voice and microphone, in neither the bank nor the bench) and the development confusables of other speakers
  replayed: wakes added, near misses, and how close the closest clip comes to the gate (in gate radii). His
  other ``hey_computer`` recordings are reported too, as a diagnosis only: the bench holds them as a target.

Each clip's per-hop posteriors and embeddings are recorded once through the streaming path (the model is the
costly part), then replayed through the adaptation and the recognizer (the voice path's thresholds and
smoothing) with each candidate setting, so many settings can be compared in minutes. The replay keeps the wake
window closed (it counts wakes). Per draw: detection of the other recordings and wakes per confusable source;
the summary counts the draws below TARGET_PERCENT, the draws that add a wake, and the near misses: confusable
clips on which the head raised the word on any hop (a wake is rare on 0.8 h; a raised hop says how close).
The wakes a clip gains are also put down to the path that raised them (``wakes_by_templates``, ``_near``,
``_gates``, and the same for ``same_voice_wakes``): a template reaching the clip within its limit, a near
template match, else the head's distance or sequence gate.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from agent.adaptation import Adaptation, EnrollError, WordHead, learn, nearest_distance
from agent.audio import read_audio_file
from agent.bank import Bank, bank_path
from agent.config import VoiceSection
from agent.kws import KwsModel, model_hop_seconds
from agent.messages import Scores
from agent.recognizer import Recognizer, RecognizerSettings
from agent.sequence import RecentHops
from agent.templates import hop_mel, stream_cepstra
from agent.voice import VoicePipeline, tail_padding
from bench.enroll_bench import CHILD, FASTER, NOISE_SNR_DB, usable_take, with_noise
from bench.enroll_bench import changed_voice as bench_changed_voice
from training.common import stable_fraction
from training.data import inventory, recording_copies
from training.enrol_bank import CONFUSABLE_WAKE_WORDS, bank_part

log = logging.getLogger(__name__)

WAKE = "computer"
ENROL = 5
MIN_CLIPS = 8  # 5 enrolled and at least 3 tested: 7 training clusters (11 before copies counted once)
DRAWS = 3  # the first five recordings, then hash-chosen sets of five (as bench/enroll_bench.py draws them)
TARGET_PERCENT = 90.0  # a draw hears at least this much of the speaker's other recordings (the goal)
# The changed voices: key prefix -> (pitch and formant factor, whether the tempo is kept). "faster:" is the
# recording played FASTER times faster (higher and quicker), as the bench's faster voice: the other kind of
# voice the shipped model misses that the held-out targets hold.
VOICES = {"child:": (CHILD, True), "higher:": (1.15, True), "deeper:": (1 / 1.15, True),
          "faster:": (FASTER, False)}
# The changed voices in a noisy room: key prefix -> (voice prefix, SNR in dB). The ``tune`` quarter of
# ``noise/`` (neither the bank's half nor the bench's held-out quarter) added to every recording, enrolled and
# tested alike, as the bench's noisy target adds its held-out noise.
NOISY_VOICES = {"noisy:": ("child:", NOISE_SNR_DB), "noisy15:": ("child:", 15.0),
                "noisy10:": ("child:", 10.0)}


class _Recorder:
    """Wraps the model and keeps every posterior and embedding the pipeline asks for."""

    def __init__(self, model: KwsModel) -> None:
        self._model = model
        self.posteriors: list[npt.NDArray[np.float32]] = []
        self.embeddings: list[npt.NDArray[np.float32]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def predict(self, features: Any) -> npt.NDArray[np.float32]:
        result = self._model.predict(features)
        self.posteriors.append(result.copy())
        self.embeddings.append(self._model.embedding().copy())
        return result

    def predict_batch(self, features: Any) -> npt.NDArray[np.float32]:
        """The pipeline's idle hops come in batches (one invocation for several windows, whose embeddings the
        model does not keep): each window through :meth:`predict` instead, the same posteriors."""
        return np.stack([self.predict(window) for window in features])


def record(model: KwsModel, samples: npt.NDArray[np.int16]) -> tuple[npt.NDArray[np.float32], ...]:
    """(posteriors, embeddings, mel frames) of every hop of the voice path over a clip and its tail."""
    recorder = _Recorder(model)
    pipeline = VoicePipeline(cast(KwsModel, recorder), VoiceSection(), hop_seconds=model_hop_seconds(model))
    pipeline.feed(samples)
    pipeline.feed(tail_padding())
    mel = hop_mel(model.params, np.concatenate([samples, tail_padding()]), pipeline.hop_samples)
    return np.stack(recorder.posteriors), np.stack(recorder.embeddings), mel.astype(np.float32)


def wakes(settings: RecognizerSettings, recorded: tuple[npt.NDArray[np.float32], ...],
          adaptation: Adaptation | None) -> int:
    """Wakes of the voice path on one recorded clip: the model's recorded posteriors (through the adaptation,
    if any) into the recognizer, one per 0.1 s hop, the wake window never open."""
    posteriors, embeddings, mel = recorded
    recognizer = Recognizer(settings)
    recent = adaptation.recent_hops() if adaptation is not None else RecentHops(1)  # the clip: its own stream
    count = 0
    for hop, (posterior, embedding) in enumerate(zip(posteriors, embeddings, strict=True)):
        probabilities = posterior if adaptation is None else \
            adaptation.apply(settings.labels, posterior, embedding, recent, mel[hop])
        detection = recognizer.process(Scores(settings.labels, probabilities, round(0.1 * (hop + 1), 6)))
        count += detection is not None and detection.word == WAKE
    return count


def template_raised(adaptation: Adaptation | None,
                    cepstra: dict[str, npt.NDArray[np.float32]]) -> tuple[set[str], set[str]]:
    """The clips (keys of ``cepstra``) in which a template path of the adaptation raises its word, and those
    in which it would with the head's agreement too (a near match: replaying the clip decides)."""
    raised: set[str] = set()
    near: set[str] = set()
    keys = list(cepstra)
    for entry in adaptation.heads if adaptation is not None else ():
        if entry.templates is not None and entry.templates.active:
            reach = entry.templates.reach([cepstra[k] for k in keys])
            raised.update(k for k, d in zip(keys, reach, strict=True) if d <= 1.0)
            near.update(k for k, d in zip(keys, reach, strict=True) if d <= entry.templates.near_limit)
    return raised, near


def touched(adaptation: Adaptation | None, embeddings: npt.NDArray[np.float32],
            templated: bool = False) -> bool:
    """Whether the adaptation changes any hop of a clip (else it wakes exactly as the shipped model);
    ``templated``: a template path raises its word in it (:func:`template_raised`)."""
    if adaptation is None:
        return False
    if templated:
        return True
    for entry in adaptation.heads:
        scores = entry.head.score(embeddings)
        if entry.boosts(embeddings, scores).any() or entry.vetoes(embeddings, scores).any():
            return True
    return False


def changed_voice(samples: npt.NDArray[np.int16], factor: float,
                  keep_tempo: bool) -> npt.NDArray[np.int16]:
    """The bench's voice change (:func:`bench.enroll_bench.changed_voice`) of int16 samples."""
    changed = bench_changed_voice(samples.astype(np.float64), factor, keep_tempo=keep_tempo)
    return np.asarray(changed.clip(-32768, 32767), dtype=np.int16)


def dev_noise(paths: list[str]) -> npt.NDArray[np.float64]:
    """The noise recordings, end to end."""
    return np.concatenate([read_audio_file(p).astype(np.float64) for p in paths])


def dev_sets(data_dir: Path) -> tuple[dict[str, list[str]], dict[str, list[str]], list[str]]:
    """The confusable speech, the target clusters and the noise (the ``tune`` quarter of ``noise/``)."""
    clips = inventory(data_dir, synth_dir=None)
    noise = sorted(c.path for c in clips if c.source == "noise" and c.split == "tune")
    confusable: dict[str, list[str]] = defaultdict(list)
    clusters: dict[str, list[str]] = defaultdict(list)
    for clip in clips:
        word = Path(clip.path).parent.name
        if clip.source == "real" and word in CONFUSABLE_WAKE_WORDS and clip.split == "train" \
                and not bank_part(clip.path):
            confusable[word].append(clip.path)
        elif clip.source == "long" and clip.split == "tune":
            confusable["real_long_tune"].append(clip.path)
        elif clip.source == "real" and clip.label == WAKE and clip.split == "train" \
                and clip.group.startswith("computer-"):
            clusters[clip.group].append(clip.path)
    # Each recording once (several training clusters are copies of one or two recordings, which a draw that
    # enrols one copy would "hear" in the rest).
    copies = recording_copies([Path(p) for paths in clusters.values() for p in paths])
    distinct = {g: sorted(p for p in paths if copies[Path(p).name] == Path(p).name)
                for g, paths in clusters.items()}
    chosen = sorted((g for g, paths in distinct.items() if len(paths) >= MIN_CLIPS),
                    key=lambda g: stable_fraction("dev-" + g))
    return dict(confusable), {g: distinct[g] for g in chosen}, noise


def with_voices(path: str, samples: npt.NDArray[np.int16],
                noise: npt.NDArray[np.float64]) -> dict[str, npt.NDArray[np.int16]]:
    """A recording by its path, and its changed voices (VOICES, then NOISY_VOICES: each its own stretch of
    ``noise``, chosen by the path) by their keys (the voice's prefix + path)."""
    voiced = {path: samples, **{f"{prefix}{path}": changed_voice(samples, factor, keep_tempo)
                                for prefix, (factor, keep_tempo) in VOICES.items()}}
    for prefix, (voice, snr_db) in NOISY_VOICES.items():
        clean = voiced[voice + path].astype(np.float64)
        start = int(stable_fraction(prefix + path) * (len(noise) - len(clean)))
        noisy = with_noise(clean, noise[start : start + len(clean)], snr_db)
        voiced[prefix + path] = np.asarray(noisy.clip(-32768, 32767), dtype=np.int16)
    return voiced


def _cached(cache: Path, stamp: dict[str, Any], build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``build()``'s recordings with ``stamp``, kept in ``cache`` (recording takes minutes) and read back
    while every item of ``stamp`` is the same."""
    if cache.exists():
        with cache.open("rb") as handle:
            loaded: dict[str, Any] = pickle.load(handle)
        if all(loaded.get(key) == value for key, value in stamp.items()):
            return loaded
    result = {**stamp, **build()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    with cache.open("wb") as handle:
        pickle.dump(result, handle)
    return result


def load_recorded(model: KwsModel, data_dir: Path, cache: Path) -> dict[str, Any]:
    """The development sets and every clip's recorded hops (kept in ``cache``)."""
    confusable, targets, noise_paths = dev_sets(data_dir)

    def build() -> dict[str, Any]:
        noise = dev_noise(noise_paths)
        audio: dict[str, npt.NDArray[np.int16]] = {}
        for paths in targets.values():
            for path in paths:
                audio.update(with_voices(path, read_audio_file(path), noise))
        recorded = {key: record(model, samples) for key, samples in audio.items()}
        same_voice = {word: paths for word, paths in confusable.items() if word in CONFUSABLE_WAKE_WORDS}
        in_same_voice = {path for paths in same_voice.values() for path in paths}
        for paths in confusable.values():
            for path in paths:
                samples = read_audio_file(path)
                voiced = with_voices(path, samples, noise) if path in in_same_voice else {path: samples}
                recorded.update({key: record(model, changed) for key, changed in voiced.items()})
        return {"confusable": confusable, "same_voice": same_voice, "targets": targets, "audio": audio,
                "recorded": recorded}

    return _cached(cache, {"model_sha256": model.sha256, "voices": VOICES, "noisy_voices": NOISY_VOICES,
                           "min_clips": MIN_CLIPS, "sets": [confusable, targets, noise_paths],
                           "same_voice_check": True, "mel": True}, build)


def enrolment_draws(paths: list[str], draws: int = DRAWS,
                    usable: Callable[[str], bool] = lambda path: True) -> list[list[str]]:
    """The first ENROL recordings, then ``draws - 1`` hash-chosen sets of ENROL, passing over recordings that
    are not ``usable`` (as the bench chooses: :func:`bench.enroll_bench.enrolment_draws`)."""
    from bench.enroll_bench import enrolment_draws as bench_draws

    result: list[list[str]] = []
    for chosen in bench_draws(paths, draws - 1, usable):
        if chosen not in result:
            result.append(chosen)
    return result


def bank_word_paths(data_dir: Path) -> list[str]:
    """The training ``computer`` clips in the bank, in its item order (training.enrol_bank.build_bank)."""
    from training.enrol_bank import CLIPS_PER_WORD, pick

    paths = [c.path for c in inventory(data_dir, synth_dir=None) if c.split == "train" and c.source == "real"
             and c.label == WAKE]
    return pick(paths, CLIPS_PER_WORD)


def without_clips(bank: Bank, word_paths: list[str], removed: set[str]) -> Bank:
    """The bank less the word rows of ``removed`` clips (item i of the word is ``word_paths[i]``)."""
    word_items = np.unique(bank.items[bank.labels == WAKE])
    if len(word_items) != len(word_paths) or word_items.min() != 0:
        raise ValueError(f"the bank holds {len(word_items)} {WAKE!r} clips, the data {len(word_paths)}: "
                         "rebuild it (python -m training.enrol_bank) or point --data at its data")
    drop = {i for i, path in enumerate(word_paths) if path in removed}
    keep = ~((bank.labels == WAKE) & np.isin(bank.items, list(drop)))
    return bank.rows(keep)


def raised(adaptation: Adaptation | None, embeddings: npt.NDArray[np.float32]) -> bool:
    """Whether the adaptation's boost raises the word on any hop of a clip (a near miss on confusables)."""
    if adaptation is None:
        return False
    return any(entry.boosts(embeddings, entry.head.score(embeddings)).any() for entry in adaptation.heads)


def evaluate(model: KwsModel, bank: Bank, dev: dict[str, Any], *, draws: int = DRAWS,
             voices: tuple[str, ...] = ("", "child:"), word_paths: list[str] | None = None) -> dict[str, Any]:
    """Per target (cluster, child-like cluster) and draw: detection of its other recordings and wakes per
    confusable source, shipped and adapted, and on the same-voice confusables (the development clips of the
    other wake words with the target's voice change); ``summary``: per voice, the totals, the draws below
    TARGET_PERCENT, the draws that add a wake and the near misses, on each kind of confusable."""
    recorded, audio, confusable = dev["recorded"], dev["audio"], dev["confusable"]
    settings = VoicePipeline(model, VoiceSection(), hop_seconds=model_hop_seconds(model)).settings
    shipped = {key: wakes(settings, rec, None) for key, rec in recorded.items()}
    cepstra: dict[str, npt.NDArray[np.float32]] = {}  # per clip, once, for the voices evaluated only

    def cepstra_of(keys: list[str]) -> dict[str, npt.NDArray[np.float32]]:
        for key in keys:
            if key not in cepstra:
                cepstra[key] = stream_cepstra(recorded[key][2])
        return {key: cepstra[key] for key in keys}

    results: dict[str, Any] = {}
    summary: dict[str, dict[str, Any]] = {}
    for voice in voices:
        total = {"draws": 0, "detected_shipped": 0, "detected_adapted": 0, "tested": 0, "wakes_added": 0,
                 "draws_below_target": 0, "draws_adding_wakes": 0, "near_miss_clips": 0, "refused": 0,
                 "same_voice_wakes_added": 0, "draws_adding_same_voice_wakes": 0,
                 "same_voice_near_miss_clips": 0,
                 **{f"{kind}_by_{path}": 0 for kind in ("wakes", "same_voice_wakes")
                    for path in ("templates", "near", "gates")},
                 "worst_percent": 100.0, "seconds": 0.0}
        for group, paths in dev["targets"].items():
            target_bank = bank if word_paths is None else without_clips(bank, word_paths, set(paths))
            usable = {p for p in paths if usable_take(voice + p, audio[voice + p])}
            for number, enrolled_paths in enumerate(enrolment_draws(paths, draws, usable.__contains__)):
                enrolled = [voice + p for p in enrolled_paths]
                tested = [voice + p for p in paths if p not in enrolled_paths]
                started = time.process_time()
                adaptation: Adaptation | None
                try:
                    adaptation = learn(model, target_bank, {WAKE: [audio[k] for k in enrolled]}, [],
                                       budget=0.0, check=(WAKE,))
                except EnrollError as err:
                    log.info("%s%s draw %d: refused: %s", voice, group, number, str(err)[:160])
                    total["refused"] += 1
                    adaptation = None
                total["seconds"] = max(total["seconds"], time.process_time() - started)

                plain_clips = [p for ps in confusable.values() for p in ps]
                voice_clips = [voice + p for ps in dev["same_voice"].values() for p in ps]
                templated, candidates = template_raised(adaptation,
                                                        cepstra_of([*tested, *plain_clips, *voice_clips]))

                def adapted(key: str, adaptation: Adaptation | None = adaptation,
                            candidates: set[str] = candidates) -> int:
                    rec = recorded[key]
                    return wakes(settings, rec, adaptation) \
                        if touched(adaptation, rec[1], key in candidates) else shipped[key]

                before = sum(shipped[k] > 0 for k in tested)
                after = sum(adapted(k) > 0 for k in tested)
                replayed = {k: adapted(k) for k in [*plain_clips, *voice_clips]}
                added = {s: sum(replayed[p] for p in ps) - sum(shipped[p] for p in ps)
                         for s, ps in confusable.items()}
                near = sum(raised(adaptation, recorded[p][1]) or p in templated for p in plain_clips)
                same_voice = {s: sum(replayed[voice + p] for p in ps) - sum(shipped[voice + p] for p in ps)
                              for s, ps in dev["same_voice"].items()}
                # The path that raised the wakes a clip gained: a template within its limit, a near template
                # match (the head confirms it), else the head's gates (distance or sequence).
                for kind, clips in (("wakes", plain_clips), ("same_voice_wakes", voice_clips)):
                    for key in clips:
                        path = "templates" if key in templated else "near" if key in candidates else "gates"
                        total[f"{kind}_by_{path}"] += max(0, replayed[key] - shipped[key])
                same_near = sum(raised(adaptation, recorded[k][1]) or k in templated for k in voice_clips)
                percent = 100.0 * after / len(tested)
                total["draws"] += 1
                total["detected_shipped"] += before
                total["detected_adapted"] += after
                total["tested"] += len(tested)
                total["wakes_added"] += sum(added.values())
                total["draws_below_target"] += percent < TARGET_PERCENT
                total["draws_adding_wakes"] += any(v > 0 for v in added.values())
                total["near_miss_clips"] += near
                total["same_voice_wakes_added"] += sum(same_voice.values())
                total["draws_adding_same_voice_wakes"] += any(v > 0 for v in same_voice.values())
                total["same_voice_near_miss_clips"] += same_near
                total["worst_percent"] = min(total["worst_percent"], round(percent, 1))
                figures = {"tested": len(tested), "shipped": before, "adapted": after,
                           "wakes_added": {s: v for s, v in added.items() if v}, "near_misses": near,
                           "same_voice_wakes_added": {s: v for s, v in same_voice.items() if v},
                           "same_voice_near_misses": same_near}
                results[f"{voice}{group}#{number}"] = figures
                log.debug("%s%s draw %d: %s", voice, group, number, json.dumps(figures))
        summary[voice.rstrip(":") or "real"] = total
    results["summary"] = summary
    return results


# The Precise speaker of ``hey_computer`` also recorded other wake words: his own voice and microphone saying
# something else, in neither the bank nor what bench/enroll_bench.py reports (which holds his hey_computer
# recordings as a target, the validation split of the Picovoice wake words as confusables).
PRECISE_SPEAKER = "precise_eltocino"
PRECISE_TARGET_FOLDER = "hey_computer"
PRECISE_OTHER_WORDS = ("athena", "hey_chatterbox")
EDGE_RATIO = 1.1  # a confusable hop scoring the boost within this many gate radii: at the gate's edge


def load_precise(model: KwsModel, data_dir: Path, cache: Path) -> dict[str, Any]:
    """The Precise speaker's recordings (PRECISE_TARGET_FOLDER and PRECISE_OTHER_WORDS), each recorded through
    the voice path once (kept in ``cache``)."""
    def build() -> dict[str, Any]:
        real = data_dir / "real"
        targets = sorted(str(p) for p in (real / PRECISE_TARGET_FOLDER).glob(f"{PRECISE_SPEAKER}_*.flac"))
        others = {word: sorted(str(p) for p in (real / word).glob(f"{PRECISE_SPEAKER}_*.flac"))
                  for word in PRECISE_OTHER_WORDS}
        audio = {path: read_audio_file(path) for path in targets}
        recorded = {path: record(model, samples) for path, samples in audio.items()}
        recorded.update({path: record(model, read_audio_file(path)) for paths in others.values()
                         for path in paths})
        return {"targets": targets, "others": others, "audio": audio, "recorded": recorded}

    return _cached(cache, {"model_sha256": model.sha256, "words": PRECISE_OTHER_WORDS, "mel": True}, build)


def gate_ratio(entry: WordHead, embeddings: npt.NDArray[np.float32]) -> float:
    """How close a clip comes to being raised: over its hops the head scores at or above its boost, the
    smallest distance to the household's windows, in gate radii (inf: no such hop; <= 1: raised)."""
    scores = entry.head.score(embeddings)
    hot = scores >= cast(float, entry.boost)
    if not hot.any():
        return float("inf")
    distance = nearest_distance(entry.head.standardise(embeddings[hot]), entry.prototypes)
    return float(distance.min() / entry.radius)


def speaker_check(model: KwsModel, bank: Bank, dev: dict[str, Any], precise: dict[str, Any],
                  draws: int = DRAWS) -> dict[str, Any]:
    """Per draw of five of the Precise speaker's recordings (as the bench draws them): his other recordings
    heard (a diagnosis: the bench reports them), and the wakes added, near misses and the closest clip (in
    gate radii, :func:`gate_ratio`) on his own other wake words and on the development confusables of other
    speakers (``dev["confusable"]``)."""
    settings = VoicePipeline(model, VoiceSection(), hop_seconds=model_hop_seconds(model)).settings
    index = model.labels.index(WAKE)
    sets = {"own voice": {w: precise["others"][w] for w in PRECISE_OTHER_WORDS},
            "other speakers": dev["confusable"]}
    recorded = {**dev["recorded"], **precise["recorded"]}
    replayed = [*precise["targets"], *(p for group in sets.values() for ps in group.values() for p in ps)]
    shipped = {p: wakes(settings, recorded[p], None) for p in replayed}
    cepstra = {name: {p: stream_cepstra(recorded[p][2]) for ps in group.values() for p in ps}
               for name, group in sets.items()}
    results: dict[str, Any] = {}
    for number, enrolled in enumerate(enrolment_draws(precise["targets"], draws)):
        adaptation = learn(model, bank, {WAKE: [precise["audio"][p] for p in enrolled]}, [], budget=0.0,
                           check=(WAKE,))
        entry = adaptation.heads[0]
        figures: dict[str, Any] = {"boost": round(cast(float, entry.boost), 3),
                                   "radius": round(entry.radius, 2), "tested": {}}
        for path in precise["targets"]:
            if path in enrolled:
                continue
            posteriors, embeddings, _ = recorded[path]
            figures["tested"][Path(path).stem] = {
                "shipped": shipped[path] > 0,
                "adapted": wakes(settings, recorded[path], adaptation) > 0,
                "base_max": round(float(posteriors[:, index].max()), 3),
                "head_max": round(float(entry.head.score(embeddings).max()), 3),
                "gate_ratio": round(gate_ratio(entry, embeddings), 2)}
        for name, group in sets.items():
            templated, candidates = template_raised(adaptation, cepstra[name])
            added = {s: sum(wakes(settings, recorded[p], adaptation) - shipped[p] for p in ps
                            if touched(adaptation, recorded[p][1], p in candidates))
                     for s, ps in group.items()}
            ratios = {p: gate_ratio(entry, recorded[p][1]) for ps in group.values() for p in ps}
            closest = min(ratios, key=lambda p: ratios[p])
            figures[name] = {"wakes_added": sum(added.values()),
                             "by_source": {s: v for s, v in added.items() if v},
                             "near_miss_clips": sum(raised(adaptation, recorded[p][1]) or p in templated
                                                    for ps in group.values() for p in ps),
                             "edge_clips": sum(r <= EDGE_RATIO for r in ratios.values()),
                             "closest": [Path(closest).parent.name + "/" + Path(closest).stem,
                                         round(ratios[closest], 3)]}
        results[f"draw {number + 1}"] = figures
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/kws.tflite"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data/speech"))
    parser.add_argument("--cache", type=Path, default=Path(".cache/enrol_dev.pkl"))
    parser.add_argument("--bank", type=Path, default=None,
                        help="negative bank (default: the model's, models/kws.bank.npz)")
    parser.add_argument("--draws", type=int, default=DRAWS, help="choices of five recordings per target")
    every_voice = ["", *[v.rstrip(":") for v in [*VOICES, *NOISY_VOICES]]]
    parser.add_argument("--voices", nargs="+", default=every_voice, choices=every_voice,
                        help='"" the real clusters, the others those clusters with their voice changed')
    parser.add_argument("--keep-targets-in-bank", action="store_true",
                        help="leave the target's own recordings in the bank (the old, easier setting)")
    parser.add_argument("--verbose", action="store_true", help="every draw's figures")
    parser.add_argument("--speaker", action="store_true",
                        help="only the Precise speaker's check (speaker_check): his own other wake words and "
                             "the development confusables after each draw of his enrolment")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    model = KwsModel.load(args.model, embedding=True)
    bank = Bank.load(args.bank or bank_path(model.path), model)
    dev = load_recorded(model, args.data, args.cache)
    if args.speaker:
        precise = load_precise(model, args.data, args.cache.with_name(args.cache.stem + "_precise.pkl"))
        checked = speaker_check(model, bank, dev, precise, args.draws)
        for draw, figures in checked.items():
            log.info("%s: %s", draw, json.dumps(figures))
        return
    hours = {s: round(sum(len(dev["recorded"][p][0]) for p in ps) * 0.1 / 3600, 3)
             for s, ps in dev["confusable"].items()}
    log.info("confusable hours: %s", hours)
    results = evaluate(model, bank, dev, draws=args.draws,
                       voices=tuple(v if v == "" else f"{v}:" for v in args.voices),
                       word_paths=None if args.keep_targets_in_bank else bank_word_paths(args.data))
    if args.verbose:
        for key, figures in results.items():
            if key != "summary":
                log.info("%s: %s", key, json.dumps(figures))
    for voice, total in results["summary"].items():
        log.info("%s: %s", voice, json.dumps({k: round(v, 2) for k, v in total.items()}))


if __name__ == "__main__":
    main()
