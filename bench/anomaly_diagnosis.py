"""Where SKAB's NAB points go, per run and per file (development work for issue 15).

For each file: its labelled window (rows), NAB's probation (rows that score nothing), the ``alert`` column
(with device groups, through ``anomaly-score --group``'s code), the first alert inside the window and its
credit (NAB standard profile: 1 at the window's left edge, falling to 0 at its right edge; -1 when missed),
and each alert outside it with its cost (0.11 before any window, less soon after one, nothing in probation).
Sums per run; the totals agree with ``nab_score.py`` at threshold 0.5 (checked by the harness).

    .venv/bin/python -m bench.anomaly_diagnosis [--part development|held-out] [--config JSON]
        [--tuning JSON] [--crop ROWS] [--files] [--streams] [--evidence]

``--crop N`` scores the development runs with their first N rows removed (the window then starts N rows
earlier in a shorter stream, as in a short run): how the detector's start-up behaves on streams whose
anomaly comes soon after they start, measured on development data. ``--streams`` scores each stream alone
(no device groups: what a corpus of single streams sees). ``--evidence`` asks, of each window a stream alone
misses, whether its own evidence (``StreamDetector.decades``: -log10 of its Bonferroni p with persistence;
an alert needs about 3.7) rose in the first half of the window above what it reached after learning and
before the window, and how often it sat above ``SUSTAINED`` decades there (moderate evidence that a slower
alert path could add up) against before: what any alert path reading that evidence could still win.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from agent.anomaly.detector import TUNING, StreamDetector, Tuning
from agent.anomaly.group import GROUP_TUNING, GroupTuning
from agent.anomaly_score import parse_timestamp
from agent.config import AnomalySection
from bench.anomaly_bench import SKAB, group_alerts, nab_module, score_rows, split_runs

SUSTAINED = 1.5  # decades: moderate evidence (an alert needs about 3.7: posterior 0.99 at a 2 % prior)


def write_cropped(files: list[str], crop: int, folder: Path) -> Path:
    """Copies of ``files`` without their first ``crop`` data rows, under ``folder`` (a NAB data dir)."""
    for rel in files:
        with (SKAB / "data" / rel).open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([rows[0], *rows[1 + crop:]])
    return folder


def stream_alerts(files: list[str], tuning: Tuning, data: Path,
                  config: AnomalySection) -> dict[str, list[int]]:
    """The ``alert`` column of every file (under ``data``), each stream scored alone (no device groups)."""
    alerts: dict[str, list[int]] = {}
    for rel in files:
        with (data / rel).open(newline="", encoding="utf-8") as handle:
            rows = [r[:2] for r in csv.reader(handle)][1:]
        alerts[rel] = score_rows(rows, tuning, config)[1]
    return alerts


def window_evidence(decades: list[float], window: tuple[int, int], start: int) -> dict[str, Any]:
    """A stream's evidence (decades per row) in the first half of ``window`` (rows, inclusive) against the
    rows from ``start`` (the end of its learning period) to the window: the largest of each, and how many
    readings of each lie above ``SUSTAINED`` decades (with the rows each spans)."""
    lo, hi = window
    mid = lo + max(1, (hi - lo + 1) // 2)
    before, inside = decades[start:lo], decades[lo:mid]
    return {"before_rows": len(before), "before_max": round(max(before, default=0.0), 2),
            "before_sustained": sum(v > SUSTAINED for v in before),
            "window_rows": len(inside), "window_max": round(max(inside, default=0.0), 2),
            "window_sustained": sum(v > SUSTAINED for v in inside)}


def sustained_rise(entry: dict[str, Any]) -> bool:
    """At least 5 readings above ``SUSTAINED`` decades in the window's first half, at more than twice the
    rate before it (at least one reading's worth before, so a quiet history does not make 5 readings
    infinitely rare)."""
    rate_window = entry["window_sustained"] / max(entry["window_rows"], 1)
    rate_before = max(entry["before_sustained"], 1) / max(entry["before_rows"], 1)
    return bool(entry["window_sustained"] >= 5 and rate_window > 2.0 * rate_before)


def evidence_report(part: str, config: AnomalySection, tuning: Tuning = TUNING, crop: int = 0
                    ) -> dict[str, Any]:
    """``window_evidence`` of every labelled window of ``part``, each stream scored alone (the CLI's code
    path), and of the windows it misses: how many rose above their own largest evidence before the window
    by more than 0.5 decade, reached 2 or 3 decades, or show a ``sustained_rise``."""
    labels = json.loads((SKAB / "labels" / "combined_windows.json").read_text(encoding="utf-8"))
    split = split_runs(labels)
    runs, dev, held = split.runs, split.development, split.held_out
    files = [rel for run in (dev if part == "development" else held) for rel in runs[run]]
    nab = nab_module()
    entries: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_cropped(files, crop, Path(tmp) / "data") if crop else SKAB / "data"
        for rel in files:
            if not labels[rel]:
                continue
            with (data / rel).open(newline="", encoding="utf-8") as handle:
                rows = [r[:2] for r in csv.reader(handle)][1:]
            detector = StreamDetector(config, tuning=tuning)
            decades: list[float] = []
            alerts: list[bool] = []
            for ts, value in rows:
                outcome = detector.update(parse_timestamp(ts), float(value))
                decades.append(0.0 if outcome is None else detector.decades)
                alerts.append(outcome is not None and outcome.started)
            times = nab.read_timestamps(str(data / rel))
            windows = nab.windows_to_index(times, [(w[0][:19], w[1][:19]) for w in labels[rel]], rel)
            for k, (lo, hi) in enumerate(windows):
                entry = window_evidence(decades, (lo, hi), min(detector.learning_period(), lo))
                entries[f"{rel}#{k}"] = {"hit": any(alerts[lo:hi + 1]), **entry}
    missed = {key: e for key, e in entries.items() if not e["hit"]}
    return {"windows": len(entries), "missed": len(missed),
            "missed_above_own_max": sum(e["window_max"] > e["before_max"] + 0.5 for e in missed.values()),
            "missed_reaching_2_decades": sum(e["window_max"] >= 2.0 for e in missed.values()),
            "missed_reaching_3_decades": sum(e["window_max"] >= 3.0 for e in missed.values()),
            "missed_sustained_rise": sorted(key for key, e in missed.items() if sustained_rise(e)),
            "entries": entries}


def diagnose(part: str, config: AnomalySection, tuning: Tuning = TUNING,
             group_tuning: GroupTuning = GROUP_TUNING, crop: int = 0, *,
             streams: bool = False) -> dict[str, Any]:
    labels = json.loads((SKAB / "labels" / "combined_windows.json").read_text(encoding="utf-8"))
    split = split_runs(labels)
    runs, dev, held = split.runs, split.development, split.held_out
    names = dev if part == "development" else held
    files = [rel for run in names for rel in runs[run]]
    nab = nab_module()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = write_cropped(files, crop, folder / "data") if crop else SKAB / "data"
        alerts = stream_alerts(files, tuning, data, config) if streams else \
            group_alerts(files, tuning, group_tuning, folder, data=data, config=config)[0]
        per_file: dict[str, Any] = {}
        for rel in files:
            times = nab.read_timestamps(str(data / rel))
            windows = nab.windows_to_index(times, [(w[0][:19], w[1][:19]) for w in labels[rel]], rel)
            geo = nab.file_geometry(rel, len(times), windows)
            column = np.array(alerts[rel], dtype=float)
            rows = np.nonzero(column >= 0.5)[0].tolist()
            entry: dict[str, Any] = {"rows": len(times), "probation": int(nab.probation_length(len(times))),
                                     "windows": windows, "hits": [], "false": [], "credit": 0.0}
            for k, (lo, hi) in enumerate(windows):
                if k not in geo.scorable_windows:
                    continue
                inside = [i for i in rows if lo <= i <= hi and geo.scorable[i]]
                if inside:
                    first = inside[0]
                    entry["hits"].append({"row": first, "into": round((first - lo) / (hi - lo + 1), 3),
                                          "credit": round(float(geo.sigma[first]), 3)})
                    entry["credit"] += float(geo.sigma[first])
                else:
                    entry["hits"].append(None)
                    entry["credit"] -= 1.0
            for i in rows:
                if geo.window_id[i] < 0:
                    cost = 0.11 * float(geo.sigma[i]) if geo.scorable[i] else 0.0
                    entry["false"].append({"row": i, "cost": round(cost, 3)})
                    entry["credit"] += cost
            per_file[rel] = entry
        labels_file = folder / "labels.json"
        labels_file.write_text(json.dumps({rel: labels[rel] for rel in files}), encoding="utf-8")
        results = folder / "nab"
        for rel in files:
            target = results / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            times = nab.read_timestamps(str(data / rel))
            lines = (f"{t},0,{a}\n" for t, a in zip(times.astype(str), alerts[rel], strict=True))
            target.write_text("timestamp,value,anomaly_score\n" + "".join(lines), encoding="utf-8")
        with contextlib.redirect_stdout(io.StringIO()):
            summary = nab.main(["--data", str(data), "--labels", str(labels_file), "--results", str(results),
                                "--threshold", "0.5"])["standard"]
    raw = sum(entry["credit"] for entry in per_file.values())
    if abs(raw - summary["raw_score"]) > 1e-6:
        raise AssertionError(f"per-file credits {raw} disagree with nab_score's {summary['raw_score']}")
    by_run: dict[str, Any] = {}
    for run in names:
        entries = [per_file[rel] for rel in runs[run]]
        hits = [h for e in entries for h in e["hits"] if h is not None]
        by_run[run] = {"windows": sum(len(e["hits"]) for e in entries), "hit": len(hits),
                       "mean_into": round(float(np.mean([h["into"] for h in hits])), 2) if hits else None,
                       "false": sum(len(e["false"]) for e in entries),
                       "false_cost": round(sum(f["cost"] for e in entries for f in e["false"]), 2),
                       "raw": round(sum(e["credit"] for e in entries), 2)}
    return {"nab_standard": round(summary["normalized"], 2), "raw": round(raw, 2),
            "windows": f"{summary['windows_detected']}/{summary['windows_scorable']}",
            "false_alerts": sum(len(e["false"]) for e in per_file.values()), "runs": by_run,
            "files": per_file}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.anomaly_diagnosis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["development", "held-out"], default="development")
    parser.add_argument("--config", default=None, help="JSON object of [anomaly] overrides")
    parser.add_argument("--tuning", default=None, help="JSON object of Tuning overrides")
    parser.add_argument("--groups", default=None, help="JSON object of GroupTuning overrides")
    parser.add_argument("--crop", type=int, default=0, help="drop this many first rows of each run")
    parser.add_argument("--files", action="store_true", help="print every file's entry too")
    parser.add_argument("--streams", action="store_true", help="each stream alone (no device groups)")
    parser.add_argument("--evidence", action="store_true",
                        help="each stream alone: its evidence in the windows it misses against before them")
    args = parser.parse_args(argv)
    config = AnomalySection(**json.loads(args.config)) if args.config else AnomalySection()
    tuning = dataclasses.replace(TUNING, **json.loads(args.tuning)) if args.tuning else TUNING
    group_tuning = dataclasses.replace(GROUP_TUNING, **json.loads(args.groups)) if args.groups \
        else GROUP_TUNING
    if args.evidence:
        result = evidence_report(args.part, config, tuning, args.crop)
        if not args.files:
            del result["entries"]
    else:
        result = diagnose(args.part, config, tuning, group_tuning, args.crop, streams=args.streams)
        if not args.files:
            del result["files"]
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
