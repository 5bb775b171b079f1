"""Named event counters that several threads add to and diagnostics read (a stage's ``counters()``)."""

from __future__ import annotations

import threading
from collections.abc import Mapping


class Counts:
    """Counters by name, thread-safe. A name not given at construction starts at 0 on its first ``add``."""

    def __init__(self, *names: str) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(names, 0)

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + amount

    def update(self, values: Mapping[str, int]) -> None:
        """Set these counters (a reloaded part taking over its predecessor's)."""
        with self._lock:
            self._counts.update(values)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
