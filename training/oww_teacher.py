"""Stage 2 (issue 13): a teacher that has heard far more voices than we have.

openWakeWord's speech embedding (Google's, trained on a large multi-speaker corpus;
``../shared/peers/openwakeword``) with a small non-linear head over all 16 labels. It only teaches: neither
the embedding nor the head ever enters the runtime.

The embedding, run here with LiteRT as openWakeWord's two-model pipeline: ``melspectrogram.tflite`` turns
int16 samples (as float) into 32 mel bands every 10 ms (frame i covers samples [160 i, 160 i + 560)), scaled
x/10 + 2; ``embedding_model.tflite`` turns 76 mel frames into one 96-dim embedding, one every 8 frames
(80 ms): embedding t covers samples [1280 t, 1280 t + 12560). The head reads HEAD_EMBEDDINGS (16) in a row,
TEACHER_SAMPLES (1.985 s) of audio. The melspectrogram floors its log at 80 dB below the loudest value of what
it is given: a training window is given alone (its 2 s), a clip under evaluation whole.

Alignment with the student (1 s MFCC windows): each training window is the last second of the teacher's
input, zero-padded in front, so the teacher judges the same audio ending at the same point. Long recordings
are embedded once (``stream_embeddings``) and every 80 ms position gets the 16 embeddings ending there.

Soft labels for the student are out-of-fold: the windows of half of the training files (by a hash of the
file name, so the augmented copies of one clip stay together) get the logits of a head trained on the other
half, so the student learns how the teacher generalises, not what it memorised.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.features import LABELS
from agent.progress import progress
from training.common import (
    CACHE_DIR,
    PEERS_DIR,
    SAMPLE_RATE,
    SEED,
    import_tf,
    soft_labels,
    stable_fraction,
)

log = logging.getLogger(__name__)

OWW_DIR = PEERS_DIR / "openwakeword"
MELSPEC_TFLITE = OWW_DIR / "melspectrogram.tflite"
EMBEDDING_TFLITE = OWW_DIR / "embedding_model.tflite"
MEL_HOP = 160
MEL_FRAME = 560  # samples one mel frame reads (measured: n samples give (n - 400) // 160 frames)
EMBEDDING_FRAMES = 76
EMBEDDING_STEP = 8  # mel frames: one embedding per 80 ms
EMBEDDING_HOP = MEL_HOP * EMBEDDING_STEP  # 1280 samples
EMBEDDING_SPAN = MEL_HOP * (EMBEDDING_FRAMES - 1) + MEL_FRAME  # 12560 samples
EMBEDDING_DIM = 96
HEAD_EMBEDDINGS = 16
TEACHER_SAMPLES = EMBEDDING_HOP * (HEAD_EMBEDDINGS - 1) + EMBEDDING_SPAN  # 31760 (1.985 s)
EMBED_VERSION = 1  # bump when the embedding recipe changes (invalidates the cache)
CHUNK = 256  # windows per worker task
SUB_BATCH = 4  # windows per LiteRT call


def available() -> bool:
    return MELSPEC_TFLITE.exists() and EMBEDDING_TFLITE.exists()


class SpeechEmbedding:
    """openWakeWord's melspectrogram + embedding models under LiteRT (one thread; inputs resized to fit)."""

    def __init__(self) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._mel = Interpreter(str(MELSPEC_TFLITE), num_threads=1)
        self._embedding = Interpreter(str(EMBEDDING_TFLITE), num_threads=1)
        self._shapes: dict[int, tuple[int, ...]] = {}

    def _run(self, interpreter: Any, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        index = interpreter.get_input_details()[0]["index"]
        if self._shapes.get(id(interpreter)) != x.shape:
            interpreter.resize_tensor_input(index, x.shape)
            interpreter.allocate_tensors()
            self._shapes[id(interpreter)] = x.shape
        interpreter.set_tensor(index, x)
        interpreter.invoke()
        out: npt.NDArray[np.float32] = np.array(
            interpreter.get_tensor(interpreter.get_output_details()[0]["index"]), np.float32
        )
        return out

    def embed(self, audio: npt.NDArray[np.int16]) -> npt.NDArray[np.float32]:
        """(batch, samples) int16 -> (batch, embeddings, 96): every embedding that fits, one per 80 ms.

        The melspectrogram floors its log at 80 dB below the loudest value of its whole input tensor (batch
        included), so each row gets its own call: a row's embeddings must not depend on its neighbours."""
        rows = np.ascontiguousarray(audio, dtype=np.float32)
        mel = np.concatenate([self._run(self._mel, rows[i : i + 1]) for i in range(len(rows))])
        mel = mel[:, 0] / 10.0 + 2.0
        starts = range(0, mel.shape[1] - EMBEDDING_FRAMES + 1, EMBEDDING_STEP)
        windows = np.stack([mel[:, s : s + EMBEDDING_FRAMES] for s in starts], axis=1)
        batch, count = windows.shape[:2]
        flat = windows.reshape(batch * count, EMBEDDING_FRAMES, mel.shape[2], 1).astype(np.float32)
        return self._run(self._embedding, flat).reshape(batch, count, EMBEDDING_DIM)

    def stream_embeddings(self, samples: npt.NDArray[np.int16]) -> npt.NDArray[np.float32]:
        """(embeddings, 96) of one recording: embedding t covers [1280 t, 1280 t + EMBEDDING_SPAN)."""
        if len(samples) < EMBEDDING_SPAN:
            samples = np.concatenate([np.zeros(EMBEDDING_SPAN - len(samples), np.int16), samples])
        embedded: npt.NDArray[np.float32] = self.embed(samples[None, :])[0]
        return embedded


def teacher_input(windows: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
    """(n, samples <= TEACHER_SAMPLES) -> (n, TEACHER_SAMPLES): zeros in front, the window at the end."""
    padded = np.zeros((len(windows), TEACHER_SAMPLES), np.int16)
    padded[:, TEACHER_SAMPLES - windows.shape[1] :] = windows
    return padded


_worker_embedding: SpeechEmbedding | None = None


def _embed_chunk(windows: npt.NDArray[np.int16]) -> tuple[npt.NDArray[np.float16], float]:
    global _worker_embedding  # noqa: PLW0603 - one pair of interpreters per worker process
    if _worker_embedding is None:
        _worker_embedding = SpeechEmbedding()
    started = time.process_time()
    padded = teacher_input(windows)
    # Small batches: measured 0.018 CPU-s per window at 1-4 windows a call, 0.039 at 100 (cache misses).
    embedded = np.concatenate(
        [_worker_embedding.embed(padded[i : i + SUB_BATCH]) for i in range(0, len(padded), SUB_BATCH)]
    )
    return embedded.astype(np.float16), time.process_time() - started


def embed_windows(
    audio: npt.NDArray[np.int16], key: str, workers: int = 2, cache_dir: Path = CACHE_DIR
) -> npt.NDArray[np.float16]:
    """(n, 16, 96) embeddings of the 1 s training windows ``audio`` (n, 16000), cached under ``key``; the
    CPU cost per second of audio is logged and stored next to the cache."""
    cache = cache_dir / f"oww-embeddings-{key}-v{EMBED_VERSION}.npy"
    if cache.exists():
        log.info("teacher embeddings from cache %s", cache.name)
        return np.asarray(np.load(cache))
    started = time.monotonic()
    chunks = [slice(i, min(i + CHUNK, len(audio))) for i in range(0, len(audio), CHUNK)]
    out = np.zeros((len(audio), HEAD_EMBEDDINGS, EMBEDDING_DIM), np.float16)
    cpu = 0.0
    # spawn: the parent has TensorFlow loaded, which must not be forked
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(_embed_chunk, np.asarray(audio[part])) for part in chunks]
        for part, future in progress(zip(chunks, futures, strict=True), total=len(chunks), desc="embed"):
            out[part], seconds = future.result()
            cpu += seconds
    wall = time.monotonic() - started
    audio_seconds = len(audio) * TEACHER_SAMPLES / SAMPLE_RATE
    cost = {"windows": len(audio), "audio_seconds_embedded": round(audio_seconds, 1),
            "cpu_seconds": round(cpu, 1), "wall_seconds": round(wall, 1), "workers": workers,
            "cpu_seconds_per_audio_second": round(cpu / max(audio_seconds, 1e-9), 5)}
    log.info("embedded %s", cost)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, out)
    cache.with_suffix(".json").write_text(json.dumps(cost, indent=2) + "\n", encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------------------ the head


@dataclass(frozen=True)
class HeadConfig:
    hidden: int = 64  # the non-linear head of the outside trial (logistic regression did no better than ours)
    dropout: float = 0.3
    epochs: int = 20
    batch_size: int = 256
    learning_rate: float = 1e-3
    label_smoothing: float = 0.05
    folds: int = 2


def build_head(config: HeadConfig) -> Any:
    tf = import_tf()
    inputs = tf.keras.Input((HEAD_EMBEDDINGS, EMBEDDING_DIM))
    x = tf.keras.layers.Flatten()(inputs)
    x = tf.keras.layers.Dense(config.hidden, activation="relu")(x)
    x = tf.keras.layers.Dropout(config.dropout)(x)
    logits = tf.keras.layers.Dense(len(LABELS))(x)
    return tf.keras.Model(inputs, logits)


def _fit_head(
    embeddings: npt.NDArray[np.float16], labels: npt.NDArray[np.int64], config: HeadConfig, seed: int
) -> Any:
    from training.train import class_weights

    tf = import_tf()
    tf.keras.utils.set_random_seed(seed)
    head = build_head(config)
    steps = int(np.ceil(len(labels) / config.batch_size)) * config.epochs
    schedule = tf.keras.optimizers.schedules.CosineDecay(config.learning_rate, steps, alpha=0.02)
    head.compile(
        optimizer=tf.keras.optimizers.Adam(schedule),
        loss=tf.keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=config.label_smoothing
        ),
    )
    targets = np.eye(len(LABELS), dtype=np.float32)[labels]
    head.fit(embeddings.astype(np.float32), targets, sample_weight=class_weights(labels),
             batch_size=config.batch_size, epochs=config.epochs, shuffle=True, verbose=0)
    return head


