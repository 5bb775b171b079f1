"""``[voice] capture``: the audio around each wake word kept in state_dir/captures, and a capture marked as a
false wake (MQTT command / HA button, spoken "no") learned as a not-word. Real model, real audio, real
mosquitto; the confusable speech of ../shared where marked ``data``."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO_ROOT, Daemon, Mosquitto, MqttProbe, toml_dumps, wait_until

from agent.adaptation_store import HEADS_FILE, Store
from agent.audio import SAMPLE_RATE, FileSource, read_audio_file
from agent.bank import bank_path
from agent.capture import FALSE_SUFFIX, CaptureStore, WakeCapture
from agent.cli import main as cli_main
from agent.config import parse_config
from agent.discovery import discovery_messages
from agent.errors import PayloadError
from agent.false_wake import FalseWakeMarker
from agent.messages import InboundMessage
from agent.recognizer import PipelineOutput
from agent.transcribe import transcribe_file
from agent.voice import VoiceStage, load_pipeline

EXAMPLES = REPO_ROOT / "examples"
MODEL = REPO_ROOT / "models" / "kws.tflite"
DATA = Path(os.environ.get("DATA_DIR", REPO_ROOT.parent / "shared" / "data" / "speech"))
CONFUSABLE = ("smart_mirror", "view_glass", "alexa", "jarvis", "snowboy")

pytestmark = pytest.mark.skipif(not bank_path(MODEL).exists(), reason="models/kws.bank.npz not built")


def config_data(state_dir: Path, broker: Mosquitto | None = None, **voice: Any) -> dict[str, Any]:
    return {
        "agent": {"id": "capturetest", "state_dir": str(state_dir)},
        "mqtt": {"host": broker.host if broker else "127.0.0.1", "port": broker.port if broker else 1,
                 "keepalive": 5, "reconnect_min_delay": 0.1, "reconnect_max_delay": 0.3},
        "homeassistant": {"diagnostics_interval": 1.0, "announce_jitter": 0.0},
        "audio": {"realtime": False},
        "actions": {"light_on": {"profile": "tasmota", "device": "livingroom_lamp", "command": "on"}},
        "voice": {"commands": [{"say": "light on", "action": "light_on"}], "capture": True, **voice},
    }


def wakes(config_path: Path | None, path: Path) -> bool:
    from agent.config import load_config

    pipeline = load_pipeline(load_config(config_path) if config_path is not None else None)
    return "computer" in [d.word for d in transcribe_file(pipeline, path).detections]


def run_stage(config: Any, audio: Path, capture: WakeCapture) -> VoiceStage:
    stage = VoiceStage(config=config, pipeline=load_pipeline(config), source=FileSource(audio),
                       publish=lambda *_a, **_k: True, request_action=lambda _r: 1)
    stage.capture = capture
    stage.start()
    assert wait_until(lambda: stage.finished, timeout=60)
    stage.stop()
    return stage


def with_silence(tmp_path: Path, samples: np.ndarray, before: float, after: float, name: str) -> Path:
    path = tmp_path / name
    sf.write(path, np.concatenate([np.zeros(round(before * SAMPLE_RATE), np.int16), samples,
                                   np.zeros(round(after * SAMPLE_RATE), np.int16)]), SAMPLE_RATE)
    return path


def waking_confusable(limit: int = 1) -> list[Path]:
    """Confusable speech from ../shared that wakes the shipped model (skip without the data)."""
    if not (DATA / "real").is_dir():
        pytest.skip("no ../shared/data/speech")
    pipeline = load_pipeline(None)
    found: list[Path] = []
    for word in CONFUSABLE:
        for path in sorted((DATA / "real" / word).glob("*.flac")):
            if "computer" in [d.word for d in transcribe_file(pipeline, path).detections]:
                found.append(path)
                if len(found) == limit:
                    return found
    pytest.fail("the shipped model wakes on no confusable clip: pick another source")


# ------------------------------------------------------------------------------------------ capturing


def test_a_wake_is_kept_with_two_seconds_before_and_the_window_after(tmp_path: Path) -> None:
    config = parse_config(config_data(tmp_path / "state", wake_window=3.0))
    spoken = read_audio_file(EXAMPLES / "computer_light_on.wav")
    audio = with_silence(tmp_path, spoken, 3.0, 4.0, "wake.wav")
    store = CaptureStore.of(config)
    marked: list[Path] = []
    capture = WakeCapture(store, wake_word="computer", window_seconds=3.0, confirm_seconds=5.0,
                          on_false_wake=marked.append)
    stage = run_stage(config, audio, capture)
    assert stage.counts["detections"] >= 1 and marked == []
    [kept] = store.list()
    assert not kept.marked and kept.seconds == pytest.approx(5.0, abs=0.01)
    assert stat.S_IMODE(kept.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    # The capture is the input audio from 2 s before the end of the wake word: it starts in the silence
    # before the speech and holds all of "computer light on".
    samples = read_audio_file(kept.path)
    whole = read_audio_file(audio)
    start = 3 * SAMPLE_RATE - np.flatnonzero(samples)[0]
    assert 0 < start < 3 * SAMPLE_RATE
    assert np.array_equal(samples, whole[start : start + len(samples)])
    assert start + len(samples) >= 3 * SAMPLE_RATE + len(spoken)


def test_captures_are_bounded_in_count_and_bytes(tmp_path: Path) -> None:
    second = np.full(SAMPLE_RATE, 1000, np.int16)
    store = CaptureStore(tmp_path / "captures", max_files=3, max_bytes=10**9)
    paths = [store.save(second) for _ in range(5)]
    assert [c.path for c in store.list()] == paths[2:]
    store = CaptureStore(tmp_path / "captures2", max_files=100, max_bytes=2 * 2 * SAMPLE_RATE + 200)
    paths = [store.save(second) for _ in range(4)]
    assert [c.path for c in store.list()] == paths[2:]
    # A restarted daemon (a new store, its count from 1 again) never overwrites a capture.
    again = CaptureStore(tmp_path / "captures3", max_files=100, max_bytes=10**9)
    first = again.save(second)
    assert CaptureStore(again.directory, max_files=100, max_bytes=10**9).save(second) != first
    assert len(again.list()) == 2


def test_a_capture_that_cannot_be_written_is_counted_and_listening_goes_on(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder", encoding="utf-8")
    config = parse_config(config_data(blocker / "state"))
    capture = WakeCapture(CaptureStore.of(config), wake_word="computer", window_seconds=3.0,
                          confirm_seconds=5.0, on_false_wake=lambda _p: None)
    stage = run_stage(config, EXAMPLES / "computer_light_on.wav", capture)
    assert stage.counts["intents"] == 1  # the command still went through
    assert capture.stats() == {"captures": 0, "capture_failures": 1}


def test_the_button_is_announced_only_with_capture(tmp_path: Path) -> None:
    with_capture = discovery_messages(parse_config(config_data(tmp_path)), event_types=["light_on"],
                                      sw_version="t")
    [button] = [payload for topic, payload in with_capture.items()
                if topic.startswith("homeassistant/button/")]
    assert button["name"] == "Last wake was false" and button["payload_press"] == "PRESS"
    assert button["command_topic"] == "home-agent/capturetest/voice/last_wake_false"
    without = discovery_messages(parse_config(config_data(tmp_path, capture=False)), event_types=["light_on"],
                                 sw_version="t")
    assert not [topic for topic in without if "/button/" in topic]


# ------------------------------------------------------------------------------------------ marking


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[FalseWakeMarker]:
    config = parse_config(config_data(tmp_path / "state"))
    reloads: list[int] = []
    yield FalseWakeMarker(config, CaptureStore.of(config), on_learned=lambda: reloads.append(1))


def test_bad_captures_and_presses_are_refused_and_change_nothing(tmp_path: Path,
                                                                   marker: FalseWakeMarker) -> None:
    adaptation = Store.of(marker.config).directory
    assert not marker.learn(None)  # nothing captured yet
    captures = marker.captures.directory
    captures.mkdir(parents=True)
    corrupt = captures / "20260101-000000-001.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt nonsense")
    assert not marker.learn(None)
    silence = marker.captures.save(np.zeros(5 * SAMPLE_RATE, np.int16))
    assert not marker.learn(silence)
    assert marker.stats() == {"false_wakes_marked": 0, "false_wakes_refused": 3}
    assert sorted(p.name for p in captures.iterdir()) == sorted([corrupt.name, silence.name])
    assert not (adaptation / HEADS_FILE).exists()
    with pytest.raises(PayloadError, match="PRESS"):
        marker.on_command(InboundMessage("home-agent/capturetest/voice/last_wake_false", b"press", False, 1,
                                         0.0))


def test_an_unwritable_adaptation_refuses_the_mark_and_keeps_the_capture(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = parse_config(config_data(state))
    captures = CaptureStore.of(config)
    path = captures.save(read_audio_file(EXAMPLES / "computer_light_on.wav"))
    blocker = Store.of(config).directory
    blocker.write_text("not a folder", encoding="utf-8")  # cannot be written, even by root
    marker = FalseWakeMarker(config, captures, on_learned=lambda: None)
    assert not marker.learn(None)
    assert path.exists() and [c.marked for c in captures.list()] == [False]
    assert blocker.read_text(encoding="utf-8") == "not a folder"
    assert marker.stats()["false_wakes_refused"] == 1


@pytest.mark.data
def test_a_spoken_no_right_after_a_false_wake_marks_its_capture(tmp_path: Path) -> None:
    [false_wake] = waking_confusable()
    noes = sorted((DATA / "real" / "no").glob("sc_*.flac"))
    no = next(p for p in noes if not wakes(None, p))
    audio = tmp_path / "false_wake_then_no.wav"
    pause = np.zeros(SAMPLE_RATE // 2, np.int16)
    sf.write(audio, np.concatenate([read_audio_file(false_wake), pause, read_audio_file(no),
                                    np.zeros(4 * SAMPLE_RATE, np.int16)]), SAMPLE_RATE)
    config = parse_config(config_data(tmp_path / "state"))
    marked: list[Path] = []
    capture = WakeCapture(CaptureStore.of(config), wake_word="computer", window_seconds=3.0,
                          confirm_seconds=5.0, on_false_wake=marked.append)
    stage = run_stage(config, audio, capture)
    if stage.counts["detections"] < 2:
        pytest.skip("the model did not hear this 'no'")
    [kept] = CaptureStore.of(config).list()
    assert marked == [kept.path]


class RecordingCapture(WakeCapture):
    """A WakeCapture that also records what the pipeline said about each block (detections, events)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.words: list[str] = []
        self.events: list[tuple[str, str]] = []

    def hear(self, samples: np.ndarray, output: PipelineOutput, t_audio: float) -> None:
        self.words += [d.word for d in output.detections]
        self.events += [(e.kind, e.reason) for e in output.events]
        super().hear(samples, output, t_audio)


