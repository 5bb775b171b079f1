"""The one place that picks the TFLite interpreter: LiteRT (ai-edge-litert).

tflite-runtime is no fallback: its last release (2.14.0) is built against numpy 1 and fails to create an
interpreter under numpy 2 (SystemError from CreateWrapperFromFile), and has no wheel for CPython 3.13."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.errors import ModelError


def interpreter_class() -> Any:
    """``Interpreter`` from LiteRT."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as err:
        raise ModelError("no TFLite interpreter: install ai-edge-litert (it has wheels for Linux x86_64 and "
                         "aarch64, i.e. 64-bit Raspberry Pi OS; a 32-bit OS is not supported)") from err
    return Interpreter


def metadata_path(model_path: Path) -> Path:
    """A model's metadata JSON lives beside it: ``models/kws.tflite`` -> ``models/kws.json``."""
    return model_path.with_suffix(".json")
