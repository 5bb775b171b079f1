"""The household adaptation's head (:mod:`agent.adaptation`): a one-hidden-layer MLP on the keyword model's
embedding, trained on the device in numpy (no TensorFlow), in seconds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]

HIDDEN_UNITS = 32
TRAIN_STEPS = 400
LEARNING_RATE = 0.01
L2 = 1e-3
SEED = 0
# After FOCUS_AFTER_STEPS full-batch steps, the rest train on the positives, the HARD_NEGATIVES negatives the
# head finds most word-like and a sample of the others: the remaining steps cost a fraction (enrolment must
# take seconds on a busy Pi). On the development split (python -m training.enrol_dev: 11 training clusters,
# 3 draws each, real and three changed voices) every draw heard exactly what full-batch training heard.
FOCUS_AFTER_STEPS = 100
HARD_NEGATIVES = 3000
EASY_KEEP = 8


@dataclass(frozen=True)
class Head:
    """A one-hidden-layer MLP: standardised embedding -> tanh(hidden) -> sigmoid score."""

    mean: FloatArray
    scale: FloatArray
    w1: FloatArray
    b1: FloatArray
    w2: FloatArray
    b2: float

    def score(self, embeddings: FloatArray) -> FloatArray:
        x = (np.atleast_2d(embeddings) - self.mean) / self.scale
        hidden = np.tanh(x @ self.w1 + self.b1)
        logits = np.clip(hidden @ self.w2 + self.b2, -30.0, 30.0)
        result: FloatArray = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        return result

    def standardise(self, embeddings: FloatArray) -> FloatArray:
        result: FloatArray = (np.atleast_2d(embeddings) - self.mean) / self.scale
        return result

    def arrays(self, prefix: str) -> dict[str, npt.NDArray[Any]]:
        return {f"{prefix}mean": self.mean, f"{prefix}scale": self.scale, f"{prefix}w1": self.w1,
                f"{prefix}b1": self.b1, f"{prefix}w2": self.w2,
                f"{prefix}b2": np.array([self.b2], np.float32)}

    @classmethod
    def from_arrays(cls, arrays: Any, prefix: str) -> Head:
        def get(name: str) -> FloatArray:
            return np.asarray(arrays[f"{prefix}{name}"], dtype=np.float32)

        return cls(get("mean"), get("scale"), get("w1"), get("b1"), get("w2"), float(get("b2")[0]))


def train_head(positives: FloatArray, negatives: FloatArray, *, positive_weights: FloatArray,
               negative_weights: FloatArray, hidden: int = HIDDEN_UNITS, steps: int = TRAIN_STEPS) -> Head:
    """Weighted binary cross-entropy, full-batch Adam, fixed seed: the same data gives the same head. In
    float32 throughout (an order of magnitude faster than float64 here; enrolment must take seconds)."""
    f32 = np.float32
    x = np.concatenate([positives, negatives]).astype(f32)
    y = np.concatenate([np.ones(len(positives), f32), np.zeros(len(negatives), f32)])
    weight = np.concatenate([positive_weights, negative_weights]).astype(f32)
    weight = weight / weight.sum()
    mean = x.mean(axis=0)
    scale = x.std(axis=0) + f32(1e-3)
    x = (x - mean) / scale
    rng = np.random.default_rng(SEED)
    params = [rng.normal(0, 1 / np.sqrt(x.shape[1]), (x.shape[1], hidden)).astype(f32), np.zeros(hidden, f32),
              rng.normal(0, 1 / np.sqrt(hidden), hidden).astype(f32), np.zeros(1, f32)]
    moments = [np.zeros_like(p) for p in params]
    squares = [np.zeros_like(p) for p in params]
    for step in range(1, steps + 1):
        if step == FOCUS_AFTER_STEPS + 1 and FOCUS_AFTER_STEPS:
            x, y, weight = _focus_on_hard_negatives(x, y, weight, params, rng)
        w1, b1, w2, b2 = params
        h = np.tanh(x @ w1 + b1)
        p = 1 / (1 + np.exp(-np.clip(h @ w2 + b2[0], -30, 30)))
        delta = (p - y) * weight  # d loss / d logit
        dh = delta[:, None] * w2[None, :] * (1 - h**2)
        grads = [x.T @ dh + L2 * w1, dh.sum(axis=0), h.T @ delta + L2 * w2, np.array([delta.sum()], f32)]
        for i, grad in enumerate(grads):
            moments[i] = 0.9 * moments[i] + 0.1 * grad
            squares[i] = 0.999 * squares[i] + 0.001 * grad**2
            m_hat = moments[i] / (1 - 0.9**step)
            v_hat = squares[i] / (1 - 0.999**step)
            params[i] = (params[i] - LEARNING_RATE * m_hat / (np.sqrt(v_hat) + 1e-8)).astype(f32)
    w1, b1, w2, b2 = params
    return Head(mean, scale, w1, b1, w2, float(b2[0]))


def _focus_on_hard_negatives(x: FloatArray, y: FloatArray, weight: FloatArray, params: list[FloatArray],
                             rng: np.random.Generator) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Every positive, the HARD_NEGATIVES negatives scored highest, 1 / EASY_KEEP of the others at EASY_KEEP
    times their weight (the loss stays unbiased): most negatives are far from the boundary by now."""
    w1, b1, w2, b2 = params
    negatives = np.flatnonzero(y == 0)
    if len(negatives) <= HARD_NEGATIVES * 2:
        return x, y, weight
    order = np.argsort(-(np.tanh(x[negatives] @ w1 + b1) @ w2 + b2[0]), kind="stable")
    hard, easy = negatives[order[:HARD_NEGATIVES]], negatives[order[HARD_NEGATIVES:]]
    easy = easy[rng.random(len(easy)) < 1.0 / EASY_KEEP]
    keep = np.concatenate([np.flatnonzero(y == 1), hard, easy])
    weight = weight.copy()
    weight[easy] *= EASY_KEEP
    return x[keep], y[keep], weight[keep]
