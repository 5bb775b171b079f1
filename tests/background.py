"""Slow preparation (installing venvs) started in a background thread as soon as the session knows it needs
it (conftest's pytest_collection_finish), so pip's minutes overlap the tests that run before; the fixture
that needs the result waits for it. A job's result is None when it succeeded, else its error text."""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable

Work = Callable[[], str | None]

_jobs: dict[str, _Job] = {}
_lock = threading.Lock()


class _Job(threading.Thread):
    def __init__(self, name: str, work: Work) -> None:
        super().__init__(name=name, daemon=True)
        self.work = work
        self.error: str | None = None

    def run(self) -> None:
        try:
            self.error = self.work()
        except Exception:  # reported to the test that waits for this job, with the traceback
            self.error = traceback.format_exc()


def start(name: str, work: Work) -> None:
    """Start ``work`` under ``name`` unless a job of that name exists already."""
    with _lock:
        if name not in _jobs:
            _jobs[name] = job = _Job(name, work)
            job.start()


def wait(name: str, work: Work, timeout: float) -> str | None:
    """The result of job ``name`` (started now if nobody started it): None on success, else the error."""
    start(name, work)
    job = _jobs[name]
    job.join(timeout)
    return f"{name}: no result after {timeout:.0f} s" if job.is_alive() else job.error
