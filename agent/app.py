"""The supervisor: runs the daemon that ``agent.wiring`` built.

Threads, not asyncio: the main thread runs a small loop (timers, signals, a one-second tick); the MQTT
link owns its own threads; stages (voice, anomaly, Home Assistant...) bring their own worker threads and
plug in via ``App.add_stage``. The App starts and stops the link, the outbox and the stages, checks their
health for the sd_notify watchdog, merges their counters into the diagnostics and handles SIGHUP reloads.
It builds nothing and no stage imports it: stages get callables (``call_later``, ``counters``...).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

from agent import __version__
from agent.config import Config
from agent.counts import Counts
from agent.discovery import CONFIG_STATUS_KEY
from agent.errors import ActionError, ConfigError
from agent.health import CounterWatch, HealthRegistry
from agent.sdnotify import ServiceNotifier
from agent.topics import Topics
from agent.validate import load_checked

if TYPE_CHECKING:
    import queue

    from agent.mqtt_link import MqttLink
    from agent.outbox import Outbox

log = logging.getLogger(__name__)

EXIT_OK = 0

TICK_INTERVAL = 1.0  # the main loop's heartbeat (sd_notify watchdog, stage health)

Reloader = Callable[[Config], Callable[[], None]]  # prepare(new config) -> apply; raises to reject it


class Stage(Protocol):
    """A worker the supervisor starts, stops and asks about its health (voice, anomaly, outbox...)."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def healthy(self, now: float) -> bool: ...


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Command-line overrides of ``run``."""

    audio: str | None = None
    exit_at_end: bool = False


@dataclass(frozen=True, slots=True)
class RunResult:
    exit_code: int
    restart_with: Config | None = None  # set when a reload changed what needs a fresh MQTT connection


class App:
    """Runs the main loop for one configuration (a reload that touches what the stages were built with
    builds a new one, see ``agent.wiring``)."""

    def __init__(self, config: Config, link: MqttLink, outbox: Outbox, *, config_path: Path | None = None,
                 options: RunOptions | None = None,
                 needs_restart: Callable[[Config, Config], bool] = lambda _old, _new: False) -> None:
        self.config = config
        self.config_path = config_path if config_path is not None else config.source_path
        self.options = options or RunOptions()
        self.topics = Topics.from_config(config)
        self.link = link
        self.outbox = outbox
        self._needs_restart = needs_restart
        self._counts = Counts("reloads", "reload_failures")
        self._stages: list[Stage] = []
        self._stage_health: dict[str, bool] = {}
        self._counter_sources: list[Callable[[], Mapping[str, Any]]] = []
        self._reloaders: list[Reloader] = []
        self._status_parts: list[Callable[[], str]] = []
        self._watched_queues: list[tuple[str, queue.Queue[Any], float]] = []
        self._connect_listeners: list[Callable[[], None]] = []
        self._status_listeners: list[Callable[[], None]] = []

        # Main-loop plumbing: timers and a self-pipe that also receives signal wake-ups.
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._timers_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._loop_thread: int | None = None  # the thread running the main loop (it needs no wake-up)
        self._stop_requested = False
        self._stop_signal: str | None = None
        self._reload_requested = False
        self._restart_with: Config | None = None
        self._started_mono = time.monotonic()
        self._first_connect_done = False
        # systemd: READY=1 / STATUS= / WATCHDOG=1 / STOPPING=1 / RELOADING=1 (no-ops outside systemd).
        self.health = HealthRegistry()
        self.notifier = ServiceNotifier(self._watchdog_health)
        self._progress_watches: list[CounterWatch] = []
        self._mqtt_sent_seen = -1
        self._status_note = ""
        self._config_status = "ok"  # diagnostics: "ok" or why the last reload was rejected

    # ----------------------------------------------------------------- extension points (for agent.wiring)

    def add_stage(self, stage: Stage) -> None:
        """Register a worker; it is started with the app (after MQTT) and stopped before the link."""
        self._stages.append(stage)

    def add_counters(self, source: Callable[[], Mapping[str, Any]]) -> None:
        """A part's own counters, merged into the diagnostics (e.g. arbitrations won and lost)."""
        self._counter_sources.append(source)

    def add_reloader(self, prepare: Reloader) -> None:
        """``prepare(new)`` runs on the main thread when a SIGHUP reload keeps this app: it builds what it
        needs from the new config (ConfigError / ActionError reject the reload) and returns the callable
        that applies it, run once every part prepared without error."""
        self._reloaders.append(prepare)

    def add_status(self, part: Callable[[], str]) -> None:
        """One more part of the ``systemctl status`` line (e.g. "listening")."""
        self._status_parts.append(part)

    def add_connect_listener(self, listener: Callable[[], None]) -> None:
        """``listener()`` runs on the main thread after every connection to the broker."""
        self._connect_listeners.append(listener)

    def add_status_listener(self, listener: Callable[[], None]) -> None:
        """``listener()`` runs on the main thread when a reload was rejected (republish the diagnostics)."""
        self._status_listeners.append(listener)

    def watch_queue(self, name: str, watched: queue.Queue[Any], *, max_full: float) -> None:
        """A stage's input queue may stay full at most ``max_full`` seconds (it is not draining)."""
        self._watched_queues.append((name, watched, max_full))

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the main thread (thread-safe)."""
        self.call_later(0.0, callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        with self._timers_lock:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), callback))
        # The main loop itself (a timer re-arming itself, a stage starting) computes its next wait after this
        # returns: waking it would only turn the loop once more for nothing.
        if threading.get_ident() != self._loop_thread:
            self._wake()

    def healthy(self, now: float) -> tuple[bool, list[str]]:
        """(all stages healthy, names of unhealthy ones); the shape sd_notify's health check expects."""
        bad = [name for name, ok in self._stage_health.items() if not ok]
        return (not bad, bad)

    def counters(self) -> dict[str, Any]:
        """Everything the diagnostics topic reports."""
        counts = self._counts.snapshot()
        return {
            "uptime": int(time.monotonic() - self._started_mono),
            **counts,
            **{k: v for source in self._counter_sources for k, v in source().items()},
            CONFIG_STATUS_KEY: self._config_status,
            "sw_version": __version__,
        }

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self.link.add_connect_listener(self._on_link_connected)
        self.link.start()
        self.outbox.start()
        for stage in self._stages:
            log.info("starting stage %s", stage.name)
            stage.start()
            self._stage_health[stage.name] = True
        # Connected but not sending while messages wait: the link is wedged. The limit leaves paho's own
        # keepalive (1.5x) time to notice a dead broker first; a disconnected link is not wedged.
        self.health.register("mqtt", max_silence=2.0 * self.config.mqtt.keepalive + 10.0)
        for name, _watched, max_full in self._watched_queues:
            self.health.register(name, max_full=max_full)
        self.notifier.status(f"connecting to {self.config.mqtt.host}:{self.config.mqtt.port}")
        self.call_later(self.config.service.ready_grace, self._ready_grace_passed)

    def stop(self) -> None:
        self._on_stopping()
        for stage in reversed(self._stages):
            try:
                stage.stop()
            except Exception:
                log.exception("stage %s failed to stop cleanly", stage.name)
        self.link.stop(self.config.service.stop_timeout)
        self.outbox.close()  # after the link: records what the final flush delivered
        self._wake_r.close()
        self._wake_w.close()

    def discard(self) -> None:
        """Release what the constructor opened, for an App that was never started."""
        self.outbox.close()
        self._wake_r.close()
        self._wake_w.close()

    def request_stop(self) -> None:
        self._stop_requested = True
        self._wake()

    def request_reload(self) -> None:
        self._reload_requested = True
        self._wake()

    def run(self) -> RunResult:
        """Start, serve until SIGTERM/SIGINT (or a fatal MQTT error), stop. Installs signal handlers."""
        previous = self._install_signals()
        self._loop_thread = threading.get_ident()
        try:
            self.start()
            log.info("home-agent %s running as %r (%s)", __version__, self.config.agent.id, self.topics.base)
            next_tick = time.monotonic()
            tick_interval = min(TICK_INTERVAL, self.notifier.ping_interval or TICK_INTERVAL)
            while not self._stop_requested:
                if self._reload_requested:
                    self._reload_requested = False
                    log.info("SIGHUP: reloading the configuration")
                    self.notifier.reloading()
                    self._reload()
                    if self._restart_with is not None:
                        break  # the next App sends READY=1 once it is connected
                    self.notifier.reloaded(self._status_line())
                now = time.monotonic()
                self._run_due_timers(now)
                if now >= next_tick:
                    self._on_tick(now)
                    next_tick = max(next_tick + tick_interval, now)
                if self.link.fatal_error is not None:
                    break
                self._wait(min(next_tick, self._next_timer_due()) - time.monotonic())
        finally:
            self._restore_signals(previous)
            if self._stop_signal is not None:
                log.info("received %s: stopping", self._stop_signal)
            self.stop()
        if self.link.fatal_error is not None:
            raise self.link.fatal_error
        return RunResult(EXIT_OK, self._restart_with)

    # ----------------------------------------------------------------- hooks for sd_notify (issue: service)

    def _on_tick(self, now: float) -> None:
        """Runs every TICK_INTERVAL on the main thread. HOOK: send WATCHDOG=1 / STATUS= from here."""
        for stage in (self.outbox, *self._stages):
            try:
                ok = stage.healthy(now)
            except Exception:
                log.exception("health check of stage %s failed", stage.name)
                ok = False
            if ok != self._stage_health.get(stage.name, True):
                if ok:
                    log.info("stage %s healthy again", stage.name)
                else:
                    log.error("stage %s is unhealthy", stage.name)
            self._stage_health[stage.name] = ok
        for watch in self._progress_watches:
            watch.poll(now)
        sent = self.link.stats.messages_out
        if not self.link.connected or self.link.queued == 0 or sent != self._mqtt_sent_seen:
            self.health.beat("mqtt", now)
        self._mqtt_sent_seen = sent
        for name, watched, _max_full in self._watched_queues:
            self.health.report_queue(name, watched.qsize(), watched.maxsize, now)
        if self.notifier.is_ready or now - self._started_mono > 2.0:  # not "unreachable" while connecting
            self.notifier.status(self._status_line())
        self.notifier.tick(now)

    def _on_first_connect(self) -> None:
        """Runs once on the main thread after the first MQTT connection. HOOK: send READY=1 from here."""
        log.info("online after %.2f s", time.monotonic() - self._started_mono)
        self.notifier.ready(self._status_line())

    def _on_stopping(self) -> None:
        """Runs when the app starts shutting down. HOOK: send STOPPING=1 from here."""
        if self._restart_with is None:  # not when a reload replaces this App (systemd would stop us)
            self.notifier.stopping("stopping: flushing and publishing offline")

    def _ready_grace_passed(self) -> None:
        """READY=1 without a broker once [service] ready_grace has passed: the agent keeps retrying, and
        whatever depends on it must not wait for the broker forever."""
        if not self.notifier.is_ready:
            log.warning("no MQTT connection after %.0f s (service.ready_grace): reporting ready anyway",
                        self.config.service.ready_grace)
            self.notifier.ready(self._status_line())

    def _status_line(self) -> str:
        """One line for ``systemctl status``: the broker, the streams, whether it listens."""
        mqtt = self.config.mqtt
        streams = len(self.config.telemetry)
        parts = [f"connected to {mqtt.host}:{mqtt.port}" if self.link.connected
                 else f"broker {mqtt.host}:{mqtt.port} unreachable, retrying",
                 f"{streams} stream{'' if streams == 1 else 's'}"]
        parts += [part() for part in self._status_parts]
        if self._status_note:
            parts.append(self._status_note)
        return "; ".join(parts)

    def _watchdog_health(self, now: float) -> tuple[bool, list[str]]:
        """Stage health checks plus the heartbeat registry: what WATCHDOG=1 depends on."""
        stages_ok, bad_stages = self.healthy(now)
        registry_ok, problems = self.health.describe(now)
        return (stages_ok and registry_ok, bad_stages + problems)

    def watch_progress(self, name: str, read: Callable[[], Mapping[str, int]], *, progress: Sequence[str],
                       retrying: Sequence[str] = (), paused: Callable[[], bool] = lambda: False,
                       max_silence: float) -> None:
        """Derive a stage's heartbeat from its counters (see ``agent.health.CounterWatch``)."""
        self._progress_watches.append(CounterWatch(self.health, name, read, progress=progress,
                                                   retrying=retrying, paused=paused,
                                                   max_silence=max_silence))

    # ----------------------------------------------------------------- main loop plumbing

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed (stopping)
            self._wake_w.send(b"\0")

    def _wait(self, timeout: float) -> None:
        if timeout <= 0:
            return
        try:
            readable, _, _ = select.select([self._wake_r], [], [], timeout)
        except InterruptedError:  # a signal; its handler has run
            return
        if readable:
            with contextlib.suppress(BlockingIOError):
                while self._wake_r.recv(4096):
                    pass

    def _next_timer_due(self) -> float:
        with self._timers_lock:
            return self._timers[0][0] if self._timers else float("inf")

    def _run_due_timers(self, now: float) -> None:
        while True:
            with self._timers_lock:
                if not self._timers or self._timers[0][0] > now:
                    return
                _, _, callback = heapq.heappop(self._timers)
            try:
                callback()
            except Exception:
                log.exception("scheduled task %s failed", getattr(callback, "__name__", callback))

    def _install_signals(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return previous  # tests may run an App in a thread; they call request_stop() instead

        # Handlers only set flags (no logging, no locks); the wake-up fd makes the main loop notice at once.
        def on_stop(signum: int, _frame: FrameType | None) -> None:
            self._stop_signal = signal.Signals(signum).name
            self._stop_requested = True

        def on_reload(_signum: int, _frame: FrameType | None) -> None:
            self._reload_requested = True

        previous[-1] = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        handlers = {signal.SIGTERM: on_stop, signal.SIGINT: on_stop, signal.SIGHUP: on_reload}
        for signum, handler in handlers.items():
            previous[signum] = signal.signal(signum, handler)
        return previous

    @staticmethod
    def _restore_signals(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            if signum == -1:
                signal.set_wakeup_fd(handler)
            else:
                signal.signal(signum, handler)

    # ----------------------------------------------------------------- connection and reload (SIGHUP)

    def _on_link_connected(self) -> None:  # link thread
        self.call_soon(self._after_connect)

    def _after_connect(self) -> None:
        for listener in self._connect_listeners:
            listener()
        if not self._first_connect_done:
            self._first_connect_done = True
            self._on_first_connect()

    def _reload(self) -> None:
        """Re-read the config; take it only once it passed every start-up check (models loaded included).
        A rejected config leaves everything running as it was: logged, in STATUS= and the diagnostics."""
        self._counts.add("reloads")
        if self.config_path is None:
            self.reload_rejected("no config file to re-read")
            return
        try:
            new = load_checked(self.config_path, audio=self.options.audio)
            appliers = [prepare(new) for prepare in self._reloaders]
        except (ConfigError, ActionError) as err:
            self.reload_rejected(str(err))
            return
        self.reload_accepted()
        if self._needs_restart(self.config, new):
            log.warning("configuration reload changes settings the running stages were built with: "
                        "restarting the agent with the new configuration")
            self._restart_with = new
            return
        self.config = new
        for apply in appliers:
            apply()
        log.info("configuration reloaded from %s", self.config_path)

    def reload_rejected(self, reason: str) -> None:
        """The new config was not taken: say so in the journal, STATUS= and the diagnostics."""
        self._counts.add("reload_failures")
        log.error("configuration reload failed; keeping the running configuration:\n%s", reason)
        self._status_note = "new config rejected, old one running (see the journal)"
        first = reason.splitlines()[0] if reason else "unknown reason"
        self._config_status = f"reload rejected: {first}"[:250]  # a Home Assistant state holds 255
        if self.link.connected:
            for listener in self._status_listeners:
                listener()

    def reload_accepted(self) -> None:
        self._status_note = ""
        self._config_status = "ok"

    def carry_over(self, previous: App) -> None:
        """Take over what the App of the previous config knew (a restart-type reload): the reload counters
        and status (the parts carry over their own state, see ``agent.wiring``)."""
        self._counts.update(previous._counts.snapshot())
        self._status_note = previous._status_note
        self._config_status = previous._config_status
