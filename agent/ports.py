"""The callables the wiring (``agent.wiring``) hands a stage instead of the MQTT link or the supervisor.

Typing only: a stage that publishes, subscribes or schedules names these and never imports the link.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from agent.messages import InboundMessage

Handler = Callable[[InboundMessage], None]
Subscriber = Callable[[str, Handler, int], Any]  # (topic filter, handler, qos) -> subscription handle
# (handles Subscriber or Resubscriber returned, topic filters, handler, qos) -> the new handles, in one step
Resubscriber = Callable[[Sequence[Any], Iterable[str], Handler, int], list[Any]]
Scheduler = Callable[[float, Callable[[], None]], None]  # (delay in seconds, callback on the main thread)


class Publisher(Protocol):
    def __call__(self, topic: str, payload: bytes | str, *, qos: int = 0, retain: bool = False,
                 expires_mono: float | None = None) -> bool: ...
