"""MqttLink against a real mosquitto: availability, queue bound and drop policy, TTL, delivery callbacks,
inbound limits, handler faults, resubscribe after a broker restart, allow-list, clean stop."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Mosquitto, MqttProbe, base_config, set_dotted, wait_until

from agent.config import Config, parse_config
from agent.errors import ActionError, ConfigError, PayloadError
from agent.messages import InboundMessage
from agent.mqtt_link import MqttLink

AVAILABILITY = "home-agent/testagent/availability"


def make_config(broker: Mosquitto, tmp_path: Path, **dotted: Any) -> Config:
    data = base_config(broker, tmp_path / "state")
    for key, value in dotted.items():
        set_dotted(data, key, value)
    return parse_config(data, source="test.toml")


@pytest.fixture
def link_factory() -> Iterator[Callable[..., MqttLink]]:
    links: list[MqttLink] = []

    def make(config: Config, *args: Any, start: bool = True, **kwargs: Any) -> MqttLink:
        link = MqttLink(config, *args, **kwargs)
        links.append(link)
        if start:
            link.start()
        return link

    yield make
    for link in links:
        link.stop(1.0)


def test_online_on_connect_and_offline_on_stop(mosquitto: Mosquitto, tmp_path: Path,
                                               mqtt_client: Callable[..., MqttProbe],
                                               link_factory: Callable[..., MqttLink]) -> None:
    probe = mqtt_client().subscribe(AVAILABILITY)
    link = link_factory(make_config(mosquitto, tmp_path))
    assert link.wait_connected(5)
    assert probe.wait_for(AVAILABILITY, b"online").payload == b"online"
    link.stop(2.0)
    probe.wait_for(AVAILABILITY, b"offline")
    assert not link.connected
    assert link.publish("home-agent/testagent/x", b"late") is False  # stopped: nothing queued


def test_allow_list(mosquitto: Mosquitto, tmp_path: Path, link_factory: Callable[..., MqttLink]) -> None:
    link = link_factory(make_config(mosquitto, tmp_path), ["test/lamp/set"], start=False)
    with pytest.raises(ActionError, match="not allowed"):
        link.publish("zigbee2mqtt/other_device/set", b"{}")
    with pytest.raises(ActionError):
        link.publish("test/#", b"x")
    assert link.publish("test/lamp/set", b"{}")
    assert link.publish("homeassistant/sensor/testagent/x/config", b"{}")
    link.set_extra_allowed_topics([])
    with pytest.raises(ActionError):
        link.publish("test/lamp/set", b"{}")


def test_queue_drops_oldest_while_disconnected_then_delivers_in_order(
        mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path, mqtt_client: Callable[..., MqttProbe],
        link_factory: Callable[..., MqttLink]) -> None:
    broker = mosquitto_factory(persistence=True)
    probe = mqtt_client(broker, client_id="probe", clean_session=False).subscribe("home-agent/testagent/q")
    broker.stop()
    link = link_factory(make_config(broker, tmp_path, **{"mqtt.max_queued_messages": 10}))
    for index in range(15):
        assert link.publish("home-agent/testagent/q", str(index), qos=1)
    assert link.stats.dropped == 5
    assert link.queued == 10
    broker.start()
    probe.wait_for("home-agent/testagent/q", b"14", timeout=10)
    received = [m.payload for m in probe.matching("home-agent/testagent/q")]
    assert received == [str(i).encode() for i in range(5, 15)]
    assert wait_until(lambda: link.stats.messages_out >= 11, 3)  # 10 + "online"


def test_expired_message_is_never_sent(mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path,
                                       mqtt_client: Callable[..., MqttProbe],
                                       link_factory: Callable[..., MqttLink]) -> None:
    broker = mosquitto_factory(persistence=True)
    probe = mqtt_client(broker, client_id="probe", clean_session=False).subscribe("test/lamp/set")
    broker.stop()
    link = link_factory(make_config(broker, tmp_path), ["test/lamp/set"])
    now = time.monotonic()
    assert link.publish("test/lamp/set", b"voice", qos=1, expires_mono=now + 0.3)
    assert link.publish("test/lamp/set", b"no-ttl", qos=1)
    assert link.publish("test/lamp/set", b"already", expires_mono=now - 1) is False
    time.sleep(0.5)
    broker.start()
    probe.wait_for("test/lamp/set", b"no-ttl", timeout=10)
    time.sleep(0.2)
    assert [m.payload for m in probe.matching("test/lamp/set")] == [b"no-ttl"]
    assert link.stats.get("expired") == 2


def test_on_delivered_fires_for_qos0_and_qos1(mosquitto: Mosquitto, tmp_path: Path,
                                              link_factory: Callable[..., MqttLink]) -> None:
    link = link_factory(make_config(mosquitto, tmp_path), ["test/lamp/set"])
    assert link.wait_connected(5)
    delivered: list[int] = []
    done = threading.Event()
    def make_callback(qos: int) -> Callable[[], None]:
        def on_delivered() -> None:
            delivered.append(qos)
            if len(delivered) == 3:
                done.set()
        return on_delivered

    for qos in (0, 1, 2):
        link.publish("test/lamp/set", b"x", qos=qos, on_delivered=make_callback(qos))
    assert done.wait(5)
    assert sorted(delivered) == [0, 1, 2]


def test_inbound_limits_and_handler_faults_are_counted(mosquitto: Mosquitto, tmp_path: Path,
                                                       mqtt_client: Callable[..., MqttProbe],
                                                       link_factory: Callable[..., MqttLink]) -> None:
    link = link_factory(make_config(mosquitto, tmp_path, **{"mqtt.max_payload_bytes": 1024}), start=False)
    good: list[InboundMessage] = []

    def handler(message: InboundMessage) -> None:
        if message.payload == b"boom":
            raise RuntimeError("handler bug")
        if message.payload == b"bad":
            raise PayloadError("not a number")
        good.append(message)

    link.subscribe("in/+", handler)
    link.start()
    assert link.wait_connected(5)
    time.sleep(0.1)
    probe = mqtt_client()
    probe.publish("in/a", b"x" * 2000)  # too big: rejected before any handler
    probe.publish("in/a", b"boom")
    probe.publish("in/a", b"bad")
    probe.publish("in/b", b"ok", retain=True)
    assert wait_until(lambda: len(good) == 1, 3)
    assert good[0].topic == "in/b" and good[0].payload == b"ok" and not good[0].retained
    stats = link.stats.snapshot()
    assert stats["bad_payloads"] == 2
    assert stats["handler_errors"] == 1
    assert stats["messages_in"] == 4


def test_resubscribes_and_reannounces_after_broker_restart(mosquitto: Mosquitto, tmp_path: Path,
                                                           mqtt_client: Callable[..., MqttProbe],
                                                           link_factory: Callable[..., MqttLink]) -> None:
    link = link_factory(make_config(mosquitto, tmp_path), start=False)
    received: list[bytes] = []
    connects: list[float] = []
    link.subscribe("in/x", lambda m: received.append(m.payload))
    link.add_connect_listener(lambda: connects.append(time.monotonic()))
    link.start()
    assert link.wait_connected(5)
    mosquitto.kill()
    assert wait_until(lambda: not link.connected, 3)
    mosquitto.start()
    assert wait_until(lambda: len(connects) == 2, 5)
    probe = mqtt_client()
    probe.publish("in/x", b"after-restart")
    assert wait_until(lambda: received == [b"after-restart"], 3)
    assert link.stats.get("connects") == 2
    assert mqtt_client().subscribe(AVAILABILITY).wait_for(AVAILABILITY, b"online", retained=True)


def test_resubscribe_replaces_a_set_in_one_step(mosquitto: Mosquitto, tmp_path: Path,
                                                mqtt_client: Callable[..., MqttProbe],
                                                link_factory: Callable[..., MqttLink]) -> None:
    """A reload's new subscriptions: the new handler hears its filters and the old one nothing more; a filter
    both sets hold stays subscribed at the broker (its retained message is not sent again); an invalid
    filter changes nothing."""
    probe = mqtt_client()
    probe.publish("in/kept", b"retained", retain=True)
    link = link_factory(make_config(mosquitto, tmp_path), start=False)
    old: list[InboundMessage] = []
    new: list[InboundMessage] = []
    previous = link.resubscribe([], ["in/kept", "in/dropped"], old.append)
    link.start()
    assert wait_until(lambda: [m.payload for m in old] == [b"retained"], 5)
    current = link.resubscribe(previous, ["in/kept", "in/added"], new.append)
    with pytest.raises(ValueError, match="invalid MQTT topic filter"):
        link.resubscribe(current, ["in/#/bad"], old.append)

    def heard_added() -> bool:  # the link subscribes the new filter on its own thread: ask until it has
        probe.publish("in/added", b"added")
        return bool(wait_until(lambda: any(m.topic == "in/added" for m in new), 0.2))

    assert wait_until(heard_added, 5)
    probe.publish("in/dropped", b"dropped")
    probe.publish("in/kept", b"live")
    assert wait_until(lambda: any(m.payload == b"live" for m in new), 3)
    assert [m.payload for m in old] == [b"retained"]
    assert not [m for m in new if m.retained or m.topic == "in/dropped"]
    assert link.stats.get("handler_errors") == 0


def test_bad_credentials_stop_retrying(mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path,
                                       link_factory: Callable[..., MqttLink],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    password_file = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(password_file), "agent", "right"], check=True)
    broker = mosquitto_factory(password_file=password_file)
    monkeypatch.setenv("HOME_AGENT_MQTT_PASSWORD", "wrong")
    link = link_factory(make_config(broker, tmp_path, **{"mqtt.username": "agent"}))
    assert not link.wait_connected(3)
    assert link.fatal_error is not None
    assert "not authorized" in str(link.fatal_error).lower() or "bad user" in str(link.fatal_error).lower()
    assert "not authorised" in broker.log_text()
    attempts = broker.log_text().count("New connection from")
    time.sleep(1.0)  # a retrying link would have reconnected 2-10 times by now (backoff 0.1-0.5 s)
    assert broker.log_text().count("New connection from") == attempts


def test_password_file_unreadable_is_a_config_error(mosquitto: Mosquitto, tmp_path: Path) -> None:
    config = make_config(mosquitto, tmp_path, **{"mqtt.username": "u",
                                                 "mqtt.password_file": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match=r"mqtt\.password_file"):
        MqttLink(config)


def test_backoff_is_capped(tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
                           link_factory: Callable[..., MqttLink]) -> None:
    broker = mosquitto_factory(start=False)  # nobody listens on this port
    link = link_factory(make_config(broker, tmp_path, **{"mqtt.reconnect_min_delay": 0.05,
                                                         "mqtt.reconnect_max_delay": 0.2}))
    time.sleep(1.5)
    failures = link.stats.get("connect_failures")
    # Uncapped doubling from 0.05 s would give ~5 attempts in 1.5 s; capped at 0.2 s (jitter 0.1-0.2) >= 8.
    assert failures >= 8
    broker.start()
    assert link.wait_connected(3)


def test_subscribe_refuses_invalid_filters(tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
                                          link_factory: Callable[..., MqttLink]) -> None:
    link = link_factory(make_config(mosquitto_factory(start=False), tmp_path))
    def ignore(_message: InboundMessage) -> None:
        pass

    for good in ("a/b", "a/+/c", "#", "a/#", "+"):
        link.resubscribe([link.subscribe(good, ignore)], [], ignore)  # subscribed, then dropped
    for bad in ("", "a/#/b", "a/b#", "a+/b", "a\0b"):
        with pytest.raises(ValueError, match="invalid MQTT topic filter"):
            link.subscribe(bad, lambda _message: None)


def make_certificates(directory: Path) -> dict[str, Path]:
    """A throw-away CA and a broker certificate for DNS name "localhost" only (openssl CLI)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / name for name in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt",
                                                 "san.ext")}
    paths["san.ext"].write_text("subjectAltName = DNS:localhost\n", encoding="utf-8")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-days", "2", "-subj", "/CN=home-agent test CA", "-keyout", str(paths["ca.key"]),
            "-out", str(paths["ca.crt"]))
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-subj", "/CN=localhost", "-keyout", str(paths["server.key"]), "-out", str(paths["server.csr"]))
    openssl("x509", "-req", "-in", str(paths["server.csr"]), "-CA", str(paths["ca.crt"]), "-CAkey",
            str(paths["ca.key"]), "-CAcreateserial", "-days", "2", "-extfile", str(paths["san.ext"]),
            "-out", str(paths["server.crt"]))
    return paths


