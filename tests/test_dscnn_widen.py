"""Copying DS-CNN channels (``training.dscnn.copied_channels``): widening (Net2Net) and pruning."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest

pytestmark = [
    pytest.mark.train,
    pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="tensorflow is not installed"),
]


def _random_model(channels: tuple[int, ...]) -> Any:
    from training import dscnn

    model = dscnn.build(dscnn.Architecture(channels=channels, num_classes=16), dropout=0.2)
    rng = np.random.default_rng(3)
    # Positive biases keep most ReLUs open, so every copied channel matters to the output.
    model.set_weights([rng.normal(0.1, 0.3, w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def test_widening_keeps_the_outputs_and_breaks_the_symmetry_of_the_copies() -> None:
    from training import dscnn

    model = _random_model((8, 8, 6, 8, 8))
    wide = dscnn.widened(model, (12, 10, 16, 9, 13))
    assert dscnn.channels_of(wide) == (12, 10, 16, 9, 13)
    assert dscnn.dropout_of(wide) == pytest.approx(0.2)
    features = np.random.default_rng(4).normal(0, 5, (32, 49, 10, 1)).astype(np.float32)
    before = model.predict(features, verbose=0)
    after = wide.predict(features, verbose=0)
    assert after.std() > 1e-3  # not a degenerate (constant) output
    np.testing.assert_allclose(after, before, atol=2e-5)
    # A copy reads the same inputs but its consumer's weights differ from its original's: gradients differ.
    dense = wide.get_layer("logits").get_weights()[0]
    assert len({tuple(np.round(row, 6)) for row in dense}) == dense.shape[0]


def test_widening_cannot_narrow() -> None:
    from training import dscnn

    with pytest.raises(ValueError, match="cannot widen"):
        dscnn.widened(_random_model((8, 8, 8, 8, 8)), (8, 8, 4, 8, 8))


def test_structured_pruning_keeps_the_chosen_channels_weights() -> None:
    """Pruning and widening share dscnn.copied_channels: pruned to its full width the model is unchanged, and
    a narrower copy holds exactly the kept channels' filters."""
    from training import dscnn, prune

    model = _random_model((8, 8, 6, 8, 8))
    features = np.random.default_rng(5).normal(0, 5, (16, 49, 10, 1)).astype(np.float32)
    same = prune.structured_prune(model, features, (8, 8, 6, 8, 8))
    pruned_out, model_out = (m.predict(features, verbose=0) for m in (same, model))
    np.testing.assert_allclose(pruned_out, model_out, atol=1e-5)
    narrow = prune.structured_prune(model, features, (4, 8, 6, 8, 5))
    assert dscnn.channels_of(narrow) == (4, 8, 6, 8, 5)
    kernel = model.get_layer("conv0").get_weights()[0]
    kept = [next(i for i in range(8) if np.array_equal(kernel[..., i], column))
            for column in np.moveaxis(narrow.get_layer("conv0").get_weights()[0], -1, 0)]
    assert kept == sorted(set(kept))  # four distinct original filters, in their order
    narrow_bias, model_bias = (m.get_layer("logits").get_weights()[1] for m in (narrow, model))
    np.testing.assert_array_equal(narrow_bias, model_bias)
