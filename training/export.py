"""Full-integer (int8 in, int8 out) conversion with a fixed calibration set, and the metadata beside it."""

from __future__ import annotations

import gzip
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.features import FeatureParams
from agent.kws import HOP_SECONDS  # how often the runtime invokes the model; thresholds are chosen for it
from training.common import import_tf, write_json

log = logging.getLogger(__name__)


def convert_int8(model: Any, calibration: npt.NDArray[np.float32]) -> bytes:
    """int8 weights and activations, int8 input and output; ``calibration`` (N, frames, features) is fixed."""
    tf = import_tf()

    def representative() -> Any:
        for window in calibration:
            yield [window[None, :, :, None].astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return bytes(converter.convert())


def convert_float(model: Any) -> bytes:
    tf = import_tf()
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    return bytes(converter.convert())


def gzip_size(data: bytes) -> int:
    return len(gzip.compress(data, compresslevel=9, mtime=0))


def write_model(
    out_dir: Path,
    tflite: bytes,
    *,
    labels: tuple[str, ...],
    params: FeatureParams,
    thresholds: dict[str, float],
    refractory_seconds: float,
    smoothing_seconds: float,
    extra: dict[str, Any] | None = None,
    name: str = "kws",
) -> Path:
    """Write ``<name>.tflite`` and ``<name>.json`` (labels, feature params, thresholds, timing, sha256)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / f"{name}.tflite"
    model_path.write_bytes(tflite)
    metadata: dict[str, Any] = {
        "format": "home-agent-kws/1",
        "labels": list(labels),
        "feature_params": params.to_dict(),
        "thresholds": {word: round(float(value), 4) for word, value in thresholds.items()},
        "refractory_seconds": refractory_seconds,
        "smoothing_seconds": smoothing_seconds,
        # How the thresholds are meant to be applied (and how training.evaluate applies them): the model runs
        # every hop_seconds on the latest window; a word's score is the mean of its probabilities over the
        # last smoothing_seconds of hops; it fires when that mean reaches its threshold, at most once per
        # refractory_seconds (per word).
        "hop_seconds": HOP_SECONDS,
        "smoothing": "mean",
        "sha256": hashlib.sha256(tflite).hexdigest(),
        "size_bytes": len(tflite),
    }
    if extra:
        metadata.update(extra)
    write_json(model_path.with_suffix(".json"), metadata)
    log.info("wrote %s (%d bytes)", model_path, len(tflite))
    return model_path
