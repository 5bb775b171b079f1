"""The "new voices" validation (issue 13): how a model hears people, voices and words it was never trained on,
source by source, through the runtime's own streaming path.

    python -m training.newvoices [--model models/kws.tflite] [--data DIR] [--json OUT]
        [--card models/kws.md --ablation models/kws_newvoices.json --title "what this model is"]

Nothing here is tuned on: no model, threshold or smoothing choice may look at these figures (the training
pipeline chooses its thresholds on the training and tuning splits of ``training.data``). Every held-out set is
the ``validation`` / ``synth_validation`` split of :func:`training.data.inventory`:

* wake word ("computer"): the Picovoice clips of held-out speaker clusters (approximate speakers: these are
  not strictly new voices), every Precise "hey computer" clip (a speaker never trained on), held-out
  synthetic voices (another engine's, festival, never trained on at all; and a hash-chosen share of the other
  engines' voices);
* the ten command words: Speech Commands speakers held out by hash, held-out synthetic voices;
* false-wake material: the held-out Picovoice clips of the OTHER wake words (alexa, jarvis, smart mirror,
  snowboy, view glass: their speakers' "computer" may be in training, as in the hidden test), every Precise
  speaker's other words, Speech Commands held-out speakers' other words and command words, FSDD digits of
  held-out speakers, held-out synthetic confusables, and the held-out quarter of ``real_long/`` (coffee
  orders, not-wake-word phrases) and ``noise/``. Isolated clips are short: false wakes are given per clip and
  per hour of their audio (the per-hour figure of back-to-back short clips is a harsh one);
* whole commands: a held-out "computer", a 0.15-0.35 s pause, a held-out command word, with the ten words
  configured as one-word commands: right, wrong or no intent (and whether the wake word was missed).

Every clip goes through :func:`agent.transcribe.transcribe_file` (exactly what ``home-agent transcribe``
runs: streaming features, the model every hop, smoothing, thresholds, refractory time, tail padding) and
whole commands through :class:`agent.voice.VoicePipeline` with commands (pause silencing, listening
smoothing), never through a re-implementation.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import soundfile as sf

from agent.config import VoiceSection
from agent.features import COMMAND_WORDS, UNKNOWN_LABEL, WAKE_WORD
from agent.kws import KwsModel, model_hop_seconds
from agent.progress import progress
from agent.recognizer import Command, PipelineOutput
from agent.transcribe import transcribe_file
from agent.voice import VoicePipeline, load_pipeline, tail_padding
from training.common import (
    SAMPLE_RATE,
    SYNTH_DIR,
    speech_data_dir,
    write_json,
)
from training.data import HELD_OUT_SYNTH_ENGINES, Clip, hash_ordered, inventory, speech_span

log = logging.getLogger(__name__)

TARGETS = {
    "wake_detection_min": 0.90,  # on every real source
    "command_words_mean_min": 0.93,
    "false_wakes_per_hour_max": 0.3,
    "whole_command_right_min": 0.85,
    "whole_command_wrong_max": 0.02,
}
SYNTH_NEGATIVES_PER_WORD = 20  # held-out synthetic confusables per word (hash-chosen): enough, and quick
END_FLOOR_DB = 25.0  # a clip's speech: its 10 ms frames within this many dB of the loudest
MARGIN = 800  # 50 ms of a clip's own background kept either side of its speech in whole commands
PAUSE_SECONDS = (0.15, 0.35)  # "computer ... up" as people say it
# Real words outside the vocabulary (held-out negatives), also said after the wake word: any intent that
# follows is a command nobody gave ("computer, seven" turning a light off)
OTHER_WORD_SOURCES = ("speech_commands_other_words", "fsdd_digits", "precise_other_words")


def _family(clip: Clip) -> str:
    """Where a clip comes from: the corpus (real) or the engine (synthetic)."""
    name = Path(clip.path).name
    if clip.source == "synth":
        engine = name.split("_")[0]
        return "synth_held_out_engine" if engine in HELD_OUT_SYNTH_ENGINES else "synth_held_out_voices"
    if clip.source in ("long", "noise"):
        return "noise" if clip.source == "noise" else f"real_long_{Path(clip.path).parent.name}"
    match = re.match(r"^(sc|fsdd|precise|pvwwb)_", name)
    return {"sc": "speech_commands", "fsdd": "fsdd_digits", "precise": "precise", "pvwwb": "picovoice"}[
        match.group(1) if match else "sc"
    ]


def held_out_sets(clips: list[Clip]) -> dict[str, dict[str, list[Clip]]]:
    """{"wake" | "commands" | "negatives" | "other_words": {source: clips}} of everything held out
    ("other_words": the real negatives of words outside the vocabulary, also said after the wake word)."""
    sets: dict[str, dict[str, list[Clip]]] = {"wake": {}, "commands": {}, "negatives": {}}
    synth_negatives: dict[str, list[Clip]] = defaultdict(list)
    for clip in clips:
        if clip.split not in ("validation", "synth_validation"):
            continue
        family = _family(clip)
        word = Path(clip.path).parent.name
        if clip.label == WAKE_WORD:
            source = "precise_hey_computer" if family == "precise" else family
            sets["wake"].setdefault(source, []).append(clip)
        elif clip.label in COMMAND_WORDS:
            sets["commands"].setdefault(family, []).append(clip)
            if family == "speech_commands":  # commands heard without the wake word: confusable speech
                sets["negatives"].setdefault("speech_commands_command_words", []).append(clip)
        elif clip.source == "synth" and clip.label == UNKNOWN_LABEL:
            synth_negatives[f"{family}_confusables/{word}"].append(clip)
        elif clip.source in ("long", "noise"):
            sets["negatives"].setdefault(family, []).append(clip)
        elif clip.label == UNKNOWN_LABEL:
            source = {"picovoice": "picovoice_other_wake_words", "precise": "precise_other_words",
                      "speech_commands": "speech_commands_other_words"}.get(family, family)
            sets["negatives"].setdefault(source, []).append(clip)
    for key, group in sorted(synth_negatives.items()):
        source = key.split("/")[0]
        chosen = hash_ordered(group)[:SYNTH_NEGATIVES_PER_WORD]
        sets["negatives"].setdefault(source, []).extend(chosen)
    sets["other_words"] = {source: sets["negatives"][source] for source in OTHER_WORD_SOURCES
                           if source in sets["negatives"]}
    return sets


DEVELOPMENT_CLIPS = 800  # per development source: enough to see a few points move, quick to run


def _outside_vocabulary(clip: Clip, family: str) -> bool:
    """A real clip of a word the model does not have, from ``family``."""
    return clip.label == UNKNOWN_LABEL and clip.source == "real" and _family(clip) == family


def development_sets(
    clips: list[Clip], per_source: int = DEVELOPMENT_CLIPS
) -> dict[str, dict[str, list[Clip]]]:
    """The same measures' material from the TRAINING side (``--development``), for choosing a decision rule
    (thresholds, smoothing, the listening mode) without spending the held-out sets: the training speakers'
    "computer" (Picovoice training clusters) and command words (Speech Commands training speakers), the
    training voices' synthetic "computer", and as false-wake material the tuning quarter of long speech and
    noise and the training split's Picovoice other wake words. These are trained on (or chose the thresholds):
    their figures flatter every model; they tell decision rules apart, never how a new voice is heard. Whole
    commands on the training side lose about 15 % (42e8fec0), so they are not saturated."""
    def picked(keep: Callable[[Clip], bool]) -> list[Clip]:
        """``per_source`` of the training clips ``keep`` takes, in a stable hash order."""
        chosen = [c for c in clips if c.split == "train" and keep(c)]
        return hash_ordered(chosen)[:per_source]

    wake = {
        "picovoice": picked(lambda c: c.label == WAKE_WORD and _family(c) == "picovoice"),
        "synth_training_voices": picked(lambda c: c.label == WAKE_WORD and c.source == "synth"),
    }
    commands = {
        "speech_commands": picked(lambda c: c.label in COMMAND_WORDS and _family(c) == "speech_commands")
    }
    negatives = {
        "tuning_long_speech_and_noise": [
            c for c in clips if c.source in ("long", "noise") and c.split == "tune"
        ],
        "picovoice_other_wake_words": picked(
            lambda c: c.label == UNKNOWN_LABEL and _family(c) == "picovoice"
        ),
    }
    other_words = {  # words outside the vocabulary, said after the wake word (named as the held-out sources)
        source: picked(partial(_outside_vocabulary, family=family))
        for family, source in (("speech_commands", "speech_commands_other_words"),
                               ("fsdd_digits", "fsdd_digits"))
    }
    sets = {"wake": wake, "commands": commands, "negatives": negatives, "other_words": other_words}
    return {kind: {name: group for name, group in groups.items() if group} for kind, groups in sets.items()}


def _rate(hits: int, n: int) -> float | None:
    return round(hits / n, 4) if n else None


def _words_heard(pipeline: VoicePipeline, clips: list[Clip], desc: str) -> list[tuple[list[str], float]]:
    """(words detected, seconds of audio) per clip, through ``home-agent transcribe``'s code."""
    heard = []
    for clip in progress(clips, total=len(clips), desc=desc):
        result = transcribe_file(pipeline, Path(clip.path))
        if result.error is not None:
            raise RuntimeError(f"{clip.path}: {result.error}")
        heard.append(([d.word for d in result.detections], result.duration))
    return heard


