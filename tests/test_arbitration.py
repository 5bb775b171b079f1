"""Arbitration's decision logic (pure, clock passed in), its messages and its SNR estimate."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import paho.mqtt.client as paho
import pytest

from agent.arbitration import (
    Arbitration,
    Claim,
    GroupArbiter,
    LevelMeter,
    Notice,
    Outcome,
    parse_message,
)
from agent.config import Config, parse_config
from agent.discovery import ARBITRATION_SENSORS, discovery_messages
from agent.errors import ConfigError, PayloadError
from agent.messages import Detection, Intent
from agent.mqtt_link import InboundMessage
from agent.topics import Topics

WINDOW = 0.15
TOLERANCE = 0.5


def claim(agent: str, snr: float, *, intent: str = "heating_up", ago: float = 0.0, wake: float = 0.7,
          command: float = 0.7, number: int = 1) -> Claim:
    return Claim(id=f"{agent}-t-{number}", agent=agent, intent=intent, snr=snr, wake=wake, command=command,
                 ago=ago)


class Acts:
    """The act callables handed to Arbitration, and how often each ran."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, name: str) -> Callable[[], None]:
        return lambda: self.calls.append(name)


def arbiter(agent: str = "kitchen") -> Arbitration:
    return Arbitration(agent, window=WINDOW, match_tolerance=TOLERANCE)


def kinds(outcomes: list[Outcome]) -> list[str]:
    return [outcome.kind for outcome in outcomes]


def test_a_lone_agent_wins_after_the_window_once_its_claim_came_back() -> None:
    core = arbiter()
    own = claim("kitchen", 20.0)
    assert core.open(own, 10.0, expires=15.0, act=lambda: None) == []
    assert core.next_due(10.0) == pytest.approx(10.0 + WINDOW)
    assert core.receive(own, 10.002) == []  # the echo, before the close
    assert core.due(10.1) == []
    outcomes = core.due(10.0 + WINDOW)
    assert kinds(outcomes) == ["won"] and outcomes[0].claim == own and outcomes[0].rivals == 0
    assert core.pending == 0 and core.next_due(11.0) is None


def test_the_best_snr_wins_whoever_claimed_first() -> None:
    # Three agents, each seeing the same broker order (its own claim first on its own clock).
    living, kitchen, hall = claim("living", 9.0), claim("kitchen", 31.0), claim("hall", 18.0)
    results = {}
    for me, order in (("living", [living, kitchen, hall]), ("kitchen", [living, kitchen, hall]),
                      ("hall", [living, kitchen, hall])):
        core = arbiter(me)
        now = 100.0
        for item in order:
            if item.agent == me:
                assert core.open(item, now, expires=now + 5, act=lambda: None) == []
            core.receive(item, now + 0.001)
            now += 0.04  # the noisy "living" claims 40 and 80 ms before the others
        results[me] = kinds(core.due(100.0 + WINDOW + 0.01))
    assert results == {"living": ["lost"], "kitchen": ["won"], "hall": ["lost"]}


def test_ties_break_on_command_score_then_wake_score_then_agent_id() -> None:
    a = claim("aa", 20.0, command=0.6, wake=0.9)
    b = claim("bb", 20.0, command=0.7, wake=0.5)
    c = claim("cc", 20.0, command=0.7, wake=0.5)
    assert sorted([a, b, c], key=Claim.rank) == [b, c, a]
    d = claim("dd", 20.0, command=0.7, wake=0.6)
    assert sorted([a, b, c, d], key=Claim.rank)[0] == d


def test_a_claim_after_the_round_closed_loses_at_once_and_is_not_sent() -> None:
    core = arbiter("hall")
    core.receive(claim("kitchen", 10.0), 50.0)
    late = claim("hall", 40.0, ago=0.05)  # much better, but its round closed 0.15 s after kitchen's claim
    outcomes = core.open(late, 50.3, expires=55.0, act=lambda: None)
    assert kinds(outcomes) == ["lost"] and "late" in outcomes[0].reason
    assert outcomes[0].winner is not None and outcomes[0].winner.agent == "kitchen"
    assert core.pending == 0


def test_claims_match_by_utterance_time_not_arrival() -> None:
    core = arbiter("hall")
    # kitchen heard the utterance complete 1.8 s before its claim arrived (a slow agent): its utterance
    # ended at 48.2 on our clock, ours at 49.99: another utterance (the same command said again).
    core.receive(claim("kitchen", 30.0, ago=1.8), 50.0)
    assert core.open(claim("hall", 10.0, ago=0.01), 50.0, expires=55.0, act=lambda: None) == []
    core.receive(claim("hall", 10.0, ago=0.01), 50.001)
    assert kinds(core.due(50.0 + WINDOW)) == ["won"]
    # A different intent at the same time is another utterance too.
    core2 = arbiter("hall")
    core2.receive(claim("kitchen", 30.0, intent="light_on"), 50.0)
    core2.open(own := claim("hall", 10.0), 50.05, expires=55.0, act=lambda: None)
    core2.receive(own, 50.051)
    assert kinds(core2.due(50.05 + WINDOW)) == ["won"]


