"""Marking a captured wake as false, in the running daemon (``[voice] capture = true``, :mod:`agent.capture`).

Three ways in: the Home Assistant button "Last wake was false" and anything else that sends ``PRESS`` to
``Topics.last_wake_false`` (the latest capture not yet marked), or a spoken "no" right after a wake word (that
wake's capture). The capture is learned as a not-word through exactly the path of ``home-agent enroll
--not-word`` (:func:`agent.enroll.update_adaptation`: the same checks of the recording, the same false-wake
budget, nothing changed on a refusal), on a worker thread of its own (learning takes seconds; the voice and
MQTT threads must not wait), and the voice stage then reloads the adaptation as on SIGHUP. Refusals are logged
with the reason and counted (``false_wakes_refused``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.adaptation import load_model_and_bank
from agent.adaptation_store import Store
from agent.capture import CaptureStore
from agent.config import Config
from agent.counts import Counts
from agent.discovery import PRESS_PAYLOAD
from agent.enroll import read_take, update_adaptation
from agent.errors import HomeAgentError, PayloadError
from agent.messages import InboundMessage

log = logging.getLogger(__name__)

LATEST = None  # a request for the latest capture not yet marked
QUEUE_SIZE = 8  # presses beyond this while learning are refused (counted), not queued without bound
HEARTBEAT_LIMIT = 120.0  # one learning run may take this long before the worker counts as stuck
STOP_WAIT = 30.0  # a stop waits this long for a learning run to finish (it takes seconds)


class FalseWakeMarker:
    """The worker that learns marked captures (a stage: the app starts and stops it)."""

    name = "false_wake"

    def __init__(self, config: Config, captures: CaptureStore, on_learned: Callable[[], None]) -> None:
        self.config = config
        self.captures = captures
        self.on_learned = on_learned
        self._requests: queue.Queue[Path | None] = queue.Queue(QUEUE_SIZE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy_since: float | None = None
        self._counts = Counts("false_wakes_marked", "false_wakes_refused")

    # ----------------------------------------------------------------- requests (any thread)

    def on_command(self, message: InboundMessage) -> None:
        """MQTT handler of ``Topics.last_wake_false`` (paho's thread)."""
        if message.payload != PRESS_PAYLOAD.encode():
            raise PayloadError(f"last_wake_false takes exactly {PRESS_PAYLOAD}, got {message.payload[:32]!r}")
        self.request(LATEST)

    def request(self, path: Path | None) -> None:
        """Learn ``path`` (None: the latest capture not yet marked) as a false wake, soon."""
        try:
            self._requests.put_nowait(path)
        except queue.Full:
            self._counts.add("false_wakes_refused")
            log.error("false wake not marked: %d requests are already waiting", QUEUE_SIZE)

    def stats(self) -> dict[str, int]:
        return self._counts.snapshot()

    # ----------------------------------------------------------------- the stage

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="false-wake", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_WAIT)

    def healthy(self, now: float) -> bool:
        busy = self._busy_since
        alive = self._thread is not None and self._thread.is_alive()
        return alive and (busy is None or now - busy < HEARTBEAT_LIMIT)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                path = self._requests.get(timeout=0.5)
            except queue.Empty:
                continue
            if self._stop.is_set():
                return
            self._busy_since = time.monotonic()
            try:
                self.learn(path)
            finally:
                self._busy_since = None

    # ----------------------------------------------------------------- learning

    def learn(self, path: Path | None) -> bool:
        """Learn one capture as a not-word; True when it was learned (and the adaptation reloaded)."""
        target = path if path is not None else self.captures.latest_unmarked()
        if target is None:
            self._counts.add("false_wakes_refused")
            log.error("false wake not marked: no capture to mark in %s (captures are kept only with "
                      "[voice] capture = true, after a wake word)", self.captures.directory)
            return False
        try:
            take = read_take(target, need_utterance=False)
            model, bank = load_model_and_bank(self.config)
            update = update_adaptation(self.config, Store.of(self.config), model, bank, positives=[],
                                       negatives=[take], word=None)
            self.captures.mark(target)
        except HomeAgentError as err:
            self._counts.add("false_wakes_refused")
            log.error("false wake not marked, nothing changed: %s", err)
            return False
        self._counts.add("false_wakes_marked")
        log.info("false wake %s learned in %.1f s: %s", target.name, update.seconds,
                 "; ".join(update.adaptation.describe()))
        for name, words in update.still_waking:
            log.warning("%s still wakes %s (too close to real recordings of the word to reject)", name,
                        ", ".join(words))
        self.on_learned()
        return True
