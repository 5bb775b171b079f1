"""Evaluate a keyword model on real recordings: per-word accuracy and confusion matrix, detection rate at the
shipped thresholds, false detections per hour on long negative speech and noise, size, MACs, invoke time.

    python -m training.evaluate --model models/kws.tflite --data DIR [--json] [--split validation|all]

DIR is laid out like ``../shared/data/speech`` (``real/<word>/*.flac``, ``real_long/``, ``noise/``).
``--split validation`` uses only speakers (and negative files) the training pipeline held out; ``all`` (the
default) uses every file. Accuracy is the argmax over all labels of one 1 s window per clip (the clip, or its
loudest second). Detections replay each file through the runtime's own streaming path,
:func:`agent.transcribe.transcribe_file` (what ``home-agent transcribe`` runs: StreamingFeatures, the model
every hop, agent.recognizer with the smoothing, thresholds and refractory time of the model metadata, the
tail padding), not a re-implementation. ``false_detections_per_hour`` counts wake-word detections (the
runtime acts on command words only after the wake word); every word's count is listed too. The headline
evaluation of voices never heard (issue 13) is ``training.newvoices``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.audio import to_int16
from agent.errors import ModelError
from agent.features import (
    COMMAND_WORDS,
    LABELS,
    NON_WORD_LABELS,
    WAKE_WORD,
    StreamingFeatures,
    window_features,
)
from agent.kws import KwsModel, model_hop_seconds
from agent.messages import Scores
from agent.plots import plot_path
from agent.progress import progress
from agent.recognizer import Recognizer, RecognizerSettings
from agent.transcribe import transcribe_file
from agent.voice import VoicePipeline, load_pipeline
from training.common import (
    SAMPLE_RATE,
    TEACHER_LABELS,
    TEACHER_TFLITE,
    read_audio,
    speech_data_dir,
    write_json,
)
from training.data import Clip, inventory, word_window

log = logging.getLogger(__name__)

TRAILING_SILENCE = SAMPLE_RATE // 2  # appended to word clips so the word can pass through the window


# ------------------------------------------- raw per-hop scores (choosing thresholds in training.kws only)


def stream_scores(
    model: KwsModel, samples: npt.NDArray[np.float32], hop_seconds: float
) -> npt.NDArray[np.float32]:
    """(hops, labels) probabilities: the model run every hop on the latest window, as the runtime does."""
    hop = round(hop_seconds * model.params.sample_rate)
    stream = StreamingFeatures(model.params)
    pcm = to_int16(samples)
    scores = []
    for start in range(0, len(pcm) - hop + 1, hop):
        stream.push(pcm[start : start + hop])
        scores.append(model.predict(stream.features()))
    return np.array(scores, dtype=np.float32).reshape(-1, len(model.labels))


def smooth(scores: npt.NDArray[np.float32], hops: int) -> npt.NDArray[np.float32]:
    """Causal moving mean over the last ``hops`` hops (fewer at the start)."""
    if hops <= 1 or len(scores) == 0:
        return scores
    cumulative = np.cumsum(np.vstack([np.zeros((1, scores.shape[1]), np.float64), scores]), axis=0)
    ends = np.arange(1, len(scores) + 1)
    starts = np.maximum(0, ends - hops)
    means: npt.NDArray[np.float32] = (
        (cumulative[ends] - cumulative[starts]) / (ends - starts)[:, None]
    ).astype(np.float32)
    return means


def timing(model: KwsModel) -> tuple[float, float, int]:
    hop_seconds = model_hop_seconds(model)  # as the runtime runs it
    smoothing_hops = max(1, round(model.smoothing_seconds / hop_seconds))
    return hop_seconds, model.refractory_seconds, smoothing_hops


def file_scores(model: KwsModel, path: Path, trailing: int = 0) -> npt.NDArray[np.float32]:
    """Raw per-hop scores of one file streamed through the model."""
    hop_seconds, _, _ = timing(model)
    samples = read_audio(path)
    if trailing:
        samples = np.concatenate([samples, np.zeros(trailing, np.float32)])
    return stream_scores(model, samples, hop_seconds)


def false_detections(pipeline: VoicePipeline, paths: list[Path]) -> dict[str, Any]:
    """Detections of every word on recordings that contain none of them, through the runtime's path."""
    counts = dict.fromkeys(pipeline.model.words, 0)
    seconds = 0.0
    cpu_seconds = 0.0
    for path in paths:
        cpu_started = time.process_time()
        result = transcribe_file(pipeline, path)
        cpu_seconds += time.process_time() - cpu_started
        if result.error is not None:
            raise ModelError(f"{path}: {result.error}")
        seconds += result.duration
        for detection in result.detections:
            counts[detection.word] += 1
    hours = seconds / 3600
    per_hour = {word: round(n / hours, 3) if hours else 0.0 for word, n in counts.items()}
    return {
        "hours": round(hours, 4),
        "files": len(paths),
        "counts": counts,
        "per_hour": per_hour,
        "wake_per_hour": per_hour.get(WAKE_WORD, 0.0),
        "any_word_per_hour": round(sum(counts.values()) / hours, 3) if hours else 0.0,
        # The whole streaming path as the runtime runs it (one thread), tail padding included.
        "cpu_seconds_per_audio_second": round(cpu_seconds / seconds, 5) if seconds else None,
    }


