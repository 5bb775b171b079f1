"""Telemetry intake: topic matching and every payload format, good and bad."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import TelemetryStream, load_config, parse_config
from agent.errors import ConfigError, PayloadError
from agent.payloads import MAX_JSON_DEPTH, MAX_PAYLOAD_BYTES
from agent.telemetry import ROUTES_MAX, StateThrottle, TelemetryIntake
from agent.topics import topic_filter_problem, topic_matches

NOW = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC).timestamp()
REPO = Path(__file__).resolve().parent.parent


def stream(**fields: Any) -> TelemetryStream:
    fields.setdefault("sensor", "s")
    return TelemetryStream(**fields)


def one(intake: TelemetryIntake, topic: str, payload: bytes, retained: bool = False,
        now: float = NOW) -> float:
    readings = intake.parse(topic, payload, retained, now)
    assert len(readings) == 1
    return readings[0].value


def rejected(intake: TelemetryIntake, topic: str, payload: bytes, retained: bool = False) -> str:
    with pytest.raises(PayloadError) as info:
        intake.parse(topic, payload, retained, NOW)
    return str(info.value)


# --- topic filters ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), [
    ("a/b", "a/b", True),
    ("a/b", "a/b/c", False),
    ("a/b", "a", False),
    ("a/+", "a/b", True),
    ("a/+", "a/", True),  # + matches an empty level
    ("a/+", "a/b/c", False),
    ("+/+", "/b", True),
    ("+", "a", True),
    ("+", "/a", False),
    ("a/#", "a", True),  # # also matches the parent level
    ("a/#", "a/b/c", True),
    ("a/#", "ab", False),
    ("#", "a/b", True),
    ("#", "$SYS/broker/uptime", False),  # wildcards at level one never match $ topics
    ("+/broker/uptime", "$SYS/broker/uptime", False),
    ("$SYS/#", "$SYS/broker/uptime", True),
    ("tele/+/SENSOR", "tele/plug/SENSOR", True),
    ("tele/+/SENSOR", "tele/plug/STATE", False),
    ("A/b", "a/b", False),  # case-sensitive
    ("a/#/b", "a/x/b", False),  # invalid filter matches nothing
    ("a/b#", "a/b#", False),
    ("a+/b", "a+/b", False),
    ("a/+", "a/+", False),  # topics never contain wildcards
    ("", "", False),
])
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize(("topic_filter", "problem"), [
    ("a/b", None), ("a/+/c", None), ("#", None), ("+/#", None), ("a//b", None),
    ("", "empty"), ("a/#/b", "'#'"), ("a#", "'#'"), ("a/b+", "'+'"), ("a\x00b", "NUL"),
])
def test_topic_filter_problem(topic_filter: str, problem: str | None) -> None:
    found = topic_filter_problem(topic_filter)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_bad_filter_is_a_config_error_naming_the_key() -> None:
    data = {"agent": {"id": "k"}, "mqtt": {}, "telemetry": [{"topic": "a/#/b", "sensor": "x"}]}
    with pytest.raises(ConfigError, match=r"telemetry\.0\.topic: '#' must be a whole level"):
        parse_config(data, "config.toml")
    data["telemetry"] = [{"topic": "a/b", "field": "ENERGY..Power", "sensor": "x"}]
    with pytest.raises(ConfigError, match=r"telemetry\.0\.field: JSON path has an empty part"):
        parse_config(data, "config.toml")
    # Sections built without validation are checked again by the intake itself.
    with pytest.raises(ConfigError, match=r"telemetry\.1\.topic"):
        TelemetryIntake([stream(topic="a"), TelemetryStream.model_construct(topic="x/+y", sensor="y")])


def test_topic_filters_are_unique_and_in_order() -> None:
    intake = TelemetryIntake([
        stream(topic="z/1", field="t", sensor="a"), stream(topic="y/+", sensor="b"),
        stream(topic="z/1", field="h", sensor="c"),
    ])
    assert intake.topic_filters() == ["z/1", "y/+"]
    assert intake.parse("other/topic", b"1", False, NOW) == []


# --- zigbee2mqtt -------------------------------------------------------------------------------------

Z2M = "zigbee2mqtt/living_room_sensor"


def z2m_intake(**extra: Any) -> TelemetryIntake:
    return TelemetryIntake([
        stream(topic=Z2M, field="temperature", sensor="living_room_temperature", **extra),
        stream(topic=Z2M, field="humidity", sensor="living_room_humidity"),
    ])


def test_zigbee2mqtt_one_payload_feeds_two_streams() -> None:
    payload = b'{"temperature": 21.5, "humidity": 40, "linkquality": 80}'
    readings = z2m_intake().parse(Z2M, payload, False, NOW)
    assert [(r.sensor, r.value, r.topic, r.time) for r in readings] == [
        ("living_room_temperature", 21.5, Z2M, NOW),
        ("living_room_humidity", 40.0, Z2M, NOW),
    ]


def test_routes_are_remembered_per_topic_and_bounded() -> None:
    intake = TelemetryIntake([stream(topic="zigbee2mqtt/+", field="temperature", sensor="a"),
                              stream(topic="zigbee2mqtt/hall", field="temperature", sensor="b")])
    for index in range(ROUTES_MAX + 10):  # more topics than it remembers: it starts afresh, still right
        topic = f"zigbee2mqtt/room{index}"
        assert [r.sensor for r in intake.parse(topic, b'{"temperature": 1}', False, NOW)] == ["a"]
    hall = intake.parse("zigbee2mqtt/hall", b'{"temperature": 1}', False, NOW)
    assert [r.sensor for r in hall] == ["a", "b"]
    assert intake.parse("other/hall", b'{"temperature": 1}', False, NOW) == []


def test_state_throttle_sends_one_state_per_interval_and_the_latest_value_after_it() -> None:
    throttle = StateThrottle(interval=1.0)
    assert throttle.offer("a", "21.5", 100.0)  # the first value goes out at once
    assert throttle.offer("b", "5", 100.1)  # another sensor has its own interval
    assert not throttle.offer("a", "22.0", 100.2)
    assert not throttle.offer("a", "22.5", 100.4)  # held: the latest replaces the earlier one
    assert throttle.due(100.9) == []  # a's interval has not passed
    assert throttle.due(101.0) == [("a", "22.5")]
    assert throttle.due(103.0) == []  # handed out once
    assert not throttle.offer("a", "23.0", 101.5)
    assert not throttle.offer("a", "22.5", 101.6)  # back to the value already out: nothing is held
    assert throttle.due(102.5) == []
    assert throttle.offer("a", "24.0", 102.5)  # a whole interval after the last state: at once


def test_wildcard_stream_reports_the_actual_topic() -> None:
    intake = TelemetryIntake([stream(topic="zigbee2mqtt/+", field="temperature")])
    (reading,) = intake.parse("zigbee2mqtt/bedroom", b'{"temperature": -2}', False, NOW)
    assert reading.topic == "zigbee2mqtt/bedroom"
    assert reading.value == -2.0


def test_numeric_string_field_is_accepted() -> None:
    intake = TelemetryIntake([stream(topic="t", field="temperature")])
    assert one(intake, "t", b'{"temperature": "21.5"}') == 21.5


@pytest.mark.parametrize(("payload", "reason"), [
    (b'{"temperature": true}', "boolean"),
    (b'{"temperature": false}', "boolean"),
    (b'{"temperature": "ON"}', "not a number"),
    (b'{"temperature": null}', "null"),
    (b'{"temperature": {"value": 1}}', "JSON object"),
    (b'{"temperature": [21.5]}', "JSON array"),
    (b'{"temperature": NaN}', "invalid JSON"),
    (b'{"temperature": Infinity}', "invalid JSON"),
    (b'{"temperature": -Infinity}', "invalid JSON"),
    (b'{"temperature": "nan"}', "not a number"),
    (b'{"temperature": "inf"}', "not a number"),
    (b'{"temperature": 1e400}', "not a finite number"),
    (b'{"temperature": ' + b"9" * 400 + b"}", "too large"),
    (b'{"temperature": ' + b"9" * 5000 + b"}", "invalid JSON"),  # past Python's integer digit limit
    (b"21.5", "expected a JSON object"),
    (b"[21.5]", "expected a JSON object"),
    (b"{not json", "invalid JSON"),
    (b"", "invalid JSON"),
    (b"\xff\xfe21", "not valid UTF-8"),
])
def test_zigbee2mqtt_bad_payloads(payload: bytes, reason: str) -> None:
    intake = TelemetryIntake([stream(topic=Z2M, field="temperature", sensor="living_room_temperature")])
    message = rejected(intake, Z2M, payload)
    assert reason in message
    assert "living_room_temperature" in message or "UTF-8" in message  # says which stream refused it


def test_partial_update_returns_what_is_usable_and_counts_the_rest() -> None:
    intake = z2m_intake()
    readings = intake.parse(Z2M, b'{"temperature": 21.5, "humidity": true}', False, NOW)
    assert [r.sensor for r in readings] == ["living_room_temperature"]
    assert intake.partial_rejections == 1
    outcome = intake.parse_detailed(Z2M, b'{"temperature": 21.5, "humidity": "wet"}', False, NOW)
    assert len(outcome.readings) == 1
    assert outcome.rejected[0][0] == "not_a_number" and "living_room_humidity" in outcome.errors[0]
    # Nothing usable at all: raised, with every stream's reason.
    message = rejected(intake, Z2M, b'{"temperature": "x", "humidity": "y"}')
    assert "living_room_temperature" in message and "living_room_humidity" in message


def test_a_message_without_the_streams_field_is_ignored_not_bad() -> None:
    """A zigbee2mqtt battery report (or a partial update) does not carry every stream's field: the
    streams without theirs ignore it, which is no error (it used to count as a bad payload)."""
    intake = z2m_intake()
    outcome = intake.parse_detailed(Z2M, b'{"battery": 90, "linkquality": 80}', False, NOW)
    assert outcome.readings == [] and outcome.rejected == []
    assert outcome.ignored == ["living_room_temperature", "living_room_humidity"]
    assert intake.parse(Z2M, b'{"battery": 90}', False, NOW) == []
    outcome = intake.parse_detailed(Z2M, b'{"temperature": 21.5}', False, NOW)
    assert [r.sensor for r in outcome.readings] == ["living_room_temperature"]
    assert outcome.rejected == [] and outcome.ignored == ["living_room_humidity"]
    assert intake.partial_rejections == 0
    # A path through a value of the wrong shape is not "absent": it is refused.
    tasmota = TelemetryIntake([stream(topic=TASMOTA, field="ENERGY.Power.x")])
    assert tasmota.parse_detailed(TASMOTA, TASMOTA_PAYLOAD, False, NOW).rejected[0][0] == "invalid_payload"


def test_every_rejected_field_has_a_reason() -> None:
    """``{"temperature": 150, "humidity": 41}`` with max 80: the humidity is used, the temperature is
    rejected as out_of_range (it used to be dropped with neither a count nor a log line)."""
    intake = z2m_intake(min=-40.0, max=80.0)
    outcome = intake.parse_detailed(Z2M, b'{"temperature": 150, "humidity": 41}', False, NOW)
    assert [(r.sensor, r.value) for r in outcome.readings] == [("living_room_humidity", 41.0)]
    assert [reason for reason, _ in outcome.rejected] == ["out_of_range"]
    assert "above max 80" in outcome.errors[0]
    cases = {b'{"temperature": "ON", "humidity": 1}': "not_a_number",
             b'{"temperature": -50, "humidity": 1}': "out_of_range",
             b"{not json": "invalid_payload",
             b"\xff": "invalid_payload"}
    for payload, reason in cases.items():
        reasons = {r for r, _ in intake.parse_detailed(Z2M, payload, False, NOW).rejected}
        assert reasons == {reason}, payload


def test_zigbee2mqtt_last_seen_and_stale_retained_values() -> None:
    intake = z2m_intake(max_age=600)
    fresh = NOW - 60
    iso = datetime.fromtimestamp(fresh, UTC).isoformat().replace("+00:00", "Z")
    readings = intake.parse(Z2M, json.dumps({"temperature": 20, "humidity": 50, "last_seen": iso}).encode(),
                            True, NOW)
    assert readings[0].time == pytest.approx(fresh)
    # Epoch milliseconds (zigbee2mqtt last_seen: "epoch").
    payload = json.dumps({"temperature": 20, "humidity": 50, "last_seen": int(fresh * 1000)}).encode()
    assert intake.parse(Z2M, payload, True, NOW)[0].time == pytest.approx(fresh)
    # Retained and older than max_age: stale for the stream with max_age 600, not for the other (3600).
    old = datetime.fromtimestamp(NOW - 1200, UTC).isoformat()
    old_payload = json.dumps({"temperature": 20, "humidity": 50, "last_seen": old}).encode()
    outcome = intake.parse_detailed(Z2M, old_payload, True, NOW)
    assert [r.sensor for r in outcome.readings] == ["living_room_humidity"]
    assert "stale retained value" in outcome.errors[0]
    # The same old message live (not retained) is accepted with the reception time.
    live = intake.parse(Z2M, old_payload, False, NOW)
    assert live[0].time == NOW
    # An unparseable timestamp is no timestamp.
    assert one(TelemetryIntake([stream(topic="t", field="v", max_age=1)]), "t",
               b'{"v": 1, "last_seen": "yesterday"}', retained=True) == 1.0


# --- Tasmota ------------------------------------------------------------------------------------------

TASMOTA = "tele/washer_plug/SENSOR"
TASMOTA_PAYLOAD = (b'{"Time": "2024-06-01T11:59:50", "ENERGY": {"TotalStartTime": "2024-01-01T00:00:00", '
                   b'"Total": 12.5, "Power": 12.3, "Voltage": 230}, "AM2301": {"Temperature": 21.5, '
                   b'"Humidity": 40.1}, "TempUnit": "C"}')


def test_tasmota_nested_fields() -> None:
    intake = TelemetryIntake([
        stream(topic="tele/+/SENSOR", field="ENERGY.Power", sensor="washer_power"),
        stream(topic=TASMOTA, field="AM2301.Temperature", sensor="washer_room"),
    ])
    now = datetime(2024, 6, 1, 11, 59, 55).timestamp()  # Tasmota "Time" is the device's local time
    readings = intake.parse(TASMOTA, TASMOTA_PAYLOAD, False, now)
    assert [(r.sensor, r.value) for r in readings] == [("washer_power", 12.3), ("washer_room", 21.5)]
    assert readings[0].time == pytest.approx(now - 5)


@pytest.mark.parametrize(("field", "reason"), [
    ("ENERGY.Power.x", "ENERGY.Power is float"),
    ("TempUnit", "not a number"),
    ("ENERGY", "JSON object"),
    ("Time", "not a number"),
])
def test_tasmota_bad_fields(field: str, reason: str) -> None:
    intake = TelemetryIntake([stream(topic=TASMOTA, field=field)])
    assert reason in rejected(intake, TASMOTA, TASMOTA_PAYLOAD)


def test_tasmota_stale_retained() -> None:
    intake = TelemetryIntake([stream(topic=TASMOTA, field="ENERGY.Power", max_age=3600)])
    with pytest.raises(PayloadError, match="stale retained value"):
        intake.parse(TASMOTA, TASMOTA_PAYLOAD, True, datetime(2024, 6, 1, 14, 0, 0).timestamp())
    assert intake.parse(TASMOTA, TASMOTA_PAYLOAD, True, datetime(2024, 6, 1, 12, 30, 0).timestamp())


def test_array_index_in_path() -> None:
    intake = TelemetryIntake([stream(topic="t", field="values.1")])
    assert one(intake, "t", b'{"values": [1, 2.5]}') == 2.5
    assert "has 1 items" in rejected(intake, "t", b'{"values": [1]}')


# --- statestream and plain numbers -------------------------------------------------------------------

PLAIN = "homestate/sensor/outdoor_temperature/state"


@pytest.mark.parametrize(("payload", "value"), [
    (b"21.5", 21.5), (b'"21.5"', 21.5), (b" 21.5\n", 21.5), (b"-3", -3.0), (b"+4", 4.0),
    (b"1e2", 100.0), (b".5", 0.5), (b"0", 0.0), (b'" 7 "', 7.0),
])
def test_plain_numbers(payload: bytes, value: float) -> None:
    assert one(TelemetryIntake([stream(topic=PLAIN)]), PLAIN, payload) == value


@pytest.mark.parametrize(("payload", "reason"), [
    (b"ON", "not a number"), (b"OFF", "not a number"), (b"true", "boolean"), (b"false", "boolean"),
    (b"null", "null"), (b"unavailable", "not a number"), (b"unknown", "not a number"),
    (b"nan", "not a number"), (b"NaN", "not a number"), (b"inf", "not a number"),
    (b"Infinity", "not a number"), (b'"nan"', "not a number"), (b'"ON"', "not a number"),
    (b"1e999", "not a finite number"), (b"", "not a number"), (b"   ", "not a number"),
    (b"1_000", "not a number"), (b"0x10", "not a number"), ("٣".encode(), "not a number"),
    (b"21.5 C", "not a number"), (b'{"state": 21.5}', "no field configured"), (b"[1]", "JSON array"),
    (b"\x80", "not valid UTF-8"),
])
def test_plain_number_rejects(payload: bytes, reason: str) -> None:
    assert reason in rejected(TelemetryIntake([stream(topic=PLAIN)]), PLAIN, payload)


def test_range_limits_are_inclusive() -> None:
    intake = TelemetryIntake([stream(topic=PLAIN, min=-10, max=40)])
    assert one(intake, PLAIN, b"-10") == -10.0
    assert one(intake, PLAIN, b"40") == 40.0
    assert "below min -10" in rejected(intake, PLAIN, b"-10.5")
    assert "above max 40" in rejected(intake, PLAIN, b"40.01")


# --- size and nesting limits --------------------------------------------------------------------------


def test_oversized_payloads() -> None:
    intake = TelemetryIntake([stream(topic=PLAIN)])
    at_limit = b"21.5".ljust(MAX_PAYLOAD_BYTES, b" ")
    assert one(intake, PLAIN, at_limit) == 21.5
    assert "too large: 65537 bytes" in rejected(intake, PLAIN, at_limit + b" ")
    smaller = TelemetryIntake([stream(topic=PLAIN)], max_payload_bytes=256)
    assert "too large" in rejected(smaller, PLAIN, b"1" * 257)


def test_deep_nesting() -> None:
    intake = TelemetryIntake([stream(topic="t", field="a")])
    ok = b'{"a": 1, "b": ' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}"
    assert one(intake, "t", ok) == 1.0
    too_deep = b'{"a": 1, "b": ' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}"
    assert "nested deeper" in rejected(intake, "t", too_deep)
    assert "nested deeper" in rejected(intake, "t", b"[" * 60000)
    assert "nested deeper" in rejected(intake, "t", b'{"a":' * 10000)
    # Many brackets and a 64 KiB unterminated string of escaped quotes: rejected in linear time.
    assert "invalid JSON" in rejected(intake, "t", (b"[" * 25 + b'"' + b'\\"' * 32000)[:MAX_PAYLOAD_BYTES])
    # Brackets inside strings do not count.
    assert one(intake, "t", json.dumps({"a": 2, "s": "[" * 100 + '\\"{' * 50}).encode()) == 2.0


# --- nothing but PayloadError, whatever the bytes ---------------------------------------------------

FUZZ_STREAMS = [
    stream(topic="f/+", field="temperature", sensor="t", min=-50, max=50, max_age=60),
    stream(topic="f/#", field="ENERGY.Power", sensor="p"),
    stream(topic="f/x", field="values.0", sensor="v"),
    stream(topic="f/x", sensor="plain", min=0),
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["temperature", "ENERGY", "Power", "values", "Time", "last_seen", "x"])
        | st.text(max_size=5),
        children, max_size=4),
    max_leaves=20,
)
fuzz_settings = settings(max_examples=300, deadline=None, database=None, derandomize=True,
                         suppress_health_check=[HealthCheck.too_slow])


def _check(intake: TelemetryIntake, payload: bytes, retained: bool, now: float) -> None:
    try:
        readings = intake.parse("f/x", payload, retained, now)
    except PayloadError as err:
        assert str(err)
        return
    for reading in readings:
        assert math.isfinite(reading.value) and math.isfinite(reading.time)


@fuzz_settings
@given(payload=st.binary(max_size=300), retained=st.booleans(),
       now=st.floats(min_value=0, max_value=4e9))
def test_any_bytes_give_readings_or_payload_error(payload: bytes, retained: bool, now: float) -> None:
    _check(TelemetryIntake(FUZZ_STREAMS), payload, retained, now)


@fuzz_settings
@given(document=json_values, retained=st.booleans(), now=st.floats(min_value=0, max_value=4e9))
def test_any_json_gives_readings_or_payload_error(document: object, retained: bool, now: float) -> None:
    _check(TelemetryIntake(FUZZ_STREAMS), json.dumps(document).encode(), retained, now)


@fuzz_settings
@given(text=st.text(alphabet=st.sampled_from('{}[]":,.0123456789eE+-tnfaluNI \\'), max_size=200))
def test_json_like_text_gives_readings_or_payload_error(text: str) -> None:
    _check(TelemetryIntake(FUZZ_STREAMS), text.encode(), True, NOW)


def test_example_config_streams() -> None:
    config = load_config(REPO / "config.toml")
    intake = TelemetryIntake(config.telemetry)
    assert "zigbee2mqtt/living_room_sensor" in intake.topic_filters()
    payload = b'{"temperature": 21.5, "humidity": 40}'
    readings = intake.parse("zigbee2mqtt/living_room_sensor", payload, False, NOW)
    assert {r.sensor: r.value for r in readings} == {"living_room_temperature": 21.5,
                                                     "living_room_humidity": 40.0}