def test_a_rival_claim_arriving_before_ours_opens_the_round() -> None:
    core = arbiter("hall")
    core.receive(claim("kitchen", 5.0), 20.0)
    own = claim("hall", 25.0)
    core.open(own, 20.1, expires=25.0, act=lambda: None)
    core.receive(own, 20.101)
    assert core.next_due(20.1) == pytest.approx(20.0 + WINDOW)  # not 20.1 + window: one close for all
    assert kinds(core.due(20.0 + WINDOW)) == ["won"]


def test_claims_after_our_close_do_not_count() -> None:
    core = arbiter("hall")
    own = claim("hall", 10.0)
    core.open(own, 0.0, expires=5.0, act=lambda: None)
    core.receive(own, 0.001)
    core.receive(claim("kitchen", 40.0), WINDOW + 0.01)  # late: it loses on its own side too
    assert kinds(core.due(WINDOW + 0.02)) == ["won"]


def test_without_our_echo_we_wait_a_window_more_then_withdraw() -> None:
    core = arbiter()
    own = claim("kitchen", 30.0)
    core.open(own, 0.0, expires=5.0, act=lambda: None)
    assert core.due(WINDOW) == []
    assert core.next_due(WINDOW) == pytest.approx(2 * WINDOW)
    late_echo = arbiter()
    late_echo.open(own, 0.0, expires=5.0, act=lambda: None)
    assert late_echo.due(WINDOW) == []
    assert kinds(late_echo.receive(own, WINDOW + 0.05)) == ["won"]  # the broker was slow, not gone
    assert kinds(core.due(2 * WINDOW)) == ["withdrawn"]


def test_when_the_winner_leaves_without_acting_the_next_best_takes_over() -> None:
    results = {}
    kitchen, hall, living = claim("kitchen", 30.0), claim("hall", 20.0), claim("living", 10.0)
    for me, gone_by in (("hall", "offline"), ("living", "offline"), ("hall", "withdrawn")):
        core = arbiter(me)
        mine = hall if me == "hall" else living
        core.open(mine, 0.0, expires=5.0, act=lambda: None)
        for item in (kitchen, hall, living):
            core.receive(item, 0.01)
        assert kinds(core.due(WINDOW)) == ["lost"]
        if gone_by == "offline":
            outcomes = core.offline("kitchen", 0.4)
        else:
            outcomes = core.receive(Notice("withdrawn", "kitchen", kitchen.id), 0.4)
        results[(me, gone_by)] = kinds(outcomes)
    assert results == {("hall", "offline"): ["took_over"], ("living", "offline"): [],
                       ("hall", "withdrawn"): ["took_over"]}


def test_once_the_winner_said_won_its_departure_changes_nothing() -> None:
    core = arbiter("hall")
    kitchen, hall = claim("kitchen", 30.0), claim("hall", 20.0)
    core.open(hall, 0.0, expires=5.0, act=lambda: None)
    core.receive(hall, 0.001)
    core.receive(kitchen, 0.002)
    assert kinds(core.due(WINDOW)) == ["lost"]
    assert core.receive(Notice("won", "kitchen", kitchen.id), 0.2) == []
    assert core.offline("kitchen", 0.3) == []
    assert core.pending == 0


def test_a_rival_that_acted_before_our_close_makes_us_lose() -> None:
    core = arbiter("hall")
    kitchen, hall = claim("kitchen", 10.0), claim("hall", 20.0)
    core.open(hall, 0.0, expires=5.0, act=lambda: None)
    core.receive(kitchen, 0.01)
    outcomes = core.receive(Notice("won", "kitchen", kitchen.id), 0.1)
    assert kinds(outcomes) == ["lost"] and core.pending == 0
    # And a claim for an utterance someone acted on already loses at once.
    later = arbiter("living")
    later.receive(kitchen, 0.0)
    later.receive(Notice("won", "kitchen", kitchen.id), 0.05)
    assert kinds(later.open(claim("living", 40.0), 0.1, expires=5.0, act=lambda: None)) == ["lost"]


def test_a_waiting_loser_gives_up_when_the_intent_expires() -> None:
    core = arbiter("hall")
    kitchen, hall = claim("kitchen", 30.0), claim("hall", 20.0)
    core.open(hall, 0.0, expires=1.0, act=lambda: None)
    core.receive(hall, 0.001)
    core.receive(kitchen, 0.002)
    core.due(WINDOW)
    assert core.next_due(0.5) == 1.0
    assert core.due(1.0) == [] and core.pending == 0
    assert core.offline("kitchen", 1.5) == []  # too late to act for it


