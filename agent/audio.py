"""Audio sources behind one interface: microphone (sounddevice), WAV/FLAC file (soundfile), raw PCM on stdin.

Every source delivers :class:`~agent.messages.AudioChunk` records of 16 kHz mono int16, whatever the device or
file provides (other rates are resampled with :class:`Resampler`, channels are averaged).

- ``read(timeout)`` returns a chunk, or ``None`` when no audio arrived within ``timeout`` (not an error), and
  raises :class:`EndOfAudio` once a finite source (file, stdin) is exhausted and :class:`AudioError` when the
  source failed (missing or unplugged microphone, malformed file). End of stream and failure are never
  confused with "nothing yet". ``read(timeout, seconds=...)`` waits for that much audio instead of the
  source's usual block (the voice stage reads bigger blocks while no command is under way).
- The microphone's PortAudio callback only copies into a bounded :class:`RingBuffer`; when the reader falls
  behind, the oldest audio is dropped and counted (``stats()["dropped_samples"]``).
"""

from __future__ import annotations

import abc
import argparse
import logging
import math
import os
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from agent.config import AudioSection
from agent.errors import AudioError
from agent.features import INT16_SCALE
from agent.messages import AudioChunk

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
INT16_MAX = 32767
INT16_MIN = -32768
# The microphone counts as stalled (unplugged, driver hung) after this long without a single sample.
MIC_STALL_SECONDS = 2.0
FILE_SUFFIXES = (".wav", ".flac")
READ_AHEAD_SECONDS = 1.0  # a file source decodes this much at a time
# File sample rates outside this are refused: a header claiming 1 Hz would expand into hours of 16 kHz audio.
FILE_RATE_RANGE = (4000, 768_000)


class EndOfAudio(Exception):  # noqa: N818 - a control-flow signal like StopIteration, not an error
    """A finite source (file, stdin) has delivered all of its audio."""


# --------------------------------------------------------------------------------------------- resampling

# Blocks of up to 1 s of output (a file source decodes 1 s at a time) keep their gather and tap matrices
# (16 bytes per output and tap: up to 6 MB; a microphone's 0.1-0.5 s blocks keep up to 3 MB).
MAX_PLANNED_OUTPUTS = 16000


