"""``home-agent anomaly-score``: the CSV contract (header, one row out per row in, scores in [0, 1] at full
precision, strictly online), bad rows, several files and folders, clear errors. Runs the real CLI."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from agent.anomaly_score import parse_timestamp

T0 = 1_700_000_000.0


def write_stream(path: Path, rows: int = 3000, *, interval: float = 60.0, seed: int = 2,
                 spike_at: int | None = None, iso_t: bool = False) -> list[tuple[str, str]]:
    """A 1-minute office temperature made here: daily cycle plus noise, 0.01 resolution."""
    rng = np.random.default_rng(seed)
    times = T0 + np.arange(rows) * interval
    values = np.round(21 + 1.5 * np.sin(2 * np.pi * (times % 86400) / 86400) + rng.normal(0, 0.03, rows), 2)
    if spike_at is not None:
        values[spike_at] += 6.0
    fmt = "%Y-%m-%dT%H:%M:%S" if iso_t else "%Y-%m-%d %H:%M:%S"
    import datetime as dt

    data = [(dt.datetime.fromtimestamp(t, dt.UTC).strftime(fmt), f"{v:.2f}") for t, v in zip(times, values,
                                                                                             strict=True)]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", "value"])
        writer.writerows(data)
    return data


def read_output(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def test_output_format(tmp_path: Path) -> None:
    source, target = tmp_path / "in.csv", tmp_path / "out.csv"
    data = write_stream(source, spike_at=2500)
    result = run_cli("anomaly-score", "--input", str(source), "--output", str(target))
    assert result.returncode == 0, result.stderr
    header, rows = read_output(target)
    assert header == ["timestamp", "value", "anomaly_score"]
    assert len(rows) == len(data)
    assert [(r[0], r[1]) for r in rows] == data
    scores = [float(r[2]) for r in rows]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert all(repr(float(r[2])) == r[2] for r in rows)  # full precision, repr of the float
    assert scores[2500] >= 0.99  # the spike
    assert max(scores[400:2500]) < 0.99  # quiet before it
    assert len(set(scores[400:])) > 0.9 * len(scores[400:])  # fine-grained, no ties
    assert "3000 rows" in result.stderr


def test_appending_rows_never_changes_earlier_scores(tmp_path: Path) -> None:
    full = tmp_path / "full.csv"
    data = write_stream(full, rows=5000, spike_at=4000)
    part = tmp_path / "part.csv"
    with part.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", "value"])
        writer.writerows(data[:3001])
    result = run_cli("anomaly-score", "--input", str(full), "--output", str(tmp_path / "full_out.csv"),
                     "--input", str(part), "--output", str(tmp_path / "part_out.csv"))
    assert result.returncode == 0, result.stderr
    _, full_rows = read_output(tmp_path / "full_out.csv")
    _, part_rows = read_output(tmp_path / "part_out.csv")
    assert len(part_rows) == 3001
    assert full_rows[:3001] == part_rows


def test_bad_rows_are_scored_as_missing_and_counted(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    data = write_stream(source, rows=800)
    lines = source.read_text().splitlines()
    lines[501] = f"{data[500][0]},not-a-number"
    lines[502] = f"{data[501][0]},"
    lines[503] = f"{data[502][0]},nan"
    lines[504] = "yesterday-ish,21.0"
    source.write_text("\n".join(lines) + "\n")
    target = tmp_path / "out.csv"
    result = run_cli("anomaly-score", "--input", str(source), "--output", str(target))
    assert result.returncode == 0, result.stderr
    assert "4 bad rows" in result.stderr
    assert "line 502" in result.stderr and "not-a-number" in result.stderr
    _, rows = read_output(target)
    assert len(rows) == 800
    assert rows[500][1] == "not-a-number" and rows[503][0] == "yesterday-ish"
    scores = [float(r[2]) for r in rows]
    assert all(0.0 <= s <= 1.0 and math.isfinite(s) for s in scores)
    # a missing reading is not learnt: it scores like the stream's last score
    assert scores[500] == scores[499]


def test_folders_and_several_files(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    write_stream(folder / "a.csv", rows=700, seed=3)
    write_stream(folder / "b.csv", rows=900, seed=4, iso_t=True)
    (folder / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    result = run_cli("anomaly-score", "--input", str(folder), "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.csv", "b.csv"]
    assert len(read_output(out / "b.csv")[1]) == 900


def test_clear_errors(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    write_stream(source, rows=50)
    result = run_cli("anomaly-score", "--input", str(source), "--input", str(source), "--output", "x.csv")
    assert result.returncode == 1 and "2 --input but 1 --output" in result.stderr
    result = run_cli("anomaly-score", "--input", str(tmp_path / "absent.csv"), "--output", "x.csv")
    assert result.returncode == 1 and "input not found" in result.stderr
    bad_model = tmp_path / "model.tflite"
    bad_model.write_bytes(b"\0" * 64)
    result = run_cli("anomaly-score", "--input", str(source), "--output", str(tmp_path / "o.csv"),
                     "--model", str(bad_model))
    assert result.returncode == 1 and "metadata not found" in result.stderr


@pytest.mark.parametrize(("text", "expected_tod"), [
    ("2024-01-31 06:00:00", 0.25),
    ("2024-01-31T06:00:00", 0.25),
    ("2024-01-31T06:00:00Z", 0.25),
    ("2024-01-31T06:00:00+01:00", 0.25),  # time of day as written (the sensor's wall clock)
    ("2024-01-31 18:00:00.5", 0.75 + 0.5 / 86400),
    ("1706680800", 0.25),  # UNIX seconds
])
def test_timestamp_formats(text: str, expected_tod: float) -> None:
    seconds, tod = parse_timestamp(text)
    assert tod == pytest.approx(expected_tod)
    assert seconds == pytest.approx(1706680800 + (0.5 + 43200 if "18:00" in text else 0)
                                    - (3600 if "+01:00" in text else 0))


def test_header_only_and_headerless_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("timestamp,value\n")
    headerless = tmp_path / "headerless.csv"
    headerless.write_text("2024-01-01 00:00:00,1.0\n2024-01-01 00:01:00,1.5\n")
    result = run_cli("anomaly-score", "--input", str(empty), "--output", str(tmp_path / "e.csv"),
                     "--input", str(headerless), "--output", str(tmp_path / "h.csv"))
    assert result.returncode == 0, result.stderr
    assert read_output(tmp_path / "e.csv") == (["timestamp", "value", "anomaly_score"], [])
    assert len(read_output(tmp_path / "h.csv")[1]) == 2
    assert "no 'timestamp,value' header" in result.stderr


@pytest.mark.data
def test_real_stream_through_the_cli(tmp_path: Path) -> None:
    from training.anomaly_data import default_telemetry_dir

    source = default_telemetry_dir() / "occupancy_detection" / "datatest2.txt"
    if not source.exists():
        pytest.skip(f"telemetry data not found at {source}")
    with source.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))[1:]
    stream = tmp_path / "co2.csv"
    with stream.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", "value"])
        for index, row in enumerate(rows):
            value = float(row[5]) + (3000.0 if index == 6000 else 0.0)  # one injected CO2 spike
            writer.writerow([row[1], repr(value)])
    result = run_cli("anomaly-score", "--input", str(stream), "--output", str(tmp_path / "out.csv"))
    assert result.returncode == 0, result.stderr
    _, out = read_output(tmp_path / "out.csv")
    scores = np.array([float(r[2]) for r in out])
    assert len(scores) == len(rows)
    assert scores[6000] >= 0.99
    assert np.mean(scores[300:] >= 0.99) < 0.001
