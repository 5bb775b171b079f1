"""``home-agent anomaly-score``: score ``timestamp,value`` CSV files strictly online, as fast as possible.

Each input file is one stream, scored by the same detector the daemon runs (``agent.anomaly``), in row
order: a row's score depends only on the rows above it, so appending rows never changes earlier scores.
Rows are processed in blocks (one model invocation per 256 rows) for speed; the result does not depend on
the block size.

Input: a header naming ``timestamp`` and ``value`` columns (any order, other columns ignored; without a
recognisable header the first two columns are used). Timestamps: ISO 8601 (``2024-01-31T12:00:00``,
with or without ``Z``/offset) or ``YYYY-MM-DD HH:MM:SS`` (fractions allowed), or UNIX seconds. Times
without a zone are taken as the sensor's local wall clock (time of day as written).

Output: ``timestamp,value,anomaly_score`` with the input's timestamp and value text unchanged and the
score in [0, 1] written with ``repr`` (full precision). One output row per input data row.

Bad rows (an unparseable or non-finite value, an unparseable timestamp) are **scored as missing
readings**: the detector does not learn from them; their score is the stream's last score, or the
dropout score of the time since the last good reading when that is higher. They are counted and the first
few are reported with their line numbers; they never stop the run.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.anomaly import AnomalyModel, StreamDetector
from agent.config import AnomalySection
from agent.errors import HomeAgentError
from agent.paths import resolve_data_path
from agent.progress import progress

log = logging.getLogger(__name__)

BLOCK_ROWS = 4096
REPORTED_BAD_ROWS = 5
OUTPUT_HEADER = ("timestamp", "value", "anomaly_score")
_UTC = dt.UTC
_EPOCH = dt.datetime(1970, 1, 1)


@dataclass
class FileResult:
    input: Path
    output: Path
    rows: int = 0
    bad_rows: int = 0
    seconds: float = 0.0


def parse_timestamp(text: str) -> tuple[float, float]:
    """(UNIX seconds, fraction of the local day) of an ISO / ``YYYY-MM-DD HH:MM:SS`` / epoch timestamp.
    Raises ValueError."""
    text = text.strip()
    try:
        stamp = dt.datetime.fromisoformat(text)
    except ValueError:
        seconds = float(text)  # UNIX seconds; raises ValueError when it is not a number either
        if not math.isfinite(seconds):
            raise ValueError(f"not a time: {text!r}") from None
        return seconds, (seconds % 86400.0) / 86400.0
    tod = (stamp.hour * 3600 + stamp.minute * 60 + stamp.second + stamp.microsecond * 1e-6) / 86400.0
    if stamp.tzinfo is None:
        return (stamp - _EPOCH).total_seconds(), tod
    return stamp.timestamp(), tod


def parse_value(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {text!r}")
    return value


def _columns(header: list[str]) -> tuple[int, int] | None:
    names = [h.strip().strip('"').lower() for h in header]
    if "timestamp" in names and "value" in names:
        return names.index("timestamp"), names.index("value")
    return None


def score_file(model: AnomalyModel, config: AnomalySection, source: Path, target: Path) -> FileResult:
    """Score one CSV into another. Raises HomeAgentError when a file cannot be read or written."""
    result = FileResult(source, target)
    started = time.perf_counter()
    detector = StreamDetector(model, config)
    try:
        handle = source.open(newline="", encoding="utf-8-sig")
    except OSError as err:
        raise HomeAgentError(f"cannot read {source}: {err.strerror}") from err
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        out = target.open("w", newline="", encoding="utf-8")
    except OSError as err:
        handle.close()
        raise HomeAgentError(f"cannot write {target}: {err.strerror}") from err
    with handle, out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(OUTPUT_HEADER)
        try:
            for block in _blocks(csv.reader(handle), source, result):
                times, tods, values, texts = block
                scored = detector.process(times, tods, values)
                writer.writerows((ts, val, repr(score)) for (ts, val), score in
                                 zip(texts, scored.scores.tolist(), strict=True))
        except (csv.Error, UnicodeDecodeError) as err:
            raise HomeAgentError(f"{source}: not a readable CSV file: {err}") from err
        except OSError as err:
            raise HomeAgentError(f"cannot write {target}: {err.strerror}") from err
    result.seconds = time.perf_counter() - started
    if result.bad_rows:
        log.warning("%s: %d of %d rows had a bad timestamp or value and were scored as missing readings",
                    source, result.bad_rows, result.rows)
    return result


Block = tuple[list[float], list[float], list[float], list[tuple[str, str]]]


def _blocks(reader: Iterator[list[str]], source: Path, result: FileResult) -> Iterator[Block]:
    ts_col, value_col = 0, 1
    times: list[float] = []
    tods: list[float] = []
    values: list[float] = []
    texts: list[tuple[str, str]] = []
    nan = math.nan
    first = True
    for row in reader:
        if first:
            first = False
            columns = _columns(row)
            if columns is not None:
                ts_col, value_col = columns
                continue
            log.warning("%s: no 'timestamp,value' header; using the first two columns", source)
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        result.rows += 1
        ts_text = row[ts_col] if len(row) > ts_col else ""
        value_text = row[value_col] if len(row) > value_col else ""
        try:
            t, tod = parse_timestamp(ts_text)
        except (ValueError, OverflowError):
            t, tod = nan, 0.0
            _bad(source, result, reader, f"bad timestamp {ts_text!r}")
        try:
            value = parse_value(value_text)
        except ValueError:
            value = nan
            if not math.isnan(t):
                _bad(source, result, reader, f"bad value {value_text!r}")
        times.append(t)
        tods.append(tod)
        values.append(value)
        texts.append((ts_text, value_text))
        if len(times) >= BLOCK_ROWS:
            yield times, tods, values, texts
            times, tods, values, texts = [], [], [], []
    if times:
        yield times, tods, values, texts


def _bad(source: Path, result: FileResult, reader: Iterator[list[str]], what: str) -> None:
    result.bad_rows += 1
    if result.bad_rows <= REPORTED_BAD_ROWS:
        line = getattr(reader, "line_num", "?")
        log.warning("%s line %s: %s; scored as a missing reading", source, line, what)


def pair_paths(inputs: list[Path], outputs: list[Path]) -> list[tuple[Path, Path]]:
    """--input/--output pairs; a folder input means every *.csv inside, written under the output folder."""
    if len(inputs) != len(outputs):
        raise HomeAgentError(f"{len(inputs)} --input but {len(outputs)} --output: give one output per input")
    pairs: list[tuple[Path, Path]] = []
    for source, target in zip(inputs, outputs, strict=True):
        if source.is_dir():
            files = sorted(p for p in source.iterdir() if p.suffix.lower() == ".csv" and p.is_file())
            if not files:
                log.warning("%s: no *.csv files", source)
            if target.exists() and not target.is_dir():
                raise HomeAgentError(f"--input {source} is a folder, so --output {target} must be one too")
            pairs += [(f, target / f.name) for f in files]
        elif source.is_file():
            pairs.append((source, target / source.name if target.is_dir() else target))
        else:
            raise HomeAgentError(f"input not found: {source}")
    return pairs


def load_default_model(path: Path | None) -> AnomalyModel:
    return AnomalyModel.load(path if path is not None else resolve_data_path(Path("models/anomaly.tflite")))


def anomaly_score_main(args: argparse.Namespace) -> int:
    pairs = pair_paths(list(args.input), list(args.output))
    model = load_default_model(args.model)
    config = AnomalySection()
    total_rows = total_bad = 0
    started = time.perf_counter()
    for source, target in progress(pairs, desc="anomaly-score", unit="file"):
        result = score_file(model, config, source, target)
        total_rows += result.rows
        total_bad += result.bad_rows
        log.info("%s -> %s: %d rows (%d bad) in %.2f s", source, target, result.rows, result.bad_rows,
                 result.seconds)
    elapsed = time.perf_counter() - started
    print(f"scored {total_rows} rows in {len(pairs)} files ({total_bad} bad rows scored as missing) in "
          f"{elapsed:.2f} s ({total_rows / elapsed if elapsed > 0 else 0:.0f} rows/s)", file=sys.stderr)
    return 0
