"""bench.anomaly_diagnosis --evidence: a missed window's own evidence against what the stream reached before
it (issue 15, session 12: what an alert path reading that evidence could still win)."""

from __future__ import annotations

from bench.anomaly_diagnosis import SUSTAINED, sustained_rise, window_evidence


def test_window_evidence_reads_the_first_half_of_the_window_against_the_learnt_rows_before_it() -> None:
    # rows 0-9 learning (ignored, however loud), 10-19 before the window, window 20-29 (first half 20-24)
    decades = [9.0] * 10 + [0.5, 2.5, 0.2, 0.1, 1.6, 0.0, 0.3, 0.2, 0.1, 0.0] + [1.7, 1.8, 3.1, 1.9, 0.4] + \
        [8.0] * 5
    entry = window_evidence(decades, (20, 29), start=10)
    assert entry == {"before_rows": 10, "before_max": 2.5, "before_sustained": 2,
                     "window_rows": 5, "window_max": 3.1, "window_sustained": 4}


def test_a_sustained_rise_needs_five_readings_at_twice_the_rate_before() -> None:
    quiet_before = {"before_rows": 400, "before_sustained": 0, "window_rows": 200}
    assert sustained_rise({**quiet_before, "window_sustained": 5})
    assert not sustained_rise({**quiet_before, "window_sustained": 4})
    # as often above SUSTAINED before the window as in it: no rise
    assert not sustained_rise({"before_rows": 400, "before_sustained": 20, "window_rows": 200,
                               "window_sustained": 10})
    assert sustained_rise({"before_rows": 400, "before_sustained": 20, "window_rows": 200,
                           "window_sustained": 21})
    assert 1.0 < SUSTAINED < 3.7  # moderate: below what one reading needs to alert