class Resampler:
    """Streaming polyphase resampler by a rational factor (Kaiser-windowed sinc low-pass).

    Feed blocks of float samples of any length; the output is the same as resampling the concatenation. The
    filter's delay (``taps_per_phase / 2`` input samples, under 1 ms) is not compensated.
    """

    def __init__(self, rate_in: int, rate_out: int = SAMPLE_RATE, taps_per_phase: int = 24) -> None:
        if rate_in <= 0 or rate_out <= 0:
            raise ValueError(f"sample rates must be positive, got {rate_in} -> {rate_out}")
        divisor = math.gcd(rate_in, rate_out)
        self.rate_in, self.rate_out = rate_in, rate_out
        self.up, self.down = rate_out // divisor, rate_in // divisor
        self.passthrough = self.up == self.down
        self._taps = taps_per_phase
        length = self.up * taps_per_phase
        # Cut-off a little below the lower Nyquist frequency, at the upsampled rate (cycles per sample).
        cutoff = 0.5 / max(self.up, self.down) * 0.92
        n = np.arange(length) - (length - 1) / 2.0
        prototype = 2 * cutoff * np.sinc(2 * cutoff * n) * np.kaiser(length, 8.0) * self.up
        # phases[p, k] = prototype[p + k * up]: the taps applied to x[i - k] for output phase p.
        self._phases = prototype.reshape(taps_per_phase, self.up).T.copy()
        self.reset()

    def reset(self) -> None:
        self._history = np.zeros(self._taps - 1)
        self._consumed = 0  # input samples seen before the history's end
        self._next_out = 0  # index of the next output sample
        # The (input index, taps) matrices of the last block: a steady stream of equal blocks (a microphone)
        # needs the same ones every block, up to where they start in the buffer.
        self._plan_key: tuple[int, int, int] | None = None
        self._plan: tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]] | None = None

    def _block_plan(self, count: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]:
        """For the next ``count`` outputs: the buffer index of every tap's input sample and the taps."""
        first_phase = self._next_out % self.up
        base = self._next_out * self.down // self.up - (self._consumed - (self._taps - 1))
        key = (first_phase, count, base)
        if key == self._plan_key and self._plan is not None:
            return self._plan
        m = self._next_out + np.arange(count)
        position = m * self.down
        phase = position % self.up
        newest = position // self.up - (self._consumed - (self._taps - 1))  # index into buffer
        gather = newest[:, None] - np.arange(self._taps)[None, :]
        plan = (gather, self._phases[phase])
        if count <= MAX_PLANNED_OUTPUTS:  # a longer block would keep too much memory
            self._plan_key, self._plan = key, plan
        return plan

    def process(self, block: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
        samples = np.asarray(block, dtype=np.float64)
        if self.passthrough:
            return samples
        buffer = np.concatenate([self._history, samples])
        total_in = self._consumed + len(samples)  # input samples seen so far
        # Output m needs input index floor(m * down / up) to exist.
        last_out = (total_in * self.up - 1) // self.down if total_in else -1
        count = max(0, last_out - self._next_out + 1)
        if count:
            gather, taps = self._block_plan(count)
            output: npt.NDArray[np.float64] = np.einsum("ij,ij->i", buffer[gather], taps)
            self._next_out += count
        else:
            output = np.zeros(0)
        self._history = buffer[len(buffer) - (self._taps - 1) :]
        self._consumed = total_in
        return output


def to_int16(samples: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.int16]:
    """Float samples in [-1, 1] to int16, clipping."""
    scaled = np.round(np.asarray(samples, dtype=np.float64) * INT16_SCALE)
    return np.clip(scaled, INT16_MIN, INT16_MAX).astype(np.int16)


def downmix(block: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """(frames, channels) or (frames,) to mono float64 in [-1, 1]."""
    array = np.asarray(block)
    scale = INT16_SCALE if array.dtype == np.int16 else 1.0
    mono: npt.NDArray[np.float64] = array.astype(np.float64) / scale
    return mono.mean(axis=1) if mono.ndim == 2 else mono


# --------------------------------------------------------------------------------------------- ring buffer


class RingBuffer:
    """Bounded, thread-safe int16 buffer between a producer (the PortAudio callback) and one reader.

    Writing never blocks: when full, the oldest samples are dropped and counted in ``dropped``."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._data = np.zeros(capacity, dtype=np.int16)
        self._start = 0
        self._size = 0
        self._cond = threading.Condition()
        self._wanted = 1  # what the waiting reader needs: the writer wakes it only then (not per block)
        self.dropped = 0
        self.written = 0
        self.last_write_mono = 0.0

    def __len__(self) -> int:
        with self._cond:
            return self._size

    def write(self, samples: npt.NDArray[np.int16], now: float) -> None:
        n = len(samples)
        if n == 0:
            return
        with self._cond:
            if n >= self.capacity:
                self.dropped += self._size + n - self.capacity
                samples = samples[n - self.capacity :]
                n = self.capacity
                self._start, self._size = 0, 0
            overflow = self._size + n - self.capacity
            if overflow > 0:
                self._start = (self._start + overflow) % self.capacity
                self._size -= overflow
                self.dropped += overflow
            end = (self._start + self._size) % self.capacity
            first = min(n, self.capacity - end)
            self._data[end : end + first] = samples[:first]
            self._data[: n - first] = samples[first:]
            self._size += n
            self.written += n
            self.last_write_mono = now
            if self._size >= self._wanted:
                self._cond.notify()

    def read(self, timeout: float, max_samples: int | None = None,
             min_samples: int = 1) -> npt.NDArray[np.int16] | None:
        """Everything buffered (up to ``max_samples``) once at least ``min_samples`` are there, waiting up to
        ``timeout``; after the timeout whatever there is; None if still empty."""
        with self._cond:
            self._wanted = max(1, min(min_samples, self.capacity))
            self._cond.wait_for(lambda: self._size >= self._wanted, timeout)
            self._wanted = 1
            if self._size == 0:
                return None
            count = self._size if max_samples is None else min(self._size, max_samples)
            first = min(count, self.capacity - self._start)
            out = np.concatenate([self._data[self._start : self._start + first], self._data[: count - first]])
            self._start = (self._start + count) % self.capacity
            self._size -= count
            return out


# --------------------------------------------------------------------------------------------- sources


class AudioSource(abc.ABC):
    """One audio input. Used from one thread (the voice stage's); ``close()`` may be called from another."""

    finite = False  # True for files and stdin: the stream ends (EndOfAudio)
    retry_on_error = False  # True for the microphone: reopen after a failure

    @property
    @abc.abstractmethod
    def description(self) -> str: ...

    @abc.abstractmethod
    def open(self) -> None:
        """Start delivering audio; AudioError (clear message) when the source cannot be opened."""

    @abc.abstractmethod
    def read(self, timeout: float, seconds: float | None = None) -> AudioChunk | None:
        """The next chunk; ``seconds``: wait for about that much audio (default: the source's block)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def stats(self) -> dict[str, int]:
        return {}

    def __enter__(self) -> AudioSource:
        self.open()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def import_sounddevice() -> Any:
    """The sounddevice module, or AudioError when PortAudio is not installed."""
    try:
        import sounddevice
    except OSError as err:
        raise AudioError(f"cannot use the microphone: {err} "
                         "(install PortAudio: apt install libportaudio2)") from err
    return sounddevice


def input_devices(sd: Any) -> list[tuple[int, dict[str, Any]]]:
    """(index, info) of every device with input channels."""
    try:
        devices = sd.query_devices()
    except sd.PortAudioError as err:
        raise AudioError(f"cannot list audio devices: {err}") from err
    return [(index, dict(info)) for index, info in enumerate(devices) if info["max_input_channels"] > 0]


def find_input_device(sd: Any, device: str | int | None) -> tuple[int, dict[str, Any]]:
    """Resolve ``[audio] device`` (index, case-insensitive name substring, or None for the default)."""
    inputs = input_devices(sd)
    available = "; ".join(f"{i}: {info['name']}" for i, info in inputs) or "none"
    if device is None:
        default = sd.default.device[0] if isinstance(sd.default.device, list | tuple) else sd.default.device
        for index, info in inputs:
            if index == default:
                return index, info
        if inputs:
            return inputs[0]
        raise AudioError(f"no audio input device found (input devices: {available})")
    if isinstance(device, int) or (isinstance(device, str) and device.isdigit()):
        wanted = int(device)
        for index, info in inputs:
            if index == wanted:
                return index, info
        raise AudioError(f"audio device {wanted} is not an input device (input devices: {available})")
    matches = [(index, info) for index, info in inputs if device.lower() in str(info["name"]).lower()]
    if not matches:
        raise AudioError(f"no audio input device matching {device!r} (input devices: {available})")
    if len(matches) > 1:
        log.info("several input devices match %r; using %d: %s", device, matches[0][0], matches[0][1]["name"])
    return matches[0]


class MicSource(AudioSource):
    """A microphone through PortAudio. The callback only copies into the ring buffer."""

    retry_on_error = True

    def __init__(self, device: str | int | None = None, buffer_seconds: float = 2.0,
                 block_seconds: float = 0.05, read_seconds: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.device = device
        self.buffer_seconds = buffer_seconds
        self.block_seconds = block_seconds
        self.read_seconds = read_seconds  # the reader wakes once per this much audio (one model hop)
        self._clock = clock
        self._sd: Any = None
        self._stream: Any = None
        self._ring: RingBuffer | None = None
        self._resampler: Resampler | None = None
        self._channels = 1
        self._rate = SAMPLE_RATE
        self._opened_mono = 0.0
        self._status_flags = 0
        self._dropped_before = 0  # drops (and captures) of the rings of previous opens
        self._captured_before = 0
        self._opens = 0
        self.device_name = "?"

    @property
    def description(self) -> str:
        return f"microphone {self.device_name!r}" if self._stream is not None else \
            f"microphone {self.device if self.device is not None else '(default)'}"

    def open(self) -> None:
        sd = self._sd = import_sounddevice()
        if self._opens:
            # PortAudio only sees devices plugged in after it was initialised once it is re-initialised.
            try:
                sd._terminate()
                sd._initialize()
            except sd.PortAudioError as err:
                raise AudioError(f"cannot re-initialise PortAudio: {err}") from err
        self._opens += 1
        index, info = find_input_device(sd, self.device)
        self.device_name = str(info["name"])
        rate, channels = self._choose_settings(sd, index, info)
        self._rate, self._channels = rate, channels
        self._resampler = Resampler(rate, SAMPLE_RATE) if rate != SAMPLE_RATE else None
        ring = RingBuffer(max(1, round(self.buffer_seconds * rate)) * channels)
        clock = self._clock

        def callback(indata: Any, _frames: int, _time: Any, status: Any) -> None:
            # PortAudio's thread: copy and return, nothing else (no logging, no locks held for long).
            ring.write(indata.reshape(-1), clock())
            if status:
                self._status_flags += 1

        try:
            stream = sd.InputStream(device=index, samplerate=rate, channels=channels, dtype="int16",
                                    blocksize=max(1, round(rate * self.block_seconds)), callback=callback)
            stream.start()
        except sd.PortAudioError as err:
            raise AudioError(f"cannot open microphone {self.device_name!r} at {rate} Hz: {err}") from err
        self._ring, self._stream = ring, stream
        self._opened_mono = self._clock()
        log.info("listening on microphone %d %r (%d Hz, %d channel%s%s)", index, self.device_name, rate,
                 channels, "" if channels == 1 else "s", ", resampled to 16 kHz" if self._resampler else "")

    @staticmethod
    def _choose_settings(sd: Any, index: int, info: dict[str, Any]) -> tuple[int, int]:
        """16 kHz mono when the device can; else its default rate (resampled) and/or more channels."""
        channel_options = [1] + ([2] if info["max_input_channels"] >= 2 else [])
        rate_options = [SAMPLE_RATE, round(float(info["default_samplerate"])), 48000, 44100]
        for channels in channel_options:
            for rate in dict.fromkeys(rate_options):
                try:
                    sd.check_input_settings(device=index, channels=channels, dtype="int16", samplerate=rate)
                except (sd.PortAudioError, ValueError):
                    continue
                return rate, channels
        raise AudioError(f"microphone {info['name']!r} supports none of the sample rates {rate_options} "
                         "with 16-bit samples")

    def read(self, timeout: float, seconds: float | None = None) -> AudioChunk | None:
        ring, stream = self._ring, self._stream
        if ring is None or stream is None:
            raise AudioError("microphone is not open")
        wanted = self.read_seconds if seconds is None else seconds
        data = ring.read(timeout, min_samples=max(1, round(self._rate * wanted)) * self._channels)
        if data is None:
            now = self._clock()
            last = ring.last_write_mono or self._opened_mono
            if not stream.active:
                raise AudioError(f"microphone {self.device_name!r} stopped (unplugged?)")
            if now - last > MIC_STALL_SECONDS:
                raise AudioError(f"no audio from microphone {self.device_name!r} for {now - last:.1f} s "
                                 "(unplugged or hung?)")
            return None
        t_mono = ring.last_write_mono
        if self._channels == 1 and self._resampler is None:
            samples = data
        else:
            mono = downmix(data.reshape(-1, self._channels))
            samples = to_int16(self._resampler.process(mono) if self._resampler else mono)
        if len(samples) == 0:
            return None
        return AudioChunk(samples=samples, sample_rate=SAMPLE_RATE, t_mono=t_mono)

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if self._ring is not None:
            self._dropped_before += self._ring.dropped
            self._captured_before += self._ring.written
            self._ring = None
        if stream is not None:
            try:
                stream.abort()
                stream.close()
            except self._sd.PortAudioError as err:  # an unplugged device may fail to close; it is gone anyway
                log.debug("closing the microphone stream: %s", err)

    def stats(self) -> dict[str, int]:
        ring = self._ring
        return {
            "captured_samples": self._captured_before + (ring.written if ring is not None else 0),
            "dropped_samples": self._dropped_before + (ring.dropped if ring is not None else 0),
            "status_flags": self._status_flags,
            "opens": self._opens,
        }


class FileSource(AudioSource):
    """A WAV or FLAC file (any rate, any channel count), at real-time pace or as fast as possible."""

    finite = True

    def __init__(self, path: Path | str, *, realtime: bool = False, block_seconds: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.realtime = realtime
        self.block_seconds = block_seconds
        self._clock = clock
        self._file: Any = None
        self._resampler: Resampler | None = None
        self._native = False
        self._frames_read = 0
        self._samples_out = 0
        self._ahead = np.zeros(0, dtype=np.int16)  # decoded 16 kHz samples not yet handed out
        self._exhausted = False
        self.frames = 0
        self.sample_rate = 0
        self.channels = 0
        self.started_mono: float | None = None  # when sample 0 counts as captured (real-time pace)

    @property
    def description(self) -> str:
        return f"file {self.path}"

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0

    def open(self) -> None:
        import soundfile

        if not self.path.is_file():
            raise AudioError(f"audio file not found: {self.path}")
        try:
            handle = soundfile.SoundFile(str(self.path))
        except (soundfile.SoundFileError, RuntimeError, TypeError) as err:
            raise AudioError(f"cannot read audio file {self.path}: {_libsndfile_message(err)}") from err
        self.frames, self.sample_rate, self.channels = handle.frames, handle.samplerate, handle.channels
        if not FILE_RATE_RANGE[0] <= self.sample_rate <= FILE_RATE_RANGE[1]:
            handle.close()
            raise AudioError(f"audio file {self.path} has an unsupported sample rate of {self.sample_rate} "
                             f"Hz (expected {FILE_RATE_RANGE[0]} to {FILE_RATE_RANGE[1]} Hz)")
        if self.frames <= 0:
            handle.close()
            raise AudioError(f"audio file {self.path} holds no audio (zero length)")
        declared = _declared_wav_frames(self.path, handle)
        if declared is not None and declared > self.frames:
            handle.close()
            raise AudioError(f"audio file {self.path} is truncated: its header promises {declared} frames, "
                             f"it holds {self.frames}")
        self._file = handle
        self._native = self.sample_rate == SAMPLE_RATE and self.channels == 1
        resample = self.sample_rate != SAMPLE_RATE
        self._resampler = Resampler(self.sample_rate, SAMPLE_RATE) if resample else None
        self._frames_read = 0
        self._samples_out = 0
        self._ahead = np.zeros(0, dtype=np.int16)
        self._exhausted = False
        self.started_mono = None

    def chunks(self) -> Iterator[AudioChunk]:
        """Every chunk of the open file in order, at the source's pace, until its end."""
        while True:
            try:
                chunk = self.read(timeout=1.0)
            except EndOfAudio:
                return
            if chunk is not None:
                yield chunk

    def read(self, timeout: float, seconds: float | None = None) -> AudioChunk | None:
        if self._file is None:
            raise AudioError(f"audio file {self.path} is not open")
        if self.realtime:
            now = self._clock()
            if self.started_mono is None:
                self.started_mono = now
            due = self.started_mono + self._samples_out / SAMPLE_RATE  # the previous block's end time
            if due > now:
                time.sleep(min(due - now, timeout))
                if self._clock() < due:
                    return None
        size = max(1, round(SAMPLE_RATE * (self.block_seconds if seconds is None else seconds)))
        while len(self._ahead) < size and not self._exhausted:
            self._decode_ahead()
        if len(self._ahead) == 0:
            raise EndOfAudio(str(self.path))
        samples, self._ahead = self._ahead[:size], self._ahead[size:]
        self._samples_out += len(samples)
        if self.realtime and self.started_mono is not None:
            t_mono = self.started_mono + self._samples_out / SAMPLE_RATE
        else:
            t_mono = self._clock()
        return AudioChunk(samples=samples, sample_rate=SAMPLE_RATE, t_mono=t_mono)

    def _decode_ahead(self) -> None:
        """Decode about a second of the file at once (one libsndfile call per second rather than per block:
        cheaper when real-time pacing leaves the CPU idle, and so cold, between blocks)."""
        import soundfile

        frames = max(1, round(self.sample_rate * max(self.block_seconds, READ_AHEAD_SECONDS)))
        try:
            data = self._file.read(frames, dtype="int16" if self._native else "float32", always_2d=False)
        except (soundfile.SoundFileError, RuntimeError) as err:
            raise AudioError(f"cannot decode audio file {self.path} after {self._frames_read} frames: "
                             f"{_libsndfile_message(err)} (truncated or corrupt?)") from err
        if len(data) == 0:
            if self._frames_read < self.frames:
                raise AudioError(f"audio file {self.path} ended after {self._frames_read} of {self.frames} "
                                 "frames (truncated?)")
            self._exhausted = True
            return
        self._frames_read += len(data)
        if self._native:
            samples: npt.NDArray[np.int16] = np.asarray(data, dtype=np.int16)
        else:
            mono = downmix(data)
            samples = to_int16(self._resampler.process(mono) if self._resampler else mono)
        self._ahead = np.concatenate([self._ahead, samples]) if len(self._ahead) else samples

    def close(self) -> None:
        handle, self._file = self._file, None
        if handle is not None:
            handle.close()


class StdinSource(AudioSource):
    """Raw 16 kHz mono S16_LE PCM from a pipe:
    ``arecord -r 16000 -f S16_LE -c 1 | home-agent run --audio stdin``.

    Read directly by the voice thread: when it falls behind, the pipe fills and the writer waits (the pipe is
    the bounded buffer; nothing is dropped here)."""

    finite = True

    def __init__(self, stream: IO[bytes] | None = None, block_seconds: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self.block_bytes = 2 * max(1, round(SAMPLE_RATE * block_seconds))
        self._clock = clock
        self._fd: int | None = None
        self._leftover = b""
        self.bytes_read = 0

    @property
    def description(self) -> str:
        return "raw S16_LE 16 kHz mono PCM on stdin"

    def open(self) -> None:
        stream = self._stream if self._stream is not None else sys.stdin.buffer
        try:
            self._fd = stream.fileno()
        except (OSError, ValueError, AttributeError) as err:
            raise AudioError(f"stdin is not readable: {err}") from err
        if os.isatty(self._fd):
            log.warning("stdin is a terminal: pipe raw 16 kHz S16_LE mono audio into home-agent")

    def read(self, timeout: float, seconds: float | None = None) -> AudioChunk | None:
        if self._fd is None:
            raise AudioError("stdin source is not open")
        size = self.block_bytes if seconds is None else 2 * max(1, round(SAMPLE_RATE * seconds))
        try:
            ready, _, _ = select.select([self._fd], [], [], timeout)
            if not ready:
                return None
            data = os.read(self._fd, size)
        except OSError as err:
            raise AudioError(f"cannot read audio from stdin: {err}") from err
        if not data:
            if self._leftover:
                log.warning("stdin ended in the middle of a sample (odd number of bytes); last byte ignored")
            raise EndOfAudio("stdin")
        self.bytes_read += len(data)
        data = self._leftover + data
        usable = len(data) - len(data) % 2
        self._leftover = data[usable:]
        if usable == 0:
            return None
        samples = np.frombuffer(data[:usable], dtype="<i2").astype(np.int16)
        return AudioChunk(samples=samples, sample_rate=SAMPLE_RATE, t_mono=self._clock())

    def close(self) -> None:
        self._fd = None


def _libsndfile_message(err: BaseException) -> str:
    text = str(err)
    # "Error opening '/path': Format not recognised." -> "Format not recognised."
    return text.split("': ", 1)[1] if "': " in text else text


def _declared_wav_frames(path: Path, handle: Any) -> int | None:
    """For a RIFF/WAVE file, how many frames its 'data' chunk header promises (None when not a plain WAV or
    the size is a streaming placeholder). libsndfile silently shortens truncated WAVs; this catches them."""
    if handle.format != "WAV":
        return None
    try:
        with path.open("rb") as raw:
            header = raw.read(12)
            if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
                return None
            block_align = None
            while True:
                chunk = raw.read(8)
                if len(chunk) < 8:
                    return None
                size = int.from_bytes(chunk[4:], "little")
                if chunk[:4] == b"fmt ":
                    fmt = raw.read(size + size % 2)
                    if len(fmt) >= 14:
                        block_align = int.from_bytes(fmt[12:14], "little")
                    continue
                if chunk[:4] == b"data":
                    if size in (0, 0xFFFFFFFF) or not block_align:
                        return None  # written by a streaming recorder that never patched the size
                    return size // block_align
                raw.seek(size + size % 2, os.SEEK_CUR)
    except OSError:
        return None


def create_source(spec: str, audio: AudioSection,
                  resolve: Callable[[Path], Path] | None = None) -> AudioSource:
    """The source named by ``[audio] source`` or ``run --audio``: "mic", "stdin" or "file:PATH"."""
    if spec == "mic":
        return MicSource(audio.device, audio.buffer_seconds)
    if spec == "stdin":
        return StdinSource()
    if spec.startswith("file:") and len(spec) > len("file:"):
        path = Path(spec[len("file:") :]).expanduser()
        if resolve is not None:
            path = resolve(path)
        return FileSource(path, realtime=audio.realtime)
    raise AudioError(f'unknown audio source {spec!r}: use "mic", "stdin" or "file:PATH"')


def read_audio_file(path: Path | str) -> npt.NDArray[np.int16]:
    """A whole file as 16 kHz mono int16 (through the same code as the file source)."""
    source = FileSource(path, realtime=False, block_seconds=1.0)
    with source:
        parts = [chunk.samples for chunk in source.chunks()]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)


def print_devices(_args: argparse.Namespace) -> int:
    """``home-agent devices``: the audio input devices, and which one is the default."""
    try:
        sd = import_sounddevice()
        inputs = input_devices(sd)
    except AudioError as err:
        print(f"home-agent: {err}", file=sys.stderr)
        return 1
    if not inputs:
        print("no audio input devices found (is a microphone plugged in? `arecord -l` lists capture devices)")
        return 0
    default = sd.default.device[0] if isinstance(sd.default.device, list | tuple) else sd.default.device
    hostapis = sd.query_hostapis()
    print("audio input devices ([audio] device = index or part of the name):")
    for index, info in inputs:
        marker = "*" if index == default else " "
        api = hostapis[info["hostapi"]]["name"] if 0 <= info["hostapi"] < len(hostapis) else "?"
        print(f"{marker} {index:3d}  {info['name']}  ({info['max_input_channels']} ch, "
              f"{float(info['default_samplerate']):.0f} Hz, {api})")
    return 0
