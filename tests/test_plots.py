"""``--plot``: what is drawn (the axes' data), not only that a PNG appears; and the missing-extra message."""

from __future__ import annotations

import csv
import json
import math
import runpy
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from agent import plots
from agent.plots import DetCurve
from agent.transcribe import plot_file, transcribe_traced
from agent.voice import load_pipeline

if TYPE_CHECKING:
    from matplotlib.axes import Axes

pytest.importorskip("matplotlib")

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "--log-level", "WARNING", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=180, check=False)


def lines(axes: Axes, gid: str) -> list[Any]:  # Line2D, whose data matplotlib types as any ArrayLike
    return [line for line in axes.get_lines() if line.get_gid() == gid]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# ------------------------------------------------------------------------------------------ sensor plots


def write_scored(path: Path, rows: int, alerts: set[int] | None) -> list[tuple[str, float, float]]:
    """An anomaly-score output file: a sine with the given alert rows (alert column absent when None)."""
    data = []
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", "value", "anomaly_score", *(["alert"] if alerts is not None else [])])
        for i in range(rows):
            stamp = f"2024-03-01 {i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}"
            value, score = math.sin(i / 20), (i % 97) / 97
            data.append((stamp, value, score))
            writer.writerow([stamp, repr(value), repr(score),
                             *([int(i in alerts)] if alerts is not None else [])])
    return data


def test_sensor_figure_draws_every_alert_and_window(tmp_path: Path) -> None:
    scored = tmp_path / "out" / "pump.csv"
    scored.parent.mkdir()
    alert_rows = {250, 900, 1500}
    data = write_scored(scored, 2000, alert_rows)
    labels = tmp_path / "windows.json"
    labels.write_text(json.dumps({
        "site/pump.csv": [["2024-03-01 00:04:00.000000", "2024-03-01 00:05:00.000000"],
                          ["2024-03-01 00:24:00", "2024-03-01 00:26:00"]],
        "site/other.csv": [],
    }), encoding="utf-8")
    source = tmp_path / "site" / "pump.csv"  # the input file the labels name
    windows = plots.windows_for(source, plots.read_label_windows(labels))
    assert windows is not None and len(windows) == 2

    figure = plots.sensor_figure(plots.read_scored(scored), windows)
    top, bottom = figure.axes
    (values_alerts,) = lines(top, plots.ALERT_GID)
    (score_alerts,) = lines(bottom, plots.ALERT_GID)
    expected = sorted(alert_rows)
    assert len(values_alerts.get_xdata()) == len(alert_rows) == len(score_alerts.get_xdata())
    assert list(values_alerts.get_ydata()) == [data[i][1] for i in expected]
    assert list(score_alerts.get_ydata()) == [data[i][2] for i in expected]
    assert [str(t) for t in values_alerts.get_xdata()] == \
        [data[i][0].replace(" ", "T") + ".000000" for i in expected]
    for axes in (top, bottom):
        assert len([p for p in axes.patches if p.get_gid() == plots.WINDOW_GID]) == 2
    assert list(np.asarray(bottom.get_lines()[0].get_ydata())) == [row[2] for row in data]
    assert "3 alerts, 2 labelled windows" in top.get_title()

    written = plots.write_sensor_plots([(source, scored)], tmp_path / "plots", labels)
    assert written == [tmp_path / "plots" / "pump.png"]
    assert png_size(written[0]) == (800, 400)
    assert written[0].stat().st_size < 150_000


def test_scored_file_without_alert_column_draws_no_alerts(tmp_path: Path) -> None:
    scored = tmp_path / "old.csv"
    write_scored(scored, 300, None)
    stream = plots.read_scored(scored)
    assert stream.alerts is None
    figure = plots.sensor_figure(stream)
    assert all(not lines(axes, plots.ALERT_GID) for axes in figure.axes)
    assert "alerts: not in this file" in figure.axes[0].get_title()


def test_bad_plot_inputs_are_clear_errors(tmp_path: Path) -> None:
    not_scored = tmp_path / "raw.csv"
    not_scored.write_text("timestamp,value\n2024-01-01 00:00:00,1\n", encoding="utf-8")
    with pytest.raises(plots.PlotError, match="no anomaly_score column"):
        plots.read_scored(not_scored)
    bad_labels = tmp_path / "labels.json"
    bad_labels.write_text('{"a.csv": [["yesterday", "today"]]}', encoding="utf-8")
    with pytest.raises(plots.PlotError, match=r"a\.csv: windows must be"):
        plots.read_label_windows(bad_labels)


