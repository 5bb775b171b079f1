"""bench.anomaly_bench.split_runs: SKAB's split by run holds out every third run in sorted order, less the
held-out runs that overlap a development run in time (they share rows; issue 15, session 19). A fake corpus
in NAB layout under tmp_path: no ../shared needed."""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path

from bench.anomaly_bench import split_runs

T0 = dt.datetime(2020, 2, 8, 12, 0, 0)
SENSORS = ("Current", "Pressure")
# run -> (start, rows) in seconds from T0, one row a second; 15 runs, base held-out: x/02 05 08 11 14
RUNS = {
    "x/00": (0, 600), "x/01": (500, 600),  # development runs overlapping each other: nothing moves
    "x/02": (2000, 600), "x/03": (2490, 600),  # held-out x/02's last 110 s start development x/03: moves
    "x/04": (4000, 600),
    "x/05": (6000, 600), "x/08": (6500, 600),  # two held-out runs overlapping only each other: both stay
    "x/06": (8000, 600), "x/07": (8600, 600),  # back to back, one second apart: no overlap
    "x/09": (10000, 600), "x/10": (12000, 600),
    "x/11": (14000, 600), "x/14": (14500, 600), "x/13": (15000, 600),  # held, held, development: a chain
    "x/12": (17000, 600),
}


def fake_corpus(root: Path) -> dict[str, list[list[str]]]:
    labels: dict[str, list[list[str]]] = {}
    for run, (start, rows) in RUNS.items():
        folder, number = run.split("/")
        for sensor in SENSORS:
            rel = f"{folder}/{number}_{sensor}.csv"
            path = root / "data" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["timestamp", "value"])
                writer.writerows([(T0 + dt.timedelta(seconds=start + i)).strftime("%Y-%m-%d %H:%M:%S"), "1.0"]
                                 for i in range(rows))
            labels[rel] = []
    (root / "labels.json").write_text(json.dumps(labels), encoding="utf-8")
    return labels


def overlaps(a: str, b: str) -> bool:
    (start_a, rows_a), (start_b, rows_b) = RUNS[a], RUNS[b]
    return start_a <= start_b + rows_b - 1 and start_b <= start_a + rows_a - 1


def test_no_held_out_run_overlaps_a_development_run(tmp_path: Path) -> None:
    split = split_runs(fake_corpus(tmp_path), data=tmp_path / "data")
    assert sorted(split.runs) == sorted(RUNS)
    assert sorted(split.development + split.held_out) == sorted(RUNS)
    assert not [(h, d) for h in split.held_out for d in split.development if overlaps(h, d)]
    assert split.overlap_groups == [["x/00", "x/01"], ["x/02", "x/03"], ["x/05", "x/08"],
                                    ["x/11", "x/13", "x/14"]]


def test_only_held_out_runs_overlapping_development_runs_move(tmp_path: Path) -> None:
    split = split_runs(fake_corpus(tmp_path), data=tmp_path / "data")
    base_held = sorted(RUNS)[2::3]
    assert base_held == ["x/02", "x/05", "x/08", "x/11", "x/14"]
    # x/02 overlaps development x/03; x/14 overlaps x/13, and x/11 overlaps x/14, which is development now
    assert sorted(split.moved) == ["x/02", "x/11", "x/14"]
    assert split.held_out == ["x/05", "x/08"]  # the held-out set only shrinks
    assert split.moved["x/02"] == "overlaps development run(s) in time: x/03 (1.8 min shared)"
    assert "x/13" in split.moved["x/14"] and "x/14" in split.moved["x/11"]


def test_without_overlaps_the_split_is_every_third_run(tmp_path: Path) -> None:
    labels = fake_corpus(tmp_path)
    spread = {rel: labels[rel] for rel in labels if rel.split("_")[0] in ("x/04", "x/06", "x/07", "x/09",
                                                                           "x/10", "x/12", "x/13")}
    split = split_runs(spread, data=tmp_path / "data")
    assert split.held_out == ["x/07", "x/12"]  # x/07 starts a second after x/06 ends: no overlap
    assert split.development == ["x/04", "x/06", "x/09", "x/10", "x/13"]
    assert split.moved == {} and split.overlap_groups == []
