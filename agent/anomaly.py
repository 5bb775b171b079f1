"""Sensor anomaly detection: a tiny int8 forecaster plus per-stream online calibration.

How a reading becomes a score (every step uses only what came before the reading: strictly online):

1. *Input*: the last ``window`` first differences of the stream, divided by the stream's own running
   scale of differences, plus time of day (sin, cos). Level-free and scale-free, so one model serves
   temperature, humidity, CO2, power...
2. *Forecast*: the int8 model predicts the next normalised difference. Per stream, the forecast is
   blended with persistence by their running squared errors (a stream the model cannot forecast falls
   back to "no change"); the residual is de-biased and scaled by running estimates (float, after the int8
   model, so scores stay fine-grained).
3. *Statistics*, each turned into a tail probability against **the stream's own history** of that
   statistic (an exponential body and a Pareto tail whose index is estimated online, with a conservative
   prior while the history is short): ``spike`` (this residual; and a jump that came straight back),
   ``model`` (anomaly likelihood of the recent residuals), ``step`` (the sum of the last few residuals: a
   spike cancels out, a level shift does not), ``drift`` (the mean normalised slope over a day; the last
   six hours against the same hours a day before), ``stuck`` (the current run of identical values against
   the usual run length of that value: a light resting at 0 all night is normal). Two direct scores:
   ``dropout`` (time since the last reading against the usual interval, and the longest gap seen) and
   out-of-range (beyond the range the stream ever had, loose while the stream is young).
4. *Score*: each statistic maps ``-log10(p)`` to [0, 1] with its own scale (``calibration`` in the model
   metadata); the reading's score is the largest, its kind the arg-max. During the first
   ``learning_readings`` readings of a stream the score is scaled down linearly and no alert starts.
5. *Events*: an alert starts when the score reaches ``threshold`` (outside the cooldown that follows the
   previous episode) and ends when it falls below ``clear_threshold``: one alert per episode.

A stream's whole state is about a hundred numbers (``StreamState``, ~2 KB of JSON), saved under the state dir.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from agent.config import AnomalySection
from agent.errors import ActionError, ModelError, StateError
from agent.messages import ActionRequest, AnomalyEvent, AnomalyKind, Reading
from agent.tflite import interpreter_class, metadata_path

if TYPE_CHECKING:
    from agent.app import App

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

KINDS: Final[tuple[AnomalyKind, ...]] = ("model", "stuck", "dropout", "spike", "drift", "step")
KIND_MODEL, KIND_STUCK, KIND_DROPOUT, KIND_SPIKE, KIND_DRIFT, KIND_STEP = range(6)

STATE_FILE_NAME = "anomaly_state.json"
STATE_VERSION = 1
INPUT_CLIP = 8.0  # normalised differences are clipped to +-INPUT_CLIP (the int8 input range)
STEP_READINGS = 6  # residuals summed by the step statistic
MODEL_BATCH = 256  # rows per model invocation when scoring many readings at once
# calibrated statistics: surprise (this residual), model (likelihood), step, drift (residual bias), stuck
# (run length), spike (a jump that came straight back), daily (the last hours against the same hours a day
# before: slow drifts)
N_TAILS = 7
TAIL_KINDS = (KIND_SPIKE, KIND_MODEL, KIND_STEP, KIND_DRIFT, KIND_STUCK, KIND_SPIKE, KIND_DRIFT)
DAILY_HOURS = 6  # hours compared with the same hours one day before
HOURS_KEPT = 24 + DAILY_HOURS - 1  # hourly means kept: the current hour is accumulated apart


@dataclass(frozen=True, slots=True)
class Calibration:
    """Constants of the online normalisation and of the score mapping (tuned by training/anomaly.py,
    stored in the model metadata so the runtime and the validation use the same numbers)."""

    diff_span: float = 60.0  # running scale of first differences (readings)
    diff_slow_span: float = 2000.0  # slow scale: floor of the fast one (quiet nights do not shrink it to 0)
    diff_floor_ratio: float = 0.2
    interval_span: float = 50.0  # usual interval between readings (log domain)
    resid_span: float = 200.0  # residual bias and scale
    resid_floor: float = 0.1  # residual scale floor, in units of the difference scale
    blend_span: float = 500.0  # model-vs-persistence squared errors
    likelihood_span: float = 8.0  # anomaly likelihood: recent residuals
    drift_days: float = 1.0  # drift statistic: the mean normalised change over this many days
    tail_mean_span: float = 1000.0  # each statistic's own running mean
    tail_memory: float = 20000.0  # readings of history behind each tail estimate
    tail_u: float = 3.0  # tail starts at 3x the statistic's mean
    tail_prior_p: float = 0.05  # prior exceedance rate ...
    tail_prior_n: float = 200.0  # ... worth this many readings
    tail_prior_h: float = 0.5  # prior mean log-excess (a heavy, forgiving tail) ...
    tail_prior_k: float = 10.0  # ... worth this many exceedances
    run_span: float = 50.0  # usual run length of identical values (runs)
    run_prior_h: float = 0.3  # run lengths: a light prior tail (a stream that never repeats: stuck soon)
    stuck_table: int = 6  # values the stream sits on, tracked with their own usual run length
    dropout_factor: float = 10.0  # dropout score 1.0 at this many usual intervals (at least)
    dropout_history_factor: float = 3.0  # ... or at this many times the longest gap the stream had
    bits_spike: float = 5.5  # -log10(p) that maps to score 1.0, per statistic
    bits_model: float = 4.5
    bits_step: float = 5.0
    bits_drift: float = 5.0
    bits_stuck: float = 4.6
    bits_return: float = 5.5
    bits_daily: float = 4.0
    envelope_limit: float = 0.8  # out of range by this fraction of the stream's range -> score 1.0 ...
    envelope_young_days: float = 14.0  # ... times (1 + this / age in days): a young stream's range is loose
    envelope_growth: float = 0.1  # after learning, the range widens by at most this fraction per day

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {k: int(v) if k == "stuck_table" else float(v) for k, v in data.items()
                                  if k in known}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------- model


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()




def time_features(tod: FloatArray) -> npt.NDArray[np.float32]:
    """Time of day (fraction of a day, local wall clock) as (sin, cos)."""
    angle = 2.0 * np.pi * tod
    return np.stack([np.sin(angle), np.cos(angle)], axis=1).astype(np.float32)


class AnomalyModel:
    """The int8 forecaster: ``window`` normalised differences + time of day -> next normalised difference."""

    def __init__(self, path: Path, meta: dict[str, Any], interpreters: dict[int, Any]) -> None:
        self.path = path
        self.meta = meta
        self.window: int = int(meta["window"])
        self.n_features: int = self.window + 2
        self.sha256: str = str(meta["sha256"])
        self.calibration = Calibration.from_dict(meta.get("calibration", {}))
        self._interpreters = interpreters
        one = interpreters[1]
        inp = one.get_input_details()[0]
        out = one.get_output_details()[0]
        self._in_index = {b: it.get_input_details()[0]["index"] for b, it in interpreters.items()}
        self._out_index = {b: it.get_output_details()[0]["index"] for b, it in interpreters.items()}
        self._in_scale, self._in_zero = (float(v) for v in inp["quantization"])
        self._out_scale, self._out_zero = (float(v) for v in out["quantization"])
        self._in_dtype = inp["dtype"]
        self._lock = threading.Lock()  # one interpreter serves one caller at a time

    @classmethod
    def load(cls, path: Path) -> AnomalyModel:
        """Load and check a model: file present, checksum as in its metadata, int8 [batch, window + 2] in
        and [batch, 1] out. Every problem is a ModelError naming the file."""
        meta_file = metadata_path(path)
        if not path.is_file():
            raise ModelError(f"anomaly model not found: {path} (train it with `python -m training.anomaly`)")
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise ModelError(f"anomaly model metadata not found: {meta_file}") from err
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelError(f"anomaly model metadata {meta_file} is unreadable: {err}") from err
        if not isinstance(meta, dict) or not isinstance(meta.get("window"), int) or "sha256" not in meta:
            raise ModelError(f"anomaly model metadata {meta_file} lacks 'window' or 'sha256'")
        try:
            actual = file_sha256(path)
        except OSError as err:
            raise ModelError(f"cannot read anomaly model {path}: {err.strerror}") from err
        if actual != meta["sha256"]:
            raise ModelError(f"anomaly model {path} is corrupt or does not match {meta_file.name}: sha256 "
                             f"{actual[:12]}... != {str(meta['sha256'])[:12]}...")
        interpreter_type = interpreter_class()
        n_features = int(meta["window"]) + 2
        interpreters: dict[int, Any] = {}
        for batch in (1, MODEL_BATCH):
            try:
                interpreter = interpreter_type(model_path=str(path), num_threads=1)
                inp = interpreter.get_input_details()
                out = interpreter.get_output_details()
                if len(inp) != 1 or len(out) != 1:
                    raise ModelError(f"anomaly model {path}: expected 1 input and 1 output, got "
                                     f"{len(inp)} and {len(out)}")
                in_shape = [int(v) for v in inp[0]["shape"]]
                out_shape = [int(v) for v in out[0]["shape"]]
                if in_shape[1:] != [n_features] or out_shape[1:] != [1]:
                    raise ModelError(f"anomaly model {path}: wrong shape: input {in_shape}, output "
                                     f"{out_shape}; expected [batch, {n_features}] and [batch, 1]")
                if inp[0]["dtype"] != np.int8 or out[0]["dtype"] != np.int8:
                    raise ModelError(f"anomaly model {path}: expected int8 input and output, got "
                                     f"{np.dtype(inp[0]['dtype']).name} and {np.dtype(out[0]['dtype']).name}")
                interpreter.resize_tensor_input(inp[0]["index"], [batch, n_features])
                interpreter.allocate_tensors()
                # A damaged file can load yet fail on its first run ("Input tensor 6 lacks data"): find out
                # now, as a ModelError, rather than on the first reading in the anomaly thread.
                interpreter.set_tensor(inp[0]["index"], np.zeros((batch, n_features), dtype=np.int8))
                interpreter.invoke()
            except (ValueError, RuntimeError) as err:
                raise ModelError(f"anomaly model {path} cannot be loaded: {err}") from err
            interpreters[batch] = interpreter
        return cls(path, meta, interpreters)

    def predict(self, inputs: npt.NDArray[np.float32]) -> FloatArray:
        """Forecasts (float64, dequantised) for ``inputs`` of shape [n, window + 2]. Rows are independent:
        a row's forecast does not depend on the batch it is in."""
        n = inputs.shape[0]
        out = np.empty(n, dtype=np.float64)
        if n == 0:
            return out
        q = np.clip(np.rint(inputs / self._in_scale) + self._in_zero, -128, 127).astype(np.int8)
        with self._lock:
            start = 0
            while start < n:
                rows = n - start
                batch = 1 if rows == 1 else MODEL_BATCH
                chunk = q[start:start + batch]
                if chunk.shape[0] < batch:
                    chunk = np.concatenate([chunk, np.zeros((batch - chunk.shape[0], q.shape[1]), np.int8)])
                interpreter = self._interpreters[batch]
                interpreter.set_tensor(self._in_index[batch], chunk)
                interpreter.invoke()
                result = interpreter.get_tensor(self._out_index[batch])[:, 0]
                take = min(batch, rows)
                dequantised = (result[:take].astype(np.float64) - self._out_zero) * self._out_scale
                out[start:start + take] = dequantised
                start += take
        return out


