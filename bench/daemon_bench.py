"""Daemon backbone numbers: start-up time to ``online``, to every discovery config retained, RSS, clean stop
time, and how fast a flood of malformed telemetry is rejected. Writes ``bench/results/daemon.json``.

Runs the real daemon (``python -m agent run``) against its own mosquitto on an ephemeral 127.0.0.1 port,
``--runs`` times per variant: ``backbone`` (voice off) and ``voice`` (voice on: keyword model loaded; the
microphone may be absent, the agent then retries it in the background).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "daemon.json"
AGENT_ID = "bench"
BASE = f"home-agent/{AGENT_ID}"

CONFIG = """\
[agent]
id = "bench"
state_dir = "{state}"
[mqtt]
port = {port}
keepalive = 10
[homeassistant]
diagnostics_interval = 1.0
[[telemetry]]
topic = "zigbee2mqtt/sensor"
field = "temperature"
sensor = "temperature"
min = -40.0
max = 80.0
[actions.lamp_on]
topic = "lamp/set"
payload = '{{"state": "ON"}}'
[voice]
enabled = {voice}
[[voice.commands]]
say = "light on"
action = "lamp_on"
"""


class _Watcher:
    def __init__(self, port: int) -> None:
        self.lock = threading.Condition()
        self.first: dict[str, tuple[float, bytes]] = {}
        self.last: dict[str, bytes] = {}
        self.client = paho.Client(CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([(f"{BASE}/#", 0), (f"homeassistant/+/{AGENT_ID}/+/config", 0)])
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        with self.lock:
            self.first.setdefault(message.topic + "=" + message.payload.decode("utf-8", "replace")[:20],
                                  (time.monotonic(), bytes(message.payload)))
            self.last[message.topic] = bytes(message.payload)
            self.lock.notify_all()

    def reset(self) -> None:
        with self.lock:
            self.first.clear()
            self.last.clear()

    def wait(self, predicate: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.lock:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.lock.wait(remaining)
            return True

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _proc_status(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def _one_run(workdir: Path, port: int, watcher: _Watcher, voice: bool,
             expected_configs: int) -> dict[str, Any]:
    config = workdir / "config.toml"
    config.write_text(CONFIG.format(state=workdir / "state", port=port, voice="true" if voice else "false"))
    watcher.reset()
    env = {k: v for k, v in os.environ.items() if k not in {"NOTIFY_SOCKET", "STATE_DIRECTORY"}}
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "agent", "--log-level", "WARNING", "run", "--config",
                                str(config)], cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        online_key = f"{BASE}/availability=online"
        if not watcher.wait(lambda: online_key in watcher.first, 15):
            raise RuntimeError("daemon did not come online within 15 s")
        online = watcher.first[online_key][0] - started

        def configs() -> list[float]:
            return [t for k, (t, payload) in watcher.first.items()
                    if k.startswith("homeassistant/") and payload]

        watcher.wait(lambda: len(configs()) >= expected_configs, 5)
        discovery = max(configs()) - started
        time.sleep(2.0)  # settled: discovery done, diagnostics published
        status = _proc_status(process.pid)
        stop_started = time.monotonic()
        process.terminate()
        code = process.wait(10)
        stop_seconds = time.monotonic() - stop_started
        return {"online_s": round(online, 3), "discovery_retained_s": round(discovery, 3),
                "rss_kib": status.get("VmRSS"), "peak_rss_kib": status.get("VmHWM"),
                "stop_s": round(stop_seconds, 3), "exit_code": code,
                "offline_published": watcher.last.get(f"{BASE}/availability") == b"offline"}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _flood(workdir: Path, port: int, watcher: _Watcher, count: int) -> dict[str, Any]:
    config = workdir / "config.toml"
    config.write_text(CONFIG.format(state=workdir / "state", port=port, voice="false"))
    watcher.reset()
    process = subprocess.Popen([sys.executable, "-m", "agent", "--log-level", "ERROR", "run", "--config",
                                str(config)], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        if not watcher.wait(lambda: f"{BASE}/availability=online" in watcher.first, 15):
            raise RuntimeError("daemon did not come online")
        watcher.wait(lambda: f"{BASE}/diagnostics" in watcher.last, 5)
        before = json.loads(watcher.last[f"{BASE}/diagnostics"])
        publisher = paho.Client(CallbackAPIVersion.VERSION2)
        publisher.connect("127.0.0.1", port)
        publisher.loop_start()
        payloads = [b"not json", b'{"temperature": "x"}', b'{"temperature": NaN}', b"\xff\xfe", b"{" * 500]
        started = time.monotonic()
        for index in range(count):
            publisher.publish("zigbee2mqtt/sensor", payloads[index % len(payloads)]).wait_for_publish(5)
        published = time.monotonic() - started

        def counted() -> bool:
            current = json.loads(watcher.last[f"{BASE}/diagnostics"])
            return bool(current["bad_payloads"] - before["bad_payloads"] >= count)

        done = watcher.wait(counted, 30)
        elapsed = time.monotonic() - started
        publisher.disconnect()
        publisher.loop_stop()
        status = _proc_status(process.pid)
        return {"payloads": count, "all_counted": done, "publish_s": round(published, 3),
                "counted_within_s": round(elapsed, 3), "rss_kib_after": status.get("VmRSS"),
                "note": "counted_within_s includes up to 1 s diagnostics interval"}
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--flood", type=int, default=10_000)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    # Imported here, after sys.path is set up (the bench also runs as a plain script).
    from agent import __version__
    from agent.config import load_config
    from agent.discovery import discovery_messages
    from bench.broker import BenchBroker, find_mosquitto
    from bench.results_file import write_results

    if find_mosquitto() is None:
        print("daemon_bench: mosquitto is not installed", file=sys.stderr)
        return 1

    results: dict[str, Any] = {"version": __version__, "python": sys.version.split()[0],
                               "cpus": os.cpu_count(), "load_average": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="daemon-bench-") as tmp:
        workdir = Path(tmp)
        broker = BenchBroker(workdir, allow_embedded=False)
        port = broker.port
        try:
            watcher = _Watcher(port)
            for variant, voice in (("backbone", False), ("voice", True)):
                (workdir / "config.toml").write_text(CONFIG.format(state=workdir / "state", port=port,
                                                                   voice="true" if voice else "false"))
                config = load_config(workdir / "config.toml")
                event_types = ["lamp_on"] if config.voice_active else []
                expected = len(discovery_messages(config, event_types=event_types, sw_version=__version__))
                runs = [_one_run(workdir, port, watcher, voice, expected) for _ in range(args.runs)]
                summary = {key: statistics.median(r[key] for r in runs)
                           for key in ("online_s", "discovery_retained_s", "rss_kib", "peak_rss_kib",
                                       "stop_s")}
                results[variant] = {"median": summary, "runs": runs}
                print(f"{variant}: {summary}", flush=True)
            results["flood"] = _flood(workdir, port, watcher, args.flood)
            print(f"flood: {results['flood']}", flush=True)
            watcher.close()
        finally:
            broker.stop()
    write_results(RESULTS, results)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
