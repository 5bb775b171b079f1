"""The development split for household enrolment (``agent/adaptation.py``): where its parameters are chosen.

    python -m training.enrol_dev [--data DIR] [--cache FILE]

Everything here is training-side, and none of it is in the negative bank or in what ``bench/enroll_bench.py``
reports (see :func:`training.enrol_bank.bank_part`):

- enrolment targets: training-split Picovoice ``computer`` speaker clusters (five recordings enrolled, the
  cluster's other recordings tested), and the same clusters made child-like (a voice the model misses);
- confusable speech: the development half of the training-split clips of the five other wake words (the bank
  holds the other half; the bench holds out the validation split), and the ``tune`` quarter of
  ``real_long/``: wakes per hour before and after enrolment.

Each clip's per-hop posteriors and embeddings are recorded once through the streaming path (the model is the
costly part), then replayed through the adaptation and the recognizer (the voice path's thresholds and
smoothing) with each candidate setting, so many settings can be compared in minutes. The replay keeps the wake
window closed (it counts wakes).
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from agent.adaptation import Adaptation, EnrollError, learn
from agent.audio import read_audio_file
from agent.bank import Bank, bank_path
from agent.config import VoiceSection
from agent.kws import KwsModel
from agent.messages import Scores
from agent.recognizer import Recognizer, RecognizerSettings
from agent.voice import VoicePipeline, model_hop_seconds, tail_padding
from training.common import stable_fraction
from training.data import inventory
from training.enrol_bank import CONFUSABLE_WAKE_WORDS, bank_part

log = logging.getLogger(__name__)

WAKE = "computer"
ENROL = 5
TARGET_CLUSTERS = 8
CHILD = 1.3


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


def record(model: KwsModel, samples: npt.NDArray[np.int16]) -> tuple[npt.NDArray[np.float32], ...]:
    recorder = _Recorder(model)
    pipeline = VoicePipeline(cast(KwsModel, recorder), VoiceSection(), hop_seconds=model_hop_seconds(model))
    pipeline.feed(samples)
    pipeline.feed(tail_padding())
    return np.stack(recorder.posteriors), np.stack(recorder.embeddings)


def wakes(settings: RecognizerSettings, recorded: tuple[npt.NDArray[np.float32], ...],
          adaptation: Adaptation | None) -> int:
    """Wakes of the voice path on one recorded clip: the model's recorded posteriors (through the adaptation,
    if any) into the recognizer, one per 0.1 s hop, the wake window never open."""
    posteriors, embeddings = recorded
    recognizer = Recognizer(settings)
    count = 0
    for hop, (posterior, embedding) in enumerate(zip(posteriors, embeddings, strict=True)):
        probabilities = posterior if adaptation is None else \
            adaptation.apply(settings.labels, posterior, embedding)
        detection = recognizer.process(Scores(settings.labels, probabilities, round(0.1 * (hop + 1), 6)))
        count += detection is not None and detection.word == WAKE
    return count


def touched(adaptation: Adaptation | None, embeddings: npt.NDArray[np.float32]) -> bool:
    """Whether the adaptation changes any hop of a clip (else it wakes exactly as the shipped model)."""
    if adaptation is None:
        return False
    for entry in adaptation.heads:
        scores = entry.head.score(embeddings)
        if entry.boosts(embeddings, scores).any() or entry.vetoes(embeddings, scores).any():
            return True
    return False


def child_like(samples: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
    """Pitch and formants 1.3x higher, tempo kept (as bench/enroll_bench.py's child-like voice)."""
    from scipy.signal import resample

    from bench.enroll_bench import stretch

    changed = stretch(resample(samples.astype(np.float64), int(len(samples) / CHILD)), CHILD)
    return np.asarray(changed.clip(-32768, 32767), dtype=np.int16)


def dev_sets(data_dir: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    clips = inventory(data_dir, synth_dir=None)
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
    chosen = sorted((g for g, paths in clusters.items() if len(paths) >= 2 * ENROL),
                    key=lambda g: stable_fraction("dev-" + g))[:TARGET_CLUSTERS]
    return dict(confusable), {g: sorted(clusters[g]) for g in chosen}


def load_recorded(model: KwsModel, data_dir: Path, cache: Path) -> dict[str, Any]:
    """The development sets and every clip's recorded hops (kept in ``cache``: recording takes minutes)."""
    if cache.exists():
        with cache.open("rb") as handle:
            loaded: dict[str, Any] = pickle.load(handle)
            if loaded["model_sha256"] == model.sha256:
                return loaded
    confusable, targets = dev_sets(data_dir)
    audio: dict[str, npt.NDArray[np.int16]] = {}
    for paths in targets.values():
        for path in paths:
            audio[path] = read_audio_file(path)
            audio[f"child:{path}"] = child_like(audio[path])
    recorded = {p: record(model, read_audio_file(p)) for paths in confusable.values() for p in paths}
    recorded.update({key: record(model, samples) for key, samples in audio.items()})
    result = {"model_sha256": model.sha256, "confusable": confusable, "targets": targets, "audio": audio,
              "recorded": recorded}
    cache.parent.mkdir(parents=True, exist_ok=True)
    with cache.open("wb") as handle:
        pickle.dump(result, handle)
    return result


def evaluate(model: KwsModel, bank: Bank, dev: dict[str, Any]) -> dict[str, Any]:
    """Per target (cluster, child-like cluster): detection of its other recordings and wakes per confusable
    source, shipped and adapted; ``total``: sums over every target."""
    recorded, audio, confusable = dev["recorded"], dev["audio"], dev["confusable"]
    settings = VoicePipeline(model, VoiceSection(), hop_seconds=model_hop_seconds(model)).settings
    shipped = {key: wakes(settings, rec, None) for key, rec in recorded.items()}
    results: dict[str, Any] = {}
    total = {"detected_shipped": 0, "detected_adapted": 0, "tested": 0, "wakes_shipped": 0,
             "wakes_adapted": 0, "refused": 0, "seconds": 0.0}
    for group, paths in dev["targets"].items():
        for voice in ("", "child:"):
            keys = [voice + p for p in paths]
            enrolled, tested = keys[:ENROL], keys[ENROL:]
            started = time.process_time()
            try:
                adaptation = learn(model, bank, {WAKE: [audio[k] for k in enrolled]}, [], budget=0.0,
                                   check=(WAKE,))
            except EnrollError as err:
                log.info("%s%s: refused: %s", voice, group, str(err)[:160])
                total["refused"] += 1
                adaptation = None
            total["seconds"] = max(total["seconds"], time.process_time() - started)

            def adapted(key: str, adaptation: Adaptation | None = adaptation) -> int:
                rec = recorded[key]
                return wakes(settings, rec, adaptation) if touched(adaptation, rec[1]) else shipped[key]

            figures: dict[str, Any] = {"tested": len(tested)}
            for name, count in (("shipped", shipped.__getitem__), ("adapted", adapted)):
                figures[name] = {"detected": sum(count(k) > 0 for k in tested),
                                 "false_wakes": {s: sum(count(p) for p in ps)
                                                 for s, ps in confusable.items()}}
                total[f"detected_{name}"] += figures[name]["detected"]
                total[f"wakes_{name}"] += sum(figures[name]["false_wakes"].values())
            total["tested"] += len(tested)
            results[f"{voice}{group}"] = figures
            log.debug("%s%s: %s", voice, group, json.dumps(figures))
    results["total"] = total
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/kws.tflite"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data/speech"))
    parser.add_argument("--cache", type=Path, default=Path(".cache/enrol_dev.pkl"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    model = KwsModel.load(args.model, embedding=True)
    dev = load_recorded(model, args.data, args.cache)
    hours = {s: round(sum(len(dev["recorded"][p][0]) for p in ps) * 0.1 / 3600, 3)
             for s, ps in dev["confusable"].items()}
    log.info("confusable hours: %s", hours)
    results = evaluate(model, Bank.load(bank_path(model.path), model), dev)
    log.info("total: %s", json.dumps(results["total"]))


if __name__ == "__main__":
    main()
