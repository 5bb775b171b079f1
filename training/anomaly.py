"""Train the anomaly forecaster, convert it to int8, validate the whole detector with injected faults.

    python -m training.anomaly --data ../shared/data/telemetry --out models/ [--smoke]

Stages (fixed seed, a few minutes on 2 cores; --smoke: a small subset, well under a minute or two):
1. *windows*: every numeric stream of the telemetry files, normalised exactly as at run time
   (``agent.anomaly.prepare_inputs``); target = the next normalised difference. The first 70 % of each
   stream trains, the last 30 % is held out for the forecast-error report.
2. *train*: a tiny MLP (window + 2 -> 24 -> 16 -> 1, Huber loss) in tf_keras.
3. *int8*: full-integer conversion with a fixed calibration set (1000 training windows, fixed seed).
4. *validate*: the int8 model inside the real detector: fault-free replay of every stream (false alerts
   per stream per day) and faults injected at known times (stuck, dropout, spike, drift, step) from clean
   checkpoints of that replay (detection rate and delay per kind).
5. *write*: models/anomaly.tflite, models/anomaly.json (window, features, quantisation, sha256,
   calibration constants, validation summary), models/anomaly.md (model card).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.anomaly import INPUT_CLIP, AnomalyModel, Calibration, StreamState, prepare_inputs
from agent.config import AnomalySection
from agent.paths import REPO_ROOT
from training.anomaly_data import Stream, Validation, default_telemetry_dir, load_streams, validate
from training.common import keras_verbose

log = logging.getLogger("training.anomaly")

SEED = 20240611
WINDOW = 16
HIDDEN = (24, 16)
TRAIN_FRACTION = 0.7
MAX_TRAIN_ROWS = 250_000
CALIBRATION_ROWS = 1000
MAX_MODEL_BYTES = 16 * 1024


def windows_for(stream: Stream, cal: Calibration, lo: int, hi: int) -> tuple[npt.NDArray[np.float32],
                                                                              npt.NDArray[np.float32]]:
    """Inputs and targets (next normalised difference) for readings [lo, hi) of a stream, normalised
    online from its start exactly like the runtime."""
    state = StreamState()
    if lo > 0:
        prepare_inputs(state, cal, WINDOW, stream.values[:lo], stream.tods[:lo])
    inputs, scales, _slows = prepare_inputs(state, cal, WINDOW, stream.values[lo:hi], stream.tods[lo:hi])
    previous = stream.values[lo - 1:hi - 1] if lo > 0 else np.concatenate([[np.nan], stream.values[:hi - 1]])
    diffs = stream.values[lo:hi] - previous
    with np.errstate(divide="ignore", invalid="ignore"):
        targets = np.clip(diffs / scales, -INPUT_CLIP, INPUT_CLIP)
    ok = np.isfinite(targets) & (scales > 0)
    if lo == 0:
        ok[: WINDOW + 1] = False  # windows still padded with zeros
    return inputs[ok], targets[ok].astype(np.float32)


def build_dataset(streams: list[Stream], cal: Calibration) -> dict[str, npt.NDArray[np.float32]]:
    names = ("x_train", "y_train", "x_test", "y_test")
    parts: dict[str, list[npt.NDArray[np.float32]]] = {k: [] for k in names}
    for stream in streams:
        split = int(len(stream.values) * TRAIN_FRACTION)
        x, y = windows_for(stream, cal, 0, split)
        parts["x_train"].append(x)
        parts["y_train"].append(y)
        x, y = windows_for(stream, cal, split, len(stream.values))
        parts["x_test"].append(x)
        parts["y_test"].append(y)
    data = {k: np.concatenate(v) for k, v in parts.items()}
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(data["x_train"]))[:MAX_TRAIN_ROWS]
    data["x_train"], data["y_train"] = data["x_train"][order], data["y_train"][order]
    return data


def import_tf() -> Any:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.random.set_seed(SEED)
    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return tf


def train(data: dict[str, npt.NDArray[np.float32]], epochs: int) -> Any:
    import_tf()
    import tf_keras as keras

    random.seed(SEED)
    np.random.seed(SEED)
    inputs = keras.Input(shape=(WINDOW + 2,), name="window")
    hidden = inputs
    for units in HIDDEN:
        hidden = keras.layers.Dense(units, activation="relu")(hidden)
    output = keras.layers.Dense(1, name="next_difference")(hidden)
    model = keras.Model(inputs, output, name="anomaly_forecaster")
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss=keras.losses.Huber(delta=1.0))
    model.fit(data["x_train"], data["y_train"], batch_size=512, epochs=epochs, verbose=keras_verbose(),
              validation_data=(data["x_test"], data["y_test"]), shuffle=True)
    return model


def to_int8(model: Any, data: dict[str, npt.NDArray[np.float32]]) -> bytes:
    tf = import_tf()
    rng = np.random.default_rng(SEED + 1)
    calibration = data["x_train"][rng.choice(len(data["x_train"]), CALIBRATION_ROWS, replace=False)]

    def representative() -> Any:
        for row in calibration:
            yield [row[None, :].astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return bytes(converter.convert())


def forecast_report(model: AnomalyModel, data: dict[str, npt.NDArray[np.float32]]) -> dict[str, float]:
    """Held-out mean absolute error of the next normalised difference: int8 model vs persistence."""
    x, y = data["x_test"], data["y_test"]
    pred = model.predict(x)
    return {
        "rows": len(y),
        "mae_int8_model": float(np.mean(np.abs(y - pred))),
        "mae_persistence": float(np.mean(np.abs(y))),
    }


def write_metadata(out: Path, tflite: Path, cal: Calibration, extra: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": "anomaly_forecaster",
        "window": WINDOW,
        "features": [f"diff[t-{WINDOW - i}]/scale" for i in range(WINDOW)] + ["sin(2pi tod)", "cos(2pi tod)"],
        "output": "next difference / scale",
        "input_clip": INPUT_CLIP,
        "sha256": hashlib.sha256(tflite.read_bytes()).hexdigest(),
        "size_bytes": tflite.stat().st_size,
        "seed": SEED,
        "calibration": cal.to_dict(),
        **extra,
    }
    path = out / "anomaly.json"
    path.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


def model_card(meta: dict[str, Any], summary: dict[str, Any], streams: list[Stream], smoke: bool) -> str:
    faults = summary["faults"]
    fault_rows = "\n".join(
        f"| {kind} | {label} | {f['injected']} | {f['detected']} ({100 * f['rate']:.0f} %) | "
        f"{_fmt(f['delay_min_median'])} | {_fmt(f['delay_min_p90'])} | "
        f"{', '.join(f'{k} {n}' for k, n in f['alert_kinds'].items())} |"
        for kind, all_streams in faults.items()
        for label, f in (("all", all_streams), ("1-min office", all_streams["occupancy"]),
                         ("10-min house", all_streams["appliances"])))
    stream_rows = "\n".join(
        f"| {name} | {s['days']} | {s['alerts']} | {s['per_day']:.4f} |"
        for name, s in summary["streams"].items())
    forecast = meta["forecast"]
    most_alerts = max(s["alerts"] for s in summary["streams"].values())
    worst_house = max(s["per_day"] for n, s in summary["streams"].items() if n.startswith("appliances"))
    return f"""# Model card: anomaly forecaster (`anomaly.tflite`)