def fold_of(origins: npt.NDArray[np.str_], folds: int) -> npt.NDArray[np.int64]:
    """The cross-fitting fold of each window, by its file (augmented copies of a clip stay together)."""
    return np.array([int(stable_fraction(f"fold-{o}") * folds) for o in origins.astype(str)], np.int64)


def head_key(embedding_key: str, labels: npt.NDArray[np.int64], config: HeadConfig) -> str:
    digest = hashlib.sha256(f"{embedding_key}{EMBED_VERSION}{SEED}".encode())
    digest.update(labels.tobytes())
    digest.update(json.dumps(asdict(config), sort_keys=True).encode())
    return digest.hexdigest()[:12]


def train_teacher(  # noqa: PLR0917
    embeddings: npt.NDArray[np.float16],
    labels: npt.NDArray[np.int64],
    origins: npt.NDArray[np.str_],
    key: str,
    config: HeadConfig = HeadConfig(),
    cache_dir: Path = CACHE_DIR,
) -> tuple[Path, npt.NDArray[np.float32]]:
    """The head on every training window (saved as ``.npz``: HEAD_ARRAYS), and out-of-fold logits for
    every window (cached)."""
    tf = import_tf()
    name = head_key(key, labels, config)
    head_path, logits_cache = cache_dir / f"oww-head-{name}.npz", cache_dir / f"oww-oof-{name}.npy"
    if head_path.exists() and logits_cache.exists():
        cached: npt.NDArray[np.float32] = np.load(logits_cache)
        return head_path, cached
    started = time.monotonic()
    # The embedding's values are large (std ~17): without standardising them the head does not learn the
    # words at all (tried: 0 % on every command word).
    flat = embeddings.astype(np.float32).reshape(-1, EMBEDDING_DIM)
    mean, std = flat.mean(axis=0), flat.std(axis=0) + 1e-3
    del flat
    standardized = (embeddings.astype(np.float32) - mean) / std
    folds = fold_of(origins, config.folds)
    out_of_fold = np.zeros((len(labels), len(LABELS)), np.float32)
    for fold in range(config.folds):
        held = folds == fold
        fold_head = _fit_head(standardized[~held], labels[~held], config, SEED + fold)
        out_of_fold[held] = fold_head.predict(standardized[held], batch_size=2048, verbose=0)
        agreement = float((out_of_fold[held].argmax(axis=1) == labels[held]).mean())
        log.info("teacher fold %d: out-of-fold agreement with the labels %.3f", fold, agreement)
        tf.keras.backend.clear_session()
    head = _fit_head(standardized, labels, config, SEED)
    w1, b1, w2, b2 = (np.asarray(w, np.float32) for w in head.get_weights())
    head_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(head_path, mean=mean, std=std, w1=w1, b1=b1, w2=w2, b2=b2)
    np.save(logits_cache, out_of_fold)
    log.info("teacher head trained in %.0f s", time.monotonic() - started)
    return head_path, out_of_fold


