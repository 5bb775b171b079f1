"""Stages 2-3: the float teacher's soft labels and the distilled student (the teacher's DS-CNN with our
16-label head, trained on hard labels plus a distillation loss towards the teacher on the ten words it knows).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.features import LABELS, SILENCE_LABEL, UNKNOWN_LABEL
from training.common import SEED, TEACHER_LABELS, import_tf, keras_verbose, soft_labels
from training.data import Dataset

log = logging.getLogger(__name__)

NUM_LABELS = len(LABELS)
TARGET_WIDTH = 2 * NUM_LABELS + 1  # [one-hot | teacher soft labels | distillation mask]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 5e-4
    min_learning_rate: float = 1e-5
    temperature: float = 2.0
    distill_weight: float = 0.7  # alpha: share of the distillation loss where the teacher knows the label
    label_smoothing: float = 0.05
    specaugment_probability: float = 0.5
    dropout: float = 0.2
    seed: int = SEED  # shuffle order, SpecAugment and dropout (training.kws's soup members differ in it)


def logits_model(model: Any) -> Any:
    """The same weights, ending at the logits (before the softmax)."""
    tf = import_tf()
    # The softmax's input in THIS model's graph (layers may be shared with another model, e.g. by tfmot).
    layer, node_index, _ = model.outputs[0]._keras_history
    return tf.keras.Model(model.inputs, layer.get_input_at(node_index))


def teacher_mapping() -> npt.NDArray[np.float32]:
    """(12, 16) matrix taking teacher probabilities to our label order (silence/unknown kept as such)."""
    mapping = np.zeros((len(TEACHER_LABELS), NUM_LABELS), np.float32)
    for row, label in enumerate(TEACHER_LABELS):
        mapping[row, LABELS.index(label)] = 1.0
    return mapping


def soft_targets(teacher: Any, dataset: Dataset, temperature: float) -> tuple[npt.NDArray[np.float32], Any]:
    """Teacher probabilities at ``temperature`` in our label order, and where distillation applies: windows
    whose label the teacher knows (its ten words, silence, and real Speech Commands other words) and where it
    was trained to know it (not the windows with the word placed at their end)."""
    logits = logits_model(teacher).predict(dataset.features[..., None], batch_size=512, verbose=0)
    soft = (soft_labels(logits, temperature) @ teacher_mapping()).astype(np.float32)
    known = {LABELS.index(label) for label in TEACHER_LABELS if label != UNKNOWN_LABEL}
    mask = np.isin(dataset.labels, sorted(known))
    real_unknown = (dataset.labels == LABELS.index(UNKNOWN_LABEL)) & (dataset.sources == "real")
    sc_origin = np.char.startswith(dataset.origin.astype(str), "sc_")
    mask |= real_unknown & sc_origin
    mask &= ~dataset.end_placed  # the teacher learned centred words: at the window's end it does not know
    return soft, mask.astype(np.float32)


# Total weight of a label relative to one word's: the negatives stand for everything else people say and
# every other sound, so they weigh more (with equal weights the model over-predicted `computer`).
LABEL_BOOST = {UNKNOWN_LABEL: 3.0, SILENCE_LABEL: 1.5}
MINED_BOOST = 2.0  # hard negatives mined from the training recordings count double


def self_targets(model: Any, dataset: Dataset, temperature: float) -> tuple[npt.NDArray[np.float32], Any]:
    """Soft labels of a model with our own labels (the distilled student teaching its pruned copies) on
    every window."""
    logits = logits_model(model).predict(dataset.features[..., None], batch_size=512, verbose=0)
    scaled = logits / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    soft = (np.exp(scaled) / np.exp(scaled).sum(axis=1, keepdims=True)).astype(np.float32)
    return soft, np.ones(len(dataset), np.float32)


def class_weights(labels: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    """Per-window weights giving every label the same total weight times its LABEL_BOOST (capped for rare
    labels)."""
    counts = np.bincount(labels, minlength=NUM_LABELS).astype(np.float64)
    per_label = np.where(counts > 0, len(labels) / (NUM_LABELS * np.maximum(counts, 1)), 0.0)
    per_label = np.minimum(per_label, 4.0)
    per_label *= np.array([LABEL_BOOST.get(label, 1.0) for label in LABELS])
    weights = per_label[labels]
    normalized: npt.NDArray[np.float32] = (weights / weights.mean()).astype(np.float32)
    return normalized


def make_loss(config: TrainConfig) -> Any:
    tf = import_tf()
    temperature, alpha, smoothing = config.temperature, config.distill_weight, config.label_smoothing

    def loss(y_true: Any, logits: Any) -> Any:
        hard = y_true[:, :NUM_LABELS]
        soft = y_true[:, NUM_LABELS : 2 * NUM_LABELS]
        mask = y_true[:, 2 * NUM_LABELS]
        hard = hard * (1.0 - smoothing) + smoothing / NUM_LABELS
        cross_entropy = tf.nn.softmax_cross_entropy_with_logits(hard, logits)
        log_student = tf.nn.log_softmax(logits / temperature)
        distill = tf.reduce_sum(soft * (tf.math.log(soft + 1e-8) - log_student), axis=1) * temperature**2
        return (1.0 - alpha * mask) * cross_entropy + alpha * mask * distill

    return loss


def _specaugment(fill: npt.NDArray[np.float32], probability: float) -> Any:
    """SpecAugment on MFCC windows: one time mask (<= 6 frames) and one coefficient mask (<= 2), filled with
    the training mean so masked parts look like 'average', not like silence."""
    tf = import_tf()
    fill_tensor = tf.constant(fill[..., None], tf.float32)  # (frames, features, 1)
    frames, features = fill.shape

    def augment(x: Any, y: Any, w: Any) -> Any:
        def masked() -> Any:
            t_width = tf.random.uniform([], 0, 7, tf.int32)
            t_start = tf.random.uniform([], 0, frames - t_width + 1, tf.int32)
            f_width = tf.random.uniform([], 0, 3, tf.int32)
            f_start = tf.random.uniform([], 1, features - f_width + 1, tf.int32)  # keep c0 (loudness)
            t_index = tf.range(frames)[:, None, None]
            f_index = tf.range(features)[None, :, None]
            in_t = (t_index >= t_start) & (t_index < t_start + t_width)
            in_f = (f_index >= f_start) & (f_index < f_start + f_width)
            return tf.where(in_t | in_f, fill_tensor, x)

        x = tf.cond(tf.random.uniform([]) < probability, masked, lambda: x)
        return x, y, w

    return augment


def fit(  # noqa: PLR0917
    model: Any,
    dataset: Dataset,
    soft: npt.NDArray[np.float32],
    mask: npt.NDArray[np.float32],
    config: TrainConfig,
    callbacks: list[Any] | None = None,
    verbose: int | None = None,
) -> None:
    """Train ``model`` (ending in a softmax) through its logits with hard labels + distillation."""
    tf = import_tf()
    targets = np.concatenate(
        [np.eye(NUM_LABELS, dtype=np.float32)[dataset.labels], soft, mask[:, None]], axis=1
    )
    weights = class_weights(dataset.labels) * np.where(dataset.sources == "mined", MINED_BOOST, 1.0)
    weights = (weights / weights.mean()).astype(np.float32)
    features = dataset.features[..., None].astype(np.float32)
    fill = dataset.features.mean(axis=0).astype(np.float32)
    steps = math.ceil(len(features) / config.batch_size)
    if config.seed != SEED:  # the recipe's own seed leaves TensorFlow's global random state as it was
        tf.random.set_seed(config.seed)
    data = (
        tf.data.Dataset.from_tensor_slices((features, targets, weights))
        .shuffle(len(features), seed=config.seed, reshuffle_each_iteration=True)
        .map(_specaugment(fill, config.specaugment_probability), num_parallel_calls=1, deterministic=True)
        .batch(config.batch_size)
        .prefetch(2)
    )
    schedule = tf.keras.optimizers.schedules.CosineDecay(
        config.learning_rate, steps * config.epochs, alpha=config.min_learning_rate / config.learning_rate
    )
    trainable = logits_model(model)
    trainable.compile(optimizer=tf.keras.optimizers.Adam(schedule), loss=make_loss(config))
    started = time.monotonic()
    trainable.fit(data, epochs=config.epochs, verbose=keras_verbose() if verbose is None else verbose,
                  callbacks=callbacks or [])
    log.info(
        "trained %d epochs on %d windows in %.0f s", config.epochs, len(features), time.monotonic() - started
    )


def predict(model: Any, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    if len(features) == 0:
        return np.zeros((0, NUM_LABELS), np.float32)
    return np.asarray(model.predict(features[..., None], batch_size=512, verbose=0), dtype=np.float32)


def teacher_predictions_as_labels(teacher: Any, features: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    """The teacher's argmax in our label indices (its silence/unknown map to ours)."""
    if len(features) == 0:
        return np.zeros(0, np.int64)
    probabilities = teacher.predict(features[..., None], batch_size=512, verbose=0)
    return np.array([LABELS.index(TEACHER_LABELS[i]) for i in probabilities.argmax(axis=1)], dtype=np.int64)


__all__ = ["SILENCE_LABEL", "TrainConfig", "fit", "predict", "soft_targets", "teacher_predictions_as_labels"]
