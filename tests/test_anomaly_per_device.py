"""bench.anomaly_bench.per_device: SKAB scored per run (its own protocol), beside the per-file figure. A run's
series is the union of its sensors' alert columns, scored by NAB's rules against the run's window. A fake run
in NAB layout under tmp_path; NAB's scorer comes from ../shared/tools."""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path

import pytest

from bench.anomaly_bench import NAB_SCORE, nab_module, per_device

T0 = dt.datetime(2020, 2, 8, 12, 0, 0)
ROWS = 1000
WINDOW = (500, 700)  # rows


def stamp(row: int) -> str:
    return (T0 + dt.timedelta(seconds=row)).strftime("%Y-%m-%d %H:%M:%S")


ROW_VALUES = [[stamp(i), "1.0"] for i in range(ROWS)]  # every sensor file's rows, as the bench reads them


def fake_run(root: Path, sensors: tuple[str, ...]) -> tuple[dict[str, list[str]], dict[str, list[list[str]]]]:
    """A run's sensor files under ``root`` (one row a second, ROWS rows) and their labels."""
    labels: dict[str, list[list[str]]] = {}
    for sensor in sensors:
        rel = f"x/1_{sensor}.csv"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["timestamp", "value"])
            writer.writerows(ROW_VALUES)
        labels[rel] = [[stamp(WINDOW[0]) + ".000000", stamp(WINDOW[1]) + ".000000"]]
    return {"x/1": sorted(labels)}, labels


def alerts_at(*rows: int) -> list[int]:
    column = [0] * ROWS
    for row in rows:
        column[row] = 1
    return column


@pytest.mark.data
def test_a_fault_one_sensor_sees_is_one_detected_window_of_the_run(tmp_path: Path) -> None:
    """Pressure alerts early in the window, Current never: per file one window of two is missed; per run the
    pump's one window is detected. A false alert both sensors raise at one row counts once for the run."""
    if not NAB_SCORE.is_file():
        pytest.skip(f"NAB's scorer not found at {NAB_SCORE}")
    runs, labels = fake_run(tmp_path / "data", ("Current", "Pressure"))
    file_alerts = {"x/1_Current.csv": alerts_at(300), "x/1_Pressure.csv": alerts_at(300, 510)}
    rows = dict.fromkeys(file_alerts, ROW_VALUES)
    device = per_device(runs, labels, file_alerts, rows, folder=tmp_path / "device", nab=nab_module(),
                        data=tmp_path / "data")
    assert device["runs"] == 1 and device["windows_detected"] == "1/1" and device["fp_alerts"] == 1
    assert 90.0 < device["nab_standard"] < 100.0
    missed = per_device(runs, labels, {rel: alerts_at(300) for rel in file_alerts}, rows,
                        folder=tmp_path / "missed", nab=nab_module(), data=tmp_path / "data")
    assert missed["windows_detected"] == "0/1" and missed["nab_standard"] < 0.0
    json.dumps(device)  # goes into bench/results/anomaly.json as it is


def test_sensor_files_of_unequal_length_are_an_error(tmp_path: Path) -> None:
    runs, labels = fake_run(tmp_path / "data", ("Current", "Pressure"))
    file_alerts = {"x/1_Current.csv": alerts_at(), "x/1_Pressure.csv": alerts_at()[:-1]}
    with pytest.raises(ValueError, match="different lengths"):
        per_device(runs, labels, file_alerts, dict.fromkeys(file_alerts, ROW_VALUES),
                   folder=tmp_path / "device", nab=object(), data=tmp_path / "data")  # type: ignore[arg-type]
