"""Enrolment of the template path (:mod:`agent.templates`): each household recording's template, its limit
from the negative bank, and the near matches the head may confirm, all checked on the held-back bank
recordings before they are used (:func:`agent.adaptation.fit_word` calls :func:`fit_templates`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from agent.bank import Bank, FloatArray, allowed_false_wakes
from agent.templates import Templates

log = logging.getLogger(__name__)

# A template's limit: this fraction of the distance of its nearest bank recording of another label. On the
# development split (python -m training.enrol_dev, child-like and faster voices of 11 training clusters, 3
# draws each, 201 other takes each) 0.75 / 0.8 / 0.85 heard 194 / 195 / 199 child-like and 191 / 197 / 198
# faster takes; 0.85 added 2 wakes on the development confusables in the enrolled voice, 0.8 and 0.75 none.
# (One limit for all templates, the smallest, at 0.85: 193 and 196, no wake; at 0.9: 198 and 200, one.)
TEMPLATE_BANK_MARGIN = 0.8
MIN_TEMPLATES = 2  # the limit is judged by each recording against the others' templates
# A match within NEAR_LIMIT limits raises the word on a hop the head scores at NEAR_SCORE or more. Below
# 1 / TEMPLATE_BANK_MARGIN, so no bank recording the limits were set on is near. On the development split
# (33 draws per voice, 201 other takes) it heard child-like 197 -> 199, faster 194 -> 195 and child-like in
# noise 20 / 15 dB below 169 -> 177 / 158 -> 167, with every wake on the confusables, plain or in the same
# voice, as before. At 1.2 (faster 197, noise 179) the Precise speaker's own "athena" woke once more in each
# draw (`enrol_dev --speaker`); at 1.25 or with the head at 0.8-0.9, same-voice wakes in noise rose.
NEAR_LIMIT = 1.15
NEAR_SCORE = 0.95


def fit_templates(word: str, templates: Sequence[FloatArray], bank: Bank, check: Bank,
                  not_word_cepstra: Sequence[FloatArray], *, check_scores: FloatArray, budget_per_hour: float,
                  false_wakes: int) -> tuple[Templates | None, int, list[bool]]:
    """The template path of one word: the household recordings' templates, each one's limit
    TEMPLATE_BANK_MARGIN of its nearest bank recording of another label (or not-word recording), and near
    matches confirmed by the head (``check_scores``: its score of each of ``check``'s rows). Kept only while
    the held-back bank recordings it would wake on, with the ``false_wakes`` of the head, stay within the
    budget (near matches counted wherever a recording is near and its best window reaches NEAR_SCORE; left
    out first). Returns it (or None), the false wakes with it, and per household recording whether the other
    recordings' templates hear it, as they would a new take."""
    unheard = [False] * len(templates)
    path = Templates.of(templates, 1.0)
    if len(path.lengths) < len(templates) or len(templates) < MIN_TEMPLATES:
        return None, false_wakes, unheard
    negatives = [*bank.recordings_cepstra(word), *not_word_cepstra]
    if not negatives:
        return None, false_wakes, unheard
    path = path.with_limits(TEMPLATE_BANK_MARGIN * path.nearest(negatives).min(axis=0))
    heard = [bool(Templates.of([t for j, t in enumerate(templates) if j != i],
                               np.delete(path.limits, i)).reach([own])[0] <= 1.0)
             for i, own in enumerate(templates)]
    reach = path.reach(check.recordings_cepstra(word))
    with_templates = false_wakes + int((reach <= 1.0).sum())
    allowed = allowed_false_wakes(budget_per_hour, check.hours)
    if not path.active or with_templates > allowed:
        log.info("enrolment: the templates for %r would wake on %d held-back bank recordings: left out",
                 word, with_templates - false_wakes)
        return None, false_wakes, unheard
    peaks = check.recording_peaks(check_scores, word)
    confirmed = (reach > 1.0) & (reach <= NEAR_LIMIT) & (peaks >= NEAR_SCORE)
    if with_templates + int(confirmed.sum()) > allowed:
        log.info("enrolment: near template matches for %r would wake on %d held-back bank recordings: left "
                 "out", word, int(confirmed.sum()))
        return path, with_templates, heard
    return path.with_near(NEAR_LIMIT, NEAR_SCORE), with_templates + int(confirmed.sum()), heard
