"""``make demo``: spoken commands become MQTT device commands, on this machine, in about 15 seconds.

Plays ``examples/demo_commands.wav`` (project-made synthetic speech: "computer, light on", "computer, heat
up", then "heat up" without the wake word, which must do nothing) into the real daemon
(``python -m agent run --audio file:... --exit-at-end``) at real-time pace, with a temporary config whose
actions drive a zigbee2mqtt thermostat and fan and a Tasmota plug. The broker is a local ``mosquitto`` on a
free port when installed, else the tiny embedded broker in ``scripts/mini_broker.py``. Prints what the
agent heard (words, times, scores) and every command it published, as it happens. Exits 1 when no device
command was published.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
sys.path.insert(0, str(REPO_ROOT))
from bench.broker import BenchBroker  # noqa: E402 - the checkout's bench package (one broker starter)

AGENT_ID = "demo"
THERMOSTAT_STATE = {"current_heating_setpoint": 20.5, "local_temperature": 19.8}
HEARD = re.compile(r"voice: heard '(?P<word>[^']+)' \(score (?P<score>[\d.]+)\) at (?P<t>[\d.]+) s")
INTENT = re.compile(r"voice: intent (?P<action>\S+) from '(?P<words>[^']*)' at (?P<t>[\d.]+) s")
PROBLEM = re.compile(r" (WARNING|ERROR|CRITICAL) ")

CONFIG = """\
# Written by scripts/demo.py for one run.
[agent]
id = "{agent_id}"
name = "home-agent demo"
state_dir = "{state_dir}"

[mqtt]
host = "127.0.0.1"
port = {port}

[audio]
realtime = true          # play the file at the pace it was spoken

[actions.heating_up]     # zigbee2mqtt thermostat: setpoint + 1 degree from its reported state
profile = "zigbee2mqtt"
device = "thermostat"
command = "setpoint"
delta = 1.0

[actions.heating_down]
profile = "zigbee2mqtt"
device = "thermostat"
command = "setpoint"
delta = -1.0

[actions.light_on]       # a Tasmota plug
profile = "tasmota"
device = "livingroom_lamp"
command = "on"

[actions.light_off]
profile = "tasmota"
device = "livingroom_lamp"
command = "off"

[actions.fan_on]         # a zigbee2mqtt switch
profile = "zigbee2mqtt"
device = "ceiling_fan"
command = "on"

[actions.fan_off]
profile = "zigbee2mqtt"
device = "ceiling_fan"
command = "off"

[voice]
wake_word = "computer"
{thresholds}
{commands}
"""

COMMANDS = {"heat up": "heating_up", "heat down": "heating_down", "light on": "light_on",
            "light off": "light_off", "fan on": "fan_on", "fan off": "fan_off"}


class Console:
    """Timestamped lines from several threads, relative to the start of the audio."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.t0: float | None = None

    def line(self, text: str, at: float | None = None) -> None:
        with self.lock:
            if at is None:
                at = time.monotonic() - self.t0 if self.t0 is not None else 0.0
            print(f"  {at:6.2f} s  {text}", flush=True)


