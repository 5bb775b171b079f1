"""The second-stage wake verifier (agent.verifier): the longer mel history it reads, its files and their
checks, and its one place in the voice pipeline (what the daemon, ``home-agent transcribe`` and the
evaluations run), including that a household's enrolled wake word is not second-guessed."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from agent.config import VoiceSection
from agent.errors import ModelError
from agent.features import WAKE_WORD, FeatureParams, StreamingFeatures, _front_end
from agent.kws import KwsModel, model_hop_seconds
from agent.sequence import RecentHops
from agent.transcribe import transcribe_file
from agent.verifier import VERIFIER_FORMAT, WakeVerifier, verifier_input
from agent.voice import VoicePipeline

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = REPO_ROOT / "models" / "kws.tflite"
EXAMPLES = REPO_ROOT / "examples"
WAKE_CLIP = EXAMPLES / "computer_heat_up.wav"  # piper joe: the shipped model wakes on it
DATA_DIR = Path(os.environ.get("DATA_DIR", REPO_ROOT.parent / "shared" / "data" / "speech"))
HAS_TF = importlib.util.find_spec("tensorflow") is not None
FRAMES = 74  # 1.5 s of 20 ms frames
PARAMS = FeatureParams()


# ------------------------------------------------------------------------- the features it reads


def test_recent_mel_is_the_mel_of_the_audio_ending_with_the_window() -> None:
    rng = np.random.default_rng(0)
    audio = (rng.normal(0, 3000, 16000 * 3)).astype(np.int16)
    stream = StreamingFeatures(PARAMS, history_frames=FRAMES)
    front_end = _front_end(PARAMS)
    for end in range(1600, len(audio) + 1, 1600):
        stream.push(audio[end - 1600 : end])
        if end < 24000:
            continue
        segment = audio[end - 24000 : end].astype(np.float64) / 32768.0
        expected = front_end.mel_energies(segment[: PARAMS.frame_samples + (FRAMES - 1) * PARAMS.hop_samples])
        np.testing.assert_array_equal(stream.recent_mel(FRAMES), expected)
    with pytest.raises(ValueError, match="history_frames"):
        StreamingFeatures(PARAMS).recent_mel(FRAMES)


def test_recent_mel_of_an_earlier_hop_is_what_it_was_when_the_stream_had_only_reached_it() -> None:
    # The voice pipeline pushes up to an idle read's hops at once, then asks about each hop (``end``).
    rng = np.random.default_rng(2)
    audio = (rng.normal(0, 3000, 16000 * 3)).astype(np.int16)
    hop, block = PARAMS.hop_samples, 5 * PARAMS.hop_samples
    batched = StreamingFeatures(PARAMS, behind=block - hop, history_frames=FRAMES)
    single = StreamingFeatures(PARAMS, history_frames=FRAMES)
    for start in range(0, len(audio), block):
        batched.push(audio[start : start + block])
        for end in range(start + hop, start + block + 1, hop):
            single.push(audio[end - hop : end])
            np.testing.assert_array_equal(batched.recent_mel(FRAMES, end=end), single.recent_mel(FRAMES))


def test_a_longer_history_changes_nothing_else() -> None:
    rng = np.random.default_rng(1)
    audio = (rng.normal(0, 2000, 16000 * 4)).astype(np.int16)
    audio[20000:30000] = 0  # a pause
    plain, longer = StreamingFeatures(PARAMS), StreamingFeatures(PARAMS, history_frames=FRAMES)
    for start in range(0, len(audio), 1600):
        plain.push(audio[start : start + 1600])
        longer.push(audio[start : start + 1600])
        np.testing.assert_array_equal(plain.features(), longer.features())
        np.testing.assert_array_equal(plain.features(silence_before=start),
                                      longer.features(silence_before=start))
        first_plain, energies_plain = plain.recent_frame_energies()
        first_longer, energies_longer = longer.recent_frame_energies()
        assert first_plain == first_longer
        np.testing.assert_array_equal(energies_plain, energies_longer)


def test_verifier_input_removes_the_level_and_the_microphone_colouring() -> None:
    rng = np.random.default_rng(2)
    mel = rng.uniform(0.01, 10.0, (FRAMES, 40))
    colouring = rng.uniform(0.2, 5.0, 40)  # a fixed gain per band: another microphone, another level
    np.testing.assert_allclose(verifier_input(mel * colouring, 1e-12), verifier_input(mel, 1e-12), atol=1e-5)
    assert np.allclose(verifier_input(mel, 1e-4).mean(axis=0), 0.0, atol=1e-5)


# ----------------------------------------------------------------------------------- its files

needs_tf = pytest.mark.skipif(not HAS_TF, reason="building a test verifier needs tensorflow")


@pytest.fixture(scope="module")
def verifier_bytes() -> bytes:
    """A tiny untrained int8 verifier (its threshold decides what it accepts in these tests)."""
    if not HAS_TF:
        pytest.skip("needs tensorflow")
    from training import export
    from training.verifier import build_model

    model = build_model(FRAMES, PARAMS.num_mel_bands, (4, 8, 8, 8))
    calibration = np.random.default_rng(3).normal(0, 2, (20, FRAMES, PARAMS.num_mel_bands)).astype(np.float32)
    with warnings.catch_warnings():  # the converter's own chatter (int8 input statistics)
        warnings.simplefilter("ignore")
        return export.convert_int8(model, calibration)


def install(tmp_path: Path, tflite: bytes, threshold: float, **changes: Any) -> Path:
    """The shipped keyword model in ``tmp_path`` with a verifier named in its metadata."""
    from training.verifier import write_verifier

    tmp_path.mkdir(parents=True, exist_ok=True)
    model_path = tmp_path / "kws.tflite"
    shutil.copy(MODEL, model_path)
    metadata = json.loads(MODEL.with_suffix(".json").read_text(encoding="utf-8"))
    metadata.pop("verifier", None)
    model_path.with_suffix(".json").write_text(json.dumps(metadata), encoding="utf-8")
    verifier_metadata = {"format": VERIFIER_FORMAT, "word": WAKE_WORD, "frames": FRAMES,
                         "num_mel_bands": 40, "log_offset": 1e-4, "threshold": threshold,
                         "keyword_model_sha256": metadata["sha256"], **changes}
    write_verifier(tmp_path, model_path, tflite, verifier_metadata)
    return model_path


@needs_tf
def test_the_model_loads_the_verifier_its_metadata_names(tmp_path: Path, verifier_bytes: bytes) -> None:
    model = KwsModel.load(install(tmp_path, verifier_bytes, 0.5))
    assert model.verifier is not None and model.verifier.threshold == 0.5 and model.verifier.frames == FRAMES
    assert KwsModel.load(tmp_path / "kws.tflite", verifier=False).verifier is None
    assert 0.0 <= model.verifier.score(np.ones((FRAMES, 40))) <= 1.0


@needs_tf
@pytest.mark.parametrize(("damage", "message"), [
    ("missing", "cannot read the wake verifier"),
    ("replaced", "does not match its metadata"),
    ("other model", "was trained against keyword model"),
    ("not json", "is not valid JSON"),
    ("no threshold", "lacks threshold"),
    ("bad threshold", "threshold must be a number"),
    ("not a label", "not a word of"),
    ("a path", "must be a file name beside the model"),
    ("posterior input", "lacks frames, num_mel_bands"),
])
def test_a_missing_or_broken_verifier_is_a_clear_model_error(tmp_path: Path, verifier_bytes: bytes,
                                                             damage: str, message: str) -> None:
    model_path = install(tmp_path, verifier_bytes, 0.5)
    verifier_path = tmp_path / "kws_verifier.tflite"
    verifier_json = verifier_path.with_suffix(".json")
    meta = json.loads(verifier_json.read_text(encoding="utf-8"))
    if damage == "missing":
        verifier_path.unlink()
    elif damage == "replaced":
        verifier_path.write_bytes(verifier_bytes[:-8] + b"\0" * 8)
    elif damage == "other model":
        verifier_json.write_text(json.dumps({**meta, "keyword_model_sha256": "0" * 64}), encoding="utf-8")
    elif damage == "not json":
        verifier_json.write_text("{", encoding="utf-8")
    elif damage == "no threshold":
        verifier_json.write_text(json.dumps({k: v for k, v in meta.items() if k != "threshold"}),
                                 encoding="utf-8")
    elif damage == "bad threshold":
        verifier_json.write_text(json.dumps({**meta, "threshold": 2}), encoding="utf-8")
    elif damage == "not a label":
        verifier_json.write_text(json.dumps({**meta, "word": "sheila"}), encoding="utf-8")
    elif damage == "posterior input":  # the keyword model's posteriors instead of mel: no longer read
        meta = {k: v for k, v in meta.items() if k not in ("frames", "num_mel_bands")}
        verifier_json.write_text(json.dumps({**meta, "input": "posteriors", "hops": 10, "num_labels": 16}),
                                 encoding="utf-8")
    else:
        model_meta = json.loads(model_path.with_suffix(".json").read_text(encoding="utf-8"))
        model_meta["verifier"] = "../kws_verifier.tflite"
        model_path.with_suffix(".json").write_text(json.dumps(model_meta), encoding="utf-8")
    with pytest.raises(ModelError, match=message):
        KwsModel.load(model_path)


# ------------------------------------------------------------------------------- in the pipeline


def wake_words(model: KwsModel, path: Path = WAKE_CLIP) -> tuple[list[str], VoicePipeline]:
    pipeline = VoicePipeline(model, VoiceSection(), hop_seconds=model_hop_seconds(model))
    result = transcribe_file(pipeline, path)
    assert result.error is None
    return [d.word for d in result.detections], pipeline


@needs_tf
def test_the_verifier_decides_the_wake_word_and_nothing_else(tmp_path: Path, verifier_bytes: bytes) -> None:
    without, _ = wake_words(KwsModel.load(MODEL, verifier=False))
    assert WAKE_WORD in without
    accepting, _ = wake_words(KwsModel.load(install(tmp_path / "a", verifier_bytes, 0.0)))
    assert accepting == without
    rejecting, pipeline = wake_words(KwsModel.load(install(tmp_path / "r", verifier_bytes, 1.0)))
    assert rejecting == [word for word in without if word != WAKE_WORD]
    assert pipeline.rejected_wakes == without.count(WAKE_WORD)


@needs_tf
def test_the_verifier_runs_only_when_the_wake_word_fires(tmp_path: Path, verifier_bytes: bytes,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    model = KwsModel.load(install(tmp_path, verifier_bytes, 0.0))
    calls: list[int] = []
    original = WakeVerifier.score

    def counted(self: WakeVerifier, mel: npt.NDArray[np.float64]) -> float:
        calls.append(len(mel))
        return original(self, mel)

    monkeypatch.setattr(WakeVerifier, "score", counted)
    words, pipeline = wake_words(model)
    assert calls == [FRAMES] * words.count(WAKE_WORD) and pipeline.invocations > 20 * len(calls)


class RaisingHousehold:
    """Stands in for agent.adaptation.Adaptation: the household's head raises the wake word on every hop
    where the base model already gives it some weight (or on none)."""

    def __init__(self, raises: bool) -> None:
        self.raises = raises

    def recent_hops(self) -> RecentHops:
        return RecentHops(0)  # no sequence gate

    def apply(self, labels: tuple[str, ...], probabilities: npt.NDArray[np.float32],
              embedding: npt.NDArray[np.float32], recent: RecentHops,
              mel: npt.NDArray[np.float64] | None = None) -> npt.NDArray[np.float32]:
        index = labels.index(WAKE_WORD)
        if not self.raises or probabilities[index] < 0.2:
            return probabilities
        result = probabilities * np.float32(0.01 / max(1e-6, 1.0 - float(probabilities[index])))
        result[index] = 0.99
        return result


@needs_tf
@pytest.mark.parametrize("raises", [True, False])
def test_a_wake_word_the_household_raised_is_not_second_guessed(tmp_path: Path, verifier_bytes: bytes,
                                                                raises: bool) -> None:
    model = KwsModel.load(install(tmp_path, verifier_bytes, 1.0), embedding=True)
    pipeline = VoicePipeline(model, VoiceSection(), hop_seconds=model_hop_seconds(model),
                             adaptation=RaisingHousehold(raises))  # type: ignore[arg-type]
    words = [d.word for d in transcribe_file(pipeline, WAKE_CLIP).detections]
    assert (WAKE_WORD in words) is raises
    assert pipeline.rejected_wakes == (0 if raises else 1)


# ------------------------------------------------------------------------------------- training


def test_phrase_copies_of_every_computer_clip_and_of_the_negatives_the_model_nearly_woke_on() -> None:
    from training.verifier import Mined, Task, VerifierConfig, phrase_tasks

    config = VerifierConfig(phrase_computer_copies=3, phrase_synth_computer_copies=1,
                            phrase_hard_negative_copies=2, phrase_negative_fraction=0.0)
    tasks = [Task("real/computer/a.flac", "word", True, False, "real", 0),
             Task("real/computer/a.flac", "word", True, False, "real", 1),  # a copy: phrased once per clip
             Task("synth/computer/b.wav", "word", True, True, "synth", 0),  # no candidate: still phrased
             Task("real/up/near.flac", "word", False, False, "real", 0),
             Task("synth/compute/far.wav", "word", False, False, "synth", 0),
             Task("real_long/x.flac", "long", False, False, "long", 0)]
    rows = np.array([0, 3, 4, 5])
    mined = Mined(windows=np.zeros((4, FRAMES, 40), np.float32), positive=np.array([1, 0, 0, 0], bool),
                  calibration=np.zeros(4, bool), fired=np.array([0, 0, 0, 1], bool),
                  score=np.array([0.9, 0.35, 0.1, 0.2], np.float32), task=rows,
                  source=np.array([tasks[i].source for i in rows]))
    phrases = phrase_tasks(tasks, mined, config)
    assert [(t.path, t.source, t.calibration, t.copy) for t in phrases] == [
        ("real/computer/a.flac", "real-phrase", False, 0), ("real/computer/a.flac", "real-phrase", False, 1),
        ("real/computer/a.flac", "real-phrase", False, 2), ("synth/computer/b.wav", "synth-phrase", True, 0),
        ("real/up/near.flac", "real-phrase", False, 0), ("real/up/near.flac", "real-phrase", False, 1)]
    assert {t.kind for t in phrases} == {"phrase"}


def test_a_mining_cached_with_the_keyword_models_posteriors_loads_without_them(tmp_path: Path) -> None:
    """Minings cached from ec0ef91 on also hold each hop's posteriors (for the removed posterior verifier);
    the rest of them is the mining of now, so they load as they are."""
    from training.verifier import Mined

    mined = Mined(windows=np.ones((2, FRAMES, 40), np.float32), positive=np.array([1, 0], bool),
                  calibration=np.zeros(2, bool), fired=np.array([1, 0], bool),
                  score=np.array([0.9, 0.4], np.float32), task=np.array([0, 1]),
                  source=np.array(["real"] * 2))
    cache = tmp_path / "verifier-mined.npz"
    np.savez(cache, **{name: getattr(mined, name) for name in mined.__dataclass_fields__},
             posteriors=np.zeros((2, 16, 16), np.float32))
    loaded = Mined.load(cache)
    assert list(loaded.__dataclass_fields__) == list(mined.__dataclass_fields__)
    for name in mined.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(mined, name))


def test_every_training_voice_clip_of_the_hard_negative_words_and_more_calibration_copies() -> None:
    from training.common import stable_fraction
    from training.data import Clip
    from training.verifier import VerifierConfig, tasks_for

    def synth(word: str, n: int, split: str = "train") -> Clip:
        return Clip(f"/s/{word}/v{n}.wav", "_unknown_", f"voice{n}", split, "synth")

    groups = [f"cluster{n}" for n in range(50)]
    calibration = next(g for g in groups if stable_fraction("verifier-" + g) < 0.2)
    training = next(g for g in groups if stable_fraction("verifier-" + g) >= 0.2)
    clips = [*(synth("athena", n) for n in range(3)), *(synth("mirror", n) for n in range(3)),
             synth("athena", 9, "validation"),
             Clip("/r/computer/a.flac", WAKE_WORD, calibration, "train", "real"),
             Clip("/r/computer/b.flac", WAKE_WORD, training, "train", "real")]
    config = VerifierConfig(synth_negatives_per_word=1, synth_hard_negative_words=("athena",),
                            calibration_copy_factor=3, real_computer_copies=2)
    tasks = tasks_for(clips, config)
    words = [Path(t.path).parent.name for t in tasks if not t.positive]
    assert words.count("athena") == 3 and words.count("mirror") == 1  # never a held-out voice's
    paths = ("/r/computer/a.flac", "/r/computer/b.flac")
    copies = {path: sum(t.path == path for t in tasks) for path in paths}
    assert copies == {"/r/computer/a.flac": 6, "/r/computer/b.flac": 2}
    plain = tasks_for(clips, VerifierConfig(synth_negatives_per_word=1, real_computer_copies=2))
    assert [Path(t.path).parent.name for t in plain if not t.positive].count("athena") == 1


def test_a_phrase_copy_has_words_around_the_clip_and_its_own_seed() -> None:
    from training.verifier import Task, VerifierConfig, _seed, augment

    config = VerifierConfig(warp_probability=0.0, room_probability=0.0, eq_probability=0.0,
                            noise_probability=0.0, phrase_before_probability=1.0,
                            phrase_after_probability=1.0, phrase_gap_seconds=(0.1, 0.1))
    clip = np.full(8000, 0.5, np.float32)
    word = np.full(3200, 10000, np.int16)
    pad = round(config.pad_seconds * 16000)
    phrase = Task("real/computer/a.flac", "phrase", True, False, "real-phrase", 0)
    out = augment(clip, phrase, np.random.default_rng(0), config=config, noise=np.zeros(0, np.float32),
                  rooms=[], context=[word])
    assert len(out) == 2 * pad + 2 * (3200 + 1600) + 8000
    speech = np.flatnonzero(out)
    assert speech[0] == pad and speech[-1] == len(out) - pad - 1  # a word first and last, the clip between
    assert not out[pad + 3200 : pad + 4800].any()  # the gap
    assert _seed(phrase) != _seed(Task(phrase.path, "word", True, False, "real", 0))


@pytest.mark.train
@pytest.mark.slow
@needs_tf
def test_smoke_training_writes_a_verifier_the_model_loads(tmp_path: Path) -> None:
    if not (DATA_DIR / "real").is_dir():
        pytest.skip(f"needs the speech data at {DATA_DIR}")
    result = subprocess.run(
        [sys.executable, "-m", "training.verifier", "--smoke", "--data", str(DATA_DIR),
         "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("1/3 mining", "2/3 training", "3/3 int8"):
        assert stage in result.stderr
    model = KwsModel.load(tmp_path / "kws.tflite")
    assert model.verifier is not None and model.verifier.word == WAKE_WORD
    meta = json.loads((tmp_path / "kws_verifier.json").read_text(encoding="utf-8"))
    assert meta["training"]["smoke"] is True and 0.0 <= meta["threshold"] <= 1.0
    assert model.size_bytes + (tmp_path / "kws_verifier.tflite").stat().st_size <= 64 * 1024


def test_the_shipped_models_together_fit_the_budget() -> None:
    model = KwsModel.load(MODEL)
    verifier_bytes = model.verifier.path.stat().st_size if model.verifier is not None else 0
    assert model.size_bytes + verifier_bytes <= 64 * 1024
    if model.verifier is not None:
        assert model.verifier.word == WAKE_WORD and model.verifier.frames == FRAMES
