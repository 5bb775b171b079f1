"""Strict decoding of incoming MQTT payloads, shared by telemetry intake and action state tracking.

Pure functions. Every problem raises ``PayloadError`` with a message a person can act on; nothing else
escapes, whatever the bytes (the callers count the error and carry on).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from agent.errors import PayloadError

MAX_PAYLOAD_BYTES = 64 * 1024
MAX_JSON_DEPTH = 20  # zigbee2mqtt and Tasmota payloads nest 3-4 levels; deeper is garbage or an attack
# ASCII decimal only: float() alone would also take "1_000", "nan", "infinity" and non-ASCII digits.
NUMBER_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_ASCII_SPACE = " \t\r\n"
# Epoch numbers above this are milliseconds (zigbee2mqtt last_seen "epoch"); 1e11 s is the year 5138.
_EPOCH_MS_THRESHOLD = 1e11


def preview(value: object, limit: int = 40) -> str:
    """A short repr for error messages (payloads can be 64 KiB)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def decode_text(payload: bytes, limit: int = MAX_PAYLOAD_BYTES) -> str:
    """The payload as text: at most ``limit`` bytes of valid UTF-8."""
    if len(payload) > limit:
        raise PayloadError(f"payload too large: {len(payload)} bytes (limit {limit})")
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PayloadError(f"payload is not valid UTF-8 (bad byte at offset {err.start})") from err


def _deeper_than(document: object, limit: int) -> bool:
    """Whether containers nest more than ``limit`` levels (iterative: linear time, no recursion)."""
    stack: list[tuple[object, int]] = [(document, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Iterable[object] = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number")


# One decoder for every payload: ``json.loads`` with ``parse_constant`` builds a new one per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def load_json(text: str) -> Any:
    """Parse JSON, refusing NaN/Infinity literals and nesting deeper than MAX_JSON_DEPTH."""
    try:
        if text.startswith("\ufeff"):  # as json.loads: the decoder itself would only say "Expecting value"
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        document = _DECODER.decode(text)
    except RecursionError as err:  # the C scanner stops at the interpreter's recursion limit
        raise PayloadError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from err
    except ValueError as err:  # JSONDecodeError, NaN/Infinity, integers past Python's digit limit
        raise PayloadError(f"invalid JSON: {err}") from err
    # Counting brackets first keeps the common small payload free of the walk.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _deeper_than(document, MAX_JSON_DEPTH):
        raise PayloadError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return document


def json_type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, list):
        return "a JSON array"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__


def number_from_text(text: str, what: str = "value") -> float:
    """A finite number from plain text such as ``21.5`` (surrounding whitespace allowed)."""
    stripped = text.strip(_ASCII_SPACE)
    if not NUMBER_TEXT.fullmatch(stripped):
        raise PayloadError(f"{what} is not a number: {preview(stripped)}")
    number = float(stripped)
    if not math.isfinite(number):
        raise PayloadError(f"{what} is not a finite number: {preview(stripped)}")
    return number


def number_from_json(value: object, what: str = "value") -> float:
    """A finite number from a decoded JSON value: a number or a numeric string; never a boolean."""
    if isinstance(value, bool):
        raise PayloadError(f"{what} is a boolean, not a number")
    if isinstance(value, int):
        try:
            number = float(value)
        except OverflowError as err:
            raise PayloadError(f"{what} is too large") from err
    elif isinstance(value, float):
        number = value
    elif isinstance(value, str):
        return number_from_text(value, what)
    else:
        raise PayloadError(f"{what} is {json_type_name(value)}, not a number")
    if not math.isfinite(number):
        raise PayloadError(f"{what} is not a finite number")
    return number


def split_path(path: str) -> tuple[str, ...]:
    """Split a dotted JSON path ("ENERGY.Power"); raises ValueError for empty parts."""
    parts = tuple(path.split("."))
    if any(not part for part in parts):
        raise ValueError("JSON path has an empty part (two dots, or a dot at an end)")
    return parts


def get_path(document: object, path: Sequence[str]) -> object:
    """Follow a split dotted path through JSON objects (and arrays, by decimal index)."""
    current = document
    for depth, key in enumerate(path):
        if isinstance(current, dict):
            if key not in current:
                raise PayloadError(f"missing field {'.'.join(path)!r} (no {key!r} in {_where(path, depth)})")
            current = current[key]
        elif isinstance(current, list) and key.isascii() and key.isdigit():
            index = int(key)
            if index >= len(current):
                raise PayloadError(f"missing field {'.'.join(path)!r} ({_where(path, depth)} has "
                                   f"{len(current)} items)")
            current = current[index]
        else:
            raise PayloadError(f"missing field {'.'.join(path)!r} ({_where(path, depth)} is "
                               f"{json_type_name(current)})")
    return current


def _where(path: Sequence[str], depth: int) -> str:
    """Where in the document the key at ``depth`` of ``path`` was looked for (error messages only)."""
    return ".".join(path[:depth]) or "payload"


def parse_timestamp(raw: object) -> float | None:
    """UNIX seconds from a payload's own timestamp, or None when it has no usable one.

    Accepts ISO 8601 text (Tasmota "Time" is local time without offset; zigbee2mqtt "last_seen" has an
    offset or "Z") and epoch numbers (zigbee2mqtt "epoch": milliseconds).
    """
    if isinstance(raw, bool):
        return None
    if isinstance(raw, (int, float)):
        try:
            seconds = float(raw)
        except OverflowError:
            return None
        if not math.isfinite(seconds) or seconds <= 0:
            return None
        return seconds / 1000.0 if seconds > _EPOCH_MS_THRESHOLD else seconds
    if isinstance(raw, str) and 0 < len(raw) <= 64:
        try:
            return datetime.fromisoformat(raw.strip()).timestamp()  # naive = local time, as Tasmota sends
        except (ValueError, OverflowError, OSError):
            return None
    return None