# ------------------------------------------------------------------------------------------- evaluation


def macs_of(path: Path) -> int:
    """Multiply-accumulates of one inference, from the .tflite graph (conv, depthwise, fully connected)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    shapes = {d["index"]: tuple(int(n) for n in d["shape"]) for d in interpreter.get_tensor_details()}
    total = 0
    for op in interpreter._get_ops_details():
        name = op["op_name"]
        if name not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            continue
        out_elements = int(np.prod(shapes[int(op["outputs"][0])]))
        kernel = shapes[int(op["inputs"][1])]
        if name == "CONV_2D":
            total += out_elements * kernel[1] * kernel[2] * kernel[3]
        elif name == "DEPTHWISE_CONV_2D":
            total += out_elements * kernel[1] * kernel[2]
        else:
            total += out_elements * kernel[1]
    return total


def median_invoke_ms(path: Path, repeats: int = 300) -> float:
    """Median time of one LiteRT invoke (one thread), as the runtime calls it."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    rng = np.random.default_rng(0)
    if np.issubdtype(detail["dtype"], np.integer):
        info = np.iinfo(detail["dtype"])
        sample = rng.integers(info.min, info.max, size=detail["shape"]).astype(detail["dtype"])
    else:
        sample = rng.normal(size=detail["shape"]).astype(detail["dtype"])
    interpreter.set_tensor(detail["index"], sample)
    for _ in range(20):
        interpreter.invoke()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 4)


def word_clips(clips: list[Clip], split: str) -> list[Clip]:
    return [c for c in clips if c.source == "real" and (split == "all" or c.split == "validation")]


def negative_files(clips: list[Clip], split: str) -> list[Path]:
    """Long negative speech and noise; for ``validation`` only files the training never used."""
    chosen = [c for c in clips if c.source in ("long", "noise") and (split == "all" or c.split != "train")]
    return [Path(c.path) for c in chosen]


def accuracy_report(
    true: npt.NDArray[np.int64], predicted: npt.NDArray[np.int64], labels: tuple[str, ...] = LABELS
) -> dict[str, Any]:
    per_word = {}
    for index, label in enumerate(labels):
        mask = true == index
        if mask.any():
            per_word[label] = {
                "accuracy": round(float((predicted[mask] == index).mean()), 4),
                "n": int(mask.sum()),
            }
    command = [per_word[w]["accuracy"] for w in COMMAND_WORDS if w in per_word]
    confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(confusion, (true, predicted), 1)
    return {
        "per_word": per_word,
        "mean_accuracy": round(float(np.mean(command)), 4) if command else None,
        "confusion": {"labels": list(labels), "matrix": confusion.tolist()},
    }