class Watcher:
    """Subscribes to everything and prints what matters to a person watching."""

    def __init__(self, port: int, console: Console, device_topics: set[str]) -> None:
        self.console = console
        self.device_topics = device_topics
        self.commands: list[tuple[str, bytes]] = []
        self.intents: list[dict[str, Any]] = []
        self.discovery = 0
        self._connected = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="demo-watcher")
        self.client.on_connect = lambda *_a: self._connected.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        if not self._connected.wait(5):
            raise SystemExit("demo: cannot connect to the broker")
        self.client.subscribe("#", qos=1)

    def publish_retained(self, topic: str, payload: str) -> None:
        self.client.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)

    def _on_message(self, _client: Any, _userdata: Any, message: paho.MQTTMessage) -> None:
        topic, payload = message.topic, bytes(message.payload)
        text = payload.decode("utf-8", "replace")
        if topic in self.device_topics:
            self.commands.append((topic, payload))
            self.console.line(f"MQTT  ==> {topic}  {text}")
        elif topic == f"home-agent/{AGENT_ID}/intent":
            self.intents.append(json.loads(payload))
            self.console.line(f"MQTT      {topic}  {text}")
        elif topic.startswith("hermes/intent/") or topic == f"home-agent/{AGENT_ID}/event":
            self.console.line(f"MQTT      {topic}  ({len(payload)} bytes JSON)")
        elif topic.startswith("homeassistant/") and topic.endswith("/config") and payload:
            self.discovery += 1
        elif topic == f"home-agent/{AGENT_ID}/availability":
            self.console.line(f"MQTT      {topic}  {text}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_agent(config_path: Path, audio: Path, console: Console) -> tuple[int, list[str]]:
    command = [sys.executable, "-m", "agent", "--log-level", "INFO", "run", "--config", str(config_path),
               "--audio", f"file:{audio}", "--exit-at-end"]
    print(f"$ python -m agent run --config {config_path.name} --audio file:{audio.name} --exit-at-end\n",
          flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    problems: list[str] = []
    assert process.stderr is not None
    for raw in process.stderr:
        line = raw.rstrip("\n")
        if "voice: listening to" in line:
            console.t0 = time.monotonic()
            console.line(f"playing {audio.name} into the agent ...")
        elif match := HEARD.search(line):
            console.line(f"heard {match['word']!r:12} score {float(match['score']):.2f}",
                         at=float(match["t"]))
        elif match := INTENT.search(line):
            console.line(f"INTENT {match['action']}  ({match['words']})", at=float(match["t"]))
        elif PROBLEM.search(line) or line.startswith("home-agent:") or "Traceback" in line:
            problems.append(line)
            console.line(f"agent: {line.split(': ', 1)[-1] if ' agent.' in line else line}")
    return process.wait(), problems


def main() -> int:  # noqa: C901 - a linear script: options, checks, the run and its report
    parser = argparse.ArgumentParser(description="home-agent demo: spoken commands -> MQTT")
    parser.add_argument("--audio", type=Path, default=REPO_ROOT / "examples" / "demo_commands.wav")
    parser.add_argument("--wake-threshold", type=float, default=None,
                        help="override the shipped threshold of the wake word (default: the model's own)")
    parser.add_argument("--embedded-broker", action="store_true",
                        help="use the embedded mini broker even when mosquitto is installed")
    args = parser.parse_args()
    audio: Path = args.audio.resolve()
    if not (REPO_ROOT / "models" / "kws.tflite").exists():
        print("demo: models/kws.tflite is missing (build it with `make train-kws`)", file=sys.stderr)
        return 1
    if not audio.exists():
        print(f"demo: {audio} is missing", file=sys.stderr)
        return 1

    print("home-agent demo: offline voice commands -> MQTT device commands\n")
    catalogue_path = REPO_ROOT / "examples" / "examples.json"
    spoken_commands: list[dict[str, Any]] = []
    if catalogue_path.exists():
        catalogue = json.loads(catalogue_path.read_text(encoding="utf-8"))
        entry = next((f for f in catalogue.get("files", []) if f.get("file") == audio.name), None)
        if entry:
            spoken_commands = list(entry["commands"])
            print(f"The recording ({audio.name}, {entry['duration']:.1f} s, synthetic voices) says:")
            for spoken in entry["commands"]:
                wake = "computer, " if spoken.get("wake_word") else ""
                print(f"  {spoken['start']:6.2f} s  \"{wake}{spoken['say']}\"  ({spoken['engine']} "
                      f"{spoken['voice']})")
            print()

    with tempfile.TemporaryDirectory(prefix="home-agent-demo-") as tmp:
        workdir = Path(tmp)
        try:
            broker = BenchBroker(workdir, embedded=args.embedded_broker)
        except RuntimeError as err:
            raise SystemExit(f"demo: {err}") from err
        console = Console()
        watcher: Watcher | None = None
        try:
            print(f"Broker: {broker.kind} on 127.0.0.1:{broker.port}")
            commands = "\n".join(f'[[voice.commands]]\nsay = "{say}"\naction = "{action}"'
                                 for say, action in COMMANDS.items())
            config_path = workdir / "config.toml"
            thresholds = "" if args.wake_threshold is None else \
                f"thresholds = {{ computer = {args.wake_threshold} }}   # demo override of the model's own"
            config_path.write_text(CONFIG.format(agent_id=AGENT_ID, state_dir=workdir / "state",
                                                 port=broker.port, thresholds=thresholds, commands=commands),
                                   encoding="utf-8")
            device_topics = {"zigbee2mqtt/thermostat/set", "cmnd/livingroom_lamp/POWER",
                             "zigbee2mqtt/ceiling_fan/set"}
            watcher = Watcher(broker.port, console, device_topics)
            watcher.publish_retained("zigbee2mqtt/thermostat", json.dumps(THERMOSTAT_STATE))
            print("The thermostat reports (retained on zigbee2mqtt/thermostat): "
                  f"{json.dumps(THERMOSTAT_STATE)}")
            print(f"Voice commands: {', '.join(f'{s!r} -> {a}' for s, a in COMMANDS.items())}\n")
            status, problems = run_agent(config_path, audio, console)
            time.sleep(0.3)  # the last messages reach the watcher
        finally:
            if watcher is not None:
                watcher.close()
            broker.stop()

    print()
    if watcher is not None and watcher.discovery:
        print(f"Home Assistant discovery: {watcher.discovery} entity configs announced (retained).")
    print(f"Intents recognised: {len(watcher.intents) if watcher else 0}; "
          f"device commands published: {len(watcher.commands) if watcher else 0}")
    for topic, payload in watcher.commands if watcher else []:
        print(f"  {topic:32} {payload.decode('utf-8', 'replace')}")
    if spoken_commands and watcher is not None:
        recognised = [intent.get("intent") for intent in watcher.intents]  # in order; each used once
        print("\nSaid -> done:")
        for spoken in spoken_commands:
            said = ("computer, " if spoken.get("wake_word") else "") + spoken["say"]
            action = COMMANDS.get(spoken["say"])
            if spoken.get("wake_word") and action in recognised:
                recognised.remove(action)
                done = f"intent {action}"
            elif spoken.get("wake_word"):
                done = "not recognised (no action sent)"
            elif action in recognised:
                recognised.remove(action)
                done = f"intent {action} WITHOUT the wake word (wrong)"
            else:
                done = "ignored: no wake word (correct)"
            print(f"  {said!r:24} -> {done}")
    if status != 0:
        print(f"demo: the agent exited with status {status}", file=sys.stderr)
        for line in problems[-5:]:
            print(f"  {line}", file=sys.stderr)
        return 1
    if not watcher or not watcher.commands:
        print("demo: FAILED: no device command was published", file=sys.stderr)
        if watcher is not None and not watcher.intents:
            threshold = json.loads((REPO_ROOT / "models" / "kws.json").read_text(encoding="utf-8"))[
                "thresholds"].get("computer")
            print(f"  No intent: the wake word was not recognised at the model's threshold ({threshold}).\n"
                  "  `home-agent transcribe` shows what it heard; "
                  "`python scripts/demo.py --wake-threshold 0.9` tries a looser wake word.", file=sys.stderr)
        return 1
    print("\nEverything ran on this machine: no audio left it, only the MQTT commands above.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
