"""Arbitration benchmark -> ``bench/results/arbitration.json``.

Three real daemons (``home-agent run --audio stdin``, agent ids kitchen/living/hall, one ``[arbitration]``
group) on one private mosquitto hear the same utterances in step, each in its own room: a constant noise floor
per agent (white noise, RMS 40 / 80 / 160) and, per utterance, its own speech gain (0 to -20 dB: the speaker
moves about) and arrival delay (0-50 ms: distance). The speech is the project's synthetic examples the model
hears (``computer, heat up`` and ``computer, light on``); an utterance's true SNR at an agent is its speech
RMS over that agent's noise RMS. Scenarios keep the best agent at least ``MIN_MARGIN_DB`` above the second: a
smaller difference is not "heard better" in any useful sense. A test helper (``Group.play``) writes every
agent's audio to its stdin at real-time pace, all in one loop. Measured:

1. **Exactly one action per utterance** (target: 100 actions for 100 utterances): device commands on the
   broker per utterance, and which agent published the intent.
2. **The best-SNR agent acts** (target >= 95 %); also how often each agent heard (claimed) at all, and how
   its SNR estimate ranks against the truth.
3. **Latency of a lone agent** (target: p90 rises by at most the window): end of the spoken command -> its
   intent on the broker, for one daemon without ``[arbitration]`` and one alone in a group hearing the same
   utterances side by side (the same machine load for both).

    .venv/bin/python -m bench.arbitration_bench [--utterances 100] [--latency-utterances 30] [--seed 1]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from agent.audio import SAMPLE_RATE, read_audio_file
from bench.broker import BenchBroker
from bench.results_file import write_results
from bench.voice_bench import CATALOGUE, DEVICE_TOPICS, Subscriber, daemon_config, summary

log = logging.getLogger("bench.arbitration")

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "arbitration.json"
# The examples the model hears (computer_fan_off.wav is a known miss): file -> the phrase after "computer".
EXAMPLES = {"computer_heat_up.wav": "heat up", "computer_light_on.wav": "light on"}
PHRASES = {"heat up": "heating_up", "light on": "light_on"}
ACTION_TOPICS = {PHRASES[phrase]: DEVICE_TOPICS[phrase] for phrase in PHRASES}
GROUP = "home"
WINDOW = 0.15
AGENT_NOISE = {"kitchen": 40.0, "living": 80.0, "hall": 160.0}  # white noise RMS (int16) per room
GAIN_DB = (-20.0, 0.0)  # per utterance and agent
MAX_DELAY = 0.05  # seconds, per utterance and agent
MIN_MARGIN_DB = 3.0
LEAD_SECONDS = 3.0  # noise before the first utterance: each agent learns its room's noise floor
GAP_SECONDS = 1.0  # after each example (which has its own ~1 s of silence at the end)
TAIL_SECONDS = 3.0  # after the last utterance: decisions and actions complete
CHUNK_SECONDS = 0.02
ONLINE_TIMEOUT = 60.0
MATCH_BEFORE, MATCH_AFTER = 0.5, 3.0  # an action belongs to an utterance whose command ended in this span


# ------------------------------------------------------------------------------------------- audio


@dataclass(frozen=True, slots=True)
class Example:
    file: str
    action: str
    samples: npt.NDArray[np.float64]
    command_end: float  # seconds into the file: the end of the last command word
    speech_rms: float  # RMS of the frames that carry speech

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE

    @classmethod
    @functools.cache
    def load(cls, file: str) -> Example:
        catalogue = json.loads(CATALOGUE.read_text(encoding="utf-8"))
        entry = next(f for f in catalogue["files"] if f["file"] == file)
        samples = read_audio_file(REPO_ROOT / "examples" / file).astype(np.float64)
        frames = samples[: len(samples) // 320 * 320].reshape(-1, 320)
        energy = np.mean(frames * frames, axis=1)
        speech = energy[energy > energy.max() * 1e-3]
        return cls(file, PHRASES[EXAMPLES[file]], samples, float(entry["commands"][0]["end"]),
                   float(np.sqrt(speech.mean())))


@dataclass(frozen=True, slots=True)
class Utterance:
    example: Example
    start: float  # seconds into the stream (before each agent's own delay)
    gain_db: Mapping[str, float]
    delay: Mapping[str, float]

    def snr(self, agent: str, noise: Mapping[str, float]) -> float:
        """The true SNR at ``agent``, dB."""
        speech = self.example.speech_rms * 10 ** (self.gain_db[agent] / 20)
        return 20.0 * float(np.log10(speech / noise[agent]))

    def best(self, noise: Mapping[str, float]) -> str:
        return max(self.gain_db, key=lambda agent: self.snr(agent, noise))

    def command_end(self, agent: str) -> float:
        """Seconds into ``agent``'s stream at which the spoken command ended."""
        return self.start + self.delay[agent] + self.example.command_end


