"""Bounded queues between stages."""

from __future__ import annotations

import queue
from typing import TypeVar

T = TypeVar("T")


class DropOldestQueue(queue.Queue[T]):
    """A bounded ``queue.Queue`` whose producer never blocks: ``offer`` drops the OLDEST item when full
    and counts it in ``dropped``. Consumers use the ordinary ``get``."""

    def __init__(self, maxsize: int) -> None:
        if maxsize <= 0:
            raise ValueError("DropOldestQueue needs a positive maxsize")
        super().__init__(maxsize)
        self.dropped = 0

    def offer(self, item: T) -> bool:
        """Enqueue without blocking. Returns False when an older item had to be dropped for it."""
        with self.not_full:  # the queue's own mutex, as Queue.put holds it
            kept_all = True
            if self._qsize() >= self.maxsize:
                self._get()
                self.unfinished_tasks -= 1
                self.dropped += 1
                kept_all = False
            self._put(item)
            self.unfinished_tasks += 1
            self.not_empty.notify()
            return kept_all
