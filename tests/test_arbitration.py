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
from agent.messages import Detection, InboundMessage, Intent
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


class Home:
    """Pure cores around a simulated broker: every message reaches every live agent 1 ms after the broker
    took it, all in one order (as mosquitto does); time advances in 1 ms steps and ``due`` runs each step."""

    LATENCY = 0.001

    def __init__(self, *names: str, window: float = WINDOW) -> None:
        self.cores = {name: Arbitration(name, window=window, match_tolerance=TOLERANCE) for name in names}
        self.now = 0.0
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.sequence = 0
        self.acted: list[tuple[str, str, float]] = []  # (agent, intent, time)
        self.outcomes: dict[str, list[Outcome]] = {name: [] for name in names}
        self.traffic: list[Claim | Notice] = []

    def at(self, when: float, callback: Callable[..., None]) -> None:  # lambdas binding by default
        self.sequence += 1
        self.events.append((when, self.sequence, callback))

    def publish(self, message: Claim | Notice) -> None:
        def broker() -> None:
            self.traffic.append(message)
            for name in list(self.cores):
                self.at(self.now + self.LATENCY, lambda name=name: self.deliver(name, message))
        self.at(self.now + self.LATENCY, broker)

    def deliver(self, name: str, message: Claim | Notice) -> None:
        if name in self.cores:
            self.handle(name, self.cores[name].receive(message, self.now))

    def handle(self, name: str, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            self.outcomes[name].append(outcome)
            if outcome.kind == "close":
                self.publish(Notice("close", name, outcome.claim.id))
            elif outcome.kind in ("won", "took_over"):
                self.publish(Notice("won", name, outcome.claim.id))
                self.acted.append((name, outcome.claim.intent, self.now))

    def claim(self, when: float, item: Claim, ttl: float = 5.0) -> None:
        def send() -> None:
            if item.agent not in self.cores:
                return
            outcomes = self.cores[item.agent].open(item, self.now, expires=self.now + ttl, act=lambda: None)
            if not outcomes:
                self.publish(item)
            self.handle(item.agent, outcomes)
        self.at(when, send)

    def kill(self, when: float, name: str) -> None:
        def die() -> None:
            del self.cores[name]
            def will() -> None:
                for other, core in self.cores.items():
                    self.at(self.now + self.LATENCY,
                            lambda other=other, core=core: self.handle(other, core.offline(name, self.now)))
            self.at(self.now + self.LATENCY, will)
        self.at(when, die)

    def run(self, until: float) -> Home:
        while self.now < until:
            self.now = round(self.now + 0.001, 6)
            while True:
                ready = sorted(e for e in self.events if e[0] <= self.now + 1e-9)
                if not ready:
                    break
                self.events.remove(ready[0])
                ready[0][2]()
            for name, core in list(self.cores.items()):
                self.handle(name, core.due(self.now))
        return self

    def kinds(self, name: str) -> list[str]:
        return kinds(self.outcomes[name])


def test_a_lone_agent_acts_one_window_after_its_claim() -> None:
    home = Home("kitchen")
    home.claim(1.0, claim("kitchen", 20.0))
    home.run(2.0)
    assert home.kinds("kitchen") == ["close", "won"]
    assert len(home.acted) == 1
    assert home.acted[0][2] - 1.0 == pytest.approx(WINDOW, abs=0.003)  # the window, not window + round trip
    assert [type(m).__name__ for m in home.traffic] == ["Claim", "Notice", "Notice"]


def test_the_best_snr_wins_even_when_a_noisier_agent_claims_first() -> None:
    home = Home("living", "kitchen", "hall")
    home.claim(1.0, claim("living", 9.0))  # the noisy one, 50 and 90 ms earlier
    home.claim(1.05, claim("kitchen", 31.0))
    home.claim(1.09, claim("hall", 18.0))
    home.run(3.0)
    assert [(agent, intent) for agent, intent, _ in home.acted] == [("kitchen", "heating_up")]
    assert home.kinds("living") == ["close", "lost"]  # it opened the round and closed it
    assert home.kinds("kitchen") == ["won"] and home.kinds("hall") == ["lost"]
    assert home.outcomes["hall"][-1].winner == claim("kitchen", 31.0)


def test_ties_break_on_command_score_then_wake_score_then_agent_id() -> None:
    a = claim("aa", 20.0, command=0.6, wake=0.9)
    b = claim("bb", 20.0, command=0.7, wake=0.5)
    c = claim("cc", 20.0, command=0.7, wake=0.5)
    assert sorted([a, b, c], key=Claim.rank) == [b, c, a]
    d = claim("dd", 20.0, command=0.7, wake=0.6)
    assert sorted([a, b, c, d], key=Claim.rank)[0] == d
    home = Home("bb", "cc")
    home.claim(1.0, c)
    home.claim(1.01, b)
    home.run(2.0)
    assert [agent for agent, _, _ in home.acted] == ["bb"]


def test_a_claim_after_the_close_loses_and_one_that_sees_the_close_is_not_sent() -> None:
    home = Home("kitchen", "hall", "living")
    home.claim(1.0, claim("kitchen", 10.0))
    home.claim(1.147, claim("hall", 40.0))  # reaches the broker just after kitchen's close
    home.claim(1.3, claim("living", 40.0))  # the round is closed: not even sent
    home.run(3.0)
    assert [agent for agent, _, _ in home.acted] == ["kitchen"]
    assert home.kinds("hall") == ["lost"] and "after the round was closed" in home.outcomes["hall"][0].reason
    assert home.kinds("living") == ["lost"] and "before we heard it" in home.outcomes["living"][0].reason
    assert not any(isinstance(m, Claim) and m.agent == "living" for m in home.traffic)


def test_everyone_agrees_because_the_broker_order_decides() -> None:
    """Claims landing around the close: whatever the timing, exactly one acts, for every offset."""
    for offset_ms in range(140, 160):
        home = Home("kitchen", "hall")
        home.claim(1.0, claim("kitchen", 10.0))
        home.claim(1.0 + offset_ms / 1000, claim("hall", 40.0))
        home.run(2.5)
        assert len(home.acted) == 1, offset_ms


def test_claims_match_by_utterance_time_not_arrival() -> None:
    home = Home("kitchen", "hall")
    home.claim(1.0, claim("kitchen", 30.0))
    # The same command said again 2 s later, heard only by hall: its own round, its own action.
    home.claim(3.0, claim("hall", 10.0))
    # A slow agent's claim for the first utterance (it heard it 1.9 s before sending) arrives late: lost.
    home.claim(2.9, claim("living", 40.0, ago=1.9))
    home.cores["living"] = Arbitration("living", window=WINDOW, match_tolerance=TOLERANCE)
    home.outcomes["living"] = []
    home.run(5.0)
    assert [agent for agent, _, _ in home.acted] == ["kitchen", "hall"]
    # Another intent at the same moment is another utterance.
    other = Home("kitchen", "hall")
    other.claim(1.0, claim("kitchen", 30.0, intent="light_on"))
    other.claim(1.01, claim("hall", 10.0))
    other.run(2.0)
    assert sorted(agent for agent, _, _ in other.acted) == ["hall", "kitchen"]


def test_the_next_claimant_closes_when_the_first_one_dies() -> None:
    home = Home("kitchen", "hall", "living")
    home.claim(1.0, claim("kitchen", 40.0))
    home.claim(1.02, claim("hall", 20.0))
    home.claim(1.03, claim("living", 10.0))
    home.kill(1.01, "kitchen")  # after its claim reached the broker, before it closed the round
    home.run(3.0)
    assert [agent for agent, _, _ in home.acted] == ["hall"]
    assert home.kinds("hall") == ["close", "won"]  # it closed one window after kitchen's claim


def test_a_silent_first_claimant_is_closed_for_by_the_next_one_window_later() -> None:
    home = Home("kitchen", "hall")
    home.claim(1.0, claim("kitchen", 40.0))
    home.claim(1.02, claim("hall", 20.0))
    home.run(1.003)
    del home.cores["kitchen"]  # hangs: no close, no last will
    home.run(3.0)
    assert home.kinds("hall") == ["close", "lost"]  # closed at 2 windows; kitchen's claim still wins...
    closes = [m for m in home.traffic if isinstance(m, Notice) and m.kind == "close"]
    assert len(closes) == 1
    assert home.acted == []  # ...and kitchen never acts: no action rather than two


def test_when_the_winner_dies_before_acting_the_next_best_takes_over() -> None:
    home = Home("kitchen", "hall", "living")
    home.claim(1.0, claim("living", 10.0))
    home.claim(1.01, claim("kitchen", 40.0))
    home.claim(1.02, claim("hall", 20.0))
    home.run(1.147)  # living's close is at the broker
    home.cores["kitchen"].receive = lambda *_a: []  # type: ignore[method-assign]  # frozen, then killed
    home.kill(1.2, "kitchen")
    home.run(3.0)
    assert [agent for agent, _, _ in home.acted] == ["hall"]
    assert home.kinds("hall") == ["lost", "took_over"]
    assert home.kinds("living") == ["close", "lost"]


def test_once_the_winner_said_won_its_departure_changes_nothing() -> None:
    home = Home("kitchen", "hall")
    home.claim(1.0, claim("kitchen", 40.0))
    home.claim(1.01, claim("hall", 20.0))
    home.kill(1.5, "kitchen")
    home.run(3.0)
    assert [agent for agent, _, _ in home.acted] == ["kitchen"]
    assert home.kinds("hall") == ["lost"]


def test_only_the_first_close_counts() -> None:
    core = arbiter("hall")
    first, mine, third = claim("kitchen", 10.0), claim("hall", 20.0), claim("living", 30.0)
    core.open(mine, 1.0, expires=6.0, act=lambda: None)
    core.receive(first, 1.0)
    core.receive(mine, 1.001)
    assert kinds(core.receive(Notice("close", "kitchen", first.id), 1.15)) == ["won"]
    assert core.receive(third, 1.16) == []  # late
    assert core.receive(Notice("close", "living", first.id), 1.2) == []


def test_a_claim_the_broker_never_returns_is_given_up_at_its_ttl() -> None:
    core = arbiter()
    own = claim("kitchen", 30.0)
    assert core.open(own, 0.0, expires=5.0, act=lambda: None) == []
    assert core.undecided == 1 and core.next_due(0.0) == 5.0
    assert core.due(4.9) == []
    assert kinds(core.due(5.0)) == ["unheard"]
    assert core.undecided == 0 and core.next_due(5.0) is None


def test_a_waiting_loser_gives_up_when_the_intent_expires() -> None:
    home = Home("kitchen", "hall")
    home.claim(1.0, claim("kitchen", 40.0))
    home.claim(1.01, claim("hall", 20.0), ttl=0.5)
    home.run(1.2)
    home.cores["kitchen"].receive = lambda *_a: []  # type: ignore[method-assign]
    home.run(2.0)
    home.kill(2.0, "kitchen")
    home.run(3.0)
    assert home.kinds("hall") == ["lost"]  # too late to take over
    assert [agent for agent, _, _ in home.acted] == ["kitchen"]


def test_rounds_are_forgotten_after_a_while() -> None:
    home = Home("kitchen", "hall")
    home.claim(1.0, claim("kitchen", 30.0))
    home.claim(21.0, claim("hall", 5.0, ago=0.0))
    home.run(22.0)
    assert [agent for agent, _, _ in home.acted] == ["kitchen", "hall"]


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


def test_group_arbiter_claims_closes_and_acts_on_the_main_thread_timer() -> None:
    config = arbitration_config()
    topics = Topics.from_config(config)
    assert topics.arbitration == "home-agent/arbitration/home/claims"
    assert topics.is_own(topics.arbitration)
    link, timers, acts = FakeLink(), Timers(), Acts()
    group = GroupArbiter(config, publish=link.publish, subscribe=link.subscribe,
                         call_later=timers.call_later, clock=lambda: timers.now)
    assert set(link.handlers) == {topics.arbitration, "home-agent/+/availability"}
    timers.now = 5.0
    group.hear(noisy_speech(30.0), [Detection("computer", 0.81, 0.0, 1.0)])
    intent = Intent("heating_up", ("heat", "up"), (0.9, 0.66), 0.0, 3.0, created_mono=4.98)
    mine = group.submit(intent, acts("kitchen"), expires=9.98)
    assert (mine.agent, mine.intent, mine.wake, mine.command) == ("kitchen", "heating_up", 0.81, 0.66)
    assert mine.ago == pytest.approx(0.02) and mine.snr > 20
    assert group.undecided == 1
    topic, payload, expires = link.published[-1]
    assert topic == topics.arbitration and parse_message(payload) == mine
    assert expires == pytest.approx(5.0 + 0.15)  # a claim is never delivered after the window
    link.deliver(topics.arbitration, payload, 5.002)  # the echo: we opened the round
    rival = claim("hall", 3.0, ago=0.01)
    link.deliver(topics.arbitration, rival.payload(), 5.01)
    timers.advance(5.1)
    assert len(link.published) == 1
    timers.advance(5.2)  # the close goes out one window after the claim, less the round trip
    close = parse_message(link.published[-1][1])
    assert close == Notice("close", "kitchen", mine.id)
    assert acts.calls == []
    link.deliver(topics.arbitration, link.published[-1][1], 5.2)
    timers.advance(5.25)
    assert acts.calls == ["kitchen"]
    assert parse_message(link.published[-1][1]) == Notice("won", "kitchen", mine.id)
    assert group.counters() == {"arbitrations_won": 1, "arbitrations_lost": 0, "arbitration_takeovers": 0}
    assert {key for key, _, _ in ARBITRATION_SENSORS} <= set(group.counters())
    assert group.undecided == 0
    with pytest.raises(PayloadError):
        link.deliver(topics.arbitration, b"garbage", 6.0)


def test_group_arbiter_loses_then_takes_over_when_the_winner_dies() -> None:
    config = arbitration_config("hall")
    link, timers, acts = FakeLink(), Timers(), Acts()
    group = GroupArbiter(config, publish=link.publish, subscribe=link.subscribe,
                         call_later=timers.call_later, clock=lambda: timers.now)
    topic = "home-agent/arbitration/home/claims"
    timers.now = 1.0
    best = claim("kitchen", 40.0)
    link.deliver(topic, best.payload(), 1.0)
    intent = Intent("heating_up", ("heat", "up"), (0.9, 0.7), 0.0, 3.0, created_mono=1.0)
    mine = group.submit(intent, acts("hall"), expires=6.0)
    link.deliver(topic, mine.payload(), 1.001)
    link.deliver(topic, Notice("close", "kitchen", best.id).payload(), 1.15)
    timers.advance(1.3)
    assert acts.calls == [] and group.counters()["arbitrations_lost"] == 1
    link.deliver("home-agent/living/availability", b"offline", 1.4)  # someone else: nothing changes
    link.deliver("home-agent/kitchen/availability", b"online", 1.4)
    timers.advance(1.5)
    assert acts.calls == []
    link.deliver("home-agent/kitchen/availability", b"offline", 1.6)  # it never said "won"
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
    assert config.arbitration.window == 0.15 and config.arbitration.match_tolerance == 1.0
    assert parse_config({"agent": {"id": "a"}, "mqtt": {}}).arbitration is None
    for bad in ({"group": "has space"}, {"group": "g", "window": 0}, {"group": "g", "window": 3.0}, {},
                {"group": "g", "typo": 1}):
        with pytest.raises(ConfigError, match="arbitration"):
            parse_config({"agent": {"id": "a"}, "mqtt": {}, "arbitration": bad})
