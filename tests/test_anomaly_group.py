"""Device groups (``agent.anomaly.group``): the streams of one device combine their evidence and raise one
alert for the device naming the streams that moved; ungrouped streams behave exactly as before; the daemon
and ``anomaly-score --group`` raise the same alerts; bad input (a member missing from a message, a silent
member, members at different rates, NaN) is handled and counted; the config is validated."""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import queue
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import run_cli

from agent.anomaly import AnomalyDetector, AnomalyStage
from agent.anomaly.group import GroupDetector, device_groups, log10_chi2_sf
from agent.config import AnomalySection, parse_config
from agent.errors import ConfigError
from agent.messages import AnomalyEvent, Reading

T0 = 1_700_000_000.0
STEP = 10.0


def device_readings(members: int, moved: int, shift: float, *, ticks: int = 1500, start: int = 1000,
                    seed: int = 1) -> list[Reading]:
    """``members`` noisy streams of one device, one message (tick) every 10 s; from tick ``start`` the first
    ``moved`` of them shift by ``shift`` of their noise: too little for most of them to alert alone."""
    rng = np.random.default_rng(seed)
    readings = []
    for i in range(ticks):
        for j in range(members):
            value = 20 + j + rng.normal(0.0, 1.0) + (shift if i >= start and j < moved else 0.0)
            readings.append(Reading(f"s{j}", round(value, 2), T0 + STEP * i, "t"))
    return readings


def replay(detector: AnomalyDetector, readings: list[Reading]) -> tuple[list[tuple[int, str]],
                                                                        list[tuple[int, tuple[str, ...]]]]:
    """Own alert starts (tick, stream) and device alert starts (tick, named streams)."""
    own, device = [], []
    for reading in readings:
        publication = detector.score(reading)
        tick = round((reading.time - T0) / STEP)
        if publication is not None and publication.started:
            own.append((tick, reading.sensor))
        for event in detector.take_group_publications():
            if event.started:
                device.append((tick, event.event.streams))
    return own, device


