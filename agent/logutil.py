"""Logging helpers shared by the daemon's stages."""

from __future__ import annotations

import threading
import time


class LogThrottle:
    """Rate limit for repetitive log lines (a flood of bad payloads must not flood the journal).

    ``ready(key)`` returns None while the key is muted, else how many calls were suppressed since the
    key last logged; the caller then logs once and mentions that number.
    """

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def ready(self, key: str, now: float | None = None) -> int | None:
        now = time.monotonic() if now is None else now
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._suppressed.pop(key, 0)


def suppressed_note(count: int) -> str:
    """Text to append to a throttled log line: how many similar lines were left out."""
    return f" ({count} more since the last report)" if count else ""
