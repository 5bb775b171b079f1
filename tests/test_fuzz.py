"""Bad input everywhere: MQTT payloads on every topic the daemon listens to, config files, audio files and
model files. Each must give the reader's clear error type (or be counted and skipped); nothing else
escapes and the daemon keeps running.

What other test files already cover is not repeated here: the 10,000 telemetry-only payload flood
(test_daemon), the parsers' own property tests (test_telemetry, test_actions), fixed bad audio files
(test_audio) and a missing/corrupt model at startup (test_voice_e2e).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import struct
import subprocess
import sys
import time
import tomllib
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO_ROOT, Daemon, Mosquitto, MqttProbe, base_config, toml_dumps, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.actions import ActionTable
from agent.audio import read_audio_file
from agent.config import load_config, parse_config
from agent.errors import AudioError, ConfigError, ModelError, PayloadError
from agent.kws import KwsModel
from agent.telemetry import TelemetryIntake

BASE = "home-agent/fuzzagent"
TELEMETRY = "zigbee2mqtt/living_room_sensor"
TRV_STATE = "zigbee2mqtt/trv"
MUTE_SET = f"{BASE}/mute/set"
DIAGNOSTICS = f"{BASE}/diagnostics"
EXAMPLE_CONFIG = REPO_ROOT / "config.toml"
KWS_MODEL = REPO_ROOT / "models" / "kws.tflite"
# Derandomized: CI sees the same examples every run (a gate, not a lottery); explore with a random seed by
# hand (set derandomize=False locally) and pin what it finds with @example.
FUZZ = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ------------------------------------------------------------------------------------ MQTT payloads


def hostile_payload(rng: random.Random, field: str) -> bytes:  # noqa: C901 - one flat case per kind
    """One malformed, hostile or occasionally valid payload for a JSON/number/switch topic."""
    number = rng.choice([21.5, -0.0, 1e308, -1e308, 5e-324, 12, 2**63, -(2**80), 0.1])
    kind = rng.randrange(16)
    if kind == 0:
        return json.dumps({field: number}).encode()
    if kind == 1:
        return rng.choice([b"NaN", b"nan", b"Infinity", b"-inf", b"1e999", b"-1e999", b"0x1A", b"1_000",
                           b"", b" ", b"null", b"true", b"[]", b"{}", b'""', b"ON", b"OFF", b"on", b" ON",
                           b"ON\n", b"\xef\xbb\xbfON", str(number).encode()])
    if kind == 2:  # wrong types for the field
        value = rng.choice(["21.5", True, None, [21.5], {"v": 21.5}, "", "NaN", "1e999", [], 10**400])
        return json.dumps({field: value}).encode()
    if kind == 3:  # non-standard JSON numbers Python's json would accept
        return f'{{"{field}": {rng.choice(["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])}}}'.encode()
    if kind == 4:  # invalid UTF-8 inside otherwise plausible JSON
        bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"])
        return b'{"' + field.encode() + b'": 2' + bad + b"}"
    if kind == 5:  # deep nesting
        depth = rng.choice([50, 500, 5000, 50_000])
        return (b'{"a":' * depth) + b"1" + (b"}" * depth) if rng.random() < 0.5 else b"[" * depth
    if kind == 6:  # large, just under and over the 64 KiB limit, rarely a megabyte
        size = rng.choice([60_000, 65_536, 65_537, 100_000] + ([1_048_576] if rng.random() < 0.05 else []))
        return json.dumps({field: 21.5, "pad": "x" * size}).encode()[:size + 40]
    if kind == 7:  # truncated valid JSON
        text = json.dumps({field: number, "battery": 90, "linkquality": 120}).encode()
        return text[: rng.randrange(len(text))]
    if kind == 8:  # random bytes
        return rng.randbytes(rng.randrange(0, 300))
    if kind == 9:  # control characters, NUL, lone surrogates escaped in JSON
        return json.dumps({field: "\x00\ud800" + "\x1b[2J"}).encode() + rng.choice([b"", b"\x00"])
    if kind == 10:  # duplicate keys, the last one hostile
        return f'{{"{field}": 21.5, "{field}": "oops"}}'.encode()
    if kind == 11:  # many keys
        return json.dumps({f"k{i}": i for i in range(rng.randrange(1000, 5000))}).encode()
    if kind == 12:  # nested field path lookalikes
        return json.dumps({field.split(".", maxsplit=1)[0]: {"x": [1, 2, {"y": None}]}}).encode()
    if kind == 13:  # a plausible valid document with extra noise
        return json.dumps({field: rng.uniform(-100, 150), "last_seen": rng.choice(
            ["2020-01-01T00:00:00Z", "garbage", 0, -1, 1e20, None])}).encode()
    if kind == 14:  # valid numbers as text
        return f"{rng.uniform(-1e6, 1e6):.{rng.randrange(0, 12)}f}".encode()
    return bytes(rng.choice(b'{}[]":,0123456789.eE+-ntrufalsNI ') for _ in range(rng.randrange(1, 60)))


def fuzz_config(broker: Mosquitto, state_dir: Path) -> dict[str, Any]:
    data = base_config(broker, state_dir, agent_id="fuzzagent")
    data["actions"]["heat_up"] = {"topic": "zigbee2mqtt/trv/set",
                                  "payload": '{"current_heating_setpoint": {{ setpoint + 1 }}}',
                                  "min_interval": 0.0}
    return data


def test_ten_thousand_hostile_payloads_on_every_listened_topic_are_each_counted(
        mosquitto: Mosquitto, tmp_path: Path, daemon_factory: Callable[..., Daemon],
        mqtt_client: Callable[..., MqttProbe]) -> None:
    data = fuzz_config(mosquitto, tmp_path / "state")
    config_path = tmp_path / "config.toml"
    config_path.write_text(toml_dumps(data), encoding="utf-8")
    config = load_config(config_path)
    assert TRV_STATE in ActionTable(dict(config.actions)).state_topics()

    probe = mqtt_client().subscribe(f"{BASE}/availability", DIAGNOSTICS)
    daemon = daemon_factory(config_path, log_level="INFO")
    probe.wait_for(f"{BASE}/availability", b"online", timeout=10)
    probe.wait_for(DIAGNOSTICS, timeout=5)
    # Settle: the daemon's own announcements (it hears its discovery configs back) are done.
    def settled() -> bool:
        first = probe.last_json(DIAGNOSTICS)["messages_in"]
        time.sleep(1.1)  # one diagnostics period
        return bool(probe.last_json(DIAGNOSTICS)["messages_in"] == first)

    assert wait_until(settled, 10)
    before = probe.last_json(DIAGNOSTICS)

    # The daemon's own parsers, run here, say what each payload should come to.
    intake = TelemetryIntake(list(config.telemetry))
    actions = ActionTable(dict(config.actions))
    limit = config.mqtt.max_payload_bytes
    rng = random.Random(20240607)
    topics = [(TELEMETRY, "temperature"), (TRV_STATE, "current_heating_setpoint"), (MUTE_SET, "state")]
    expected = {"bad_payloads": 0, "readings": 0, "telemetry_ignored": 0}
    total = 10_000
    for index in range(total):
        topic, field = topics[index % 3]
        payload = hostile_payload(rng, field)
        if len(payload) > limit:
            expected["bad_payloads"] += 1
        elif topic == TELEMETRY:
            try:
                readings = intake.parse(topic, payload, False, time.time())
                expected["readings" if readings else "telemetry_ignored"] += max(1, len(readings))
            except PayloadError:
                expected["bad_payloads"] += 1
        elif topic == TRV_STATE:
            try:
                actions.observe_state(topic, payload)
            except PayloadError:
                expected["bad_payloads"] += 1
        elif payload not in (b"ON", b"OFF"):
            expected["bad_payloads"] += 1
        info = probe.client.publish(topic, payload, qos=1)
        if index % 200 == 199:
            info.wait_for_publish(10)

    def delta() -> dict[str, int]:
        now = probe.last_json(DIAGNOSTICS)
        return {k: int(now[k]) - int(before[k]) for k in
                ("messages_in", "bad_payloads", "readings", "telemetry_ignored", "handler_errors")}

    assert wait_until(lambda: delta()["messages_in"] >= total, 60, interval=0.25), \
        (delta(), daemon.log_text()[-2000:])
    time.sleep(1.2)  # one more diagnostics period: nothing beyond the 10,000 may show up
    counted = delta()
    assert counted["messages_in"] == total, counted
    assert counted["handler_errors"] == 0, daemon.log_text()[-3000:]
    assert {k: counted[k] for k in expected} == expected
    assert expected["bad_payloads"] > total / 2 and expected["readings"] > 100
    assert daemon.alive()
    assert "Traceback" not in daemon.log_text()
    # Still fully functional afterwards.
    probe.subscribe(f"{BASE}/sensor/living_room_temperature/state")
    probe.publish(TELEMETRY, b'{"temperature": 19.25}')
    probe.wait_for(f"{BASE}/sensor/living_room_temperature/state", b"19.25", timeout=5)
    print(f"\n10k hostile payloads on 3 topics: {counted}, RSS {daemon.rss_kb() / 1024:.1f} MiB")


# ------------------------------------------------------------------------------------ config files

toml_scalars = st.one_of(
    st.text(max_size=30), st.integers(min_value=-(2**63), max_value=2**63 - 1), st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True), st.datetimes(), st.dates(), st.times(),
)
toml_values = st.recursive(toml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=8)


def _leaf_paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            paths += _leaf_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            paths += _leaf_paths(value, (*prefix, index))
    return paths


EXAMPLE = tomllib.loads(EXAMPLE_CONFIG.read_text(encoding="utf-8"))
EXAMPLE_PATHS = _leaf_paths(EXAMPLE)


def _mutated(data: Any, path: tuple[Any, ...], action: str, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(data, dict):
        copy = dict(data)
        if not rest and action == "delete":
            copy.pop(head, None)
        elif not rest and action == "add":
            copy[f"{head}_extra"] = value
        else:
            copy[head] = _mutated(data[head], rest, action, value)
        return copy
    copy_list = list(data)
    if not rest and action == "delete":
        del copy_list[head]
    else:
        copy_list[head] = _mutated(data[head], rest, action, value)
    return copy_list


@FUZZ
@given(mutations=st.lists(st.tuples(st.sampled_from(EXAMPLE_PATHS), st.sampled_from(["set", "delete", "add"]),
                                    toml_values), min_size=1, max_size=4))
def test_structural_config_mutations_give_config_error_or_a_config(
        mutations: list[tuple[tuple[Any, ...], str, Any]]) -> None:
    data: Any = EXAMPLE
    for path, action, value in mutations:
        try:
            data = _mutated(data, path, action, value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path
    if not isinstance(data, dict):
        return
    try:
        parse_config(data, source="fuzz.toml")
    except ConfigError as err:
        assert "fuzz.toml" in str(err) or str(err)


EXAMPLE_TEXT = EXAMPLE_CONFIG.read_text(encoding="utf-8")


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, len(EXAMPLE_TEXT)), st.integers(0, 40),
                                st.text(max_size=12)), min_size=1, max_size=5))
def test_textual_config_mutations_give_config_error_or_a_config(
        edits: list[tuple[int, int, str]], tmp_path_factory: pytest.TempPathFactory) -> None:
    text = EXAMPLE_TEXT
    for requested, length, insert in edits:
        position = min(requested, len(text))
        text = text[:position] + insert + text[position + length:]
    path = tmp_path_factory.mktemp("cfg") / "config.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        load_config(path)
    except ConfigError as err:
        assert str(err)


def test_check_config_on_mutated_files_exits_2_without_a_traceback(tmp_path: Path) -> None:
    rng = random.Random(7)
    bad = [
        EXAMPLE_TEXT.replace("port = 1883", "port = 1e400"),
        EXAMPLE_TEXT.replace('id = "kitchen"', 'id = 1979-05-27T07:32:00Z'),
        EXAMPLE_TEXT[: EXAMPLE_TEXT.index('host = "127') + 10],  # cut inside a string
        "".join(rng.choice(EXAMPLE_TEXT) for _ in range(2000)),
        EXAMPLE_TEXT.encode("utf-8").replace(b"kitchen", b"kit\xffchen").decode("utf-8", "surrogateescape"),
    ]
    for index, text in enumerate(bad):
        path = tmp_path / f"bad{index}.toml"
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        result = subprocess.run([sys.executable, "-m", "agent", "check-config", "--config", str(path)],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2, (index, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr and result.stderr.strip(), (index, result.stderr)


# ------------------------------------------------------------------------------------ audio files

SUBTYPES = ["PCM_16", "PCM_24", "PCM_32", "PCM_U8", "FLOAT", "DOUBLE", "ULAW", "ALAW"]


def wav_bytes(rate: int, channels: int, subtype: str, frames: int, seed: int) -> bytes:
    signal = np.random.default_rng(seed).uniform(-0.5, 0.5, size=(frames, channels))
    buffer = io.BytesIO()
    sf.write(buffer, signal, rate, subtype=subtype, format="WAV")
    return buffer.getvalue()


@FUZZ
@given(rate=st.sampled_from([4000, 8000, 11025, 16000, 22050, 44100, 48000, 96000, 7919, 192000]),
       channels=st.integers(1, 6), subtype=st.sampled_from(SUBTYPES), frames=st.integers(1, 4000),
       seed=st.integers(0, 2**16))
def test_any_valid_wav_becomes_16_khz_mono_int16(  # noqa: PLR0917 - hypothesis arguments
        rate: int, channels: int, subtype: str, frames: int, seed: int,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("wav") / "in.wav"
    path.write_bytes(wav_bytes(rate, channels, subtype, frames, seed))
    samples = read_audio_file(path)
    assert samples.dtype == np.int16 and samples.ndim == 1
    assert abs(len(samples) - frames * 16000 / rate) <= 16000 / rate + 2


WAV_FIELDS = {"channels": (22, "<H"), "rate": (24, "<I"), "byte_rate": (28, "<I"), "block_align": (32, "<H"),
              "bits": (34, "<H"), "riff_size": (4, "<I"), "format": (20, "<H")}


@FUZZ
@given(base=st.tuples(st.sampled_from([8000, 16000, 44100]), st.integers(1, 2),
                      st.sampled_from(SUBTYPES[:5])),
       damage=st.one_of(
           st.tuples(st.just("field"), st.sampled_from(sorted(WAV_FIELDS)),
                     st.sampled_from([0, 1, 3, 7, 0xFFFF, 0xFFFFFFFF, 2**31, 12345])),
           st.tuples(st.just("truncate"), st.integers(0, 3000), st.just(0)),
           st.tuples(st.just("flip"), st.integers(0, 3000), st.integers(0, 255)),
           st.tuples(st.just("garbage"), st.integers(0, 3000), st.integers(0, 2**16)),
       ))
def test_damaged_audio_files_give_audio_error_or_samples(
        base: tuple[int, int, str], damage: tuple[str, Any, int],
        tmp_path_factory: pytest.TempPathFactory) -> None:
    rate, channels, subtype = base
    data = bytearray(wav_bytes(rate, channels, subtype, 800, 1))
    how, where, value = damage
    if how == "field":
        offset, fmt = WAV_FIELDS[where]
        struct.pack_into(fmt, data, offset, value & (0xFFFF if fmt == "<H" else 0xFFFFFFFF))
    elif how == "truncate":
        data = data[: min(where, len(data))]
    elif how == "flip":
        data[where % len(data)] = value
    else:
        data = bytearray(random.Random(value).randbytes(where))
    path = tmp_path_factory.mktemp("bad") / "bad.wav"
    path.write_bytes(bytes(data))
    try:
        samples = read_audio_file(path)
    except AudioError as err:
        assert str(path) in str(err)
        return
    assert samples.dtype == np.int16 and samples.ndim == 1


@pytest.mark.parametrize("rate", [1, 3, 1000, 3999, 768_001, 4_000_000])
def test_a_wav_with_an_absurd_sample_rate_is_refused(tmp_path: Path, rate: int) -> None:
    """1 Hz would turn 2000 frames into 9 hours of 16 kHz audio (and gigabytes of memory)."""
    path = tmp_path / f"r{rate}.wav"
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(np.zeros(2000, dtype=np.int16).tobytes())
    with pytest.raises(AudioError, match="unsupported sample rate"):
        read_audio_file(path)


# ------------------------------------------------------------------------------------ model files


def install_model(directory: Path, model: bytes, metadata: Any, *, fix_checksum: bool = True) -> Path:
    path = directory / "kws.tflite"
    path.write_bytes(model)
    if fix_checksum and isinstance(metadata, dict):
        metadata = {**metadata, "sha256": hashlib.sha256(model).hexdigest()}
    text = metadata if isinstance(metadata, str) else json.dumps(metadata)
    (directory / "kws.json").write_text(text, encoding="utf-8")
    return path


KWS_BYTES = KWS_MODEL.read_bytes()
KWS_META = json.loads(KWS_MODEL.with_suffix(".json").read_text(encoding="utf-8"))


@settings(FUZZ, max_examples=150)
@given(damage=st.one_of(
    st.lists(st.tuples(st.integers(0, len(KWS_BYTES) - 1), st.integers(0, 255)), min_size=1, max_size=30),
    st.integers(0, len(KWS_BYTES) - 1),
    st.binary(max_size=3000),
))
def test_corrupt_model_files_give_model_error(damage: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    """With a checksum that matches (a model re-exported wrongly, not a bit flip in transit), the
    interpreter itself sees the damage: ModelError or a model that loads and runs, nothing else."""
    if isinstance(damage, list):
        data = bytearray(KWS_BYTES)
        for offset, value in damage:
            data[offset] = value
        model = bytes(data)
    elif isinstance(damage, int):
        model = KWS_BYTES[:damage]
    else:
        model = damage
    path = install_model(tmp_path_factory.mktemp("model"), model, KWS_META)
    try:
        loaded = KwsModel.load(path)
    except ModelError as err:
        assert str(path) in str(err)
        return
    scores = loaded.predict(np.zeros(loaded.params.shape, dtype=np.float32))
    assert scores.shape == (len(loaded.labels),)


@settings(FUZZ, max_examples=200)
@given(rows=st.lists(st.tuples(st.one_of(st.floats(-1e12, 1e12), st.just(math.nan)),
                               st.floats(allow_nan=True, allow_infinity=True)), max_size=400))
def test_any_readings_give_scores_in_range_and_small_state(rows: list[tuple[float, float]]) -> None:
    """Whatever a stream sends (NaN, infinities, 1e308, times out of order), the detector neither raises
    nor leaves [0, 1], and its state stays within 4 KB of JSON."""
    from agent.anomaly import StreamDetector
    from agent.config import AnomalySection

    detector = StreamDetector(AnomalySection(learning_readings=10))
    t = 1_700_000_000.0
    for offset, value in rows:
        outcome = detector.update(t + offset, value)
        if outcome is not None:
            assert 0.0 <= outcome.score <= 1.0
        t += 60.0
    assert len(json.dumps(detector.state.to_dict(), separators=(",", ":"))) <= 4096


def test_a_bit_flip_is_caught_by_the_checksum(tmp_path: Path) -> None:
    data = bytearray(KWS_BYTES)
    data[len(data) // 2] ^= 0x01
    path = install_model(tmp_path, bytes(data), KWS_META, fix_checksum=False)
    with pytest.raises(ModelError, match="does not match its metadata"):
        KwsModel.load(path)


def _without(mapping: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k != key}


@pytest.mark.parametrize("metadata, reason", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (_without(KWS_META, "labels"), "lacks"),
    (_without(KWS_META, "feature_params"), "lacks"),
    (_without(KWS_META, "thresholds"), "lacks"),
    ({**KWS_META, "labels": []}, "labels"),
    ({**KWS_META, "labels": ["computer", "computer"]}, "duplicate"),
    ({**KWS_META, "labels": [*KWS_META["labels"], "extra"],
      "thresholds": {**KWS_META["thresholds"], "extra": 0.5}}, "output shape"),  # wrong output shape
    ({**KWS_META, "feature_params": {**KWS_META["feature_params"], "num_coefficients": 13}},
     "input shape"),  # wrong input shape
    ({**KWS_META, "feature_params": {**KWS_META["feature_params"], "window_seconds": 0.5}}, "input shape"),
    ({**KWS_META, "feature_params": "mfcc"}, "feature_params"),
    ({**KWS_META, "thresholds": {**KWS_META["thresholds"], "computer": 1.5}}, "threshold"),
    ({**KWS_META, "thresholds": {**KWS_META["thresholds"], "computer": "high"}}, "threshold"),
    ({**KWS_META, "thresholds": {"nope": 0.5}}, "not labels"),
])
def test_bad_model_metadata_and_wrong_shapes_give_model_error(tmp_path: Path, metadata: Any,
                                                               reason: str) -> None:
    path = install_model(tmp_path, KWS_BYTES, metadata)
    with pytest.raises(ModelError, match=reason):
        KwsModel.load(path)


def test_missing_metadata_gives_model_error(tmp_path: Path) -> None:
    path = tmp_path / "kws.tflite"
    path.write_bytes(KWS_BYTES)
    with pytest.raises(ModelError, match="metadata"):
        KwsModel.load(path)
