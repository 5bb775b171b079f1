"""Shared helpers of the keyword-model pipeline: paths, seeds, audio reading, TensorFlow import.
Progress bars are ``agent.progress``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import soundfile

from agent.paths import REPO_ROOT
from agent.progress import shown

log = logging.getLogger(__name__)

SEED = 1234
SAMPLE_RATE = 16000
CACHE_DIR = REPO_ROOT / ".cache" / "kws"
SYNTH_DIR = REPO_ROOT / ".cache" / "synth"
PEERS_DIR = REPO_ROOT.parent / "shared" / "peers"
TEACHER_TFLITE = PEERS_DIR / "mlperf_tiny_kws" / "mlperf_kws_ref_model_float32.tflite"
TEACHER_INT8_TFLITE = PEERS_DIR / "mlperf_tiny_kws" / "mlperf_kws_ref_model_int8.tflite"
# The MLPerf Tiny reference model's output order.
TEACHER_LABELS = (
    "down",
    "go",
    "left",
    "no",
    "off",
    "on",
    "right",
    "stop",
    "up",
    "yes",
    "_silence_",
    "_unknown_",
)


def default_data_dir() -> Path:
    """$DATA_DIR, else ../shared/data/speech next to the repository."""
    env = os.environ.get("DATA_DIR")
    if env:
        return Path(env)
    return REPO_ROOT.parent / "shared" / "data" / "speech"


def speech_data_dir(given: Path | None) -> Path | None:
    """``given`` (a command's --data), else ``default_data_dir()``; None, with the reason on stderr, when it
    has no real/ folder (the command then exits 2)."""
    data_dir = given or default_data_dir()
    if not (data_dir / "real").is_dir():
        print(f"error: {data_dir} has no real/ folder (set --data or DATA_DIR)", file=sys.stderr)
        return None
    return data_dir


def seed_everything(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def import_tf() -> Any:
    """TensorFlow with legacy Keras (tf_keras), quiet logs, a fixed seed and at most 2 threads (shared)."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(2)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # already initialised in this process: the first setting stays, which is what we want
    tf.random.set_seed(SEED)
    tf.get_logger().setLevel(logging.ERROR)
    return tf


def stable_fraction(key: str) -> float:
    """A stable pseudo-random number in [0, 1) from a string (speaker hash split, file split)."""
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) / 2**32


def file_key(path: str | Path) -> str:
    """A data file named by its folder and its name (``up/sc_893705bb_0.flac``, ``up/espeak_en-us_a.wav``).
    Hash-ordered choices of files key on this, never on the absolute path: the synthetic clips live in the
    checkout's cache, so a path key made the choice depend on where the checkout is."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}"


def read_audio(path: Path) -> npt.NDArray[np.float32]:
    """Mono float32 samples at 16 kHz."""
    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    mono: npt.NDArray[np.float32] = np.asarray(data.mean(axis=1), dtype=np.float32)
    if rate != SAMPLE_RATE:
        from scipy.signal import resample_poly

        divisor = np.gcd(int(rate), SAMPLE_RATE)
        resampled = resample_poly(mono, SAMPLE_RATE // divisor, int(rate) // divisor)
        mono = np.asarray(resampled, dtype=np.float32)
    return mono


def soft_labels(logits: npt.NDArray[np.float32], temperature: float) -> npt.NDArray[np.float32]:
    """A teacher's probabilities at ``temperature`` (a softmax over each row of ``logits``)."""
    scaled = logits / temperature
    scaled = scaled - scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    probabilities: npt.NDArray[np.float32] = (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
    return probabilities


def keras_verbose() -> int:
    """Keras ``fit`` verbosity: its bar with the time left on a terminal, a line per epoch in logs."""
    return 1 if shown() else 2


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def stage_banner(name: str) -> float:
    print(f"\n=== {name} ===", file=sys.stderr, flush=True)
    return time.monotonic()
