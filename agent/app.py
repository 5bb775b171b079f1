"""The supervisor: the one place that wires every stage of the daemon together.

Threads, not asyncio: the main thread runs a small loop (timers, signals, a one-second tick); the MQTT
link owns its own threads; later stages (voice, anomaly) bring their own worker threads and plug in via
``App.add_stage``. Subscription handlers run on paho's thread and only parse and hand over; anything
slower (file writes, discovery) is scheduled onto the main thread with ``call_soon``.

Stages never import each other; they exchange records from ``agent.messages`` over bounded queues:
- telemetry: MQTT -> ``TelemetryIntake.parse`` -> ``Reading`` -> ``App.readings_queue()`` (drop oldest);
- actions: ``App.request_action(ActionRequest)`` -> ``ActionTable.render`` -> MQTT (never retained).
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import json
import logging
import queue
import random
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TypeVar

from agent import __version__
from agent.actions import ActionTable
from agent.config import Config, load_config
from agent.discovery import CONFIG_STATUS_KEY, discovery_messages, discovery_topic_filter
from agent.errors import ActionError, ConfigError, HomeAgentError, MqttError, PayloadError, StateError
from agent.health import CounterWatch, HealthRegistry
from agent.logutil import LogThrottle, suppressed_note
from agent.messages import ActionRequest, AnomalyEvent, Reading
from agent.mqtt_link import InboundMessage, MqttLink, Subscription, own_client_id
from agent.outbox import FILE_NAME as OUTBOX_FILE
from agent.outbox import Outbox
from agent.sdnotify import ServiceNotifier
from agent.state import StateStore
from agent.telemetry import REJECT_REASONS, TelemetryIntake
from agent.topics import Topics
from agent.validate import load_checked

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

TICK_INTERVAL = 1.0  # the main loop's heartbeat (sd_notify watchdog, stage health)
READINGS_QUEUE_SIZE = 1000  # readings waiting for the anomaly stage; the oldest is dropped beyond
STALE_SCAN_DELAY = 1.0  # after connecting, collect retained discovery configs this long before cleaning up
MUTE_KEY = "muted"
FIRE_STATE_WAIT = 1.5  # `home-agent action`: wait this long for retained device state (current setpoint)
# Watchdog health (WATCHDOG=1 is withheld while any limit is exceeded; systemd restarts after WatchdogSec=):
AUDIO_MAX_SILENCE = 2.0  # an open, unmuted audio source must deliver frames at least this often
READINGS_MAX_FULL = 60.0  # the anomaly stage's input queue may stay full this long (it is not draining)

T = TypeVar("T")


class Stage(Protocol):
    """A worker the supervisor starts, stops and asks about its health (voice, anomaly, outbox...)."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def healthy(self, now: float) -> bool: ...


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


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Command-line overrides of ``run`` (voice is a later stage; kept here so it can pick them up)."""

    audio: str | None = None
    exit_at_end: bool = False


@dataclass(frozen=True, slots=True)
class RunResult:
    exit_code: int
    restart_with: Config | None = None  # set when a reload changed what needs a fresh MQTT connection


def format_reading(value: float) -> str:
    """A sensor state payload: the shortest text that round-trips the float (HA parses it as a number)."""
    return repr(float(value))


class App:
    """Builds the link, the telemetry intake, the action table and Home Assistant discovery, and runs the
    main loop. One instance per configuration (a reload that touches ``[agent]``/``[mqtt]`` builds a new
    one)."""

    def __init__(self, config: Config, *, config_path: Path | None = None,
                 options: RunOptions | None = None) -> None:
        self.config = config
        self.config_path = config_path if config_path is not None else config.source_path
        self.options = options or RunOptions()
        self.topics = Topics.from_config(config)
        self.state = StateStore(config.agent.resolved_state_dir)
        self._intake = TelemetryIntake(list(config.telemetry))
        self._actions = ActionTable(dict(config.actions))
        # `run --audio` is usually a second process next to the service: its own client id, so the broker
        # does not disconnect one for the other (the agent-id check then tells it the service runs).
        client_id = own_client_id(config, "run") if self.options.audio is not None else None
        self.link = MqttLink(config, extra_allowed_topics=self._actions.allowed_topics, client_id=client_id)
        # Must-deliver messages (anomaly events) go through the on-disk outbox; voice actions never do
        # (they expire instead). A corrupt outbox is moved aside inside; StateError only if unusable.
        self.outbox = Outbox(config.agent.resolved_state_dir / OUTBOX_FILE,
                             max_messages=config.outbox.max_messages, agent_id=config.agent.id)
        self.outbox.attach(self.link)
        self._actions_lock = threading.Lock()
        self._readings: DropOldestQueue[Reading] = DropOldestQueue(READINGS_QUEUE_SIZE)
        self._readings_consumed = False
        self._throttle = LogThrottle()
        self._counts_lock = threading.Lock()
        self._counts = {"readings": 0, "telemetry_ignored": 0, "readings_rejected": 0,
                        **{f"rejected_{reason}": 0 for reason in REJECT_REASONS},
                        "actions_sent": 0, "actions_rejected": 0,
                        "announcements": 0, "stale_configs_removed": 0, "reloads": 0, "reload_failures": 0}
        self._last_values: dict[str, str] = {}
        self._anomaly_active: dict[str, bool] = {}  # per sensor, as last published (see publish_anomaly)
        self._stages: list[Stage] = []
        self._stage_health: dict[str, bool] = {}
        self._mute_listeners: list[Callable[[bool], None]] = []
        self._counter_sources: list[Callable[[], Mapping[str, int]]] = []
        self._reload_listeners: list[Callable[[], None]] = []
        self._muted = self._load_muted()

        # Discovery bookkeeping: what we announced, and retained configs of ours seen on the broker.
        self._discovery_lock = threading.Lock()
        self._announced: set[str] = set()
        self._seen_configs: set[str] = set()

        # Main-loop plumbing: timers and a self-pipe that also receives signal wake-ups.
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._timers_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
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

        self._subscriptions: list[Subscription] = []
        self._telemetry_subscriptions: list[Subscription] = []
        self._action_subscriptions: list[Subscription] = []
        self.link.add_connect_listener(self._on_link_connected)

    # ----------------------------------------------------------------- extension points

    def add_stage(self, stage: Stage) -> None:
        """Register a worker; it is started with the app (after MQTT) and stopped before the link."""
        self._stages.append(stage)

    def readings_queue(self) -> DropOldestQueue[Reading]:
        """The anomaly stage's input. Readings are only queued once someone asked for this queue."""
        self._readings_consumed = True
        return self._readings

    @property
    def muted(self) -> bool:
        return self._muted

    def add_mute_listener(self, listener: Callable[[bool], None]) -> None:
        """``listener(muted)`` runs on the main thread whenever the mute switch changes."""
        self._mute_listeners.append(listener)

    def add_counters(self, source: Callable[[], Mapping[str, int]]) -> None:
        """A stage's own counters, merged into the diagnostics (e.g. arbitrations won and lost)."""
        self._counter_sources.append(source)

    def add_reload_listener(self, listener: Callable[[], None]) -> None:
        """``listener()`` runs on the main thread after a SIGHUP reload that kept this app."""
        self._reload_listeners.append(listener)

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the main thread (thread-safe)."""
        self.call_later(0.0, callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        with self._timers_lock:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), callback))
        self._wake()

    def request_action(self, request: ActionRequest) -> int:
        """Render a named action and queue its commands (never retained). Voice requests expire
        ``ttl`` seconds (the request's, else the action's) after ``created_mono`` and are dropped rather
        than sent late. Returns the number of messages queued; raises ActionError when refused."""
        now = time.monotonic()
        try:
            if request.source == "voice" and self._muted:
                raise ActionError(f"action {request.action!r} refused: listening is muted")
            section = self.config.actions.get(request.action)
            ttl = request.ttl
            if ttl is None and request.source == "voice" and section is not None:
                ttl = section.ttl
            expires = request.created_mono + ttl if ttl is not None else None
            if expires is not None and now >= expires:
                raise ActionError(f"action {request.action!r} expired {now - expires:.2f} s before it "
                                  "could be sent")
            with self._actions_lock:
                commands = self._actions.render(request.action, now)
            for command in commands:
                self.link.publish(command.topic, command.payload, qos=command.qos, retain=False,
                                  expires_mono=expires)
        except ActionError as err:
            self._count("actions_rejected")
            log.warning("%s (requested by %s)", err, request.source)
            raise
        self._count("actions_sent")
        log.info("action %s (%s): %d message(s) queued", request.action, request.source, len(commands))
        return len(commands)

    def publish_anomaly(self, event: AnomalyEvent) -> str:
        """Publish an anomaly event on ``Topics.anomaly(sensor)`` (retained, QoS 1). Alerts starting or
        ending (``active`` changed, or the first event of a stream since start) go through the outbox:
        stored before they are sent, sent again after an outage or a restart until the broker acknowledged
        them. Score refreshes within an unchanged state are sent without storing: the next refresh
        supersedes them, and a durable write per reading would wear an SD card. Every payload carries a
        unique ``id`` for de-duplication; returns it. Thread-safe."""
        payload = {"score": event.score, "value": event.value, "kind": event.kind, "active": event.active,
                   "time": event.time}
        topic = self.topics.anomaly(event.sensor)
        with self._counts_lock:
            changed = self._anomaly_active.get(event.sensor) != event.active
            self._anomaly_active[event.sensor] = event.active
        if changed:
            return self.outbox.publish(topic, payload, qos=1, retain=True)
        return self.outbox.publish_volatile(topic, payload, qos=1, retain=True)

    def healthy(self, now: float) -> tuple[bool, list[str]]:
        """(all stages healthy, names of unhealthy ones); the shape sd_notify's health check expects."""
        bad = [name for name, ok in self._stage_health.items() if not ok]
        return (not bad, bad)

    def counters(self) -> dict[str, Any]:
        """Everything the diagnostics topic reports."""
        with self._counts_lock:
            counts = dict(self._counts)
        return {
            "uptime": int(time.monotonic() - self._started_mono),
            **self.link.stats.snapshot(),
            **counts,
            **self.outbox.stats(),
            **{k: v for source in self._counter_sources for k, v in source().items()},
            "readings_dropped": self._readings.dropped,
            "queued": self.link.queued,
            "muted": self._muted,
            CONFIG_STATUS_KEY: self._config_status,
            "sw_version": __version__,
        }

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._subscribe_all()
        self.link.start()
        self.outbox.start()
        for stage in self._stages:
            log.info("starting stage %s", stage.name)
            stage.start()
            self._stage_health[stage.name] = True
        self.call_later(self.config.homeassistant.diagnostics_interval, self._diagnostics_timer)
        # Connected but not sending while messages wait: the link is wedged. The limit leaves paho's own
        # keepalive (1.5x) time to notice a dead broker first; a disconnected link is not wedged.
        self.health.register("mqtt", max_silence=2.0 * self.config.mqtt.keepalive + 10.0)
        if self._readings_consumed:
            self.health.register("readings", max_full=READINGS_MAX_FULL)
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
        for stage in self._stages:
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
        if self._readings_consumed:
            self.health.report_queue("readings", self._readings.qsize(), READINGS_QUEUE_SIZE, now)
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
        if any(stage.name == "voice" for stage in self._stages):
            parts.append("muted" if self._muted else "listening")
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

    def _count(self, name: str, amount: int = 1) -> None:
        with self._counts_lock:
            self._counts[name] = self._counts.get(name, 0) + amount

    # ----------------------------------------------------------------- subscriptions

    def _subscribe_all(self) -> None:
        self._subscriptions.append(self.link.subscribe(self.topics.mute_set, self._on_mute_set, qos=1))
        if self.config.homeassistant.enabled:
            self._subscriptions.append(self.link.subscribe(self.topics.ha_status, self._on_ha_status))
        self._subscriptions.append(
            self.link.subscribe(discovery_topic_filter(self.config), self._on_discovery_config)
        )
        self._subscribe_telemetry()
        self._subscribe_action_states()

    def _subscribe_telemetry(self) -> None:
        for subscription in self._telemetry_subscriptions:
            self.link.unsubscribe(subscription)
        self._telemetry_subscriptions = [
            self.link.subscribe(topic_filter, self._on_telemetry)
            for topic_filter in self._intake.topic_filters()
        ]

    def _subscribe_action_states(self) -> None:
        for subscription in self._action_subscriptions:
            self.link.unsubscribe(subscription)
        self._action_subscriptions = [
            self.link.subscribe(topic, self._on_action_state) for topic in self._actions.state_topics()
        ]

    # The handlers below run on paho's thread: parse, hand over, return. PayloadError -> bad_payloads.

    def _on_telemetry(self, message: InboundMessage) -> None:
        outcome = self._intake.parse_detailed(message.topic, message.payload, message.retained, time.time())
        for reason, text in outcome.rejected:
            self._reject_reading(reason, text)
        readings = outcome.readings
        if not readings:
            if outcome.rejected:
                self.link.stats.count_bad_payload()  # nothing usable in it (counted once per message)
            else:
                self._count("telemetry_ignored")  # carries none of its streams' fields
            return
        self._count("readings", len(readings))
        for reading in readings:
            if self._readings_consumed:
                self._readings.offer(reading)
            value = format_reading(reading.value)
            if self._last_values.get(reading.sensor) == value:
                continue  # the broker retains this very state (and _after_connect restores it): no repeat
            self._last_values[reading.sensor] = value
            self.link.publish(self.topics.sensor_state(reading.sensor), value, retain=True)

    def _reject_reading(self, reason: str, text: str) -> None:
        """A stream refused a reading: counted per reason (diagnostics), logged once per reason and
        throttle interval."""
        with self._counts_lock:
            self._counts["readings_rejected"] += 1
            key = f"rejected_{reason}"
            self._counts[key] = self._counts.get(key, 0) + 1
        suppressed = self._throttle.ready(f"rejected:{reason}")
        if suppressed is not None:
            log.warning("telemetry: rejected a reading (%s): %s%s", reason, text, suppressed_note(suppressed))

    def _on_action_state(self, message: InboundMessage) -> None:
        with self._actions_lock:
            self._actions.observe_state(message.topic, message.payload)

    def _on_mute_set(self, message: InboundMessage) -> None:
        if message.payload not in (b"ON", b"OFF"):
            raise PayloadError(f"mute command must be exactly ON or OFF, got {message.payload[:32]!r}")
        muted = message.payload == b"ON"
        self.call_soon(lambda: self._set_muted(muted))

    def _on_ha_status(self, message: InboundMessage) -> None:
        if message.payload == b"online":
            delay = random.uniform(0.0, self.config.homeassistant.announce_jitter)
            log.info("Home Assistant is online: re-announcing in %.2f s", delay)
            self.call_later(delay, self._announce)

    def _on_discovery_config(self, message: InboundMessage) -> None:
        with self._discovery_lock:
            if not message.payload:
                self._seen_configs.discard(message.topic)
            elif message.retained:
                self._seen_configs.add(message.topic)

    def _on_link_connected(self) -> None:  # link thread
        self.call_soon(self._after_connect)

    def _after_connect(self) -> None:
        self._announce()
        self.call_later(STALE_SCAN_DELAY, self._remove_stale_configs)
        if not self._first_connect_done:
            self._first_connect_done = True
            self._on_first_connect()

    # ----------------------------------------------------------------- Home Assistant

    def _event_types(self) -> list[str]:
        """The voice intent event entity's types: the actions voice commands can fire (none: no entity)."""
        if not self.config.voice_active:
            return []
        return sorted({command.action for command in self.config.voice.commands})

    def _announce(self) -> None:
        """Publish every discovery config (retained), then the current states HA should show."""
        if self.config.homeassistant.enabled:
            messages = discovery_messages(self.config, event_types=self._event_types(),
                                          sw_version=__version__)
        else:
            messages = {}
        for topic, payload in messages.items():
            self.link.publish(topic, json.dumps(payload, separators=(",", ":")), qos=1, retain=True)
        with self._discovery_lock:
            self._announced = set(messages)
        self._count("announcements")
        self._publish_states()

    def _remove_stale_configs(self) -> None:
        """Delete (empty retained payload) our discovery configs the current config no longer has."""
        with self._discovery_lock:
            stale = sorted(self._seen_configs - self._announced)
            self._seen_configs -= set(stale)
        for topic in stale:
            log.info("removing stale Home Assistant entity config %s", topic)
            self.link.publish(topic, b"", qos=1, retain=True)
        if stale:
            self._count("stale_configs_removed", len(stale))

    def _publish_states(self) -> None:
        self.link.publish(self.topics.mute_state, b"ON" if self._muted else b"OFF", qos=1, retain=True)
        for sensor, value in list(self._last_values.items()):
            self.link.publish(self.topics.sensor_state(sensor), value, retain=True)
        self._publish_diagnostics()

    def _publish_diagnostics(self) -> None:
        payload = json.dumps(self.counters(), separators=(",", ":"), sort_keys=True)
        self.link.publish(self.topics.diagnostics, payload, retain=True)

    def _diagnostics_timer(self) -> None:
        try:
            self._publish_diagnostics()
        finally:
            self.call_later(self.config.homeassistant.diagnostics_interval, self._diagnostics_timer)

    # ----------------------------------------------------------------- mute switch

    def _load_muted(self) -> bool:
        value = self.state.get(MUTE_KEY, False)
        if not isinstance(value, bool):
            log.error("ignoring invalid %r in %s: %r (expected true/false)", MUTE_KEY, self.state.path, value)
            return False
        return value

    def _set_muted(self, muted: bool) -> None:
        changed = muted != self._muted
        self._muted = muted
        if changed:
            log.info("listening %s", "muted" if muted else "unmuted")
            try:
                self.state.set(MUTE_KEY, muted)
            except StateError as err:
                log.error("mute switch: %s (the new state holds until the daemon restarts)", err)
        self.link.publish(self.topics.mute_state, b"ON" if muted else b"OFF", qos=1, retain=True)
        if changed:
            for listener in self._mute_listeners:
                try:
                    listener(muted)
                except Exception:
                    log.exception("mute listener failed")

    # ----------------------------------------------------------------- reload (SIGHUP)

    def _reload(self) -> None:
        """Re-read the config; take it only once it passed every start-up check (models loaded included).
        A rejected config leaves everything running as it was: logged, in STATUS= and the diagnostics."""
        self._count("reloads")
        if self.config_path is None:
            self.reload_rejected("no config file to re-read")
            return
        try:
            new = load_checked(self.config_path, audio=self.options.audio)
            intake = TelemetryIntake(list(new.telemetry))
            actions = ActionTable(dict(new.actions))
        except (ConfigError, ActionError) as err:
            self.reload_rejected(str(err))
            return
        self.reload_accepted()
        if _needs_new_app(self.config, new):
            log.warning("configuration reload changes settings the running stages were built with: "
                        "restarting the agent with the new configuration")
            self._restart_with = new
            return
        old_announced = set(self._announced)
        self.config = new
        with self._actions_lock:
            actions.carry_setpoints(self._actions)
            self._intake = intake
            self._actions = actions
        self.link.set_extra_allowed_topics(actions.allowed_topics)
        self._subscribe_telemetry()
        self._subscribe_action_states()
        sensors = {stream.sensor for stream in new.telemetry}
        self._last_values = {k: v for k, v in self._last_values.items() if k in sensors}
        if self.link.connected:
            self._announce()
            with self._discovery_lock:
                self._seen_configs |= old_announced
            self._remove_stale_configs()
        for listener in self._reload_listeners:
            listener()
        log.info("configuration reloaded from %s", self.config_path)

    def reload_rejected(self, reason: str) -> None:
        """The new config was not taken: say so in the journal, STATUS= and the diagnostics."""
        self._count("reload_failures")
        log.error("configuration reload failed; keeping the running configuration:\n%s", reason)
        self._status_note = "new config rejected, old one running (see the journal)"
        first = reason.splitlines()[0] if reason else "unknown reason"
        self._config_status = f"reload rejected: {first}"[:250]  # a Home Assistant state holds 255
        if self.link.connected:
            self._publish_diagnostics()

    def reload_accepted(self) -> None:
        self._status_note = ""
        self._config_status = "ok"

    def carry_over(self, previous: App) -> None:
        """Take over what the App of the previous config knew (a restart-type reload): thermostats'
        setpoints, the last readings of streams still configured, the reload counters."""
        with previous._actions_lock, self._actions_lock:
            self._actions.carry_setpoints(previous._actions)
        sensors = {stream.sensor for stream in self.config.telemetry}
        self._last_values = {k: v for k, v in previous._last_values.items() if k in sensors}
        with previous._counts_lock:
            carried = {name: previous._counts[name] for name in ("reloads", "reload_failures")}
        with self._counts_lock:
            self._counts.update(carried)
        self._status_note = previous._status_note
        self._config_status = previous._config_status


