"""Keyword model wrapper: loads the int8 ``.tflite`` with LiteRT and its metadata JSON, verifies them against
each other, and turns one feature window into per-label probabilities.

Metadata (``<model>.json`` beside the model) holds at least: ``labels``, ``feature_params``
(:class:`agent.features.FeatureParams`), ``thresholds`` (per vocabulary word), ``refractory_seconds``,
``smoothing_seconds`` and ``sha256`` of the ``.tflite``; optionally ``verifier``, the file name of a
second-stage wake verifier beside it (:mod:`agent.verifier`). Every problem becomes
:class:`agent.errors.ModelError`.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import ModelError
from agent.features import NON_WORD_LABELS, FeatureParams
from agent.tflite import (
    InputQuantizer,
    embedding_tensor_index,
    load_interpreter,
    metadata_path,
    read_metadata,
)
from agent.verifier import WakeVerifier

log = logging.getLogger(__name__)

REQUIRED_METADATA = (
    "labels",
    "feature_params",
    "thresholds",
    "refractory_seconds",
    "smoothing_seconds",
    "sha256",
)


class _Batch:
    """An interpreter of the keyword model resized to take ``windows`` windows per invocation, with its
    preallocated input (what set_tensor copies) and quantization room."""

    def __init__(self, interpreter: Any, windows: int, features_shape: tuple[int, int],
                 input_shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        self.interpreter = interpreter
        self.input_buffer = np.zeros((windows, *input_shape[1:]), dtype=dtype)
        self.input_view = self.input_buffer.reshape((windows, *features_shape))  # the same memory
        self.work = np.zeros((windows, *features_shape), dtype=np.float32)


HOP_SECONDS = 0.1  # the voice path runs the model every 100 ms of audio (at most; see model_hop_seconds)


def model_hop_seconds(model: KwsModel) -> float:
    """The hop the model's thresholds were calibrated with (metadata ``hop_seconds``), at most HOP_SECONDS."""
    value = model.metadata.get("hop_seconds")
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= HOP_SECONDS:
        return float(value)
    return HOP_SECONDS


def hop_samples(hop_seconds: float, params: FeatureParams) -> int:
    """The voice path's hop in samples: a whole number of feature hops (every model window then ends on a
    hop boundary), at least one."""
    return max(1, round(hop_seconds * params.sample_rate / params.hop_samples)) * params.hop_samples


