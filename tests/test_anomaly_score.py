"""``home-agent anomaly-score``: the CSV contract (header, one row out per row in, scores in [0, 1] at full
precision, the alert column, strictly online), bad rows counted, strict CSV (errors with exit status 2
naming the file and line), no data loss (an output that is an input is refused; writes go through a
temporary file). Runs the real CLI."""

from __future__ import annotations

import csv
import json
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
    assert header == ["timestamp", "value", "anomaly_score", "alert"]
    assert len(rows) == len(data)
    assert [(r[0], r[1]) for r in rows] == data
    scores = [float(r[2]) for r in rows]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert all(repr(float(r[2])) == r[2] for r in rows)  # full precision, repr of the float
    assert [i for i, r in enumerate(rows) if r[3] == "1"] == [2500]  # the spike: one alert
    assert {r[3] for r in rows} == {"0", "1"}
    assert "3000 rows" in result.stderr and "1 alerts" in result.stderr
    assert list(tmp_path.glob(".*.tmp")) == []  # the temporary file was renamed into place


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


def test_bad_rows_are_counted_warnings_and_not_learnt(tmp_path: Path) -> None:
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
    assert "4 rows with warnings" in result.stderr
    assert "line 502" in result.stderr and "not-a-number" in result.stderr
    _, rows = read_output(target)
    assert len(rows) == 800
    assert rows[500][1] == "not-a-number" and rows[503][0] == "yesterday-ish"
    scores = [float(r[2]) for r in rows]
    assert all(0.0 <= s <= 1.0 and math.isfinite(s) for s in scores)
    # a row that is not learnt scores like the stream's last score and raises no alert
    assert scores[500] == scores[499] and rows[500][3] == "0"


def test_time_going_backwards_and_duplicates_are_counted_warnings(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    data = write_stream(source, rows=800)
    lines = source.read_text().splitlines()
    lines[601] = f"{data[400][0]},{data[600][1]}"  # back by 200 minutes
    lines[602] = f"{data[599][0]},{data[601][1]}"  # the last learnt row's time again
    source.write_text("\n".join(lines) + "\n")
    target = tmp_path / "out.csv"
    result = run_cli("anomaly-score", "--input", str(source), "--output", str(target))
    assert result.returncode == 0, result.stderr
    assert "time going backwards" in result.stderr and "line 602" in result.stderr
    assert "duplicate timestamp" in result.stderr and "line 603" in result.stderr
    assert "2 rows with warnings" in result.stderr
    _, rows = read_output(target)
    assert len(rows) == 800 and rows[600][3] == rows[601][3] == "0"


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
    assert result.returncode == 2 and "2 --input but 1 --output" in result.stderr
    result = run_cli("anomaly-score", "--input", str(tmp_path / "absent.csv"), "--output", "x.csv")
    assert result.returncode == 2 and "input not found" in result.stderr


@pytest.mark.parametrize("link", ["same", "symlink", "hardlink", "folder"])
def test_output_that_is_an_input_is_refused_and_the_input_kept(tmp_path: Path, link: str) -> None:
    source = tmp_path / "normal.csv"
    write_stream(source, rows=1000)
    before = source.read_bytes()
    target = {"same": source, "symlink": tmp_path / "alias.csv", "hardlink": tmp_path / "hard.csv",
              "folder": tmp_path}[link]
    if link == "symlink":
        target.symlink_to(source)
    elif link == "hardlink":
        target.hardlink_to(source)
    result = run_cli("anomaly-score", "--input", str(source), "--output", str(target))
    assert result.returncode == 2, result.stderr
    assert "is the input" in result.stderr and "normal.csv" in result.stderr
    assert source.read_bytes() == before


def test_a_failed_run_leaves_an_existing_output_untouched(tmp_path: Path) -> None:
    source, target = tmp_path / "in.csv", tmp_path / "out.csv"
    source.write_text("time;temp\n2024-01-01 00:00:00;21.0\n")
    target.write_text("precious\n")
    result = run_cli("anomaly-score", "--input", str(source), "--output", str(target))
    assert result.returncode == 2
    assert target.read_text() == "precious\n"
    assert list(tmp_path.glob(".*.tmp")) == []


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty: no header and no rows"),
    ("\n\n", "empty: no header and no rows"),
    ("timestamp,value\n", "a header and no rows"),
    ("timestamp;value\n2024-01-01 00:00:00;21.0\n",
     "line 1: one column 'timestamp;value': the separator must be a comma, not ';'"),
    ("time,temp\n2024-01-01 00:00:00,21.0\n", "line 1: the header must name 'timestamp' and 'value' columns; "
                                              "found 'time,temp'"),
    ("2024-01-01 00:00:00,1.0\n2024-01-01 00:01:00,1.5\n", "line 1: the header must name"),
])
def test_csv_that_cannot_be_right_is_an_error_naming_file_and_line(tmp_path: Path, text: str,
                                                                   message: str) -> None:
    source = tmp_path / "in.csv"
    source.write_text(text)
    result = run_cli("anomaly-score", "--input", str(source), "--output", str(tmp_path / "out.csv"))
    assert result.returncode == 2
    assert str(source) in result.stderr and message in result.stderr
    assert not (tmp_path / "out.csv").exists()


def test_help_says_which_problems_are_errors_and_which_are_warnings() -> None:
    result = run_cli("anomaly-score", "--help")
    text = " ".join(result.stdout.split())
    assert "Exit status 2" in text and "Counted warnings" in text and "time going backwards" in text


@pytest.mark.parametrize(("text", "expected"), [
    ("2024-01-31 06:00:00", 1706680800.0),
    ("2024-01-31T06:00:00", 1706680800.0),
    ("2024-01-31T06:00:00Z", 1706680800.0),
    ("2024-01-31T06:00:00+01:00", 1706677200.0),
    ("2024-01-31 18:00:00.5", 1706680800.0 + 43200.5),
    ("1706680800", 1706680800.0),  # UNIX seconds
])
def test_timestamp_formats(text: str, expected: float) -> None:
    assert parse_timestamp(text) == pytest.approx(expected)


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
    assert len(out) == len(rows)
    alerts = [i for i, r in enumerate(out) if r[3] == "1"]
    assert 6000 in alerts and len(alerts) <= 3


def test_the_readme_example_stuck_heater_raises_one_alert_inside_its_window(tmp_path: Path) -> None:
    """README "Seeing what it did": examples/sensor_living_room.csv, three days of a living-room temperature
    with a heater stuck on for two hours (labelled in sensor_living_room_windows.json)."""
    examples = Path(__file__).resolve().parent.parent / "examples"
    windows = json.loads((examples / "sensor_living_room_windows.json").read_text(encoding="utf-8"))
    ((start, end),) = windows["sensor_living_room.csv"]
    result = run_cli("anomaly-score", "--input", str(examples / "sensor_living_room.csv"),
                     "--output", str(tmp_path / "out.csv"))
    assert result.returncode == 0, result.stderr
    _, out = read_output(tmp_path / "out.csv")
    alerts = [r[0] for r in out if r[3] == "1"]
    assert len(alerts) == 1, alerts
    assert parse_timestamp(start) <= parse_timestamp(alerts[0]) <= parse_timestamp(end)