# -------------------------------------------------------------------------------------- stream state


@dataclass(slots=True)
class StreamState:
    """Everything a stream's detector knows; plain floats and short lists (JSON-friendly)."""

    n: int = 0  # valid readings learnt
    first_time: float = math.nan  # the stream's first reading (its age sets how loose its range is)
    last_time: float = math.nan
    last_value: float = math.nan
    prev_value: float = math.nan  # the reading before last_value
    log_interval: float = math.nan  # running log of the usual interval (seconds)
    max_gap_ratio: float = 1.0  # longest gap seen (in usual intervals), decays slowly
    history: list[float] = field(default_factory=list)  # the last window + 1 values
    diff_scale: float = 0.0
    diff_scale_slow: float = 0.0
    resid_bias: float = 0.0
    resid_scale: float = 1.0
    mse_model: float = 1.0
    mse_persist: float = 1.0
    likelihood: float = 0.0
    drift: float = 0.0
    recent_z: list[float] = field(default_factory=list)  # the last STEP_READINGS - 1 residuals
    # per statistic (spike, model, step, drift, stuck run): running mean, count, exceedances, sum log-excess
    tails: list[list[float]] = field(default_factory=lambda: [[0.0, 0.0, 0.0, 0.0] for _ in range(N_TAILS)])
    run_value: float = math.nan
    run_length: int = 0
    run_mean: float = 1.0  # usual length of a run of identical values (values outside the table)
    sticky: list[list[float]] = field(default_factory=list)  # [value, usual run length, weight]
    low: float = math.inf  # lowest and highest value seen: a sensor rests on its rails (0 lux at night)
    high: float = -math.inf
    env_low: float = math.inf  # the stream's range, widening at a limited rate after learning
    env_high: float = -math.inf
    hours: list[float] = field(default_factory=list)  # hourly means (NaN: no reading), oldest first
    hour_key: int = -1  # the hour (UNIX time // 3600) being accumulated
    hour_sum: float = 0.0
    hour_count: int = 0
    daily_stat: float = math.nan  # the daily statistic at the last reading (learnt once per hour)
    # episode (alerts)
    score: float = 0.0  # the last score
    kind: int = KIND_MODEL
    active: bool = False
    episode_end: float = -math.inf  # wall-clock end of the last episode (cooldown)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, float) and not math.isfinite(value):
                data[key] = None  # JSON has no NaN/inf
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamState:
        defaults = cls()
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            default = getattr(defaults, f.name)
            if value is None and isinstance(default, float):
                value = default
            elif isinstance(default, bool):
                value = bool(value)
            elif isinstance(default, int):
                value = int(value)
            elif isinstance(default, float):
                value = float(value)
            elif isinstance(default, list):
                if not isinstance(value, list):
                    raise ValueError(f"{f.name}: expected a list")
                value = [list(map(float, v)) if isinstance(v, list) else float(v) for v in value]
            kwargs[f.name] = value
        state = cls(**kwargs)
        if len(state.tails) != N_TAILS or any(len(t) != 4 for t in state.tails):
            raise ValueError(f"tails: expected {N_TAILS} x 4 numbers")
        if any(len(entry) != 3 for entry in state.sticky):
            raise ValueError("sticky: expected [value, run length, weight] entries")
        return state


