"""The shipped keyword model: loads with LiteRT, is int8 and small, its metadata agrees with the runtime's
features, broken files give ModelError, and golden clips (project-made speech, no ../shared) are recognised.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from agent.audio import to_int16
from agent.errors import ModelError
from agent.features import LABELS, FeatureParams, StreamingFeatures, window_features
from agent.kws import KwsModel
from agent.messages import Scores
from agent.recognizer import Recognizer, RecognizerSettings

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = REPO_ROOT / "models" / "kws.tflite"
METADATA = MODEL.with_suffix(".json")
EXAMPLES = REPO_ROOT / "examples"
MAX_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def model() -> KwsModel:
    return KwsModel.load(MODEL)


def copy_model(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    target = tmp_path / "kws.tflite"
    shutil.copy(MODEL, target)
    shutil.copy(METADATA, target.with_suffix(".json"))
    return target, json.loads(METADATA.read_text(encoding="utf-8"))


def write_metadata(path: Path, metadata: dict[str, Any]) -> None:
    path.with_suffix(".json").write_text(json.dumps(metadata), encoding="utf-8")


# ------------------------------------------------------------------------------------ the shipped artefact


def test_shipped_model_is_int8_small_and_consistent(model: KwsModel) -> None:
    assert MODEL.stat().st_size <= MAX_BYTES
    assert model.size_bytes == MODEL.stat().st_size
    assert model.is_quantized
    assert model.input_dtype == np.int8 and model.output_dtype == np.int8
    assert model.labels == LABELS
    # The runtime computes features with the default parameters: the model must have been trained on them.
    assert model.params == FeatureParams()
    assert set(model.thresholds) == set(model.words) == set(LABELS) - {"_silence_", "_unknown_"}
    assert all(0.0 < t <= 1.0 for t in model.thresholds.values())
    assert 0 < model.smoothing_seconds <= 1.0 and 0 < model.refractory_seconds <= 3.0
    assert model.sha256 == hashlib.sha256(MODEL.read_bytes()).hexdigest()


def test_predict_returns_probabilities(model: KwsModel) -> None:
    scores = model.predict(window_features(np.zeros(16000, np.int16), model.params))
    assert scores.shape == (len(LABELS),) and scores.dtype == np.float32
    assert abs(float(scores.sum()) - 1.0) < 0.05
    assert model.labels[int(np.argmax(scores))] == "_silence_"


def test_predict_rejects_wrong_shape(model: KwsModel) -> None:
    with pytest.raises(ValueError, match="expects"):
        model.predict(np.zeros((40, 10), np.float32))


def test_a_stack_of_windows_in_one_invocation_gets_each_window_s_probabilities(model: KwsModel) -> None:
    """predict_batch (the voice path's idle block: its windows in one invocation) is predict of each window,
    bit for bit: windows of speech, of silence, and values beyond the input's range (clipped)."""
    rng = np.random.default_rng(5)
    speech = to_int16(rng.normal(0, 0.2, 16000 * 3))
    windows = [window_features(speech[end - 16000 : end], model.params)
               for end in range(16000, len(speech), 4000)]
    windows += [window_features(np.zeros(16000, np.int16), model.params),
                rng.uniform(-300, 300, model.params.shape).astype(np.float32)]
    stack = np.stack(windows)
    for count in (2, 5, len(stack)):
        np.testing.assert_array_equal(model.predict_batch(stack[:count]),
                                      np.stack([model.predict(w) for w in stack[:count]]))
    with pytest.raises(ValueError, match="expects"):
        model.predict_batch(stack[0])


# ------------------------------------------------------------------------------------------ broken files


def test_missing_model(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read keyword model"):
        KwsModel.load(tmp_path / "nothing.tflite")


def test_missing_metadata(tmp_path: Path) -> None:
    path, _ = copy_model(tmp_path)
    path.with_suffix(".json").unlink()
    with pytest.raises(ModelError, match="cannot read keyword model metadata"):
        KwsModel.load(path)


def test_corrupt_model_with_matching_checksum(tmp_path: Path) -> None:
    path, metadata = copy_model(tmp_path)
    garbage = MODEL.read_bytes()[:1000]
    path.write_bytes(garbage)
    write_metadata(path, {**metadata, "sha256": hashlib.sha256(garbage).hexdigest()})
    with pytest.raises(ModelError, match="cannot load keyword model"):
        KwsModel.load(path)


def test_replaced_model_fails_the_checksum(tmp_path: Path) -> None:
    path, _ = copy_model(tmp_path)
    data = bytearray(MODEL.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match its metadata"):
        KwsModel.load(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("thresholds"), "lacks thresholds"),
        (lambda m: m.pop("sha256"), "lacks sha256"),
        (lambda m: m["feature_params"].update(num_coefficients=13), "input shape"),
        (lambda m: m["feature_params"].update(colour="blue"), "unknown keys"),
        (lambda m: m["labels"].pop(), "output shape"),
        (lambda m: m["thresholds"].update(computer=1.5), "threshold of 'computer'"),
        (lambda m: m["thresholds"].pop("fan"), "no threshold for fan"),
        (lambda m: m["thresholds"].update(banana=0.5), "not labels"),
        (lambda m: m.update(refractory_seconds="soon"), "refractory_seconds"),
        (lambda m: m.update(labels="computer"), "labels must be"),
    ],
)
def test_bad_metadata(tmp_path: Path, change: Any, message: str) -> None:
    path, metadata = copy_model(tmp_path)
    change(metadata)
    write_metadata(path, metadata)
    with pytest.raises(ModelError, match=message):
        KwsModel.load(path)


def test_metadata_that_is_not_json(tmp_path: Path) -> None:
    path, _ = copy_model(tmp_path)
    path.with_suffix(".json").write_text("{labels: ", encoding="utf-8")
    with pytest.raises(ModelError, match="not valid JSON"):
        KwsModel.load(path)


# ---------------------------------------------------------------------------------------------- golden


def read_wav(path: Path) -> np.ndarray:
    samples: np.ndarray
    samples, rate = soundfile.read(str(path), dtype="int16")
    assert rate == 16000 and samples.ndim == 1
    return samples


def isolated_word(samples: np.ndarray, start: float, end: float) -> np.ndarray:
    """The word alone, centred in a 1 s window (neighbouring words cut away)."""
    word = samples[max(0, int((start - 0.03) * 16000)) : int((end + 0.03) * 16000)][:16000]
    window = np.zeros(16000, np.int16)
    offset = (16000 - len(word)) // 2
    window[offset : offset + len(word)] = word[:16000]
    return window


def trimmed(samples: np.ndarray) -> np.ndarray:
    """Without the leading and trailing silence (10 ms frames below 3 % of the loudest frame)."""
    frames = samples[: len(samples) // 160 * 160].astype(np.float64).reshape(-1, 160)
    rms = np.sqrt((frames**2).mean(axis=1))
    loud = np.flatnonzero(rms > 0.03 * rms.max())
    return samples[loud[0] * 160 : (loud[-1] + 1) * 160]


def example_files() -> list[dict[str, Any]]:
    listing = EXAMPLES / "examples.json"
    if not listing.exists():
        return []
    files: list[dict[str, Any]] = json.loads(listing.read_text(encoding="utf-8"))["files"]
    return files


# The model misses the wake word in flite's slt voice (even in its training clips of that voice about half
# the time; see models/kws.md): the example files voiced by it are known failures, kept visible as xfail.
FLITE_SLT = pytest.mark.xfail(
    reason="flite slt 'computer' is not recognised (models/kws.md, limits)", strict=False
)


def example_params() -> list[Any]:
    params = []
    for item in example_files():
        voices = {(c["engine"], c["voice"]) for c in item["commands"]}
        marks = [FLITE_SLT] if ("flite", "slt") in voices else []
        params.append(pytest.param(item, id=item["file"], marks=marks))
    return params or [pytest.param(None, marks=pytest.mark.skip(reason="examples/examples.json is missing"))]


@pytest.mark.parametrize("example", example_params())
def test_golden_example_words(model: KwsModel, example: dict[str, Any]) -> None:
    """Every word of a project-made example command, cut out on its own, is its own top label."""
    samples = read_wav(EXAMPLES / example["file"])
    results = []
    for word in example["words"]:
        window = isolated_word(samples, word["start"], word["end"])
        scores = model.predict(window_features(window, model.params))
        results.append((word["word"], model.labels[int(np.argmax(scores))], round(float(scores.max()), 2)))
    wrong = [r for r in results if r[0] != r[1]]
    assert not wrong, f"misrecognised golden words (said, heard, score): {wrong}"


def stream_detections(model: KwsModel, samples: np.ndarray) -> list[str]:
    """The runtime's path: 100 ms hops of StreamingFeatures, the model, agent.recognizer's smoothing,
    thresholds and refractory time from the metadata."""
    hop = 1600
    recognizer = Recognizer(
        RecognizerSettings(
            labels=model.labels,
            thresholds=model.thresholds,
            smoothing_seconds=model.smoothing_seconds,
            refractory_seconds=model.refractory_seconds,
        )
    )
    stream = StreamingFeatures(model.params)
    fired = []
    padded = np.concatenate([samples, np.zeros(8000, np.int16)])
    for index, start in enumerate(range(0, len(padded) - hop + 1, hop)):
        stream.push(padded[start : start + hop])
        probabilities = model.predict(stream.features())
        scores = Scores(labels=model.labels, values=probabilities, t_audio=(index + 1) / 10)
        detection = recognizer.process(scores)
        if detection is not None:
            fired.append(detection.word)
    return fired


@pytest.mark.parametrize("example", example_params())
def test_golden_example_files_stream_to_their_words(model: KwsModel, example: dict[str, Any]) -> None:
    """The whole file through the runtime path detects exactly its words, in order."""
    expected = [w["word"] for w in example["words"]]
    fired = stream_detections(model, read_wav(EXAMPLES / example["file"]))
    assert fired == expected, f"{example['file']}: expected {expected}, detected {fired}"


ESPEAK = shutil.which("espeak-ng")
ESPEAK_WORDS = ("computer", "yes", "no", "stop", "go", "left", "right", "up", "down", "on", "off")


def espeak(word: str, tmp_path: Path, voice: str = "en-us", speed: int = 150) -> np.ndarray:
    out = tmp_path / f"{word}.wav"
    subprocess.run(
        [ESPEAK or "espeak-ng", "-v", voice, "-s", str(speed), "-w", str(out), word], check=True, timeout=30
    )
    samples, rate = soundfile.read(str(out), dtype="float32")
    scipy_signal = pytest.importorskip("scipy.signal")
    resampled = scipy_signal.resample_poly(samples, 16000 // np.gcd(rate, 16000), rate // np.gcd(rate, 16000))
    return to_int16(resampled)


@pytest.mark.skipif(ESPEAK is None, reason="espeak-ng is not installed")
def test_golden_espeak_words(model: KwsModel, tmp_path: Path) -> None:
    """Words rendered by espeak-ng at test time (a synthetic voice; real-speaker accuracy is in the card)."""
    heard = {}
    for word in ESPEAK_WORDS:
        samples = trimmed(espeak(word, tmp_path))
        scores = model.predict(
            window_features(isolated_word(samples, 0.0, len(samples) / 16000), model.params)
        )
        heard[word] = model.labels[int(np.argmax(scores))]
    wrong = {w: h for w, h in heard.items() if w != h}
    assert len(wrong) <= 1, f"espeak-ng words misrecognised: {wrong}"


@pytest.mark.skipif(ESPEAK is None, reason="espeak-ng is not installed")
def test_non_vocabulary_speech_is_not_a_command(model: KwsModel, tmp_path: Path) -> None:
    samples = espeak("the weather is lovely this morning", tmp_path, speed=160)
    fired = stream_detections(model, samples)
    assert "computer" not in fired, fired


@pytest.mark.data
@pytest.mark.slow
def test_evaluation_on_held_out_speakers() -> None:
    """The evaluation contract on the validation speakers of ../shared (skipped without it)."""
    data_dir = Path(os.environ.get("DATA_DIR", REPO_ROOT.parent / "shared" / "data" / "speech"))
    if not (data_dir / "real").is_dir():
        pytest.skip(f"no speech data at {data_dir}")
    result = subprocess.run(
        [sys.executable, "-m", "training.evaluate", "--model", str(MODEL), "--data", str(data_dir),
         "--json", "--split", "validation"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200, check=True,
    )  # fmt: skip
    report = json.loads(result.stdout)
    assert report["size_bytes"] == MODEL.stat().st_size <= MAX_BYTES
    assert set(report["per_word"]) >= {"computer", "on", "off", "up", "down", "stop", "go", "yes", "no"}
    assert all(item["n"] > 30 for word, item in report["per_word"].items() if word != "_silence_")
    assert report["mean_accuracy"] >= 0.92, report["per_word"]
    assert report["per_word"]["computer"]["accuracy"] >= 0.90
    # Wake-word false detections on the negatives the training never used (0.6 h: one event is 1.7/h).
    assert report["false_detections_per_hour"] <= 0.5, report["false_detections"]
    assert report["macs"] > 0 and report["median_invoke_ms"] > 0


def test_predict_quantizes_and_dequantizes_as_the_plain_formula(model: KwsModel) -> None:
    """predict() quantizes into a preallocated buffer and dequantizes through a table of all 256 outputs:
    the same numbers as round/clip/astype on the input and (q - zero) * scale on the output, for features
    across the whole int8 range and beyond it (clipped)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=MODEL.read_bytes(), num_threads=1)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    in_scale, in_zero = (float(v) for v in inp["quantization"])
    out_scale, out_zero = (float(v) for v in out["quantization"])
    rng = np.random.default_rng(2)
    outputs_seen: set[int] = set()
    for spread in (1.0, 20.0, 80.0, 400.0):
        for _ in range(25):
            features = (rng.normal(0.0, spread, model.params.shape)).astype(np.float32)
            quantized = np.clip(np.round(features / in_scale + in_zero), -128, 127).astype(np.int8)
            interpreter.set_tensor(inp["index"], quantized.reshape(inp["shape"]))
            interpreter.invoke()
            raw = interpreter.get_tensor(out["index"])[0]
            outputs_seen.update(int(v) for v in raw)
            expected = ((raw.astype(np.float32) - out_zero) * out_scale).astype(np.float32)
            got = model.predict(features)
            np.testing.assert_array_equal(got, expected)
            assert got.dtype == np.float32
    assert min(outputs_seen) < 0 < max(outputs_seen)  # both halves of the table were used