# ---------------------------------------------------------------------------- the teacher on the new voices


HEAD_ARRAYS = ("mean", "std", "w1", "b1", "w2", "b2")


def load_head(path: Path) -> dict[str, npt.NDArray[np.float32]]:
    with np.load(path) as stored:
        return {name: np.asarray(stored[name], np.float32) for name in HEAD_ARRAYS}


def head_probabilities(head: dict[str, npt.NDArray[np.float32]], windows: npt.NDArray[Any]) -> Any:
    """(n, 16, 96) embeddings -> (n, 16) probabilities (numpy: thousands of short clips, no Keras
    call each)."""
    standardized = (windows.astype(np.float32) - head["mean"]) / head["std"]
    hidden = np.maximum(standardized.reshape(len(windows), -1) @ head["w1"] + head["b1"], 0.0)
    return soft_labels(hidden @ head["w2"] + head["b2"], 1.0)


TAIL_SAMPLES = SAMPLE_RATE // 2  # silence after a clip: the runtime's tail padding lets a word end
REFRACTORY_POSITIONS = round(1.0 * SAMPLE_RATE / EMBEDDING_HOP)


def clip_events(
    embedding: SpeechEmbedding, head: dict[str, npt.NDArray[np.float32]], samples: npt.NDArray[np.int16],
    threshold: float,
) -> list[str]:
    """Words the teacher fires on in a clip, streamed at 80 ms with 1 s of zeros before the clip and
    TAIL_SAMPLES after: a word fires when it is the top label at ``threshold`` or above, once per run of such
    positions and at most once per second (no smoothing)."""
    lead = np.zeros(TEACHER_SAMPLES - SAMPLE_RATE, np.int16)
    audio = np.concatenate([lead, samples, np.zeros(TAIL_SAMPLES, np.int16)])
    embedded = embedding.stream_embeddings(audio)
    count = len(embedded) - HEAD_EMBEDDINGS + 1
    if count <= 0:
        return []
    windows = np.stack([embedded[i : i + HEAD_EMBEDDINGS] for i in range(count)])
    probabilities = head_probabilities(head, windows)
    top = probabilities.argmax(axis=1)
    events: list[str] = []
    last: dict[int, int] = {}
    previous = -1
    for position, (label, p) in enumerate(zip(top, probabilities.max(axis=1), strict=True)):
        active = int(label) if p >= threshold and not LABELS[int(label)].startswith("_") else -1
        if active >= 0 and active != previous and position - last.get(active, -99) >= REFRACTORY_POSITIONS:
            events.append(LABELS[active])
            last[active] = position
        previous = active
    return events


