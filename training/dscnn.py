"""The DS-CNN architecture of the MLPerf Tiny keyword model, rebuilt in tf_keras so its weights (read from the
float ``.tflite``) can be fine-tuned, extended with our labels, pruned by channel and quantized.

Layout: Conv2D(10x4, stride 2, C0) -> 4 x [DepthwiseConv2D 3x3 -> Conv2D 1x1 (C1..C4)] -> AvgPool -> Dense.
Batch norm is already folded into the teacher's conv biases, so the rebuilt model has bias + ReLU only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.features import UNKNOWN_LABEL
from training.common import SEED, import_tf

NUM_BLOCKS = 4
TEACHER_WIDTH = 64  # channels of every layer of the MLPerf Tiny DS-CNN


@dataclass(frozen=True)
class Architecture:
    channels: tuple[int, ...]  # C0 (first conv) then the pointwise output of each block
    num_classes: int
    input_shape: tuple[int, int] = (49, 10)

    def macs(self) -> int:
        """Multiply-accumulates of one inference (convolutions + dense)."""
        frames, feats = self.input_shape
        out_t, out_f = (frames + 1) // 2, (feats + 1) // 2
        positions = out_t * out_f
        total = positions * self.channels[0] * 10 * 4
        for block in range(NUM_BLOCKS):
            c_in, c_out = self.channels[block], self.channels[block + 1]
            total += positions * c_in * 9 + positions * c_in * c_out
        return total + self.channels[-1] * self.num_classes


def build(arch: Architecture, dropout: float = 0.0) -> Any:
    tf = import_tf()
    layers = tf.keras.layers
    inputs = layers.Input(shape=(*arch.input_shape, 1), name="mfcc")
    x = layers.Conv2D(arch.channels[0], (10, 4), strides=(2, 2), padding="same", name="conv0")(inputs)
    x = layers.ReLU(name="relu0")(x)
    if dropout:
        x = layers.Dropout(dropout / 2, name="drop0")(x)
    for block in range(NUM_BLOCKS):
        x = layers.DepthwiseConv2D((3, 3), padding="same", name=f"dw{block + 1}")(x)
        x = layers.ReLU(name=f"relu_dw{block + 1}")(x)
        x = layers.Conv2D(arch.channels[block + 1], (1, 1), name=f"pw{block + 1}")(x)
        x = layers.ReLU(name=f"relu_pw{block + 1}")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    if dropout:
        x = layers.Dropout(dropout, name="drop")(x)
    logits = layers.Dense(arch.num_classes, name="logits")(x)
    outputs = layers.Softmax(name="probs")(logits)
    return tf.keras.Model(inputs, outputs, name="dscnn")


def dropout_of(model: Any) -> float:
    """The ``dropout`` ``model`` was built with (0 without dropout layers)."""
    return max((float(layer.rate) for layer in model.layers if hasattr(layer, "rate")), default=0.0)


def channels_of(model: Any) -> tuple[int, ...]:
    names = ["conv0", *(f"pw{block + 1}" for block in range(NUM_BLOCKS))]
    return tuple(int(model.get_layer(name).get_weights()[1].shape[0]) for name in names)


def copied_channels(model: Any, sources: list[npt.NDArray[np.intp]],
                    reading_scales: list[npt.NDArray[np.float32]] | None = None) -> Any:
    """A copy of ``model`` whose channel group ``g`` (the output of conv0 and of every pointwise conv) is made
    of ``model``'s channels ``sources[g]``, in that order: their producing filters, depthwise filters and the
    weights reading them, scaled by ``reading_scales[g]`` (per new channel; none: unscaled). A subset of the
    channels prunes the model, repeated channels widen it."""
    scales = reading_scales or [np.ones(len(source), dtype=np.float32) for source in sources]
    num_classes = model.get_layer("logits").get_weights()[1].shape[0]
    channels = tuple(len(source) for source in sources)
    copy = build(Architecture(channels=channels, num_classes=num_classes), dropout=dropout_of(model))
    kernel, bias = model.get_layer("conv0").get_weights()
    copy.get_layer("conv0").set_weights([kernel[..., sources[0]], bias[sources[0]]])
    for block in range(NUM_BLOCKS):
        src_in, src_out = sources[block], sources[block + 1]
        dw_kernel, dw_bias = model.get_layer(f"dw{block + 1}").get_weights()
        copy.get_layer(f"dw{block + 1}").set_weights([dw_kernel[:, :, src_in, :], dw_bias[src_in]])
        pw_kernel, pw_bias = model.get_layer(f"pw{block + 1}").get_weights()
        pw_kernel = pw_kernel[:, :, src_in, :] * scales[block][None, None, :, None]
        copy.get_layer(f"pw{block + 1}").set_weights([pw_kernel[..., src_out], pw_bias[src_out]])
    dense_kernel, dense_bias = model.get_layer("logits").get_weights()
    copy.get_layer("logits").set_weights([dense_kernel[sources[-1]] * scales[-1][:, None], dense_bias])
    return copy


def widened(model: Any, channels: tuple[int, ...], noise: float = 0.1, seed: int = SEED) -> Any:
    """A wider copy of ``model`` computing the same function (Net2Net's WiderNet), so that a wider student
    can start from the 64-channel teacher instead of from scratch.

    Per channel group (the output of conv0 and of every pointwise conv), each new channel copies a randomly
    chosen existing one: its producing conv filter and its depthwise filter. Copies of a channel have the same
    activation (ReLU and the depthwise conv act per channel), so the function is kept when the weights that
    READ them (the next pointwise conv, or the dense layer) share the original weight between the copies.
    The shares are random (1 +- ``noise``, normalised to sum to 1) rather than equal: the copies then get
    different gradients and grow apart, while the output stays the same.
    """
    old = channels_of(model)
    if len(channels) != len(old) or any(new < width for new, width in zip(channels, old, strict=True)):
        raise ValueError(f"cannot widen channels {old} to {channels}")
    rng = np.random.default_rng(seed)
    sources, shares = [], []
    for width, new in zip(old, channels, strict=True):
        extra = rng.choice(width, new - width, replace=new - width > width)
        source = np.concatenate([np.arange(width), extra])
        share = 1.0 + noise * rng.uniform(-1.0, 1.0, new)
        totals = np.bincount(source, weights=share, minlength=width)
        sources.append(source)
        shares.append((share / totals[source]).astype(np.float32))
    return copied_channels(model, sources, shares)


def _dequantize(tensor: npt.NDArray[Any], detail: dict[str, Any]) -> npt.NDArray[np.float32]:
    if tensor.dtype == np.float32:
        return tensor
    quant = detail["quantization_parameters"]
    scales = np.asarray(quant["scales"], dtype=np.float32)
    zeros = np.asarray(quant["zero_points"], dtype=np.float32)
    shape = [1] * tensor.ndim
    if scales.size > 1:
        shape[int(quant["quantized_dimension"])] = scales.size
    if zeros.size != scales.size:
        zeros = np.broadcast_to(zeros, scales.shape)
    return ((tensor.astype(np.float32) - zeros.reshape(shape)) * scales.reshape(shape)).astype(np.float32)


def read_teacher_weights(path: Path) -> dict[str, list[npt.NDArray[np.float32]]]:
    """Keras-layout weights {layer name: [kernel, bias]} of the MLPerf DS-CNN from its float .tflite."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    weighted = [op for op in ops if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    names = ["conv0"]
    for block in range(NUM_BLOCKS):
        names += [f"dw{block + 1}", f"pw{block + 1}"]
    names.append("logits")
    if len(weighted) != len(names):
        raise ValueError(f"{path}: expected {len(names)} weighted ops, found {len(weighted)}")
    weights: dict[str, list[npt.NDArray[np.float32]]] = {}
    for name, op in zip(names, weighted, strict=True):
        kernel_index, bias_index = int(op["inputs"][1]), int(op["inputs"][2])
        kernel = _dequantize(interpreter.get_tensor(kernel_index), details[kernel_index])
        bias = _dequantize(interpreter.get_tensor(bias_index), details[bias_index])
        if (
            op["op_name"] == "CONV_2D" or op["op_name"] == "DEPTHWISE_CONV_2D"
        ):  # [out, h, w, in] -> [h, w, in, out]
            kernel = kernel.transpose(1, 2, 3, 0)
        else:  # [out, in] -> [in, out]
            kernel = kernel.T
        weights[name] = [np.ascontiguousarray(kernel), bias]
    return weights


def teacher_architecture(num_classes: int = 12) -> Architecture:
    return Architecture(channels=(TEACHER_WIDTH,) * (NUM_BLOCKS + 1), num_classes=num_classes)


def load_teacher(path: Path) -> Any:
    """The float teacher as a tf_keras model with its original 12 outputs."""
    weights = read_teacher_weights(path)
    model = build(teacher_architecture(len(weights["logits"][1])))
    for name, values in weights.items():
        model.get_layer(name).set_weights(values)
    return model


def extended_from_teacher(
    path: Path, teacher_labels: tuple[str, ...], labels: tuple[str, ...], dropout: float
) -> Any:
    """The teacher with a head for our labels: rows of labels the teacher knows are copied, new ones start
    small (random, with the teacher's ``_unknown_`` bias so they begin as 'unlikely')."""
    weights = read_teacher_weights(path)
    model = build(teacher_architecture(len(labels)), dropout=dropout)
    for name, values in weights.items():
        if name != "logits":
            model.get_layer(name).set_weights(values)
    kernel, bias = weights["logits"]
    rng = np.random.default_rng(7)
    new_kernel = rng.normal(0.0, 0.05, size=(kernel.shape[0], len(labels))).astype(np.float32)
    new_bias = np.full(len(labels), bias[teacher_labels.index(UNKNOWN_LABEL)] - 2.0, dtype=np.float32)
    for column, label in enumerate(labels):
        if label in teacher_labels:
            new_kernel[:, column] = kernel[:, teacher_labels.index(label)]
            new_bias[column] = bias[teacher_labels.index(label)]
    model.get_layer("logits").set_weights([new_kernel, new_bias])
    return model
