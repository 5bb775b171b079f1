"""Read pacing for the MQTT link's network thread (paho's), which runs the inbound handlers.

Under a flood of inbound messages (one within ``READ_PAUSE`` seconds of the previous) the thread pauses up to
``READ_PAUSE`` once its socket has nothing more to read: it then wakes once per batch of messages instead of
once per message (in the 200 readings/s soak each wake-up of a thread ran cold and cost more CPU than the
message). ``wake()`` ends a pause at once (the link calls it for a message with a time-to-live, a voice
command); nothing else waits longer than ``READ_PAUSE``, and a quiet link reads every message at once.
"""

from __future__ import annotations

import math
import select
import threading
from typing import Any

READ_PAUSE = 0.02  # seconds


class ReadPacer:
    """``after_message(socket, received)`` on the network thread after each inbound message; ``wake()`` from
    any thread."""

    def __init__(self) -> None:
        self._wake = threading.Event()
        self._last = -math.inf  # monotonic time of the previous inbound message (the network thread's)

    def wake(self) -> None:
        self._wake.set()

    def after_message(self, sock: Any, received: float) -> None:
        """Pause up to READ_PAUSE when this message came within READ_PAUSE of the previous one (a flood) and
        nothing more waits on ``sock`` (the client's socket; None when it has none)."""
        previous, self._last = self._last, received
        if received - previous >= READ_PAUSE or sock is None:
            return  # not a flood: read every message at once
        pending = getattr(sock, "pending", None)  # a TLS socket may hold decrypted bytes already
        if pending is not None and pending():
            return
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError, TypeError):  # the connection is going away: paho's loop sees to it
            return
        if not readable:
            self._wake.wait(READ_PAUSE)
            self._wake.clear()
