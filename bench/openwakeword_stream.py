"""openWakeWord's streaming wake-word pipeline, for a side-by-side CPU benchmark (``bench/voice_bench.py``).

The ``openwakeword`` package is not a dependency (nor installed): this re-does what ``openwakeword==0.6.0``'s
``Model.predict`` and ``utils.AudioFeatures`` do for one TFLite wake-word model, fed 1280-sample (80 ms) int16
chunks, with LiteRT and the models in ``../shared/peers/openwakeword`` (melspectrogram, Google's speech
embedding, ``hey_jarvis_v0.1``; ``../shared/peers/README.md``):

- :class:`OpenWakeWordStream`: its buffers and interpreter calls as the package makes them: raw audio in a
  ``deque`` of 10 s copied to a list per chunk, the last ``1280 + 480`` samples through the melspectrogram
  model (re-sized and re-allocated on every call, as the package does for any input but 1280 samples),
  ``x / 10 + 2``, ``np.vstack`` onto a mel buffer of 970 frames, one embedding of the newest 76 mel frames,
  ``np.vstack`` onto a 120-embedding buffer, the wake-word model on the newest 16, a 30-score history.
- :class:`LeanOpenWakeWordStream`: the same three models on the same windows, with preallocated buffers and
  fixed tensor shapes: what those models cost when the Python around them costs next to nothing (a floor
  for openWakeWord's pipeline, not how the package runs).

Both are benchmark anchors only: nothing here ships, and ``hey_jarvis`` (CC BY-NC-SA) is used for CPU only.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.tflite import interpreter_class

CHUNK = 1280  # samples per prediction (80 ms): openWakeWord's unit
MEL_CONTEXT = 160 * 3  # samples before a chunk the melspectrogram model needs for its first new frame
MEL_FRAMES_PER_CHUNK = 8
EMBEDDING_WINDOW = 76  # mel frames per embedding
WAKE_WINDOW = 16  # embeddings per wake-word prediction
MEL_BUFFER_FRAMES = 10 * 97
FEATURE_BUFFER = 120
RAW_BUFFER = 16000 * 10
PREDICTION_HISTORY = 30
MODELS = ("melspectrogram.tflite", "embedding_model.tflite", "hey_jarvis_v0.1.tflite")


def models_present(folder: Path) -> bool:
    return all((folder / name).is_file() for name in MODELS)


def _interpreter(path: Path) -> Any:
    return interpreter_class()(model_path=str(path), num_threads=1)


def _mel_transform(spec: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """openWakeWord's default ``melspec_transform`` (closer to Google's TF front end)."""
    return (spec / 10 + 2).astype(np.float32)


class OpenWakeWordStream:
    """``openwakeword.Model([hey_jarvis], inference_framework="tflite").predict(chunk)`` re-done."""

    def __init__(self, folder: Path, seed: int = 0) -> None:
        self._mel = _interpreter(folder / MODELS[0])
        self._mel.resize_tensor_input(0, [1, CHUNK], strict=True)
        self._mel.allocate_tensors()
        self._mel_in = self._mel.get_input_details()[0]["index"]
        self._mel_out = self._mel.get_output_details()[0]["index"]
        self._mel_size = CHUNK
        self._embedding = _interpreter(folder / MODELS[1])
        self._embedding.allocate_tensors()
        self._embedding_in = self._embedding.get_input_details()[0]["index"]
        self._embedding_out = self._embedding.get_output_details()[0]["index"]
        self._wake = _interpreter(folder / MODELS[2])
        self._wake.allocate_tensors()
        self._wake_in = self._wake.get_input_details()[0]["index"]
        self._wake_out = self._wake.get_output_details()[0]["index"]
        self._seed = seed
        self.reset()

    def reset(self) -> None:
        self.raw: deque[int] = deque(maxlen=RAW_BUFFER)
        self.mel_buffer = np.ones((EMBEDDING_WINDOW, 32))
        self.accumulated = 0
        self.remainder: npt.NDArray[Any] = np.empty(0)
        # As the package starts: embeddings of 4 s of random audio fill the feature buffer.
        noise = np.random.default_rng(self._seed).integers(-1000, 1000, 16000 * 4).astype(np.int16)
        spec = self._melspectrogram(noise)
        self.feature_buffer = np.vstack([
            self._embed(spec[start : start + EMBEDDING_WINDOW].astype(np.float32)[None, :, :, None])
            for start in range(0, spec.shape[0] - EMBEDDING_WINDOW + 1, MEL_FRAMES_PER_CHUNK)])
        self.predictions: deque[float] = deque(maxlen=PREDICTION_HISTORY)

    def _melspectrogram(self, samples: npt.NDArray[np.int16]) -> npt.NDArray[np.float32]:
        x = samples[None,].astype(np.float32)
        if x.shape[1] != CHUNK:  # the package re-sizes for every input that is not 1280 samples
            self._mel.resize_tensor_input(0, [1, x.shape[1]], strict=True)
            self._mel.allocate_tensors()
            self._mel_size = x.shape[1]
        elif self._mel_size != CHUNK:
            self._mel.resize_tensor_input(0, [1, CHUNK], strict=True)
            self._mel.allocate_tensors()
            self._mel_size = CHUNK
        self._mel.set_tensor(self._mel_in, x)
        self._mel.invoke()
        return _mel_transform(np.squeeze(self._mel.get_tensor(self._mel_out)))

    def _embed(self, window: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        self._embedding.set_tensor(self._embedding_in, window)
        self._embedding.invoke()
        embedding: npt.NDArray[np.float32] = self._embedding.get_tensor(self._embedding_out).squeeze()
        return embedding

    def _streaming_features(self, x: npt.NDArray[np.int16]) -> int:
        processed = 0
        if self.remainder.shape[0] != 0:
            x = np.concatenate((self.remainder, x))
            self.remainder = np.empty(0)
        if self.accumulated + x.shape[0] >= CHUNK:
            remainder = (self.accumulated + x.shape[0]) % CHUNK
            if remainder != 0:
                even = x[0:-remainder]
                self.raw.extend(even.tolist())
                self.accumulated += len(even)
                self.remainder = x[-remainder:]
            else:
                self.raw.extend(x.tolist())
                self.accumulated += x.shape[0]
                self.remainder = np.empty(0)
        else:
            self.accumulated += x.shape[0]
            self.raw.extend(x.tolist())
        if self.accumulated >= CHUNK and self.accumulated % CHUNK == 0:
            recent = np.array(list(self.raw)[-self.accumulated - MEL_CONTEXT :]).astype(np.int16)
            self.mel_buffer = np.vstack((self.mel_buffer, self._melspectrogram(recent)))
            if self.mel_buffer.shape[0] > MEL_BUFFER_FRAMES:
                self.mel_buffer = self.mel_buffer[-MEL_BUFFER_FRAMES:, :]
            for i in np.arange(self.accumulated // CHUNK - 1, -1, -1):
                end = int(-MEL_FRAMES_PER_CHUNK * i) or len(self.mel_buffer)
                window = self.mel_buffer[-EMBEDDING_WINDOW + end : end].astype(np.float32)[None, :, :, None]
                if window.shape[1] == EMBEDDING_WINDOW:
                    self.feature_buffer = np.vstack((self.feature_buffer, self._embed(window)))
            processed = self.accumulated
            self.accumulated = 0
        if self.feature_buffer.shape[0] > FEATURE_BUFFER:
            self.feature_buffer = self.feature_buffer[-FEATURE_BUFFER:, :]
        return processed if processed != 0 else self.accumulated

    def predict(self, chunk: npt.NDArray[np.int16]) -> float:
        """The wake word's score after ``chunk`` (80 ms of 16 kHz int16 audio)."""
        prepared = self._streaming_features(chunk)
        if prepared >= CHUNK:
            scores = []
            for i in range(prepared // CHUNK - 1, -1, -1):
                start = -WAKE_WINDOW - i
                stop = start + WAKE_WINDOW if start + WAKE_WINDOW != 0 else len(self.feature_buffer)
                features = self.feature_buffer[start:stop, :][None,].astype(np.float32)
                self._wake.set_tensor(self._wake_in, features)
                self._wake.invoke()
                scores.append(float(self._wake.get_tensor(self._wake_out)[None,][0][0][0]))
            score = max(scores)
        else:
            score = self.predictions[-1] if self.predictions else 0.0
        if len(self.predictions) < 5:  # the package zeroes its first five predictions
            score = 0.0
        self.predictions.append(score)
        return score


class LeanOpenWakeWordStream:
    """The same models on the same windows as :class:`OpenWakeWordStream`, with preallocated ring-free
    buffers (shifted in place) and tensors of fixed shape: the models' own cost."""

    def __init__(self, folder: Path) -> None:
        self._mel = _interpreter(folder / MODELS[0])
        self._mel.resize_tensor_input(0, [1, CHUNK + MEL_CONTEXT], strict=True)
        self._mel.allocate_tensors()
        self._embedding = _interpreter(folder / MODELS[1])
        self._embedding.allocate_tensors()
        self._wake = _interpreter(folder / MODELS[2])
        self._wake.allocate_tensors()
        self._indices = [(m.get_input_details()[0]["index"], m.get_output_details()[0]["index"])
                         for m in (self._mel, self._embedding, self._wake)]
        self.reset()

    def reset(self) -> None:
        self._audio = np.zeros((1, CHUNK + MEL_CONTEXT), dtype=np.float32)
        self._mel_window = np.ones((1, EMBEDDING_WINDOW, 32, 1), dtype=np.float32)
        self._features = np.zeros((1, WAKE_WINDOW, 96), dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.int16)

    def predict(self, chunk: npt.NDArray[np.int16]) -> float:
        """Score after a whole 1280-sample chunk (other lengths are not supported here)."""
        (mel_in, mel_out), (emb_in, emb_out), (wake_in, wake_out) = self._indices
        audio = self._audio
        audio[0, :MEL_CONTEXT] = audio[0, CHUNK:]
        audio[0, MEL_CONTEXT:] = chunk
        self._mel.set_tensor(mel_in, audio)
        self._mel.invoke()
        window = self._mel_window
        window[0, :-MEL_FRAMES_PER_CHUNK] = window[0, MEL_FRAMES_PER_CHUNK:]
        window[0, -MEL_FRAMES_PER_CHUNK:, :, 0] = self._mel.get_tensor(mel_out)[0, 0] / 10 + 2
        self._embedding.set_tensor(emb_in, window)
        self._embedding.invoke()
        features = self._features
        features[0, :-1] = features[0, 1:]
        features[0, -1] = self._embedding.get_tensor(emb_out).reshape(-1)
        self._wake.set_tensor(wake_in, features)
        self._wake.invoke()
        return float(self._wake.get_tensor(wake_out)[0, 0])