def test_anomaly_score_cli_writes_one_plot_per_stream(tmp_path: Path) -> None:
    inputs = tmp_path / "site"
    inputs.mkdir()
    for name in ("a.csv", "b.csv"):
        with (inputs / name).open("w", encoding="utf-8") as handle:
            handle.write("timestamp,value\n")
            for i in range(600):
                handle.write(f"2024-03-01 {i // 60 % 24:02d}:{i % 60:02d}:00,{20 + math.sin(i / 9):.3f}\n")
    labels = tmp_path / "windows.json"
    labels.write_text(json.dumps({"site/a.csv": [["2024-03-01 02:00:00", "2024-03-01 03:00:00"]]}))
    result = run_cli("anomaly-score", "--input", str(inputs), "--output", str(tmp_path / "out"),
                     "--plot", str(tmp_path / "plots"), "--labels", str(labels))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["a.png", "b.png"]
    assert "b.csv: not in" in result.stderr  # no labels for b: said, drawn without windows
    for name in ("a", "b"):
        png_size(tmp_path / "plots" / f"{name}.png")
        # The alerts drawn are the alerts written (none known while the output has no alert column).
        stream = plots.read_scored(tmp_path / "out" / f"{name}.csv")
        figure = plots.sensor_figure(stream)
        drawn = sum(len(line.get_xdata()) for line in lines(figure.axes[0], plots.ALERT_GID))
        assert drawn == (int(stream.alerts.sum()) if stream.alerts is not None else 0)


# ------------------------------------------------------------------------------------------ transcribe


@pytest.fixture(scope="module")
def pipeline():  # type: ignore[no-untyped-def]
    if not (REPO_ROOT / "models" / "kws.tflite").exists():
        pytest.skip("models/kws.tflite not built yet")
    from agent.config import load_config

    return load_pipeline(load_config(REPO_ROOT / "config.toml"))