def wake_detection(pipeline: VoicePipeline, clips: list[Clip], desc: str) -> dict[str, Any]:
    heard = _words_heard(pipeline, clips, desc)
    detected = sum(WAKE_WORD in words for words, _ in heard)
    top = Counter(w for words, _ in heard if WAKE_WORD not in words for w in words)
    return {"clips": len(clips), "detected": detected, "detection_rate": _rate(detected, len(clips)),
            "heard_instead_when_missed": dict(top.most_common(5))}


def command_detection(pipeline: VoicePipeline, clips: list[Clip], desc: str) -> dict[str, Any]:
    heard = _words_heard(pipeline, clips, desc)
    per_word: dict[str, dict[str, Any]] = {}
    for clip, (words, _) in zip(clips, heard, strict=True):
        entry = per_word.setdefault(clip.label, {"n": 0, "detected": 0, "only_this_word": 0})
        entry["n"] += 1
        entry["detected"] += clip.label in words
        entry["only_this_word"] += bool(words) and set(words) == {clip.label}
    for entry in per_word.values():
        entry["detection_rate"] = _rate(entry["detected"], entry["n"])
        entry["exclusive_rate"] = _rate(entry["only_this_word"], entry["n"])
    rates = [per_word[w]["detection_rate"] for w in COMMAND_WORDS if w in per_word]
    return {"clips": len(clips), "mean_detection_rate": round(float(np.mean(rates)), 4) if rates else None,
            "per_word": {w: per_word[w] for w in COMMAND_WORDS if w in per_word}}


