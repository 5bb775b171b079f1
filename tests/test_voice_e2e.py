"""The voice path end to end: project-made speech -> the real daemon with the shipped model -> mosquitto.

Each test runs ``python -m agent run --audio file:... --exit-at-end`` (or the voice stage in-process where a
counter must be read) and checks the exact bytes a device would receive.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, Daemon, Mosquitto, MqttProbe, retained_messages, toml_dumps, wait_until
from paho.mqtt.client import topic_matches_sub

from agent.audio import FileSource, read_audio_file
from agent.config import parse_config
from agent.messages import ActionRequest, AudioChunk
from agent.voice import IDLE_READ_SECONDS, VoiceStage, load_pipeline

EXAMPLES = REPO_ROOT / "examples"
THERMOSTAT_STATE = b'{"current_heating_setpoint": 20.5}'

pytestmark = pytest.mark.skipif(not (REPO_ROOT / "models" / "kws.tflite").exists(),
                                reason="models/kws.tflite not built yet")


def voice_config(broker: Mosquitto, state_dir: Path, **sections: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "agent": {"id": "voicetest", "state_dir": str(state_dir)},
        "mqtt": {"host": broker.host, "port": broker.port, "keepalive": 5, "reconnect_min_delay": 0.1,
                 "reconnect_max_delay": 0.3},
        "homeassistant": {"diagnostics_interval": 1.0, "announce_jitter": 0.0},
        "service": {"ready_grace": 5.0},
        "audio": {"realtime": False},
        "actions": {
            "heating_up": {"profile": "zigbee2mqtt", "device": "thermostat", "command": "setpoint",
                           "delta": 1.0},
            "light_on": {"profile": "tasmota", "device": "livingroom_lamp", "command": "on"},
            "fan_off": {"profile": "zigbee2mqtt", "device": "ceiling_fan", "command": "off"},
        },
        "voice": {"commands": [{"say": "heat up", "action": "heating_up"},
                               {"say": "light on", "action": "light_on"},
                               {"say": "fan off", "action": "fan_off"}]},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def write(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(toml_dumps(config), encoding="utf-8")
    return path


def run_file(config_path: Path, audio: Path, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(config_path), "--audio", f"file:{audio}",
         "--exit-at-end"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize(("example", "topic", "payload", "action", "words"), [
    ("computer_heat_up.wav", "zigbee2mqtt/thermostat/set", b'{"current_heating_setpoint": 21.5}',
     "heating_up", ["heat", "up"]),
    ("computer_light_on.wav", "cmnd/livingroom_lamp/POWER", b"ON", "light_on", ["light", "on"]),
])
def test_a_spoken_command_becomes_the_exact_device_command(  # noqa: PLR0917 - parametrized
        tmp_path: Path, mosquitto: Mosquitto, mqtt_client: Callable[..., MqttProbe], example: str,
        topic: str, payload: bytes, action: str, words: list[str]) -> None:
    probe = mqtt_client().subscribe("#")
    probe.publish("zigbee2mqtt/thermostat", THERMOSTAT_STATE, retain=True)
    result = run_file(write(tmp_path, voice_config(mosquitto, tmp_path / "state")), EXAMPLES / example)
    assert result.returncode == 0, result.stderr
    command = probe.wait_for(topic, timeout=5)
    assert command.payload == payload and not command.retained
    assert len(probe.matching(topic)) == 1  # exactly once

    intent = json.loads(probe.wait_for("home-agent/voicetest/intent", timeout=5).payload)
    assert intent["intent"] == action and intent["words"] == words
    assert len(intent["scores"]) == len(words) and all(0 < s <= 1 for s in intent["scores"])
    assert abs(intent["time"] - time.time()) < 60
    hermes = json.loads(probe.wait_for(f"hermes/intent/{action}", timeout=5).payload)
    assert hermes["intent"]["intentName"] == action and hermes["input"] == " ".join(words)
    assert hermes["siteId"] == "voicetest" and hermes["slots"] == []
    event = json.loads(probe.wait_for("home-agent/voicetest/event", timeout=5).payload)
    assert event["event_type"] == action and event["words"] == words
    for message in probe.matching("home-agent/voicetest/intent") + probe.matching("hermes/#") + \
            probe.matching("home-agent/voicetest/event"):
        assert not message.retained
    # The intent goes out before the device command.
    order = [m.topic for m in probe.messages]
    assert order.index("home-agent/voicetest/intent") < order.index(topic)


def test_raw_pcm_on_stdin(tmp_path: Path, mosquitto: Mosquitto,
                          mqtt_client: Callable[..., MqttProbe]) -> None:
    probe = mqtt_client().subscribe("#")
    raw = read_audio_file(EXAMPLES / "computer_light_on.wav").astype("<i2").tobytes()
    config_path = write(tmp_path, voice_config(mosquitto, tmp_path / "state"))
    result = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(config_path), "--audio",
                             "stdin", "--exit-at-end"], input=raw, cwd=REPO_ROOT, capture_output=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert probe.wait_for("cmnd/livingroom_lamp/POWER", timeout=5).payload == b"ON"


def test_a_command_without_the_wake_word_does_nothing(
        tmp_path: Path, mosquitto: Mosquitto, mqtt_client: Callable[..., MqttProbe]) -> None:
    probe = mqtt_client().subscribe("#")
    probe.publish("zigbee2mqtt/thermostat", THERMOSTAT_STATE, retain=True)
    result = run_file(write(tmp_path, voice_config(mosquitto, tmp_path / "state")),
                      EXAMPLES / "heat_up_no_wake.wav")
    assert result.returncode == 0, result.stderr
    probe.wait_for("home-agent/voicetest/availability", b"offline", timeout=5)
    assert "heard 'up'" in result.stderr  # it did hear the command word...
    assert probe.matching("zigbee2mqtt/thermostat/set") == []  # ...but without "computer" nothing happens
    assert probe.matching("home-agent/voicetest/intent") == []
    assert probe.matching("hermes/#") == []


def test_several_commands_in_one_recording(
        tmp_path: Path, mosquitto: Mosquitto, mqtt_client: Callable[..., MqttProbe]) -> None:
    """Two commands and a third without the wake word in one stream: both commands act, in order, with
    exactly their bytes; the command without "computer" does nothing; nothing is sent that was not said."""
    probe = mqtt_client().subscribe("#")
    probe.publish("zigbee2mqtt/thermostat", THERMOSTAT_STATE, retain=True)
    result = run_file(write(tmp_path, voice_config(mosquitto, tmp_path / "state")),
                      EXAMPLES / "demo_commands.wav")
    assert result.returncode == 0, result.stderr
    intents = [json.loads(m.payload)["intent"] for m in probe.matching("home-agent/voicetest/intent")]
    assert intents == ["light_on", "heating_up"]
    commands = {"light_on": ("cmnd/livingroom_lamp/POWER", b"ON"),
                "heating_up": ("zigbee2mqtt/thermostat/set", b'{"current_heating_setpoint": 21.5}'),
                "fan_off": ("zigbee2mqtt/ceiling_fan/set", b'{"state": "OFF"}')}
    filters = ("cmnd/#", "zigbee2mqtt/+/set")
    sent = [(m.topic, m.payload) for m in probe.messages
            if any(topic_matches_sub(f, m.topic) for f in filters)]
    assert sent == [commands[action] for action in intents]  # one exact command per intent, nothing else


def test_a_voice_action_is_dropped_not_sent_late_when_the_broker_is_down(
        tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto], mqtt_client: Callable[..., MqttProbe],
        daemon_factory: Callable[..., Daemon]) -> None:
    broker = mosquitto_factory(start=False)
    config = voice_config(broker, tmp_path / "state", service={"ready_grace": 0.5})
    config["actions"]["light_on"]["ttl"] = 1.0
    daemon = daemon_factory(write(tmp_path, config),
                            extra_args=("--audio", f"file:{EXAMPLES / 'computer_light_on.wav'}"))
    assert wait_until(lambda: "voice: intent light_on" in daemon.log_text(), timeout=30), daemon.log_text()
    time.sleep(1.5)  # past the action's TTL, with the broker still down
    broker.start()
    probe = mqtt_client(broker).subscribe("#")
    assert wait_until(lambda: probe.matching("home-agent/voicetest/availability", b"online"), timeout=15)

    def expired() -> int:
        last = probe.last("home-agent/voicetest/diagnostics")
        return int(json.loads(last)["expired"]) if last else 0

    assert wait_until(lambda: expired() >= 4, timeout=10), daemon.log_text()  # intent, hermes, event, action
    time.sleep(0.5)
    assert probe.matching("cmnd/livingroom_lamp/POWER") == []
    assert probe.matching("home-agent/voicetest/intent") == []
    assert probe.matching("hermes/#") == []
    assert daemon.terminate() == 0


def test_a_missing_model_is_a_clear_startup_error(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = voice_config(mosquitto, tmp_path / "state", voice={"model": str(tmp_path / "nope.tflite")})
    result = run_file(write(tmp_path, config), EXAMPLES / "computer_heat_up.wav")
    assert result.returncode == 2  # a configuration problem: restarting cannot fix it
    assert "voice.model: cannot read keyword model" in result.stderr and "nope.tflite" in result.stderr


def test_a_corrupt_model_is_a_clear_startup_error(tmp_path: Path, mosquitto: Mosquitto) -> None:
    shutil.copy(REPO_ROOT / "models" / "kws.json", tmp_path / "kws.json")
    (tmp_path / "kws.tflite").write_bytes(b"\x00" * 1000)
    config = voice_config(mosquitto, tmp_path / "state", voice={"model": str(tmp_path / "kws.tflite")})
    result = run_file(write(tmp_path, config), EXAMPLES / "computer_heat_up.wav")
    assert result.returncode == 2
    assert "voice.model: " in result.stderr and "does not match its metadata" in result.stderr


def test_words_the_model_does_not_know_are_a_config_error(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = voice_config(mosquitto, tmp_path / "state")
    config["voice"]["commands"].append({"say": "heat maximum", "action": "heating_up"})
    result = run_file(write(tmp_path, config), EXAMPLES / "computer_heat_up.wav")
    assert result.returncode == 2
    assert "voice.commands.3.say: 'maximum' is not in the model's labels" in result.stderr


def test_a_bad_audio_file_is_a_clear_startup_error(tmp_path: Path, mosquitto: Mosquitto) -> None:
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    result = run_file(write(tmp_path, voice_config(mosquitto, tmp_path / "state")), tmp_path / "broken.wav")
    assert result.returncode == 2
    assert "--audio: cannot read audio file" in result.stderr and "broken.wav" in result.stderr


def test_a_missing_microphone_is_retried_and_the_daemon_keeps_serving(
        tmp_path: Path, mosquitto: Mosquitto, mqtt_client: Callable[..., MqttProbe],
        daemon_factory: Callable[..., Daemon]) -> None:
    probe = mqtt_client().subscribe("home-agent/voicetest/#")
    config = voice_config(mosquitto, tmp_path / "state",
                          audio={"source": "mic", "device": "no-such-microphone", "retry_interval": 0.5})
    daemon = daemon_factory(write(tmp_path, config))
    probe.wait_for("home-agent/voicetest/availability", b"online", timeout=15)
    assert wait_until(lambda: daemon.log_text().count("no audio input device matching 'no-such-microphone'")
                      >= 2, timeout=15), daemon.log_text()  # tried again (the retries log at DEBUG here)
    log = daemon.log_text()
    assert "retrying every 0 s" in log or "retrying every 1 s" in log
    assert daemon.alive()
    assert "Traceback" not in log
    assert daemon.terminate() == 0


def test_muted_listening_hears_nothing(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """In-process: the stage drops audio while the mute switch is on."""
    config = parse_config(voice_config(mosquitto, tmp_path / "state"))
    requests: list[ActionRequest] = []
    published: list[str] = []

    def publish(topic: str, payload: bytes | str, **_kwargs: Any) -> bool:
        published.append(topic)
        return True

    def request_action(request: ActionRequest) -> int:
        requests.append(request)
        return 1

    def run(muted: bool) -> VoiceStage:
        stage = VoiceStage(config=config, pipeline=load_pipeline(config),
                           source=FileSource(EXAMPLES / "computer_light_on.wav"), publish=publish,
                           request_action=request_action, is_muted=lambda: muted)
        stage.start()
        assert wait_until(lambda: stage.finished, timeout=30)
        stage.stop()
        return stage

    muted = run(True)
    assert muted.counts["muted_chunks"] > 0 and muted.counts["detections"] == 0
    assert requests == [] and published == []
    unmuted = run(False)
    assert unmuted.counts["intents"] == 1
    assert [r.action for r in requests] == ["light_on"]
    assert requests[0].source == "voice" and requests[0].ttl == 5.0
    assert published == ["home-agent/voicetest/intent", "hermes/intent/light_on",
                         "home-agent/voicetest/event"]


def test_voice_and_audio_counters_reach_the_diagnostics(
        tmp_path: Path, mosquitto: Mosquitto, mqtt_client: Callable[..., MqttProbe],
        daemon_factory: Callable[..., Daemon]) -> None:
    diagnostics_topic = "home-agent/voicetest/diagnostics"
    probe = mqtt_client().subscribe(diagnostics_topic)
    daemon = daemon_factory(write(tmp_path, voice_config(mosquitto, tmp_path / "state")),
                            extra_args=("--audio", f"file:{EXAMPLES / 'computer_light_on.wav'}"))

    def counters() -> dict[str, Any]:
        last = probe.last(diagnostics_topic)
        return dict(json.loads(last)) if last else {}

    assert wait_until(lambda: counters().get("intents", 0) >= 1, timeout=30), daemon.log_text()
    assert {"detections", "dropped_samples", "samples", "actions_requested"} <= set(counters())
    sensors = set(retained_messages(mosquitto, "homeassistant/sensor/voicetest/+/config"))
    assert {"homeassistant/sensor/voicetest/intents/config",
            "homeassistant/sensor/voicetest/dropped_samples/config"} <= sensors
    assert daemon.terminate() == 0


class _RecordedReads(FileSource):
    """A file source that records how much audio each read asked for (None: the source's 100 ms block)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.asked: list[float | None] = []

    def read(self, timeout: float, seconds: float | None = None) -> AudioChunk | None:
        self.asked.append(seconds)
        return super().read(timeout, seconds)


def test_the_stage_reads_bigger_blocks_only_while_no_command_is_under_way(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """In-process: while idle the stage reads IDLE_READ_SECONDS at a time (its hops then run back to back),
    once the wake word opened a window it reads 100 ms at a time, or 200 ms when nothing can happen in the
    first 100 ms; the intents and the model invocations are those of the same file fed 100 ms at a time."""
    config = parse_config(voice_config(mosquitto, tmp_path / "state"))
    requests: list[ActionRequest] = []
    source = _RecordedReads(EXAMPLES / "demo_commands.wav")

    def request_action(request: ActionRequest) -> int:
        requests.append(request)
        return 1

    stage = VoiceStage(config=config, pipeline=load_pipeline(config), source=source,
                       publish=lambda *_a, **_k: True, request_action=request_action)
    stage.start()
    assert wait_until(lambda: stage.finished, timeout=60)
    stage.stop()
    assert IDLE_READ_SECONDS in source.asked and None in source.asked
    assert 2 * stage.pipeline.hop_seconds in source.asked
    assert source.asked[0] == IDLE_READ_SECONDS  # nothing is under way at the start

    pipeline = load_pipeline(config)
    expected = []
    hop_reads = FileSource(EXAMPLES / "demo_commands.wav")
    with hop_reads:
        for chunk in hop_reads.chunks():
            expected += pipeline.feed(chunk.samples).intents
    expected += pipeline.finish().intents
    assert [r.action for r in requests] == [i.action for i in expected] == ["light_on", "heating_up"]
    assert stage.pipeline.invocations == pipeline.invocations
