"""Voice path benchmark -> ``bench/results/voice.json``.

0. **New voices** (the headline, issue 13; only when the shared data exist): ``training.newvoices`` over
   everything held out from training (speakers, a synthetic engine, other wake words, long speech, noise),
   per source, through the runtime's streaming path: wake-word detection, the ten words, false wakes per clip
   and per hour, whole commands right / wrong / missing. ``--new-voices-only`` refreshes just this section.
1. **CPU** (target <= 0.01 CPU s per s of audio): ``time.process_time()`` over >= 60 s of project-made speech
   through the exact path (file source -> streaming features -> model every hop -> recognizer -> matcher), as
   fast as possible; once at 16 kHz (a microphone that does 16 kHz) and once from 44.1 kHz (resampling).
   **Side by side** (when ``../shared/peers/openwakeword`` exists; target: ours <= 0.1 of theirs): the same
   file through ``transcribe_file`` and through openWakeWord's streaming pipeline
   (``bench/openwakeword_stream.py``), interleaved, several times; medians and the ratio within this run.
2. **Daemon, real time**: the real agent (``agent.wiring.build``: App + voice stage + MQTT link, in this
   process) hears the recording at real-time pace against a real mosquitto on a free port (the embedded mini
   broker when mosquitto is not installed). **Latency** (target <= 200 ms) = when ``mosquitto_sub`` (a
   separate process) received the device command minus when the last sample of the spoken command was
   "captured" (the file source's real-time clock + the command's end in ``examples/examples.json``). Also
   the process's CPU per audio second while doing it (the honest number: a CPU that idles between hops runs
   each hop cold; target <= 0.005). The demo is dense with commands (a wake window is open about a third of
   the time, and then every 100 ms hop runs alone); ``daemon_realtime_no_wake_word`` hears
   ``heat_up_no_wake.wav`` repeated, speech without the wake word, as a household talks most of the day.
3. **Accuracy** (only when the shared data exist; ``--data``, $DATA_DIR or ../shared/data/speech): through
   ``home-agent transcribe --json`` (the contract): per-word detection rate on the held-out real speakers of
   the training split (``training.data.inventory``), and false detections per hour on ``real_long/`` and
   ``noise/`` (all of it, and its held-out part).

    .venv/bin/python -m bench.voice_bench [--quick] [--no-accuracy] [--no-new-voices] [--data DIR]

``--no-accuracy`` / ``--no-new-voices`` keep those sections of ``--out`` as they were (they only change
with the model).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf

from agent.app import RunOptions
from agent.audio import FileSource, Resampler, read_audio_file, to_int16
from agent.config import VoiceSection, parse_config
from agent.kws import KwsModel
from agent.recognizer import Command
from agent.voice import IDLE_READ_SECONDS, VoicePipeline, load_pipeline, tail_padding
from agent.wiring import build
from bench.broker import BenchBroker
from bench.openwakeword_stream import models_present as openwakeword_models_present
from bench.results_file import write_results

log = logging.getLogger("bench.voice")

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "voice.json"
EXAMPLE = REPO_ROOT / "examples" / "demo_commands.wav"
NO_WAKE_EXAMPLE = REPO_ROOT / "examples" / "heat_up_no_wake.wav"  # "heat up" said without "computer"
CATALOGUE = REPO_ROOT / "examples" / "examples.json"
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "speech"
CPU_TARGET = 0.01
DAEMON_CPU_TARGET = 0.005  # issue 13: the whole daemon, real time, per audio second
SIDE_BY_SIDE_TARGET = 0.1  # issue 13: our voice path's CPU over openWakeWord's, on the same audio
OPENWAKEWORD = REPO_ROOT.parent / "shared" / "peers" / "openwakeword"
FALLBACK_WAKE_THRESHOLD = 0.9
LATENCY_TARGET = 0.200
DEVICE_TOPICS = {"light on": "cmnd/livingroom_lamp/POWER", "heat up": "zigbee2mqtt/thermostat/set",
                 "fan off": "zigbee2mqtt/ceiling_fan/set"}
# A real clip's word ends at its last 10 ms frame within this many dB of its loudest (the demo's synthetic
# words have exact ends). The figures move with this choice (20 dB: median +50 ms; 30 dB: -40 ms).
END_FLOOR_DB = 25.0
VOCABULARY = ("computer", "on", "off", "up", "down", "stop", "go", "yes", "no", "left", "right", "light",
              "heat", "fan")


# ------------------------------------------------------------------------------------------- audio


def commands_of(name: str) -> list[dict[str, Any]]:
    catalogue = json.loads(CATALOGUE.read_text(encoding="utf-8"))
    entry = next(f for f in catalogue["files"] if f["file"] == name)
    commands: list[dict[str, Any]] = entry["commands"]
    return commands


def long_recording(workdir: Path, seconds: float,
                   example: Path = EXAMPLE) -> tuple[Path, list[dict[str, Any]], float]:
    """``example`` (default ``demo_commands.wav``) repeated to at least ``seconds``: (path, shifted commands,
    duration)."""
    piece = read_audio_file(example)
    piece_seconds = len(piece) / 16000
    repeats = max(1, int(np.ceil(seconds / piece_seconds)))
    commands = [{**c, "start": c["start"] + i * piece_seconds, "end": c["end"] + i * piece_seconds}
                for i in range(repeats) for c in commands_of(example.name)]
    path = workdir / f"{example.stem}_x{repeats}.wav"
    sf.write(path, np.tile(piece, repeats), 16000, subtype="PCM_16")
    return path, commands, repeats * piece_seconds


@functools.cache
def shared_clips(data_dir: Path) -> tuple[Any, ...]:
    """Every real clip and negative recording of the shared data with its split (``training.data.inventory``:
    it reads every `computer` clip to cluster speakers, so it runs once per bench, not once per section)."""
    from training.data import inventory

    return tuple(inventory(data_dir, synth_dir=None))


def held_out_real(data_dir: Path) -> list[Any]:
    """The real clips of speakers held out from training."""
    return [c for c in shared_clips(data_dir) if c.source == "real" and c.split == "validation"]


@functools.cache
def speech_of(path: str) -> np.ndarray | None:
    """A clip cut to its speech (by energy, END_FLOOR_DB), read once per bench; None when it holds none."""
    from training.data import speech_span

    samples = read_audio_file(Path(path))
    span = speech_span(samples, END_FLOOR_DB)
    return samples[span[0] : span[1]] if span is not None else None


def real_speaker_recording(workdir: Path, data_dir: Path, per_word: int = 8,
                           seed: int = 7) -> tuple[Path, list[dict[str, Any]], float]:
    """Held-out real speakers (never trained on) saying "computer" then one command word, ``per_word`` times
    for each word of REAL_WORD_COMMANDS, the clips cut to their speech (+50 ms) and joined with a natural
    pause: (path, commands with the word's end by energy, duration)."""
    from training.data import speech_span

    clips = held_out_real(data_dir)
    rng = np.random.default_rng(seed)
    wakes = sorted(c.path for c in clips if c.label == "computer")
    chosen = {word: list(rng.choice(sorted(c.path for c in clips if c.label == word), per_word,
                                    replace=False)) for word in REAL_WORD_COMMANDS}
    pieces: list[np.ndarray] = []
    commands: list[dict[str, Any]] = []
    cursor = 0

    def put(samples: np.ndarray) -> None:
        nonlocal cursor
        pieces.append(samples)
        cursor += len(samples)

    margin = 800  # 50 ms of each clip's own background either side of its speech
    for index in range(per_word):
        for word in REAL_WORD_COMMANDS:
            wake = read_audio_file(Path(str(rng.choice(wakes))))
            spoken = read_audio_file(Path(chosen[word][index]))
            wake_span, span = speech_span(wake, END_FLOOR_DB), speech_span(spoken, END_FLOOR_DB)
            if wake_span is None or span is None:
                continue
            put(tail_padding(0.7, seed=len(pieces)))
            put(wake[max(0, wake_span[0] - margin) : wake_span[1] + margin])
            # "computer ... up" as people say it: 0.15-0.35 s from the end of one word to the next
            put(tail_padding(max(0.0, float(rng.uniform(0.15, 0.35)) - 2 * margin / 16000), seed=len(pieces)))
            start = cursor - max(0, span[0] - margin)
            put(spoken[max(0, span[0] - margin) :])
            commands.append({"say": word, "wake_word": True, "start": (start + span[0]) / 16000,
                             "end": (start + span[1]) / 16000, "file": Path(chosen[word][index]).name})
            put(tail_padding(1.5, seed=len(pieces)))
    path = workdir / "real_speakers.wav"
    sf.write(path, np.concatenate(pieces), 16000, subtype="PCM_16")
    return path, commands, cursor / 16000


LatencyContext = Literal["one_word", "two_words"]
CONTEXT_WHAT = {
    "one_word": 'held-out real "computer", 0.15-0.35 s pause, a held-out real command word (configured: each '
                "of the ten words alone)",
    "two_words": 'held-out real "computer", 0.15-0.35 s pause, two held-out real command words 0.05-0.3 s '
                 'apart (configured: every ordered pair, as "heat up"); the latency is the second word\'s',
}


def recognition_latency(model: KwsModel, data_dir: Path, context: LatencyContext) -> dict[str, Any]:
    """From the end of a spoken command (held-out real speakers, the word's end by energy) to its intent: the
    audio time of the end of the block in which the voice pipeline (features, pause silencing, recognizer,
    command matcher) emits it, fed in the voice stage's blocks (IDLE_READ_SECONDS while no window is open,
    one hop otherwise, two when nothing can happen on the first: VoicePipeline.read_seconds), plus the time
    feeding that block took; over hundreds of voices rather than the demo's
    one (the MQTT leg: daemon_realtime_real_speakers). Also how often a wrong intent or none came."""
    words = VOCABULARY[1:11]
    if context == "one_word":
        commands = [Command((word,), word) for word in words]
    else:
        commands = [Command(pair, "_".join(pair)) for pair in itertools.permutations(words, 2)]
    pipeline = VoicePipeline(model, VoiceSection(), commands)
    held_out = held_out_real(data_dir)
    clips = [c for c in held_out if c.label in words]
    rng = np.random.default_rng(5)
    wakes = [w for w in (speech_of(c.path) for c in held_out if c.label == "computer") if w is not None]
    hop = pipeline.hop_samples
    latencies: list[float] = []
    wrong = missed = no_wake = 0
    for clip in clips:
        spoken = speech_of(clip.path)
        if spoken is None:
            continue
        parts = [tail_padding(1.0 + float(rng.uniform(0, 0.1)), seed=1), wakes[int(rng.integers(len(wakes)))],
                 tail_padding(float(rng.uniform(0.15, 0.35)), seed=2)]
        wanted = clip.label
        if context == "two_words":
            first = None
            while first is None:
                other = clips[int(rng.integers(len(clips)))]
                first = speech_of(other.path) if other.label != clip.label else None
            parts += [first, tail_padding(float(rng.uniform(0.05, 0.3)), seed=3)]
            wanted = f"{other.label}_{clip.label}"
        lead = np.concatenate(parts)
        end = (len(lead) + len(spoken)) / 16000
        audio = np.concatenate([lead, spoken, tail_padding(1.5)])
        pipeline.reset()
        woke, outcome = False, None
        offset = 0
        while offset + hop <= len(audio):  # read as the voice stage reads (VoicePipeline.read_seconds)
            seconds = pipeline.read_seconds()
            block = audio[offset : offset + (hop if seconds is None else round(seconds * 16000))]
            offset += len(block)
            started = time.perf_counter()
            events = pipeline.feed(block).events
            woke |= any(e.kind == "wake" for e in events)
            intent = next((e for e in events if e.kind == "intent"), None)
            if intent is not None:  # emitted once the block's last sample is heard and the block processed
                outcome = (intent.action, offset / 16000 + time.perf_counter() - started)
                break
        if outcome is None:
            missed += 1
            no_wake += not woke
        elif outcome[0] != wanted:
            wrong += 1
        else:
            latencies.append(outcome[1] - end)
    total = len(latencies) + wrong + missed
    return {"what": CONTEXT_WHAT[context],
            "word_end": f"last 10 ms frame within {END_FLOOR_DB:g} dB of the loudest",
            "intent_time": f"end of the block that emitted it (idle blocks {IDLE_READ_SECONDS:g} s, one hop "
                           "while a window is open, two when nothing can happen on the first) + the time "
                           "feeding that block took",
            "commands": total, "right_intent": len(latencies), "wrong_intent": wrong, "no_intent": missed,
            "no_intent_wake_word_missed": no_wake, "right_rate": round(len(latencies) / max(total, 1), 4),
            "wrong_rate": round(wrong / max(total, 1), 4),
            "latency_seconds": summary(latencies)}


# ------------------------------------------------------------------------------------------- 1. CPU


def offline_cpu(pipeline: VoicePipeline, path: Path) -> dict[str, Any]:
    """CPU seconds per audio second of the whole path over one file, as fast as possible."""
    pipeline.reset()
    source = FileSource(path, realtime=False, block_seconds=0.1)
    intents = 0
    invocations = pipeline.invocations
    started_cpu, started_wall = time.process_time(), time.perf_counter()
    with source:
        for chunk in source.chunks():
            intents += len(pipeline.feed(chunk.samples).intents)
    cpu = time.process_time() - started_cpu
    wall = time.perf_counter() - started_wall
    audio_seconds = pipeline.t_audio
    return {"audio_seconds": round(audio_seconds, 1), "cpu_seconds": round(cpu, 4),
            "cpu_seconds_per_audio_second": round(cpu / audio_seconds, 5),
            "realtime_factor": round(wall / audio_seconds, 5),
            "model_invocations": pipeline.invocations - invocations,
            "intents": intents}


def side_by_side_cpu(pipeline: VoicePipeline, path: Path, repetitions: int,
                     peers: Path = OPENWAKEWORD) -> dict[str, Any]:
    """CPU seconds per audio second of our voice path (``transcribe_file``, exactly what ``home-agent
    transcribe`` runs per file) and of openWakeWord's streaming pipeline (``bench.openwakeword_stream``, fed
    the same file in 1280-sample chunks), interleaved in one process, ``repetitions`` times each; medians and
    the ratio (the machine is shared: only the ratio within one run is comparable between runs)."""
    from agent.transcribe import transcribe_file
    from bench.openwakeword_stream import CHUNK, LeanOpenWakeWordStream, OpenWakeWordStream

    streams: dict[str, OpenWakeWordStream | LeanOpenWakeWordStream] = {
        "openwakeword": OpenWakeWordStream(peers), "openwakeword_lean": LeanOpenWakeWordStream(peers)}

    def ours() -> tuple[float, float]:
        started = time.process_time()
        result = transcribe_file(pipeline, path)
        if result.error is not None:
            raise RuntimeError(result.error)
        return time.process_time() - started, pipeline.t_audio

    def theirs(name: str) -> tuple[float, float]:
        stream = streams[name]
        stream.reset()
        source = FileSource(path, realtime=False, block_seconds=CHUNK / 16000)
        samples = 0
        started = time.process_time()
        with source:
            for chunk in source.chunks():
                if len(chunk.samples) == CHUNK:  # a partial last chunk waits for more audio in a stream
                    stream.predict(chunk.samples)
                    samples += CHUNK
        return time.process_time() - started, samples / 16000

    runs: dict[str, list[float]] = {"ours": [], **{name: [] for name in streams}}
    audio: dict[str, float] = {}
    measures: list[tuple[str, Callable[[], tuple[float, float]]]] = [
        ("ours", ours), *((name, functools.partial(theirs, name)) for name in streams)]
    ours()  # warm-up: first-call costs (imports, interpreter allocation) are not per audio second
    for repetition in range(repetitions):
        # Alternate the order, so neither side always runs right after the other's cache footprint.
        for name, measure in measures if repetition % 2 == 0 else measures[::-1]:
            cpu, seconds = measure()
            runs[name].append(cpu / seconds)
            audio[name] = seconds
    ratios = [o / t for o, t in zip(runs["ours"], runs["openwakeword"], strict=True)]
    lean_ratios = [o / t for o, t in zip(runs["ours"], runs["openwakeword_lean"], strict=True)]
    return {
        "what": "CPU s per audio s, as fast as possible, the same file for both, interleaved; ours: "
                "transcribe_file (file decode, streaming MFCC, int8 model every 100 ms, recognizer); "
                "openwakeword: openwakeword 0.6.0's Model.predict streaming path re-done with its buffers "
                "(bench/openwakeword_stream.py: melspectrogram + embedding + hey_jarvis, 80 ms chunks); "
                "openwakeword_lean: the same three models with preallocated buffers (their models' floor)",
        "audio": path.name,
        "audio_seconds": {name: round(seconds, 1) for name, seconds in audio.items()},
        "repetitions": repetitions,
        "cpu_seconds_per_audio_second": {name: {"median": round(float(np.median(values)), 5),
                                                "runs": [round(v, 5) for v in values]}
                                         for name, values in runs.items()},
        "ratio_ours_to_openwakeword": {"median": round(float(np.median(ratios)), 4),
                                       "runs": [round(r, 4) for r in ratios]},
        "ratio_ours_to_openwakeword_lean": {"median": round(float(np.median(lean_ratios)), 4),
                                            "runs": [round(r, 4) for r in lean_ratios]},
        "target_ratio": SIDE_BY_SIDE_TARGET,
    }


# ------------------------------------------------------------------------------------------- 2. daemon


class Subscriber:
    """``mosquitto_sub`` in its own process, printing the wall-clock receive time of every message; a paho
    client in this process when mosquitto_sub is missing."""

    def __init__(self, port: int, topics: list[str]) -> None:
        self.lines: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()
        self.process: subprocess.Popen[str] | None = None
        self.client: Any = None
        tool = shutil.which("mosquitto_sub")
        if tool:
            args = [tool, "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-F", "%U %t %p"]
            for topic in topics:
                args += ["-t", topic]
            self.process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        else:
            import paho.mqtt.client as paho
            from paho.mqtt.enums import CallbackAPIVersion

            self.client = paho.Client(CallbackAPIVersion.VERSION2)
            self.client.on_message = lambda _c, _u, m: self._add(time.time(), m.topic, m.payload.decode())
            self.client.connect("127.0.0.1", port)
            for topic in topics:
                self.client.subscribe(topic, 1)
            self.client.loop_start()
        time.sleep(0.5)  # subscribed before the agent starts

    def _add(self, at: float, topic: str, payload: str) -> None:
        with self._lock:
            self.lines.append((at, topic, payload))

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            stamp, topic, payload = [*line.rstrip("\n").split(" ", 2), "", ""][:3]
            self._add(float(stamp), topic, payload)

    def stop(self) -> list[tuple[float, str, str]]:
        time.sleep(0.3)
        if self.process is not None:
            self.process.terminate()
            self.process.wait(5)
            self._reader.join(5)  # it has read everything up to the end of the pipe
            if self.process.stdout is not None:
                self.process.stdout.close()
        if self.client is not None:
            self.client.loop_stop()
            self.client.disconnect()
        with self._lock:
            return list(self.lines)


# Real held-out speakers say one command word after "computer"; each word has its own device, so a wrong word
# is seen as a wrong topic.
REAL_WORD_COMMANDS = {"on": "light_on", "off": "hall_light_off", "up": "heating_up", "down": "fan_off"}
REAL_DEVICE_TOPICS = {"on": "cmnd/livingroom_lamp/POWER", "off": "cmnd/hall_lamp/POWER",
                      "up": "zigbee2mqtt/thermostat/set", "down": "zigbee2mqtt/ceiling_fan/set"}
DEMO_COMMANDS = {"light on": "light_on", "heat up": "heating_up", "fan off": "fan_off"}


def daemon_config(port: int, state_dir: Path, thresholds: dict[str, float] | None = None,
                  model: Path | None = None, commands: dict[str, str] | None = None) -> dict[str, Any]:
    """``commands``: phrase -> action (default: the demo's three)."""
    return {
        "agent": {"id": "bench", "state_dir": str(state_dir)},
        "mqtt": {"host": "127.0.0.1", "port": port},
        "audio": {"realtime": True},
        "actions": {
            "light_on": {"profile": "tasmota", "device": "livingroom_lamp", "command": "on",
                         "min_interval": 0},
            "hall_light_off": {"profile": "tasmota", "device": "hall_lamp", "command": "off",
                               "min_interval": 0},
            "heating_up": {"profile": "zigbee2mqtt", "device": "thermostat", "command": "setpoint",
                           "value": 21.0, "min_interval": 0},
            "fan_off": {"profile": "zigbee2mqtt", "device": "ceiling_fan", "command": "off",
                        "min_interval": 0},
        },
        "voice": {"thresholds": thresholds or {}, "model": str(model or REPO_ROOT / "models" / "kws.tflite"),
                  "commands": [{"say": say, "action": action}
                               for say, action in (commands or DEMO_COMMANDS).items()]},
    }


def realtime_daemon(workdir: Path, path: Path, commands: list[dict[str, Any]],  # noqa: PLR0917
                    thresholds: dict[str, float] | None, model: Path | None,
                    phrases: dict[str, str] | None = None,
                    device_topics: dict[str, str] | None = None) -> dict[str, Any]:
    """The agent hearing ``path`` in real time; ``commands``: what is spoken when (say, end, wake_word),
    ``phrases``: the configured phrase -> action, ``device_topics``: phrase -> its action's topic."""
    device_topics = device_topics or DEVICE_TOPICS
    broker = BenchBroker(workdir)
    try:
        config = parse_config(daemon_config(broker.port, workdir / "state", thresholds, model, phrases))
        topics = [*sorted(set(device_topics.values())), "home-agent/bench/intent"]
        subscriber = Subscriber(broker.port, topics)
        daemon = build(config, options=RunOptions(audio=f"file:{path}", exit_at_end=True))
        app = daemon.app
        stage = daemon.voice
        assert stage is not None
        source = stage.source
        assert isinstance(source, FileSource)
        wall_minus_mono = time.time() - time.monotonic()
        cpu_before = time.process_time()
        runner = threading.Thread(target=app.run, name="bench-app")
        runner.start()
        runner.join()
        cpu = time.process_time() - cpu_before
        received = subscriber.stop()
    finally:
        broker.stop()
    if source.started_mono is None:
        raise RuntimeError("the file source never started")
    started_wall = source.started_mono + wall_minus_mono
    latencies: list[float] = []
    intent_latencies: list[float] = []
    used: set[int] = set()
    missed = wrong = 0
    device_commands = set(device_topics.values())
    for command in commands:
        topic = device_topics.get(command["say"])
        if topic is None or not command.get("wake_word", True):
            continue
        spoken_end = started_wall + command["end"]
        match = next((i for i, (at, t, _p) in enumerate(received)
                      if i not in used and t == topic and spoken_end - 0.5 <= at <= spoken_end + 5.0), None)
        if match is None:
            missed += 1
            wrong += any(t in device_commands and spoken_end - 0.5 <= at <= spoken_end + 3.0
                         for at, t, _p in received)
            continue
        used.add(match)
        latencies.append(received[match][0] - spoken_end)
        intent = next((at for at, t, _p in received if t.endswith("/intent") and
                       spoken_end - 0.5 <= at <= spoken_end + 5.0), None)
        if intent is not None:
            intent_latencies.append(intent - spoken_end)
    audio_seconds = stage.pipeline.t_audio
    return {
        "broker": broker.kind,
        "audio_seconds": round(audio_seconds, 1),
        "process_cpu_seconds_per_audio_second": round(cpu / audio_seconds, 5),
        "commands_spoken": sum(1 for c in commands if c["say"] in device_topics),
        "commands_published": len(latencies),
        "commands_missed": missed,
        "commands_missed_another_action_instead": wrong,
        "latency_seconds": summary(latencies),
        "intent_latency_seconds": summary(intent_latencies),
        "voice_stats": stage.stats(),
    }


def repeated_daemon(runs: int, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``realtime_daemon`` ``runs`` times: the run with the median CPU figure, and every run's figure (one run
    on this shared machine has read anywhere from 0.003 to 0.0055 CPU-s per audio second)."""
    measured = [realtime_daemon(*args, **kwargs) for _ in range(max(1, runs))]
    key = "process_cpu_seconds_per_audio_second"
    median = sorted(measured, key=lambda run: run[key])[len(measured) // 2]
    return {**median, f"{key}_runs": [run[key] for run in measured]}


def summary(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    array = np.array(values)
    return {"n": len(values), "median": round(float(np.median(array)), 4),
            "p90": round(float(np.percentile(array, 90)), 4), "max": round(float(array.max()), 4),
            "min": round(float(array.min()), 4)}


# ------------------------------------------------------------------------------------------- 3. accuracy


def transcribe(paths: list[Path]) -> list[dict[str, Any]]:
    """``home-agent transcribe --json`` over many files (in batches: the command line has a length limit)."""
    results: list[dict[str, Any]] = []
    for start in range(0, len(paths), 2000):
        batch = [str(p) for p in paths[start : start + 2000]]
        output = subprocess.run([sys.executable, "-m", "agent", "transcribe", "--json", *batch],
                                cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        if output.returncode not in (0, 1):
            raise RuntimeError(f"transcribe failed: {output.stderr[-2000:]}")
        results += [json.loads(line) for line in output.stdout.splitlines()]
    return results


def accuracy(data_dir: Path) -> dict[str, Any]:
    clips = shared_clips(data_dir)
    held_out = held_out_real(data_dir)
    held_words = [c for c in held_out if c.label in VOCABULARY]
    held_other = [c for c in held_out if c.label == "_unknown_"]
    per_word: dict[str, dict[str, Any]] = {}
    started = time.process_time()
    word_results = transcribe([Path(c.path) for c in held_words])
    for clip, result in zip(held_words, word_results, strict=True):
        heard = [d["word"] for d in result.get("detections", [])]
        entry = per_word.setdefault(clip.label, {"n": 0, "detected": 0, "only_this_word": 0})
        entry["n"] += 1
        entry["detected"] += clip.label in heard
        entry["only_this_word"] += bool(heard) and set(heard) == {clip.label}
    for entry in per_word.values():
        entry["detection_rate"] = round(entry["detected"] / entry["n"], 4)
        entry["exclusive_rate"] = round(entry["only_this_word"] / entry["n"], 4)
    commands = [w for w in VOCABULARY[1:11] if w in per_word]
    other_results = transcribe([Path(c.path) for c in held_other])
    other_words = Counter(d["word"] for r in other_results for d in r.get("detections", []))

    negatives = [c for c in clips if c.source in ("long", "noise")]
    negative_results = transcribe([Path(c.path) for c in negatives])
    by_path = {r["file"]: r for r in negative_results}
    durations = {c.path: sf.info(c.path).duration for c in negatives}

    def false_rate(subset: list[Any]) -> dict[str, Any]:
        hours = sum(durations[c.path] for c in subset) / 3600
        counts = Counter(d["word"] for c in subset for d in by_path[c.path].get("detections", []))
        return {"hours": round(hours, 3), "files": len(subset),
                "false_wakes": counts.get("computer", 0),
                "false_wakes_per_hour": round(counts.get("computer", 0) / hours, 3) if hours else None,
                "false_words": dict(counts),
                "false_words_per_hour": round(sum(counts.values()) / hours, 3) if hours else None}

    return {
        "data_dir": str(data_dir),
        "held_out_word_clips": len(held_words),
        "per_word": dict(sorted(per_word.items())),
        "mean_detection_rate_commands":
            round(float(np.mean([per_word[w]["detection_rate"] for w in commands])), 4) if commands else None,
        "held_out_other_words": {"clips": len(held_other), "detections": dict(other_words),
                                 "false_wake_rate": round(other_words.get("computer", 0) / len(held_other), 4)
                                 if held_other else None},
        "false_detections_all": false_rate(negatives),
        "false_detections_held_out": false_rate([c for c in negatives if c.split == "validation"]),
        "transcribe_cpu_seconds_in_bench": round(time.process_time() - started, 2),
    }


# ------------------------------------------------------------------------------------------- main


def verdict(results: dict[str, Any]) -> dict[str, Any]:
    """Each measured figure against its target."""
    cpu = results["cpu_16k"]["cpu_seconds_per_audio_second"]
    realtime = results.get("daemon_realtime_loose_wake", results["daemon_realtime"])
    latency = realtime["latency_seconds"]
    checks: dict[str, Any] = {
        "cpu_ok": cpu <= CPU_TARGET,
        "daemon_cpu_ok": realtime["process_cpu_seconds_per_audio_second"] <= DAEMON_CPU_TARGET,
        "latency_measured_with": realtime["threshold_overrides"] or "shipped thresholds",
        "latency_ok": latency is not None and latency["max"] <= LATENCY_TARGET,
        "latency_median_ok": latency is not None and latency["median"] <= LATENCY_TARGET,
    }
    side = results.get("cpu_side_by_side_openwakeword")
    if side:
        checks["cpu_ratio_to_openwakeword_ok"] = \
            side["ratio_ours_to_openwakeword"]["median"] <= SIDE_BY_SIDE_TARGET
    real = results.get("daemon_realtime_real_speakers", {}).get("latency_seconds")
    if real:
        checks["real_speakers_latency_median_ok"] = real["median"] <= LATENCY_TARGET
        checks["real_speakers_latency_p90_ok"] = real["p90"] <= LATENCY_TARGET
    for context, measured in results.get("recognition_latency_held_out", {}).items():
        latency = measured["latency_seconds"]
        if latency:
            checks[f"held_out_{context}_recognition_p90_ok"] = latency["p90"] <= LATENCY_TARGET
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="voice path benchmark")
    parser.add_argument("--quick", action="store_true", help="30 s instead of 60+ s of audio per measurement")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the shared-data accuracy part")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("DATA_DIR", DEFAULT_DATA)))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--model", type=Path, default=None, help="keyword model (default: the shipped one)")
    parser.add_argument("--new-voices-only", action="store_true",
                        help="only (re)measure the new-voices headline, keeping the rest of --out")
    parser.add_argument("--no-new-voices", action="store_true",
                        help="skip the new-voices headline, keeping that section of --out")
    parser.add_argument("--repetitions", type=int, default=5,
                        help="side-by-side CPU runs of each pipeline (medians)")
    parser.add_argument("--daemon-runs", type=int, default=3,
                        help="real-time daemon runs per recording (the median run is reported)")
    parser.add_argument("--wake-threshold", type=float, default=None,
                        help="override the wake word's threshold for the latency run (recorded in the JSON)")
    args = parser.parse_args(argv)
    logging.getLogger("agent").setLevel(logging.WARNING)
    seconds = 30.0 if args.quick else 66.0

    pipeline = load_pipeline(parse_config(daemon_config(1883, Path(tempfile.gettempdir()), model=args.model)))
    model = pipeline.model
    results: dict[str, Any] = {
        "bench": "voice",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "model": {"path": str(model.path.relative_to(REPO_ROOT)) if model.path.is_relative_to(REPO_ROOT)
                  else str(model.path), "sha256": model.sha256, "size_bytes": model.size_bytes,
                  "provisional": bool(model.metadata.get("provisional", False))},
        "hop_seconds": pipeline.hop_seconds,
        "smoothing_seconds": model.smoothing_seconds,
        "targets": {"cpu_seconds_per_audio_second": CPU_TARGET, "latency_seconds": LATENCY_TARGET,
                    "daemon_cpu_seconds_per_audio_second": DAEMON_CPU_TARGET,
                    "cpu_ratio_to_openwakeword": SIDE_BY_SIDE_TARGET},
    }
    previous = json.loads(args.out.read_text(encoding="utf-8")) if args.out.exists() else {}
    kept = [key for key, skipped in (("new_voices", args.no_new_voices), ("accuracy", args.no_accuracy))
            if skipped and key in previous]
    if (args.data / "real").is_dir() and not args.no_new_voices:
        from training.newvoices import evaluate as new_voices

        log.info("new voices: every held-out source through the streaming path")
        results["new_voices"] = new_voices(model.path, args.data)
    elif "new_voices" in kept:
        results["new_voices"] = previous["new_voices"]
    if args.new_voices_only:
        merged = {**results, **{k: v for k, v in previous.items() if k not in results}}
        write_results(args.out, merged, indent=2)
        print(json.dumps(results.get("new_voices", {}).get("headline"), indent=2))
        return 0
    with tempfile.TemporaryDirectory(prefix="voice-bench-") as tmp:
        workdir = Path(tmp)
        path16, _commands, duration = long_recording(workdir, 30.0 if args.quick else 120.0)
        samples = read_audio_file(path16)
        path44 = workdir / "demo_44k1.wav"
        sf.write(path44, to_int16(Resampler(16000, 44100).process(samples / 32768.0)), 44100)
        log.info("CPU: %.0f s of audio through the voice path", duration)
        results["cpu_16k"] = offline_cpu(pipeline, path16)
        results["cpu_44k1_resampled"] = offline_cpu(pipeline, path44)
        if openwakeword_models_present(OPENWAKEWORD):
            log.info("CPU side by side with openWakeWord, %d runs each", args.repetitions)
            results["cpu_side_by_side_openwakeword"] = side_by_side_cpu(pipeline, path16, args.repetitions)
        path_rt, commands_rt, duration_rt = long_recording(workdir, seconds)
        log.info("daemon: %.0f s of audio at real-time pace", duration_rt)
        overrides = {"computer": args.wake_threshold} if args.wake_threshold is not None else None
        results["daemon_realtime"] = repeated_daemon(args.daemon_runs, workdir, path_rt, commands_rt,
                                                     overrides, args.model)
        results["daemon_realtime"]["threshold_overrides"] = overrides or {}
        # A household talking without the wake word (most of a day): the voice path stays idle throughout.
        path_idle, commands_idle, duration_idle = long_recording(workdir, seconds, NO_WAKE_EXAMPLE)
        log.info("daemon: %.0f s of speech without the wake word at real-time pace", duration_idle)
        results["daemon_realtime_no_wake_word"] = repeated_daemon(args.daemon_runs, workdir, path_idle,
                                                                  commands_idle, None, args.model)
        if not results["daemon_realtime"]["commands_published"] and overrides is None:
            # The shipped wake threshold rejected every synthetic wake word: measure the latency mechanics
            # with a looser one too, recorded as such (the accuracy section is always the shipped model's).
            log.info("daemon: no command recognised with the shipped thresholds; again with computer = %.2f",
                     FALLBACK_WAKE_THRESHOLD)
            loose = {"computer": FALLBACK_WAKE_THRESHOLD}
            results["daemon_realtime_loose_wake"] = repeated_daemon(args.daemon_runs, workdir, path_rt,
                                                                    commands_rt, loose, args.model)
            results["daemon_realtime_loose_wake"]["threshold_overrides"] = loose
        if (args.data / "real").is_dir():
            path_real, commands_real, duration_real = real_speaker_recording(workdir, args.data,
                                                                             4 if args.quick else 8)
            log.info("daemon: %.0f s of held-out real speakers at real-time pace", duration_real)
            results["daemon_realtime_real_speakers"] = repeated_daemon(
                args.daemon_runs, workdir, path_real, commands_real, None, args.model, REAL_WORD_COMMANDS,
                REAL_DEVICE_TOPICS)
            results["recognition_latency_held_out"] = {
                context: recognition_latency(model, args.data, context)
                for context in ("one_word", "two_words")}
    if not args.no_accuracy:
        if (args.data / "real").is_dir():
            log.info("accuracy: transcribing held-out real speakers and negatives in %s", args.data)
            results["accuracy"] = accuracy(args.data)
        else:
            results["accuracy"] = {"skipped": f"no data at {args.data}"}
    elif "accuracy" in kept:
        results["accuracy"] = previous["accuracy"]

    results["verdict"] = verdict(results)
    if "enrolment" in previous:  # bench/enroll_bench.py's section
        results["enrolment"] = previous["enrolment"]
    write_results(args.out, results, indent=2)
    shown = ("cpu_side_by_side_openwakeword", "cpu_16k", "cpu_44k1_resampled", "daemon_realtime",
             "daemon_realtime_no_wake_word",
             "daemon_realtime_loose_wake", "daemon_realtime_real_speakers", "recognition_latency_held_out",
             "verdict")
    print(json.dumps({k: results[k] for k in shown if k in results}, indent=2))
    if "accuracy" in results:
        print(json.dumps(results["accuracy"], indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise SystemExit(main())
