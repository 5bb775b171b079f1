"""Soak: the real daemon for N minutes (default 60; ``--minutes 2`` for a quick check) with spoken commands
and a telemetry flood, against its own mosquitto on an ephemeral 127.0.0.1 port.

- Audio: ``examples/demo_commands.wav`` (three commands) looped into ``--audio stdin`` at real-time pace.
- Telemetry: ``--rate`` (200) messages/s over ``--sensors`` (20) zigbee2mqtt-style temperature sensors from
  a publisher thread, with a spike on one sensor every ``--spike-every`` seconds (anomaly events, outbox).
- Every ``--interval`` seconds: the daemon's RSS (VmRSS) and CPU (utime + stime), mosquitto's too, and the
  daemon's diagnostics counters (drops, outbox depth, ...).

Writes ``bench/results/soak.json``: RSS over time with its least-squares slope after a warm-up (flat means
no leak), CPU, drops, outbox depth, intents heard versus spoken, telemetry rate achieved, and the reading
path's cost: anomaly messages out per reading, the most score messages one stream published within one
``[anomaly] publish_interval``, and daemon CPU per reading (with ``--telemetry-only`` the daemon runs no
voice stage, so its CPU is the reading path's: MQTT in -> parse -> score -> publish).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
import paho.mqtt.client as paho
import soundfile as sf
from paho.mqtt.enums import CallbackAPIVersion

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "soak.json"
AUDIO = REPO_ROOT / "examples" / "demo_commands.wav"
AGENT_ID = "soak"
BASE = f"home-agent/{AGENT_ID}"
ROOMS = ("living_room", "kitchen", "bedroom", "bathroom", "hall", "office", "attic", "cellar", "garage",
         "nursery")
# demo_commands.wav: "computer, light on / computer, heat up / heat up" (the last without the wake word);
# when each command that should act ends (examples.json).
_EXAMPLES = json.loads((REPO_ROOT / "examples" / "examples.json").read_text(encoding="utf-8"))
COMMAND_ENDS = tuple(command["end"] for entry in _EXAMPLES["files"] if entry["file"] == AUDIO.name
                     for command in entry["commands"] if command.get("wake_word", True))
CHUNK_SECONDS = 0.1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

CONFIG = """\
[agent]
id = "soak"
state_dir = "{state}"
[mqtt]
port = {port}
keepalive = 15
[homeassistant]
diagnostics_interval = {interval}
{telemetry}
[actions.heating_up]
profile = "zigbee2mqtt"
device = "thermostat"
command = "setpoint"
delta = 1.0
max_setpoint = 30.0
[actions.light_on]
profile = "tasmota"
device = "livingroom_lamp"
command = "on"
[actions.fan_off]
profile = "zigbee2mqtt"
device = "ceiling_fan"
command = "off"
[voice]
[[voice.commands]]
say = "heat up"
action = "heating_up"
[[voice.commands]]
say = "light on"
action = "light_on"
[[voice.commands]]
say = "fan off"
action = "fan_off"
"""

ANOMALY = """\
[anomaly]
enabled = {anomaly}
publish_interval = {publish_interval}
cooldown = 60.0
learning_readings = 300
save_interval = 60.0
[outbox]
max_messages = 10000
"""

TELEMETRY = """\
[[telemetry]]
topic = "zigbee2mqtt/{sensor}_sensor"
field = "temperature"
sensor = "{sensor}_temperature"
min = -40.0
max = 80.0
"""


def proc_sample(pid: int) -> tuple[int, float]:
    """(VmRSS KiB, CPU seconds used so far) of a process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    return rss, cpu


def slope_per_hour(times: list[float], values: list[float]) -> float:
    """Least-squares slope of values over times (seconds), per hour."""
    if len(times) < 3:
        return float("nan")
    t = np.asarray(times)
    v = np.asarray(values, dtype=float)
    slope = float(np.polyfit(t - t[0], v, 1)[0])
    return slope * 3600.0