def prepare_inputs(state: StreamState, cal: Calibration, window: int, values: FloatArray,
                   tods: FloatArray) -> tuple[npt.NDArray[np.float32], FloatArray, FloatArray]:
    """Model inputs for consecutive valid readings, the difference scale each row is normalised with and
    the slow difference scale (jump sizes);
    advances ``state``'s difference history and scales (they never depend on the forecasts, so a whole
    batch can be prepared before one model invocation). Shared with training."""
    st = cal
    n = values.shape[0]
    history = np.asarray(state.history, dtype=np.float64)
    if history.shape[0] == 0:
        own = np.concatenate([[math.nan], np.diff(values)]) if n else np.zeros(0)  # the first has none
    else:
        own = np.diff(np.concatenate([history[-1:], values]))
    past = np.diff(history)[-window:] if history.shape[0] > 1 else np.zeros(0)
    past = np.concatenate([np.zeros(window - past.shape[0]), past])
    # row i's window: the `window` differences that end at the previous reading
    sequence = np.concatenate([past, np.nan_to_num(own, nan=0.0)])
    windows = np.lib.stride_tricks.sliding_window_view(sequence, window)[:n]
    new_diffs = own
    series = np.concatenate([history, values])
    scales = np.empty(n, dtype=np.float64)
    slows = np.empty(n, dtype=np.float64)
    fast, slow = state.diff_scale, state.diff_scale_slow
    a_fast, a_slow = _ewma_weight(st.diff_span), _ewma_weight(st.diff_slow_span)
    floor_ratio = st.diff_floor_ratio
    for i, diff in enumerate(new_diffs.tolist()):
        scale = max(fast, floor_ratio * slow)
        scales[i] = scale
        slows[i] = slow
        if math.isnan(diff):  # no difference yet
            continue
        size = abs(diff)
        if slow == 0.0:
            fast = slow = size
            continue
        if size > 0.0:  # scales measure real changes: a sensor resting on 0 (or saturated) keeps them
            fast += a_fast * (min(size, 8.0 * max(fast, 1e-300)) - fast)
            slow += a_slow * (min(size, 8.0 * slow) - slow)
    state.diff_scale, state.diff_scale_slow = fast, slow
    keep = window + 1
    state.history = series[-keep:].tolist()
    safe = np.where(scales > 0.0, scales, 1.0)
    normed = np.clip(windows / safe[:, None], -INPUT_CLIP, INPUT_CLIP)
    normed[scales <= 0.0] = 0.0
    inputs = np.concatenate([normed.astype(np.float32), time_features(tods)], axis=1)
    return inputs, scales, slows


@dataclass(frozen=True, slots=True)
class EpisodeChange:
    """An alert started (active) or ended, at row ``index`` of a ``process`` call."""

    index: int
    time: float
    score: float
    value: float | None
    kind: AnomalyKind
    active: bool


