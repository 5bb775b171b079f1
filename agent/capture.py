"""Opt-in capture of the audio around each wake word (``[voice] capture = true``; off by default).

After every wake word the voice stage keeps the BEFORE_SECONDS before it and the command window
(``[voice] wake_window``) after it, as a 16 kHz mono WAV in ``<state_dir>/captures/`` (folder mode 0700, files
0600). At most ``capture_max_files`` files and ``capture_max_mb`` megabytes are kept; the oldest go first.
Captures never leave the machine: nothing in home-agent uploads them or publishes their audio. They are for
one use: telling the agent that a wake was false (the Home Assistant button, the MQTT command topic, or a
spoken "no" right after the wake; :mod:`agent.false_wake`), which learns the capture as a not-word exactly
like ``home-agent enroll --not-word``. A marked capture is renamed ``*.false.wav``; ``enroll --list`` shows
them all.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from agent.adaptation_store import write_atomically
from agent.audio import SAMPLE_RATE
from agent.config import Config
from agent.counts import Counts
from agent.errors import StateError
from agent.recognizer import NO_WORD, PipelineOutput

log = logging.getLogger(__name__)

CAPTURE_DIR = "captures"
BEFORE_SECONDS = 2.0  # of audio kept before the end of the wake word
WAV_SUFFIX = ".wav"
FALSE_SUFFIX = ".false.wav"  # a capture marked as a false wake (learned as a not-word)


@dataclass(frozen=True)
class Capture:
    path: Path
    seconds: float
    size: int  # bytes
    marked: bool  # learned as a false wake


class CaptureStore:
    """``<state_dir>/captures``: one WAV per wake, named by time so that names sort oldest first."""

    def __init__(self, directory: Path, *, max_files: int, max_bytes: int) -> None:
        self.directory = directory
        self.max_files = max_files
        self.max_bytes = max_bytes
        self._sequence = 0

    @classmethod
    def of(cls, config: Config) -> CaptureStore:
        voice = config.voice
        return cls(config.agent.resolved_state_dir / CAPTURE_DIR, max_files=voice.capture_max_files,
                   max_bytes=round(voice.capture_max_mb * 1_000_000))

    def list(self) -> list[Capture]:
        if not self.directory.is_dir():
            return []
        result = []
        for path in sorted(self.directory.glob("*" + WAV_SUFFIX)):
            size = path.stat().st_size
            result.append(Capture(path, max(0, size - 44) / (2 * SAMPLE_RATE), size,
                                  path.name.endswith(FALSE_SUFFIX)))
        return result

    def latest_unmarked(self) -> Path | None:
        unmarked = [capture.path for capture in self.list() if not capture.marked]
        return unmarked[-1] if unmarked else None

    def save(self, samples: npt.NDArray[np.int16]) -> Path:
        """Write one capture (mode 0600, through a temporary file), then drop the oldest beyond the bounds.
        StateError when the folder cannot be written."""
        import soundfile

        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime())
        while True:  # unique also against an earlier run's captures of the same second
            self._sequence += 1
            name = f"{stamp}-{self._sequence % 1000:03d}{WAV_SUFFIX}"
            path = self.directory / name
            if not path.exists() and not path.with_name(name[: -len(WAV_SUFFIX)] + FALSE_SUFFIX).exists():
                break
        buffer = io.BytesIO()  # encoded first: a failure of soundfile leaves nothing on disk
        soundfile.write(buffer, samples, SAMPLE_RATE, format="WAV", subtype="PCM_16")
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise StateError(f"cannot write the capture {path}: {err.strerror or err}") from err
        write_atomically(path, lambda handle: handle.write(buffer.getvalue()))
        self._prune()
        return path

    def _prune(self) -> None:
        captures = self.list()
        total = sum(capture.size for capture in captures)
        while captures and (len(captures) > self.max_files or total > self.max_bytes):
            oldest = captures.pop(0)
            total -= oldest.size
            try:
                oldest.path.unlink()
            except OSError as err:
                raise StateError(f"cannot remove the old capture {oldest.path}: {err.strerror or err}") \
                    from err

    def mark(self, path: Path) -> Path:
        """Rename a capture to ``*.false.wav`` once it was learned as a false wake."""
        marked = path.with_name(path.name[: -len(WAV_SUFFIX)] + FALSE_SUFFIX)
        try:
            path.replace(marked)
        except OSError as err:
            raise StateError(f"cannot mark the capture {path}: {err.strerror or err}") from err
        return marked


@dataclass
class _Pending:
    start: int  # absolute sample positions (since the capture started hearing)
    end: int
    wake_time: float  # the wake word's end, in the pipeline's audio time
    path: Path | None = None
    false: bool = False  # a spoken "no" came before the capture was written


class WakeCapture:
    """Runs on the voice thread, after each block the pipeline was fed. Keeps the recent audio in a ring;
    after each wake word, once the command window has passed, writes the capture. A "no" heard within
    ``confirm_seconds`` of a wake that started no command calls ``on_false_wake`` with that wake's capture."""

    def __init__(self, store: CaptureStore, *, wake_word: str, window_seconds: float, confirm_seconds: float,
                 on_false_wake: Callable[[Path], None]) -> None:
        self.store = store
        self.wake_word = wake_word
        self.before = round(BEFORE_SECONDS * SAMPLE_RATE)
        self.after = round(window_seconds * SAMPLE_RATE)
        self.confirm_seconds = confirm_seconds
        self.on_false_wake = on_false_wake
        self._ring = np.zeros(self.before + self.after + SAMPLE_RATE, np.int16)
        self._heard = 0  # samples written into the ring, ever
        self._pending: list[_Pending] = []
        self._last_wake: _Pending | None = None  # the latest wake no command followed yet
        self._counts = Counts("captures", "capture_failures")

    def stats(self) -> dict[str, int]:
        """The counters (read by diagnostics on another thread than the voice thread that adds to them)."""
        return self._counts.snapshot()

    def hear(self, samples: npt.NDArray[np.int16], output: PipelineOutput, t_audio: float) -> None:
        """``samples``: the block just fed; ``output``: what the pipeline made of it; ``t_audio``: the
        pipeline's audio time after it."""
        self._append(samples)
        for event in output.events:
            if event.kind in ("intent", "confirm_pending"):  # a command followed: a "no" now is an answer
                self._last_wake = None
        for detection in output.detections:
            if detection.word == self.wake_word:
                end = self._heard - round(max(0.0, t_audio - detection.end) * SAMPLE_RATE)
                pending = _Pending(max(0, end - self.before), end + self.after, detection.end)
                self._pending.append(pending)
                self._last_wake = pending
            elif detection.word == NO_WORD and self._last_wake is not None and \
                    detection.end - self._last_wake.wake_time <= self.confirm_seconds:
                wake, self._last_wake = self._last_wake, None
                log.info('voice: "no" right after the wake word: the wake was false')
                if wake.path is not None:
                    self.on_false_wake(wake.path)
                else:
                    wake.false = True
        self._write_due(final=False)

    def finish(self) -> None:
        """End of the stream: write what there is of the pending captures."""
        self._write_due(final=True)
        self._last_wake = None

    def _append(self, samples: npt.NDArray[np.int16]) -> None:
        size = len(self._ring)
        samples = samples[-size:]
        position = self._heard % size
        first = min(len(samples), size - position)
        self._ring[position : position + first] = samples[:first]
        self._ring[: len(samples) - first] = samples[first:]
        self._heard += len(samples)

    def _slice(self, start: int, end: int) -> npt.NDArray[np.int16]:
        size = len(self._ring)
        start = max(start, self._heard - size)
        end = min(end, self._heard)
        indices = np.arange(start, end) % size
        return self._ring[indices].copy()

    def _write_due(self, *, final: bool) -> None:
        keep = []
        for pending in self._pending:
            if not final and self._heard < pending.end:
                keep.append(pending)
                continue
            try:
                pending.path = self.store.save(self._slice(pending.start, pending.end))
            except StateError as err:
                self._counts.add("capture_failures")
                log.error("voice: capture not kept: %s", err)
                continue
            self._counts.add("captures")
            log.info("voice: kept the audio around the wake word in %s", pending.path)
            if pending.false:
                self.on_false_wake(pending.path)
        self._pending = keep