def false_wakes(pipeline: VoicePipeline, clips: list[Clip], desc: str) -> dict[str, Any]:
    heard = _words_heard(pipeline, clips, desc)
    seconds = sum(duration for _, duration in heard)
    wakes = sum(words.count(WAKE_WORD) for words, _ in heard)
    woken = Counter(Path(c.path).parent.name for c, (words, _) in zip(clips, heard, strict=True)
                    if WAKE_WORD in words)
    any_words = sum(len(words) for words, _ in heard)
    hours = seconds / 3600
    return {"clips": len(clips), "hours": round(hours, 4), "false_wakes": wakes,
            "false_wakes_per_clip": _rate(wakes, len(clips)),
            "false_wakes_per_hour": round(wakes / hours, 2) if hours else None,
            "woken_by": dict(woken.most_common()), "any_word_detections": any_words}


def _speech(path: str) -> npt.NDArray[np.int16] | None:
    """A clip cut to its speech plus MARGIN of its own background either side (int16)."""
    data, rate = sf.read(path, dtype="int16", always_2d=True)
    if rate != SAMPLE_RATE:
        raise ValueError(f"{path}: {rate} Hz, expected {SAMPLE_RATE}")
    samples: npt.NDArray[np.int16] = data[:, 0]
    span = speech_span(samples, END_FLOOR_DB)
    if span is None:
        return None
    return samples[max(0, span[0] - MARGIN) : span[1] + MARGIN]