def test_tls_verifies_the_broker_certificate_and_host_name(
        mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path,
        link_factory: Callable[..., MqttLink]) -> None:
    certs = make_certificates(tmp_path / "certs")
    broker = mosquitto_factory(extra_lines=(f"cafile {certs['ca.crt']}", f"certfile {certs['server.crt']}",
                                            f"keyfile {certs['server.key']}"))
    tls = {"ca_file": str(certs["ca.crt"])}
    # The name in the certificate: connects.
    good = link_factory(make_config(broker, tmp_path, **{"mqtt.host": "localhost", "mqtt.tls": tls}))
    assert good.wait_connected(5)
    # An address the certificate does not name: refused by the hostname check...
    wrong_name = link_factory(make_config(broker, tmp_path, **{"mqtt.tls": tls}),
                              client_id="tls-wrong-name")
    # ...and no CA configured (system store): the self-made CA is not trusted.
    untrusted = link_factory(make_config(broker, tmp_path, **{"mqtt.host": "localhost", "mqtt.tls": {}}),
                             client_id="tls-untrusted")
    for refused in (wrong_name, untrusted):
        stats = refused.stats
        assert wait_until(lambda: stats.get("connect_failures") >= 2, 3)  # noqa: B023 - used at once
        assert not refused.connected
    # The explicit escape hatch turns the hostname check off (the chain is still verified).
    insecure = link_factory(make_config(broker, tmp_path, **{
        "mqtt.tls": {**tls, "insecure_skip_hostname_check": True}}), client_id="tls-insecure")
    assert insecure.wait_connected(5)
    # Plain MQTT to a TLS listener does not connect either.
    plain = link_factory(make_config(broker, tmp_path), client_id="plain")
    assert wait_until(lambda: plain.stats.get("connect_failures") >= 2, 3)
    assert not plain.connected


def test_tls_bad_ca_file_is_a_config_error(mosquitto: Mosquitto, tmp_path: Path) -> None:
    bogus = tmp_path / "ca.crt"
    bogus.write_text("not a certificate", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"mqtt\.tls"):
        MqttLink(make_config(mosquitto, tmp_path, **{"mqtt.tls": {"ca_file": str(bogus)}}))
