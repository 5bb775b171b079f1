"""The one place that picks the TFLite interpreter: LiteRT (ai-edge-litert), else tflite-runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.errors import ModelError


def interpreter_class() -> Any:
    """``Interpreter`` from LiteRT, or from tflite-runtime where LiteRT has no wheel (it needs numpy < 2)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError as err:
            raise ModelError("no TFLite interpreter: install ai-edge-litert (or tflite-runtime)") from err
    return Interpreter


def metadata_path(model_path: Path) -> Path:
    """A model's metadata JSON lives beside it: ``models/kws.tflite`` -> ``models/kws.json``."""
    return model_path.with_suffix(".json")
