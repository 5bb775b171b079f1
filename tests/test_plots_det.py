"""The numbers behind ``python -m training.evaluate --plot``: each DET point is what the evaluation's own
replay counts at that threshold."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from agent.kws import KwsModel
from training import evaluate
from training.common import TEACHER_TFLITE
from training.data import inventory

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = REPO_ROOT / "models" / "kws.tflite"
DATA_DIR = Path(os.environ.get("DATA_DIR", REPO_ROOT.parent / "shared" / "data" / "speech"))

pytestmark = pytest.mark.skipif(not MODEL.exists(), reason="models/kws.tflite not built yet")


def bursty_scores(labels: tuple[str, ...], hops: int, seed: int) -> np.ndarray:
    """Per-hop posteriors: mostly silence, with bursts of random words of random strength and length."""
    rng = np.random.default_rng(seed)
    scores = np.full((hops, len(labels)), 0.01, np.float32)
    scores[:, labels.index("_silence_")] = 0.9
    at = 0
    while at < hops:
        at += int(rng.integers(1, 40))
        length = int(rng.integers(1, 12))
        scores[at : at + length, int(rng.integers(len(labels)))] += rng.uniform(0.3, 3.0)
    result: np.ndarray = scores / scores.sum(axis=1, keepdims=True)
    return result


def test_replaying_only_the_candidate_stretches_counts_what_a_full_replay_counts() -> None:
    model = KwsModel.load(MODEL)
    hop_seconds, refractory, _ = evaluate.timing(model)
    for seed in range(3):
        scores = bursty_scores(model.labels, 3000, seed)
        for word in ("computer", "yes", "right"):
            for threshold in (0.2, 0.5, 0.8, 0.95):
                thresholds = {**model.thresholds, word: threshold}
                full = evaluate.detect(scores, model.labels, thresholds, refractory, hop_seconds,
                                       model.smoothing_seconds)
                expected = sum(d.word == word for d in full)
                assert evaluate._fires(model, scores, word, threshold) == expected, (seed, word, threshold)


@pytest.mark.data
@pytest.mark.skipif(not (DATA_DIR / "real").is_dir(), reason="needs ../shared/data/speech")
def test_det_points_at_the_shipped_threshold_are_the_evaluation_figures() -> None:
    model = KwsModel.load(MODEL)
    curves, hours = evaluate.det_curves(MODEL, DATA_DIR, "validation", limit=12)
    clips = inventory(DATA_DIR, synth_dir=None, limit=12)
    # The sweep replays the model's raw per-hop scores through the runtime's recognizer; count the same way.
    hop_seconds, refractory, _ = evaluate.timing(model)

    def heard(scores: np.ndarray) -> list[evaluate.Detection]:
        return evaluate.detect(scores, model.labels, model.thresholds, refractory, hop_seconds,
                               model.smoothing_seconds)

    negative_scores = [evaluate.file_scores(model, path)
                       for path in evaluate.negative_files(clips, "validation")]
    negative_hours = sum(len(scores) for scores in negative_scores) * hop_seconds / 3600
    false_per_hour = {word: sum(d.word == word for scores in negative_scores for d in heard(scores))
                      / negative_hours for word in model.words}
    assert hours == pytest.approx(negative_hours, rel=0.02)
    assert "computer" in curves
    for word, word_curves in curves.items():
        shipped = model.thresholds[word]
        for curve in word_curves:
            at = list(curve.thresholds).index(shipped)
            assert curve.false_per_hour[at] == pytest.approx(false_per_hour[word], rel=0.02)
            clip_paths = [Path(c.path) for c in evaluate.word_clips(clips, "validation")
                          if c.label == word and evaluate.clip_source(Path(c.path)) == curve.source]
            detected = [word in {d.word for d in heard(
                evaluate.file_scores(model, path, evaluate.TRAILING_SILENCE))} for path in clip_paths]
            assert curve.miss_rate[at] == pytest.approx(1 - np.mean(detected))


@pytest.mark.data
@pytest.mark.skipif(not (DATA_DIR / "real").is_dir(), reason="needs ../shared/data/speech")
def test_plots_written_for_the_model_card(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from training.model_card import DET_DIR, _curves

    card = tmp_path / "kws.md"
    written = evaluate.write_det_plots(tmp_path / DET_DIR, MODEL, DATA_DIR, "validation", limit=4)
    numbers = json.loads((tmp_path / DET_DIR / "det.json").read_text(encoding="utf-8"))
    assert sorted(p.name for p in written) == sorted(f"det_{word}.png" for word in numbers["curves"])
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)
    images = [line for line in _curves(card) if line.startswith("![")]
    assert images[0] == f"![computer]({DET_DIR}/det_computer.png)"
    assert len(images) == len(written)
    assert _curves(tmp_path / "elsewhere" / "kws.md") == []  # no curves drawn: no section
    if TEACHER_TFLITE.exists():  # the MLPerf reference, on the same clips, for its ten words
        assert set(numbers["peers"]) == set(numbers["curves"]) - {"computer"}
        for word, peers in numbers["peers"].items():
            sources = [c["source"] for c in numbers["curves"][word]]
            assert list(peers) == [f"MLPerf Tiny reference, {source}" for source in sources]