def scenario(count: int, noise: Mapping[str, float], *, seed: int, min_margin_db: float = MIN_MARGIN_DB,
             gain_db: tuple[float, float] = GAIN_DB, max_delay: float = MAX_DELAY) -> list[Utterance]:
    """``count`` utterances, back to back after the lead-in; random example, gains and delays per agent."""
    rng = np.random.default_rng(seed)
    examples = [Example.load(file) for file in EXAMPLES]
    utterances: list[Utterance] = []
    start = LEAD_SECONDS
    while len(utterances) < count:
        example = examples[int(rng.integers(len(examples)))]
        gains = {agent: float(rng.uniform(*gain_db)) for agent in noise}
        delays = {agent: float(rng.uniform(0.0, max_delay)) for agent in noise}
        utterance = Utterance(example, start, gains, delays)
        snrs = sorted((utterance.snr(agent, noise) for agent in noise), reverse=True)
        if len(snrs) > 1 and snrs[0] - snrs[1] < min_margin_db:
            continue  # no clear best: draw again
        utterances.append(utterance)
        start += example.seconds + GAP_SECONDS
    return utterances


def planned(files: Sequence[str], delays: Sequence[Mapping[str, float]],
            gain_db: Mapping[str, float] | None = None) -> list[Utterance]:
    """Utterances back to back after the lead-in: these examples, these per-agent delays (gain 0 dB unless
    ``gain_db`` says otherwise)."""
    utterances: list[Utterance] = []
    start = LEAD_SECONDS
    for file, delay in zip(files, delays, strict=True):
        example = Example.load(file)
        utterances.append(Utterance(example, start, dict(gain_db or dict.fromkeys(delay, 0.0)), dict(delay)))
        start += example.seconds + GAP_SECONDS
    return utterances


def render(utterances: Sequence[Utterance], noise: Mapping[str, float], *, seed: int) -> dict[str, bytes]:
    """Each agent's whole stream as raw S16_LE: its room's noise, every utterance at its gain and delay."""
    last = utterances[-1]
    seconds = last.start + max(last.delay.values()) + last.example.seconds + TAIL_SECONDS
    rng = np.random.default_rng(seed + 1)
    streams: dict[str, bytes] = {}
    for agent, rms in noise.items():
        audio = rng.normal(0.0, rms, round(seconds * SAMPLE_RATE))
        for utterance in utterances:
            at = round((utterance.start + utterance.delay[agent]) * SAMPLE_RATE)
            speech = utterance.example.samples * 10 ** (utterance.gain_db[agent] / 20)
            audio[at : at + len(speech)] += speech
        streams[agent] = np.clip(np.round(audio), -32768, 32767).astype("<i2").tobytes()
    return streams


# ------------------------------------------------------------------------------------------- daemons


def agent_config(port: int, workdir: Path, agent: str, *, group: str | None = GROUP,
                 window: float = WINDOW) -> dict[str, Any]:
    """The voice bench's daemon config with this agent's id and state, the two phrases, and arbitration."""
    config = daemon_config(port, workdir / agent, commands=PHRASES)
    config["agent"]["id"] = agent
    config["homeassistant"] = {"diagnostics_interval": 1.0}
    if group is not None:
        config["arbitration"] = {"group": group, "window": window}
    return config


def toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """Enough TOML for these configs: scalars, strings, tables, arrays of tables."""
    lines, tables = [], []
    for key, value in data.items():
        table_array = isinstance(value, list) and bool(value) and isinstance(value[0], Mapping)
        if isinstance(value, Mapping) or table_array:
            tables.append((key, value))
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    out = "".join(line + "\n" for line in lines)
    for key, value in tables:
        if isinstance(value, list):
            out += "".join(f"\n[[{prefix}{key}]]\n" + toml(item, f"{prefix}{key}.") for item in value)
        else:
            out += f"\n[{prefix}{key}]\n" + toml(value, f"{prefix}{key}.")
    return out