def _anomaly_wiring(config: Config) -> list[tuple[str, bool, str | None]]:
    """What the anomaly stage is built with: which streams it scores and their on_anomaly actions."""
    return [(stream.sensor, stream.anomaly, stream.on_anomaly) for stream in config.telemetry]


def _needs_new_app(old: Config, new: Config) -> bool:
    """Telemetry, actions and Home Assistant options apply in place; anything a stage was built with
    (including the streams the anomaly stage scores and their on_anomaly actions) rebuilds the app."""
    in_place = {"telemetry", "actions", "homeassistant", "source_path"}
    for name in type(old).model_fields:
        if name not in in_place and getattr(old, name) != getattr(new, name):
            return True
    return (old.homeassistant.discovery_prefix != new.homeassistant.discovery_prefix
            or old.homeassistant.enabled != new.homeassistant.enabled
            or _anomaly_wiring(old) != _anomaly_wiring(new))


# --------------------------------------------------------------------- CLI entry points


def build_app(config: Config, *, config_path: Path | None, options: RunOptions) -> App:
    """Build the app and its stages. Later stages (voice, anomaly, outbox) are added here."""
    app = App(config, config_path=config_path, options=options)
    try:
        _add_stages(app, config, options)
    except BaseException:
        app.discard()  # nothing was started; the previous App may be built again in this process
        raise
    return app