WakeFor = Callable[[Clip, np.random.Generator], Clip | None]  # the wake clip a word clip is said after


def _after_wake(model: KwsModel, words: list[Clip], wake_for: WakeFor,
                desc: str) -> Iterator[tuple[Clip, Clip, PipelineOutput]]:
    """Each clip of ``words`` after a "computer" (``wake_for`` picks it) and a natural pause, through the
    voice pipeline with the ten words configured as one-word commands: (word clip, wake clip, what the
    pipeline heard)."""
    commands = [Command((word,), word) for word in COMMAND_WORDS]
    pipeline = VoicePipeline(model, VoiceSection(), commands, hop_seconds=model_hop_seconds(model))
    rng = np.random.default_rng(13)
    for clip in progress(words, total=len(words), desc=desc):
        wake_clip = wake_for(clip, rng)
        if wake_clip is None:
            continue
        wake, spoken = _speech(wake_clip.path), _speech(clip.path)
        if wake is None or spoken is None:
            continue
        pause = tail_padding(float(rng.uniform(*PAUSE_SECONDS)), seed=2)
        audio = np.concatenate([tail_padding(1.0, seed=1), wake, pause, spoken, tail_padding(1.5, seed=3)])
        pipeline.reset()
        yield clip, wake_clip, pipeline.feed(audio)


def _woke(output: PipelineOutput) -> bool:
    return any(event.kind == "wake" for event in output.events)


def whole_commands(model: KwsModel, wakes: list[Clip], words: list[Clip], wake_for: WakeFor,
                   desc: str) -> dict[str, Any]:
    """Each command-word clip after a held-out "computer" (:func:`_after_wake`): the first intent is right,
    wrong, or there is none."""
    right = wrong = missed = wake_missed = 0
    confusions: Counter[str] = Counter()
    # Many commands share one wake clip: how many of the wrong and of the missing one clip accounts for
    failed_after: dict[str, Counter[str]] = {"wrong": Counter(), "missing": Counter()}
    for clip, wake_clip, output in _after_wake(model, words, wake_for, desc):
        intents = output.intents
        if not intents:
            missed += 1
            wake_missed += not _woke(output)
            failed_after["missing"][Path(wake_clip.path).stem] += 1
        elif intents[0].action == clip.label:
            right += 1
        else:
            wrong += 1
            confusions[f"{clip.label}->{intents[0].action}"] += 1
            failed_after["wrong"][Path(wake_clip.path).stem] += 1
    total = right + wrong + missed
    return {"commands": total, "right": right, "wrong": wrong, "missing": missed,
            "missing_wake_word_missed": wake_missed, "right_rate": _rate(right, total),
            "wrong_rate": _rate(wrong, total), "missing_rate": _rate(missed, total),
            "wrong_as": dict(confusions.most_common(6)), "wake_clips": len(wakes),
            **{f"{kind}_after_one_wake_clip": _most(counts) for kind, counts in failed_after.items()}}


def unasked_commands(model: KwsModel, words: list[Clip], wake_for: WakeFor, desc: str) -> dict[str, Any]:
    """Each clip of a word outside the vocabulary after a held-out "computer" (:func:`_after_wake`): an intent
    is a command nobody gave. Counted among the clips that woke the agent (only they can give one)."""
    clips = woken = unasked = 0
    heard_as: Counter[str] = Counter()
    said: Counter[str] = Counter()
    for clip, _wake_clip, output in _after_wake(model, words, wake_for, desc):
        clips += 1
        if not _woke(output):
            continue
        woken += 1
        if output.intents:
            unasked += 1
            heard_as[str(output.intents[0].action)] += 1
            said[Path(clip.path).parent.name] += 1
    return {"clips": clips, "woken": woken, "unasked": unasked, "unasked_rate": _rate(unasked, woken),
            "heard_as": dict(heard_as.most_common(6)), "said": dict(said.most_common(6))}