class AgentProcess:
    """``home-agent run --audio stdin`` with its own config, logging to a file; ``stdin`` takes the audio."""

    def __init__(self, workdir: Path, config: Mapping[str, Any]) -> None:
        self.agent = str(config["agent"]["id"])
        self.config_path = workdir / f"{self.agent}.toml"
        self.config_path.write_text(toml(config), encoding="utf-8")
        self.log_path = workdir / f"{self.agent}.log"
        self._log = self.log_path.open("wb")
        environment = {k: v for k, v in os.environ.items()
                       if k not in {"STATE_DIRECTORY", "NOTIFY_SOCKET", "HOME_AGENT_MQTT_PASSWORD"}}
        environment["PYTHONUNBUFFERED"] = "1"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent", "--log-level", "INFO", "run", "--config", str(self.config_path),
             "--audio", "stdin"],
            cwd=REPO_ROOT, env=environment, stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def stdin(self) -> IO[bytes]:
        assert self.process.stdin is not None
        return self.process.stdin

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait(5)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a killed daemon's pipe is broken
            self.stdin.close()
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()


@dataclass
class Played:
    """What ``Group.play`` did: when the first sample was written (wall clock) and which agents lost their
    pipe on the way (killed)."""

    started_wall: float
    broken: set[str] = field(default_factory=set)


class Group:
    """Agents on one broker, and a subscriber that records the group's traffic (wall-clock receive times)."""

    def __init__(self, workdir: Path, broker_port: int, configs: Sequence[Mapping[str, Any]]) -> None:
        topics = [*sorted(set(ACTION_TOPICS.values())), "home-agent/+/intent", "home-agent/+/availability",
                  f"home-agent/arbitration/{GROUP}/claims"]
        self.subscriber = Subscriber(broker_port, topics)
        self.agents: dict[str, AgentProcess] = {}
        try:
            for config in configs:
                agent = AgentProcess(workdir, config)
                self.agents[agent.agent] = agent
        except BaseException:
            self.close()
            raise
        self.received: list[tuple[float, str, str]] = []

    def messages(self) -> list[tuple[float, str, str]]:
        return list(self.subscriber.lines)  # a snapshot (the subscriber's thread only appends)

    def wait_online(self, timeout: float = ONLINE_TIMEOUT) -> None:
        """Every agent announced itself and its voice stage listens to stdin."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            online = {topic.split("/")[1] for _at, topic, payload in self.messages()
                      if topic.endswith("/availability") and payload == "online"}
            listening = all("voice: listening to raw" in agent.log_text() for agent in self.agents.values())
            if set(self.agents) <= online and listening:
                return
            dead = [name for name, agent in self.agents.items() if not agent.alive()]
            if dead:
                raise RuntimeError(f"agent(s) {dead} exited:\n" + self.agents[dead[0]].log_text()[-3000:])
            time.sleep(0.1)
        raise RuntimeError("not every agent came online in time")

    def play(self, streams: Mapping[str, bytes], *, stop: threading.Event | None = None) -> Played:
        """Write each agent's stream to its stdin at real-time pace, 20 ms at a time, all in step (one loop).
        A broken pipe (a killed agent) ends that agent's stream; the others go on."""
        chunk = 2 * round(SAMPLE_RATE * CHUNK_SECONDS)
        length = max(len(stream) for stream in streams.values())
        started = time.monotonic()
        played = Played(started_wall=time.time())
        for offset in range(0, length, chunk):
            if stop is not None and stop.is_set():
                break
            for name, stream in streams.items():
                if name in played.broken or offset >= len(stream):
                    continue
                try:
                    self.agents[name].stdin.write(stream[offset : offset + chunk])
                    self.agents[name].stdin.flush()
                except (BrokenPipeError, ValueError, OSError):
                    played.broken.add(name)
            delay = started + (offset + chunk) / (2 * SAMPLE_RATE) - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        return played

    def close(self) -> None:
        for agent in self.agents.values():
            agent.close()
        self.received = self.subscriber.stop()


@contextlib.contextmanager
def running_group(workdir: Path, configs: Sequence[Mapping[str, Any]]) -> Iterator[tuple[BenchBroker, Group]]:
    broker = BenchBroker(workdir, allow_embedded=False)
    group: Group | None = None
    try:
        group = Group(workdir, broker.port,
                      [{**c, "mqtt": {**c["mqtt"], "port": broker.port}} for c in configs])
        yield broker, group
    finally:
        if group is not None:
            group.close()
        broker.stop()


# ------------------------------------------------------------------------------------------- analysis


@dataclass
class Heard:
    """One utterance's outcome: the device commands it caused, who published the intent, the claims."""

    utterance: Utterance
    actions: list[float] = field(default_factory=list)  # wall-clock receive times
    acted_by: list[str] = field(default_factory=list)
    claims: dict[str, float] = field(default_factory=dict)  # agent -> its SNR estimate
    claimed_at: dict[str, float] = field(default_factory=dict)  # agent -> when its claim reached us


