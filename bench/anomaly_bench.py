"""Anomaly detector benchmark -> ``bench/results/anomaly.json``.

1. **CSV scoring** (contract: >= 20,000 rows/s): ``agent.anomaly_score.score_file`` (parse, score strictly
   online, write) over project-made 1-minute streams (a single file and many files), and over every stream
   of ../shared/data/telemetry written as ``timestamp,value`` CSVs when the data exist. Wall time of the
   whole call, including CSV parsing and writing.
2. **Daemon path**: ``AnomalyDetector.score(reading)`` one reading at a time (as the daemon stage does):
   readings/s and the per-reading latency (median, p99).
3. **State**: bytes of saved JSON state per stream.

    .venv/bin/python -m bench.anomaly_bench [--quick]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.anomaly import AnomalyDetector, AnomalyModel
from agent.anomaly_score import score_file
from agent.config import AnomalySection
from agent.messages import Reading
from agent.paths import REPO_ROOT
from bench.results_file import write_results

log = logging.getLogger("bench.anomaly")

RESULTS = REPO_ROOT / "bench" / "results" / "anomaly.json"
MODEL = REPO_ROOT / "models" / "anomaly.tflite"
TARGET_ROWS_PER_S = 20_000
T0 = 1_700_000_000.0


def synthetic_csv(path: Path, rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    times = T0 + np.arange(rows) * 60.0
    values = np.round(21 + 1.5 * np.sin(2 * np.pi * (times % 86400) / 86400) + rng.normal(0, 0.03, rows), 2)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", "value"])
        writer.writerows((dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S"), f"{v:.2f}")
                         for t, v in zip(times, values, strict=True))


def telemetry_csvs(folder: Path) -> list[Path]:
    from training.anomaly_data import default_telemetry_dir, load_streams

    data_dir = default_telemetry_dir()
    if not data_dir.is_dir():
        return []
    paths = []
    for stream in load_streams(data_dir):
        path = folder / (stream.name.replace("/", "_") + ".csv")
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["timestamp", "value"])
            writer.writerows((dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S"), repr(v))
                             for t, v in zip(stream.times.tolist(), stream.values.tolist(), strict=True))
        paths.append(path)
    return paths


def score_many(model: AnomalyModel, paths: list[Path], out_dir: Path) -> dict[str, Any]:
    config = AnomalySection()
    started = time.perf_counter()
    rows = 0
    for path in paths:
        rows += score_file(model, config, path, out_dir / path.name).rows
    seconds = time.perf_counter() - started
    return {"files": len(paths), "rows": rows, "seconds": round(seconds, 3),
            "rows_per_s": round(rows / seconds), "meets_target": rows / seconds >= TARGET_ROWS_PER_S}


def daemon_path(model: AnomalyModel, readings: int) -> dict[str, Any]:
    detector = AnomalyDetector(model, AnomalySection())
    rng = np.random.default_rng(3)
    values = 21 + np.cumsum(rng.normal(0, 0.02, readings))
    latencies = []
    started = time.perf_counter()
    for i, value in enumerate(values.tolist()):
        t = time.perf_counter()
        detector.score(Reading(f"sensor{i % 10}", value, T0 + 60.0 * (i // 10), "bench"))
        latencies.append(time.perf_counter() - t)
    seconds = time.perf_counter() - started
    latencies.sort()
    state_bytes = len(json.dumps(detector.state_dict(), separators=(",", ":")))
    return {
        "readings": readings,
        "readings_per_s": round(readings / seconds),
        "latency_ms_median": round(1000 * statistics.median(latencies), 4),
        "latency_ms_p99": round(1000 * latencies[int(0.99 * len(latencies))], 4),
        "state_bytes_per_stream": state_bytes // 10,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.anomaly_bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller inputs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = AnomalyModel.load(MODEL)
    rows = 20_000 if args.quick else 100_000
    result: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
        "model_bytes": MODEL.stat().st_size,
        "target_rows_per_s": TARGET_ROWS_PER_S,
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "out").mkdir()
        single = folder / "single.csv"
        synthetic_csv(single, rows, seed=1)
        result["csv_single_file"] = score_many(model, [single], folder / "out")
        many = []
        for index in range(10):
            path = folder / f"stream{index}.csv"
            synthetic_csv(path, rows // 10, seed=10 + index)
            many.append(path)
        result["csv_ten_files"] = score_many(model, many, folder / "out")
        real_dir = folder / "real"
        real_dir.mkdir()
        real = telemetry_csvs(real_dir)
        if real:
            result["csv_shared_telemetry"] = score_many(model, real, folder / "out")
    result["daemon_per_reading"] = daemon_path(model, 5_000 if args.quick else 20_000)
    write_results(RESULTS, result)
    log.info("wrote %s: %s", RESULTS, json.dumps(result))
    ok = result["csv_single_file"]["meets_target"] and result["csv_ten_files"]["meets_target"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
