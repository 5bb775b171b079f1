"""A tiny persistent JSON key/value store (the mute switch and other small state that survives restarts).

Writes are atomic (temp file in the same folder, fsync, ``os.replace``), so a power cut leaves either the
old or the new file. A corrupt file is moved aside to ``<name>.corrupt-<timestamp>`` and the store starts
empty: losing a mute flag is better than a daemon that cannot start.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from agent.atomic_file import replace_atomically
from agent.errors import StateError

log = logging.getLogger(__name__)

DEFAULT_NAME = "state.json"


class StateStore:
    """JSON-serialisable values by string key, persisted on every ``set``. Thread-safe."""

    def __init__(self, directory: Path, name: str = DEFAULT_NAME) -> None:
        self.path = directory / name
        self._lock = threading.Lock()
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StateError(
                f"cannot create the state directory {directory}: {err.strerror} "
                "(set agent.state_dir, or STATE_DIRECTORY under systemd)"
            ) from err
        self._data = self._load()

    def _load(self) -> dict[str, Any]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise StateError(f"cannot read the state file {self.path}: {err.strerror}") from err
        except UnicodeDecodeError as err:
            return self._set_aside(f"not UTF-8 ({err.reason})")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            return self._set_aside(f"invalid JSON ({err.msg} at line {err.lineno})")
        if not isinstance(data, dict):
            return self._set_aside(f"a JSON {type(data).__name__}, not an object")
        return data

    def _set_aside(self, reason: str) -> dict[str, Any]:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            os.replace(self.path, aside)
        except OSError as err:
            raise StateError(f"state file {self.path} is corrupt ({reason}) and cannot be moved aside: "
                             f"{err.strerror}") from err
        log.error("state file %s is corrupt (%s); moved it to %s and starting with empty state",
                  self.path, reason, aside)
        return {}

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            return copy.deepcopy(self._data.get(key, default))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._data)

    def set(self, key: str, value: Any) -> None:
        """Store ``value`` and write the file. Raises StateError when the file cannot be written (the value
        is kept in memory either way)."""
        with self._lock:
            self._data[key] = copy.deepcopy(value)
            text = json.dumps(self._data, indent=1, sort_keys=True)
            self._write(text)

    def _write(self, text: str) -> None:
        try:
            with replace_atomically(self.path, "w", encoding="utf-8") as handle:
                handle.write(text)
        except OSError as err:
            raise StateError(f"cannot write state to {self.path}: {err.strerror}") from err
