"""Pictures of what the agent did: sensor streams with their scores and alerts, what the voice path heard,
and DET curves of the keyword model. Each ``*_figure`` function takes plain data and returns a matplotlib
Figure (the tests read its axes); each ``write_*`` function draws one and saves it as a PNG.

matplotlib is an optional extra (``pip install 'home-agent[plot]'``; the train extra includes it), so a
plain install on a Pi does not carry it. It is imported only when a plot is drawn, through the Agg canvas
(no display, no pyplot global state). :func:`plot_path` is the argparse type of every ``--plot`` option: it
refuses the option up front, with exit status 2 and the extra to install, when matplotlib is missing.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from agent.errors import HomeAgentError
from agent.features import INT16_SCALE
from agent.messages import Detection, Intent, Scores

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'home-agent[plot]'"
DPI = 80
SENSOR_SIZE = (10.0, 5.0)  # inches
TRANSCRIBE_SIZE = (10.0, 5.5)
DET_SIZE = (6.5, 5.0)
WAVEFORM_POINTS = 4000  # min/max envelope pairs: enough for the eye, small PNGs for hour-long files
POSTERIOR_LEGEND_MIN = 0.1  # words whose smoothed score never reaches this stay out of the legend
ALERT_GID = "alerts"
WINDOW_GID = "labelled-window"
DETECTION_GID = "detections"
INTENT_GID = "intent"
SHIPPED_GID = "shipped-threshold"


class PlotError(HomeAgentError):
    """A plot could not be drawn (missing input data, unreadable file)."""


def available() -> bool:
    try:
        import matplotlib  # noqa: F401 - the package only; the drawing parts load when a plot is drawn
    except ImportError:
        return False
    return True


def plot_path(text: str) -> Path:
    """argparse ``type=`` for ``--plot``: the path, or a usage error (exit status 2) without matplotlib."""
    if not available():
        raise argparse.ArgumentTypeError(f"drawing plots needs matplotlib: {INSTALL_HINT}")
    return Path(text)


def _new_figure(size: tuple[float, float], rows: int = 1, heights: Sequence[float] | None = None
                ) -> tuple[Figure, list[Axes]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 1, sharex=True, squeeze=False,
                           gridspec_kw={"height_ratios": list(heights)} if heights else None)[:, 0]
    return figure, list(axes)


def save(figure: Figure, path: Path) -> Path:
    """Write the figure as a PNG (folders created). Raises PlotError when it cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png", dpi=DPI)
    except OSError as err:
        raise PlotError(f"cannot write {path}: {err.strerror}") from err
    return path


# ------------------------------------------------------------------------------------------ sensor streams


@dataclass(slots=True)
class ScoredStream:
    """``anomaly-score`` output read back: rows with a readable timestamp, in file order."""

    name: str
    times: npt.NDArray[np.datetime64]
    values: npt.NDArray[np.float64]  # NaN where the value was bad
    scores: npt.NDArray[np.float64]
    alerts: npt.NDArray[np.bool_] | None  # None: the file has no alert column


def _datetimes(seconds: Sequence[float]) -> npt.NDArray[np.datetime64]:
    micros = np.round(np.asarray(seconds, dtype=np.float64) * 1e6).astype(np.int64)
    return micros.astype("datetime64[us]")


def _seconds(stamp: str) -> float:
    from agent.anomaly_score import parse_timestamp

    return parse_timestamp(stamp)


def read_scored(path: Path, name: str | None = None) -> ScoredStream:
    """Read an ``anomaly-score`` output CSV (``timestamp,value,anomaly_score[,alert]``). Rows whose timestamp
    cannot be read are left out (they have no place on a time axis). Raises PlotError."""
    seconds: list[float] = []
    values: list[float] = []
    scores: list[float] = []
    alerts: list[bool] = []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = [h.strip().lower() for h in next(reader, [])]
            missing = {"timestamp", "value", "anomaly_score"} - set(header)
            if missing:
                raise PlotError(f"{path}: not an anomaly-score output (no {', '.join(sorted(missing))} "
                                "column)")
            ts_col, value_col, score_col = (header.index(c) for c in ("timestamp", "value", "anomaly_score"))
            alert_col = header.index("alert") if "alert" in header else None
            for row in reader:
                if len(row) <= max(ts_col, value_col, score_col):
                    continue
                try:
                    t = _seconds(row[ts_col])
                except (ValueError, OverflowError):
                    continue
                seconds.append(t)
                values.append(_float(row[value_col]))
                scores.append(_float(row[score_col]))
                if alert_col is not None:
                    alerts.append(len(row) > alert_col and row[alert_col].strip() == "1")
    except OSError as err:
        raise PlotError(f"cannot read {path}: {err.strerror}") from err
    except (csv.Error, UnicodeDecodeError) as err:
        raise PlotError(f"{path}: not a readable CSV file: {err}") from err
    return ScoredStream(
        name=name if name is not None else path.stem,
        times=_datetimes(seconds),
        values=np.array(values, dtype=np.float64),
        scores=np.array(scores, dtype=np.float64),
        alerts=np.array(alerts, dtype=np.bool_) if alert_col is not None else None,
    )


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


