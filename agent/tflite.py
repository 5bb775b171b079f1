"""The one place that picks the TFLite interpreter: LiteRT (ai-edge-litert).

tflite-runtime is no fallback: its last release (2.14.0) is built against numpy 1 and fails to create an
interpreter under numpy 2 (SystemError from CreateWrapperFromFile), and has no wheel for CPython 3.13."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import ModelError


def interpreter_class() -> Any:
    """``Interpreter`` from LiteRT."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as err:
        raise ModelError("no TFLite interpreter: install ai-edge-litert (it has wheels for Linux x86_64 and "
                         "aarch64, i.e. 64-bit Raspberry Pi OS; a 32-bit OS is not supported)") from err
    return Interpreter


TensorDetails = list[dict[str, Any]]  # Interpreter.get_input_details() / get_output_details()


def load_interpreter(model_bytes: bytes, what: str, num_threads: int, *,
                     preserve_all_tensors: bool = False) -> tuple[Any, TensorDetails, TensorDetails]:
    """(interpreter with its tensors allocated, input details, output details) of a .tflite's bytes; any
    failure is ``ModelError("cannot load {what}: ...")``. ``preserve_all_tensors``: keep every intermediate
    tensor readable (see :func:`embedding_tensor_index`)."""
    interpreter_type = interpreter_class()
    extra = {"experimental_preserve_all_tensors": True} if preserve_all_tensors else {}
    try:
        with warnings.catch_warnings():  # LiteRT warns that that option is for debugging: 56 bytes here
            warnings.simplefilter("ignore", UserWarning)
            interpreter = interpreter_type(model_content=model_bytes, num_threads=num_threads, **extra)
        interpreter.allocate_tensors()
        # Inside the try: a corrupt file can carry tensor names that are not UTF-8 (ValueError).
        return interpreter, interpreter.get_input_details(), interpreter.get_output_details()
    except (ValueError, RuntimeError) as err:
        raise ModelError(f"cannot load {what}: {err}") from err


class InputQuantizer:
    """How a model's input tensor takes float features (its input details' dtype and quantization): an int8
    or uint8 input gets ``round(x / scale + zero_point)`` clipped to its range, computed in the features'
    dtype as numpy computes ``x / scale + zero`` (Python floats stay weak); any other dtype gets the values
    cast. The keyword model (every hop) and the wake verifier share it."""

    def __init__(self, detail: dict[str, Any]) -> None:
        self.dtype: np.dtype[Any] = np.dtype(detail["dtype"])
        self.scale, self.zero = (float(v) for v in detail["quantization"])
        self.quantized = self.dtype in (np.dtype(np.int8), np.dtype(np.uint8))
        info = np.iinfo(self.dtype) if self.quantized else None
        self._low, self._high = (float(info.min), float(info.max)) if info is not None else (0.0, 0.0)

    def into(self, values: npt.NDArray[Any], out: npt.NDArray[Any],
             work: npt.NDArray[Any] | None = None) -> None:
        """``values`` quantized into ``out`` (the input's dtype, the same number of values in the same
        order); ``work``: room for the intermediate values (the shape and dtype of ``values``), else
        allocated. (np.minimum and np.maximum: np.clip's Python-level argument handling costs more.)"""
        if self.quantized:
            work = np.divide(values, self.scale, out=work)
            np.add(work, self.zero, out=work)
            np.rint(work, out=work)
            np.maximum(work, self._low, out=work)
            np.minimum(work, self._high, out=work)
            values = work
        np.copyto(out, values.reshape(out.shape), casting="unsafe")  # what astype(dtype) computes


def metadata_path(model_path: Path) -> Path:
    """A model's metadata JSON lives beside it: ``models/kws.tflite`` -> ``models/kws.json``."""
    return model_path.with_suffix(".json")


def read_metadata(path: Path, what: str, required: Iterable[str]) -> dict[str, Any]:
    """A model's metadata JSON object (``what``: e.g. "keyword model metadata", for the messages), with every
    ``required`` key present; every problem becomes :class:`ModelError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ModelError(f"cannot read {what} {path}: {err.strerror or err}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ModelError(f"{what} {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ModelError(f"{what} {path} must be a JSON object")
    missing = [key for key in required if key not in data]
    if missing:
        raise ModelError(f"{what} {path} lacks {', '.join(missing)}")
    return data


def embedding_tensor_index(interpreter: Any) -> int:
    """The tensor a classifier's final FULLY_CONNECTED layer reads: the model's penultimate embedding.

    Found from the graph rather than by a fixed index, so it holds for any model the training pipeline
    exports: walk back from the output through a trailing SOFTMAX (if any) to the FULLY_CONNECTED op that
    produces it, and take that op's data input. Needs an interpreter built with
    ``experimental_preserve_all_tensors=True``, or the tensor's memory is reused before it can be read."""
    output = int(interpreter.get_output_details()[0]["index"])
    producers = {int(out): op for op in interpreter._get_ops_details() if op["op_name"] != "DELEGATE"
                 for out in op["outputs"]}
    op = producers.get(output)
    if op is not None and op["op_name"] == "SOFTMAX":
        op = producers.get(int(op["inputs"][0]))
    if op is None or op["op_name"] != "FULLY_CONNECTED":
        raise ModelError("the keyword model does not end in a FULLY_CONNECTED layer: no embedding to adapt")
    return int(op["inputs"][0])
