"""``home-agent anomaly-score``: score ``timestamp,value`` CSV files strictly online, as fast as possible.

Each input file is one stream, scored row by row by the daemon's own detector
(``agent.anomaly.StreamDetector.update``, the code path the daemon's stage runs): a row's score depends only
on the rows above it, so appending rows never changes earlier scores.

Output: ``timestamp,value,anomaly_score,alert``: the input's timestamp and value text unchanged, the
calibrated probability that the reading is anomalous (``repr``, full precision) and ``alert`` = 1 on the
rows where the daemon would publish a new alert, 0 elsewhere. One output row per input data row. The output
is written to a temporary file next to it and renamed into place once complete; an output that is one of
the inputs (also through a link) is refused.

Errors (exit status 2, the file and line named, nothing written for that file): an empty file, a file with
no ``timestamp`` and ``value`` columns in its header line (a missing or wrong header, or a separator other
than the comma), a file with a header and no rows.

Counted warnings (the run goes on; the first few are reported with their line numbers, then a count): a
row with an unreadable timestamp or value (text, NaN, infinity), and a row whose time is not after the
previous row's (time going backwards, or a duplicate). Such rows are not learnt: they get the stream's
last score and ``alert`` 0.

Device groups (``--group``): the input files are the streams of one device (``score_group``): merged by
time, rows with one timestamp are one tick of ``agent.anomaly.group.GroupDetector`` (the daemon's group
code); each file keeps its own scores and alerts, and a device alert puts ``alert`` = 1 on the rows of the
streams it names. One output per input.

Timestamps: ISO 8601 (``2024-01-31T12:00:00``, with or without ``Z``/offset), ``YYYY-MM-DD HH:MM:SS``
(fractions allowed), or UNIX seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import heapq
import logging
import math
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.anomaly import StreamDetector
from agent.anomaly.detector import TUNING, Tuning
from agent.anomaly.group import GROUP_TUNING, GroupDetector, GroupOutcome, GroupTuning
from agent.atomic_file import replace_atomically
from agent.config import AnomalySection
from agent.errors import HomeAgentError
from agent.progress import progress

log = logging.getLogger(__name__)

EXIT_INPUT = 2  # like a configuration error: the user must fix the input
REPORTED_ROWS = 5  # warnings of each kind reported with their line numbers
OUTPUT_HEADER = ("timestamp", "value", "anomaly_score", "alert")
_EPOCH = dt.datetime(1970, 1, 1)


class InputError(HomeAgentError):
    """An input or output the user must fix (exit status 2)."""


@dataclass
class FileResult:
    input: Path
    output: Path
    rows: int = 0
    alerts: int = 0
    warnings: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def parse_timestamp(text: str) -> float:
    """UNIX seconds of an ISO / ``YYYY-MM-DD HH:MM:SS`` / epoch timestamp (no zone: taken as UTC, only
    differences matter). Raises ValueError."""
    text = text.strip()
    try:
        stamp = dt.datetime.fromisoformat(text)
    except ValueError:
        seconds = float(text)  # UNIX seconds; raises ValueError when it is not a number either
        if not math.isfinite(seconds):
            raise ValueError(f"not a time: {text!r}") from None
        return seconds
    if stamp.tzinfo is None:
        return (stamp - _EPOCH).total_seconds()
    return stamp.timestamp()


def _header(row: list[str], source: Path, line: int) -> tuple[int, int]:
    """The timestamp and value column indexes of the header line; InputError naming what is wrong."""
    names = [h.strip().strip('"').lower() for h in row]
    if "timestamp" in names and "value" in names:
        return names.index("timestamp"), names.index("value")
    if len(row) == 1:
        for separator in (";", "\t", "|"):
            if separator in row[0]:
                raise InputError(f"{source} line {line}: one column {row[0]!r}: the separator must be a "
                                 f"comma, not {separator!r}")
    raise InputError(f"{source} line {line}: the header must name 'timestamp' and 'value' columns; found "
                     f"{','.join(row)!r}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def score_file(config: AnomalySection, source: Path, target: Path) -> FileResult:
    """Score one CSV into another (temporary file, then rename). Raises InputError."""
    if _same_file(source, target):
        raise InputError(f"--output {target} is the input {source}: it would be overwritten")
    result = FileResult(source, target)
    started = time.perf_counter()
    try:
        handle = source.open(newline="", encoding="utf-8-sig")
    except OSError as err:
        raise InputError(f"cannot read {source}: {err.strerror}") from err
    try:
        with handle:
            target.parent.mkdir(parents=True, exist_ok=True)
            with replace_atomically(target, "w", newline="", encoding="utf-8") as out:
                writer = csv.writer(out, lineterminator="\n")
                writer.writerow(OUTPUT_HEADER)
                try:
                    writer.writerows(_score_rows(StreamDetector(config), csv.reader(handle), source, result))
                except (csv.Error, UnicodeDecodeError) as err:
                    raise InputError(f"{source}: not a readable CSV file: {err}") from err
    except OSError as err:
        raise InputError(f"cannot write {target}: {err.strerror}") from err
    result.seconds = time.perf_counter() - started
    for what, count in result.warnings.items():
        log.warning("%s: %d of %d rows: %s (not learnt, alert 0)", source, count, result.rows, what)
    return result


REFUSED = {"time_backwards": "time going backwards", "duplicate_time": "duplicate timestamp"}


# (merge time, file, row, timestamp text, value text, time, value)
ParsedRow = tuple[float, int, int, str, str, float | None, float | None]


def _parsed_rows(index: int, reader: Iterator[list[str]], source: Path,
                 result: FileResult) -> Iterator[ParsedRow]:
    """A file's rows as (merge time, file, row, timestamp text, value text, time, value); an unreadable
    row has time and value None and the file's previous time as its merge time (it keeps its place)."""
    columns: tuple[int, int] | None = None
    last = -math.inf
    for row in reader:
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if columns is None:
            columns = _header(row, source, getattr(reader, "line_num", 1))
            ts_col, value_col = columns
            continue
        result.rows += 1
        ts_text = row[ts_col] if len(row) > ts_col else ""
        value_text = row[value_col] if len(row) > value_col else ""
        try:
            t = parse_timestamp(ts_text)
            value = float(value_text)
        except (ValueError, OverflowError):
            _warn(result, source, reader, "unreadable timestamp or value", f"{ts_text!r}, {value_text!r}")
            yield last, index, result.rows, ts_text, value_text, None, None
            continue
        last = t if t > last else last
        yield last, index, result.rows, ts_text, value_text, t, value
    if columns is None:
        raise InputError(f"{source}: empty: no header and no rows")
    if result.rows == 0:
        raise InputError(f"{source}: a header and no rows")