def _most(counts: Counter[str]) -> dict[str, Any] | None:
    """The wake clip most of ``counts`` came after, and how many: {"clip": stem, "commands": n}."""
    if not counts:
        return None
    clip, commands = counts.most_common(1)[0]
    return {"clip": clip, "commands": commands}


def _same_voice(wakes: list[Clip]) -> WakeFor:
    by_voice: dict[str, list[Clip]] = defaultdict(list)
    for clip in wakes:
        by_voice[clip.group].append(clip)

    def pick(clip: Clip, rng: np.random.Generator) -> Clip | None:
        group = by_voice.get(clip.group)
        return group[int(rng.integers(len(group)))] if group else None

    return pick


def _any_of(wakes: list[Clip]) -> WakeFor:
    def pick(_clip: Clip, rng: np.random.Generator) -> Clip | None:
        return wakes[int(rng.integers(len(wakes)))] if wakes else None

    return pick


def evaluate(model_path: Path, data_dir: Path, synth_dir: Path | None = SYNTH_DIR,
             limit: int | None = None, development: bool = False) -> dict[str, Any]:
    """The held-out report (the model card's headline), or with ``development`` the same measures on the
    training side (:func:`development_sets`; never a headline)."""
    started = time.monotonic()
    clips = inventory(data_dir, synth_dir, limit=limit)
    sets = development_sets(clips) if development else held_out_sets(clips)
    pipeline = load_pipeline(None, model_path)
    model = pipeline.model
    wake = {name: wake_detection(pipeline, group, f"wake {name}")
            for name, group in sorted(sets["wake"].items())}
    commands = {name: command_detection(pipeline, group, f"words {name}")
                for name, group in sorted(sets["commands"].items())}
    negatives = {name: false_wakes(pipeline, group, f"negatives {name}")
                 for name, group in sorted(sets["negatives"].items())}
    sc_words = sets["commands"].get("speech_commands", [])
    whole: dict[str, Any] = {}
    for name in ("picovoice", "precise_hey_computer", "synth_training_voices"):
        if sets["wake"].get(name) and sc_words:
            whole[f"{name} + speech_commands"] = whole_commands(
                model, sets["wake"][name], sc_words, _any_of(sets["wake"][name]), f"commands {name}")
    for name in ("synth_held_out_engine", "synth_held_out_voices"):
        if sets["wake"].get(name) and sets["commands"].get(name):
            whole[f"{name} (same voice)"] = whole_commands(
                model, sets["wake"][name], sets["commands"][name], _same_voice(sets["wake"][name]),
                f"commands {name}")
    unasked: dict[str, Any] = {}
    for wake_name in ("picovoice", "precise_hey_computer"):
        for name, group in sorted(sets.get("other_words", {}).items()):
            if sets["wake"].get(wake_name) and group:
                unasked[f"{wake_name} + {name}"] = unasked_commands(
                    model, group, _any_of(sets["wake"][wake_name]), f"unasked {wake_name} + {name}")
    report = {"model": str(model_path), "sha256": model.sha256, "size_bytes": model.size_bytes,
              "thresholds": {WAKE_WORD: model.thresholds.get(WAKE_WORD)},
              "verifier": None if model.verifier is None else {
                  "sha256": model.verifier.sha256, "size_bytes": model.verifier.path.stat().st_size,
                  "threshold": model.verifier.threshold},
              "smoothing_seconds": model.smoothing_seconds, "wake_word": wake, "command_words": commands,
              "false_wakes": negatives, "whole_commands": whole, "unasked_commands": unasked,
              "split": "development (training side)" if development else "held out"}
    report["headline"] = headline(report)
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The figures the issue's targets are about, with the worst source named."""
    real_wake = {k: v["detection_rate"] for k, v in report["wake_word"].items()
                 if not k.startswith("synth") and v["detection_rate"] is not None}
    negatives = report["false_wakes"]
    pooled_wakes = sum(v["false_wakes"] for v in negatives.values())
    pooled_hours = sum(v["hours"] for v in negatives.values())
    real_negatives = {k: v for k, v in negatives.items() if not k.startswith("synth")}
    real_wakes = sum(v["false_wakes"] for v in real_negatives.values())
    real_hours = sum(v["hours"] for v in real_negatives.values())
    worst_fw = max(negatives.items(), key=lambda kv: kv[1]["false_wakes_per_hour"] or 0.0)
    sc = report["command_words"].get("speech_commands", {})
    real_whole = {k: v for k, v in report["whole_commands"].items() if not k.startswith("synth")}
    worst_whole = min(real_whole.items(), key=lambda kv: kv[1]["right_rate"] or 0.0) if real_whole else None
    worst_wake = min(real_wake.items(), key=lambda kv: kv[1]) if real_wake else None
    unasked = {k: v for k, v in report.get("unasked_commands", {}).items() if v["unasked_rate"] is not None}
    worst_unasked = max(unasked.items(), key=lambda kv: kv[1]["unasked_rate"]) if unasked else None
    return {
        "wake_detection_real": real_wake,
        "worst_wake_source":
            {"source": worst_wake[0], "detection_rate": worst_wake[1]} if worst_wake else None,
        "command_words_mean_speech_commands": sc.get("mean_detection_rate"),
        "false_wakes_real": {"false_wakes": real_wakes, "hours": round(real_hours, 3),
                             "per_hour": round(real_wakes / real_hours, 2) if real_hours else None},
        "false_wakes_all": {"false_wakes": pooled_wakes, "hours": round(pooled_hours, 3),
                            "per_hour": round(pooled_wakes / pooled_hours, 2) if pooled_hours else None},
        "worst_false_wake_source": {"source": worst_fw[0], **{k: worst_fw[1][k] for k in (
            "false_wakes", "clips", "false_wakes_per_hour")}},
        "whole_commands_real": {k: {"right": v["right_rate"], "wrong": v["wrong_rate"],
                                    "missing": v["missing_rate"]} for k, v in real_whole.items()},
        "worst_whole_command_source": worst_whole[0] if worst_whole else None,
        "unasked_commands_real": {k: v["unasked_rate"] for k, v in unasked.items()},
        "worst_unasked_command_source":
            None if worst_unasked is None else
            {"source": worst_unasked[0], "unasked_rate": worst_unasked[1]["unasked_rate"]},
        "targets": TARGETS,
    }


