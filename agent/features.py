"""MFCC features shared by training and runtime: one frozen parameter set, a whole-window extractor and a
streaming extractor that computes only the new frames per push.

The default recipe reproduces the MFCC front end of the MLPerf Tiny DS-CNN keyword model (our teacher), with
python_speech_features' framing and magnitude spectrum (re-done here in numpy, bit-identical, golden-tested:
that package is an sdist needing scipy, ~120 MB on a Pi, for a DCT we compute ourselves): frames of 480
samples every 320 samples with a periodic Hann window, |rfft| with n=512, 40 HTK-mel bands 20-4000 Hz,
``log(x + 1e-6)``, DCT-II scaled by ``1/sqrt(2*40)``, the first 10 coefficients, 49 frames per 1 s window,
and peak normalisation of the window.

Peak normalisation is applied to the mel energies (``mel(x/p) == mel(x)/p``), so the streaming extractor keeps
the un-normalised per-frame mel energies and per-hop peaks and redoes only ``log`` and the DCT per call; this
keeps streaming output bit-identical to :func:`window_features` of the same window.

The streaming path runs every 100 ms on a CPU that idles in between, so each call runs cold: it keeps its
history in preallocated buffers (:class:`RowHistory`) and uses few numpy calls per push.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt

INT16_SCALE = 32768.0
FILTERBANKS = ("tf_htk", "psf")
# Pushes of up to this many frames (a streaming hop is 5) are framed by one gather of cached indices; longer
# blocks (a whole window or file) by a strided view, so the cached indices stay small (under 0.6 MB).
MAX_GATHERED_FRAMES = 16

# The shipped keyword model's labels (a contract with the runtime and the config); the model metadata repeats
# them and is what the runtime trusts.
WAKE_WORD = "computer"
COMMAND_WORDS = ("on", "off", "up", "down", "stop", "go", "yes", "no", "left", "right")
DEVICE_WORDS = ("light", "heat", "fan")
SILENCE_LABEL = "_silence_"
UNKNOWN_LABEL = "_unknown_"
LABELS = (WAKE_WORD, *COMMAND_WORDS, *DEVICE_WORDS, SILENCE_LABEL, UNKNOWN_LABEL)
NON_WORD_LABELS = (SILENCE_LABEL, UNKNOWN_LABEL)  # the labels that are not words


@dataclass(frozen=True)
class FeatureParams:
    """Every parameter of the feature front end; stored in the model metadata and checked on load."""

    sample_rate: int = 16000
    window_seconds: float = 1.0
    frame_samples: int = 480
    hop_samples: int = 320
    fft_size: int = 512
    num_mel_bands: int = 40
    lower_hz: float = 20.0
    upper_hz: float = 4000.0
    # "tf_htk": the HTK-mel triangles of tf.signal.linear_to_mel_weight_matrix (what the teacher used);
    # "psf": the triangles of python_speech_features.get_filterbanks (re-done in _psf_filterbank).
    filterbank: str = "tf_htk"
    log_offset: float = 1e-6
    num_coefficients: int = 10
    # Divide by the window's absolute peak (as the teacher's training did); the floor keeps digital silence
    # and very faint hiss from being blown up to full scale.
    peak_normalize: bool = True
    min_peak: float = 1e-3

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.sample_rate <= 0:
            problems.append("sample_rate must be positive")
        if self.frame_samples <= 0 or self.hop_samples <= 0:
            problems.append("frame_samples and hop_samples must be positive")
        if self.frame_samples < self.hop_samples:
            problems.append("frame_samples must be at least hop_samples")
        if self.frame_samples > self.fft_size:
            problems.append("frame_samples must not exceed fft_size (the FFT would truncate frames)")
        if self.window_samples < self.frame_samples:
            problems.append("the window must hold at least one frame")
        elif self.window_samples % self.hop_samples != 0:
            problems.append("window samples must be a multiple of hop_samples (streaming alignment)")
        if not 0 <= self.lower_hz < self.upper_hz <= self.sample_rate / 2:
            problems.append("need 0 <= lower_hz < upper_hz <= sample_rate/2")
        if self.filterbank not in FILTERBANKS:
            problems.append(f"filterbank must be one of {FILTERBANKS}")
        if not 0 < self.num_coefficients <= self.num_mel_bands:
            problems.append("need 0 < num_coefficients <= num_mel_bands")
        if self.log_offset <= 0 or self.min_peak <= 0:
            problems.append("log_offset and min_peak must be positive")
        if problems:
            raise ValueError("invalid feature parameters: " + "; ".join(problems))

    @property
    def window_samples(self) -> int:
        return round(self.sample_rate * self.window_seconds)

    @property
    def num_frames(self) -> int:
        return 1 + (self.window_samples - self.frame_samples) // self.hop_samples

    @property
    def num_features(self) -> int:
        return self.num_coefficients

    @property
    def hop_seconds(self) -> float:
        return self.hop_samples / self.sample_rate

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_frames, self.num_features)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureParams:
        """Build from metadata. Unknown or missing keys are errors: a silent default could mismatch."""
        names = {field.name for field in fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(names - set(data))
        if unknown or missing:
            raise ValueError(f"feature parameters: unknown keys {unknown}, missing keys {missing}")
        return cls(**data)


@functools.lru_cache(maxsize=8)
def _hann_periodic(length: int) -> npt.NDArray[np.float64]:
    window: npt.NDArray[np.float64] = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(length) / length)
    window.setflags(write=False)
    return window


def _psf_filterbank(params: FeatureParams) -> npt.NDArray[np.float64]:
    """(num_mel_bands, fft_size//2+1): python_speech_features.get_filterbanks, the same operations in the same
    order (its triangles sit on floored FFT bins of 2595*log10 mels)."""
    low_mel = 2595 * np.log10(1 + params.lower_hz / 700.0)
    high_mel = 2595 * np.log10(1 + params.upper_hz / 700.0)
    mel_points = np.linspace(low_mel, high_mel, params.num_mel_bands + 2)
    edges = np.floor((params.fft_size + 1) * (700 * (10 ** (mel_points / 2595.0) - 1)) / params.sample_rate)
    bank = np.zeros([params.num_mel_bands, params.fft_size // 2 + 1])
    for j in range(params.num_mel_bands):
        for i in range(int(edges[j]), int(edges[j + 1])):
            bank[j, i] = (i - edges[j]) / (edges[j + 1] - edges[j])
        for i in range(int(edges[j + 1]), int(edges[j + 2])):
            bank[j, i] = (edges[j + 2] - i) / (edges[j + 2] - edges[j + 1])
    return bank


@functools.lru_cache(maxsize=8)
def _mel_matrix(params: FeatureParams) -> npt.NDArray[np.float64]:
    """(fft_size//2+1, num_mel_bands) weights, built once per parameter set."""
    num_bins = params.fft_size // 2 + 1
    if params.filterbank == "psf":
        matrix = np.ascontiguousarray(_psf_filterbank(params).T)
    else:

        def hz_to_mel(hz: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
            mel: npt.NDArray[np.float64] = 1127.0 * np.log1p(hz / 700.0)
            return mel

        # Same construction as tf.signal.linear_to_mel_weight_matrix (the DC bin gets no weight).
        bin_mel = hz_to_mel(np.linspace(0.0, params.sample_rate / 2.0, num_bins)[1:])[:, None]
        edges = np.linspace(
            float(hz_to_mel(np.array(params.lower_hz))),
            float(hz_to_mel(np.array(params.upper_hz))),
            params.num_mel_bands + 2,
        )
        lower, center, upper = edges[:-2][None, :], edges[1:-1][None, :], edges[2:][None, :]
        rising = (bin_mel - lower) / (center - lower)
        falling = (upper - bin_mel) / (upper - center)
        weights = np.maximum(0.0, np.minimum(rising, falling))
        matrix = np.concatenate([np.zeros((1, params.num_mel_bands)), weights], axis=0)
    matrix.setflags(write=False)
    return matrix


@functools.lru_cache(maxsize=8)
def _dct_matrix(params: FeatureParams) -> npt.NDArray[np.float64]:
    """DCT-II as tf.signal.mfccs_from_log_mel_spectrograms computes it: 2*sum(x cos(...)) / sqrt(2N)."""
    bands = params.num_mel_bands
    n = np.arange(bands)[:, None]
    k = np.arange(params.num_coefficients)[None, :]
    matrix: npt.NDArray[np.float64] = (
        2.0 * np.cos(np.pi * k * (2 * n + 1) / (2 * bands)) / np.sqrt(2.0 * bands)
    )
    matrix.setflags(write=False)
    return matrix


def to_float(samples: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """int16 PCM or float in [-1, 1] as a 1-D float64 array."""
    array = _mono(samples)
    scaled: npt.NDArray[np.float64] = np.empty(len(array))
    _to_float_into(array, scaled)
    return scaled


def _mono(samples: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``samples`` as a 1-D int16 or float array (ValueError otherwise)."""
    array = np.asarray(samples)
    if array.ndim != 1:
        raise ValueError(f"expected 1-D mono samples, got shape {array.shape}")
    if array.dtype != np.int16 and not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"expected int16 or float samples, got {array.dtype}")
    return array


def _to_float_into(array: npt.NDArray[Any], out: npt.NDArray[np.float64]) -> None:
    """What ``to_float`` returns, written into ``out`` (same length) without allocating."""
    if array.dtype == np.int16:
        np.divide(array, INT16_SCALE, out=out)
    else:
        np.copyto(out, array)


class _FrontEnd:
    """The constants of one parameter set (window, frame indices, mel and DCT matrices), looked up once:
    the streaming path runs every hop, cold."""

    def __init__(self, params: FeatureParams) -> None:
        self.params = params
        self.hann = _hann_periodic(params.frame_samples)
        # The bins above the top band's upper edge (upper_hz) have no weight in any band: the spectrum is cut
        # after the last weighted bin (128 of 257 at 4 kHz of 8), which halves the magnitude and mel work and
        # leaves every sum the same (only trailing zero products go).
        full = _mel_matrix(params)
        self.spectrum_bins = int(np.flatnonzero(full.any(axis=1))[-1]) + 1
        self.mel_matrix = full[: self.spectrum_bins]
        self.dct_matrix = _dct_matrix(params)
        self._frame_indices: dict[int, npt.NDArray[np.intp]] = {}

    def frames(self, segment: npt.NDArray[np.float64], count: int) -> npt.NDArray[np.float64]:
        """The first ``count`` frames of ``segment``, windowed: (count, frame_samples), a new array."""
        params = self.params
        if count > MAX_GATHERED_FRAMES:  # a long block (a whole file pushed at once): a strided view
            view = np.lib.stride_tricks.sliding_window_view(segment, params.frame_samples)
            windowed: npt.NDArray[np.float64] = view[:: params.hop_samples][:count] * self.hann
            return windowed
        indices = self._frame_indices.get(count)
        if indices is None:
            starts = np.arange(count)[:, None] * params.hop_samples
            indices = starts + np.arange(params.frame_samples)[None, :]
            self._frame_indices[count] = indices
        frames = segment[indices]  # one gather: cheaper per call than building the strided view
        np.multiply(frames, self.hann, out=frames)
        return frames

    def mel_energies(self, segment: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Un-normalised mel energies of every frame in ``segment`` (whole frames on the hop grid)."""
        params = self.params
        count = 1 + (len(segment) - params.frame_samples) // params.hop_samples
        return self.mel_of_frames(self.frames(segment, count))

    def mel_of_frames(self, windowed: npt.NDArray[np.float64],
                      magnitude: npt.NDArray[np.float64] | None = None) -> npt.NDArray[np.float64]:
        """Un-normalised mel energies of windowed frames (rows); ``magnitude``: room for their spectra
        (``spectrum_bins`` of them a frame).

        As python_speech_features' magspec: |rfft| of the whole stack (up to the last weighted bin). Each
        frame's spectrum goes through the mel matrix as a matrix of its own (a stack of (1, bins) matrices):
        one BLAS call per frame, so the result of a frame never depends on how many frames were computed
        together (one (frames, bins) product may round differently per shape); that is what keeps streaming
        bit-identical."""
        spectrum = np.absolute(np.fft.rfft(windowed, self.params.fft_size)[:, : self.spectrum_bins],
                               out=magnitude)
        mel: npt.NDArray[np.float64] = np.matmul(spectrum[:, None, :], self.mel_matrix)[:, 0, :]
        return mel

    def mfcc(self, mel_energies: npt.NDArray[np.float64], peak: float, *, masked_frames: int = 0,
             work: npt.NDArray[np.float64] | None = None) -> npt.NDArray[np.float32]:
        """MFCC of the frames' mel energies; ``masked_frames``: the first frames count as digital silence;
        ``work``: room for the log-mel energies (the shape of ``mel_energies``), else allocated."""
        params = self.params
        if params.peak_normalize:
            log_mel = np.divide(mel_energies, max(peak, params.min_peak), out=work)
        elif work is not None:
            log_mel = work
            np.copyto(log_mel, mel_energies)
        else:
            log_mel = mel_energies.copy()
        if masked_frames:
            log_mel[:masked_frames] = 0.0  # as zero energies: 0 / peak is 0
        np.add(log_mel, params.log_offset, out=log_mel)
        np.log(log_mel, out=log_mel)
        mfcc: npt.NDArray[np.float32] = (log_mel @ self.dct_matrix).astype(np.float32)
        return mfcc

    def mfcc_stack(self, mel_energies: npt.NDArray[np.float64], peaks: npt.NDArray[np.float64],
                   work: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
        """(windows, frames, coefficients): :meth:`mfcc` of each of a stack of windows' mel energies (none
        masked) with its own peak, in one call of each numpy function; ``work``: room for the log-mel energies
        (the stack's shape). The same values: division, addition and log act on each value alone, and
        np.matmul multiplies each window of the stack with the same BLAS call as a window alone."""
        params = self.params
        if params.peak_normalize:
            np.divide(mel_energies, np.maximum(peaks, params.min_peak)[:, None, None], out=work)
        else:
            np.copyto(work, mel_energies)
        np.add(work, params.log_offset, out=work)
        np.log(work, out=work)
        mfcc: npt.NDArray[np.float32] = np.matmul(work, self.dct_matrix).astype(np.float32)
        return mfcc


@functools.lru_cache(maxsize=8)
def _front_end(params: FeatureParams) -> _FrontEnd:
    return _FrontEnd(params)


def _mfcc(
    mel_energies: npt.NDArray[np.float64], peak: float, params: FeatureParams
) -> npt.NDArray[np.float32]:
    return _front_end(params).mfcc(mel_energies, peak)


def window_features(samples: npt.NDArray[Any], params: FeatureParams) -> npt.NDArray[np.float32]:
    """(num_frames, num_features) MFCC of one window: the LAST ``window_samples`` samples; shorter input is
    zero-padded at the front. Accepts int16 PCM or float samples in [-1, 1]."""
    signal = to_float(samples)
    size = params.window_samples
    if len(signal) >= size:
        signal = signal[len(signal) - size :]
    else:
        signal = np.concatenate([np.zeros(size - len(signal)), signal])
    used = params.frame_samples + (params.num_frames - 1) * params.hop_samples
    front_end = _front_end(params)
    mel = front_end.mel_energies(signal[:used])
    peak = float(np.max(np.abs(signal))) if size else 0.0
    return front_end.mfcc(mel, peak)


class RowHistory:
    """The newest ``keep`` rows of a stream, oldest first, as one contiguous array, without allocating per
    append: rows go into a buffer with ``spare`` rows of room, and the history moves back to its front when
    the room is used up (once every ``spare`` rows). Starts as ``keep`` rows of zeros."""

    def __init__(self, keep: int, row_shape: tuple[int, ...] = (), spare: int = 64,
                 dtype: npt.DTypeLike = np.float64) -> None:
        if keep <= 0 or spare <= 0:
            raise ValueError("keep and spare must be positive")
        self.keep = keep
        self._buffer = np.zeros((keep + spare, *row_shape), dtype=dtype)
        self._end = keep  # the history is _buffer[_end - keep : _end]

    def clear(self) -> None:
        self._buffer[:] = 0
        self._end = self.keep

    def extend(self, rows: npt.NDArray[Any]) -> None:
        count = len(rows)
        keep, end = self.keep, self._end
        if count >= keep:
            self._buffer[:keep] = rows[count - keep :]
            self._end = keep
            return
        if end + count > len(self._buffer):
            self._buffer[: keep - count] = self._buffer[end - keep + count : end]
            end = keep - count
        self._buffer[end : end + count] = rows
        self._end = end + count

    def append(self, row: npt.ArrayLike) -> None:
        end = self._end
        if end == len(self._buffer):
            keep = self.keep
            self._buffer[: keep - 1] = self._buffer[end - keep + 1 : end]
            end = keep - 1
        self._buffer[end] = row
        self._end = end + 1

    def latest(self, count: int | None = None, skip: int = 0) -> npt.NDArray[Any]:
        """The newest ``count`` (default ``keep``) rows before the newest ``skip`` ones, oldest first: a view,
        valid until the next append."""
        end = self._end - skip
        return self._buffer[end - (self.keep if count is None else count) : end]


class StreamingFeatures:
    """Incremental MFCC of the latest window.

    ``features()`` describes the window that ends at the latest hop boundary (the last
    ``samples_seen - samples_seen % hop_samples`` samples heard), and equals ``window_features`` of that
    window exactly. Push whole hops (e.g. 100 ms = 1600 samples at the default 320-sample hop) and it is
    always the window ending at the newest sample. Before a full window has been heard the front counts as
    zeros, like ``window_features`` pads it; ``ready()`` says when a full window has been heard.

    Only the frames a push completes are analysed (window, FFT, mel); each ``features()`` call redoes the
    peak normalisation, ``log`` and DCT of the window, which depend on the whole window's peak.

    A push runs every hop on a CPU that idles in between (so cold): the samples go straight into one
    preallocated float buffer (the unfinished frame's samples at its front) and its frames are read through
    a strided view of that buffer made once per frame count, windowed into another preallocated buffer; a
    long push is taken MAX_GATHERED_FRAMES frames, and those of ``behind``, at a time (the frames are the
    same, see ``mel_of_frames``).

    ``behind``: ``features`` and ``recent_frame_energies`` may also be asked about an earlier hop boundary
    (``end``), up to this many samples before the newest sample, and answer exactly what they answered when
    the stream had been pushed up to ``end``; so several hops can be pushed at once (one push, one FFT call)
    and then analysed hop by hop, or their windows all at once (``recent_windows``).
    """

    def __init__(self, params: FeatureParams, *, behind: int = 0, history_frames: int = 0) -> None:
        """``history_frames``: keep at least this many frames of mel energies ending with the window (for
        :meth:`recent_mel`, e.g. a wake verifier that looks further back than the model's window)."""
        if behind < 0 or behind % params.hop_samples:
            raise ValueError("behind must be a whole number of hops (hop_samples), at least 0")
        self.params = params
        self.behind = behind
        self._front_end = _FrontEnd(params)
        self._chunks_per_window = params.window_samples // params.hop_samples
        lag = behind // params.hop_samples  # frames (and hop-sized chunks) that may follow the asked-for end
        # The newest num_frames + 1 frames (half a hop past a boundary, one frame beyond the window exists),
        # and the lag's.
        self._energy_frames = params.num_frames + 1
        self._mel = RowHistory(max(self._energy_frames, history_frames + 1) + lag, (params.num_mel_bands,))
        # |peak| of each complete hop-sized chunk of the window, and of the lag's
        self._chunk_peaks = RowHistory(self._chunks_per_window + lag)
        # Samples taken per step of a long push: a push of up to ``behind`` and MAX_GATHERED_FRAMES more hops
        # (the voice pipeline's idle block) is one step (one FFT call and one mel product for all its frames).
        piece_frames = MAX_GATHERED_FRAMES + lag
        self._piece = piece_frames * params.hop_samples
        # The samples of the frames still to compute (under frame_samples left over) plus one piece.
        self._signal = np.zeros(params.frame_samples + self._piece)
        self._magnitude = np.zeros(self._piece)  # |samples| of a piece, for the peaks
        self._windowed = np.zeros((piece_frames + 1, params.frame_samples))
        self._spectra = np.zeros((piece_frames + 1, self._front_end.spectrum_bins))
        self._log_mel = np.zeros((params.num_frames, params.num_mel_bands))
        self._log_mel_stacks: dict[int, npt.NDArray[np.float64]] = {}  # window count -> room (recent_windows)
        self._frame_views: dict[int, npt.NDArray[np.float64]] = {}
        self.reset()

    def reset(self) -> None:
        params = self.params
        self._samples_seen = 0
        # Samples from the start of the next frame to compute (at the front of _signal); frames start on the
        # global hop grid and the history before the first sample counts as zeros (the frame starting one
        # hop early is the next one).
        self._signal[: params.hop_samples] = 0.0
        self._pending = params.hop_samples
        self._next_frame = -1  # global index of the next frame: it starts at _next_frame * hop_samples
        self._mel.clear()
        self._chunk_peaks.clear()
        self._partial_peak = 0.0
        self._partial_fill = 0

    @property
    def samples_seen(self) -> int:
        return self._samples_seen

    def ready(self) -> bool:
        return self._samples_seen >= self.params.window_samples

    def push(self, samples: npt.NDArray[np.int16]) -> None:
        array = _mono(samples)
        piece = self._piece
        for offset in range(0, len(array), piece):
            self._push_piece(array[offset : offset + piece])

    def _push_piece(self, array: npt.NDArray[Any]) -> None:
        params = self.params
        start, count = self._pending, len(array)
        end = start + count
        signal = self._signal
        _to_float_into(array, signal[start:end])
        self._samples_seen += count
        self._update_peaks(np.abs(signal[start:end], out=self._magnitude[:count]))
        if end < params.frame_samples:
            self._pending = end
            return
        frames = 1 + (end - params.frame_samples) // params.hop_samples
        windowed = np.multiply(self._frames_view(frames), self._front_end.hann, out=self._windowed[:frames])
        self._mel.extend(self._front_end.mel_of_frames(windowed, self._spectra[:frames]))
        self._next_frame += frames
        consumed = frames * params.hop_samples
        signal[: end - consumed] = signal[consumed:end]
        self._pending = end - consumed

    def _frames_view(self, count: int) -> npt.NDArray[np.float64]:
        """The first ``count`` frames of the buffer: a read-only strided view, made once per count."""
        view = self._frame_views.get(count)
        if view is None:
            params = self.params
            view = np.lib.stride_tricks.as_strided(
                self._signal, (count, params.frame_samples),
                (params.hop_samples * self._signal.itemsize, self._signal.itemsize), writeable=False)
            self._frame_views[count] = view
        return view

    def _update_peaks(self, magnitude: npt.NDArray[np.float64]) -> None:
        hop = self.params.hop_samples
        if self._partial_fill:
            head = min(hop - self._partial_fill, len(magnitude))
            self._partial_peak = max(self._partial_peak, float(magnitude[:head].max()))
            self._partial_fill += head
            if self._partial_fill == hop:
                self._chunk_peaks.append(self._partial_peak)
                self._partial_peak, self._partial_fill = 0.0, 0
            magnitude = magnitude[head:]
        whole = len(magnitude) // hop * hop
        if whole:
            self._chunk_peaks.extend(magnitude[:whole].reshape(-1, hop).max(axis=1))
        if whole < len(magnitude):
            self._partial_peak, self._partial_fill = float(magnitude[whole:].max()), len(magnitude) - whole

    def features(self, silence_before: int | None = None, end: int | None = None) -> npt.NDArray[np.float32]:
        """(num_frames, num_features) MFCC of the window ending at the latest hop boundary (``end``: at that
        sample position instead, see ``behind``).

        ``silence_before``: a sample position (counted from reset); the window's audio before it counts as
        digital silence, as if the stream had started there (frames starting before it, and the peak of hops
        ending before it, are left out)."""
        params = self.params
        hop = params.hop_samples
        lag = self._lag(end)
        window_end = self._samples_seen // hop - lag  # in hops
        first_frame = window_end - self._chunks_per_window  # global index of the window's first frame
        masked_frames = 0 if silence_before is None else \
            min(params.num_frames, max(0, -(-silence_before // hop) - first_frame))
        frames = self._mel.latest()
        stop = len(frames) - self._frames_beyond(lag)
        mel = frames[stop - params.num_frames : stop]
        # masked_frames <= num_frames < chunks per window: never empty
        peaks = self._chunk_peaks.latest(self._chunks_per_window - masked_frames, skip=lag)
        return self._front_end.mfcc(mel, float(peaks.max()), masked_frames=masked_frames, work=self._log_mel)

    def recent_windows(self, count: int, step: int) -> npt.NDArray[np.float32]:
        """(count, num_frames, num_features): :meth:`features` (nothing silenced) of the windows ending at the
        newest hop boundary and at the ``count - 1`` boundaries before it ``step`` samples apart, oldest
        first, computed together (:meth:`_FrontEnd.mfcc_stack`: the same values, a few numpy calls for all).
        ``(count - 1) * step`` may not exceed ``behind``."""
        params = self.params
        hop = params.hop_samples
        if count < 1 or step <= 0 or step % hop or (count - 1) * step > self.behind:
            raise ValueError(f"{count} windows {step} samples apart: need whole hops ({hop} samples), at "
                             f"most {self.behind} samples (behind) from the first to the last")
        shift = step // hop  # frames (and hop-sized chunks) from one window to the next
        extra = self._frames_beyond(0)  # of the newest window
        # Overlapping views of the contiguous histories (np.ndarray over their memory: as_strided's
        # Python-level checks cost more than the rest of this)
        frames = self._mel.latest()
        oldest = len(frames) - extra - params.num_frames - (count - 1) * shift  # the first window's first row
        row, column = frames.strides
        mel = np.ndarray((count, params.num_frames, params.num_mel_bands), np.float64, frames, oldest * row,
                         (shift * row, row, column))
        chunk_peaks = self._chunk_peaks.latest()
        chunks = self._chunks_per_window
        start = len(chunk_peaks) - chunks - (count - 1) * shift
        (stride,) = chunk_peaks.strides
        peaks = np.ndarray((count, chunks), np.float64, chunk_peaks, start * stride,
                           (shift * stride, stride)).max(axis=1)
        work = self._log_mel_stacks.get(count)
        if work is None:
            work = self._log_mel_stacks[count] = np.zeros((count, params.num_frames, params.num_mel_bands))
        return self._front_end.mfcc_stack(mel, peaks, work)

    def recent_frame_energies(self, end: int | None = None) -> tuple[int, npt.NDArray[np.float64]]:
        """(global index of the first frame, mel energy of each frame) of the newest frames computed (frame
        ``i`` starts at sample ``i * hop_samples``; ``end``: those computed once the stream was pushed up to
        that sample position, see ``behind``): enough to find pauses between words."""
        lag = self._lag(end)
        energies: npt.NDArray[np.float64] = self._mel.latest(self._energy_frames, skip=lag).sum(axis=1)
        return self._next_frame - lag - len(energies), energies

    def _lag(self, end: int | None) -> int:
        """How many hops (frames, chunks) the stream has been pushed beyond sample position ``end``."""
        if end is None:
            return 0
        behind = self._samples_seen - end
        if not 0 <= behind <= self.behind or behind % self.params.hop_samples:
            raise ValueError(f"end {end} is not a whole number of hops, at most {self.behind} samples, "
                             f"before the newest sample ({self._samples_seen})")
        return behind // self.params.hop_samples

    def recent_mel(self, count: int, end: int | None = None) -> npt.NDArray[np.float64]:
        """(count, num_mel_bands) un-normalised mel energies of the ``count`` frames that end where
        :meth:`features`' window ends (``end``: see ``behind``; frames before the stream started are zeros); a
        copy. ``count`` may exceed the window's frames up to the ``history_frames`` given at construction."""
        lag = self._lag(end)
        if count > self._mel.keep - lag - 1:
            raise ValueError(f"{count} frames asked, {self._mel.keep - lag - 1} kept (raise history_frames)")
        frames = self._mel.latest()
        stop = len(frames) - self._frames_beyond(lag)
        return frames[stop - count : stop].copy()

    def _frames_beyond(self, lag: int) -> int:
        """Mel frames computed beyond the last frame of the window that ends ``lag`` hops back (the frames of
        hops pushed since that window's end)."""
        window_end = self._samples_seen // self.params.hop_samples - lag  # in hops
        newest_needed = window_end - self._chunks_per_window + self.params.num_frames - 1
        return (self._next_frame - 1) - newest_needed
