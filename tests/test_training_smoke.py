"""The keyword-model pipeline end to end on a tiny subset (``python -m training.kws --smoke``)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.features import LABELS, window_features
from agent.kws import KwsModel

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("DATA_DIR", REPO_ROOT.parent / "shared" / "data" / "speech"))
TEACHER = REPO_ROOT.parent / "shared" / "peers" / "mlperf_tiny_kws" / "mlperf_kws_ref_model_float32.tflite"


def smoke_run(out: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """``python -m training.kws --smoke OPTIONS`` on the shared data into ``out``; skips without ../shared."""
    if not (DATA_DIR / "real").is_dir() or not TEACHER.exists():
        pytest.skip(f"needs ../shared (speech data at {DATA_DIR} and the MLPerf teacher)")
    result = subprocess.run(
        [sys.executable, "-m", "training.kws", "--smoke", *options, "--data", str(DATA_DIR),
         "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=1500, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_driver_without_data_explains_and_succeeds(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "training.kws", "--smoke", "--data", str(tmp_path / "absent"),
         "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "no speech data" in result.stderr
    assert not (tmp_path / "kws.tflite").exists()


@pytest.mark.train
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="tensorflow is not installed")
def test_smoke_run_builds_a_loadable_int8_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = smoke_run(out)
    for stage in ("1/6 data", "2/6 teacher", "3/6 student", "4/6 prune", "5/6 quantize", "6/6 evaluate"):
        assert stage in result.stderr
    model = KwsModel.load(out / "kws.tflite")
    assert model.is_quantized and model.labels == LABELS
    assert (out / "kws.tflite").stat().st_size <= 64 * 1024
    scores = model.predict(window_features(np.zeros(16000, np.int16), model.params))
    assert scores.shape == (len(LABELS),)
    metadata = json.loads((out / "kws.json").read_text(encoding="utf-8"))
    assert metadata["training"]["smoke"] is True
    card = (out / "kws.md").read_text(encoding="utf-8")
    assert "SMOKE RUN" in card and "Compression ablation" in card


def test_rethreshold_needs_an_output_folder(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "training.kws", "--smoke", "--rethreshold",
         str(REPO_ROOT / "models" / "kws.tflite"), "--data", str(DATA_DIR)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if "no speech data" in result.stderr or "is missing" in result.stderr:
        pytest.skip("needs ../shared (speech data and the MLPerf teacher)")
    assert result.returncode == 2 and "--rethreshold needs --out" in result.stderr


@pytest.mark.slow
def test_rethreshold_writes_a_copy_with_thresholds_chosen_again(tmp_path: Path) -> None:
    if not (DATA_DIR / "real").is_dir() or not TEACHER.exists():
        pytest.skip(f"needs ../shared (speech data at {DATA_DIR} and the MLPerf teacher)")
    shipped = REPO_ROOT / "models" / "kws.tflite"
    before = shipped.with_suffix(".json").read_bytes()
    result = subprocess.run(
        [sys.executable, "-m", "training.kws", "--smoke", "--rethreshold", str(shipped),
         "--data", str(DATA_DIR), "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "kws.tflite").read_bytes() == shipped.read_bytes()
    assert shipped.with_suffix(".json").read_bytes() == before  # the shipped model is never changed in place
    metadata = json.loads((tmp_path / "kws.json").read_text(encoding="utf-8"))
    assert set(metadata["thresholds"]) == set(LABELS[:-2])
    assert all(0.5 <= value <= 0.99 for value in metadata["thresholds"].values())
    assert KwsModel.load(tmp_path / "kws.tflite").labels == LABELS


@pytest.mark.train
@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="tensorflow is not installed")
def test_a_soup_is_the_mean_of_its_members_every_variable() -> None:
    from training.common import import_tf
    from training.kws import soup

    tf = import_tf()

    def member(scale: float) -> Any:
        model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(3),
                                     tf.keras.layers.BatchNormalization(), tf.keras.layers.Dense(2)])
        model.set_weights([np.full(w.shape, scale * (i + 1), np.float32) for i, w in
                           enumerate(model.get_weights())])
        return model

    members = [member(1.0), member(2.0), member(6.0)]
    averaged = soup(members)
    assert averaged is not members[0]
    weights = averaged.get_weights()
    # kernels, biases, batch-norm gamma, beta, moving mean and variance: each the mean (3x the first member's)
    assert len(weights) == 8
    for i, values in enumerate(weights):
        np.testing.assert_allclose(values, 3.0 * (i + 1))
    np.testing.assert_allclose(members[0].get_weights()[0], 1.0)  # the members are left as they were


@pytest.mark.train
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="tensorflow is not installed")
def test_a_smoke_soup_trains_each_member_and_ships_one_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = smoke_run(out, "--soup", "2")
    assert result.stderr.count("3/6 student") == 2 and "(seed 1235)" in result.stderr
    assert "soup of 2 (64 ch, float)" in result.stderr
    assert json.loads((out / "kws.json").read_text(encoding="utf-8"))["training"]["soup"] == 2
    assert "- Soup: the student and fine-tuning stages run 2 times" in (out / "kws.md").read_text("utf-8")
    assert (out / "kws.tflite").stat().st_size <= 64 * 1024


@pytest.mark.train
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="tensorflow is not installed")
def test_a_development_only_run_gives_no_held_out_figure(tmp_path: Path) -> None:
    """--development-only: the model and the development split's measures, and nothing measured on a held-out
    clip of the candidate (the fixed MLPerf teacher's reference row is not the candidate's)."""
    out = tmp_path / "out"
    result = smoke_run(out, "--development-only", "--seed", "1240")
    assert "development split (training side)" in result.stderr
    assert "new voices (held out)" not in result.stderr
    candidate_rows = [line for line in result.stderr.splitlines()
                      if "held-out speakers" in line and "float teacher" not in line]
    assert candidate_rows == []
    assert not (out / "kws.md").exists()
    report = json.loads((out / "development.json").read_text(encoding="utf-8"))
    assert report["new_voices_development"]["split"] == "development (training side)"
    assert json.loads((out / "kws.json").read_text(encoding="utf-8"))["training"]["seed"] == 1240


def test_development_only_needs_an_output_folder() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "training.kws", "--smoke", "--development-only", "--data", str(DATA_DIR)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if "no speech data" in result.stderr or "is missing" in result.stderr:
        pytest.skip("needs ../shared (speech data and the MLPerf teacher)")
    assert result.returncode == 2 and "--development-only needs --out" in result.stderr