def evaluate(
    model_path: Path, data_dir: Path, split: str = "all", streaming: bool = True, limit: int | None = None
) -> dict[str, Any]:
    started = time.monotonic()
    pipeline = load_pipeline(None, model_path)
    model = pipeline.model
    clips = inventory(data_dir, synth_dir=None, limit=limit)
    words = word_clips(clips, split)
    label_index = {label: i for i, label in enumerate(model.labels)}
    true, predicted = [], []
    detected: dict[str, list[int]] = {}
    hop_seconds, _, _ = timing(model)
    for clip in words:
        if clip.label not in label_index:
            continue
        samples = read_audio(Path(clip.path))
        scores = model.predict(window_features(word_window(samples), model.params))
        true.append(label_index[clip.label])
        predicted.append(int(np.argmax(scores)))
        if streaming and clip.label not in NON_WORD_LABELS:
            fired = {d.word for d in transcribe_file(pipeline, Path(clip.path)).detections}
            detected.setdefault(clip.label, []).append(int(clip.label in fired))
    report = accuracy_report(np.array(true, np.int64), np.array(predicted, np.int64), model.labels)
    report["detection_rate"] = {w: round(float(np.mean(v)), 4) for w, v in detected.items()}
    negatives = negative_files(clips, split)
    fd = false_detections(pipeline, negatives) if streaming else {"wake_per_hour": None}
    report["false_detections_per_hour"] = fd["wake_per_hour"]
    report["false_detections"] = fd
    if split == "validation" and streaming:
        held_out = [Path(c.path) for c in clips if c.source in ("long", "noise") and c.split == "validation"]
        report["false_detections_held_out_only"] = false_detections(pipeline, held_out)
    report.update(
        {
            "model": str(model_path),
            "split": split,
            "size_bytes": model.size_bytes,
            "macs": macs_of(model_path),
            "median_invoke_ms": median_invoke_ms(model_path),
            "input_dtype": str(model.input_dtype),
            "stream_cpu_seconds_per_audio_second": fd.get("cpu_seconds_per_audio_second"),
            "thresholds": model.thresholds,
            "smoothing_seconds": model.smoothing_seconds,
            "refractory_seconds": model.refractory_seconds,
            "hop_seconds": hop_seconds,
            "seconds": round(time.monotonic() - started, 1),
        }
    )
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"model {report['model']} ({report['size_bytes']} bytes, {report['macs']:,} MACs, "
        f"median invoke {report['median_invoke_ms']} ms), split {report['split']}"
    ]
    lines.append(f"{'word':<12}{'acc':>8}{'n':>6}{'detect':>9}{'thresh':>8}")
    for word, item in report["per_word"].items():
        rate = report["detection_rate"].get(word)
        lines.append(
            f"{word:<12}{item['accuracy']:>8.3f}{item['n']:>6}"
            f"{'' if rate is None else f'{rate:.3f}':>9}{report['thresholds'].get(word, ''):>8}"
        )
    lines.append(f"mean accuracy over the ten command words: {report['mean_accuracy']}")
    fd = report["false_detections"]
    if fd.get("hours"):
        lines.append(
            f"false detections on {fd['hours']:.2f} h of negatives ({fd['files']} files): wake word "
            f"{fd['wake_per_hour']}/h, any word {fd['any_word_per_hour']}/h, counts {fd['counts']}"
        )
    labels = report["confusion"]["labels"]
    short = [label[:5] for label in labels]
    lines.append("confusion (rows: true, columns: predicted)")
    lines.append(" " * 10 + "".join(f"{s:>6}" for s in short))
    for label, row in zip(labels, report["confusion"]["matrix"], strict=True):
        if sum(row):
            lines.append(f"{label[:10]:<10}" + "".join(f"{n:>6}" for n in row))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/kws.tflite"))
    parser.add_argument("--data", type=Path, default=None, help="default: $DATA_DIR or ../shared/data/speech")
    parser.add_argument("--split", choices=("validation", "all"), default="all")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--no-streaming", action="store_true", help="skip detection rates and false detections"
    )
    parser.add_argument("--plot", type=plot_path, default=None, metavar="DIR",
                        help="also draw a DET curve per word and source into DIR (det_<word>.png, det.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    data_dir = speech_data_dir(args.data)
    if data_dir is None:
        return 2
    try:
        report = evaluate(args.model, data_dir, args.split, streaming=not args.no_streaming)
    except ModelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else format_report(report))
    if args.plot is not None:
        for path in write_det_plots(args.plot, args.model, data_dir, args.split):
            print(f"wrote {path}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------- DET curves

DET_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99)


