"""Security: TLS to the broker with CA and hostname verification (a throw-away CA made by ``openssl`` here),
credentials from a file or the environment never logged, the shipped Mosquitto ACL (in sync with
config.toml, and enforced by a real mosquitto), the voice rate limit, and a confirm action that never
fires without its spoken "yes".

Covered elsewhere and not repeated: the publish allow-list (test_mqtt_link, test_actions), bad
credentials stop retrying (test_mqtt_link, test_daemon), the confirm window's yes/no logic
(test_recognizer).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from conftest import (
    REPO_ROOT,
    Daemon,
    Mosquitto,
    MqttProbe,
    base_config,
    make_password_file,
    toml_dumps,
    wait_until,
)
from paho.mqtt.enums import CallbackAPIVersion

from agent import __version__
from agent.actions import ActionTable
from agent.config import Config, load_config, parse_config
from agent.discovery import discovery_messages, discovery_topic_filter
from agent.errors import ActionError
from agent.messages import ActionRequest
from agent.mqtt_link import MqttLink
from agent.topics import Topics
from agent.wiring import build

ACL_EXAMPLE = REPO_ROOT / "deploy" / "mosquitto" / "acl.example"
EXAMPLE_CONFIG = REPO_ROOT / "config.toml"
AGENT_USER = "home-agent-kitchen"
PASSWORD = "s3cret-Pa55word-never-in-logs"

# ------------------------------------------------------------------------------------ a throw-away CA


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path  # a CA nobody configured
    good_cert: Path  # CN/SAN localhost + 127.0.0.1, signed by ca
    good_key: Path
    wrong_cert: Path  # SAN wrong.example only, signed by ca
    wrong_key: Path
    rogue_cert: Path  # SAN localhost + 127.0.0.1, signed by other_ca
    rogue_key: Path


def openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN=home-agent test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    return cert, key


def make_server_cert(directory: Path, name: str, ca: tuple[Path, Path], common_name: str,
                     san: str) -> tuple[Path, Path]:
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.crt"
    ext = directory / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
                   encoding="utf-8")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
            "-out", str(csr), "-subj", f"/CN={common_name}", cwd=directory)
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
            "-out", str(cert), "-days", "2", "-extfile", str(ext), cwd=directory)
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory, "ca")
    other = make_ca(directory, "other-ca")
    good = make_server_cert(directory, "good", ca, "localhost", "DNS:localhost,IP:127.0.0.1")
    wrong = make_server_cert(directory, "wrong", ca, "wrong.example", "DNS:wrong.example")
    rogue = make_server_cert(directory, "rogue", other, "localhost", "DNS:localhost,IP:127.0.0.1")
    return Pki(ca[0], other[0], good[0], good[1], wrong[0], wrong[1], rogue[0], rogue[1])


def tls_lines(ca: Path, cert: Path, key: Path) -> tuple[str, ...]:
    return (f"cafile {ca}", f"certfile {cert}", f"keyfile {key}")


def tls_config(broker: Mosquitto, tmp_path: Path, ca: Path, host: str = "127.0.0.1",
               **extra: Any) -> Config:
    data = base_config(broker, tmp_path / "state")
    data["mqtt"].update({"host": host, "tls": {"ca_file": str(ca), **extra}})
    return parse_config(data, source="tls.toml")


@pytest.fixture
def links() -> Iterator[Callable[[Config], MqttLink]]:
    made: list[MqttLink] = []

    def make(config: Config) -> MqttLink:
        link = MqttLink(config)
        made.append(link)
        link.start()
        return link

    yield make
    for link in made:
        link.stop(1.0)


# ------------------------------------------------------------------------------------ TLS


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])  # the IP and the DNS subjectAltName
def test_tls_with_ca_and_hostname_verification_connects(  # noqa: PLR0917 - fixtures
        mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path, pki: Pki,
        mqtt_client: Callable[..., MqttProbe], links: Callable[[Config], MqttLink], host: str) -> None:
    broker = mosquitto_factory(extra_lines=tls_lines(pki.ca, pki.good_cert, pki.good_key))
    probe = mqtt_client(broker, tls_ca=pki.ca).subscribe("home-agent/#")
    link = links(tls_config(broker, tmp_path, pki.ca, host=host))
    assert link.wait_connected(5)
    link.publish("home-agent/testagent/x", b"over tls", qos=1)
    assert probe.wait_for("home-agent/testagent/x").payload == b"over tls"
    assert probe.wait_for("home-agent/testagent/availability", b"online")
    # The listener really is TLS-only: a plain client never gets a CONNACK.
    plain = paho.Client(CallbackAPIVersion.VERSION2)
    connected = threading.Event()
    plain.on_connect = lambda *_args: connected.set()
    plain.connect(broker.host, broker.port, 5)
    plain.loop_start()
    try:
        assert not connected.wait(1.0)
    finally:
        plain.loop_stop()


@pytest.mark.parametrize("case", ["wrong hostname", "unknown CA"])
def test_tls_refuses_a_certificate_that_does_not_prove_the_broker(  # noqa: PLR0917 - fixtures
        mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path, pki: Pki,
        links: Callable[[Config], MqttLink], caplog: pytest.LogCaptureFixture, case: str) -> None:
    wrong = case == "wrong hostname"
    cert, key = (pki.wrong_cert, pki.wrong_key) if wrong else (pki.rogue_cert, pki.rogue_key)
    broker = mosquitto_factory(extra_lines=tls_lines(pki.ca, cert, key))
    with caplog.at_level(logging.WARNING, logger="agent.mqtt_link"):
        link = links(tls_config(broker, tmp_path, pki.ca))
        assert not link.wait_connected(2.0)
    assert link.stats.get("connect_failures") >= 2  # refused, and it keeps trying (the broker may be fixed)
    assert link.stats.get("connects") == 0
    assert "certificate verify failed" in caplog.text
    assert ("IP address mismatch" in caplog.text) if case == "wrong hostname" else \
        ("unable to get local issuer certificate" in caplog.text)


def test_skipping_the_hostname_check_is_what_lets_a_wrong_name_through(
        mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path, pki: Pki,
        links: Callable[[Config], MqttLink], caplog: pytest.LogCaptureFixture) -> None:
    broker = mosquitto_factory(extra_lines=tls_lines(pki.ca, pki.wrong_cert, pki.wrong_key))
    with caplog.at_level(logging.WARNING, logger="agent.mqtt_link"):
        link = links(tls_config(broker, tmp_path, pki.ca, insecure_skip_hostname_check=True))
        assert link.wait_connected(5)
    assert "hostname is NOT verified" in caplog.text


@pytest.mark.parametrize("source", ["password_file", "environment"])
def test_credentials_over_tls_are_never_logged(  # noqa: PLR0917 - fixtures
        mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path, pki: Pki,
        daemon_factory: Callable[..., Daemon], mqtt_client: Callable[..., MqttProbe], source: str) -> None:
    passwd = make_password_file(tmp_path / "passwd", AGENT_USER, PASSWORD)
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "observer", "observer-pw"], check=True,
                   capture_output=True)
    broker = mosquitto_factory(password_file=passwd,
                               extra_lines=tls_lines(pki.ca, pki.good_cert, pki.good_key))
    data = base_config(broker, tmp_path / "state")
    data["mqtt"].update({"username": AGENT_USER, "tls": {"ca_file": str(pki.ca)}})
    env: dict[str, str] = {}
    if source == "password_file":
        secret = tmp_path / "mqtt-password"
        secret.write_text(PASSWORD + "\n", encoding="utf-8")
        secret.chmod(0o600)
        data["mqtt"]["password_file"] = str(secret)
    else:
        env["HOME_AGENT_MQTT_PASSWORD"] = PASSWORD
    config_path = tmp_path / "config.toml"
    config_path.write_text(toml_dumps(data), encoding="utf-8")
    probe = mqtt_client(broker, username="observer", password="observer-pw", tls_ca=pki.ca)
    probe.subscribe("home-agent/testagent/availability")
    daemon = daemon_factory(config_path, env=env, log_level="DEBUG")
    probe.wait_for("home-agent/testagent/availability", b"online", timeout=10)
    assert daemon.terminate() == 0
    output = daemon.log_text()
    assert "connected to MQTT broker" in output  # the log was captured, at DEBUG
    assert PASSWORD not in output
    assert PASSWORD[:8] not in output
    assert PASSWORD not in broker.log_text()


# ------------------------------------------------------------------------------------ the ACL


@dataclass(frozen=True)
class Grant:
    access: str  # read | write | readwrite
    pattern: str


def parse_acl(text: str) -> dict[str | None, list[Grant]]:
    """Mosquitto acl_file syntax: ``user NAME`` starts a block; ``topic [read|write|readwrite] PATTERN``."""
    grants: dict[str | None, list[Grant]] = {None: []}
    user: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        if words[0] == "user":
            user = words[1]
            grants.setdefault(user, [])
        elif words[0] == "topic":
            access, pattern = (words[1], words[2]) if len(words) == 3 else ("readwrite", words[1])
            grants[user].append(Grant(access, pattern))
        else:
            raise AssertionError(f"unexpected ACL line {line!r}")
    return grants


def covers(pattern: str, topic_filter: str) -> bool:
    """Whether every topic matched by ``topic_filter`` (wildcards allowed) is matched by ``pattern``."""
    pattern_levels, filter_levels = pattern.split("/"), topic_filter.split("/")
    for index, level in enumerate(pattern_levels):
        if level == "#":
            return True
        if index >= len(filter_levels):
            return False
        wanted = filter_levels[index]
        if wanted == "#" or (wanted == "+" and level != "+"):
            return False
        if level not in ("+", wanted):
            return False
    return len(pattern_levels) == len(filter_levels)


def allowed(grants: list[Grant], topic: str, access: str) -> bool:
    return any(access in g.access and covers(g.pattern, topic) for g in grants)


def test_the_example_acl_grants_exactly_what_the_example_config_uses() -> None:
    config = load_config(EXAMPLE_CONFIG)
    grants = parse_acl(ACL_EXAMPLE.read_text(encoding="utf-8"))[AGENT_USER]
    topics = Topics.from_config(config)
    actions = ActionTable(dict(config.actions))
    event_types = sorted({c.action for c in config.voice.commands})
    writes = {topics.availability, topics.diagnostics, topics.intent, topics.event, topics.mute_state,
              *(topics.sensor_state(s.sensor) for s in config.telemetry),
              *(topics.anomaly(s.sensor) for s in config.telemetry),
              *discovery_messages(config, event_types=event_types, sw_version=__version__),
              *(Topics.hermes_intent(action) for action in event_types),
              *actions.allowed_topics}
    reads = {topics.mute_set, topics.ha_status, discovery_topic_filter(config),
             *(s.topic for s in config.telemetry), *actions.state_topics()}
    assert [t for t in sorted(writes) if not allowed(grants, t, "write")] == []
    assert [t for t in sorted(reads) if not allowed(grants, t, "read")] == []
    # ...and no more than that: nothing else, no wildcard device access.
    for denied in ("zigbee2mqtt/front_door_lock/set", "zigbee2mqtt/living_room_sensor/set",
                   "cmnd/other/POWER", "home-agent/other/availability",
                   "homeassistant/lock/front_door/config", "homeassistant/status",
                   "homeassistant/switch/other/mute/config", "#"):
        assert not allowed(grants, denied, "write"), denied
    for denied in ("#", "zigbee2mqtt/#", "home-agent/#", "homeassistant/#", "home-agent/other/intent"):
        assert not allowed(grants, denied, "read"), denied


@pytest.fixture
def acl_broker(mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path) -> Mosquitto:
    """A mosquitto with a password file (agent + observer) and the shipped ACL (+ an all-access observer)."""
    passwd = make_password_file(tmp_path / "passwd", AGENT_USER, PASSWORD)
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "observer", "observer-pw"], check=True,
                   capture_output=True)
    acl = tmp_path / "acl"
    acl.write_text(ACL_EXAMPLE.read_text(encoding="utf-8") + "\nuser observer\ntopic readwrite #\n",
                   encoding="utf-8")
    return mosquitto_factory(password_file=passwd, extra_lines=(f"acl_file {acl}", "log_type debug"))


class RawClient:
    """A paho client logged in as the agent's user: tries what the agent must never be able to do."""

    def __init__(self, broker: Mosquitto) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.granted: list[list[int]] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="rogue-agent-user")
        self.client.username_pw_set(AGENT_USER, PASSWORD)
        self.client.on_message = lambda _c, _u, m: self.received.append((m.topic, bytes(m.payload)))
        self.client.on_subscribe = lambda _c, _u, _mid, codes, _p: self.granted.append(
            [c.value for c in codes])
        connected = threading.Event()
        self.client.on_connect = lambda *_args: connected.set()
        self.client.connect(broker.host, broker.port, 10)
        self.client.loop_start()
        assert connected.wait(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def example_config_for(broker: Mosquitto, state_dir: Path) -> Config:
    data = tomllib.loads(EXAMPLE_CONFIG.read_text(encoding="utf-8"))
    data["agent"]["state_dir"] = str(state_dir)
    data["mqtt"].update({"host": broker.host, "port": broker.port, "username": AGENT_USER,
                         "reconnect_min_delay": 0.1, "reconnect_max_delay": 0.5})
    data["homeassistant"].update({"announce_jitter": 0.0, "diagnostics_interval": 1.0})
    data["voice"]["enabled"] = False  # no microphone here; the ACL must still cover the voice topics
    return parse_config(data, source="config.toml")


def test_mosquitto_enforces_the_example_acl(acl_broker: Mosquitto, tmp_path: Path,
                                            mqtt_client: Callable[..., MqttProbe],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    observer = mqtt_client(acl_broker, username="observer", password="observer-pw").subscribe("#")
    monkeypatch.setenv("HOME_AGENT_MQTT_PASSWORD", PASSWORD)
    config = example_config_for(acl_broker, tmp_path / "state")
    daemon = build(config)
    app = daemon.app
    thread = threading.Thread(target=app.run, daemon=True)
    thread.start()
    raw: RawClient | None = None
    try:
        # The agent does its whole job under the ACL: online, discovery, telemetry in, a command out.
        observer.wait_for("home-agent/kitchen/availability", b"online", timeout=10)
        expected = discovery_messages(config, event_types=[], sw_version=__version__)
        assert wait_until(lambda: set(expected) <= {m.topic for m in observer.matching("homeassistant/#")}, 5)
        observer.publish("zigbee2mqtt/living_room_sensor", b'{"temperature": 21.5, "humidity": 40}')
        assert wait_until(lambda: app.counters()["readings"] == 2, 5)
        observer.publish("zigbee2mqtt/living_room_trv", b'{"current_heating_setpoint": 20}')
        time.sleep(0.2)
        daemon.actions.request_action(ActionRequest("heating_up", "anomaly", time.monotonic()))
        command = observer.wait_for("zigbee2mqtt/living_room_trv/set")
        assert command.payload == b'{"current_heating_setpoint": 21.0}'
        agent_client = f"home-agent-{config.agent.id}"
        assert f"Denied PUBLISH from {agent_client}" not in acl_broker.log_text()

        # Publishing where the ACL does not allow: the broker drops it (logged), nobody receives it.
        raw = RawClient(acl_broker)
        denied = ["zigbee2mqtt/front_door_lock/set", "home-agent/otheragent/availability",
                  "homeassistant/lock/front_door/config", "homeassistant/status",
                  "zigbee2mqtt/living_room_sensor"]
        for topic in denied:
            raw.client.publish(topic, b"forged", qos=1).wait_for_publish(5)
        raw.client.publish("home-agent/kitchen/sentinel", b"allowed", qos=1).wait_for_publish(5)
        observer.wait_for("home-agent/kitchen/sentinel", b"allowed")  # after the denied ones, in order
        assert observer.matching("#", b"forged") == []
        assert acl_broker.log_text().count("Denied PUBLISH from rogue-agent-user") == len(denied)

        # Subscribing where the ACL does not allow: nothing is ever delivered.
        raw.client.subscribe([("zigbee2mqtt/front_door_lock", 1), ("secrets/#", 1),
                              ("home-agent/otheragent/#", 1), ("#", 1),
                              ("zigbee2mqtt/living_room_sensor", 1)])
        assert wait_until(lambda: raw is not None and raw.granted, 5)
        private = ("zigbee2mqtt/front_door_lock", "secrets/alarm_code", "home-agent/otheragent/intent")
        for topic in private:
            observer.publish(topic, b"private")
        sentinel = ("zigbee2mqtt/living_room_sensor", b'{"temperature": 22}')  # readable, published last
        observer.publish(*sentinel)
        assert wait_until(lambda: raw is not None and sentinel in raw.received, 5)
        assert [m for m in raw.received if m[1] == b"private"] == []
        # Even "#" only brings what the ACL lets the agent read (its own retained topics, the sentinel).
        grants = parse_acl(ACL_EXAMPLE.read_text(encoding="utf-8"))[AGENT_USER]
        assert [t for t, _p in raw.received if not allowed(grants, t, "read")] == []
        print(f"\nSUBACK codes for denied/allowed subscriptions: {raw.granted}")
    finally:
        if raw is not None:
            raw.close()
        app.request_stop()
        thread.join(10)


def test_anonymous_clients_are_refused(acl_broker: Mosquitto) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2)
    refused = threading.Event()
    client.on_connect = lambda _c, _u, _f, reason, _p: refused.set() if reason.is_failure else None
    client.connect(acl_broker.host, acl_broker.port, 5)
    client.loop_start()
    try:
        assert refused.wait(5)
    finally:
        client.loop_stop()


# ------------------------------------------------------------------------------------ voice safety


def test_voice_actions_are_rate_limited(mosquitto: Mosquitto, tmp_path: Path,
                                        mqtt_client: Callable[..., MqttProbe]) -> None:
    data = base_config(mosquitto, tmp_path / "state")
    data["actions"]["lamp_on"]["min_interval"] = 2.0
    daemon = build(parse_config(data, source="t.toml"))
    app = daemon.app
    probe = mqtt_client().subscribe("test/lamp/set")
    thread = threading.Thread(target=app.run, daemon=True)
    thread.start()
    try:
        assert app.link.wait_connected(5)
        start = time.monotonic()
        assert daemon.actions.request_action(ActionRequest("lamp_on", "voice", start)) == 1
        for _ in range(5):  # a stuck recogniser or a replayed clip repeating the command
            with pytest.raises(ActionError, match="rate limited"):
                daemon.actions.request_action(ActionRequest("lamp_on", "voice", time.monotonic()))
        time.sleep(max(0.0, start + 2.05 - time.monotonic()))
        assert daemon.actions.request_action(ActionRequest("lamp_on", "voice", time.monotonic())) == 1
        probe.wait_for("test/lamp/set", count=2)
        time.sleep(0.2)
        assert len(probe.matching("test/lamp/set")) == 2
        assert app.counters()["actions_rejected"] == 5
    finally:
        app.request_stop()
        thread.join(10)


@pytest.mark.skipif(not (REPO_ROOT / "models" / "kws.tflite").exists(), reason="models/kws.tflite not built")
def test_a_confirm_action_never_fires_without_a_spoken_yes(mosquitto: Mosquitto, tmp_path: Path,
                                                           mqtt_client: Callable[..., MqttProbe]) -> None:
    """The same recording fires the action without ``confirm`` (so it is heard) and not with it."""
    probe = mqtt_client().subscribe("cmnd/#")
    outputs: dict[bool, str] = {}
    for confirm in (False, True):
        config = {
            "agent": {"id": "confirmtest", "state_dir": str(tmp_path / "state")},
            "mqtt": {"host": mosquitto.host, "port": mosquitto.port},
            "audio": {"realtime": False},
            "actions": {"garage_open": {"profile": "tasmota", "device": f"garage_{confirm}".lower(),
                                        "command": "on", "confirm": confirm}},
            "voice": {"confirm_window": 2.0, "commands": [{"say": "light on", "action": "garage_open"}]},
        }
        path = tmp_path / f"config-{confirm}.toml"
        path.write_text(toml_dumps(config), encoding="utf-8")
        result = subprocess.run(
            [sys.executable, "-m", "agent", "--log-level", "INFO", "run", "--config", str(path),
             "--audio", f"file:{REPO_ROOT / 'examples' / 'computer_light_on.wav'}", "--exit-at-end"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        outputs[confirm] = result.stdout + result.stderr
    time.sleep(0.3)
    assert probe.matching("cmnd/garage_false/POWER"), \
        "without confirm the recording must fire the action (is the wake word heard?):\n" + outputs[False]
    assert "garage_open needs confirmation" in outputs[True], outputs[True]
    assert probe.matching("cmnd/garage_true/POWER") == []