{"**SMOKE RUN: a subset of the data; not the shipped model.**" if smoke else ""}

- **What**: an int8 MLP ({WINDOW} + 2 -> {' -> '.join(map(str, HIDDEN))} -> 1) that forecasts a sensor's next
  first difference, normalised by the stream's own running scale of differences, from the last {WINDOW}
  normalised differences and the time of day. One model for every stream; per-stream online adaptation
  (blend with persistence, residual bias and scale) and calibration happen in `agent/anomaly.py`.
- **Size**: {meta['size_bytes']} bytes (limit {MAX_MODEL_BYTES}). sha256 `{meta['sha256']}`.
- **Data**: UCI Occupancy Detection (Candanedo & Feldheim 2016; office temperature, humidity, light, CO2,
  humidity ratio, occupancy; 1 minute; three files) and UCI Appliances energy prediction (Candanedo et al.
  2017; a house's appliance and light energy, 9 rooms' temperature and humidity, weather, two random
  variables; 10 minutes), both CC BY 4.0. {len(streams)} streams, {sum(s.days for s in streams):.0f}
  stream-days. Training windows: the first {int(TRAIN_FRACTION * 100)} % of every stream; forecast error below
  is on the last {100 - int(TRAIN_FRACTION * 100)} %.
- **Quantisation**: full int8 (input, weights, activations, output) calibrated on {CALIBRATION_ROWS} fixed
  training windows (seed {SEED}). The residual is computed in float after the model.
- **Forecast** (held out, {forecast['rows']} windows, mean absolute error in normalised units): int8 model
  {forecast['mae_int8_model']:.4f}, persistence {forecast['mae_persistence']:.4f}.

## Validation of the whole detector (int8 model inside `agent.anomaly.StreamDetector`)

Default `[anomaly]` settings (threshold 0.99, clear 0.9, cooldown 1 h, learning 300 readings). Each
reading is scored before the detector learns from it.