class Observer:
    """Counts what the agent publishes: intents, device commands, anomaly events; keeps the diagnostics."""

    def __init__(self, port: int) -> None:
        self.lock = threading.Lock()
        self.intents = 0
        self.commands: dict[str, int] = {}
        self.anomaly_events = 0
        self.anomaly_ids: set[str] = set()
        self.anomaly_times: dict[str, list[float]] = {}  # topic -> reading times of its score updates
        self.anomaly_active: dict[str, bool] = {}  # topic -> the alert state of its last message
        self.diagnostics: dict[str, Any] = {}
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="soak-observer")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([(f"{BASE}/intent", 1), (f"{BASE}/diagnostics", 0), (f"{BASE}/anomaly/#", 1),
                               ("cmnd/#", 1), ("zigbee2mqtt/+/set", 1)])
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        topic = message.topic
        with self.lock:
            if topic == f"{BASE}/intent":
                self.intents += 1
            elif topic == f"{BASE}/diagnostics":
                self.diagnostics = json.loads(message.payload)
            elif topic.startswith(f"{BASE}/anomaly/"):
                if message.payload and not message.retain:
                    self.anomaly_events += 1
                    event = json.loads(message.payload)
                    self.anomaly_ids.add(str(event.get("id")))
                    active = bool(event.get("active"))
                    if self.anomaly_active.get(topic) == active:  # a score update, not a state change
                        self.anomaly_times.setdefault(topic, []).append(float(event.get("time", 0.0)))
                    self.anomaly_active[topic] = active
            else:
                self.commands[topic] = self.commands.get(topic, 0) + 1

    def max_per_interval(self, interval: float) -> int:
        """The most score updates (messages that do not change the alert state) one stream published within
        any ``interval`` seconds of reading time."""
        most = 0
        with self.lock:
            for stamps in self.anomaly_times.values():
                start = 0
                for end, stamp in enumerate(stamps):
                    while stamp - stamps[start] >= interval:
                        start += 1
                    most = max(most, end - start + 1)
        return most

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"intents": self.intents, "commands": dict(self.commands),
                    "anomaly_events": self.anomaly_events, "anomaly_ids": len(self.anomaly_ids),
                    "diagnostics": dict(self.diagnostics)}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class TelemetryPublisher(threading.Thread):
    """``rate`` messages/s round-robin over the sensors, paced on the monotonic clock; a spike on one sensor
    every ``spike_every`` seconds."""

    def __init__(self, port: int, sensors: list[str], rate: float, spike_every: float,
                 stop: threading.Event) -> None:
        super().__init__(name="telemetry-publisher", daemon=True)
        self.sensors, self.rate, self.spike_every, self.stop_event = sensors, rate, spike_every, stop
        self.published = 0
        self.spikes = 0
        self.max_lag = 0.0
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="soak-telemetry")
        self.client.max_queued_messages_set(10_000)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def run(self) -> None:
        rng = random.Random(1)
        started = time.monotonic()
        next_spike = started + self.spike_every
        index = 0
        while not self.stop_event.is_set():
            due = started + index / self.rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            else:
                self.max_lag = max(self.max_lag, now - due)
            sensor = self.sensors[index % len(self.sensors)]
            t = time.monotonic() - started
            phase = index % len(self.sensors)
            value = 21.0 + 2.0 * math.sin(2 * math.pi * t / 600 + phase) + rng.gauss(0, 0.05)
            if sensor == self.sensors[self.spikes % len(self.sensors)] and time.monotonic() >= next_spike:
                value += 25.0
                self.spikes += 1
                next_spike += self.spike_every
            payload = json.dumps({"temperature": round(value, 3), "humidity": 45, "linkquality": 120})
            self.client.publish(f"zigbee2mqtt/{sensor}_sensor", payload, qos=0)
            self.published += 1
            index += 1
        self.client.disconnect()
        self.client.loop_stop()


