"""Perturbed copies of a household recording for enrolment (:mod:`agent.adaptation`).

Five recordings cover little of how a speaker says a word: the same speaker's other takes come out a little
faster or slower, higher or lower. Each recording is also learned played SPEEDS times as fast (pitch and
tempo together, by resampling: the rational :class:`agent.audio.Resampler`, no extra dependency), so the
head and its distance gate see the voice around each take, not only at it. The copies are positives and gate
centres; the gate's radius (the spread of the recordings) and the refusal check use the recordings alone.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from agent.audio import SAMPLE_RATE, Resampler

# Speed factors of the copies (1.0, the recording itself, is not a copy), about the spread of one speaker's
# takes; their effect on the development split (python -m training.enrol_dev) is in agent/gate.py.
SPEEDS: tuple[float, ...] = (0.9, 0.95, 1.05, 1.1)


def speed_copy(samples: npt.NDArray[np.int16], span: tuple[int, int],
               speed: float) -> tuple[npt.NDArray[np.int16], tuple[int, int]]:
    """``samples`` played ``speed`` times as fast (higher and quicker above 1), and the utterance's span in
    the copy."""
    resampler = Resampler(round(SAMPLE_RATE * speed), SAMPLE_RATE)
    changed = resampler.process(np.asarray(samples, dtype=np.float64))
    start, end = span
    copy_span = (int(start / speed), min(len(changed), int(np.ceil(end / speed))))
    return np.asarray(np.round(changed).clip(-32768, 32767), dtype=np.int16), copy_span


def perturbed(samples: npt.NDArray[np.int16],
              span: tuple[int, int]) -> list[tuple[npt.NDArray[np.int16], tuple[int, int]]]:
    """The copies of one recording to learn from besides it: one per speed of SPEEDS."""
    return [speed_copy(samples, span, speed) for speed in SPEEDS]
