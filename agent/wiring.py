"""The one place that builds the daemon: the link, the outbox, the action table and every stage, from the
config. Each part gets only what it needs (callables and queues), never the supervisor; ``App`` then only
runs what was built here.

The flow it wires:
- telemetry: MQTT -> ``TelemetryStage`` -> ``Reading`` -> readings queue (drop oldest) -> anomaly stage
  -> ``AnomalyPublisher`` (alert changes through the outbox) and ``on_anomaly`` actions;
- voice: audio -> ``VoiceStage`` -> ``ActionDispatcher.request_action`` -> MQTT (never retained);
- Home Assistant: ``HomeAssistantStage`` (discovery, mute switch, states, diagnostics).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.actions import ActionTable
from agent.app import App, RunOptions
from agent.config import Config
from agent.dispatch import ActionDispatcher, AnomalyPublisher
from agent.errors import HomeAgentError
from agent.homeassistant import HomeAssistantStage
from agent.messages import Reading
from agent.mqtt_link import MqttLink, own_client_id
from agent.outbox import FILE_NAME as OUTBOX_FILE
from agent.outbox import Outbox
from agent.queues import DropOldestQueue
from agent.state import StateStore
from agent.telemetry_stage import TelemetryStage
from agent.topics import Topics
from agent.validate import load_checked

if TYPE_CHECKING:
    from agent.voice import VoiceStage

log = logging.getLogger(__name__)

READINGS_QUEUE_SIZE = 1000  # readings waiting for the anomaly stage; the oldest is dropped beyond
# Watchdog health (WATCHDOG=1 is withheld while any limit is exceeded; systemd restarts after WatchdogSec=):
AUDIO_MAX_SILENCE = 2.0  # an open, unmuted audio source must deliver frames at least this often
READINGS_MAX_FULL = 60.0  # the anomaly stage's input queue may stay full this long (it is not draining)


@dataclass(frozen=True, slots=True)
class Daemon:
    """The parts of one configuration's daemon; ``app`` runs them."""

    app: App
    link: MqttLink
    outbox: Outbox
    actions: ActionDispatcher
    telemetry: TelemetryStage
    homeassistant: HomeAssistantStage
    anomaly_events: AnomalyPublisher
    readings: DropOldestQueue[Reading] | None  # the anomaly stage's input (None: no stream is scored)
    voice: VoiceStage | None


def build(config: Config, *, config_path: Path | None = None, options: RunOptions | None = None) -> Daemon:
    """Build the daemon for ``config``; nothing is started (``daemon.app.run()`` does)."""
    options = options or RunOptions()
    table = ActionTable(dict(config.actions))
    # `run --audio` is usually a second process next to the service: its own client id, so the broker
    # does not disconnect one for the other (the agent-id check then tells it the service runs).
    client_id = own_client_id(config, "run") if options.audio is not None else None
    link = MqttLink(config, extra_allowed_topics=table.allowed_topics, client_id=client_id)
    state = StateStore(config.agent.resolved_state_dir)  # StateError naming the state directory
    # Must-deliver messages (anomaly events) go through the on-disk outbox; voice actions never do
    # (they expire instead). A corrupt outbox is moved aside inside; StateError only if unusable.
    outbox = Outbox(config.agent.resolved_state_dir / OUTBOX_FILE,
                    max_messages=config.outbox.max_messages, agent_id=config.agent.id)
    outbox.attach(link)
    app = App(config, link, outbox, config_path=config_path, options=options, needs_restart=needs_new_app)
    try:
        daemon = _build_parts(config, options, app, table, state)
    except BaseException:
        app.discard()  # nothing was started; the previous App may be built again in this process
        raise
    return daemon


def _build_parts(config: Config, options: RunOptions, app: App, table: ActionTable,
                 state: StateStore) -> Daemon:
    link, outbox = app.link, app.outbox
    readings: DropOldestQueue[Reading] | None = (
        DropOldestQueue(READINGS_QUEUE_SIZE) if config.anomaly_active else None)
    telemetry = TelemetryStage(config, publish=link.publish, resubscribe=link.resubscribe,
                               count_bad_payload=link.stats.count_bad_payload,
                               readings=readings, call_later=app.call_later)
    home = HomeAssistantStage(config, state, publish=link.publish,
                              subscribe=link.subscribe, call_later=app.call_later, counters=app.counters,
                              sensor_values=telemetry.last_values, connected=lambda: link.connected)
    actions = ActionDispatcher(config, table, publish=link.publish, resubscribe=link.resubscribe,
                               allow_topics=link.set_extra_allowed_topics,
                               is_muted=home.is_muted)
    anomaly_events = AnomalyPublisher(config, store=outbox.publish, send=outbox.publish_volatile)
    app.add_counters(lambda: {**link.stats.snapshot(), "queued": link.queued})
    app.add_counters(outbox.stats)
    for part in (telemetry, actions, home):
        app.add_counters(part.counters)
        app.add_reloader(part.prepare_reload)
    app.add_connect_listener(home.on_connected)
    app.add_status_listener(home.publish_diagnostics)
    app.add_stage(home)
    app.add_stage(telemetry)

    voice = None
    if config.voice_active or options.audio is not None:
        voice = _voice_stage(config, options, app, actions, home)
        _add_voice(app, voice, home)
    elif options.exit_at_end:
        log.info("--exit-at-end ignored: voice is off (no [[voice.commands]] and no --audio)")
    if readings is not None:
        from agent.anomaly import build_stage  # readings queue -> detector -> publish_anomaly / on_anomaly

        anomaly = build_stage(config, readings, anomaly_events.publish_anomaly, actions.request_action)
        app.add_stage(anomaly)
        app.add_counters(anomaly.counters)
        app.watch_queue("readings", readings, max_full=READINGS_MAX_FULL)
    return Daemon(app=app, link=link, outbox=outbox, actions=actions, telemetry=telemetry, homeassistant=home,
                  anomaly_events=anomaly_events, readings=readings, voice=voice)