def _score_rows(detector: StreamDetector, reader: Iterator[list[str]], source: Path,
                result: FileResult) -> Iterator[tuple[str, str, str, str]]:
    update = detector.update
    state = detector.state
    for _, _, _, ts_text, value_text, t, value in _parsed_rows(0, reader, source, result):
        if t is None or value is None:  # unreadable: _parsed_rows warned
            yield ts_text, value_text, repr(state.score), "0"
            continue
        outcome = update(t, value)
        if outcome is None:
            _warn(result, source, reader, REFUSED.get(detector.last_rejection, "not a finite number"),
                  f"{ts_text!r}, {value_text!r}")
            yield ts_text, value_text, repr(state.score), "0"
            continue
        if outcome.started:
            result.alerts += 1
        yield ts_text, value_text, repr(outcome.score), "1" if outcome.started else "0"


# ------------------------------------------------------------------------------------------ device groups


class _Row:
    """One input row of a group's file, held until its tick is decided (the group may name its stream)."""

    __slots__ = ("alert", "file", "score", "tick", "ts_text", "value_text")

    def __init__(self, file: int, ts_text: str, value_text: str, *, score: float, alert: bool,
                 tick: float) -> None:
        self.file, self.ts_text, self.value_text = file, ts_text, value_text
        self.score, self.alert, self.tick = score, alert, tick


def score_group(config: AnomalySection, pairs: list[tuple[Path, Path]], name: str = "group", *,
                tuning: Tuning = TUNING,
                group_tuning: GroupTuning = GROUP_TUNING) -> tuple[list[FileResult], dict[str, int]]:
    """Score several CSVs as the streams of one device group (``agent.anomaly.group``), one output per
    input: each stream's own alerts as in ``score_file``, and ``alert`` = 1 on the rows of the streams the
    group's alert names. The files are merged by time (rows with one timestamp are one tick; a file's own
    order is kept). Returns each file's result and the group's counters. Raises InputError."""
    if len(pairs) < 2:
        raise InputError(f"--group needs at least two input files, got {len(pairs)}")
    names = [source.stem for source, _ in pairs]
    if len(set(names)) != len(names):
        raise InputError("--group: two inputs have the same file name: " + ", ".join(names))
    every_input = [source for source, _ in pairs]
    for _, target in pairs:
        for source in every_input:
            if _same_file(source, target):
                raise InputError(f"--output {target} is the input {source}: it would be overwritten")
    started = time.perf_counter()
    results = [FileResult(source, target) for source, target in pairs]
    group = GroupDetector(name, names, config, tuning, group_tuning)
    detectors = [StreamDetector(config, tuning=tuning) for _ in pairs]
    with contextlib.ExitStack() as stack:
        readers: list[Iterator[ParsedRow]] = []
        writers: list[Any] = []
        for (source, target), result in zip(pairs, results, strict=True):
            try:
                handle = stack.enter_context(source.open(newline="", encoding="utf-8-sig"))
            except OSError as err:
                raise InputError(f"cannot read {source}: {err.strerror}") from err
            readers.append(_parsed_rows(len(readers), csv.reader(handle), source, result))
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                out = stack.enter_context(replace_atomically(target, "w", newline="", encoding="utf-8"))
            except OSError as err:
                raise InputError(f"cannot write {target}: {err.strerror}") from err
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(OUTPUT_HEADER)
            writers.append(writer)
        try:
            _score_merged(group, detectors, heapq.merge(*readers), writers, results)
        except (csv.Error, UnicodeDecodeError) as err:
            raise InputError(f"group {name}: not a readable CSV file: {err}") from err
    elapsed = time.perf_counter() - started
    for result in results:
        result.seconds = elapsed
        for what, count in result.warnings.items():
            log.warning("%s: %d of %d rows: %s (not learnt, alert 0)", result.input, count, result.rows, what)
    return results, dict(group.counters)