# ------------------------------------------------------------------------------------------ the model card

CARD_BEGIN = "<!-- new-voices: generated by python -m training.newvoices --card; do not edit by hand -->"
CARD_END = "<!-- /new-voices -->"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _fw_cell(item: dict[str, Any] | None) -> str:
    return "-" if item is None else f"{item['false_wakes']} ({item['false_wakes_per_hour']}/h)"


def _pooled_cell(item: dict[str, Any]) -> str:
    return f"{item['false_wakes']} in {item['hours']} h = {item['per_hour']}/h"


def _whole_cell(item: dict[str, Any] | None) -> str:
    if item is None:
        return "-"
    cell = (f"{_pct(item['right_rate'])} / {_pct(item['wrong_rate'])} / {_pct(item['missing_rate'])} "
            f"({item['missing_wake_word_missed']})")
    one = [f"{most['commands']} {kind}" for kind in ("wrong", "missing")
           if (most := item.get(f"{kind}_after_one_wake_clip"))]
    return cell + (f"; after one wake clip: {', '.join(one)}" if one else "")


def _unasked_cell(item: dict[str, Any] | None) -> str:
    if item is None:
        return "-"
    heard = ", ".join(f"{word} {n}" for word, n in item["heard_as"].items())
    return f"{item['unasked']} of {item['woken']} woken = {_pct(item['unasked_rate'])}" + (
        f" ({heard})" if heard else "")


