"""A household recording's utterance and the room around it: where in a take the word is
(:func:`utterance_span`, :func:`speech_span`), and the take's background without it
(:func:`room_background`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

# A take's utterance (utterance_span): frames this far above the background, quiet gaps of up to this many
# 10 ms frames bridged. On development takes (180, as recorded and child-like) it is speech_span's span in
# every quiet one; with training-split noise 20 dB below, 1 % of takes ran over 2.5 s (speech_span: 32 %).
UTTERANCE_ABOVE_NOISE_DB = 10.0
UTTERANCE_GAP_FRAMES = 15
SPAN_FRAME = 160  # speech_span's and utterance_span's frames: 10 ms
# The household's room without the word (room_background): each take's audio outside its utterance, this
# clear of it (the word's fading edges stay out), joined and repeated to ROOM_SECONDS (the model's window is
# 1 s); less than MIN_ROOM_SECONDS of it (takes cut tight around the word) is no room to learn.
ROOM_CLEARANCE_SECONDS = 0.05
MIN_ROOM_SECONDS = 0.3
ROOM_SECONDS = 2.0


def frame_energies(samples: npt.NDArray[np.int16]) -> npt.NDArray[np.float64]:
    """The mean square of each whole 10 ms frame (SPAN_FRAME samples) of ``samples``."""
    count = len(samples) // SPAN_FRAME
    energy: npt.NDArray[np.float64] = \
        (samples[: count * SPAN_FRAME].astype(np.float64).reshape(count, SPAN_FRAME) ** 2).mean(axis=1)
    return energy


def _loud_frames(energy: npt.NDArray[np.float64], floor_db: float,
                 above_noise_db: float) -> npt.NDArray[np.intp]:
    """The frames within ``floor_db`` of the loudest and ``above_noise_db`` above the background (the 10th
    percentile frame); none for silence or a steady sound (a hum or tone, no utterance)."""
    if not len(energy) or float(energy.max()) <= 0.0:
        return np.zeros(0, np.intp)
    level = max(float(energy.max()) * 10 ** (-floor_db / 10),
                float(np.percentile(energy, 10)) * 10 ** (above_noise_db / 10))
    return np.flatnonzero(energy >= level)


def speech_span(samples: npt.NDArray[np.int16], floor_db: float = 30.0,
                above_noise_db: float = 6.0) -> tuple[int, int] | None:
    """(first, last + 1) sample of the loud 10 ms frames (:func:`_loud_frames`); None for silence or a
    steady sound."""
    loud = _loud_frames(frame_energies(samples), floor_db, above_noise_db)
    return (int(loud[0]) * SPAN_FRAME, (int(loud[-1]) + 1) * SPAN_FRAME) if loud.size else None


def utterance_span(samples: npt.NDArray[np.int16], above_noise_db: float = UTTERANCE_ABOVE_NOISE_DB,
                   gap_frames: int = UTTERANCE_GAP_FRAMES) -> tuple[int, int] | None:
    """The utterance of a take: the run of loud 10 ms frames (:func:`_loud_frames`, 30 dB from the loudest as
    in :func:`speech_span`, here ``above_noise_db`` above the background) around the loudest one, bridging
    quiet gaps of up to ``gap_frames``. In a quiet take it is speech_span's span; in a noisy room the noise's
    own louder moments away from the word stay out (speech_span runs from the first to the last of them)."""
    energy = frame_energies(samples)
    loud = _loud_frames(energy, 30.0, above_noise_db)
    if not loud.size:
        return None
    peak = int(np.searchsorted(loud, int(energy.argmax())))
    breaks = np.flatnonzero(np.diff(loud) > gap_frames + 1)  # a gap of more than gap_frames quiet frames
    first = loud[breaks[breaks < peak][-1] + 1] if (breaks < peak).any() else loud[0]
    last = loud[breaks[breaks >= peak][0]] if (breaks >= peak).any() else loud[-1]
    return int(first) * SPAN_FRAME, (int(last) + 1) * SPAN_FRAME


def room_background(takes: Sequence[tuple[npt.NDArray[np.int16], tuple[int, int]]],
                    sample_rate: int) -> npt.NDArray[np.int16] | None:
    """The room without the word: each take's samples outside its utterance ``(start, end)``,
    ROOM_CLEARANCE_SECONDS clear of it, joined and repeated to ROOM_SECONDS; None with less than
    MIN_ROOM_SECONDS of them."""
    clear = round(ROOM_CLEARANCE_SECONDS * sample_rate)
    parts = [np.concatenate([s[: max(0, start - clear)], s[end + clear :]]) for s, (start, end) in takes]
    room = np.concatenate(parts) if parts else np.zeros(0, np.int16)
    if len(room) < MIN_ROOM_SECONDS * sample_rate:
        return None
    length = round(ROOM_SECONDS * sample_rate)
    return np.asarray(np.tile(room, -(-length // len(room)))[:length], dtype=np.int16)