@dataclass(frozen=True, slots=True)
class Scored:
    scores: FloatArray  # one per row, in [0, 1]
    kinds: npt.NDArray[np.int8]  # index into KINDS
    changes: list[EpisodeChange]


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _ewma_weight(span: float) -> float:
    return 2.0 / (span + 1.0)


class _TailModel:
    """Tail probability of a non-negative statistic against its own history: the statistic is divided by
    its running mean (q); below ``tail_u`` an exponential body, above it a Pareto tail whose index comes
    from the running mean log-excess (Hill), both with priors worth ``tail_prior_n`` readings and
    ``tail_prior_k`` exceedances. State per statistic: [mean, count, exceedances, sum of log-excess]."""

    __slots__ = ("a_mean", "keep", "log_u", "prior_exc", "prior_h", "prior_k", "prior_tot", "u")

    def __init__(self, cal: Calibration, prior_h: float | None = None) -> None:
        self.a_mean = _ewma_weight(cal.tail_mean_span)
        self.keep = 1.0 - 1.0 / cal.tail_memory
        self.u = cal.tail_u
        self.log_u = math.log(cal.tail_u)
        self.prior_exc = cal.tail_prior_p * cal.tail_prior_n
        self.prior_tot = cal.tail_prior_n
        self.prior_h = (cal.tail_prior_h if prior_h is None else prior_h) * cal.tail_prior_k
        self.prior_k = cal.tail_prior_k

    def bits(self, tail: list[float], value: float) -> float:
        """-log10 of the probability of a value at least this large (0 before any history)."""
        mean = tail[0]
        if mean <= 0.0 or tail[1] < 2.0 or value <= 0.0:
            return 0.0
        q = value / mean
        log_pu = math.log10((tail[2] + self.prior_exc) / (tail[1] + self.prior_tot))
        if q <= self.u:
            return -(q / self.u) * log_pu
        h = (tail[3] + self.prior_h) / (tail[2] + self.prior_k)
        return -log_pu + (math.log(q) - self.log_u) / (h * 2.302585092994046)

    def learn(self, tail: list[float], value: float) -> None:
        mean = tail[0]
        if mean <= 0.0:
            tail[0] = value
            tail[1] += 1.0
            return
        tail[0] = mean + self.a_mean * ((value if value < 10.0 * mean else 10.0 * mean) - mean)
        keep = self.keep
        q = value / mean
        tail[1] = tail[1] * keep + 1.0
        if q > self.u:
            tail[2] = tail[2] * keep + 1.0
            tail[3] = tail[3] * keep + (math.log(q) - self.log_u)
        else:
            tail[2] *= keep
            tail[3] *= keep