def _worst_cells(report: dict[str, Any]) -> tuple[str, str]:
    head = report["headline"]
    wake, fw = head["worst_wake_source"], head["worst_false_wake_source"]
    return (f"{wake['source']} {_pct(wake['detection_rate'])}",
            f"{fw['source']} {fw['false_wakes']}/{fw['clips']} clips ({fw['false_wakes_per_hour']}/h)")


def _model_cell(report: dict[str, Any]) -> str:
    cell = (f"`{report['sha256'][:8]}`, {report['size_bytes']:,} B, computer threshold "
            f"{report['thresholds'][WAKE_WORD]}")
    verifier = report.get("verifier")
    if verifier:
        cell += (f"; wake verifier `{verifier['sha256'][:8]}`, {verifier['size_bytes']:,} B, threshold "
                 f"{verifier['threshold']}")
    return cell


def card_section(reports: dict[str, dict[str, Any]]) -> str:
    """A markdown section, one column per model (``reports``: column title -> report)."""
    names = list(reports)
    first = reports[names[0]]
    head = "| source | " + " | ".join(names) + " |"
    rule = "|---|" + "---|" * len(names)

    def row(label: str, cell: Callable[..., str]) -> str:  # cell(report); lambdas bind a source by default
        return f"| {label} | " + " | ".join(cell(reports[n]) for n in names) + " |"

    targets = (
        f"Targets: computer >= {_pct(TARGETS['wake_detection_min'])} on every real source, ten words >= "
        f"{_pct(TARGETS['command_words_mean_min'])}, false wakes <= {TARGETS['false_wakes_per_hour_max']}/h, "
        f"whole commands >= {_pct(TARGETS['whole_command_right_min'])} right and <= "
        f"{_pct(TARGETS['whole_command_wrong_max'])} wrong."
    )
    lines = [
        CARD_BEGIN, "## Headline: new voices (never tuned on)", "",
        "Held out from training and from every threshold and smoothing choice (`training/newvoices.py`), "
        "measured through the runtime's streaming path (`home-agent transcribe`'s code; whole commands "
        "through the voice pipeline with pause silencing and listening smoothing). Per source, not pooled. "
        + targets + " The real wake-word sources are few: Picovoice's held-out speaker clusters are "
        "approximate speakers (no speaker ids), Precise's `hey computer` is one speaker's 10 clips. False "
        "wakes per hour of isolated clips (back-to-back confusable words) are a harsh measure; per clip, "
        "divide by the clips. The Picovoice corpus holds copies of one recording under several file names "
        "(`training.data.recording_copies`); since session 18 a recording any copy of which is trained on is "
        "not held out, which took out 62 of the other wake words' 349 held-out clips, 3 of long speech and "
        "17 of noise (overlapping cuts of the same noise recordings); the copies of a held-out `computer` "
        "recording were already in one cluster. Reports made before then include those clips.", "",
        '**Wake word "computer", detection rate** (clips)', "", head, rule,
    ]
    for source, item in first["wake_word"].items():
        lines.append(row(f"{source} ({item['clips']})",
                         lambda r, s=source: _pct(r["wake_word"].get(s, {}).get("detection_rate"))))
    lines += ["", "**Ten command words, streaming detection rate, mean** (clips)", "", head, rule]
    for source, item in first["command_words"].items():
        lines.append(row(f"{source} ({item['clips']})",
                         lambda r, s=source: _pct(r["command_words"].get(s, {}).get("mean_detection_rate"))))
    lines.append(row("speech_commands per word", lambda r: ", ".join(
        f"{w} {100 * v['detection_rate']:.0f}" for w, v in
        r["command_words"].get("speech_commands", {}).get("per_word", {}).items())))
    lines += ["", "**False wakes** (false wakes, per hour of the clips' audio)", "", head, rule]
    for source, item in first["false_wakes"].items():
        lines.append(row(f"{source} ({item['clips']} clips, {item['hours']:.2f} h)",
                         lambda r, s=source: _fw_cell(r["false_wakes"].get(s))))
    lines.append(row("all real sources", lambda r: _pooled_cell(r["headline"]["false_wakes_real"])))
    lines.append(row("all sources incl. synthetic", lambda r: _pooled_cell(r["headline"]["false_wakes_all"])))
    lines += ["", '**Whole commands**: "computer", 0.15-0.35 s pause, a command word: right / wrong / '
              "missing (of which the wake word was missed); where measured, the most wrong and missing "
              "commands after one and the same wake clip (commands share a few wake clips)", "", head, rule]
    for source, item in first["whole_commands"].items():
        lines.append(row(f"{source} ({item['commands']})",
                         lambda r, s=source: _whole_cell(r["whole_commands"].get(s))))
    unasked_sources = list(dict.fromkeys(s for r in reports.values() for s in r.get("unasked_commands", {})))
    if unasked_sources:
        lines += ["", '**Commands nobody gave**: "computer", 0.15-0.35 s pause, a real word outside the '
                  "vocabulary (held out): of the clips that woke the agent, how many still gave an intent "
                  "(what they were heard as)", "", head, rule]
        for source in unasked_sources:
            lines.append(row(source, lambda r, s=source: _unasked_cell(r.get("unasked_commands", {}).get(s))))
    lines += ["", "**Worst source**", "", head, rule,
              row("wake word (real)", lambda r: _worst_cells(r)[0]),
              row("false wakes", lambda r: _worst_cells(r)[1]),
              row("whole commands (real)", lambda r: str(r["headline"]["worst_whole_command_source"])),
              row("model", _model_cell),
              ""]
    lines += [f"- **{name}**: {reports[name]['note']}" for name in names if reports[name].get("note")]
    lines += ["", CARD_END]
    return "\n".join(lines)


