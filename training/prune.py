"""Stage 4: pruning.

- Structured (channel) pruning by importance, our own code (tfmot has none): each channel group (the output of
  conv0 and of every pointwise conv) is ranked by how much it feeds forward - its mean activation after the
  next depthwise conv (or the pooling) times the L2 norm of the weights that read it - and the weakest
  channels are cut from the producing conv, the depthwise conv and the consumer. This really cuts MACs.
- Magnitude pruning (tfmot ``prune_low_magnitude``) of the convolutions and the dense layer: zeros that only
  shrink the compressed download (LiteRT stores and runs int8 weights dense; depthwise convs are left alone).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import numpy.typing as npt

from training.common import import_tf
from training.dscnn import NUM_BLOCKS, copied_channels

log = logging.getLogger(__name__)


def _channel_importance(model: Any, calibration: npt.NDArray[np.float32]) -> list[npt.NDArray[np.float64]]:
    tf = import_tf()
    probes = [model.get_layer(f"relu_dw{block + 1}").output for block in range(NUM_BLOCKS)]
    probes.append(model.get_layer(f"relu_pw{NUM_BLOCKS}").output)
    probe_model = tf.keras.Model(model.input, probes)
    activations = probe_model.predict(calibration[..., None], batch_size=512, verbose=0)
    importance = []
    for group in range(NUM_BLOCKS + 1):
        mean_activation = np.asarray(activations[group]).mean(axis=(0, 1, 2)).astype(np.float64)
        if group < NUM_BLOCKS:
            consumer = model.get_layer(f"pw{group + 1}").get_weights()[0][0, 0]  # (c_in, c_out)
        else:
            consumer = model.get_layer("logits").get_weights()[0]  # (c_in, classes)
        importance.append(mean_activation * np.linalg.norm(consumer, axis=1))
    return importance


def structured_prune(model: Any, calibration: npt.NDArray[np.float32], channels: tuple[int, ...]) -> Any:
    """A narrower copy of ``model`` keeping, per channel group, the ``channels[g]`` most important ones."""
    importance = _channel_importance(model, calibration)
    keep = [np.sort(np.argsort(-score)[:width]) for score, width in zip(importance, channels, strict=True)]
    return copied_channels(model, keep)


def magnitude_prune_wrap(model: Any, sparsity: float, begin_step: int, end_step: int) -> Any:
    """Wrap the convolutions (not depthwise) and the dense layer in tfmot low-magnitude pruning."""
    tf = import_tf()
    import tensorflow_model_optimization as tfmot

    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=sparsity, begin_step=begin_step, end_step=end_step
    )

    def wrap(layer: Any) -> Any:
        if isinstance(layer, tf.keras.layers.DepthwiseConv2D):
            return layer
        if isinstance(layer, tf.keras.layers.Conv2D | tf.keras.layers.Dense):
            return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
        return layer

    return tf.keras.models.clone_model(model, clone_function=wrap)


def pruning_callbacks() -> list[Any]:
    import tensorflow_model_optimization as tfmot

    return [tfmot.sparsity.keras.UpdatePruningStep()]


def strip(model: Any) -> Any:
    import tensorflow_model_optimization as tfmot

    return tfmot.sparsity.keras.strip_pruning(model)


def sparsity_report(model: Any) -> dict[str, float]:
    """Fraction of exact zeros per weighted layer (kernels only)."""
    report = {}
    for layer in model.layers:
        weights = layer.get_weights()
        if weights and weights[0].ndim >= 2:
            report[layer.name] = round(float(np.mean(weights[0] == 0)), 3)
    return report