def exact_log10_chi2_sf(x: float, dof: int) -> float:
    """The closed form for even degrees of freedom (Fisher's method always has them)."""
    half = x / 2.0
    return math.log10(math.exp(-half) * sum(half**i / math.factorial(i) for i in range(dof // 2)))


@pytest.mark.parametrize(("x", "dof"), [(10, 2), (4, 10), (20, 10), (40, 16), (60, 16), (100, 16), (30, 4),
                                        (200, 32)])
def test_chi_square_tail_is_close_and_never_claims_more_than_the_exact_one(x: float, dof: int) -> None:
    exact, approx = exact_log10_chi2_sf(x, dof), log10_chi2_sf(x, dof)
    assert approx >= exact - 0.01  # conservative: a device alert is never easier than Fisher's exact test
    assert approx == pytest.approx(exact, abs=0.05) if exact > -4.0 else approx <= 0.9 * exact


def test_chi_square_tail_edges() -> None:
    assert log10_chi2_sf(0.0, 4.0) == 0.0
    assert math.isfinite(log10_chi2_sf(1e9, 4.0)) and log10_chi2_sf(1e9, 4.0) < -1e5


def test_a_device_whose_streams_all_move_a_little_raises_one_alert_naming_them() -> None:
    """Eight streams move by half their noise at tick 1000: two of them alert on their own (late), the
    device alerts once, soon, and names streams that had not alerted by then."""
    names = tuple(f"s{j}" for j in range(8))
    own, device = replay(AnomalyDetector(AnomalySection(), {"pump": names}), device_readings(8, 8, 0.5))
    assert len(device) == 1
    tick, named = device[0]
    assert 1000 <= tick <= 1060
    alone_by_then = {sensor for t, sensor in own if t <= tick}
    assert len(set(named) - alone_by_then) >= 4
    assert len({sensor for _t, sensor in own}) <= 3  # most streams never alert alone
    # the same streams without a group: no device alert, the same own alerts
    ungrouped_own, ungrouped_device = replay(AnomalyDetector(AnomalySection()), device_readings(8, 8, 0.5))
    assert ungrouped_device == [] and ungrouped_own == own


def test_streams_that_did_not_move_are_not_named_and_a_quiet_device_is_quiet() -> None:
    names = tuple(f"s{j}" for j in range(10))
    _own, device = replay(AnomalyDetector(AnomalySection(), {"pump": names}), device_readings(10, 8, 0.6))
    assert len(device) == 1
    assert not {"s8", "s9"} & set(device[0][1])
    _own, quiet = replay(AnomalyDetector(AnomalySection(), {"pump": names}), device_readings(10, 0, 0.0))
    assert quiet == []


def test_grouping_changes_no_stream_score_or_own_alert() -> None:
    """A group only adds device alerts: every stream's own outcome is the one it has without groups."""
    readings = device_readings(4, 4, 1.0, ticks=1200)
    grouped = AnomalyDetector(AnomalySection(), {"pump": ("s0", "s1", "s2", "s3")})
    alone = AnomalyDetector(AnomalySection())
    for reading in readings:
        assert grouped.score(reading) == alone.score(reading)
    assert {k: d.state.to_dict() for k, d in grouped.streams.items()} == \
        {k: d.state.to_dict() for k, d in alone.streams.items()}


def write_csv(path: Path, readings: list[Reading]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", "value"])
        writer.writerows((dt.datetime.fromtimestamp(r.time, dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
                          repr(r.value)) for r in readings)


def test_daemon_stage_and_anomaly_score_group_raise_the_same_alerts(tmp_path: Path) -> None:
    """One code path: a device replayed through the daemon's stage (device events naming streams, the
    streams' own alerts) and through ``anomaly-score --group`` (alert=1 on those rows) agrees row by row."""
    readings = device_readings(6, 6, 0.7, ticks=1300)
    published: list[AnomalyEvent] = []
    names = tuple(f"s{j}" for j in range(6))
    stage = AnomalyStage(AnomalyDetector(AnomalySection(), {"pump": names}), queue.Queue(), published.append)
    for reading in readings:
        stage.handle(reading)
    daemon_rows: set[tuple[str, int]] = set()
    previous: dict[str, bool] = {}
    for event in published:
        tick = round((event.time - T0) / STEP)
        if event.streams:
            daemon_rows |= {(sensor, tick) for sensor in event.streams}
        elif event.active and not previous.get(event.sensor, False):
            daemon_rows.add((event.sensor, tick))
        previous[event.sensor] = event.active
    assert any(event.sensor == "pump" and event.active for event in published)
    folder, out = tmp_path / "pump", tmp_path / "scored"
    folder.mkdir()
    for name in names:
        write_csv(folder / f"{name}.csv", [r for r in readings if r.sensor == name])
    result = run_cli("anomaly-score", "--group", "--input", str(folder), "--output", str(out))
    assert result.returncode == 0, result.stderr
    cli_rows = set()
    for name in names:
        with (out / f"{name}.csv").open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))[1:]
        assert len(rows) == 1300
        cli_rows |= {(name, i) for i, row in enumerate(rows) if row[3] == "1"}
    assert cli_rows == daemon_rows
    assert "scored 7800 rows in 6 files" in result.stderr


def test_anomaly_score_group_needs_two_files(tmp_path: Path) -> None:
    source = tmp_path / "a.csv"
    write_csv(source, device_readings(1, 0, 0.0, ticks=20))
    target = tmp_path / "out.csv"
    result = run_cli("anomaly-score", "--group", "--input", str(source), "--output", str(target))
    assert result.returncode == 2
    assert "--group needs at least two input files" in result.stderr


# ------------------------------------------------------------------------------------------- bad input


def test_a_member_missing_from_messages_a_silent_member_and_different_rates_are_counted() -> None:
    group = GroupDetector("dev", ("a", "b", "c"), AnomalySection())
    # complete ticks, then "c" missing from every other message, then "c" silent, then only "a" (single)
    for i in range(400):
        t = T0 + STEP * i
        group.observe("a", t, 0.3)
        group.observe("b", t, 0.3)
        if i < 100 or (i < 200 and i % 2 == 0):
            group.observe("c", t, 0.3)
    for i in range(400, 450):
        group.observe("a", T0 + STEP * i, 0.3)
    group.flush()
    counters = group.counters
    assert counters["ticks"] == 450
    assert counters["incomplete_ticks"] == 50 + 200 + 50
    assert counters["single_ticks"] == 50
    assert counters["alerts"] == 0
    # different rates: "b" reports every 10th tick of "a"
    rates = GroupDetector("rates", ("a", "b"), AnomalySection())
    for i in range(500):
        rates.observe("a", T0 + i, 0.2)
        if i % 10 == 0:
            rates.observe("b", T0 + i, 0.2)
    rates.flush()
    assert rates.counters["ticks"] == 500 and rates.counters["single_ticks"] == 450
    assert rates.counters["alerts"] == 0


def test_nan_and_refused_readings_of_a_member_are_counted_not_grouped() -> None:
    detector = AnomalyDetector(AnomalySection(), {"dev": ("a", "b")})
    for i in range(50):
        t = T0 + STEP * i
        detector.score(Reading("a", 1.0 + 0.01 * (i % 3), t, "t"))
        detector.score(Reading("b", math.nan if i % 5 == 0 else 2.0, t, "t"))
    detector.score(Reading("b", 2.0, T0, "t"))  # time going backwards
    assert detector.group_counters()["refused"] == 11
    assert detector.rejected() == {"invalid": 10, "time_backwards": 1}
    # no alert: only the device's state at its first tick (inactive)
    assert [(p.event.sensor, p.event.active, p.started) for p in detector.take_group_publications()] == [
        ("dev", False, False)]


def test_a_device_state_is_published_at_its_first_tick_then_only_when_its_alert_starts_or_ends() -> None:
    """Home Assistant's entity for the device (agent.discovery) reads the retained state on the device's
    topic: published once at the first tick after start, so the entity shows off rather than unknown; after
    that only an alert starting or ending is published (the device's topic carries no running score)."""
    detector = AnomalyDetector(AnomalySection(), {"dev": ("a", "b")})
    published = []
    for i in range(400):
        t = T0 + STEP * i
        detector.score(Reading("a", 1.0 + 0.01 * (i % 3), t, "t"))
        detector.score(Reading("b", 2.0 + 0.01 * (i % 2), t, "t"))
        published += detector.take_group_publications()
    first = published[0]
    event = first.event
    assert (event.sensor, event.active, first.started, event.streams) == ("dev", False, False, ())
    assert first.event.time == T0  # the first tick: both members reported at T0
    assert all(p.started or not p.event.active for p in published[1:])
    assert [p for p in published[1:] if not p.started and p.event.active] == []
    assert len([p for p in published if not p.started]) == 1 + len([p for p in published if p.started])


def test_the_stage_counters_name_its_own_the_refused_and_the_groups_counts() -> None:
    """What the daemon's diagnostics publish of the anomaly stage (``AnomalyStage.counters``)."""
    stage = AnomalyStage(AnomalyDetector(AnomalySection(), {"dev": ("a", "b")}), queue.Queue(),
                         lambda _event: None)
    for i in range(3):
        stage.handle(Reading("a", 1.0, T0 + STEP * i, "t"))
        stage.handle(Reading("b", 2.0, T0 + STEP * i, "t"))
    stage.handle(Reading("b", 2.0, T0, "t"))  # time going backwards
    counters = stage.counters()
    # events: each stream's first score, and the device's first state
    assert counters["anomaly_readings"] == 7 and counters["anomaly_events"] == 3
    assert counters["anomaly_rejected_time_backwards"] == 1
    assert counters["anomaly_group_refused"] == 1 and counters["anomaly_group_alerts"] == 0
    assert set(counters) >= {f"anomaly_group_{name}" for name in stage.detector.group_counters()}


def test_group_state_is_saved_and_restored(tmp_path: Path) -> None:
    names = tuple(f"s{j}" for j in range(4))
    detector = AnomalyDetector(AnomalySection(), {"pump": names})
    readings = device_readings(4, 0, 0.0, ticks=400)
    for reading in readings:
        detector.score(reading)
    path = tmp_path / "state.json"
    detector.save(path)
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["groups"]["pump"]["members"] == list(names)
    per_stream = len(json.dumps(saved, separators=(",", ":"))) / len(names)
    assert per_stream <= 4096
    restored = AnomalyDetector(AnomalySection(), {"pump": names})
    assert restored.restore(path)
    assert restored.groups["pump"].state_dict() == detector.groups["pump"].state_dict()
    # a group whose members changed learns afresh; a malformed group entry is a corrupt state file
    other = AnomalyDetector(AnomalySection(), {"pump": names[:3]})
    assert other.restore(path) and other.groups["pump"].ticks == 0
    saved["groups"]["pump"]["means"] = [1.0]
    path.write_text(json.dumps(saved), encoding="utf-8")
    broken = AnomalyDetector(AnomalySection(), {"pump": names})
    assert not broken.restore(path)
    assert list(tmp_path.glob("state.json.corrupt-*"))


def test_ungrouped_state_has_no_groups_entry() -> None:
    detector = AnomalyDetector(AnomalySection())
    detector.score(Reading("a", 1.0, T0, "t"))
    assert set(detector.state_dict()) == {"version", "streams"}


# ---------------------------------------------------------------------------------------------- config


def base(**anomaly: Any) -> dict[str, Any]:
    return {
        "agent": {"id": "t"}, "mqtt": {"port": 1},
        "telemetry": [
            {"topic": "zigbee2mqtt/kitchen_sensor", "field": "temperature", "sensor": "kitchen_t"},
            {"topic": "zigbee2mqtt/kitchen_sensor", "field": "humidity", "sensor": "kitchen_h"},
            {"topic": "tele/plug/SENSOR", "field": "ENERGY.Power", "sensor": "plug_power"},
            {"topic": "tele/plug/SENSOR", "field": "ENERGY.Voltage", "sensor": "plug_voltage"},
            {"topic": "zigbee2mqtt/+/hall", "field": "temperature", "sensor": "hall_t"},
            {"topic": "zigbee2mqtt/+/hall", "field": "humidity", "sensor": "hall_h"},
            {"topic": "sensors/cellar", "sensor": "cellar", "anomaly": False},
        ],
        "actions": {"lamp": {"topic": "lamp/set", "payload": "ON"}},
        "anomaly": anomaly,
    }


def test_device_groups_come_from_topics_by_default_and_can_be_turned_off() -> None:
    assert device_groups(parse_config(base(device_groups=False))) == {}
    groups = device_groups(parse_config(base()))
    # wildcard topics may cover several devices: not grouped
    assert groups == {"zigbee2mqtt_kitchen_sensor": ("kitchen_t", "kitchen_h"),
                      "tele_plug_SENSOR": ("plug_power", "plug_voltage")}
    explicit = parse_config(base(device_groups=True, groups=[
        {"name": "plug", "sensors": ["plug_power", "kitchen_t"], "on_anomaly": "lamp"}]))
    assert device_groups(explicit) == {"plug": ("plug_power", "kitchen_t")}


@pytest.mark.parametrize(("groups", "message"), [
    ([{"name": "g", "sensors": ["kitchen_t", "nope"]}], "anomaly.groups.0.sensors: no telemetry stream has "
                                                         "the sensor id 'nope'"),
    ([{"name": "g", "sensors": ["kitchen_t", "cellar"]}], "'cellar' has anomaly = false"),
    ([{"name": "g", "sensors": ["kitchen_t"]}], "at least 2"),
    ([{"name": "g", "sensors": ["kitchen_t", "kitchen_t"]}], "a sensor is listed twice: kitchen_t"),
    ([{"name": "kitchen_h", "sensors": ["kitchen_t", "plug_power"]}], "is a telemetry sensor id"),
    ([{"name": "g", "sensors": ["kitchen_t", "kitchen_h"]},
      {"name": "h", "sensors": ["kitchen_t", "hall_t"]}],
     "'kitchen_t' is already in the group 'g'"),
    ([{"name": "g", "sensors": ["kitchen_t", "kitchen_h"]}, {"name": "g", "sensors": ["hall_t", "hall_h"]}],
     "the group 'g' is defined twice"),
    ([{"name": "g", "sensors": ["kitchen_t", "kitchen_h"], "on_anomaly": "nope"}],
     "anomaly.groups.0.on_anomaly: no [actions.nope]"),
])
def test_group_config_errors_are_clear(groups: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(base(groups=groups))
    assert message in str(err.value)


def test_the_group_action_fires_once_per_device_alert() -> None:
    config = parse_config(base(groups=[{"name": "pump", "sensors": ["kitchen_t", "kitchen_h", "plug_power",
                                                                    "plug_voltage", "hall_t", "hall_h"],
                                        "on_anomaly": "lamp"}]))
    from agent.anomaly import build_stage

    requests: list[Any] = []
    published: list[AnomalyEvent] = []
    stage = build_stage(config, queue.Queue(), published.append, requests.append)
    sensors = ["kitchen_t", "kitchen_h", "plug_power", "plug_voltage", "hall_t", "hall_h"]
    for reading in device_readings(6, 6, 0.7, ticks=1300):
        stage.handle(reading._replace(sensor=sensors[int(reading.sensor[1:])]))
    device = [e for e in published if e.sensor == "pump" and e.active]
    assert len(device) == 1 and device[0].streams
    assert [r.action for r in requests] == ["lamp"]