class KwsModel:
    """One loaded keyword model. Not thread-safe: use it from one worker thread."""

    def __init__(
        self,
        *,
        path: Path,
        interpreter: Any,
        metadata: dict[str, Any],
        labels: tuple[str, ...],
        params: FeatureParams,
        thresholds: dict[str, float],
        refractory_seconds: float,
        smoothing_seconds: float,
        size_bytes: int,
        model_bytes: bytes = b"",
        embedding_index: int | None = None,
        verifier: WakeVerifier | None = None,
    ) -> None:
        self.path = path
        self.verifier = verifier  # judges each wake word the model fires (agent.voice.VoicePipeline)
        self.metadata = metadata
        self.labels = labels
        self.params = params
        self.thresholds = thresholds
        self.refractory_seconds = refractory_seconds
        self.smoothing_seconds = smoothing_seconds
        self.size_bytes = size_bytes
        self.sha256: str = metadata["sha256"]
        self._interpreter = interpreter
        self._model_bytes = model_bytes  # for the interpreters that take several windows at once
        input_detail = interpreter.get_input_details()[0]
        output_detail = interpreter.get_output_details()[0]
        self._input_index: int = input_detail["index"]
        self._output_index: int = output_detail["index"]
        self._input_shape = tuple(int(n) for n in input_detail["shape"])
        self._quantizer = InputQuantizer(input_detail)
        self.input_dtype: np.dtype[Any] = self._quantizer.dtype
        self.output_dtype: np.dtype[Any] = np.dtype(output_detail["dtype"])
        self._output_scale, self._output_zero = (float(v) for v in output_detail["quantization"])
        # predict() runs every hop on a CPU that idles in between (so cold): what it can, it computes here.
        self._features_shape = self.params.shape
        self._quantize_buffer = np.zeros(self._features_shape, dtype=np.float32)
        self._input_buffer = np.zeros(self._input_shape, dtype=self.input_dtype)  # what set_tensor copies
        self._input_view = self._input_buffer.reshape(self._features_shape)  # the same memory
        self._batches: dict[int, _Batch] = {}  # windows per invocation (> 1) -> its interpreter
        self._output_table: npt.NDArray[np.float32] | None = None
        if self.output_dtype in (np.dtype(np.int8), np.dtype(np.uint8)):
            # Every possible output value dequantized once, indexed by its byte (np.take wraps int8's
            # negatives onto 128..255): the same float32 operations as dequantizing each hop's output.
            values = np.arange(256).astype(np.uint8).view(self.output_dtype).astype(np.float32)
            self._output_table = ((values - self._output_zero) * self._output_scale).astype(np.float32)
        self._embedding_index = embedding_index
        if embedding_index is not None:
            detail = next(d for d in interpreter.get_tensor_details() if d["index"] == embedding_index)
            self._embedding_scale, self._embedding_zero = (float(v) for v in detail["quantization"])

    @property
    def words(self) -> tuple[str, ...]:
        """The vocabulary words (labels other than ``_silence_`` and ``_unknown_``)."""
        return tuple(label for label in self.labels if label not in NON_WORD_LABELS)

    @property
    def max_output(self) -> float | None:
        """The largest probability the model can output (its int8 output's largest value); None when its
        output is not quantized (no bound known)."""
        return float(self._output_table.max()) if self._output_table is not None else None

    @property
    def is_quantized(self) -> bool:
        return self.input_dtype in (np.dtype(np.int8), np.dtype(np.uint8))

    @classmethod
    def load(cls, path: Path, num_threads: int = 1, *, embedding: bool = False,
             verifier: bool = True) -> KwsModel:
        """``embedding``: also expose the penultimate embedding (:meth:`embedding`), for household adaptation;
        off by default, so a model without adaptation runs exactly as before. ``verifier``: load the wake
        verifier the metadata names (False: the keyword model alone, as training the verifier needs it)."""
        path = Path(path)
        try:
            model_bytes = path.read_bytes()
        except OSError as err:
            raise ModelError(f"cannot read keyword model {path}: {err.strerror or err}") from err
        metadata = read_metadata(metadata_path(path), "keyword model metadata", REQUIRED_METADATA)
        labels, params, thresholds, refractory, smoothing = _parse_metadata(metadata, metadata_path(path))
        actual_sha = hashlib.sha256(model_bytes).hexdigest()
        if actual_sha != metadata["sha256"]:
            raise ModelError(
                f"keyword model {path} does not match its metadata: sha256 {actual_sha[:12]}..., "
                f"metadata expects {str(metadata['sha256'])[:12]}... (model or metadata replaced or corrupt)"
            )
        what = f"keyword model {path}"
        interpreter, inputs, outputs = load_interpreter(model_bytes, what, num_threads,
                                                        preserve_all_tensors=embedding)
        try:  # the ops' details, like the tensors', may not decode in a corrupt file (ValueError)
            embedding_index = embedding_tensor_index(interpreter) if embedding else None
        except (ValueError, RuntimeError) as err:
            raise ModelError(f"cannot load {what}: {err}") from err
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(
                f"keyword model {path}: expected 1 input and 1 output, got {len(inputs)}/{len(outputs)}"
            )
        in_shape = tuple(int(n) for n in inputs[0]["shape"])
        out_shape = tuple(int(n) for n in outputs[0]["shape"])
        if in_shape not in ((1, *params.shape, 1), (1, *params.shape)):
            raise ModelError(
                f"keyword model {path}: input shape {in_shape} does not fit the feature parameters "
                f"({params.num_frames} frames x {params.num_features} features)"
            )
        if out_shape != (1, len(labels)):
            raise ModelError(
                f"keyword model {path}: output shape {out_shape} does not fit {len(labels)} labels"
            )
        for detail in (inputs[0], outputs[0]):
            dtype = np.dtype(detail["dtype"])
            if dtype in (np.dtype(np.int8), np.dtype(np.uint8)) and float(detail["quantization"][0]) <= 0:
                raise ModelError(f"keyword model {path}: quantized tensor {detail['name']} has no scale")
        model = cls(
            path=path,
            interpreter=interpreter,
            metadata=metadata,
            labels=labels,
            params=params,
            thresholds=thresholds,
            refractory_seconds=refractory,
            smoothing_seconds=smoothing,
            size_bytes=len(model_bytes),
            model_bytes=model_bytes,
            embedding_index=embedding_index,
            verifier=_load_verifier(path, metadata, labels, params) if verifier else None,
        )
        try:  # one inference now: a file that loads but cannot run fails at startup, not in the voice thread
            model.predict(np.zeros(params.shape, dtype=np.float32))
        except (ValueError, RuntimeError) as err:
            raise ModelError(f"keyword model {path} loads but cannot run: {err}") from err
        log.info(
            "loaded keyword model %s (%d bytes, %s input, %d labels)",
            path,
            len(model_bytes),
            model.input_dtype,
            len(labels),
        )
        return model

    def predict(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Per-label probabilities (in ``labels`` order) for one (num_frames, num_features) window."""
        array = np.asarray(features, dtype=np.float32)
        if array.shape != self._features_shape:
            raise ValueError(f"features of shape {array.shape}, the model expects {self._features_shape}")
        self._quantizer.into(array, self._input_view, self._quantize_buffer)
        self._interpreter.set_tensor(self._input_index, self._input_buffer)
        self._interpreter.invoke()
        return self._scores(self._interpreter.get_tensor(self._output_index)[0])

    def predict_batch(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """(windows, labels): :meth:`predict` of each of a stack of (num_frames, num_features) windows, in one
        invocation of an interpreter made for that many windows (made on first use, then kept): the same
        probabilities, bit for bit (int8 kernels add exact integers and requantize each value alone), for
        fewer calls per window. :meth:`embedding` then still describes the last :meth:`predict`."""
        array = np.asarray(features, dtype=np.float32)
        if array.ndim != 3 or array.shape[1:] != self._features_shape or not len(array):
            raise ValueError(f"features of shape {array.shape}, the model expects (windows, "
                             f"{self._features_shape[0]}, {self._features_shape[1]})")
        batch = self._batches.get(len(array))
        if batch is None:
            batch = self._batches[len(array)] = self._make_batch(len(array))
        self._quantizer.into(array, batch.input_view, batch.work)
        batch.interpreter.set_tensor(self._input_index, batch.input_buffer)
        batch.interpreter.invoke()
        return self._scores(batch.interpreter.get_tensor(self._output_index))

    def _make_batch(self, windows: int) -> _Batch:
        interpreter, _inputs, _outputs = load_interpreter(self._model_bytes, f"keyword model {self.path}", 1)
        try:
            interpreter.resize_tensor_input(self._input_index, [windows, *self._input_shape[1:]])
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as err:
            raise ModelError(f"keyword model {self.path} cannot take {windows} windows at once: {err}") \
                from err
        return _Batch(interpreter, windows, self._features_shape, self._input_shape, self.input_dtype)

    def _scores(self, output: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """Dequantized model output (any shape)."""
        if self._output_table is not None:
            scores: npt.NDArray[np.float32] = np.take(self._output_table, output, mode="wrap")
            return scores
        return np.array(output, dtype=np.float32)

    def embedding(self) -> npt.NDArray[np.float32]:
        """The penultimate embedding of the last :meth:`predict` (needs ``load(..., embedding=True)``)."""
        if self._embedding_index is None:
            raise ModelError(f"keyword model {self.path} was loaded without its embedding")
        raw = np.asarray(self._interpreter.get_tensor(self._embedding_index)).reshape(-1)
        values: npt.NDArray[np.float32] = raw.astype(np.float32)
        if raw.dtype in (np.dtype(np.int8), np.dtype(np.uint8)):
            values = ((values - self._embedding_zero) * self._embedding_scale).astype(np.float32)
        return values

    def __repr__(self) -> str:
        return f"KwsModel({str(self.path)!r}, labels={len(self.labels)}, input={self.input_dtype})"


def _load_verifier(path: Path, metadata: dict[str, Any], labels: tuple[str, ...],
                   params: FeatureParams) -> WakeVerifier | None:
    """The wake verifier the metadata names (a file beside the model), or None when it names none."""
    name = metadata.get("verifier")
    if name is None:
        return None
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise ModelError(f"{metadata_path(path)}: verifier must be a file name beside the model, "
                         f"got {name!r}")
    verifier = WakeVerifier.load(path.parent / name, params, metadata["sha256"])
    if verifier.word not in labels:
        raise ModelError(f"wake verifier {path.parent / name} verifies {verifier.word!r}, not a word of "
                         f"{path}")
    return verifier


def _parse_metadata(
    data: dict[str, Any], path: Path
) -> tuple[tuple[str, ...], FeatureParams, dict[str, float], float, float]:
    labels = data["labels"]
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise ModelError(f"{path}: labels must be a non-empty list of names")
    if len(set(labels)) != len(labels):
        raise ModelError(f"{path}: duplicate labels")
    if not isinstance(data["feature_params"], dict):
        raise ModelError(f"{path}: feature_params must be an object")
    try:
        params = FeatureParams.from_dict(data["feature_params"])
    except (TypeError, ValueError) as err:
        raise ModelError(f"{path}: {err}") from err
    thresholds = data["thresholds"]
    if not isinstance(thresholds, dict):
        raise ModelError(f"{path}: thresholds must be an object of word -> score")
    unknown = sorted(set(thresholds) - set(labels))
    if unknown:
        raise ModelError(f"{path}: thresholds for words that are not labels: {', '.join(unknown)}")
    words = [label for label in labels if label not in NON_WORD_LABELS]
    without = [word for word in words if word not in thresholds]
    if without:
        raise ModelError(f"{path}: no threshold for {', '.join(without)}")
    checked: dict[str, float] = {}
    for word, value in thresholds.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < float(value) <= 1.0:
            raise ModelError(f"{path}: threshold of {word!r} must be a number in (0, 1], got {value!r}")
        checked[word] = float(value)
    timings: list[float] = []
    for key in ("refractory_seconds", "smoothing_seconds"):
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 10.0:
            raise ModelError(f"{path}: {key} must be a number of seconds in [0, 10], got {value!r}")
        timings.append(float(value))
    if not isinstance(data["sha256"], str) or len(data["sha256"]) != 64:
        raise ModelError(f"{path}: sha256 must be a 64-character hex digest")
    return tuple(labels), params, checked, timings[0], timings[1]
