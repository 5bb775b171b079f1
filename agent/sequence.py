"""The sequence gate of household adaptation (:mod:`agent.adaptation`): a template match over time.

The distance gate compares one hop (one 1 s window's embedding) with single windows of the household's
recordings. A word that shares one similar hop with the enrolled word passes it as easily as a new take of
the word whose nearest hop is a little farther: for the Precise speaker of "hey computer", one of his own
"athena" clips lay nearer his enrolled windows (0.97 gate radii) than one of his missed "hey computer" takes
(1.03). As sequences they differ. Like Rhasspy's Raven (dynamic time warping of MFCC frames against a
household's templates), this matches the recent hops' embeddings (the head's standardised space, one row per
hop of the voice path) against each enrolled recording's hops while its word is in the model's window (the
hops the head scores MIN_LEVEL or more, and MARGIN_HOPS either side): every template hop is matched to one
recent hop, in order, the recent hops advancing by 0, 1 or 2 per template hop (half to twice the enrolled
speed), and the distance is the mean over the template's hops; the smallest over templates counts. A hop the
head scores at or above its boost threshold is then raised when, on it or on one of the LATCH_HOPS - 1 hops
before it (the recognizer's smoothing time), a whole template ended within the threshold.

Only numpy; the match runs only on a hop the head already scores at its threshold outside the distance gate
(a few hops per utterance of something word-like), over the stream's last ``SequenceGate.history_hops`` hops
(:class:`RecentHops`: each stream keeps its own; the gate itself is immutable, shared by every stream).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.templates import CepstralMean, Templates, TemplateState

FloatArray = npt.NDArray[np.float32]

MIN_LEVEL = 0.5  # a template: the hops of an enrolled recording the head scores this much (agent.adaptation)
MARGIN_HOPS = 1  # and this many hops either side
LATCH_HOPS = 5  # a match raises the hops at the boost for this many hops (0.5 s: the smoothing time)
MAX_SPEED_STEP = 2  # the recent hops advance by at most this many per template hop (twice the enrolled speed)


def template(points: FloatArray, scores: FloatArray) -> FloatArray:
    """The template of one enrolled recording: its hops (standardised ``points``, head ``scores``) from the
    first to the last scoring MIN_LEVEL, MARGIN_HOPS more either side; empty when none does."""
    hot = np.flatnonzero(scores >= MIN_LEVEL)
    if not len(hot):
        return points[:0]
    return points[max(0, int(hot[0]) - MARGIN_HOPS) : int(hot[-1]) + MARGIN_HOPS + 1]


def _pairwise(a: FloatArray, b: FloatArray) -> FloatArray:
    squared = (a**2).sum(axis=1)[:, None] - 2 * a @ b.T + (b**2).sum(axis=1)[None, :]
    result: FloatArray = np.sqrt(np.maximum(squared, 0.0)).astype(np.float32)
    return result


def distances(templates: Sequence[FloatArray], points: FloatArray) -> FloatArray:
    """Per row of ``points`` (consecutive hops of one stream), the mean distance of the best match of a whole
    template ending on that hop (open begin), the smallest over ``templates``; inf where none fits."""
    result = np.full(len(points), np.inf, np.float32)
    for rows in templates:
        if not len(rows) or not len(points):
            continue
        cost = _pairwise(rows, points)
        total = cost[0].copy()
        for line in cost[1:]:
            best = total.copy()
            for step in range(1, MAX_SPEED_STEP + 1):
                best[step:] = np.minimum(best[step:], total[:-step])
            total = line + best
        result = np.minimum(result, total / np.float32(len(rows)))
    return result


def latched(values: FloatArray, hops: int = LATCH_HOPS) -> FloatArray:
    """Per row, the smallest of ``values`` on it and the ``hops - 1`` rows before it."""
    result = values.copy()
    for back in range(1, min(hops, len(values))):
        result[back:] = np.minimum(result[back:], values[:-back])
    return result


def clip_distance(templates: Sequence[FloatArray], points: FloatArray, hot: npt.NDArray[np.bool_]) -> float:
    """How close one clip (consecutive hops) comes to a template: the smallest latched distance over its
    ``hot`` hops (inf: no hot hop)."""
    if not hot.any():
        return float("inf")
    return float(latched(distances(templates, points))[hot].min())


def threshold(own: Sequence[float], bank_nearest: float, bank_margin: float) -> float:
    """The distance threshold: the median of each enrolled recording's distance to the other recordings'
    templates (``own``, finite ones), and at most ``bank_margin`` of the nearest word-like bank recording of
    another label; 0 (no sequence gate) with fewer than two finite distances."""
    finite = [d for d in own if np.isfinite(d)]
    if len(finite) < 2:
        return 0.0
    return float(min(float(np.median(finite)), bank_margin * bank_nearest))


@dataclass(frozen=True, eq=False)
class SequenceGate:
    """One word's templates (standardised hops, empty ones dropped) and distance threshold. Immutable: one
    gate serves every stream; what it is matched against on a live stream is that stream's own
    (:class:`RecentHops`)."""

    templates: tuple[FloatArray, ...]
    limit: float

    def __post_init__(self) -> None:
        kept = tuple(np.asarray(t, np.float32) for t in self.templates if len(t))
        object.__setattr__(self, "templates", kept)
        object.__setattr__(self, "limit", float(self.limit))

    @property
    def active(self) -> bool:
        return bool(self.templates) and self.limit > 0

    @property
    def history_hops(self) -> int:
        """How many recent hops the streaming match needs: the longest template's match spans at most
        MAX_SPEED_STEP * (length - 1) + 1 hops, and it may have ended LATCH_HOPS - 1 hops ago."""
        longest = max((len(t) for t in self.templates), default=0)
        return MAX_SPEED_STEP * max(0, longest - 1) + LATCH_HOPS

    def matched(self, points: FloatArray) -> npt.NDArray[np.bool_]:
        """Whether a template ended within the limit on each row of ``points`` (consecutive hops of one
        stream) or the LATCH_HOPS - 1 before it; on a live stream, the last row is the newest hop."""
        if not self.active:
            return np.zeros(len(points), bool)
        result: npt.NDArray[np.bool_] = latched(distances(self.templates, points)) <= self.limit
        return result

    def arrays(self, prefix: str) -> dict[str, npt.NDArray[np.float32]]:
        rows = np.concatenate(self.templates) if self.templates else np.zeros((0, 0), np.float32)
        return {f"{prefix}templates": rows,
                f"{prefix}template_lengths": np.array([len(t) for t in self.templates], np.float32),
                f"{prefix}sequence_limit": np.array([self.limit], np.float32)}

    @classmethod
    def from_arrays(cls, arrays: object, prefix: str) -> SequenceGate:
        data = arrays  # an NpzFile: indexed by name
        rows = np.asarray(data[f"{prefix}templates"], np.float32)  # type: ignore[index]
        lengths = np.asarray(data[f"{prefix}template_lengths"]).astype(int)  # type: ignore[index]
        limit = float(np.asarray(data[f"{prefix}sequence_limit"])[0])  # type: ignore[index]
        if not len(lengths):
            return cls((), limit)
        return cls(tuple(np.split(rows, np.cumsum(lengths)[:-1])), limit)


class RecentHops:
    """One live stream's state for the household adaptation: its newest hops (the model's embedding of each,
    one row), at most ``keep``, which the sequence gates are matched against; and, per word with templates
    (:mod:`agent.templates`), the stream's cepstra and what it has matched of them. Per stream (each
    :class:`agent.voice.VoicePipeline` has its own); :meth:`reset` at a new one."""

    def __init__(self, keep: int, templates: dict[str, Templates] | None = None) -> None:
        self._rows: deque[FloatArray] = deque(maxlen=keep)
        self._cepstra = CepstralMean()
        self._matches = {word: TemplateState(entry) for word, entry in (templates or {}).items()}

    @property
    def matching(self) -> bool:
        """Whether a word has templates: then every hop's mel frames must be handed to :meth:`raised`."""
        return bool(self._matches)

    def raised(self, mel: npt.NDArray[np.floating[Any]],
               scores: Mapping[str, float] | None = None) -> frozenset[str]:
        """The words a template match raises on this hop, given the hop's new mel frames and, per word, the
        household head's score of the hop (:meth:`agent.templates.TemplateState.hop`)."""
        if not self._matches:
            return frozenset()
        cepstra = self._cepstra.push(np.asarray(mel, np.float64))
        scores = scores or {}
        return frozenset(word for word, state in self._matches.items()
                         if state.hop(cepstra, scores.get(word, -np.inf)))

    def push(self, embedding: FloatArray) -> None:
        self._rows.append(np.array(embedding, np.float32).reshape(-1))

    def reset(self) -> None:
        self._rows.clear()
        self._cepstra.reset()
        for state in self._matches.values():
            state.reset()

    @property
    def held(self) -> int:
        return len(self._rows)

    def newest(self, count: int) -> FloatArray:
        """The last ``count`` hops (all of them while fewer are held), oldest first."""
        return np.stack(list(self._rows)[-count:])