Window = tuple[np.datetime64, np.datetime64]


def read_label_windows(path: Path) -> dict[str, list[Window]]:
    """NAB ``combined_windows.json``: ``{"folder/stream.csv": [["start", "end"], ...]}``. Raises PlotError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise PlotError(f"cannot read {path}: {err.strerror}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PlotError(f"{path}: not a JSON file: {err}") from err
    if not isinstance(data, dict):
        raise PlotError(f"{path}: expected an object of stream -> [[start, end], ...]")
    windows: dict[str, list[Window]] = {}
    for key, pairs in data.items():
        try:
            windows[key] = [(_datetimes([_seconds(a)])[0], _datetimes([_seconds(b)])[0]) for a, b in pairs]
        except (TypeError, ValueError, OverflowError) as err:
            raise PlotError(f"{path}: {key}: windows must be [start, end] timestamps ({err})") from err
    return windows


def windows_for(source: Path, windows: Mapping[str, list[Window]]) -> list[Window] | None:
    """The labelled windows of an input file: the key that is a trailing part of its path (``valve1/3.csv``
    for ``.../data/valve1/3.csv``), else the only key with its file name. None: not in the label file."""
    parts = source.resolve().parts
    by_name = []
    for key, value in windows.items():
        key_parts = Path(key).parts
        if key_parts and parts[-len(key_parts):] == key_parts:
            return value
        if Path(key).name == source.name:
            by_name.append(value)
    return by_name[0] if len(by_name) == 1 else None


def sensor_figure(stream: ScoredStream, windows: Sequence[Window] | None = None) -> Figure:
    """Values (top) and graded score (bottom) over time; alerts as markers on both; labelled anomaly windows
    shaded on both."""
    from matplotlib import dates

    date2num: Callable[[np.datetime64], float] = dates.date2num  # untyped in matplotlib
    figure, (top, bottom) = _new_figure(SENSOR_SIZE, rows=2, heights=(3, 2))
    top.plot(stream.times, stream.values, color="tab:blue", linewidth=0.8, label="value")
    bottom.plot(stream.times, stream.scores, color="tab:purple", linewidth=0.8, label="anomaly score")
    bottom.set_ylim(-0.02, 1.02)
    bottom.set_ylabel("anomaly score")
    top.set_ylabel("value")
    for index, (start, end) in enumerate(windows or ()):
        for axes in (top, bottom):
            axes.axvspan(date2num(start), date2num(end), color="tab:orange", alpha=0.2, gid=WINDOW_GID,
                         label="labelled anomaly" if index == 0 and axes is top else "_nolegend_")
    if stream.alerts is None:
        note = "alerts: not in this file"
    else:
        hit = stream.alerts
        note = _count(int(hit.sum()), "alert")
        top.plot(stream.times[hit], stream.values[hit], linestyle="none", marker="v", markersize=9,
                 color="tab:red", gid=ALERT_GID, label="alert")
        bottom.plot(stream.times[hit], stream.scores[hit], linestyle="none", marker="v", markersize=9,
                    color="tab:red", gid=ALERT_GID, label="_nolegend_")
    if windows is not None:
        note += ", " + _count(len(windows), "labelled window")
    top.set_title(f"{stream.name}: {len(stream.scores)} readings, {note}")
    top.legend(loc="upper left", fontsize="small")
    figure.autofmt_xdate()
    return figure


def _count(number: int, thing: str) -> str:
    return f"{number} {thing}{'' if number == 1 else 's'}"


def write_sensor_plots(pairs: Sequence[tuple[Path, Path]], plot_dir: Path, labels: Path | None = None
                       ) -> list[Path]:
    """One PNG per scored stream: ``pairs`` are (input CSV, anomaly-score output CSV); the PNG is named after
    the output. Raises PlotError."""
    from agent.progress import progress

    windows = read_label_windows(labels) if labels is not None else None
    written = []
    for source, scored in progress(pairs, desc="plots", unit="file"):
        stream_windows = windows_for(source, windows) if windows is not None else None
        if windows is not None and stream_windows is None:
            log.warning("%s: not in %s; drawn without labelled windows", source, labels)
        figure = sensor_figure(read_scored(scored, name=source.name), stream_windows)
        written.append(save(figure, plot_dir / f"{scored.stem}.png"))
    return written


# ------------------------------------------------------------------------------------------ what it heard


@dataclass(slots=True)
class PosteriorTrace:
    """Recorder for ``VoicePipeline.on_hop``: per hop, the time and the smoothed per-label scores the
    recognizer compared with the thresholds; and when each word was heard (the hop it fired on)."""

    labels: tuple[str, ...] = ()
    times: list[float] = field(default_factory=list)
    judged: list[npt.NDArray[np.float64]] = field(default_factory=list)
    fired: list[tuple[float, Detection]] = field(default_factory=list)

    def __call__(self, scores: Scores, judged: npt.NDArray[np.float64], detection: Detection | None) -> None:
        self.labels = scores.labels
        self.times.append(scores.t_audio)
        self.judged.append(np.array(judged, dtype=np.float64))
        if detection is not None:
            self.fired.append((scores.t_audio, detection))

    def matrix(self) -> npt.NDArray[np.float64]:
        """(hops, labels)."""
        return np.stack(self.judged) if self.judged else np.zeros((0, len(self.labels)))


def _envelope(samples: npt.NDArray[np.int16], rate: int) -> tuple[npt.NDArray[np.float64], ...]:
    """(times, low, high) of a min/max envelope with at most WAVEFORM_POINTS points."""
    audio = samples.astype(np.float64) / INT16_SCALE
    step = max(1, math.ceil(len(audio) / WAVEFORM_POINTS))
    usable = len(audio) // step * step
    blocks = audio[:usable].reshape(-1, step) if usable else np.zeros((0, 1))
    times = (np.arange(len(blocks)) * step + step / 2) / rate
    return times, blocks.min(axis=1), blocks.max(axis=1)


def transcription_figure(samples: npt.NDArray[np.int16], sample_rate: int, trace: PosteriorTrace,
                         thresholds: Mapping[str, float], intents: Sequence[Intent], *, title: str = ""
                         ) -> Figure:
    """Waveform with the words heard and the intents (top); every word's smoothed score per hop as the
    recognizer judged it, its threshold (dashed) for the words that came near, and a dot where a word fired
    (bottom)."""
    figure, (top, bottom) = _new_figure(TRANSCRIBE_SIZE, rows=2, heights=(2, 3))
    times, low, high = _envelope(samples, sample_rate)
    top.fill_between(times, low, high, color="0.45", linewidth=0)
    top.set_ylim(-1.0, 1.0)
    top.set_ylabel("waveform")
    for fired, detection in trace.fired:
        top.axvline(fired, color="tab:green", linestyle=":", linewidth=1.0)
        top.text(fired, 0.95, detection.word, ha="center", va="top", fontsize="small", color="tab:green")
    for intent in intents:
        top.axvline(intent.t_audio, color="tab:red", linewidth=1.5, gid=INTENT_GID)
        top.text(intent.t_audio, -0.95, f" {intent.action}", color="tab:red", va="bottom", fontsize="small")
    matrix = trace.matrix()
    colours = _colours(len(trace.labels))
    for index, label in enumerate(trace.labels):
        if label not in thresholds:
            continue  # _silence_ / _unknown_: not words, no threshold
        column = matrix[:, index]
        near = bool(len(column)) and float(column.max()) >= POSTERIOR_LEGEND_MIN
        bottom.plot(trace.times, column, color=colours[index], linewidth=1.2 if near else 0.6,
                    alpha=1.0 if near else 0.35, gid=f"posterior:{label}",
                    label=label if near else "_nolegend_")
        if near:
            bottom.axhline(thresholds[label], color=colours[index], linestyle="--", linewidth=0.8,
                           gid=f"threshold:{label}")
    if trace.fired:
        bottom.plot([t for t, _ in trace.fired], [d.score for _, d in trace.fired], linestyle="none",
                    marker="o", color="black", markersize=6, gid=DETECTION_GID, label="heard")
    bottom.set_ylim(-0.02, 1.02)
    bottom.set_xlabel("seconds")
    bottom.set_ylabel("smoothed score")
    if bottom.get_legend_handles_labels()[0]:
        bottom.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    heard = ", ".join(i.action for i in intents) or "no intent"
    summary = f"{len(trace.fired)} words heard, intents: {heard}"
    top.set_title(f"{title}: {summary}" if title else summary)
    return figure


def _colours(count: int) -> list[Any]:
    from matplotlib import colormaps

    palette = colormaps["tab20"]
    return [palette(i % 20) for i in range(count)]


def write_transcription_plot(out: Path, audio: Path, trace: PosteriorTrace, thresholds: Mapping[str, float],
                             intents: Sequence[Intent]) -> Path:
    """Draw what the voice path heard in ``audio`` (read again at 16 kHz) into ``out``. Raises PlotError."""
    from agent.audio import SAMPLE_RATE, read_audio_file
    from agent.errors import AudioError

    try:
        samples = read_audio_file(audio)
    except AudioError as err:
        raise PlotError(str(err)) from err
    figure = transcription_figure(samples, SAMPLE_RATE, trace, thresholds, intents, title=audio.name)
    return save(figure, out)


# ------------------------------------------------------------------------------------------ model curves


@dataclass(frozen=True, slots=True)
class DetCurve:
    """One word's detection error trade-off on one source: at each threshold, the fraction of the source's
    clips of the word that were missed and the false detections per hour of negative audio."""

    source: str
    thresholds: Sequence[float]
    miss_rate: Sequence[float]  # 0..1
    false_per_hour: Sequence[float]

    def __post_init__(self) -> None:
        if not len(self.thresholds) == len(self.miss_rate) == len(self.false_per_hour):
            raise ValueError("thresholds, miss_rate and false_per_hour must have the same length")


# name -> (false per hour, miss rate) points of another system on the same data
PeerPoints = Mapping[str, tuple[Sequence[float], Sequence[float]]]


def det_figure(word: str, curves: Sequence[DetCurve], *, shipped: float | None = None,
               peers: PeerPoints | None = None, title: str = "") -> Figure:
    """Miss rate against false wakes per hour (symmetric log axis, so zero stays visible), one line per
    source, the shipped threshold marked on each, peers' points on the same axes."""
    figure, (axes,) = _new_figure(DET_SIZE)
    colours = _colours(len(curves))
    for index, curve in enumerate(curves):
        axes.plot(curve.false_per_hour, curve.miss_rate, color=colours[index], marker=".", markersize=3,
                  linewidth=1.2, gid=f"det:{curve.source}", label=curve.source)
        if shipped is not None and len(curve.thresholds):
            at = int(np.argmin(np.abs(np.asarray(curve.thresholds, dtype=np.float64) - shipped)))
            axes.plot([curve.false_per_hour[at]], [curve.miss_rate[at]], linestyle="none", marker="*",
                      markersize=13, color=colours[index], markeredgecolor="black", gid=SHIPPED_GID,
                      label=f"shipped threshold {shipped:.2f}" if index == 0 else "_nolegend_")
    for index, (name, (false_per_hour, miss_rate)) in enumerate((peers or {}).items()):
        axes.plot(false_per_hour, miss_rate, linestyle="none", marker="sDP^"[index % 4], markersize=7,
                  color="black", fillstyle="none", gid=f"peer:{name}", label=name)
    axes.set_xscale("symlog", linthresh=0.1)
    axes.set_xlim(left=-0.02)  # a little left of zero, so points at no false detection are not on the frame
    highest = max([max(c.miss_rate, default=0.0) for c in curves] +
                  [max(m, default=0.0) for _, m in (peers or {}).values()], default=1.0)
    axes.set_ylim(-0.01, min(1.01, highest + 0.05))
    axes.set_xlabel("false detections per hour")
    axes.set_ylabel("miss rate")
    axes.grid(True, which="both", alpha=0.3)
    axes.set_title(title or f"'{word}': detection error trade-off")
    axes.legend(loc="upper right", fontsize="small")
    return figure


def write_det_plot(out: Path, word: str, curves: Sequence[DetCurve], *, shipped: float | None = None,
                   peers: PeerPoints | None = None, title: str = "") -> Path:
    return save(det_figure(word, curves, shipped=shipped, peers=peers, title=title), out)
