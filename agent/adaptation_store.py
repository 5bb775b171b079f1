"""The household adaptation's store (:mod:`agent.adaptation`): ``<state_dir>/adaptation`` holds the
household's recordings and the learned heads, every file written atomically with mode 0600."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.atomic_file import replace_atomically
from agent.config import Config
from agent.errors import StateError

ADAPTATION_DIR = "adaptation"
POSITIVE_DIR = "words"
NEGATIVE_DIR = "not_words"
HEADS_FILE = "heads.npz"
KEEP_AROUND_SECONDS = 0.25  # silence kept either side of a stored word: its windows see the word's edges


def write_atomically(path: Path, write: Any) -> None:
    """Write a state file through ``agent.atomic_file`` (mode 0600): a crash never leaves half a file."""
    try:
        with replace_atomically(path) as handle:
            write(handle)
    except OSError as err:
        raise StateError(f"cannot write {path}: {err.strerror or err}") from err


class Store:
    """``<state_dir>/adaptation``: ``words/<word>/NNN.npy``, ``not_words/NNN.npy`` and ``heads.npz``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def positive_dir(self) -> Path:
        return self.directory / POSITIVE_DIR

    @property
    def negative_dir(self) -> Path:
        return self.directory / NEGATIVE_DIR

    @classmethod
    def of(cls, config: Config) -> Store:
        return cls(config.agent.resolved_state_dir / ADAPTATION_DIR)

    def check_writable(self) -> None:
        probe = self.directory / ".probe"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise StateError(f"cannot write the adaptation to {self.directory}: {err.strerror or err} "
                             "(check [agent] state_dir)") from err

    def positives(self) -> dict[str, list[npt.NDArray[np.int16]]]:
        result: dict[str, list[npt.NDArray[np.int16]]] = {}
        root = self.positive_dir
        if root.is_dir():
            for folder in sorted(p for p in root.iterdir() if p.is_dir()):
                result[folder.name] = [self._read(p) for p in sorted(folder.glob("*.npy"))]
        return result

    def negatives(self) -> list[npt.NDArray[np.int16]]:
        return [self._read(p) for p in sorted(self.negative_dir.glob("*.npy"))]

    @staticmethod
    def _read(path: Path) -> npt.NDArray[np.int16]:
        try:
            return np.asarray(np.load(path, allow_pickle=False), dtype=np.int16)
        except (OSError, ValueError) as err:
            raise StateError(f"household recording {path} is unreadable: {err}") from err

    def add(self, folder: Path, recordings: Sequence[tuple[npt.NDArray[np.int16], tuple[int, int]]],
            sample_rate: int) -> None:
        """Store recordings (samples, utterance span), trimmed to the utterance and a little around it."""
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StateError(f"cannot create {folder}: {err.strerror or err}") from err
        number = len(list(folder.glob("*.npy")))
        margin = round(KEEP_AROUND_SECONDS * sample_rate)
        for offset, (samples, (start, end)) in enumerate(recordings):
            trimmed = samples[max(0, start - margin) : end + margin]
            write_atomically(folder / f"{number + offset:03d}.npy", lambda h, a=trimmed: np.save(h, a))

    def reset(self) -> bool:
        if not self.directory.exists():
            return False
        try:
            shutil.rmtree(self.directory)
        except OSError as err:
            raise StateError(f"cannot remove {self.directory}: {err.strerror or err}") from err
        return True
