"""Telemetry intake: MQTT payloads of configured sensor topics -> validated ``Reading`` records.

Pure: no MQTT client, no threads; the clock is passed in. Accepted payloads:

- zigbee2mqtt JSON objects (``{"temperature": 21.5, "linkquality": 80}``) with ``field = "temperature"``;
- Tasmota ``tele/<topic>/SENSOR`` nested JSON with a dotted field (``"ENERGY.Power"``);
- Home Assistant statestream plain values (``21.5``, also JSON-quoted ``"21.5"``) and plain numbers.

Rejected, with a reason the caller counts (``REJECT_REASONS``): payloads over 64 KiB, invalid UTF-8,
non-JSON where a field is needed, JSON nested deeper than 20 levels (``invalid_payload``); booleans / "ON"
/ other non-numbers, NaN and infinities (``not_a_number``); values outside the stream's [min, max]
(``out_of_range``); retained messages whose own timestamp (Tasmota "Time", zigbee2mqtt "last_seen") is
older than the stream's ``max_age`` (``stale``). A message without the stream's field (a zigbee2mqtt
battery report for a temperature stream) is not an error: the stream ignores it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.config import TelemetryStream
from agent.errors import ConfigError, PayloadError
from agent.messages import Reading
from agent.payloads import (
    MAX_PAYLOAD_BYTES,
    NUMBER_TEXT,
    decode_text,
    get_path,
    json_type_name,
    load_json,
    number_from_json,
    number_from_text,
    parse_timestamp,
    preview,
    split_path,
)
from agent.topics import topic_filter_problem, topic_matches

# Keys under which devices put the time of their measurement: Tasmota, zigbee2mqtt.
TIMESTAMP_KEYS = ("Time", "last_seen")
# A payload timestamp this far ahead of our clock is not trusted as the reading's time.
FUTURE_TOLERANCE = 60.0
ROUTES_MAX = 4096  # topics whose matching streams an intake remembers
# A sensor's mirrored state is published at most this often; a newer value waits for the interval's end.
SENSOR_STATE_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class _Stream:
    config: TelemetryStream
    path: tuple[str, ...] | None  # split ``field``; None for plain-number payloads
    what: str  # the field as error messages name it (made once, not per reading)


# Why a stream refused a reading (diagnostics count each as ``rejected_<reason>``).
REJECT_REASONS = ("invalid_payload", "not_a_number", "out_of_range", "stale")


class RejectedError(PayloadError):
    """A stream refused the reading its message carried; ``reason`` is one of REJECT_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True)
class ParseOutcome:
    """Everything one message produced: readings of the streams it fed, the readings streams refused
    (reason, text), and the streams whose field the message does not carry (not an error: a
    zigbee2mqtt battery report has no temperature)."""

    readings: list[Reading] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        return [text for _reason, text in self.rejected]