def _add_stages(app: App, config: Config, options: RunOptions) -> None:
    if config.voice_active or options.audio is not None:
        from agent.voice import VoiceStage  # here: loads the keyword model only when voice is on

        voice = VoiceStage.from_app(app)  # ModelError / ConfigError / AudioError surface at startup
        app.add_stage(voice)
        app.add_reload_listener(voice.reload_adaptation)
        if config.voice.capture:
            from agent.false_wake import attach_capture  # the capture, its worker and command topic

            attach_capture(app, voice)
        # Watchdog: audio frames keep arriving while the source is open and unmuted; a source that is
        # being reopened (unplugged microphone) or ended is not wedged.
        app.watch_progress("audio", voice.stats, progress=("samples", "muted_chunks"),
                           retrying=("open_failures", "audio_errors"),
                           paused=lambda: app.muted or voice.finished, max_silence=AUDIO_MAX_SILENCE)
    elif options.exit_at_end:
        log.info("--exit-at-end ignored: voice is off (no [[voice.commands]] and no --audio)")
    if config.anomaly.enabled and any(stream.anomaly for stream in config.telemetry):
        from agent.anomaly import build_stage  # readings queue -> detector -> publish_anomaly / on_anomaly

        app.add_stage(build_stage(config, app.readings_queue(), app.publish_anomaly, app.request_action))


