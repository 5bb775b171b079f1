"""The negative bank of household adaptation (:mod:`agent.adaptation`): embeddings of training-side reference
speech, stored beside the model (built by ``python -m training.enrol_bank``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import ModelError
from agent.kws import KwsModel
from agent.templates import BANK_SCALE, COEFFICIENTS

BANK_FORMAT = "home-agent-enrol-bank/3"
# Every CHECK_EVERY-th bank recording of another label is held back from the head's training and thresholds:
# the false wakes on those are what the activation check counts (on the recordings it was fitted to, a head
# always looks clean: the shipped model's enrolments passed that check and raised held-out false wakes).
CHECK_EVERY = 3
FloatArray = npt.NDArray[np.float32]


def run_starts(items: npt.NDArray[Any]) -> npt.NDArray[np.intp]:
    """Where each run of equal ``items`` (a bank recording's consecutive rows) starts."""
    return np.flatnonzero(np.r_[True, items[1:] != items[:-1]]) if len(items) else np.zeros(0, np.intp)


def allowed_false_wakes(budget_per_hour: float, hours: float) -> int:
    """The false-wake budget in whole events: how many wakes on ``hours`` of other speech it allows."""
    return int(np.floor(budget_per_hour * hours))


def bank_path(model_path: Path) -> Path:
    """The negative bank lives beside the model: ``models/kws.tflite`` -> ``models/kws.bank.npz``."""
    return model_path.with_name(model_path.stem + ".bank.npz")


@dataclass(frozen=True)
class Bank:
    """Embeddings of training-side audio: each row a window, ``labels`` its label, ``items`` which recording
    (clip or stretch of long audio) it came from; ``item_seconds[i]``: how long recording ``i`` is."""

    embeddings: FloatArray
    labels: npt.NDArray[np.str_]
    items: npt.NDArray[np.int32]
    item_seconds: FloatArray
    model_sha256: str
    info: dict[str, Any] = field(default_factory=dict)
    # The template path's negatives (agent.templates): each recording's cepstra, rows of frames in order,
    # ``cepstra_items`` the recording of each row.
    cepstra: FloatArray = field(default_factory=lambda: np.zeros((0, COEFFICIENTS), np.float32))
    cepstra_items: npt.NDArray[np.int32] = field(default_factory=lambda: np.zeros(0, np.int32))

    @property
    def hours(self) -> float:
        """Hours of audio the recordings with rows here hold."""
        return float(self.item_seconds[np.unique(self.items)].sum()) / 3600

    def rows(self, keep: npt.NDArray[np.bool_]) -> Bank:
        """The bank with only the ``keep`` rows of embeddings (and the cepstra of the recordings left)."""
        kept = np.isin(self.cepstra_items, np.unique(self.items[keep]))
        return Bank(self.embeddings[keep], self.labels[keep], self.items[keep], self.item_seconds,
                    self.model_sha256, self.info, self.cepstra[kept], self.cepstra_items[kept])

    def recordings_cepstra(self, word: str) -> list[FloatArray]:
        """The cepstra of every recording here of another label than ``word`` (each a stream of its own)."""
        others = np.unique(self.items[self.labels != word])
        chosen = np.isin(self.cepstra_items, others)
        items, values = self.cepstra_items[chosen], self.cepstra[chosen]
        if not len(items):
            return []
        starts = run_starts(items)
        return [values[a:b] for a, b in zip(starts, [*starts[1:], len(items)], strict=True)]

    def recording_peaks(self, scores: FloatArray, word: str) -> FloatArray:
        """Per recording of :meth:`recordings_cepstra` (in its order), the highest of ``scores`` (one per row
        here) over that recording's rows."""
        others = np.isin(self.cepstra_items, np.unique(self.items[self.labels != word]))
        owners = self.cepstra_items[others]
        peaks = np.full(int(self.items.max(initial=-1)) + 1, -np.inf, np.float32)
        np.maximum.at(peaks, self.items, np.asarray(scores, np.float32))
        result: FloatArray = peaks[owners[run_starts(owners)]]
        return result

    def held_back(self, word: str) -> npt.NDArray[np.bool_]:
        """The rows of every CHECK_EVERY-th recording of another label than ``word``: never trained on nor
        used to set a threshold, they tell what the head does on speech it has not seen."""
        result: npt.NDArray[np.bool_] = (self.labels != word) & (self.items % CHECK_EVERY == CHECK_EVERY - 1)
        return result

    def save(self, path: Path) -> None:
        quantized = np.clip(np.round(self.cepstra / BANK_SCALE), -127, 127).astype(np.int8)
        np.savez_compressed(path, embeddings=self.embeddings.astype(np.float16), labels=self.labels,
                            items=self.items, item_seconds=self.item_seconds.astype(np.float32),
                            cepstra=quantized, cepstra_items=self.cepstra_items,
                            meta=np.array(json.dumps({"format": BANK_FORMAT,
                                                      "model_sha256": self.model_sha256,
                                                      **self.info})))

    @classmethod
    def load(cls, path: Path, model: KwsModel) -> Bank:
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                embeddings = data["embeddings"].astype(np.float32)
                labels, items = data["labels"], data["items"].astype(np.int32)
                item_seconds = data["item_seconds"].astype(np.float32) if "item_seconds" in data else None
                cepstra = data["cepstra"].astype(np.float32) * np.float32(BANK_SCALE) \
                    if "cepstra" in data else None
                cepstra_items = data["cepstra_items"].astype(np.int32) if "cepstra_items" in data else None
        except FileNotFoundError as err:
            raise ModelError(f"no negative bank for household adaptation at {path}: build it with "
                             f"`python -m training.enrol_bank --model {model.path}`") from err
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
            raise ModelError(f"the negative bank {path} is unreadable or corrupt: {err}") from err
        if meta.get("format") != BANK_FORMAT or item_seconds is None or cepstra is None \
                or cepstra_items is None:
            raise ModelError(f"{path}: not a negative bank of format {BANK_FORMAT}: rebuild it with "
                             f"`python -m training.enrol_bank --model {model.path}`")
        if meta.get("model_sha256") != model.sha256:
            raise ModelError(
                f"the negative bank {path} was built for another keyword model (sha256 "
                f"{str(meta.get('model_sha256'))[:12]}..., the model is {model.sha256[:12]}...): rebuild it "
                f"with `python -m training.enrol_bank --model {model.path}`")
        return cls(embeddings, labels, items, item_seconds, model.sha256,
                   {k: v for k, v in meta.items() if k not in ("format", "model_sha256")}, cepstra,
                   cepstra_items)

    def of_label(self, label: str) -> FloatArray:
        result: FloatArray = self.embeddings[self.labels == label]
        return result

    def false_wakes(self, scores: FloatArray, word: str, threshold: float) -> int:
        """Recordings of other labels with any window scoring ``threshold`` or more."""
        others = self.labels != word
        return len(np.unique(self.items[others & (scores >= threshold)]))
