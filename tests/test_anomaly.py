"""The anomaly detector with the real int8 model: faults caught, quiet on fault-free data, strictly online,
state that survives a restart, clear errors for bad models and state files, the daemon stage.

Tests without ../shared use a synthetic stream made here (a daily cycle plus noise, rounded like a real
sensor); ``@pytest.mark.data`` tests replay the real telemetry logs.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from agent.anomaly import (
    KINDS,
    AnomalyDetector,
    AnomalyModel,
    AnomalyStage,
    StreamDetector,
    StreamState,
    metadata_path,
)
from agent.config import AnomalySection
from agent.errors import ModelError
from agent.messages import AnomalyEvent, Reading
from agent.paths import REPO_ROOT

MODEL_PATH = REPO_ROOT / "models" / "anomaly.tflite"
INTERVAL = 600.0  # the synthetic stream: one reading every 10 minutes
T0 = 1_700_000_000.0

FloatArray = npt.NDArray[np.float64]


@pytest.fixture(scope="module")
def model() -> AnomalyModel:
    return AnomalyModel.load(MODEL_PATH)


@pytest.fixture
def config() -> AnomalySection:
    return AnomalySection()


def synthetic(days: float = 20.0, seed: int = 1) -> tuple[FloatArray, FloatArray, FloatArray]:
    """A room temperature: daily cycle, a slower weather wave, sensor noise, 0.01 resolution."""
    rng = np.random.default_rng(seed)
    n = int(days * 86400 / INTERVAL)
    times: FloatArray = T0 + np.arange(n, dtype=np.float64) * INTERVAL
    tods: FloatArray = (times % 86400.0) / 86400.0
    values = (20.0 + 2.0 * np.sin(2 * np.pi * tods) + 0.3 * np.sin(2 * np.pi * times / 86400.0 / 3.1)
              + rng.normal(0.0, 0.05, n))
    return times, tods, np.round(values, 2).astype(np.float64)


def detector_at(model: AnomalyModel, config: AnomalySection, start: int) -> StreamDetector:
    times, tods, values = synthetic()
    detector = StreamDetector(model, config)
    detector.process(times[:start], tods[:start], values[:start])
    return detector


# ---------------------------------------------------------------------------------- synthetic stream


def test_fault_free_synthetic_stream_raises_no_alert(model: AnomalyModel, config: AnomalySection) -> None:
    times, tods, values = synthetic(days=30, seed=3)
    result = StreamDetector(model, config).process(times, tods, values)
    assert [c for c in result.changes if c.active] == []
    assert result.scores.min() >= 0.0
    assert result.scores.max() < config.threshold
    # fine-grained: scores are not a handful of levels
    learnt = result.scores[config.learning_readings:]
    assert len(np.unique(learnt)) > 0.9 * len(learnt)


START = 1500  # ten days in


@pytest.mark.parametrize(("kind", "max_delay_readings"), [("spike", 1), ("step", 1), ("stuck", 18)])
def test_synthetic_fault_is_caught(model: AnomalyModel, config: AnomalySection, kind: str,
                                   max_delay_readings: int) -> None:
    times, tods, values = synthetic()
    detector = detector_at(model, config, START)
    faulty = values[START:START + 300].copy()
    if kind == "spike":
        faulty[0] += 5.0
    elif kind == "step":
        faulty += 3.0
    else:
        faulty[:] = values[START - 1]
    result = detector.process(times[START:START + 300], tods[START:START + 300], faulty)
    starts = [c for c in result.changes if c.active]
    assert starts, f"{kind} not detected; max score {result.scores.max():.4f}"
    assert starts[0].index <= max_delay_readings
    assert starts[0].kind in KINDS


def test_synthetic_dropout_is_caught_after_about_ten_intervals(model: AnomalyModel,
                                                               config: AnomalySection) -> None:
    detector = detector_at(model, config, START)
    last = detector.state.last_time
    assert detector.dropout_now(last + 3 * INTERVAL) < config.clear_threshold
    delays = [k for k in range(1, 40) if detector.dropout_now(last + k * INTERVAL) >= config.threshold]
    assert delays and delays[0] <= 10
    # the same through the multi-stream detector's silence check: one event, then quiet
    multi = AnomalyDetector(model, config)
    multi.streams["room"] = StreamDetector(model, config, copy.deepcopy(detector.state))
    assert multi.check_dropouts(last + 2 * INTERVAL) == []
    events = multi.check_dropouts(last + 12 * INTERVAL)
    assert [(e.sensor, e.kind, e.active) for e in events] == [("room", "dropout", True)]
    assert multi.check_dropouts(last + 13 * INTERVAL) == []
    # readings return: the first still carries the long gap, the episode ends once they are regular again
    value = detector.state.last_value
    returned = [multi.score(Reading("room", value, last + (14 + k) * INTERVAL, "t")) for k in range(3)]
    ends = [e for e in returned if e is not None and not e.active]
    assert ends and ends[0].score < config.clear_threshold


def test_missing_values_are_not_learnt(model: AnomalyModel, config: AnomalySection) -> None:
    times, tods, values = synthetic(days=4)
    holey = values.copy()
    holey[400:410] = np.nan
    a = StreamDetector(model, config).process(times, tods, holey)
    b_detector = StreamDetector(model, config)
    b = b_detector.process(np.delete(times, range(400, 410)), np.delete(tods, range(400, 410)),
                           np.delete(values, range(400, 410)))
    np.testing.assert_array_equal(np.delete(a.scores, range(400, 410)), b.scores)
    assert np.all(np.isfinite(a.scores)) and a.scores.max() <= 1.0


def test_scores_do_not_depend_on_block_size(model: AnomalyModel, config: AnomalySection) -> None:
    times, tods, values = synthetic(days=6)
    whole = StreamDetector(model, config).process(times, tods, values).scores
    one_by_one = StreamDetector(model, config)
    singles = np.concatenate([one_by_one.process(times[i:i + 1], tods[i:i + 1], values[i:i + 1]).scores
                              for i in range(len(times))])
    np.testing.assert_array_equal(whole, singles)
    rng = np.random.default_rng(5)
    cuts = np.sort(rng.choice(np.arange(1, len(times)), 25, replace=False))
    blocks = StreamDetector(model, config)
    pieces = [blocks.process(times[a:b], tods[a:b], values[a:b]).scores
              for a, b in zip([0, *cuts], [*cuts, len(times)], strict=True)]
    np.testing.assert_array_equal(whole, np.concatenate(pieces))


def test_hysteresis_and_cooldown_give_one_alert_per_episode(model: AnomalyModel) -> None:
    config = AnomalySection(cooldown=6 * 3600.0)
    times, tods, values = synthetic()
    detector = detector_at(model, config, START)
    faulty = values[START:START + 200].copy()
    for offset in (0, 3, 6, 40, 80):  # spikes close together: one episode, then the cooldown holds
        faulty[offset] += 6.0
    result = detector.process(times[START:START + 200], tods[START:START + 200], faulty)
    assert len([c for c in result.changes if c.active]) == 1
    ends = [c for c in result.changes if not c.active]
    assert ends and all(c.score < config.clear_threshold for c in ends)


def test_no_alert_while_learning(model: AnomalyModel, config: AnomalySection) -> None:
    times, tods, values = synthetic(days=3)
    faulty = values.copy()
    faulty[100] += 50.0
    faulty[200:] = faulty[199]
    result = StreamDetector(model, config).process(times[:config.learning_readings],
                                                   tods[:config.learning_readings],
                                                   faulty[:config.learning_readings])
    assert result.changes == []


# ---------------------------------------------------------------------------------- state


def test_state_round_trip_gives_identical_scores(model: AnomalyModel, config: AnomalySection,
                                                 tmp_path: Path) -> None:
    times, tods, values = synthetic(days=8)
    half = len(times) // 2
    reference = StreamDetector(model, config).process(times, tods, values).scores

    first = AnomalyDetector(model, config)
    first.stream("room").process(times[:half], tods[:half], values[:half])
    path = tmp_path / "anomaly_state.json"
    first.save(path)
    assert path.stat().st_size < 8000  # small: a few dozen numbers per stream

    second = AnomalyDetector(model, config)
    assert second.restore(path)
    rest = second.stream("room").process(times[half:], tods[half:], values[half:]).scores
    np.testing.assert_array_equal(reference[half:], rest)
    state = second.streams["room"].state
    assert StreamState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


def test_corrupt_state_file_is_moved_aside(model: AnomalyModel, config: AnomalySection, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "anomaly_state.json"
    path.write_text('{"version": 1, "model_sha256": "' + model.sha256 + '", "streams": {"a": {"tails": 3}}}')
    detector = AnomalyDetector(model, config)
    with caplog.at_level(logging.ERROR):
        assert detector.restore(path) is False
    assert not path.exists()
    assert len(list(tmp_path.glob("anomaly_state.json.corrupt-*"))) == 1
    assert "corrupt" in caplog.text
    assert detector.streams == {}
    path.write_text("not json {")
    assert detector.restore(path) is False
    assert detector.restore(tmp_path / "absent.json") is False


# ---------------------------------------------------------------------------------- model loading


def _copy_model(tmp_path: Path) -> Path:
    target = tmp_path / "anomaly.tflite"
    shutil.copy(MODEL_PATH, target)
    shutil.copy(metadata_path(MODEL_PATH), metadata_path(target))
    return target


def test_corrupt_model_raises_model_error(tmp_path: Path) -> None:
    path = _copy_model(tmp_path)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ModelError, match="corrupt"):
        AnomalyModel.load(path)


def test_truncated_model_with_matching_checksum_raises_model_error(tmp_path: Path) -> None:
    path = _copy_model(tmp_path)
    path.write_bytes(path.read_bytes()[:200])
    meta = json.loads(metadata_path(path).read_text())
    import hashlib

    meta["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    metadata_path(path).write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="cannot be loaded"):
        AnomalyModel.load(path)


def test_model_with_the_wrong_shape_raises_model_error(tmp_path: Path) -> None:
    path = _copy_model(tmp_path)
    meta = json.loads(metadata_path(path).read_text())
    meta["window"] = meta["window"] + 4
    metadata_path(path).write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="wrong shape"):
        AnomalyModel.load(path)


def test_missing_model_or_metadata_raises_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        AnomalyModel.load(tmp_path / "absent.tflite")
    path = _copy_model(tmp_path)
    metadata_path(path).unlink()
    with pytest.raises(ModelError, match="metadata not found"):
        AnomalyModel.load(path)
    shutil.copy(metadata_path(MODEL_PATH), metadata_path(path))
    metadata_path(path).write_text("{")
    with pytest.raises(ModelError, match="unreadable"):
        AnomalyModel.load(path)


def test_shipped_model_is_tiny_and_int8(model: AnomalyModel) -> None:
    assert MODEL_PATH.stat().st_size <= 16 * 1024
    meta = json.loads(metadata_path(MODEL_PATH).read_text())
    assert meta["window"] == model.window
    assert "calibration" in meta and "sha256" in meta


# ---------------------------------------------------------------------------------- the daemon stage


def test_stage_publishes_events_fires_action_and_saves_state(model: AnomalyModel, tmp_path: Path) -> None:
    config = AnomalySection(learning_readings=50, save_interval=3600.0)
    times, _tods, values = synthetic(days=3)
    readings: queue.Queue[Reading] = queue.Queue(maxsize=16)
    published: list[AnomalyEvent] = []
    fired: list[str] = []
    done = threading.Event()

    def publish(event: AnomalyEvent) -> None:
        published.append(event)

    def on_anomaly(sensor: str) -> None:
        fired.append(sensor)
        done.set()

    state_path = tmp_path / "anomaly_state.json"
    detector = AnomalyDetector(model, config, publish_interval=3600.0)
    stage = AnomalyStage(detector, readings, publish, on_anomaly, state_path=state_path)
    stage.start()
    try:
        assert stage.healthy(time.monotonic())
        faulty = values.copy()
        faulty[300] += 8.0
        for t, value in zip(times[:320], faulty[:320], strict=True):
            readings.put(Reading("kitchen", float(value), float(t), "z2m/kitchen"), timeout=5)
        assert done.wait(10), "no anomaly action"
    finally:
        stage.stop()
    assert fired == ["kitchen"]
    starts = [e for e in published if e.active]
    assert starts and starts[0].kind in KINDS and 0.0 <= starts[0].score <= 1.0
    assert all(0.0 <= e.score <= 1.0 for e in published)
    assert len(published) < 320 / 2  # score updates are rate limited, not one per reading
    saved = json.loads(state_path.read_text())
    assert saved["streams"]["kitchen"]["n"] == 320
    assert not stage.healthy(time.monotonic())


def test_stage_survives_a_failing_publisher(model: AnomalyModel) -> None:
    config = AnomalySection(learning_readings=10)
    readings: queue.Queue[Reading] = queue.Queue(maxsize=4)

    def publish(_event: AnomalyEvent) -> None:
        raise RuntimeError("broker gone")

    stage = AnomalyStage(AnomalyDetector(model, config), readings, publish)
    stage.handle(Reading("a", 1.0, T0, "t"))
    stage.handle(Reading("a", 1.5, T0 + 60, "t"))
    assert stage.counters["callback_errors"] >= 1
    assert stage.counters["readings"] == 2


# ---------------------------------------------------------------------------------- real telemetry


DAY = 86400.0


@pytest.fixture(scope="module")
def streams() -> list[Any]:
    from training.anomaly_data import default_telemetry_dir, load_streams

    data_dir = default_telemetry_dir()
    if not data_dir.is_dir():
        pytest.skip(f"telemetry data not found at {data_dir}")
    return load_streams(data_dir)


@pytest.mark.data
def test_fault_free_replay_stays_under_the_false_alarm_budget(model: AnomalyModel,
                                                               streams: list[Any]) -> None:
    from training.anomaly_data import replay

    config = AnomalySection()
    alerts = days = 0.0
    for stream in streams:
        result = replay(model, config, stream)
        alerts += len(result.alerts)
        days += stream.days
        # no stream floods: at most three alerts in its whole log
        assert len(result.alerts) <= 3, (stream.name, [(a.kind, a.time) for a in result.alerts])
    assert days > 3000
    assert alerts / days <= 0.01


# Real stream, fault start, stated maximum delay (seconds). Appliances T1 (a living room, 10-minute) and
# the office CO2 (1-minute).
REAL_FAULTS = [
    ("appliances/T1", "spike", 8000, 0.0),
    ("appliances/T1", "step", 8000, 10 * 60.0),
    ("appliances/T1", "stuck", 8000, 18 * 3600.0),
    ("appliances/T1", "dropout", 8000, 2 * 3600.0),
    ("appliances/T1", "drift", 12000, 3 * DAY),
    ("occupancy/datatest2/CO2", "spike", 5000, 60.0),
    ("occupancy/datatest2/CO2", "stuck", 5000, 3 * 3600.0),
    ("occupancy/datatest2/CO2", "dropout", 5000, 15 * 60.0),
]


@pytest.mark.data
@pytest.mark.parametrize(("name", "kind", "start", "max_delay"), REAL_FAULTS)
def test_fault_injected_into_a_real_stream_is_caught(model: AnomalyModel, streams: list[Any], *, name: str,
                                                     kind: str, start: int, max_delay: float) -> None:
    from training.anomaly_data import Fault, detect

    config = AnomalySection()
    stream = next(s for s in streams if s.name == name)
    clean = StreamDetector(model, config)
    clean.process(stream.times[:start], stream.tods[:start], stream.values[:start])
    sigma = float(np.std(stream.values))
    magnitude = {"spike": 5.0, "step": 3.0, "drift": 3.0}.get(kind, 0.0) * sigma
    horizon = round((3 * DAY if kind == "drift" else DAY) / stream.interval)
    fault = Fault(kind, start, magnitude)
    detection = detect(model, config, stream, fault, state=clean.state, horizon=horizon)
    assert detection.detected, f"{kind} in {name} not detected within {horizon} readings"
    assert detection.delay <= max_delay
    assert not math.isinf(detection.delay)


# ---------------------------------------------------------------------------------- in the daemon


def test_daemon_publishes_retained_anomaly_events_and_fires_the_action(
        mosquitto: Any, write_config: Any, daemon_factory: Any, mqtt_client: Any, *, tmp_path: Path) -> None:
    from conftest import wait_until

    topic = "home-agent/testagent/anomaly/living_room_temperature"
    config = write_config(mosquitto, overrides={
        "anomaly.learning_readings": 40,
        "telemetry": [{"topic": "zigbee2mqtt/living_room_sensor", "field": "temperature",
                       "sensor": "living_room_temperature", "on_anomaly": "lamp_on"}],
        "actions.lamp_on.min_interval": 0.0,
    })
    probe = mqtt_client().subscribe("home-agent/testagent/#", "test/lamp/set")
    daemon = daemon_factory(config)
    probe.wait_for("home-agent/testagent/availability", b"online", timeout=10)
    # 120 readings 10 s apart, stamped by the device (zigbee2mqtt last_seen) over the last 20 minutes
    now = time.time()
    _times, _tods, values = synthetic(days=1)
    for index in range(120):
        value = float(values[index]) + (8.0 if index == 110 else 0.0)
        stamp = now - 1200.0 + 10.0 * index
        probe.publish("zigbee2mqtt/living_room_sensor",
                      json.dumps({"temperature": value, "last_seen": stamp * 1000.0}))
    probe.wait_for(topic, timeout=10)
    assert wait_until(lambda: any(json.loads(m.payload)["active"] for m in probe.matching(topic)), 10), \
        daemon.log_text()
    events = [json.loads(m.payload) for m in probe.matching(topic)]
    first_alert = next(e for e in events if e["active"])
    assert set(first_alert) >= {"score", "value", "kind", "time", "active", "id"}
    assert first_alert["kind"] in KINDS and first_alert["score"] >= 0.99
    # the spike (reading 110) is flagged on arrival, or at the latest when the next reading comes back
    assert first_alert["time"] in (pytest.approx(now - 1200.0 + 1100.0), pytest.approx(now - 1200.0 + 1110.0))
    probe.wait_for("test/lamp/set", timeout=5)  # the stream's on_anomaly action
    assert daemon.terminate(10) == 0
    saved = json.loads((tmp_path / "state" / "anomaly_state.json").read_text())
    assert saved["streams"]["living_room_temperature"]["n"] == 120
    retained = mqtt_client().subscribe(topic)
    last = json.loads(retained.wait_for(topic, timeout=5, retained=True).payload)
    assert {"score", "active", "kind"} <= set(last)


@pytest.mark.train
@pytest.mark.data
def test_training_smoke_run_writes_a_loadable_model(tmp_path: Path) -> None:
    import subprocess
    import sys

    from training.anomaly_data import default_telemetry_dir

    data_dir = default_telemetry_dir()
    if not data_dir.is_dir():
        pytest.skip(f"telemetry data not found at {data_dir}")
    out = tmp_path / "models"
    result = subprocess.run([sys.executable, "-m", "training.anomaly", "--smoke", "--data", str(data_dir),
                             "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={"TF_USE_LEGACY_KERAS": "1", "PATH": "/usr/bin:/bin"}, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    smoke = AnomalyModel.load(out / "anomaly.tflite")  # checksum and shapes verified
    assert (out / "anomaly.tflite").stat().st_size <= 16 * 1024
    meta = json.loads((out / "anomaly.json").read_text())
    assert meta["smoke"] is True and meta["validation"]["faults"]["dropout"]["detected"] >= 1
    assert "SMOKE RUN" in (out / "anomaly.md").read_text()
    assert smoke.predict(np.zeros((3, smoke.n_features), np.float32)).shape == (3,)


def test_training_without_data_fails_clearly(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "training.anomaly", "--smoke", "--data",
                             str(tmp_path / "absent"), "--out", str(tmp_path / "m")], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "no telemetry files" in result.stderr
