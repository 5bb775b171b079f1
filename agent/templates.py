"""The template path of household adaptation (:mod:`agent.adaptation`): the household's own recordings
matched as sequences of cepstra, as Rhasspy's Raven matches MFCC templates by dynamic time warping.

The head and gates of :mod:`agent.adaptation` read the keyword model's embedding. For a voice far from every
training speaker (a child's, or a fast speaker's: voices the shipped model hears on 0 % of takes), that
embedding scatters: after five recordings the head heard 28-50 % of such a voice's other takes. The voice's
own takes, though, lie close to each other in the audio itself. On the development split
(``training/enrol_dev.py``: training speaker clusters and changed voices of them), a take's distance to the
nearest of five enrolled templates was 0.54-0.56 of the nearest confusable clip's in the median and at most
0.92-1.03, for the real, the child-like and the faster voices alike (measured with a log floor of 1e-3).

What is matched: the log-mel energies the voice path already computes (20 ms frames), turned into cepstra
(coefficients 1-12 of the DCT; c0, the loudness, left out) less their running mean over about two seconds
(a microphone's colour cancels out). A template is one recording's cepstra over its speech, MARGIN_FRAMES
either side. Distance: open-begin dynamic time warping ending at the newest frame. Per frame of the stream
the template advances 0, 1 or 2 frames (from half to twice the recording's speed); each template frame's
cost is counted once per stream frame it is matched to, a skipped one is counted as its neighbour (so every
match sums about one cost per template frame, fast or slow), and the sum is divided by the template's length.
The recursion needs only the previous column, so a live stream advances all templates together, one numpy
step per frame; the same step, over a batch of recordings, gives the bank's distances at enrolment.

Each template's limit is set at enrolment (:func:`agent.template_fit.fit_templates`) from the negative bank
(:mod:`agent.bank`: cepstra of training-side speech of other labels) and the household's not-word
recordings: a fraction of the distance of the nearest of them. A hop whose new frames end a match within its
template's limit raises the word (its posterior stands at RAISED for LATCH_HOPS hops,
enough for the recognizer's smoothing to fire once). So does a match ending within ``near_limit`` of it on a
hop the household's head (:mod:`agent.adaptation`) scores at ``near_score`` or more: the audio nearly
matches and the embedding agrees (:mod:`agent.template_fit` sets both at enrolment).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.features import FeatureParams, StreamingFeatures

FloatArray = npt.NDArray[np.float32]

COEFFICIENTS = 12  # cepstral coefficients 1..12 (c0, the loudness, is left out)
MEAN_FRAMES = 100  # the running mean's span: 2 s of 20 ms frames
# Added to the mel energies (|rfft| of float samples in [-1, 1], summed per band) before the log: the bands
# where a room's noise, not the voice, sets the level stay near log(LOG_FLOOR) in every take. Development
# split (child-like and faster voices, 2 draws per cluster, 134 other takes each; noise: the training split's
# noise recordings added to the takes, not to the enrolled recordings), heard at 1e-3 / 0.1 / 1.0 / 3.0:
# 20 dB SNR 90+93 / 119+110 / 127+127 / 128+127; no noise 129+131 at 1e-3, 131+129 at 1.0, 129+129 at 3.0;
# 10 dB 76+55 at 1e-3, 112+98 at 1.0. None of them reached a development confusable.
LOG_FLOOR = 1.0
MARGIN_FRAMES = 2  # a template keeps this many frames either side of the recording's speech
LATCH_HOPS = 3  # a match raises the word on its hop and the next ones: 3 of the smoothing's 5 hops
RAISED = 1.0  # the word's posterior on a raised hop
# The bank stores cepstra as int8 at this resolution: +-3.97 (with LOG_FLOOR 1.0, 99.9 % of the bank's
# values lie within +-3.6).
BANK_SCALE = 1.0 / 32.0


@functools.lru_cache(maxsize=4)
def _dct(bands: int) -> npt.NDArray[np.float64]:
    """Orthonormal DCT-II of ``bands`` log-mel energies, coefficients 1..COEFFICIENTS."""
    n = np.arange(bands)
    k = np.arange(1, COEFFICIENTS + 1)[:, None]
    result: npt.NDArray[np.float64] = np.sqrt(2.0 / bands) * np.cos(np.pi * k * (2 * n + 1) / (2 * bands))
    return result.T


class CepstralMean:
    """One stream's cepstra: each frame less the running mean of the frames so far (an expanding mean for
    the first MEAN_FRAMES, then an exponential one of that span)."""

    def __init__(self) -> None:
        self._mean = np.zeros(COEFFICIENTS)
        self._count = 0

    def reset(self) -> None:
        self._mean[:] = 0.0
        self._count = 0

    def push(self, mel: npt.NDArray[np.floating[Any]]) -> FloatArray:
        """Cepstra (frames, COEFFICIENTS) of new frames' un-normalised mel energies (frames, bands)."""
        energies = np.asarray(mel, np.float64)
        cepstra = np.log(energies + LOG_FLOOR) @ _dct(energies.shape[1])
        result = np.empty_like(cepstra)
        for row, frame in enumerate(cepstra):
            self._count += 1
            self._mean += (frame - self._mean) / min(self._count, MEAN_FRAMES)
            result[row] = frame - self._mean
        return result.astype(np.float32)