class _Document:
    """The payload, decoded at most once however many streams read it."""

    __slots__ = ("_json", "_json_error", "_parsed", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self._parsed = False
        self._json: object = None
        self._json_error: PayloadError | None = None

    def json(self) -> object:
        if not self._parsed:
            self._parsed = True
            try:
                self._json = load_json(self.text)
            except PayloadError as err:
                self._json_error = err
        if self._json_error is not None:
            raise RejectedError("invalid_payload", str(self._json_error))
        return self._json


class StateThrottle:
    """At most one state message per sensor and ``interval`` seconds; the latest value held back in between
    is handed out by ``due`` once its interval has passed, unless it is the value last handed out.
    Thread-safe (readings arrive on paho's thread, ``due`` runs on a timer)."""

    def __init__(self, interval: float = SENSOR_STATE_INTERVAL) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._sent: dict[str, tuple[float, str]] = {}  # sensor -> when (monotonic) and what was handed out
        self._held: dict[str, str] = {}  # sensor -> its latest value, waiting

    def offer(self, sensor: str, value: str, now: float) -> bool:
        """True: publish ``value`` now; False: it is held (``due`` hands it out later) or already out."""
        with self._lock:
            when, sent = self._sent.get(sensor, (-math.inf, ""))
            if now - when >= self.interval:
                self._sent[sensor] = (now, value)
                self._held.pop(sensor, None)
                return True
            if value == sent:
                self._held.pop(sensor, None)  # back to the state already out
            else:
                self._held[sensor] = value
            return False

    def holding(self) -> bool:
        """Whether a value is held back (``due`` will hand it out)."""
        with self._lock:
            return bool(self._held)

    def due(self, now: float) -> list[tuple[str, str]]:
        """The held values whose sensor's interval has passed (each handed out once)."""
        with self._lock:
            ready = [(sensor, value) for sensor, value in self._held.items()
                     if now - self._sent[sensor][0] >= self.interval]
            for sensor, value in ready:
                del self._held[sensor]
                self._sent[sensor] = (now, value)
            return ready


class TelemetryIntake:
    """Routes payloads of the configured telemetry topics to their streams and validates them."""

    def __init__(
        self, streams: Sequence[TelemetryStream], *, max_payload_bytes: int = MAX_PAYLOAD_BYTES
    ) -> None:
        compiled: list[_Stream] = []
        for index, stream in enumerate(streams):
            problem = topic_filter_problem(stream.topic)
            if problem is not None:
                raise ConfigError(f"telemetry.{index}.topic: {problem}: {stream.topic!r}")
            path: tuple[str, ...] | None = None
            if stream.field is not None:
                try:
                    path = split_path(stream.field)
                except ValueError as err:
                    raise ConfigError(f"telemetry.{index}.field: {err}: {stream.field!r}") from err
            compiled.append(_Stream(stream, path, f"field {stream.field!r}"))
        self._streams = tuple(compiled)
        # topic -> its streams (matching every stream's filter per message cost more than the parsing);
        # bounded: cleared when it holds ROUTES_MAX topics
        self._routes: dict[str, tuple[_Stream, ...]] = {}
        self._max_payload_bytes = max_payload_bytes
        # Messages some streams accepted while others on the same topic refused them (not raised, see parse).
        self.partial_rejections = 0

    def topic_filters(self) -> list[str]:
        """The subscription filters, each once, in config order."""
        return list(dict.fromkeys(stream.config.topic for stream in self._streams))

    def _streams_of(self, topic: str) -> tuple[_Stream, ...]:
        streams = self._routes.get(topic)
        if streams is None:
            if len(self._routes) >= ROUTES_MAX:
                self._routes = {}
            streams = self._routes[topic] = tuple(
                stream for stream in self._streams if topic_matches(stream.config.topic, topic))
        return streams

    def parse(self, topic: str, payload: bytes, retained: bool, now: float) -> list[Reading]:
        """Readings for every configured stream fed by this message (``now``: wall-clock seconds).

        Raises PayloadError when streams refused the message and none accepted it. When some streams
        accept it and others refuse it, the accepted readings are returned and ``partial_rejections`` is
        incremented; use ``parse_detailed`` to see the reasons. A topic no stream listens to, or a message
        that carries none of its streams' fields, gives [].
        """
        outcome = self.parse_detailed(topic, payload, retained, now)
        if outcome.rejected and not outcome.readings:
            raise PayloadError("; ".join(outcome.errors))
        if outcome.rejected:
            self.partial_rejections += 1
        return outcome.readings

    def parse_detailed(self, topic: str, payload: bytes, retained: bool, now: float) -> ParseOutcome:
        """Like ``parse``, but reports each refusing stream's reason instead of raising."""
        outcome = ParseOutcome()
        streams = self._streams_of(topic)
        if not streams:
            return outcome
        try:
            document = _Document(decode_text(payload, self._max_payload_bytes))
        except PayloadError as err:
            outcome.rejected += [("invalid_payload", f"{topic} -> {stream.config.sensor}: {err}")
                                 for stream in streams]
            return outcome
        for stream in streams:
            try:
                reading = self._read(stream, document, topic, retained, now)
            except RejectedError as err:
                outcome.rejected.append((err.reason, f"{topic} -> {stream.config.sensor}: {err}"))
                continue
            if reading is None:
                outcome.ignored.append(stream.config.sensor)
            else:
                outcome.readings.append(reading)
        return outcome

    def _read(self, stream: _Stream, document: _Document, topic: str, retained: bool,
              now: float) -> Reading | None:
        """The stream's reading; None when the message does not carry the stream's field. Raises
        RejectedError."""
        config = stream.config
        timestamp: float | None = None
        if stream.path is None:
            value = _plain_number(document)
        else:
            data = document.json()
            if not isinstance(data, dict):
                raise RejectedError("invalid_payload", f"expected a JSON object with field {config.field!r}, "
                                                       f"got {json_type_name(data)}")
            try:
                raw = get_path(data, stream.path)
            except PayloadError as err:
                if _lacks_key(data, stream.path):
                    return None
                raise RejectedError("invalid_payload", str(err)) from err
            try:
                value = number_from_json(raw, stream.what)
            except PayloadError as err:
                raise RejectedError("not_a_number", str(err)) from err
            timestamp = _own_timestamp(data)
        if config.min is not None and value < config.min:
            raise RejectedError("out_of_range", f"value {value:g} is below min {config.min:g}")
        if config.max is not None and value > config.max:
            raise RejectedError("out_of_range", f"value {value:g} is above max {config.max:g}")
        reading_time = now
        if timestamp is not None:
            age = now - timestamp
            if retained and age > config.max_age:
                raise RejectedError("stale", f"stale retained value: measured {age:.0f} s ago "
                                             f"(max_age {config.max_age:g} s)")
            if -FUTURE_TOLERANCE <= age <= config.max_age:
                reading_time = timestamp
        return Reading(sensor=config.sensor, value=value, time=reading_time, topic=topic)


def _plain_number(document: _Document) -> float:
    text = document.text.strip(" \t\r\n")
    try:
        if NUMBER_TEXT.fullmatch(text):
            return number_from_text(text)
        try:
            data = document.json()  # a JSON-quoted statestream value, or JSON that is not a number
        except PayloadError as err:
            raise PayloadError(f"not a number: {preview(text)}") from err
        if isinstance(data, dict):
            raise RejectedError("invalid_payload",
                                "payload is a JSON object but the stream has no field configured")
        return number_from_json(data)
    except RejectedError:
        raise
    except PayloadError as err:
        raise RejectedError("not_a_number", str(err)) from err


def _lacks_key(data: object, path: tuple[str, ...]) -> bool:
    """Whether following ``path`` stops at an object without the next key (the message simply does not
    carry this field), rather than at a value of the wrong shape."""
    current = data
    for key in path:
        if isinstance(current, dict):
            if key not in current:
                return True
            current = current[key]
        elif isinstance(current, list) and key.isascii() and key.isdigit() and int(key) < len(current):
            current = current[int(key)]
        else:
            return False
    return False


def _own_timestamp(data: dict[str, object]) -> float | None:
    for key in TIMESTAMP_KEYS:
        if key in data:
            timestamp = parse_timestamp(data[key])
            if timestamp is not None:
                return timestamp
    return None