def test_foreign_claims_are_forgotten_after_a_while() -> None:
    core = arbiter("hall")
    core.receive(claim("kitchen", 30.0, ago=0.0), 0.0)
    # 20 s later the same intent is a new utterance, and the old claim is gone.
    own = claim("hall", 5.0)
    core.open(own, 20.0, expires=25.0, act=lambda: None)
    core.receive(own, 20.001)
    assert kinds(core.due(20.0 + WINDOW)) == ["won"]


def test_messages_round_trip_and_bad_ones_are_payload_errors() -> None:
    item = claim("kitchen", 12.34, ago=0.05)
    assert parse_message(item.payload()) == item
    notice = Notice("won", "kitchen", item.id)
    assert parse_message(notice.payload()) == notice
    bad = [b"not json", b"[1]", b'{"type": "claim"}', b'{"type": "nope", "agent": "a"}',
           json.dumps({**json.loads(item.payload()), "snr": float("inf")}).encode(),
           json.dumps({**json.loads(item.payload()), "wake": 1.5}).encode(),
           json.dumps({**json.loads(item.payload()), "agent": "Bad Id"}).encode(),
           json.dumps({**json.loads(item.payload()), "ago": True}).encode(),
           b'{"type": "won", "agent": "kitchen"}', b"\xff\xfe"]
    for payload in bad:
        with pytest.raises(PayloadError):
            parse_message(payload)


# ------------------------------------------------------------------------------------------- SNR