class AudioFeeder(threading.Thread):
    """Writes the demo recording to the daemon's stdin in a loop, at real-time pace."""

    def __init__(self, stdin: IO[bytes], samples: np.ndarray[Any, np.dtype[np.int16]],
                 stop: threading.Event) -> None:
        super().__init__(name="audio-feeder", daemon=True)
        self.stdin, self.samples, self.stop_event = stdin, samples, stop
        self.loops = 0
        self.seconds_fed = 0.0
        self.max_lag = 0.0
        self.error: str | None = None

    def run(self) -> None:
        chunk = int(16000 * CHUNK_SECONDS)
        started = time.monotonic()
        try:
            while not self.stop_event.is_set():
                for offset in range(0, len(self.samples), chunk):
                    if self.stop_event.is_set():
                        return
                    block = self.samples[offset:offset + chunk]
                    due = started + self.seconds_fed
                    now = time.monotonic()
                    if due > now:
                        time.sleep(due - now)
                    else:
                        self.max_lag = max(self.max_lag, now - due)
                    self.stdin.write(block.astype("<i2").tobytes())
                    self.stdin.flush()
                    self.seconds_fed += len(block) / 16000
                self.loops += 1
        except (BrokenPipeError, ValueError) as err:
            self.error = f"{type(err).__name__}: {err}"