def run_daemon(args: argparse.Namespace) -> int:
    """``home-agent run``: serve until SIGTERM/SIGINT; SIGHUP re-reads the config."""
    config_path = Path(args.config)
    options = RunOptions(audio=getattr(args, "audio", None),
                         exit_at_end=bool(getattr(args, "exit_at_end", False)))
    config = load_checked(config_path, audio=options.audio)  # as check-config: exit 2 naming the key
    if threading.current_thread() is threading.main_thread():
        # Until App.run installs its handler (start-up; between two configurations after a reload) a
        # SIGHUP must not kill the daemon, which is its default action.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    app = build_app(config, config_path=config_path, options=options)
    while True:
        result = app.run()
        if result.restart_with is None:
            return result.exit_code
        app = _next_app(app, result.restart_with, options)


def _next_app(previous: App, new: Config, options: RunOptions) -> App:
    """The App for a reloaded (already validated) config. Should building it still fail (a file that
    vanished since), the previous config is built again: a reload never stops the agent."""
    try:
        app = build_app(new, config_path=previous.config_path, options=options)
    except HomeAgentError as err:
        log.error("could not start with the new configuration; going back to the previous one: %s", err)
        app = build_app(previous.config, config_path=previous.config_path, options=options)
        app.carry_over(previous)
        app.reload_rejected(str(err))
        return app
    app.carry_over(previous)
    return app


