"""Second-stage wake verifier: a small int8 model that judges each wake word the keyword model fires on.

The keyword model (:mod:`agent.kws`) runs every hop on 1 s of MFCC; when it fires the wake word, and only
then, the verifier looks at more context (``seconds`` of audio, 1.5 s, ending where the keyword model's window
ends) in richer features: the log mel energies the streaming front end has already computed (40 bands,
:meth:`agent.features.StreamingFeatures.recent_mel`), each band minus its mean over the window, so a
microphone's colouring and the level cancel out. Its probability that this is the wake word must reach
``threshold``, or the detection is dropped (:class:`agent.voice.VoicePipeline`). It costs one small
inference per candidate, nothing per hop.

Files beside the keyword model: ``<stem>_verifier.tflite`` and ``<stem>_verifier.json`` (every parameter,
the sha256 of the verifier and of the keyword model it was trained against); the keyword model's metadata
names the verifier (``"verifier": "kws_verifier.tflite"``), so a model without that key has none. A
missing, corrupt or mismatched verifier is a :class:`agent.errors.ModelError`. Built by
``python -m training.verifier``.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import ModelError
from agent.features import FeatureParams
from agent.tflite import InputQuantizer, load_interpreter, metadata_path, read_metadata

log = logging.getLogger(__name__)

VERIFIER_FORMAT = "home-agent-wake-verifier/1"
REQUIRED = ("format", "word", "frames", "num_mel_bands", "log_offset", "threshold", "sha256",
            "keyword_model_sha256")


def verifier_input(mel: npt.NDArray[np.floating[Any]], log_offset: float) -> npt.NDArray[np.float32]:
    """The verifier's (frames, bands) input from un-normalised mel energies: log(mel + log_offset), each
    band minus its mean over the frames. Training computes it with this function too."""
    log_mel = np.log(np.asarray(mel, dtype=np.float64) + log_offset)
    normalised: npt.NDArray[np.float32] = (log_mel - log_mel.mean(axis=0, keepdims=True)).astype(np.float32)
    return normalised


class WakeVerifier:
    """One loaded verifier. Not thread-safe: use it from the voice thread (as the keyword model)."""

    def __init__(self, path: Path, metadata: dict[str, Any], interpreter: Any) -> None:
        self.path = path
        self.metadata = metadata
        self.word: str = metadata["word"]
        self.frames: int = int(metadata["frames"])
        self.num_mel_bands: int = int(metadata["num_mel_bands"])
        self.log_offset: float = float(metadata["log_offset"])
        self.threshold: float = float(metadata["threshold"])
        self.sha256: str = metadata["sha256"]
        self._interpreter = interpreter
        input_detail = interpreter.get_input_details()[0]
        output_detail = interpreter.get_output_details()[0]
        self._input_index = int(input_detail["index"])
        self._output_index = int(output_detail["index"])
        self._input_shape = tuple(int(n) for n in input_detail["shape"])
        self._quantizer = InputQuantizer(input_detail)
        self._output_scale, self._output_zero = (float(v) for v in output_detail["quantization"])
        self._output_quantized = np.dtype(output_detail["dtype"]) in (np.dtype(np.int8), np.dtype(np.uint8))

    @classmethod
    def load(cls, path: Path, params: FeatureParams, keyword_sha256: str,
             num_threads: int = 1) -> WakeVerifier:
        """Load and check the verifier at ``path`` for the keyword model with ``params`` and
        ``keyword_sha256``."""
        try:
            model_bytes = path.read_bytes()
        except OSError as err:
            raise ModelError(f"cannot read the wake verifier {path}: {err.strerror or err} (the keyword "
                             "model's metadata names it; rebuild it with python -m training.verifier)"
                             ) from err
        meta_path = metadata_path(path)
        metadata = _check_metadata(meta_path, read_metadata(meta_path, "wake verifier metadata", REQUIRED))
        actual = hashlib.sha256(model_bytes).hexdigest()
        if actual != metadata["sha256"]:
            raise ModelError(f"wake verifier {path} does not match its metadata: sha256 {actual[:12]}..., "
                             f"metadata expects {str(metadata['sha256'])[:12]}... (replaced or corrupt)")
        if metadata["keyword_model_sha256"] != keyword_sha256:
            raise ModelError(f"wake verifier {path} was trained against keyword model "
                             f"{str(metadata['keyword_model_sha256'])[:12]}..., not "
                             f"{keyword_sha256[:12]}...: rebuild it with python -m training.verifier")
        if metadata["num_mel_bands"] != params.num_mel_bands:
            raise ModelError(f"wake verifier {path}: {metadata['num_mel_bands']} mel bands, the keyword "
                             f"model's front end has {params.num_mel_bands}")
        interpreter, inputs, outputs = load_interpreter(model_bytes, f"the wake verifier {path}", num_threads)
        expected = (metadata["frames"], metadata["num_mel_bands"])
        if len(inputs) != 1 or len(outputs) != 1 or \
                tuple(int(n) for n in inputs[0]["shape"]) not in ((1, *expected, 1), (1, *expected)) or \
                int(np.prod(outputs[0]["shape"])) != 1:
            raise ModelError(f"wake verifier {path}: expected one ({expected[0]}, {expected[1]}) input "
                             "and one score out")
        verifier = cls(path, metadata, interpreter)
        try:  # fail at startup, not at the first wake word
            verifier.score(np.full(expected, 0.5, dtype=np.float64))
        except (ValueError, RuntimeError) as err:
            raise ModelError(f"wake verifier {path} loads but cannot run: {err}") from err
        log.info("loaded wake verifier %s (%d bytes, threshold %.3f)", path, len(model_bytes),
                 verifier.threshold)
        return verifier

    def score(self, mel: npt.NDArray[np.floating[Any]]) -> float:
        """The probability that this is the wake word, from the last ``frames`` mel frames (un-normalised
        energies)."""
        return self.score_input(verifier_input(mel, self.log_offset))

    def score_input(self, features: npt.NDArray[np.float32]) -> float:
        """:meth:`score` of an input already made by :func:`verifier_input`."""
        model_input = np.empty(self._input_shape, dtype=self._quantizer.dtype)
        self._quantizer.into(np.asarray(features), model_input)
        self._interpreter.set_tensor(self._input_index, model_input)
        self._interpreter.invoke()
        raw = np.asarray(self._interpreter.get_tensor(self._output_index)).reshape(-1)[0]
        if self._output_quantized:
            return float((float(raw) - self._output_zero) * self._output_scale)
        return float(raw)

    def accepts(self, mel: npt.NDArray[np.floating[Any]]) -> bool:
        return self.score(mel) >= self.threshold


def _check_metadata(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """``data``, the verifier metadata read from ``path``, once its values are checked."""
    if data["format"] != VERIFIER_FORMAT:
        raise ModelError(f"wake verifier metadata {path}: format {data['format']!r}, expected "
                         f"{VERIFIER_FORMAT}")
    threshold = data["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
        raise ModelError(f"{path}: threshold must be a number in [0, 1], got {threshold!r}")
    for key in ("frames", "num_mel_bands"):
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelError(f"{path}: {key} must be a positive integer, got {value!r}")
    offset = data["log_offset"]
    if isinstance(offset, bool) or not isinstance(offset, int | float) or offset <= 0:
        raise ModelError(f"{path}: log_offset must be a positive number, got {offset!r}")
    for key in ("sha256", "keyword_model_sha256"):
        if not isinstance(data[key], str) or len(data[key]) != 64:
            raise ModelError(f"{path}: {key} must be a 64-character hex digest")
    if not isinstance(data["word"], str) or not data["word"]:
        raise ModelError(f"{path}: word must be a non-empty string")
    return data