def _score_merged(group: GroupDetector, detectors: list[StreamDetector], merged: Iterator[ParsedRow],
                  writers: list[Any], results: list[FileResult]) -> None:
    names = group.members
    held: deque[_Row] = deque()
    index_of = {name: i for i, name in enumerate(names)}

    def mark(outcome: GroupOutcome | None) -> None:
        if outcome is None or not outcome.started:
            return
        named = {index_of[sensor] for sensor in outcome.contributors}
        for row in held:
            if row.tick == outcome.time and row.file in named:
                row.alert = True

    def release() -> None:
        # rows of the open tick wait for its decision; the rows before it are final
        open_tick = group.tick_time if group.pending else None
        while held and (open_tick is None or held[0].tick != open_tick):
            row = held.popleft()
            results[row.file].alerts += row.alert
            alert = "1" if row.alert else "0"
            writers[row.file].writerow((row.ts_text, row.value_text, repr(row.score), alert))

    for _key, file, _seq, ts_text, value_text, t, value in merged:
        detector = detectors[file]
        if t is None or value is None:
            held.append(_Row(file, ts_text, value_text, score=detector.state.score, alert=False,
                             tick=math.nan))
            release()
            continue
        outcome = detector.update(t, value)
        if outcome is None:
            _warn(results[file], results[file].input, iter(()),
                  REFUSED.get(detector.last_rejection, "not a finite number"), f"{ts_text!r}, {value_text!r}")
            group.refused()
            held.append(_Row(file, ts_text, value_text, score=detector.state.score, alert=False,
                             tick=math.nan))
            release()
            continue
        held.append(_Row(file, ts_text, value_text, score=outcome.score, alert=outcome.started, tick=t))
        mark(group.observe(names[file], t, detector.decades))
        release()
    mark(group.flush())
    release()


def _warn(result: FileResult, source: Path, reader: Iterator[list[str]], what: str, detail: str) -> None:
    count = result.warnings[what] = result.warnings.get(what, 0) + 1
    if count <= REPORTED_ROWS:
        log.warning("%s line %s: %s (%s); not learnt", source, getattr(reader, "line_num", "?"), what, detail)


def pair_paths(inputs: list[Path], outputs: list[Path]) -> list[tuple[Path, Path]]:
    """--input/--output pairs; a folder input means every *.csv inside, written under the output folder."""
    if len(inputs) != len(outputs):
        raise InputError(f"{len(inputs)} --input but {len(outputs)} --output: give one output per input")
    pairs: list[tuple[Path, Path]] = []
    for source, target in zip(inputs, outputs, strict=True):
        if source.is_dir():
            files = sorted(p for p in source.iterdir() if p.suffix.lower() == ".csv" and p.is_file())
            if not files:
                log.warning("%s: no *.csv files", source)
            if target.exists() and not target.is_dir():
                raise InputError(f"--input {source} is a folder, so --output {target} must be one too")
            pairs += [(f, target / f.name) for f in files]
        elif source.is_file():
            pairs.append((source, target / source.name if target.is_dir() else target))
        else:
            raise InputError(f"input not found: {source}")
    every_input = [source for source, _ in pairs]
    for _, target in pairs:
        for source in every_input:
            if _same_file(source, target):
                raise InputError(f"--output {target} is the input {source}: it would be overwritten")
    return pairs


def anomaly_score_main(args: argparse.Namespace) -> int:
    config = AnomalySection()
    total_rows = total_alerts = total_warnings = files = 0
    started = time.perf_counter()
    try:
        pairs = pair_paths(list(args.input), list(args.output))
        files = len(pairs)
        if getattr(args, "group", False):
            results, counters = score_group(config, pairs)
            for result in results:
                total_rows += result.rows
                total_alerts += result.alerts
                total_warnings += sum(result.warnings.values())
            log.info("group of %d files: %s", len(pairs), counters)
            pairs = []
        for source, target in progress(pairs, desc="anomaly-score", unit="file"):
            result = score_file(config, source, target)
            total_rows += result.rows
            total_alerts += result.alerts
            total_warnings += sum(result.warnings.values())
            log.info("%s -> %s: %d rows, %d alerts in %.2f s", source, target, result.rows, result.alerts,
                     result.seconds)
    except InputError as err:
        print(f"home-agent: {err}", file=sys.stderr)
        return EXIT_INPUT
    elapsed = time.perf_counter() - started
    print(f"scored {total_rows} rows in {files} files: {total_alerts} alerts, {total_warnings} rows "
          f"with warnings (not learnt), in {elapsed:.2f} s ({total_rows / elapsed if elapsed > 0 else 0:.0f} "
          "rows/s)", file=sys.stderr)
    return 0
