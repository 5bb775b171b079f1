"""Slow preparation (installing venvs) started in the background as soon as the session knows it needs it
(conftest's pytest_collection_finish), so pip's minutes overlap the tests that run before; the fixture that
needs a result waits for it. One job at a time, in the order started, its commands under nice and ionice (see
``LOW_PRIORITY``): the tests running meanwhile have timing limits and must keep their CPU.
A job's result is None when it succeeded, else its error text."""

from __future__ import annotations

import queue
import threading
import traceback
from collections.abc import Callable

Work = Callable[[], str | None]
LOW_PRIORITY = ("nice", "-n", "19", "ionice", "-c", "3")  # CPU and disk only when idle


class _Job:
    def __init__(self, work: Work) -> None:
        self.work = work
        self.done = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        try:
            self.error = self.work()
        except Exception:  # noqa: BLE001 - reported to the test that waits for this job, with the traceback
            self.error = traceback.format_exc()
        finally:
            self.done.set()


_jobs: dict[str, _Job] = {}
_queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
_lock = threading.Lock()
_worker: threading.Thread | None = None


def _work_through_the_queue() -> None:
    while True:
        _queue.get().run()


def start(name: str, work: Work) -> None:
    """Queue ``work`` under ``name`` unless a job of that name exists already."""
    global _worker  # noqa: PLW0603 - one worker per test session, started on first use
    with _lock:
        if name in _jobs:
            return
        _jobs[name] = job = _Job(work)
        _queue.put(job)
        if _worker is None:
            _worker = threading.Thread(target=_work_through_the_queue, name="background jobs", daemon=True)
            _worker.start()


def wait(name: str, work: Work, timeout: float) -> str | None:
    """The result of job ``name`` (queued now if nobody queued it): None on success, else the error."""
    start(name, work)
    job = _jobs[name]
    if not job.done.wait(timeout):
        return f"{name}: no result after {timeout:.0f} s"
    return job.error