def evaluate_new_voices(
    head_path: Path, data_dir: Path, synth_dir: Path | None, limit: int | None = None, threshold: float = 0.5
) -> dict[str, Any]:
    """The new-voices validation (training.newvoices' held-out sets and report layout) for the teacher,
    offline: each clip streamed through the embedding and the head (``clip_events``). Whole commands are
    not scored (the teacher has no voice pipeline)."""
    import soundfile as sf

    from agent.features import COMMAND_WORDS, WAKE_WORD
    from training import newvoices
    from training.data import inventory

    head = load_head(head_path)
    embedding = SpeechEmbedding()
    sets = newvoices.held_out_sets(inventory(data_dir, synth_dir, limit=limit))
    started, cpu = time.monotonic(), time.process_time()
    audio_seconds = 0.0

    def heard(clips: list[Any], desc: str) -> list[tuple[list[str], float]]:
        nonlocal audio_seconds
        out = []
        for clip in progress(clips, total=len(clips), desc=desc):
            data, rate = sf.read(clip.path, dtype="int16", always_2d=True)
            if rate != SAMPLE_RATE:
                raise ValueError(f"{clip.path}: {rate} Hz, expected {SAMPLE_RATE}")
            out.append((clip_events(embedding, head, data[:, 0], threshold), len(data) / SAMPLE_RATE))
            audio_seconds += len(data) / SAMPLE_RATE
        return out

    wake = {}
    for name, clips in sorted(sets["wake"].items()):
        results = heard(clips, f"teacher wake {name}")
        detected = sum(WAKE_WORD in words for words, _ in results)
        wake[name] = {"clips": len(clips), "detected": detected,
                      "detection_rate": round(detected / len(clips), 4) if clips else None}
    commands = {}
    for name, clips in sorted(sets["commands"].items()):
        results = heard(clips, f"teacher words {name}")
        per_word: dict[str, dict[str, Any]] = {}
        for clip, (words, _) in zip(clips, results, strict=True):
            entry = per_word.setdefault(clip.label, {"n": 0, "detected": 0})
            entry["n"] += 1
            entry["detected"] += clip.label in words
        for entry in per_word.values():
            entry["detection_rate"] = round(entry["detected"] / entry["n"], 4)
        rates = [per_word[w]["detection_rate"] for w in COMMAND_WORDS if w in per_word]
        commands[name] = {"clips": len(clips), "mean_detection_rate": round(float(np.mean(rates)), 4),
                          "per_word": {w: per_word[w] for w in COMMAND_WORDS if w in per_word}}
    negatives = {}
    for name, clips in sorted(sets["negatives"].items()):
        results = heard(clips, f"teacher negatives {name}")
        hours = sum(seconds for _, seconds in results) / 3600
        wakes = sum(words.count(WAKE_WORD) for words, _ in results)
        negatives[name] = {"clips": len(clips), "hours": round(hours, 4), "false_wakes": wakes,
                           "false_wakes_per_hour": round(wakes / hours, 2) if hours else None,
                           "any_word_detections": sum(len(words) for words, _ in results)}
    digest = hashlib.sha256(head_path.read_bytes()).hexdigest()
    report: dict[str, Any] = {
        "model": str(head_path), "sha256": digest, "size_bytes": head_path.stat().st_size,
        "thresholds": {WAKE_WORD: threshold}, "smoothing_seconds": 0.0, "wake_word": wake,
        "command_words": commands, "false_wakes": negatives, "whole_commands": {},
    }
    report["headline"] = newvoices.headline(report)
    cpu_seconds = time.process_time() - cpu
    report["cost"] = {"audio_seconds": round(audio_seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
                      "cpu_seconds_per_audio_second": round(cpu_seconds / max(audio_seconds, 1e-9), 4),
                      "wall_seconds": round(time.monotonic() - started, 1)}
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from training.common import SYNTH_DIR, speech_data_dir, write_json

    parser = argparse.ArgumentParser(
        prog="python -m training.oww_teacher",
        description="The speech-embedding teacher on the new-voices validation (offline; see the docstring).",
    )
    parser.add_argument("--head", type=Path, required=True, help=".cache/kws/oww-head-*.npz")
    parser.add_argument("--data", type=Path, default=None, help="default: $DATA_DIR or ../shared/data/speech")
    parser.add_argument("--synth", type=Path, default=SYNTH_DIR)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--ablation", type=Path, default=None,
                        help="store the report under --title in this JSON of reports "
                             "(models/kws_newvoices.json)")
    parser.add_argument("--title", default="speech-embedding teacher")
    parser.add_argument("--note", default="")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    data_dir = speech_data_dir(args.data)
    if data_dir is None:
        return 2
    report = evaluate_new_voices(args.head, data_dir, args.synth if args.synth.is_dir() else None,
                                 args.limit, args.threshold)
    if args.note:
        report["note"] = args.note
    if args.json is not None:
        write_json(args.json, report)
    if args.ablation is not None:
        stored = json.loads(args.ablation.read_text(encoding="utf-8")) if args.ablation.exists() else {}
        write_json(args.ablation, {**stored, args.title: report})
    print(json.dumps({"headline": report["headline"], "cost": report["cost"]}, indent=2), file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
