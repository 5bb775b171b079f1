"""The counters the stages report in diagnostics."""

from __future__ import annotations

import threading

from agent.counts import Counts


def test_declared_names_start_at_zero_and_new_names_appear_on_first_add() -> None:
    counts = Counts("sent", "rejected")
    counts.add("sent")
    counts.add("rejected_format", 3)
    assert counts.snapshot() == {"sent": 1, "rejected": 0, "rejected_format": 3}


def test_adds_from_many_threads_are_not_lost() -> None:
    counts = Counts("readings")

    def add_many() -> None:
        for _ in range(10_000):
            counts.add("readings")

    threads = [threading.Thread(target=add_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counts.snapshot() == {"readings": 40_000}


def test_update_takes_over_values_and_a_snapshot_is_a_copy() -> None:
    counts = Counts("reloads")
    counts.update({"reloads": 4})
    snapshot = counts.snapshot()
    snapshot["reloads"] = 0
    assert counts.snapshot() == {"reloads": 4}
