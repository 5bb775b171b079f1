"""Build the negative bank for household adaptation (``agent/adaptation.py``) from training-side audio.

    python -m training.enrol_bank --model models/kws.tflite --data ../shared/data/speech --out models/

Only the training split of :func:`training.data.inventory` is used, and of it only Speech Commands speakers
(the vocabulary words and the other words), ``real_long`` and ``noise``: every speaker or file the
validations hold out stays out, and so do whole sources that serve as held-out false-wake material (the
other wake words) or as held-out speakers (Precise). Per clip a few windows that hold its word; long speech
and noise every 0.25 s, cut into 10 s stretches (each stretch counts as one recording for false wakes). The
bank records the sha256 of the model; a retrained model needs this script run again (about a minute).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from agent.adaptation import speech_span, stream_embeddings, word_windows
from agent.audio import read_audio_file
from agent.bank import Bank, bank_path
from agent.features import SILENCE_LABEL, UNKNOWN_LABEL, FeatureParams
from agent.kws import KwsModel
from agent.templates import recording_cepstra
from training.common import stable_fraction
from training.data import Clip, inventory, speaker_of

log = logging.getLogger(__name__)

CLIPS_PER_WORD = 80  # positives of each vocabulary word
OTHER_CLIPS = 600  # Speech Commands words outside the vocabulary
WINDOWS_PER_CLIP = 3
LONG_HOP_SECONDS = 0.25
STRETCH_SECONDS = 10.0
MAX_LONG_WINDOWS = 3000
MAX_NOISE_WINDOWS = 600
# The other wake words of the Picovoice corpus: confusable speech. Their training-split clips are split in two
# by a hash (bank_part): one half goes into the bank, the other is the development set where enrolment's
# parameters are chosen (training/enrol_dev.py); bench/enroll_bench.py reports only the validation split.
CONFUSABLE_WAKE_WORDS = ("alexa", "jarvis", "smart_mirror", "snowboy", "view_glass")
CONFUSABLE_HOP_SECONDS = 0.1  # every hop of the voice path: a confusable may wake it at any offset
CEPSTRA_HOP_SECONDS = 0.1  # the voice path's hop (agent.templates.hop_mel groups frames by it)
CEPSTRA_TAIL_SECONDS = 0.2  # a clip's cepstra go on into this much silence, as a stream's would


def pick(paths: list[str], count: int) -> list[str]:
    """A stable, hash-ordered choice (the same clips on every run)."""
    return sorted(paths, key=lambda p: stable_fraction("bank-" + Path(p).name))[:count]


def bank_part(path: str) -> bool:
    """Whether a training-split confusable clip belongs to the bank (else to the development set)."""
    return stable_fraction("enrol-bank-" + Path(path).name) < 0.5


def recording_items(params: FeatureParams, samples: np.ndarray, first_item: int,
                    stretch_frames: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A recording's cepstra (a clip's going on into a little silence, as a stream's would) and the bank item
    of each frame: ``first_item``, or for long audio one item per ``stretch_frames``."""
    tail = 0 if stretch_frames else round(CEPSTRA_TAIL_SECONDS * params.sample_rate)
    values = recording_cepstra(params, samples, round(CEPSTRA_HOP_SECONDS * params.sample_rate), tail)
    offsets = np.arange(len(values)) // stretch_frames if stretch_frames else np.zeros(len(values), int)
    return values, (first_item + offsets).astype(np.int32)


def word_clips(clips: list[Clip], wake_word: str) -> dict[str, list[str]]:
    """Per label, the training clips of Speech Commands and FSDD speakers, and the wake word's clusters."""
    by_label: dict[str, list[str]] = defaultdict(list)
    for clip in clips:
        speaker = speaker_of(Path(clip.path).name) or ""
        if clip.source == "real" and speaker.startswith(("sc_", "fsdd_")):
            by_label[clip.label].append(clip.path)
        elif clip.source == "real" and clip.label == wake_word:
            by_label[clip.label].append(clip.path)  # the wake word's training speaker clusters
    return by_label