class StreamDetector:
    """One stream: scores each reading before learning from it. Not thread-safe (one owner)."""

    def __init__(self, model: AnomalyModel, config: AnomalySection, state: StreamState | None = None) -> None:
        self.model = model
        self.config = config
        self.cal = model.calibration
        self.state = state if state is not None else StreamState()
        self.trace: list[list[float]] | None = None  # per-row statistic bits, for calibration work

    # ---- the whole pipeline over a batch of rows (a batch of 1 in the daemon)

    def process(self, times: Sequence[float] | FloatArray, tods: Sequence[float] | FloatArray,
                values: Sequence[float] | FloatArray) -> Scored:
        """Score rows in order. ``times``: UNIX seconds; ``tods``: local time of day in [0, 1); a NaN
        value or time is a missing reading: it is not learnt and scores as the stream's last score (or
        the dropout score of the time since the last reading, when larger)."""
        times_a = np.asarray(times, dtype=np.float64)
        tods_a = np.asarray(tods, dtype=np.float64)
        values_a = np.asarray(values, dtype=np.float64)
        valid = np.isfinite(times_a) & np.isfinite(values_a)
        valid_idx = np.flatnonzero(valid)
        inputs, scales, slows = self._prepare(values_a[valid_idx], tods_a[valid_idx])
        forecasts = self.model.predict(inputs)
        return self._score(times_a, values_a, valid, scales=scales, slows=slows, forecasts=forecasts)

    def _prepare(self, values: FloatArray, tods: FloatArray) -> tuple[npt.NDArray[np.float32], FloatArray,
                                                                     FloatArray]:
        return prepare_inputs(self.state, self.cal, self.model.window, values, tods)

    def _score(self, times: FloatArray, values: FloatArray, valid: npt.NDArray[np.bool_], *,
               scales: FloatArray, slows: FloatArray, forecasts: FloatArray) -> Scored:
        cal = self.cal
        cfg = self.config
        s = self.state
        rows = times.shape[0]
        out_scores = np.empty(rows, dtype=np.float64)
        out_kinds = np.empty(rows, dtype=np.int8)
        changes: list[EpisodeChange] = []

        log = math.log
        isnan = math.isnan
        learning = float(cfg.learning_readings)
        # statistics' histories start once the scales have settled (the first readings' residuals are junk)
        warmup = cfg.learning_readings // 3
        threshold, clear, cooldown = cfg.threshold, cfg.clear_threshold, cfg.cooldown
        a_iv = _ewma_weight(cal.interval_span)
        a_res = _ewma_weight(cal.resid_span)
        a_blend = _ewma_weight(cal.blend_span)
        a_lik = _ewma_weight(cal.likelihood_span)
        drift_span_s = cal.drift_days * 86400.0
        a_run = _ewma_weight(cal.run_span)
        tail = _TailModel(cal)
        tail_bits, tail_learn = tail.bits, tail.learn
        run_tail = _TailModel(cal, cal.run_prior_h)
        inv_bits = (1.0 / cal.bits_spike, 1.0 / cal.bits_model, 1.0 / cal.bits_step, 1.0 / cal.bits_drift,
                    1.0 / cal.bits_stuck, 1.0 / cal.bits_return, 1.0 / cal.bits_daily)
        growth = cal.envelope_growth / 86400.0
        envelope_limit, young = cal.envelope_limit, cal.envelope_young_days * 86400.0
        trace = self.trace
        table_size = int(cal.stuck_table)
        resid_floor = cal.resid_floor
        keep = tail.keep
        sqrt_step = math.sqrt(STEP_READINGS)
        stat_kinds = TAIL_KINDS

        n = s.n
        last_time, last_value, prev_value = s.last_time, s.last_value, s.prev_value
        log_iv, max_gap = s.log_interval, s.max_gap_ratio
        bias, rscale = s.resid_bias, s.resid_scale
        mse_m, mse_p = s.mse_model, s.mse_persist
        lik, drift = s.likelihood, s.drift
        recent = list(s.recent_z)
        tails = s.tails
        run_value, run_length, run_mean = s.run_value, s.run_length, s.run_mean
        sticky = s.sticky
        low, high = s.low, s.high
        env_low, env_high = s.env_low, s.env_high
        hours = s.hours
        hour_key, hour_sum, hour_count, daily_stat = s.hour_key, s.hour_sum, s.hour_count, s.daily_stat
        before_mean = _nanmean(hours[:DAILY_HOURS]) if len(hours) == HOURS_KEPT else math.nan
        recent_hours = [v for v in hours[1 - DAILY_HOURS:] if not isnan(v)]
        recent_sum, recent_count = sum(recent_hours), len(recent_hours)
        score, kind, active, episode_end = s.score, s.kind, s.active, s.episode_end

        valid_list = valid.tolist()
        times_list = times.tolist()
        values_list = values.tolist()
        scales_list = scales.tolist()
        slows_list = slows.tolist()
        forecast_list = forecasts.tolist()
        stats = [0.0] * N_TAILS
        j = 0  # index into the valid rows
        for i in range(rows):
            t = times_list[i]
            if not valid_list[i]:
                dropout = 0.0
                if not (isnan(t) or isnan(last_time) or isnan(log_iv)):
                    dropout = self._dropout_score(t - last_time, log_iv, max_gap)
                out_scores[i] = max(score, dropout)
                out_kinds[i] = kind if score >= dropout else KIND_DROPOUT
                continue
            x = values_list[i]
            if n == 0:
                s.first_time = t
            scale = scales_list[j]
            slow = slows_list[j]
            forecast = forecast_list[j]
            j += 1
            best = 0.0
            best_kind = KIND_MODEL

            # dropout: time since the previous reading against the usual interval
            gap = t - last_time if n >= 1 else 0.0
            usual_interval = math.inf if isnan(log_iv) else math.exp(log_iv)
            if gap > usual_interval:
                value_dropout = self._dropout_score(gap, log_iv, max_gap)
                if value_dropout > best:
                    best, best_kind = value_dropout, KIND_DROPOUT

            # stuck: the current run of identical values against the usual run length of that value
            entry: list[float] | None = None
            for candidate in sticky:
                if candidate[0] == run_value:
                    entry = candidate
                    break
            on_rail = run_value <= low or run_value >= high
            # a jump onto a level the stream habitually rests on (off, 0 lux, a binary state) is no spike
            at_rest = False
            for candidate in sticky:
                if candidate[0] == x:
                    at_rest = True
                    break
            if x == run_value:
                length = run_length + 1
                usual = entry[1] if entry is not None else (max(run_mean, length) if on_rail else run_mean)
                stats[4] = length / usual
            else:
                stats[4] = 0.0
            has_residual = n >= 2 and scale > 0.0
            if has_residual:
                diff_n = (x - last_value) / scale
                w = mse_p / (mse_p + mse_m)
                err_model = diff_n - forecast
                err = diff_n - w * forecast
                z = (err - bias) / rscale
                az = abs(z)
                lik_new = lik + a_lik * (log(1.0 + az) - lik)
                # mean normalised slope over about a day: daily cycles cancel, a drift does not
                a_drift = 0.01 if isnan(log_iv) else 2.0 / (drift_span_s / math.exp(log_iv) + 1.0)
                drift_new = drift + a_drift * (max(-INPUT_CLIP, min(INPUT_CLIP, diff_n)) - drift)
                step_sum = z
                for r in recent:
                    step_sum += r
                stats[0] = az
                stats[1] = lik_new
                stats[2] = abs(step_sum) / sqrt_step
                stats[3] = abs(drift_new)
                if at_rest:
                    stats[0] = stats[1] = stats[2] = stats[3] = 0.0
                    lik_new, drift_new = lik, drift
                # spike: the previous reading jumped away and this one came straight back
                jump_out = last_value - prev_value
                jump_back = x - last_value
                if jump_out * jump_back < 0.0 and slow > 0.0 and not at_rest:
                    size = min(abs(jump_out), abs(jump_back)) - abs(x - prev_value)
                    stats[5] = size / slow if size > 0.0 else 0.0
                else:
                    stats[5] = 0.0
                first = 0
            else:
                stats[0] = stats[1] = stats[2] = stats[3] = stats[5] = 0.0
                first = 4
            # daily: the last DAILY_HOURS hours (this one so far included) against the same hours a day
            # before; its history grows by one value per hour
            key = int(t // 3600.0)
            if key != hour_key:
                if hour_key >= 0:
                    if not isnan(daily_stat) and n >= warmup:
                        tail_learn(tails[6], daily_stat)
                    hours.append(hour_sum / hour_count if hour_count else math.nan)
                    for _missing in range(min(key - hour_key - 1, HOURS_KEPT)):
                        hours.append(math.nan)
                    if len(hours) > HOURS_KEPT:
                        del hours[: len(hours) - HOURS_KEPT]
                hour_key, hour_sum, hour_count = key, 0.0, 0
                # per hour: the day-before window's mean and the recent complete hours' sum and count
                before_mean = _nanmean(hours[:DAILY_HOURS]) if len(hours) == HOURS_KEPT else math.nan
                recent_hours = [v for v in hours[1 - DAILY_HOURS:] if not isnan(v)]
                recent_sum, recent_count = sum(recent_hours), len(recent_hours)
            hour_sum += x
            hour_count += 1
            daily_bits = 0.0
            daily_stat = math.nan
            if not isnan(before_mean):
                recent_mean = (recent_sum + hour_sum / hour_count) / (recent_count + 1)
                daily_stat = abs(recent_mean - before_mean)
                daily_bits = tail_bits(tails[6], daily_stat)
            stats[6] = 0.0
            stuck_bits = run_tail.bits(tails[4], stats[4])
            if has_residual:
                bits_row = [tail_bits(tails[0], stats[0]), tail_bits(tails[1], stats[1]),
                            tail_bits(tails[2], stats[2]), tail_bits(tails[3], stats[3]), stuck_bits,
                            tail_bits(tails[5], stats[5])]
            else:
                bits_row = [0.0, 0.0, 0.0, 0.0, stuck_bits, 0.0]
            bits_row.append(daily_bits)
            for k in range(first, N_TAILS):
                value_k = bits_row[k] * inv_bits[k]
                if value_k > best:
                    best, best_kind = value_k, stat_kinds[k]
            # drift: beyond everything the stream ever did
            envelope = 0.0
            if n >= 2 and env_high > env_low:
                outside = x - env_high if x > env_high else (env_low - x if x < env_low else 0.0)
                age = t - s.first_time
                limit = envelope_limit * (1.0 + young / age) if age > 0.0 else math.inf
                envelope = outside / (env_high - env_low) / limit
                if envelope > best:
                    # out of range in one jump: a spike (or the start of a step); else a drift
                    best = envelope
                    best_kind = KIND_SPIKE if abs(x - last_value) >= outside else KIND_DRIFT
            if trace is not None:
                trace.append([*bits_row, envelope])
            best = min(best, 1.0)

            # learn (everything below uses this reading; nothing above did)
            if has_residual:
                if not at_rest and n >= warmup:
                    for k in (0, 1, 2, 3, 5):
                        tail_learn(tails[k], stats[k])
                e_c = err - bias
                capped_e = e_c if abs(e_c) < 6.0 * rscale else math.copysign(6.0 * rscale, e_c)
                bias += a_res * capped_e
                rscale += a_res * (abs(capped_e) - rscale)
                rscale = max(rscale, resid_floor)
                clip_sq = 36.0 * (mse_m + mse_p)
                sq_m, sq_p = err_model * err_model, diff_n * diff_n
                mse_m += a_blend * ((sq_m if sq_m < clip_sq else clip_sq) - mse_m)
                mse_p += a_blend * ((sq_p if sq_p < clip_sq else clip_sq) - mse_p)
                mse_m = max(mse_m, 1e-6)
                mse_p = max(mse_p, 1e-6)
                lik, drift = lik_new, drift_new
                recent.append(z if az < 1e6 else math.copysign(1e6, z))
                if len(recent) >= STEP_READINGS:
                    del recent[0]
            if gap > 0.0:
                if isnan(log_iv):
                    log_iv = log(gap)
                else:
                    usual_gap = math.exp(log_iv)
                    ratio = gap / usual_gap
                    clipped = min(max(gap, 0.25 * usual_gap), 4.0 * usual_gap)
                    log_iv += a_iv * (log(clipped) - log_iv)
                    if ratio > max_gap and best < threshold:
                        max_gap = ratio
                    max_gap = 1.0 + (max_gap - 1.0) * keep
            if x == run_value:
                run_length += 1
            else:
                if run_length > 0:  # a run ended: learn its length
                    length = run_length
                    if entry is not None:
                        usual = entry[1]
                        entry[1] += a_run * (length - usual)
                        entry[2] += length
                    elif on_rail:
                        usual = max(run_mean, length)
                    else:
                        usual = run_mean
                    run_tail.learn(tails[4], length / usual)
                    if entry is None:
                        if length >= 10 and length >= 3.0 * run_mean:
                            self._track_sticky(sticky, run_value, length, table_size)
                        else:
                            run_mean += a_run * (min(length, 10.0 * run_mean) - run_mean)
                    for candidate in sticky:
                        candidate[2] *= keep
                run_value, run_length = x, 1
            if n < learning or env_high < env_low or growth <= 0.0:
                env_low, env_high = min(env_low, x), max(env_high, x)
            elif x > env_high or x < env_low:
                widen = (env_high - env_low) * growth * (gap if gap > 0.0 else 0.0)
                if x > env_high:
                    env_high = min(x, env_high + widen)
                else:
                    env_low = max(x, env_low - widen)
            low = min(low, x)
            high = max(high, x)

            ramp = n / learning if n < learning else 1.0
            n += 1
            last_time, prev_value, last_value = t, last_value, x
            score = best * ramp
            kind = best_kind
            out_scores[i] = score
            out_kinds[i] = kind
            # episodes: hysteresis and cooldown
            if active:
                if score < clear:
                    active = False
                    episode_end = t
                    changes.append(EpisodeChange(i, t, score, x, KINDS[kind], False))
            elif score >= threshold and n > learning and t - episode_end >= cooldown:
                active = True
                changes.append(EpisodeChange(i, t, score, x, KINDS[kind], True))

        s.n = n
        s.last_time, s.last_value, s.prev_value = last_time, last_value, prev_value
        s.log_interval, s.max_gap_ratio = log_iv, max_gap
        s.resid_bias, s.resid_scale = bias, rscale
        s.mse_model, s.mse_persist = mse_m, mse_p
        s.likelihood, s.drift = lik, drift
        s.recent_z = recent
        s.run_value, s.run_length, s.run_mean = run_value, run_length, run_mean
        s.low, s.high = low, high
        s.env_low, s.env_high = env_low, env_high
        s.hour_key, s.hour_sum, s.hour_count, s.daily_stat = hour_key, hour_sum, hour_count, daily_stat
        s.score, s.kind, s.active, s.episode_end = score, kind, active, episode_end
        return Scored(out_scores, out_kinds, changes)

    @staticmethod
    def _track_sticky(sticky: list[list[float]], value: float, run_length: int, table_size: int) -> None:
        """Track a value the stream sat on for a notably long run, with its own usual run length."""
        entry = [value, float(run_length), float(run_length)]
        if len(sticky) < table_size:
            sticky.append(entry)
            return
        weakest = min(range(len(sticky)), key=lambda k: sticky[k][2])
        if sticky[weakest][2] < entry[2]:
            sticky[weakest] = entry

    def _dropout_score(self, gap: float, log_iv: float, max_gap: float) -> float:
        """0 up to 1 usual interval, 1.0 at max(dropout_factor, history factor x longest gap seen)."""
        ratio = gap / math.exp(log_iv)
        if ratio <= 1.0:
            return 0.0
        limit = max(self.cal.dropout_factor, self.cal.dropout_history_factor * max_gap)
        value = math.log(ratio) / math.log(limit)
        return value if value < 1.0 else 1.0

    # ---- the daemon's view

    def dropout_now(self, now: float) -> float:
        """The dropout score if a reading arrived now (0 while learning the interval)."""
        s = self.state
        if s.n < 2 or s.log_interval != s.log_interval or s.last_time != s.last_time:
            return 0.0
        ramp = min(1.0, s.n / float(self.config.learning_readings))
        return self._dropout_score(now - s.last_time, s.log_interval, s.max_gap_ratio) * ramp


# ------------------------------------------------------------------------------------- many streams


def local_time_of_day(unix_time: float) -> float:
    """Fraction of the local day (the household's wall clock: heating schedules follow it)."""
    tm = time.localtime(unix_time)
    return ((tm.tm_hour * 60 + tm.tm_min) * 60 + tm.tm_sec + (unix_time % 1.0)) / 86400.0


class AnomalyDetector:
    """Every configured stream's detector, plus the alert/score events the daemon publishes.

    ``score(reading)`` returns an event when an alert starts or ends, or when the score moved by at least
    ``publish_delta`` or ``publish_interval`` seconds passed since the stream's last event (so the HA score
    sensor stays current without a message per reading); otherwise None.
    """

    def __init__(self, model: AnomalyModel, config: AnomalySection, publish_interval: float = 60.0,
                 publish_delta: float = 0.05) -> None:
        self.model = model
        self.config = config
        self.publish_interval = publish_interval
        self.publish_delta = publish_delta
        self.streams: dict[str, StreamDetector] = {}
        self._last_event: dict[str, tuple[float, float]] = {}  # sensor -> (time, score) last published
        self._dropout_active: dict[str, bool] = {}

    def stream(self, sensor: str) -> StreamDetector:
        detector = self.streams.get(sensor)
        if detector is None:
            detector = self.streams[sensor] = StreamDetector(self.model, self.config)
        return detector

    def score(self, reading: Reading) -> AnomalyEvent | None:
        detector = self.stream(reading.sensor)
        result = detector.process([reading.time], [local_time_of_day(reading.time)], [reading.value])
        score = float(result.scores[0])
        kind = KINDS[int(result.kinds[0])]
        self._dropout_active[reading.sensor] = False
        if result.changes:
            change = result.changes[-1]
            return self._event(reading.sensor, score, reading.value, change.kind, active=change.active,
                               when=reading.time)
        last = self._last_event.get(reading.sensor)
        if last is None or reading.time - last[0] >= self.publish_interval or abs(score - last[1]) >= \
                self.publish_delta:
            return self._event(reading.sensor, score, reading.value, kind, active=detector.state.active,
                               when=reading.time)
        return None

    def check_dropouts(self, now: float) -> list[AnomalyEvent]:
        """Streams that went silent: an alert once the dropout score reaches the threshold (the next
        reading ends it through ``score``)."""
        events: list[AnomalyEvent] = []
        for sensor, detector in self.streams.items():
            st = detector.state
            value = detector.dropout_now(now)
            if value < self.config.threshold or st.active or self._dropout_active.get(sensor):
                continue
            if st.n <= self.config.learning_readings or now - st.episode_end < self.config.cooldown:
                continue
            st.active = True
            st.score, st.kind = value, KIND_DROPOUT
            self._dropout_active[sensor] = True
            events.append(self._event(sensor, value, None, "dropout", active=True, when=now))
        return events

    def _event(self, sensor: str, score: float, value: float | None, kind: AnomalyKind, *, active: bool,
               when: float) -> AnomalyEvent:
        self._last_event[sensor] = (when, score)
        return AnomalyEvent(sensor=sensor, score=score, value=value, kind=kind, active=active, time=when)

    # ---- persistence

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "model_sha256": self.model.sha256,
                "streams": {name: det.state.to_dict() for name, det in self.streams.items()}}

    def load_state_dict(self, data: dict[str, Any]) -> None:
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported state version {data.get('version')!r}")
        if data.get("model_sha256") != self.model.sha256:
            log.warning("anomaly state was learnt with another model; every stream learns afresh")
            return
        streams = data.get("streams")
        if not isinstance(streams, dict):
            raise ValueError("'streams' is not an object")
        restored = {name: StreamState.from_dict(raw) for name, raw in streams.items()}
        for name, state in restored.items():
            self.streams[name] = StreamDetector(self.model, self.config, state)

    def save(self, path: Path) -> None:
        """Write the state atomically (temp file + rename). Raises StateError."""
        text = json.dumps(self.state_dict(), separators=(",", ":"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, path)
        except OSError as err:
            raise StateError(f"cannot write anomaly state {path}: {err.strerror}") from err

    def restore(self, path: Path) -> bool:
        """Load saved state if any. A corrupt file is moved aside (logged) and every stream starts
        learning; returns whether state was restored."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return False
        except OSError as err:
            raise StateError(f"cannot read anomaly state {path}: {err.strerror}") from err
        except UnicodeDecodeError as err:
            self._set_aside(path, f"not UTF-8 ({err.reason})")
            return False
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
            self.load_state_dict(data)
        except (ValueError, TypeError, KeyError) as err:
            self.streams.clear()
            self._set_aside(path, str(err))
            return False
        return bool(self.streams)

    @staticmethod
    def _set_aside(path: Path, reason: str) -> None:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            os.replace(path, aside)
        except OSError as err:
            raise StateError(f"anomaly state {path} is corrupt ({reason}) and cannot be moved aside: "
                             f"{err.strerror}") from err
        log.error("anomaly state %s is corrupt (%s); moved it to %s, every stream learns afresh",
                  path, reason, aside)


# -------------------------------------------------------------------------------------------- stage


class AnomalyStage:
    """The daemon's anomaly worker: ``Reading``s from a bounded queue -> ``publish(event)``; calls
    ``on_anomaly(sensor)`` when an alert starts; checks silent streams for dropouts; saves state every
    ``save_interval`` seconds and at stop. Callbacks run on the stage's thread; their errors are logged
    and counted, never fatal."""

    name = "anomaly"

    def __init__(self, detector: AnomalyDetector, readings: queue.Queue[Reading],
                 publish: Callable[[AnomalyEvent], None], on_anomaly: Callable[[str], None] | None = None, *,
                 state_path: Path | None = None, sensors: Iterable[str] | None = None,
                 dropout_check_interval: float = 10.0) -> None:
        self.detector = detector
        self.readings = readings
        self.publish = publish
        self.on_anomaly = on_anomaly
        self.state_path = state_path
        self.sensors = set(sensors) if sensors is not None else None  # None: every sensor is scored
        self.dropout_check_interval = dropout_check_interval
        self.counters = {"readings": 0, "ignored": 0, "events": 0, "alerts": 0, "callback_errors": 0,
                         "save_errors": 0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_progress = time.monotonic()
        self._active: dict[str, bool] = {}  # sensor -> alert active, as last published
        if state_path is not None:
            try:
                if detector.restore(state_path):
                    log.info("anomaly state restored for %d streams from %s", len(detector.streams),
                             state_path)
            except StateError as err:
                log.error("%s; streams learn afresh", err)

    @classmethod
    def from_app(cls, app: App) -> AnomalyStage:
        """The daemon's stage: the app's readings queue in, ``app.publish_anomaly`` out (retained, through
        the outbox), each stream's ``on_anomaly`` action through ``app.request_action``. Loads the model
        now, so a missing or corrupt model is a ModelError at startup."""
        config = app.config
        model = AnomalyModel.load(config.resolve_path(config.anomaly.model))
        actions = {s.sensor: s.on_anomaly for s in config.telemetry if s.anomaly and s.on_anomaly}

        def on_anomaly(sensor: str) -> None:
            action = actions.get(sensor)
            if action is None:
                return
            # refused (rate limit, allow-list): App.request_action has logged and counted it
            with contextlib.suppress(ActionError):
                app.request_action(ActionRequest(action=action, source="anomaly",
                                                 created_mono=time.monotonic()))

        def publish(event: AnomalyEvent) -> None:
            app.publish_anomaly(event)

        return cls(AnomalyDetector(model, config.anomaly), app.readings_queue(), publish, on_anomaly,
                   state_path=config.agent.resolved_state_dir / STATE_FILE_NAME,
                   sensors=[s.sensor for s in config.telemetry if s.anomaly])

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="anomaly", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the worker, score what is still queued (bounded by the queue), save the state."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("the anomaly worker did not stop within %.1f s", timeout)
        while self._thread is None or not self._thread.is_alive():
            try:
                reading = self.readings.get_nowait()
            except queue.Empty:
                break
            self.handle(reading)
        self.save()

    def healthy(self, now: float | None = None) -> bool:
        """The worker thread is alive and turned within the last minute (it wakes at least every second)."""
        now = time.monotonic() if now is None else now
        alive = self._thread is not None and self._thread.is_alive()
        return alive and now - self._last_progress < 60.0

    def save(self) -> None:
        if self.state_path is None:
            return
        try:
            self.detector.save(self.state_path)
        except StateError as err:
            self.counters["save_errors"] += 1
            log.error("%s", err)

    def handle(self, reading: Reading) -> None:
        """Score one reading and emit its event (public for tests and synchronous use)."""
        if self.sensors is not None and reading.sensor not in self.sensors:
            self.counters["ignored"] += 1
            return
        self.counters["readings"] += 1
        event = self.detector.score(reading)
        if event is not None:
            self._emit(event)

    def _emit(self, event: AnomalyEvent) -> None:
        self.counters["events"] += 1
        try:
            self.publish(event)
        except Exception:  # a broken publisher must not kill the stage
            self.counters["callback_errors"] += 1
            log.exception("publishing the anomaly event for %s failed", event.sensor)
        started = event.active and not self._active.get(event.sensor, False)
        self._active[event.sensor] = event.active
        if started:
            self.counters["alerts"] += 1
            log.warning("anomaly on %s: %s (score %.4f, value %s)", event.sensor, event.kind, event.score,
                        event.value)
            if self.on_anomaly is not None:
                try:
                    self.on_anomaly(event.sensor)
                except Exception:
                    self.counters["callback_errors"] += 1
                    log.exception("the on_anomaly action for %s failed", event.sensor)

    def _run(self) -> None:
        last_save = last_check = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            self._last_progress = now
            try:
                reading = self.readings.get(timeout=1.0)
            except queue.Empty:
                reading = None
            if reading is not None:
                self.handle(reading)
            now = time.monotonic()
            if now - last_check >= self.dropout_check_interval:
                last_check = now
                for event in self.detector.check_dropouts(time.time()):
                    self._emit(event)
            if now - last_save >= self.detector.config.save_interval:
                last_save = now
                self.save()