**False alerts on fault-free replay**: {summary['false_alerts_total']} alerts in {summary['stream_days']}
stream-days = {summary['false_alerts_per_stream_day']:.4f} per stream per day (target <= 0.01). Per
stream (table below) no log has more than {most_alerts} alert(s); on the 1.85-day office logs a single
alert is 0.54 per day, so the per-stream rate is only meaningful on the 137-day house logs (worst
{worst_house:.4f} per day).

**Injected faults** (from clean checkpoints of the same replay, at random times after twice the learning
period, fixed seed; magnitudes relative to the stream's standard deviation sigma: spike one reading
+-5 sigma, step +-3 sigma, drift +-3 sigma per day, stuck = value frozen where the real stream moved,
dropout = no readings, detected by the daemon's silence check every minute). Delay = fault start ->
alert start, within one day (drift: within three days, or the end of the stream). The fault-free replay
and the faults use the same logs the forecaster saw 70 % of in training; the detector's calibration is
online and per stream, learnt from nothing during each replay.

| fault | streams | injected | detected | median delay (min) | p90 delay (min) | alert kinds |
|---|---|---|---|---|---|---|
{fault_rows}

Alert kinds: a step is usually first flagged as a spike (one reading cannot tell them apart); the
episode's kind is the strongest statistic when it starts. Misses are mostly faults the stream hides: a step
or spike no larger than the stream's own normal jumps (appliance power, the office light, the random
variables rv1/rv2), a value frozen at a level the stream sits on for hours (light 0 at night, the binary
Occupancy label), drifts slower than the stream's own day-to-day changes.

| stream | days | false alerts | per day |
|---|---|---|---|
{stream_rows}

## Limits
- Trained and validated on two public datasets (one office, one house); calibration is per stream and
  online, so new homes start conservative (a heavy-tailed prior) during and after the learning period.
- Drift detection depends on drift speed relative to the stream's own slow changes; slow drifts of a few
  sigma per week are not caught within a day.
"""


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.anomaly", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=default_telemetry_dir())
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--smoke", action="store_true", help="a small subset and 1 epoch (CI)")
    parser.add_argument("--validate-only", action="store_true",
                        help="re-run validation on the existing model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    started = time.monotonic()
    try:
        streams = load_streams(args.data)
    except FileNotFoundError as err:
        log.error("%s (give --data, or set TELEMETRY_DIR)", err)
        return 2
    if args.smoke:
        keep = {"appliances/T1", "appliances/RH_1"}
        streams = [s for s in streams if "datatest/" in s.name or s.name in keep]
        streams = [Stream(s.name, s.times[:4000], s.tods[:4000], s.values[:4000]) for s in streams]
    log.info("%d streams, %.0f stream-days", len(streams), sum(s.days for s in streams))
    cal = Calibration()
    args.out.mkdir(parents=True, exist_ok=True)
    tflite = args.out / "anomaly.tflite"
    data = build_dataset(streams, cal)
    log.info("windows: %d train, %d held out", len(data["x_train"]), len(data["x_test"]))
    if not args.validate_only:
        keras_model = train(data, 1 if args.smoke else args.epochs)
        blob = to_int8(keras_model, data)
        if len(blob) > MAX_MODEL_BYTES:
            raise SystemExit(f"int8 model is {len(blob)} bytes, above the {MAX_MODEL_BYTES} byte budget")
        tflite.write_bytes(blob)
        log.info("wrote %s (%d bytes)", tflite, len(blob))
        write_metadata(args.out, tflite, cal, {})
    model = AnomalyModel.load(tflite)
    forecast = forecast_report(model, data)
    log.info("forecast MAE (held out): int8 %.4f, persistence %.4f", forecast["mae_int8_model"],
             forecast["mae_persistence"])
    config = AnomalySection()
    validation: Validation = validate(model, config, streams, per_kind=1 if args.smoke else 3)
    summary = validation.summary()
    log.info("false alerts: %d in %.0f stream-days (%.4f per stream-day); faults: %s",
             summary["false_alerts_total"], summary["stream_days"], summary["false_alerts_per_stream_day"],
             {k: f"{v['detected']}/{v['injected']}" for k, v in summary["faults"].items()})
    meta = write_metadata(args.out, tflite, cal, {
        "forecast": forecast,
        "validation": {k: v for k, v in summary.items() if k != "streams"},
        "trained_on": [s.name for s in streams],
        "smoke": args.smoke,
    })
    (args.out / "anomaly.md").write_text(model_card(meta, summary, streams, args.smoke), encoding="utf-8")
    log.info("done in %.0f s", time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