def analyse(utterances: Sequence[Utterance], messages: Sequence[tuple[float, str, str]],
            started_wall: float, reference_agent: str) -> list[Heard]:
    """Assign device commands, intents and claims to the utterance whose command ended just before them
    (times on ``reference_agent``'s stream; the agents' delays differ by at most MAX_DELAY)."""
    results = [Heard(u) for u in utterances]
    ends = [started_wall + u.command_end(reference_agent) for u in utterances]

    def owner(at: float) -> Heard | None:
        for heard, end in zip(results, ends, strict=True):
            if end - MATCH_BEFORE <= at <= end + MATCH_AFTER:
                return heard
        return None

    action_topics = set(ACTION_TOPICS.values())
    for at, topic, payload in messages:
        heard = owner(at)
        if heard is None:
            continue
        if topic in action_topics:
            heard.actions.append(at)
        elif topic.endswith("/intent"):
            heard.acted_by.append(json.loads(payload).get("agent", topic.split("/")[1]))
        elif topic.endswith("/claims"):
            message = json.loads(payload)
            if message.get("type") == "claim":
                heard.claims[message["agent"]] = float(message["snr"])
                heard.claimed_at[message["agent"]] = at
    return results


def stray_actions(results: Sequence[Heard], messages: Sequence[tuple[float, str, str]]) -> int:
    """Device commands that belong to no utterance."""
    counted = sum(len(heard.actions) for heard in results)
    return sum(1 for _at, topic, _p in messages if topic in set(ACTION_TOPICS.values())) - counted


def group_run(workdir: Path, count: int, seed: int, window: float = WINDOW) -> dict[str, Any]:
    noise = AGENT_NOISE
    utterances = scenario(count, noise, seed=seed)
    streams = render(utterances, noise, seed=seed)
    configs = [agent_config(0, workdir, agent, window=window) for agent in noise]
    with running_group(workdir, configs) as (broker, group):
        group.wait_online()
        played = group.play(streams)
        logs = {name: agent.log_text() for name, agent in group.agents.items()}
    results = analyse(utterances, group.received, played.started_wall, reference_agent=next(iter(noise)))
    best = [h.utterance.best(noise) for h in results]
    exactly_one = sum(1 for h in results if len(h.actions) == 1)
    right = sum(1 for h, b in zip(results, best, strict=True) if h.acted_by == [b])
    estimated_best = sum(1 for h, b in zip(results, best, strict=True)
                         if h.claims and max(h.claims, key=lambda a: h.claims[a]) == b)
    margins = [sorted((h.utterance.snr(a, noise) for a in noise), reverse=True) for h in results]
    wins = {agent: sum(1 for h in results if h.acted_by == [agent]) for agent in noise}
    return {
        "broker": broker.kind,
        "agents": {agent: {"noise_rms": rms, "claims": sum(1 for h in results if agent in h.claims),
                           "best_snr": sum(1 for b in best if b == agent), "acted": wins[agent],
                           "lost_arbitration_logged": logs[agent].count("arbitration: lost "),
                           "lost_as_late": logs[agent].count("(late: "),
                           "took_over": logs[agent].count("arbitration: took over")}
                   for agent, rms in noise.items()},
        "utterances": len(results),
        "actions": sum(len(h.actions) for h in results),
        "stray_actions": stray_actions(results, group.received),
        "utterances_with_exactly_one_action": exactly_one,
        "utterances_without_action": sum(1 for h in results if not h.actions),
        "utterances_with_two_or_more_actions": sum(1 for h in results if len(h.actions) > 1),
        "best_snr_agent_acted": right,
        "best_snr_agent_acted_share": round(right / len(results), 4),
        "best_snr_agent_had_the_best_estimate": estimated_best,
        "true_snr_db": {"best": summary([m[0] for m in margins]), "margin_to_second": summary(
            [m[0] - m[1] for m in margins])},
        "misses": [{"utterance": i, "example": h.utterance.example.file, "best": b, "acted_by": h.acted_by,
                    "actions": len(h.actions), "claims": h.claims,
                    "claimed_ms_after_first": {a: round(1000 * (t - min(h.claimed_at.values())))
                                               for a, t in h.claimed_at.items()},
                    "true_snr_db": {a: round(h.utterance.snr(a, noise), 1) for a in noise},
                    "delay_ms": {a: round(1000 * h.utterance.delay[a]) for a in noise}}
                   for i, (h, b) in enumerate(zip(results, best, strict=True))
                   if h.acted_by != [b] or len(h.actions) != 1],
    }