def put_card_section(card: Path, section: str, begin: str = CARD_BEGIN, end: str = CARD_END) -> None:
    """Replace the section between ``begin`` and ``end`` (default: the new-voices one, whose text starts and
    ends with them) of a model card, or put it right after the title."""
    text = card.read_text(encoding="utf-8") if card.exists() else "# kws\n"
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        after = rest.split(end, 1)[1]
        text = before + section + after
    else:
        title, _, body = text.partition("\n")
        text = f"{title}\n\n{section}\n{body}"
    card.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.newvoices", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/kws.tflite"))
    parser.add_argument("--data", type=Path, default=None, help="default: $DATA_DIR or ../shared/data/speech")
    parser.add_argument("--synth", type=Path, default=SYNTH_DIR, help="synthetic speech (training.synth)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--card", type=Path, default=None, help="put the headline section into this card")
    parser.add_argument("--ablation", type=Path, default=None,
                        help="JSON of earlier reports by title (e.g. models/kws_newvoices.json): this report "
                             "is stored in it under --title, and the card gets one column per report")
    parser.add_argument("--title", default="this model")
    parser.add_argument("--note", default="", help="what the card should say about this model's column")
    parser.add_argument("--limit", type=int, default=None, help="files per folder (quick checks)")
    parser.add_argument("--development", action="store_true",
                        help="the same measures on training-side material, for choosing decision rules "
                             "(never written to the card)")
    args = parser.parse_args(argv)
    if args.development and (args.card or args.ablation):
        parser.error("--development figures never go into the model card (--card, --ablation)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    data_dir = speech_data_dir(args.data)
    if data_dir is None:
        return 2
    report = evaluate(args.model, data_dir, args.synth if args.synth.is_dir() else None, args.limit,
                      development=args.development)
    if args.json is not None:
        write_json(args.json, report)
    if args.note:
        report["note"] = args.note
    columns = {args.title: report}
    if args.ablation is not None:
        stored = json.loads(args.ablation.read_text(encoding="utf-8")) if args.ablation.exists() else {}
        columns = {**stored, args.title: report}
        write_json(args.ablation, columns)
    if args.card is not None:
        put_card_section(args.card, card_section(columns))
    print(json.dumps(report["headline"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