@dataclass(frozen=True)
class Detection:
    word: str
    time: float  # seconds from the start of the file, at the end of the window that fired
    score: float


def detect(  # noqa: PLR0917
    scores: npt.NDArray[np.float32],
    labels: tuple[str, ...],
    thresholds: dict[str, float],
    refractory_seconds: float,
    hop_seconds: float,
    smoothing_seconds: float,
) -> list[Detection]:
    """Detections of the runtime's own recognizer (agent.recognizer) over per-hop model scores, at any
    thresholds (a DET curve sweeps them): the smoothed top label fires when it reaches its threshold, once
    per utterance and refractory time."""
    recognizer = Recognizer(
        RecognizerSettings(
            labels=labels,
            thresholds=thresholds,
            smoothing_seconds=smoothing_seconds,
            refractory_seconds=refractory_seconds,
        )
    )
    detections: list[Detection] = []
    for hop_index, row in enumerate(scores):
        now = round((hop_index + 1) * hop_seconds, 6)
        heard = recognizer.process(Scores(labels=labels, values=row, t_audio=now))
        if heard is not None:
            detections.append(Detection(heard.word, now, heard.score))
    return detections


def clip_source(path: Path) -> str:
    """The corpus a clip comes from: its file-name prefix (``sc``: Speech Commands, ``pvwwb``: Picovoice
    wake-word benchmark, ``precise``: Mycroft Precise)."""
    return path.name.split("_", 1)[0]


def _fires(model: KwsModel, scores: npt.NDArray[np.float32], word: str, threshold: float) -> int:
    """How often ``word`` fires at ``threshold`` (every other word at its shipped threshold), as ``detect``
    over all of ``scores`` counts it. Only the stretches where its smoothed score reaches the threshold are
    replayed, each from far enough before for the smoothing to fill and any refractory time or disarming to
    end: elsewhere it cannot fire. Firings in that lead-in come from its partly filled smoothing: dropped."""
    hop_seconds, refractory, smoothing_hops = timing(model)
    above = smooth(scores, smoothing_hops)[:, model.labels.index(word)] >= threshold
    if not above.any():
        return 0
    pad = smoothing_hops + round(refractory / hop_seconds) + 1
    hits = np.flatnonzero(above)
    breaks = np.flatnonzero(np.diff(hits) > 2 * pad)
    thresholds = {**model.thresholds, word: threshold}
    fired = 0
    for first, last in zip(np.r_[hits[0], hits[breaks + 1]], np.r_[hits[breaks], hits[-1]], strict=True):
        start = max(0, int(first) - pad - smoothing_hops)
        heard = detect(scores[start : last + 1], model.labels, thresholds, refractory, hop_seconds,
                       model.smoothing_seconds)
        fired += sum(d.word == word and round(d.time / hop_seconds) - 1 >= first - start for d in heard)
    return fired