def hop_mel(params: FeatureParams, samples: npt.NDArray[np.int16], hop_samples: int,
            tail_samples: int = 0) -> npt.NDArray[np.float64]:
    """The mel energies the voice path hands the adaptation, hop by hop (``hop_samples`` apart, each hop's
    new frames), over ``samples`` then ``tail_samples`` of silence: (hops, frames per hop, bands)."""
    features = StreamingFeatures(params)
    audio = np.concatenate([np.asarray(samples, np.int16), np.zeros(tail_samples, np.int16)])
    per_hop = hop_samples // params.hop_samples
    hops = []
    for start in range(0, len(audio) - hop_samples + 1, hop_samples):
        features.push(audio[start : start + hop_samples])
        hops.append(features.recent_mel(per_hop))
    return np.stack(hops) if hops else np.zeros((0, per_hop, params.num_mel_bands))


def stream_cepstra(mel: npt.NDArray[np.floating[Any]]) -> FloatArray:
    """(frames, COEFFICIENTS): the cepstra a new stream sees over hops of mel frames (hops, frames, bands)."""
    return CepstralMean().push(mel.reshape(-1, mel.shape[-1]))


def recording_cepstra(params: FeatureParams, samples: npt.NDArray[np.int16], hop_samples: int,
                      tail_samples: int = 0) -> FloatArray:
    """(frames, COEFFICIENTS): a recording's cepstra exactly as a stream that starts with it sees them."""
    return stream_cepstra(hop_mel(params, samples, hop_samples, tail_samples))


