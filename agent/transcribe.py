"""``home-agent transcribe``: the daemon's streaming voice path, as fast as possible, over audio files.

Evaluation contract: with ``--json`` one line per file,
``{"file": ..., "detections": [{"word", "start", "end", "score"}], "intents": [{"action", "words", "time"}]}``
(times in seconds of audio from the start of the file). A detection's ``start``/``end`` are NOT the word's
own edges: they are the model window (``window_seconds`` of the model, 1 s) that ends where the smoothed
score first crossed the word's threshold (at most a few hops from the word's end), so the window holds
most of the word and some audio before it. An intent's ``time`` is when it was recognised, as in the
daemon. A file that cannot be read yields ``{"file": ..., "error": ...}`` and the run goes on; the exit
status is 1 when any file failed.

The model is loaded once; the pipeline is reset for each file and fed a little quiet padding after it, so a
word at the very end of a clip still passes through the window and the smoothing. Without ``--config`` the
shipped model and the default voice settings are used (no commands, so no intents).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.audio import FILE_SUFFIXES, FileSource
from agent.config import load_config
from agent.errors import AudioError
from agent.messages import Detection, Intent
from agent.progress import echo, progress
from agent.voice import VoicePipeline, load_pipeline

if TYPE_CHECKING:
    from agent.plots import PosteriorTrace  # matplotlib stays a lazy import

log = logging.getLogger(__name__)

READ_BLOCK_SECONDS = 1.0


@dataclass(slots=True)
class FileResult:
    file: str
    detections: list[Detection] = field(default_factory=list)
    intents: list[Intent] = field(default_factory=list)
    error: str | None = None
    duration: float = 0.0

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"file": self.file, "error": self.error}
        return {
            "file": self.file,
            "detections": [{"word": d.word, "start": d.start, "end": d.end, "score": d.score}
                           for d in self.detections],
            "intents": [{"action": i.action, "words": list(i.words), "time": round(i.t_audio, 3)}
                        for i in self.intents],
        }

    def to_text(self) -> str:
        if self.error is not None:
            return f"{self.file}: ERROR {self.error}"
        # start-end is the model window the word was heard in, not the word's own edges (module docstring).
        heard = ", ".join(f"{d.word} in {d.start:.2f}-{d.end:.2f}s ({d.score:.2f})" for d in self.detections)
        line = f"{self.file}: {heard or '(nothing)'}"
        if self.intents:
            line += " | intents: " + ", ".join(f"{i.action} ({' '.join(i.words)}) at {i.t_audio:.2f}s"
                                               for i in self.intents)
        return line


def audio_files(paths: Sequence[Path]) -> Iterator[Path]:
    """Files as given, and every .wav/.flac below given folders (sorted). Missing paths are yielded too, so
    the caller reports them."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)
        else:
            yield path


def transcribe_file(pipeline: VoicePipeline, path: Path) -> FileResult:
    """Run one file through the streaming path from a fresh state."""
    result = FileResult(file=str(path))
    pipeline.reset()
    source = FileSource(path, realtime=False, block_seconds=READ_BLOCK_SECONDS)
    try:
        with source:
            for chunk in source.chunks():
                output = pipeline.feed(chunk.samples)
                result.detections += output.detections
                result.intents += output.intents
    except AudioError as err:
        result.error = str(err)
        return result
    result.duration = pipeline.t_audio
    output = pipeline.finish()
    result.detections += output.detections
    result.intents += output.intents
    return result


def transcribe_traced(pipeline: VoicePipeline, path: Path) -> tuple[FileResult, PosteriorTrace]:
    """transcribe_file, recording every hop's smoothed scores as the recognizer judged them."""
    from agent.plots import PosteriorTrace

    trace = PosteriorTrace()
    pipeline.on_hop = trace
    try:
        return transcribe_file(pipeline, path), trace
    finally:
        pipeline.on_hop = None


def plot_file(pipeline: VoicePipeline, path: Path, out: Path) -> FileResult:
    """transcribe_traced, then draw what was heard into ``out``."""
    from agent.plots import write_transcription_plot

    result, trace = transcribe_traced(pipeline, path)
    if result.error is None:
        write_transcription_plot(out, path, trace, pipeline.settings.thresholds, result.intents)
    return result


def transcribe_main(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config is not None else None
    pipeline = load_pipeline(config)
    failures = 0
    files = 0
    paths = list(audio_files(args.paths))
    if args.plot is not None and len(paths) != 1:
        print(f"home-agent: --plot draws one file; {len(paths)} given", file=sys.stderr)
        return 2
    try:
        for path in progress(paths, desc="transcribe", unit="file"):
            result = transcribe_file(pipeline, path) if args.plot is None else \
                plot_file(pipeline, path, args.plot)
            files += 1
            if result.error is not None:
                failures += 1
            line = json.dumps(result.to_json(), separators=(",", ":")) if args.json else result.to_text()
            echo(line)
    except BrokenPipeError:  # the reader went away (| head): stop quietly, also at interpreter exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    if files == 0:
        print("home-agent: no .wav or .flac files found", file=sys.stderr)
        return 1
    if failures:
        print(f"home-agent: {failures} of {files} files could not be read", file=sys.stderr)
    return 1 if failures else 0