def det_curves(model_path: Path, data_dir: Path, split: str = "all", limit: int | None = None
               ) -> tuple[dict[str, list[Any]], float]:
    """(curves, hours of negatives): per vocabulary word with real clips, one DetCurve per source: at each of
    DET_THRESHOLDS and the shipped threshold, the share of the source's clips of the word it missed
    (streamed as in ``evaluate``) and its false detections per hour of the negatives."""
    from agent.plots import DetCurve

    model = KwsModel.load(model_path)
    hop_seconds, _, _ = timing(model)
    clips = inventory(data_dir, synth_dir=None, limit=limit)
    negatives = [file_scores(model, path) for path in progress(negative_files(clips, split), desc="negatives",
                                                                 unit="file")]
    hours = sum(len(s) for s in negatives) * hop_seconds / 3600
    positives: dict[str, dict[str, list[npt.NDArray[np.float32]]]] = {}
    for clip in progress(word_clips(clips, split), desc="word clips", unit="clip"):
        if clip.label in model.words:
            scores = file_scores(model, Path(clip.path), TRAILING_SILENCE)
            positives.setdefault(clip.label, {}).setdefault(clip_source(Path(clip.path)), []).append(scores)
    curves: dict[str, list[Any]] = {}
    for word, by_source in progress(sorted(positives.items()), desc="DET", unit="word"):
        grid = sorted({*DET_THRESHOLDS, model.thresholds[word]})
        false = [sum(_fires(model, s, word, t) for s in negatives) / hours if hours else 0.0 for t in grid]
        curves[word] = [
            DetCurve(source, grid, [float(np.mean([_fires(model, s, word, t) == 0 for s in clip_scores]))
                                    for t in grid], false)
            for source, clip_scores in sorted(by_source.items())
        ]
    return curves, hours


def peer_model(model: KwsModel, peer: Path, labels: tuple[str, ...], folder: Path) -> Path:
    """A copy of a peer's .tflite in ``folder`` with metadata for our streaming path: its labels; our
    features, smoothing, refractory time and (for the words it shares) thresholds."""
    import hashlib

    data = peer.read_bytes()
    target = folder / peer.name
    target.write_bytes(data)
    write_json(target.with_suffix(".json"), {
        **model.metadata, "labels": list(labels), "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data), "thresholds": {w: t for w, t in model.thresholds.items() if w in labels}})
    return target


def write_det_plots(out_dir: Path, model_path: Path, data_dir: Path, split: str, limit: int | None = None
                    ) -> list[Path]:
    """det_<word>.png per word and det.json with the numbers drawn. The MLPerf Tiny reference model (the
    ten command words), when present, is replayed through the same path and drawn as peer points."""
    import tempfile

    from agent.plots import write_det_plot

    model = KwsModel.load(model_path)
    curves, hours = det_curves(model_path, data_dir, split, limit)
    peers: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]] = {}
    if TEACHER_TFLITE.exists():
        with tempfile.TemporaryDirectory() as scratch:
            reference, _ = det_curves(peer_model(model, TEACHER_TFLITE, TEACHER_LABELS, Path(scratch)),
                                      data_dir, split, limit)
        for word, word_curves in reference.items():
            peers[word] = {f"MLPerf Tiny reference, {c.source}": (c.false_per_hour, c.miss_rate)
                           for c in word_curves}
    title = f"({split} clips; {hours:.2f} h of negatives)"
    written = [write_det_plot(out_dir / f"det_{word}.png", word, word_curves, shipped=model.thresholds[word],
                              peers=peers.get(word), title=f"'{word}' {title}")
               for word, word_curves in curves.items()]
    write_json(out_dir / "det.json", {
        "negative_hours": round(hours, 4),
        "curves": {word: [asdict(curve) for curve in word_curves] for word, word_curves in curves.items()},
        "peers": peers,
    })
    return written


if __name__ == "__main__":
    sys.exit(main())
