"""The one validation path: everything start-up checks except connecting to the broker.

``check-config``, ``run`` (before anything starts) and a reload (before anything is swapped) all call
``load_checked`` (the schema, then ``validate``); so a config ``check-config`` accepts starts, and one it
rejects is rejected by the running agent with the same keys named. It reads what the config points at
(password file, TLS files, audio file, state directory) and loads the keyword model against the configured
phrases, so nothing left to start-up can fail on the user's input.

Every problem is collected and raised as one ``ConfigError``, one line per problem, each naming its key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from agent.config import STATE_DIR_ENV, Config, load_config
from agent.errors import AudioError, ConfigError, ModelError

AUDIO_OVERRIDE_KEY = "--audio"
_KEYED = re.compile(r"^[\w$.-]+: ")  # a problem line that names its key (gets the file name appended)


def load_checked(path: Path, *, audio: str | None = None) -> Config:
    """The config file, after every check start-up makes (ConfigError naming each bad key)."""
    config = load_config(path)
    validate(config, audio=audio)
    return config


def validate(config: Config, *, audio: str | None = None) -> None:
    """Raise ConfigError (every problem, keys named) unless ``config`` can start as configured.

    ``audio``: ``run --audio``'s override of ``[audio] source`` (it also switches the voice stage on)."""
    checks: list[Callable[[], None]] = [
        lambda: _check_password(config),
        lambda: _check_tls(config),
        lambda: _check_state_dir(config),
    ]
    if config.voice_active or audio is not None:
        checks += [lambda: _check_audio(config, audio), lambda: _check_voice_model(config)]
    problems: list[str] = []
    for check in checks:
        try:
            check()
        except ConfigError as err:
            problems += str(err).splitlines()
    if problems:
        source = f" ({config.source_path.name})" if config.source_path is not None else ""
        raise ConfigError("\n".join(line + source if _KEYED.match(line) else line for line in problems))


def _check_password(config: Config) -> None:
    config.mqtt.password()  # ConfigError naming mqtt.password_file when it cannot be read


def _check_tls(config: Config) -> None:
    if config.mqtt.tls is None:
        return
    from agent.mqtt_tls import build_tls_context  # ssl only where TLS is configured

    build_tls_context(config)  # ConfigError naming the file and its key


def _check_state_dir(config: Config) -> None:
    """The state directory exists and is writable, or can be created (its nearest existing parent is)."""
    directory = config.agent.resolved_state_dir
    key = f"${STATE_DIR_ENV}" if os.environ.get(STATE_DIR_ENV) else "agent.state_dir"
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}: {existing} is not a directory (state directory {directory})")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = ("is not writable" if existing == directory
                else f"cannot be created ({existing} is not writable)")
        raise ConfigError(f"{key}: {directory} {what} by this user (uid {os.getuid()}); under systemd the "
                          f"service's own user writes it, so run check-config as root")


def _check_audio(config: Config, override: str | None) -> None:
    from agent.audio import FileSource, create_source

    spec = override if override is not None else config.audio.source
    key = AUDIO_OVERRIDE_KEY if override is not None else "audio.source"
    try:
        resolve = None if override is not None else config.resolve_path
        source = create_source(spec, config.audio, resolve=resolve)
        if isinstance(source, FileSource):
            source.open()  # header, format and sample rate
            source.close()
    except AudioError as err:
        raise ConfigError(f"{key}: {err}") from err


def _check_voice_model(config: Config) -> None:
    """Load the keyword model and build the pipeline: the phrases' words against the model's labels,
    threshold overrides, the wake word, confirm words."""
    from agent.voice import load_pipeline

    try:
        load_pipeline(config)  # ConfigError names voice.commands.N.say, voice.thresholds, ...
    except ModelError as err:
        raise ConfigError(f"voice.model: {err}") from err