def template(cepstra: FloatArray, span: tuple[int, int], frame_hop: int) -> FloatArray:
    """The frames of ``cepstra`` over the speech ``span`` (samples), MARGIN_FRAMES either side."""
    first = max(0, span[0] // frame_hop - MARGIN_FRAMES)
    last = min(len(cepstra), span[1] // frame_hop + 1 + MARGIN_FRAMES)
    return cepstra[first:last]


@dataclass(frozen=True, eq=False)
class Templates:
    """One word's templates, stacked (row k: template k, padded), and each one's distance limit. Immutable:
    one serves every stream (:class:`TemplateState` holds what a stream has matched so far). A match is
    measured in its template's limits: at most 1 raises the word."""

    stacked: FloatArray  # (templates, longest, COEFFICIENTS), padded with zeros
    lengths: npt.NDArray[np.int64]
    limits: FloatArray  # (templates,)
    near_limit: float = 1.0  # a match within this many limits raises the word when the head agrees ...
    near_score: float = np.inf  # ... scoring the hop at this or more
    _rows: FloatArray = field(init=False, repr=False)  # the template frames as columns, for one product
    _norms: FloatArray = field(init=False, repr=False)  # their squared norms, +inf for padding

    @classmethod
    def of(cls, templates: Sequence[FloatArray], limits: float | Sequence[float] | FloatArray) -> Templates:
        """Templates of fewer than two frames are dropped (with their limits)."""
        keep = [k for k, t in enumerate(templates) if len(t) >= 2]
        kept = [np.asarray(templates[k], np.float32) for k in keep]
        longest = max((len(t) for t in kept), default=0)
        stacked = np.zeros((len(kept), longest, COEFFICIENTS), np.float32)
        for k, rows in enumerate(kept):
            stacked[k, : len(rows)] = rows
        every = np.broadcast_to(np.asarray(limits, np.float32), (len(templates),))
        return cls(stacked, np.array([len(t) for t in kept], np.int64), every[keep].copy())

    @property
    def active(self) -> bool:
        return bool(len(self.lengths)) and bool(np.all(self.limits > 0) and np.all(np.isfinite(self.limits)))

    def arrays(self, prefix: str) -> dict[str, npt.NDArray[np.float32]]:
        rows = np.concatenate([t[:n] for t, n in zip(self.stacked, self.lengths, strict=True)]) \
            if len(self.lengths) else np.zeros((0, COEFFICIENTS), np.float32)
        return {f"{prefix}cepstral_templates": rows,
                f"{prefix}cepstral_lengths": self.lengths.astype(np.float32),
                f"{prefix}cepstral_limits": self.limits.astype(np.float32),
                f"{prefix}cepstral_near": np.array([self.near_limit, self.near_score], np.float32)}

    @classmethod
    def from_arrays(cls, arrays: Any, prefix: str) -> Templates | None:
        """The templates saved by :meth:`arrays`; None for none (an inactive path)."""
        rows = np.asarray(arrays[f"{prefix}cepstral_templates"], np.float32)
        lengths = np.asarray(arrays[f"{prefix}cepstral_lengths"]).astype(int)
        limits = np.asarray(arrays[f"{prefix}cepstral_limits"], np.float32)
        near = np.asarray(arrays[f"{prefix}cepstral_near"], np.float64)
        if near.shape != (2,) or not near[0] >= 1.0 or np.isnan(near[1]):
            raise ValueError(f"{prefix}cepstral_near: {near.tolist()}, not a limit >= 1 and a score")
        if rows.ndim != 2 or rows.shape[1] != COEFFICIENTS or lengths.sum() != len(rows) \
                or len(limits) != len(lengths) or np.any(lengths < 2):
            raise ValueError(f"{prefix}cepstral_templates: {rows.shape} rows for lengths {lengths.tolist()} "
                             f"and {len(limits)} limits")
        result = cls.of(np.split(rows, np.cumsum(lengths)[:-1]) if len(lengths) else [], limits)
        return result.with_near(float(near[0]), float(near[1])) if result.active else None

    def with_limits(self, limits: float | FloatArray) -> Templates:
        return Templates(self.stacked, self.lengths,
                         np.broadcast_to(np.asarray(limits, np.float32), self.lengths.shape).copy(),
                         self.near_limit, self.near_score)

    def with_near(self, limit: float, score: float) -> Templates:
        """These templates, a match within ``limit`` of its template's limit raising the word on a hop the
        head scores at ``score`` or more (limit 1.0 or score inf: never)."""
        return Templates(self.stacked, self.lengths, self.limits, limit, score)

    def __post_init__(self) -> None:
        rows = self.stacked.reshape(-1, COEFFICIENTS)
        padding = np.arange(self.stacked.shape[1]) >= self.lengths[:, None]
        # Squared norms with padding at +inf: a padded template frame costs inf, so no match runs through it.
        object.__setattr__(self, "_rows", np.ascontiguousarray(rows.T))
        object.__setattr__(self, "_norms", np.where(padding.reshape(-1), np.inf, (rows * rows).sum(axis=1)))

    def _costs(self, frames: FloatArray) -> FloatArray:
        """(..., templates, longest): each template frame's distance to each frame of ``frames`` (..., C)."""
        frames = np.asarray(frames, np.float32)
        squared = (frames * frames).sum(axis=-1)[..., None] - 2.0 * (frames @ self._rows) + self._norms
        cost: FloatArray = np.sqrt(np.maximum(squared, 0.0), dtype=np.float32)
        return cost.reshape(*frames.shape[:-1], *self.stacked.shape[:2])

    def _ends(self, totals: FloatArray) -> FloatArray:
        """(..., templates): each template's match ending here, its distance (the last frame's total over
        the template's length)."""
        ends = totals[..., np.arange(len(self.lengths)), self.lengths - 1]
        result: FloatArray = (ends / self.lengths).astype(np.float32)
        return result

    def distances(self, cepstra: FloatArray) -> FloatArray:
        """Per frame of ``cepstra`` (one stream's consecutive frames), the best match ending on it, in its
        template's limits (inf until one fits)."""
        state = TemplateState(self)
        return np.array([state.step(cost) for cost in self._costs(cepstra)], np.float32)

    def nearest(self, recordings: Sequence[FloatArray], batch: int = 256) -> FloatArray:
        """(recordings, templates): per recording (each a stream of its own) and template, the smallest
        distance of a match ending on any of its frames; all at once, in batches of similar length
        (enrolment measures the whole bank)."""
        result = np.full((len(recordings), len(self.lengths)), np.inf, np.float32)
        if not len(self.lengths) or not recordings:
            return result
        lengths = np.array([len(r) for r in recordings])
        order = np.argsort(lengths, kind="stable")
        start = 0
        while start < len(order):
            # Up to ``batch`` recordings, none more than twice as long as the first (padding costs time).
            stop = start + 1
            while stop < min(start + batch, len(order)) and \
                    lengths[order[stop]] <= 2 * max(lengths[order[start]], 50):
                stop += 1
            chosen, start = order[start:stop], stop
            longest = int(lengths[chosen].max())
            if longest == 0:
                continue
            frames = np.zeros((len(chosen), longest, COEFFICIENTS), np.float32)
            valid = np.zeros((len(chosen), longest), bool)
            for row, i in enumerate(chosen):
                frames[row, : len(recordings[i])] = recordings[i]
                valid[row, : len(recordings[i])] = True
            totals = np.full((len(chosen), *self.stacked.shape[:2]), np.inf, np.float32)
            best = np.full((len(chosen), len(self.lengths)), np.inf, np.float32)
            for column in range(longest):
                totals = _advance(totals, self._costs(frames[:, column]))
                best = np.where(valid[:, column, None], np.minimum(best, self._ends(totals)), best)
            result[chosen] = best
        return result

    def reach(self, recordings: Sequence[FloatArray]) -> FloatArray:
        """Per recording, its closest match in its template's limits (at most 1: the word is raised in it)."""
        result: FloatArray = (self.nearest(recordings) / self.limits).min(axis=1, initial=np.inf)
        return result


def _advance(totals: FloatArray, cost: FloatArray) -> FloatArray:
    """One stream frame of the warping: ``totals`` (..., templates, longest) of the matches ending on the
    previous frame, ``cost`` the new frame's; a match may start on any frame (open begin)."""
    best = totals.copy()  # staying on the same template frame
    np.minimum(best[..., 1:], totals[..., :-1], out=best[..., 1:])  # advancing one
    # Advancing two: the skipped template frame counts as matched to this stream frame too.
    np.minimum(best[..., 2:], totals[..., :-2] + cost[..., 1:-1], out=best[..., 2:])
    best += cost
    best[..., 0] = cost[..., 0]
    return best


class TemplateState:
    """What one stream has matched of one word's templates, frame by frame."""

    def __init__(self, templates: Templates) -> None:
        self.templates = templates
        self._totals = np.full(templates.stacked.shape[:2], np.inf, np.float32)
        self.raised_hops = 0  # hops the current match still raises the word

    def reset(self) -> None:
        self._totals[:] = np.inf
        self.raised_hops = 0

    def step(self, cost: FloatArray) -> float:
        """Advance by one frame, given its costs (:meth:`Templates._costs`); the best match ending on it, in
        its template's limits."""
        templates = self.templates
        self._totals = _advance(self._totals, cost)
        return float((templates._ends(self._totals) / templates.limits).min(initial=np.inf))

    def hop(self, cepstra: FloatArray, score: float = -np.inf) -> bool:
        """Advance by one hop's frames; whether the word is raised on this hop (a match within the limit, or
        within ``near_limit`` of it when the head's ``score`` of this hop reaches ``near_score``, ended on one
        of its frames or on the LATCH_HOPS - 1 hops before)."""
        templates = self.templates
        limit = templates.near_limit if score >= templates.near_score else 1.0
        matched = False
        for cost in templates._costs(cepstra):
            matched = self.step(cost) <= limit or matched
        if matched:
            self.raised_hops = LATCH_HOPS
        raised = self.raised_hops > 0
        self.raised_hops = max(0, self.raised_hops - 1)
        return raised