def test_transcription_figure_draws_the_recorded_posteriors(pipeline, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = EXAMPLES / "computer_light_on.wav"
    result, trace = transcribe_traced(pipeline, path)
    assert [i.action for i in result.intents] == ["light_on"]
    assert [d for _, d in trace.fired] == result.detections  # the trace saw every word as it fired
    from agent.audio import read_audio_file

    thresholds = pipeline.settings.thresholds
    figure = plots.transcription_figure(read_audio_file(path), 16000, trace, thresholds, result.intents,
                                        title=path.name)
    top, bottom = figure.axes
    matrix = trace.matrix()
    for index, label in enumerate(trace.labels):
        drawn = lines(bottom, f"posterior:{label}")
        if label not in thresholds:
            assert not drawn
            continue
        (line,) = drawn
        assert np.array_equal(line.get_xdata(), trace.times)
        assert np.array_equal(line.get_ydata(), matrix[:, index])
    # What was compared with the thresholds: each detection's score is on its word's line at the firing hop.
    (dots,) = lines(bottom, plots.DETECTION_GID)
    assert list(dots.get_ydata()) == [d.score for d in result.detections]
    for (when, detection), y in zip(trace.fired, dots.get_ydata(), strict=True):
        column = matrix[trace.times.index(when), trace.labels.index(detection.word)]
        assert round(column, 4) == y >= thresholds[detection.word]
    for word in ("computer", "light", "on"):
        (threshold,) = lines(bottom, f"threshold:{word}")
        assert list(threshold.get_ydata()) == [thresholds[word]] * 2
    intent_lines = lines(top, plots.INTENT_GID)
    assert [line.get_xdata()[0] for line in intent_lines] == [i.t_audio for i in result.intents]

    out = tmp_path / "heard.png"
    assert plot_file(pipeline, path, out).intents == result.intents
    assert png_size(out) == (800, 440)
    assert pipeline.on_hop is None


def test_transcribe_cli_plot(tmp_path: Path) -> None:
    out = tmp_path / "plot.png"
    result = run_cli("transcribe", "--config", "config.toml", "--plot", str(out),
                     str(EXAMPLES / "computer_heat_up.wav"))
    assert result.returncode == 0, result.stderr
    assert "heating_up" in result.stdout
    png_size(out)
    two = run_cli("transcribe", "--plot", str(out), str(EXAMPLES / "computer_heat_up.wav"),
                  str(EXAMPLES / "computer_fan_off.wav"))
    assert two.returncode == 2
    assert "--plot draws one file; 2 given" in two.stderr


# ------------------------------------------------------------------------------------------ DET curves


def test_det_figure_draws_the_numbers_given(tmp_path: Path) -> None:
    thresholds = [0.3, 0.5, 0.62, 0.8, 0.95]
    curves = [DetCurve("sc", thresholds, [0.01, 0.03, 0.05, 0.12, 0.4], [9.0, 2.5, 0.8, 0.0, 0.0]),
              DetCurve("pvwwb", thresholds, [0.0, 0.02, 0.1, 0.2, 0.6], [9.0, 2.5, 0.8, 0.0, 0.0])]
    peers = {"openWakeWord": ([0.5], [0.08]), "MLPerf reference": ([1.0, 0.2], [0.05, 0.15])}
    figure = plots.det_figure("computer", curves, shipped=0.62, peers=peers)
    (axes,) = figure.axes
    for curve in curves:
        (line,) = lines(axes, f"det:{curve.source}")
        assert list(line.get_xdata()) == list(curve.false_per_hour)
        assert list(line.get_ydata()) == list(curve.miss_rate)
    stars = lines(axes, plots.SHIPPED_GID)
    assert [(s.get_xdata()[0], s.get_ydata()[0]) for s in stars] == [(0.8, 0.05), (0.8, 0.1)]
    for name, (x, y) in peers.items():
        (line,) = lines(axes, f"peer:{name}")
        assert (list(line.get_xdata()), list(line.get_ydata())) == (x, y)
    assert axes.get_xscale() == "symlog"
    legend_box = axes.get_legend()
    assert legend_box is not None
    legend = [text.get_text() for text in legend_box.get_texts()]
    assert legend == ["sc", "shipped threshold 0.62", "pvwwb", "openWakeWord", "MLPerf reference"]
    out = plots.write_det_plot(tmp_path / "det.png", "computer", curves, shipped=0.62)
    assert png_size(out) == (520, 400)
    with pytest.raises(ValueError, match="same length"):
        DetCurve("sc", thresholds, [0.1], [1.0])


# ------------------------------------------------------------------------------------------ the extra


def test_without_matplotlib_plot_names_the_extra(tmp_path: Path) -> None:
    """matplotlib made unimportable: --plot is refused up front (exit 2) with the extra to install."""
    blocked = ("import sys; sys.modules['matplotlib'] = None; from agent.cli import main; "
               "sys.exit(main(sys.argv[1:]))")
    for args in (["anomaly-score", "--input", "x.csv", "--output", "y.csv", "--plot", str(tmp_path)],
                 ["transcribe", "--plot", str(tmp_path / "a.png"), str(EXAMPLES / "computer_heat_up.wav")]):
        result = subprocess.run([sys.executable, "-c", blocked, *args], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=60, check=False)
        assert result.returncode == 2
        assert "argument --plot: drawing plots needs matplotlib: pip install 'home-agent[plot]'" \
            in result.stderr
        assert not list(tmp_path.iterdir())


def test_matplotlib_is_an_extra_not_a_dependency() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert not [d for d in project["dependencies"] if d.startswith("matplotlib")]
    extras = project["optional-dependencies"]
    assert [d for d in extras["plot"] if d.startswith("matplotlib")]
    assert "home-agent[plot]" in extras["train"]


def test_readme_sensor_example_is_what_the_script_makes() -> None:
    script = runpy.run_path(str(REPO_ROOT / "scripts" / "render_plots.py"))
    committed = (EXAMPLES / "sensor_living_room.csv").read_text(encoding="utf-8")
    assert committed == "timestamp,value\n" + "".join(f"{t},{v}\n" for t, v in script["living_room"]())
    windows = plots.read_label_windows(EXAMPLES / "sensor_living_room_windows.json")
    assert plots.windows_for(EXAMPLES / "sensor_living_room.csv", windows) is not None
    for image in ("sensor_living_room.png", "transcribe.png"):
        assert png_size(REPO_ROOT / "docs" / "img" / image)[0] == 800
        assert (REPO_ROOT / "docs" / "img" / image).stat().st_size < 150_000