def noisy_speech(snr_db: float, seed: int = 0) -> np.ndarray:
    """2 s of noise, a 1.5 s 'utterance' (a tone burst with syllable-like gaps) at ``snr_db``, 0.5 s noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(24000) / 16000
    speech = np.sin(2 * np.pi * 300 * t) * (np.sin(2 * np.pi * 3 * t) > 0) * 3000.0
    level = np.sqrt(np.mean(speech[speech != 0] ** 2))
    noise_rms = level / 10 ** (snr_db / 20)
    signal = np.concatenate([np.zeros(32000), speech, np.zeros(8000)])
    signal = signal + rng.normal(0.0, noise_rms, len(signal))
    return np.clip(np.round(signal), -32768, 32767).astype(np.int16)


def test_level_meter_orders_agents_by_snr_and_ignores_gain() -> None:
    estimates = {}
    for snr in (5.0, 15.0, 25.0, 35.0):
        meter = LevelMeter()
        audio = noisy_speech(snr)
        for start in range(0, len(audio), 1000):  # blocks that do not line up with frames
            meter.push(audio[start : start + 1000])
        estimates[snr] = meter.snr_db()
    assert list(estimates.values()) == sorted(estimates.values())
    for snr, estimate in estimates.items():
        assert abs(estimate - snr) < 6.0, estimates
    quiet = LevelMeter()
    quiet.push((noisy_speech(25.0).astype(np.float64) * 0.1).astype(np.int16))
    assert abs(quiet.snr_db() - estimates[25.0]) < 1.0
    assert LevelMeter().snr_db() == 0.0
    silent = LevelMeter()
    silent.push(np.zeros(16000, dtype=np.int16))
    assert silent.snr_db() == 0.0


# ------------------------------------------------------------------------------------------- the adapter


def arbitration_config(agent: str = "kitchen", **section: object) -> Config:
    return parse_config({"agent": {"id": agent}, "mqtt": {},
                         "actions": {"heating_up": {"topic": "t/heat", "payload": "1"}},
                         "voice": {"commands": [{"say": "heat up", "action": "heating_up"}]},
                         "arbitration": {"group": "home", **section}})


class FakeLink:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, float | None]] = []
        self.handlers: dict[str, Callable[[InboundMessage], None]] = {}

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 0, retain: bool = False,
                expires_mono: float | None = None) -> bool:
        assert qos == 1 and not retain
        data = payload if isinstance(payload, bytes) else payload.encode()
        self.published.append((topic, data, expires_mono))
        return True

    def subscribe(self, topic: str, handler: Callable[[InboundMessage], None], qos: int) -> object:
        self.handlers[topic] = handler
        return object()

    def deliver(self, topic: str, payload: bytes, at: float) -> None:
        handler = next(h for f, h in self.handlers.items()
                       if paho.topic_matches_sub(f, topic))
        handler(InboundMessage(topic, payload, False, 1, at))


class Timers:
    def __init__(self) -> None:
        self.now = 0.0
        self.queue: list[tuple[float, Callable[[], None]]] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.queue.append((self.now + delay, callback))

    def advance(self, to: float) -> None:
        while True:
            ready = sorted((item for item in self.queue if item[0] <= to), key=lambda item: item[0])
            if not ready:
                break
            at, callback = ready[0]
            self.queue.remove(ready[0])
            self.now = max(self.now, at)
            callback()
        self.now = to


def test_group_arbiter_claims_waits_and_acts_on_the_main_thread_timer() -> None:
    config = arbitration_config()
    topics = Topics.from_config(config)
    assert topics.arbitration == "home-agent/arbitration/home/claims"
    assert topics.is_own(topics.arbitration)
    link, timers, acts = FakeLink(), Timers(), Acts()
    group = GroupArbiter(config, publish=link.publish, subscribe=link.subscribe,  # type: ignore[arg-type]
                         call_later=timers.call_later, clock=lambda: timers.now)
    assert set(link.handlers) == {topics.arbitration, "home-agent/+/availability"}
    timers.now = 5.0
    group.hear(noisy_speech(30.0), [Detection("computer", 0.81, 0.0, 1.0)])
    intent = Intent("heating_up", ("heat", "up"), (0.9, 0.66), 0.0, 3.0, created_mono=4.98)
    mine = group.submit(intent, acts("kitchen"), expires=9.98)
    assert (mine.agent, mine.intent, mine.wake, mine.command) == ("kitchen", "heating_up", 0.81, 0.66)
    assert mine.ago == pytest.approx(0.02) and mine.snr > 20
    topic, payload, expires = link.published[-1]
    assert topic == topics.arbitration and parse_message(payload) == mine
    assert expires == pytest.approx(5.0 + 0.15)  # a claim is never delivered after the window
    link.deliver(topics.arbitration, payload, 5.002)  # the echo
    rival = claim("hall", 3.0, ago=0.01)
    link.deliver(topics.arbitration, rival.payload(), 5.01)
    timers.advance(5.1)
    assert acts.calls == []
    timers.advance(5.2)
    assert acts.calls == ["kitchen"]
    won = parse_message(link.published[-1][1])
    assert won == Notice("won", "kitchen", mine.id)
    assert group.counters() == {"arbitrations_won": 1, "arbitrations_lost": 0, "arbitration_takeovers": 0}
    assert {key for key, _, _ in ARBITRATION_SENSORS} <= set(group.counters())
    with pytest.raises(PayloadError):
        link.deliver(topics.arbitration, b"garbage", 6.0)


def test_group_arbiter_loses_then_takes_over_when_the_winner_dies() -> None:
    config = arbitration_config("hall")
    link, timers, acts = FakeLink(), Timers(), Acts()
    group = GroupArbiter(config, publish=link.publish, subscribe=link.subscribe,  # type: ignore[arg-type]
                         call_later=timers.call_later, clock=lambda: timers.now)
    topic = "home-agent/arbitration/home/claims"
    timers.now = 1.0
    best = claim("kitchen", 40.0)
    link.deliver(topic, best.payload(), 1.0)
    intent = Intent("heating_up", ("heat", "up"), (0.9, 0.7), 0.0, 3.0, created_mono=1.0)
    mine = group.submit(intent, acts("hall"), expires=6.0)
    link.deliver(topic, mine.payload(), 1.001)
    timers.advance(1.3)
    assert acts.calls == [] and group.counters()["arbitrations_lost"] == 1
    link.deliver("home-agent/living/availability", b"offline", 1.4)  # someone else: nothing changes
    link.deliver("home-agent/kitchen/availability", b"online", 1.4)
    timers.advance(1.5)
    assert acts.calls == []
    link.deliver("home-agent/kitchen/availability", b"offline", 1.6)
    timers.advance(1.6)
    assert acts.calls == ["hall"]
    assert group.counters() == {"arbitrations_won": 1, "arbitrations_lost": 1, "arbitration_takeovers": 1}


def test_discovery_announces_the_arbitration_counters_only_with_arbitration() -> None:
    with_group = discovery_messages(arbitration_config(), event_types=["heating_up"], sw_version="1")
    plain = parse_config({"agent": {"id": "kitchen"}, "mqtt": {}})
    without = discovery_messages(plain, event_types=[], sw_version="1")
    for key, _, _ in ARBITRATION_SENSORS:
        topic = f"homeassistant/sensor/kitchen/{key}/config"
        assert with_group[topic]["value_template"] == f"{{{{ value_json.{key} }}}}"
        assert topic not in without


def test_config_arbitration_section() -> None:
    config = arbitration_config()
    assert config.arbitration is not None
    assert config.arbitration.window == 0.15 and config.arbitration.match_tolerance == 0.5
    assert parse_config({"agent": {"id": "a"}, "mqtt": {}}).arbitration is None
    for bad in ({"group": "has space"}, {"group": "g", "window": 0}, {"group": "g", "window": 3.0}, {},
                {"group": "g", "typo": 1}):
        with pytest.raises(ConfigError, match="arbitration"):
            parse_config({"agent": {"id": "a"}, "mqtt": {}, "arbitration": bad})