def voice_stage_stats(log_text: str) -> dict[str, Any] | None:
    for line in reversed(log_text.splitlines()):
        marker = "voice stage stopped: "
        if marker in line:
            try:
                parsed = ast.literal_eval(line.split(marker, 1)[1].strip())
            except (ValueError, SyntaxError):
                return None
            return parsed if isinstance(parsed, dict) else None
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0, help="soak duration (default 60)")
    parser.add_argument("--rate", type=float, default=200.0, help="telemetry messages per second")
    parser.add_argument("--sensors", type=int, default=20, help="telemetry streams sharing the rate")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--spike-every", type=float, default=45.0, help="seconds between telemetry spikes")
    parser.add_argument("--publish-interval", type=float, default=60.0,
                        help="[anomaly] publish_interval (default 60 s, the shipped default)")
    parser.add_argument("--telemetry-only", action="store_true",
                        help="no voice stage: the daemon's CPU is the reading path's alone")
    parser.add_argument("--anomaly-off", action="store_true",
                        help="[anomaly] enabled = false: what the reading path costs without the detector")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    from agent import __version__  # after sys.path: the bench also runs as a plain script
    from bench.broker import BenchBroker, find_mosquitto
    from bench.results_file import write_results

    if find_mosquitto() is None:
        print("soak_bench: mosquitto is not installed", file=sys.stderr)
        return 1

    samples_audio, rate = sf.read(AUDIO, dtype="int16", always_2d=False)
    if rate != 16000 or samples_audio.ndim != 1:
        print(f"soak_bench: {AUDIO} must be 16 kHz mono", file=sys.stderr)
        return 1
    duration = args.minutes * 60.0
    warmup = max(30.0, 0.2 * duration)
    results: dict[str, Any] = {
        "version": __version__, "python": sys.version.split()[0], "cpus": os.cpu_count(),
        "minutes": args.minutes, "telemetry_rate_target": args.rate, "sensors": args.sensors,
        "sample_interval_s": args.interval, "telemetry_only": args.telemetry_only,
        "anomaly_enabled": not args.anomaly_off,
        "load_average_start": os.getloadavg()[0], "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with tempfile.TemporaryDirectory(prefix="soak-bench-") as tmp:
        workdir = Path(tmp)
        broker = BenchBroker(workdir, allow_embedded=False)
        port = broker.port
        assert broker.process is not None  # mosquitto, whose own CPU and memory are sampled
        config = workdir / "config.toml"
        sensors = [f"{ROOMS[i % len(ROOMS)]}_{i // len(ROOMS)}" for i in range(args.sensors)]
        telemetry = "".join(TELEMETRY.format(sensor=s) for s in sensors)
        text = CONFIG.format(state=workdir / "state", port=port, interval=args.interval, telemetry=telemetry)
        if args.telemetry_only:
            text = text.split("[voice]", 1)[0]
        enabled = "false" if args.anomaly_off else "true"
        text += ANOMALY.format(publish_interval=args.publish_interval, anomaly=enabled)
        config.write_text(text, encoding="utf-8")
        log_path = workdir / "daemon.log"
        stop = threading.Event()
        daemon: subprocess.Popen[bytes] | None = None
        try:
            time.sleep(0.3)
            observer = Observer(port)
            setup = paho.Client(CallbackAPIVersion.VERSION2)
            setup.connect("127.0.0.1", port)
            setup.loop_start()
            setup.publish("zigbee2mqtt/thermostat", b'{"current_heating_setpoint": 20.5}', qos=1,
                          retain=True).wait_for_publish(5)
            setup.disconnect()
            setup.loop_stop()
            env = {k: v for k, v in os.environ.items() if k not in {"NOTIFY_SOCKET", "STATE_DIRECTORY"}}
            audio = [] if args.telemetry_only else ["--audio", "stdin"]
            with log_path.open("wb") as log_file:
                daemon = subprocess.Popen(
                    [sys.executable, "-m", "agent", "--log-level", "INFO", "run", "--config", str(config),
                     *audio],
                    cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=log_file, stderr=subprocess.STDOUT)
            assert daemon.stdin is not None
            deadline = time.monotonic() + 30
            while not observer.snapshot()["diagnostics"] and time.monotonic() < deadline:
                if daemon.poll() is not None:
                    raise RuntimeError("the daemon exited at startup:\n" + log_path.read_text()[-3000:])
                time.sleep(0.1)
            feeder = AudioFeeder(daemon.stdin, samples_audio, stop)
            publisher = TelemetryPublisher(port, sensors, args.rate, args.spike_every, stop)
            started = time.monotonic()
            if not args.telemetry_only:
                feeder.start()
            publisher.start()
            samples: list[dict[str, Any]] = []
            previous_cpu: tuple[float, float] | None = None
            previous_broker_cpu: float | None = None
            while True:
                now = time.monotonic()
                elapsed = now - started
                if daemon.poll() is not None:
                    raise RuntimeError(f"the daemon died after {elapsed:.0f} s:\n"
                                       + log_path.read_text()[-3000:])
                rss, cpu = proc_sample(daemon.pid)
                broker_rss, broker_cpu = proc_sample(broker.process.pid)
                cpu_percent = broker_cpu_percent = None
                if previous_cpu is not None and previous_broker_cpu is not None:
                    span = max(1e-6, now - previous_cpu[0])
                    cpu_percent = round(100.0 * (cpu - previous_cpu[1]) / span, 1)
                    broker_cpu_percent = round(100.0 * (broker_cpu - previous_broker_cpu) / span, 1)
                previous_cpu, previous_broker_cpu = (now, cpu), broker_cpu
                diag = observer.snapshot()["diagnostics"]
                samples.append({
                    "t": round(elapsed, 1), "rss_kib": rss, "cpu_percent": cpu_percent,
                    "cpu_s": round(cpu, 2), "broker_rss_kib": broker_rss,
                    "broker_cpu_percent": broker_cpu_percent,
                    "audio_s": round(feeder.seconds_fed, 1), "telemetry_sent": publisher.published,
                    **{k: diag.get(k) for k in ("messages_in", "messages_out", "dropped", "expired",
                                                "bad_payloads", "readings", "readings_dropped", "queued",
                                                "outbox_depth")},
                })
                print(f"soak {elapsed:6.0f} s: RSS {rss / 1024:.1f} MiB, CPU {cpu_percent} %, "
                      f"outbox {diag.get('outbox_depth')}, dropped {diag.get('dropped')}, "
                      f"readings_dropped {diag.get('readings_dropped')}", flush=True)
                if elapsed >= duration:
                    break
                time.sleep(max(0.0, min(args.interval, duration - elapsed)))
            end_state = observer.snapshot()
            stop.set()
            publisher.join(5)
            if not args.telemetry_only:
                feeder.join(5)
            time.sleep(args.interval + 0.5)  # the last diagnostics after the load stopped
            final = observer.snapshot()
            daemon.terminate()
            exit_code = daemon.wait(20)
            observer.close()
        finally:
            stop.set()
            if daemon is not None and daemon.poll() is None:
                daemon.kill()
                daemon.wait()
            broker.stop()
        log_text = log_path.read_text(encoding="utf-8", errors="replace")

    steady = [s for s in samples if s["t"] >= warmup]
    rss_values = [s["rss_kib"] for s in samples]
    cpu_values = [s["cpu_percent"] for s in samples if s["cpu_percent"] is not None]
    wall = samples[-1]["t"] - samples[0]["t"] if len(samples) > 1 else 0.0
    diag_end = final["diagnostics"]
    # Commands spoken: whole loops, plus those whose end was fed in the last partial loop.
    partial = feeder.seconds_fed - feeder.loops * len(samples_audio) / 16000
    spoken = feeder.loops * len(COMMAND_ENDS) + sum(1 for end in COMMAND_ENDS if end <= partial)
    results.update({
        "duration_s": round(wall, 1),
        "exit_code": exit_code,
        "load_average_end": os.getloadavg()[0],
        "rss_kib": {
            "start": rss_values[0], "end": rss_values[-1], "max": max(rss_values),
            "steady_from_s": warmup, "steady_mean": round(statistics.mean(s["rss_kib"] for s in steady), 1)
            if steady else None,
            "slope_kib_per_hour": round(slope_per_hour([s["t"] for s in steady],
                                                       [s["rss_kib"] for s in steady]), 1),
            "note": "slope: least squares over samples after the warm-up; flat = no growth",
        },
        "cpu": {
            "mean_percent": round(statistics.mean(cpu_values), 2) if cpu_values else None,
            "max_percent": round(max(cpu_values), 2) if cpu_values else None,
            "cpu_seconds": round(samples[-1]["cpu_s"] - samples[0]["cpu_s"], 2),
            "broker_mean_percent": round(statistics.mean(
                s["broker_cpu_percent"] for s in samples if s["broker_cpu_percent"] is not None), 2)
            if len(samples) > 1 else None,
        },
        "audio": {"file": AUDIO.name, "seconds_fed": round(feeder.seconds_fed, 1), "loops": feeder.loops,
                  "max_feed_lag_s": round(feeder.max_lag, 3), "feeder_error": feeder.error},
        "voice": {"intents_published": end_state["intents"], "commands_spoken": spoken,
                  "device_commands": end_state["commands"], "stage": voice_stage_stats(log_text)},
        "telemetry": {"published": publisher.published,
                      "rate_achieved": round(publisher.published / max(1e-6, wall), 1),
                      "max_publish_lag_s": round(publisher.max_lag, 3),
                      "readings_counted": diag_end.get("readings"),
                      "spikes": publisher.spikes},
        "drops": {k: diag_end.get(k) for k in ("dropped", "expired", "bad_payloads", "readings_dropped",
                                               "handler_errors", "telemetry_ignored")},
        "outbox": {"depth_max": max((s["outbox_depth"] or 0) for s in samples),
                   "depth_end": diag_end.get("outbox_depth"),
                   **{k: diag_end.get(k) for k in ("outbox_written", "outbox_delivered", "outbox_dropped",
                                                   "outbox_resent", "outbox_write_errors")}},
        "anomaly_events_received": final["anomaly_events"],
        "reading_path": {
            "anomaly_messages_per_reading": round(
                final["anomaly_events"] / max(1, diag_end.get("readings") or 0), 5),
            "messages_out_per_reading": round((diag_end.get("messages_out") or 0)
                                              / max(1, diag_end.get("readings") or 0), 4),
            "max_score_messages_per_stream_per_interval": observer.max_per_interval(args.publish_interval),
            "publish_interval_s": args.publish_interval,
            "cpu_ms_per_reading": round(1000.0 * (samples[-1]["cpu_s"] - samples[0]["cpu_s"])
                                        / max(1, publisher.published), 4),
            "note": "daemon CPU (all threads) over the run / readings published; with telemetry_only false "
                    "it includes the voice stage. messages_out counts every publish of the daemon, including "
                    "the sensor states it mirrors (a changed value, at most once per sensor and second: "
                    "agent.telemetry.StateThrottle)",
        },
        "errors_in_log": sum(1 for line in log_text.splitlines() if " ERROR " in line or "Traceback" in line),
        "samples": samples,
    })
    write_results(args.output, results)
    summary = {k: results[k] for k in ("duration_s", "rss_kib", "cpu", "drops", "outbox", "voice",
                                       "telemetry", "anomaly_events_received", "reading_path")}
    summary["rss_kib"] = {k: v for k, v in results["rss_kib"].items() if k != "note"}
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.output}")
    return 0 if exit_code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