def _add_voice(app: App, voice: VoiceStage, home: HomeAssistantStage) -> None:
    app.add_stage(voice)
    if app.config.voice.capture:
        _add_capture(app, voice)
    app.add_counters(voice.stats)  # the voice stage's counts and its audio source's (dropped_samples)
    app.add_reloader(lambda _new: voice.reload_adaptation)
    app.add_status(lambda: "muted" if home.muted else "listening")
    # Watchdog: audio frames keep arriving while the source is open and unmuted; a source that is
    # being reopened (unplugged microphone) or ended is not wedged.
    app.watch_progress("audio", voice.stats, progress=("samples", "muted_chunks"),
                       retrying=("open_failures", "audio_errors"),
                       paused=lambda: home.muted or voice.finished, max_silence=AUDIO_MAX_SILENCE)


def _add_capture(app: App, voice: VoiceStage) -> None:
    """``[voice] capture``: the audio around each wake kept on the voice stage, the worker that learns a
    capture marked as a false wake, its command topic (the Home Assistant button) and its counters."""
    from agent.capture import CaptureStore, WakeCapture
    from agent.false_wake import FalseWakeMarker

    config = app.config
    captures = CaptureStore.of(config)
    marker = FalseWakeMarker(config, captures, on_learned=voice.reload_adaptation)
    capture = WakeCapture(captures, wake_word=config.voice.wake_word, window_seconds=config.voice.wake_window,
                          confirm_seconds=config.voice.confirm_window, on_false_wake=marker.request)
    voice.capture = capture
    app.add_stage(marker)
    app.add_counters(lambda: {**marker.stats(), **capture.stats()})
    app.link.subscribe(Topics.from_config(config).last_wake_false, marker.on_command, qos=1)


def _voice_stage(config: Config, options: RunOptions, app: App, actions: ActionDispatcher,
                 home: HomeAssistantStage) -> VoiceStage:
    """Load the model and check the vocabulary now (startup errors are ModelError / ConfigError); a file
    given with ``--audio`` is opened now too, so a bad file fails at startup rather than in the thread."""
    # Here: the keyword model is loaded only when voice is on.
    from agent.audio import FileSource, create_source
    from agent.voice import VoiceStage, load_pipeline

    link = app.link
    pipeline = load_pipeline(config)
    spec = options.audio or config.audio.source
    source = create_source(spec, config.audio, resolve=None if options.audio else config.resolve_path)
    if source.finite and isinstance(source, FileSource):
        source.open()
        source.close()  # reopened by the thread; this only validated it
    exit_at_end = options.exit_at_end
    if exit_at_end and not source.finite:
        log.warning("--exit-at-end has no effect with the %s", source.description)
    arbiter = None
    if config.arbitration is not None:
        from agent.arbitration import GroupArbiter  # here: only a daemon in a group talks to one

        arbiter = GroupArbiter(config, publish=link.publish, subscribe=link.subscribe,
                               call_later=app.call_later)
        app.add_counters(arbiter.counters)

    def queued() -> int:
        return link.queued + (arbiter.undecided if arbiter is not None else 0)

    return VoiceStage(config=config, pipeline=pipeline, source=source, publish=link.publish,
                      request_action=actions.request_action, is_muted=home.is_muted,
                      queued=queued, wait_online=link.wait_connected,
                      on_end=app.request_stop if exit_at_end else None, arbiter=arbiter)


def _anomaly_wiring(config: Config) -> list[tuple[str, bool, str | None]]:
    """What the anomaly stage is built with: which streams it scores and their on_anomaly actions."""
    return [(stream.sensor, stream.anomaly, stream.on_anomaly) for stream in config.telemetry]


def needs_new_app(old: Config, new: Config) -> bool:
    """Telemetry, actions and Home Assistant options apply in place; anything a stage was built with
    (including the streams the anomaly stage scores and their on_anomaly actions) rebuilds the app."""
    in_place = {"telemetry", "actions", "homeassistant", "source_path"}
    for name in type(old).model_fields:
        if name not in in_place and getattr(old, name) != getattr(new, name):
            return True
    return (old.homeassistant.discovery_prefix != new.homeassistant.discovery_prefix
            or old.homeassistant.enabled != new.homeassistant.enabled
            or _anomaly_wiring(old) != _anomaly_wiring(new))


# --------------------------------------------------------------------- CLI entry point


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
    daemon = build(config, config_path=config_path, options=options)
    while True:
        result = daemon.app.run()
        if result.restart_with is None:
            return result.exit_code
        daemon = next_daemon(daemon, result.restart_with, options)


def next_daemon(previous: Daemon, new: Config, options: RunOptions) -> Daemon:
    """The daemon for a reloaded (already validated) config. Should building it still fail (a file that
    vanished since), the previous config is built again: a reload never stops the agent."""
    config_path = previous.app.config_path
    try:
        daemon = build(new, config_path=config_path, options=options)
    except HomeAgentError as err:
        log.error("could not start with the new configuration; going back to the previous one: %s", err)
        daemon = build(previous.app.config, config_path=config_path, options=options)
        _carry_over(daemon, previous)
        daemon.app.reload_rejected(str(err))
        return daemon
    _carry_over(daemon, previous)
    return daemon


def _carry_over(daemon: Daemon, previous: Daemon) -> None:
    """What the previous config's daemon knew: thermostats' setpoints, the last readings of streams still
    configured, the reload counters and status."""
    daemon.actions.carry_over(previous.actions)
    daemon.telemetry.carry_over(previous.telemetry)
    daemon.app.carry_over(previous.app)
