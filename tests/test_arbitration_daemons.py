"""Arbitration end to end: real daemons (``home-agent run --audio stdin``) on one real mosquitto, fed the same
commands in step at different SNRs by ``bench.arbitration_bench.Group.play`` (real time)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Mosquitto, MqttProbe, wait_until

from bench.arbitration_bench import (
    ACTION_TOPICS,
    Group,
    Heard,
    agent_config,
    analyse,
    planned,
    render,
    running_group,
    toml,
)
from bench.broker import find_mosquitto

REPO_ROOT = Path(__file__).resolve().parent.parent
# Rooms: white-noise RMS per agent. The examples' speech RMS is ~4000: SNR about 34, 30.5 and 28 dB, close
# enough that all three usually recognise the command on the same 100 ms hop (a much noisier agent is
# recognised hops later and loses as a late claim, which tests less).
ROOMS = {"clean": 80.0, "mid": 120.0, "noisy": 160.0}
IN_STEP = dict.fromkeys(ROOMS, 0.0)
NOISY_EARLIER = {"clean": 0.05, "mid": 0.05, "noisy": 0.0}  # the noisy agent hears everything 50 ms earlier
# Three daemons in real time share this machine's cores with everything else: a daemon's voice thread can lag
# its neighbours by 200 ms when the machine is loaded, so its claim would come after the default window and
# lose as late (bench/arbitration_bench.py measures the default). The decisions do not depend on the window.
GROUP_WINDOW = 0.4

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed"),
    pytest.mark.skipif(not (REPO_ROOT / "models" / "kws.tflite").is_file(), reason="no models/kws.tflite"),
]


def claims_of(group: Group, agent: str) -> list[float]:
    return [at for at, topic, payload in group.messages()
            if topic.endswith("/claims") and json.loads(payload).get("type") == "claim"
            and json.loads(payload)["agent"] == agent]


def describe(results: list[Heard]) -> str:
    return "; ".join(f"{h.utterance.example.file}: {len(h.actions)} action(s) by {h.acted_by}, "
                     f"claims {h.claims}" for h in results)


def test_three_agents_one_action_per_utterance_and_the_clean_one_wins(tmp_path: Path) -> None:
    files = ["computer_heat_up.wav", "computer_light_on.wav"] * 2
    utterances = planned(files, [IN_STEP, IN_STEP, NOISY_EARLIER, NOISY_EARLIER])
    streams = render(utterances, ROOMS, seed=3)
    configs = [agent_config(0, tmp_path, agent, window=GROUP_WINDOW) for agent in ROOMS]
    with running_group(tmp_path, configs) as (_broker, group):
        group.wait_online()
        played = group.play(streams)
        logs = {name: agent.log_text() for name, agent in group.agents.items()}
    results = analyse(utterances, group.received, played.started_wall, reference_agent="clean")
    assert [len(h.actions) for h in results] == [1] * len(utterances), describe(results)
    assert [h.acted_by for h in results] == [["clean"]] * len(utterances), describe(results)
    for heard in results:  # the SNR estimates rank the rooms as they are
        ranked = sorted(heard.claims, key=lambda agent: -heard.claims[agent])
        assert ranked == [agent for agent in ROOMS if agent in heard.claims], describe(results)
    # The noisy agent heard the last two 50 ms earlier and still lost. Whether its claim also reached the
    # broker first depends on three processes' scheduling (on a loaded CI machine it often did not), so
    # that case is pinned deterministically in test_arbitration.py
    # (test_the_best_snr_wins_even_when_a_noisier_agent_claims_first), not asserted here.
    assert logs["clean"].count("arbitration: won ") == len(utterances)
    for loser in ("mid", "noisy"):
        assert logs[loser].count("voice: intent ") == len(utterances)
        assert logs[loser].count("arbitration: lost ") == len(utterances), logs[loser][-2000:]
    # The intents and events say which agent acted; the diagnostics count wins and losses.
    intents = [json.loads(p) for _at, topic, p in group.received if topic == "home-agent/clean/intent"]
    assert [i["agent"] for i in intents] == ["clean"] * len(utterances)
    others = [t for _at, t, _p in group.received if t.endswith("/intent") and t != "home-agent/clean/intent"]
    assert not others


def test_a_lone_agent_in_a_group_pays_the_window_at_most(tmp_path: Path) -> None:
    window = 0.15
    utterances = planned(["computer_heat_up.wav", "computer_light_on.wav"], [{"solo": 0.0}] * 2)
    streams = render(utterances, {"solo": 30.0}, seed=4)
    with running_group(tmp_path, [agent_config(0, tmp_path, "solo", window=window)]) as (_broker, group):
        group.wait_online()
        played = group.play(streams)
    results = analyse(utterances, group.received, played.started_wall, reference_agent="solo")
    assert [len(h.actions) for h in results] == [1, 1], describe(results)
    messages = [(at, json.loads(payload)) for at, topic, payload in group.received
                if topic.endswith("/claims")]
    claims = [(at, m["id"]) for at, m in messages if m["type"] == "claim"]
    closes = {m["claim"]: at for at, m in messages if m["type"] == "close"}
    assert len(claims) == 2
    for heard, (claimed, claim_id) in zip(results, claims, strict=True):
        # It acts on its own close, which it sends one window after its claim less the broker's round trips
        # (measured, larger on a loaded machine: how much under a window is the scheduler's, not asserted).
        assert claimed < closes[claim_id] <= heard.actions[0], (claimed, closes.get(claim_id), heard.actions)
        assert heard.actions[0] - claimed <= window + 0.1
        spoken_end = played.started_wall + heard.utterance.command_end("solo")
        assert heard.actions[0] - spoken_end <= 1.0 + window


@pytest.mark.parametrize("victim", ["clean", "noisy"])
def test_killing_an_agent_mid_claim_leaves_exactly_one_action(tmp_path: Path, victim: str) -> None:
    """The victim is SIGKILLed the moment its first claim reaches the broker, inside a 0.6 s window: before it
    could act (the winner: the best survivor takes over when the broker announces its last will) or while it
    waits to lose. A second utterance is then heard by the survivors alone."""
    window = 0.6
    utterances = planned(["computer_heat_up.wav", "computer_light_on.wav"], [IN_STEP, IN_STEP])
    streams = render(utterances, ROOMS, seed=5)
    configs = [agent_config(0, tmp_path, agent, window=window) for agent in ROOMS]
    with running_group(tmp_path, configs) as (_broker, group):
        group.wait_online()
        stop = threading.Event()
        killed_at: list[float] = []

        def kill_on_claim() -> None:
            while not stop.is_set():
                if claims_of(group, victim):
                    group.agents[victim].kill()
                    killed_at.append(time.time())
                    return
                time.sleep(0.002)

        killer = threading.Thread(target=kill_on_claim, daemon=True)
        killer.start()
        played = group.play(streams)
        stop.set()
        killer.join(5)
        logs = {name: agent.log_text() for name, agent in group.agents.items()}
    assert killed_at, "the victim never claimed"
    claim_at = claims_of(group, victim)[0]
    assert killed_at[0] - claim_at < window / 2  # it died mid-claim
    assert victim in played.broken
    results = analyse(utterances, group.received, played.started_wall, reference_agent="clean")
    assert [len(h.actions) for h in results] == [1, 1], describe(results)
    survivors_best = "mid" if victim == "clean" else "clean"
    assert [h.acted_by for h in results] == [[survivors_best], [survivors_best]], describe(results)
    # The will came while the round was open (the next best simply won) or after it closed (took over).
    decisions = ("arbitration: won heating_up", "arbitration: took over heating_up")
    assert any(decision in logs[survivors_best] for decision in decisions), logs[survivors_best][-3000:]


def test_broker_down_nothing_is_decided_and_nothing_is_sent_late(
        tmp_path: Path, mosquitto: Mosquitto, mqtt_client: Callable[..., MqttProbe]) -> None:
    """The broker is down while the agent hears a command and back within the action's ttl (5 s): without
    arbitration the command would still go out; in a group the claim expired unsent after the window, so no
    round ever forms, nothing of the command is sent once the broker is back, and the agent counts it lost."""
    config = agent_config(mosquitto.port, tmp_path, "solo")
    config["mqtt"].update(reconnect_min_delay=0.1, reconnect_max_delay=0.3)
    utterances = planned(["computer_heat_up.wav"], [{"solo": 0.0}])
    streams = render(utterances, {"solo": 30.0}, seed=6)
    group = Group(tmp_path, mosquitto.port, [config])
    try:
        group.wait_online()
        mosquitto.stop()
        played = group.play(streams)
        spoken_end = played.started_wall + utterances[0].command_end("solo")
        mosquitto.start()
        probe = mqtt_client(mosquitto).subscribe("#")
        probe.wait_for("home-agent/solo/availability", b"online", timeout=10)
        assert time.time() - spoken_end < 5.0  # still within the ttl: today's path would send it now
        agent = group.agents["solo"]
        given_up = "arbitration: not acting on heating_up: our claim never came back from the broker"
        assert wait_until(lambda: given_up in agent.log_text(), 6.0), agent.log_text()[-3000:]

        def lost() -> list[int]:
            messages = probe.matching("home-agent/solo/diagnostics")
            return [json.loads(m.payload)["arbitrations_lost"] for m in messages]

        assert wait_until(lambda: 1 in lost(), 3.0), lost()
        log = agent.log_text()
    finally:
        group.close()
    assert "voice: intent heating_up" in log
    sent = [m.topic for m in probe.messages]
    assert ACTION_TOPICS["heating_up"] not in sent
    assert not [t for t in sent if t.endswith("/intent") or t.startswith("hermes/")]
    claims = [json.loads(m.payload)["type"] for m in probe.matching("home-agent/arbitration/#")]
    assert claims == []


def test_exit_at_end_waits_for_the_decision_and_says_who_acted(
        tmp_path: Path, mosquitto: Mosquitto, mqtt_client: Callable[..., MqttProbe]) -> None:
    probe = mqtt_client(mosquitto).subscribe("#")
    config = agent_config(mosquitto.port, tmp_path, "kitchen", window=0.5)
    config["audio"]["realtime"] = False
    path = tmp_path / "kitchen.toml"
    path.write_text(toml(config), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(path), "--audio",
         f"file:{REPO_ROOT / 'examples' / 'computer_light_on.wav'}", "--exit-at-end"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert probe.wait_for(ACTION_TOPICS["light_on"], timeout=5).payload == b"ON"
    kinds = [json.loads(m.payload)["type"] for m in probe.matching("home-agent/arbitration/home/claims")]
    assert kinds == ["claim", "close", "won"]
    intent = json.loads(probe.wait_for("home-agent/kitchen/intent", timeout=5).payload)
    event = json.loads(probe.wait_for("home-agent/kitchen/event", timeout=5).payload)
    assert intent["agent"] == event["agent"] == "kitchen"
    assert json.loads(probe.wait_for("hermes/intent/light_on", timeout=5).payload)["siteId"] == "kitchen"