def _needs_device_state(config: Config, name: str) -> bool:
    section = config.actions[name]
    return section.delta is not None or (section.payload is not None and "setpoint" in section.payload)


def fire_action(args: argparse.Namespace) -> int:
    """``home-agent action NAME``: publish one configured action once (QoS >= 1), wait for the broker's
    acknowledgement, exit. Uses its own client id and no availability, so a running daemon is untouched."""
    config = load_config(Path(args.config))
    name: str = args.name
    if name not in config.actions:
        known = ", ".join(sorted(config.actions)) or "none configured"
        print(f"home-agent: unknown action {name!r} (configured actions: {known})", file=sys.stderr)
        return EXIT_USAGE
    actions = ActionTable(dict(config.actions))
    link = MqttLink(config, actions.allowed_topics, availability=False,
                    client_id=own_client_id(config, "action"))
    observed: set[str] = set()
    lock = threading.Lock()

    def on_state(message: InboundMessage) -> None:
        with lock:
            actions.observe_state(message.topic, message.payload)
            observed.add(message.topic)

    state_topics = actions.state_topics() if _needs_device_state(config, name) else []
    for topic in state_topics:
        link.subscribe(topic, on_state)
    timeout = float(getattr(args, "timeout", 10.0))
    link.start()
    try:
        if not link.wait_connected(timeout):
            if link.fatal_error is not None:
                raise link.fatal_error
            raise MqttError(f"cannot connect to the MQTT broker {config.mqtt.host}:{config.mqtt.port} "
                            f"within {timeout:g} s")
        deadline = time.monotonic() + FIRE_STATE_WAIT
        while state_topics and time.monotonic() < deadline:
            with lock:
                if observed >= set(state_topics):
                    break
            time.sleep(0.05)
        with lock:
            commands = actions.render(name, time.monotonic())
        delivered = threading.Semaphore(0)
        for command in commands:
            link.publish(command.topic, command.payload, qos=max(1, command.qos), retain=False,
                         on_delivered=delivered.release)
        deadline = time.monotonic() + timeout
        for command in commands:
            if not delivered.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise MqttError(f"the broker did not acknowledge the message to {command.topic} in time")
            print(f"{command.topic} {command.payload.decode('utf-8', 'replace')}")
    finally:
        link.stop(2.0)
    return EXIT_OK