@pytest.mark.data
def test_a_spoken_no_after_a_confirmation_prompt_is_an_answer_not_a_false_wake(tmp_path: Path) -> None:
    """"computer light on" with an action that needs confirmation: the agent asks for "yes"; the "no" that
    follows within the window cancels the action, and does not mark the wake (which was real) as false."""
    if not (DATA / "real" / "no").is_dir():
        pytest.skip("no ../shared/data/speech")
    noes = sorted((DATA / "real" / "no").glob("sc_*.flac"))
    data = config_data(tmp_path / "state")
    data["actions"]["light_on"]["confirm"] = True
    config = parse_config(data)
    pause = np.zeros(SAMPLE_RATE // 2, np.int16)
    for no in noes[:10]:  # the first "no" the model hears after the prompt
        audio = tmp_path / "confirm_then_no.wav"
        sf.write(audio, np.concatenate([read_audio_file(EXAMPLES / "computer_light_on.wav"), pause,
                                        read_audio_file(no), np.zeros(4 * SAMPLE_RATE, np.int16)]),
                 SAMPLE_RATE)
        marked: list[Path] = []
        store = CaptureStore(tmp_path / f"captures-{no.stem}", max_files=20, max_bytes=10**8)
        capture = RecordingCapture(store, wake_word="computer", window_seconds=3.0, confirm_seconds=5.0,
                                   on_false_wake=marked.append)
        stage = run_stage(config, audio, capture)
        if ("cancelled", 'heard "no"') in capture.events:
            break
    else:
        pytest.skip("the model heard none of these 'no's after the prompt")
    assert [kind for kind, _ in capture.events] == ["wake", "confirm_pending", "cancelled"]
    assert stage.counts["intents"] == 0
    assert capture.words.count("computer") == 1
    [kept] = store.list()  # the wake's capture is kept ...
    assert marked == [] and not kept.marked  # ... and not taken for a false wake


@pytest.mark.data
def test_a_false_wake_marked_over_mqtt_no_longer_wakes_on_replay(tmp_path: Path, mosquitto: Mosquitto,
                                                                   mqtt_client: Any) -> None:
    """The daemon (real mosquitto, real model) captures a false wake; PRESS on the command topic (what the HA
    button sends) learns it; the same audio replayed no longer wakes, and ``enroll --list`` shows it."""
    [false_wake] = waking_confusable()
    audio = with_silence(tmp_path, read_audio_file(false_wake), 2.0, 0.0, "false_wake.wav")
    state = tmp_path / "state"
    config_path = tmp_path / "config.toml"
    config_path.write_text(toml_dumps(config_data(state, mosquitto)), encoding="utf-8")
    probe: MqttProbe = mqtt_client(mosquitto)
    probe.subscribe("home-agent/capturetest/#")
    daemon = Daemon(config_path, extra_args=("--audio", f"file:{audio}"))
    try:
        captures = CaptureStore.of(parse_config(config_data(state, mosquitto)))
        assert wait_until(captures.list, timeout=60), daemon.log_text()
        probe.publish("home-agent/capturetest/voice/last_wake_false", b"PRESS")
        assert wait_until(lambda: all(c.marked for c in captures.list()), timeout=120), daemon.log_text()
        assert wait_until(lambda: any(json.loads(m.payload).get("false_wakes_marked") == 1 for m in
                                      probe.matching("home-agent/capturetest/diagnostics")), timeout=10)
    finally:
        assert daemon.terminate() == 0
        daemon.close()
    assert wakes(None, audio) and not wakes(config_path, audio)
    [kept] = captures.list()
    assert kept.path.name.endswith(FALSE_SUFFIX) and stat.S_IMODE(kept.path.stat().st_mode) == 0o600
    assert (state / "adaptation" / HEADS_FILE).exists()
    assert cli_main(["enroll", "--config", str(config_path), "--list"]) == 0