def latency_pair(workdir: Path, count: int, seed: int, window: float = WINDOW) -> dict[str, Any]:
    """Two agents in the quiet room hear the same ``count`` utterances at the same time (so under the same
    machine load): one without ``[arbitration]``, one alone in a group. Latency: end of the spoken command ->
    the agent's intent on the broker (published just before its device command; the two agents' device
    commands share a topic, their intents do not)."""
    noise = {"plain": AGENT_NOISE["kitchen"], "solo": AGENT_NOISE["kitchen"]}
    utterances = scenario(count, noise, seed=seed, gain_db=(0.0, 0.0), max_delay=0.0, min_margin_db=0.0)
    streams = render(utterances, noise, seed=seed)
    streams["solo"] = streams["plain"]  # the very same audio: both recognise each command on the same hop
    configs = [agent_config(0, workdir, "plain", group=None), agent_config(0, workdir, "solo", window=window)]
    with running_group(workdir, configs) as (_broker, run):
        run.wait_online()
        played = run.play(streams)
    latency: dict[str, list[float | None]] = {agent: [] for agent in noise}
    waits: list[float] = []
    for utterance in utterances:
        end = played.started_wall + utterance.command_end("plain")
        for agent in noise:
            at = next((at for at, topic, _p in run.received if topic == f"home-agent/{agent}/intent"
                       and end - MATCH_BEFORE <= at <= end + MATCH_AFTER), None)
            latency[agent].append(None if at is None else at - end)
        claimed = next((at for at, topic, p in run.received
                        if end - MATCH_BEFORE <= at <= end + MATCH_AFTER and topic.endswith("/claims")
                        and json.loads(p)["type"] == "claim"), None)
        acted = latency["solo"][-1]
        if claimed is not None and acted is not None:
            waits.append(end + acted - claimed)
    pairs = [(a, b) for a, b in zip(latency["plain"], latency["solo"], strict=True)
             if a is not None and b is not None]
    return {"utterances": len(utterances), "window": window,
            "intents": {agent: sum(1 for v in values if v is not None) for agent, values in latency.items()},
            "latency_without_arbitration_seconds": summary([a for a, _ in pairs]),
            "latency_alone_in_a_group_seconds": summary([b for _, b in pairs]),
            "added_per_command_seconds": summary([b - a for a, b in pairs]),
            "claim_to_intent_seconds": summary(waits)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="arbitration benchmark (three agents, real time)")
    parser.add_argument("--utterances", type=int, default=100, help="utterances heard by the three agents")
    parser.add_argument("--latency-utterances", type=int, default=30, help="for the single-agent latency")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {
        "bench": "arbitration",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
        "setup": {"window": WINDOW, "agents_noise_rms": AGENT_NOISE, "gain_db": GAIN_DB,
                  "max_delay_seconds": MAX_DELAY, "min_margin_db": MIN_MARGIN_DB, "seed": args.seed,
                  "examples": list(EXAMPLES)},
        "targets": {"actions_per_utterance": 1, "best_snr_agent_acted_share": 0.95,
                    "single_agent_p90_rise_seconds": WINDOW},
    }
    with tempfile.TemporaryDirectory(prefix="arbitration-bench-") as tmp:
        workdir = Path(tmp)
        log.info("three agents, %d utterances in real time", args.utterances)
        (workdir / "group").mkdir()
        results["three_agents"] = group_run(workdir / "group", args.utterances, args.seed)
        log.info("single agent with and without arbitration, side by side: %d utterances",
                 args.latency_utterances)
        (workdir / "single").mkdir()
        results["single_agent"] = latency_pair(workdir / "single", args.latency_utterances, args.seed + 7)
    three = results["three_agents"]
    plain = results["single_agent"]["latency_without_arbitration_seconds"]
    grouped = results["single_agent"]["latency_alone_in_a_group_seconds"]
    rise = round(grouped["p90"] - plain["p90"], 4) if plain and grouped else None
    results["verdict"] = {
        "exactly_one_action_per_utterance": three["utterances_with_exactly_one_action"] == three["utterances"]
        and three["stray_actions"] == 0,
        "best_snr_agent_acted_share_ok": three["best_snr_agent_acted_share"] >= 0.95,
        "single_agent_p90_rise_seconds": rise,
        "single_agent_p90_rise_ok": rise is not None and rise <= WINDOW,
    }
    write_results(args.out, results, indent=2)
    print(json.dumps({k: v for k, v in results.items() if k != "three_agents"} | {
        "three_agents": {k: v for k, v in three.items() if k != "misses"}}, indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise SystemExit(main())