def build_bank(model: KwsModel, data_dir: Path) -> Bank:
    clips = [c for c in inventory(data_dir, synth_dir=None) if c.split == "train"]
    by_label = word_clips(clips, model.words[0])
    rows: list[np.ndarray] = []
    labels: list[str] = []
    items: list[int] = []
    item_seconds: list[float] = []
    params = model.params
    cepstra: list[np.ndarray] = []  # the template path's negatives (agent.templates), per recording
    cepstra_items: list[np.ndarray] = []

    def add_cepstra(samples: np.ndarray, first_item: int, stretch_frames: int = 0) -> None:
        values, owners = recording_items(params, samples, first_item, stretch_frames)
        cepstra.append(values)
        cepstra_items.append(owners)

    for label in (*model.words, UNKNOWN_LABEL):
        count = OTHER_CLIPS if label == UNKNOWN_LABEL else CLIPS_PER_WORD
        for path in pick(by_label.get(label, []), count):
            samples = read_audio_file(path)
            span = speech_span(samples)
            if span is None:
                continue
            windows = word_windows(model, samples, span)
            if not len(windows):
                continue
            chosen = windows[np.linspace(0, len(windows) - 1, WINDOWS_PER_CLIP).round().astype(int)]
            rows.append(chosen)
            labels += [label] * len(chosen)
            items += [len(item_seconds)] * len(chosen)
            add_cepstra(samples, len(item_seconds))
            item_seconds.append(len(samples) / model.params.sample_rate)
    confusable_hop = round(CONFUSABLE_HOP_SECONDS * model.params.sample_rate)
    for clip in clips:
        if clip.source != "real" or Path(clip.path).parent.name not in CONFUSABLE_WAKE_WORDS \
                or not bank_part(clip.path):
            continue
        samples = read_audio_file(clip.path)
        _, _, embeddings = stream_embeddings(model, samples, confusable_hop,
                                             tail_samples=model.params.window_samples // 2)
        if not len(embeddings):
            continue
        rows.append(embeddings)
        labels += [UNKNOWN_LABEL] * len(embeddings)
        items += [len(item_seconds)] * len(embeddings)
        add_cepstra(samples, len(item_seconds))
        item_seconds.append(len(samples) / model.params.sample_rate)
    hop = round(LONG_HOP_SECONDS * model.params.sample_rate)
    for source, label, cap in (("long", UNKNOWN_LABEL, MAX_LONG_WINDOWS),
                               ("noise", SILENCE_LABEL, MAX_NOISE_WINDOWS)):
        taken = 0
        for clip in sorted((c for c in clips if c.source == source), key=lambda c: stable_fraction(c.path)):
            if taken >= cap:
                break
            samples = read_audio_file(clip.path)
            ends, _, embeddings = stream_embeddings(model, samples, hop)
            if not len(ends):
                continue
            keep = min(len(ends), cap - taken)
            stretch = (ends[:keep] // STRETCH_SECONDS).astype(int)
            rows.append(embeddings[:keep])
            labels += [label] * keep
            items += list(len(item_seconds) + stretch)
            heard = min(len(samples) / model.params.sample_rate, float(ends[keep - 1]))
            add_cepstra(samples[: round(heard * params.sample_rate)], len(item_seconds),
                        stretch_frames=round(STRETCH_SECONDS * params.sample_rate) // params.hop_samples)
            item_seconds += [min(STRETCH_SECONDS, heard - n * STRETCH_SECONDS)
                             for n in range(int(stretch.max()) + 1)]
            taken += keep
    return Bank(np.concatenate(rows).astype(np.float32), np.array(labels), np.array(items, dtype=np.int32),
                np.array(item_seconds, np.float32), model.sha256,
                {"data": str(data_dir), "recordings": len(item_seconds)},
                cepstra=np.concatenate(cepstra), cepstra_items=np.concatenate(cepstra_items))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/kws.tflite"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data/speech"))
    parser.add_argument("--out", type=Path, default=None, help="folder (default: beside the model)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    started = time.monotonic()
    model = KwsModel.load(args.model, embedding=True)
    bank = build_bank(model, args.data)
    out = (args.out / bank_path(args.model).name) if args.out is not None else bank_path(args.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    bank.save(out)
    log.info("wrote %s: %d windows of %d recordings (%.2f h), %d bytes, in %.0f s", out, len(bank.labels),
             bank.info["recordings"], bank.hours, out.stat().st_size, time.monotonic() - started)


if __name__ == "__main__":
    main()
