"""One agent per agent id (issue 18, item 6): `run --audio ...` next to the running service made both lose
the connection every 0.5 s (one client id) and flipped availability 9 times. A second process now gets its
own client id, and a second agent with the same agent id finds the first (retained availability, a claim
with a per-process nonce, a ping) and refuses to start, exit 2, without touching the first."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

from conftest import REPO_ROOT, Daemon, Mosquitto, MqttProbe, run_cli, wait_until

BASE = "home-agent/testagent"
AVAILABILITY = f"{BASE}/availability"
INSTANCE = f"{BASE}/instance"
EXAMPLE_WAV = REPO_ROOT / "examples" / "computer_light_on.wav"


def start_online(daemon_factory: Callable[..., Daemon], config: Path, probe: MqttProbe,
                 count: int = 1, **kwargs: object) -> Daemon:
    daemon = daemon_factory(config, **kwargs)
    probe.wait_for(AVAILABILITY, b"online", count=count, timeout=15)
    return daemon


def test_a_second_agent_with_the_same_id_refuses_and_the_first_stays_online(
        mosquitto: Mosquitto, write_config: Callable[..., Path], daemon_factory: Callable[..., Daemon],
        mqtt_client: Callable[..., MqttProbe]) -> None:
    config = write_config(mosquitto)
    probe = mqtt_client().subscribe(AVAILABILITY, INSTANCE)
    first = start_online(daemon_factory, config, probe)
    claim = json.loads(probe.wait_for(INSTANCE).payload)
    assert claim["pid"] == first.pid and len(claim["nonce"]) == 32

    # `run --audio file:...` (the README's way to replay a recording) while the service runs...
    replay = run_cli("run", "--config", str(config), "--audio", f"file:{EXAMPLE_WAV}", "--exit-at-end",
                     timeout=60)
    assert replay.returncode == 2, replay.stderr[-3000:]
    assert "agent.id: another home-agent is already running with agent id 'testagent'" in replay.stderr
    assert f"pid {first.pid}" in replay.stderr
    assert "Traceback" not in replay.stderr
    # ...and a second service with the same config.
    second = run_cli("run", "--config", str(config), timeout=60)
    assert second.returncode == 2 and "already running" in second.stderr, second.stderr[-3000:]

    # The first never noticed anything but the warnings: one "online", no flapping, no reconnect.
    assert [m.payload for m in probe.matching(AVAILABILITY)] == [b"online"]
    log = first.log_text()
    assert log.count("connected to MQTT broker") == 1, log[-3000:]
    assert "another home-agent process is starting with agent id 'testagent'" in log
    assert first.alive()
    assert first.terminate(10) == 0


def test_after_a_clean_stop_or_a_crash_the_next_agent_starts(
        mosquitto: Mosquitto, write_config: Callable[..., Path], daemon_factory: Callable[..., Daemon],
        mqtt_client: Callable[..., MqttProbe]) -> None:
    config = write_config(mosquitto)
    probe = mqtt_client().subscribe(AVAILABILITY)
    first = start_online(daemon_factory, config, probe)
    assert first.terminate(10) == 0
    probe.wait_for(AVAILABILITY, b"offline", timeout=5)
    second = start_online(daemon_factory, config, probe, count=2)
    second.kill()  # the last will says offline
    probe.wait_for(AVAILABILITY, b"offline", count=2, timeout=5)
    third = start_online(daemon_factory, config, probe, count=3)
    assert third.terminate(10) == 0


def test_a_stale_online_claim_that_nobody_answers_does_not_block_the_start(
        mosquitto: Mosquitto, write_config: Callable[..., Path], daemon_factory: Callable[..., Daemon],
        mqtt_client: Callable[..., MqttProbe]) -> None:
    """An agent that lost power: its "online" stays retained until the broker's keepalive runs out."""
    config = write_config(mosquitto)
    probe = mqtt_client().subscribe(AVAILABILITY)
    probe.publish(AVAILABILITY, b"online", retain=True)
    probe.publish(INSTANCE, json.dumps({"nonce": "f" * 32, "host": "gone", "pid": 1}), retain=True)
    t0 = time.monotonic()
    daemon = start_online(daemon_factory, config, probe, count=2)
    assert time.monotonic() - t0 < 10
    assert "did not answer" in daemon.log_text()
    assert daemon.terminate(10) == 0


def test_a_restart_type_reload_is_not_a_clash(
        mosquitto: Mosquitto, write_config: Callable[..., Path], daemon_factory: Callable[..., Daemon],
        mqtt_client: Callable[..., MqttProbe]) -> None:
    config = write_config(mosquitto)
    probe = mqtt_client().subscribe(AVAILABILITY)
    daemon = start_online(daemon_factory, config, probe)
    config.write_text(config.read_text().replace("keepalive = 5", "keepalive = 6"))
    daemon.signal(signal.SIGHUP)
    probe.wait_for(AVAILABILITY, b"online", count=2, timeout=15)
    assert wait_until(daemon.alive, 1)
    assert "already running" not in daemon.log_text()
    assert daemon.terminate(10) == 0


def test_action_uses_its_own_client_id_next_to_the_agent(
        mosquitto: Mosquitto, write_config: Callable[..., Path], daemon_factory: Callable[..., Daemon],
        mqtt_client: Callable[..., MqttProbe]) -> None:
    config = write_config(mosquitto)
    probe = mqtt_client().subscribe(AVAILABILITY)
    daemon = start_online(daemon_factory, config, probe)
    fired = run_cli("action", "lamp_on", "--config", str(config))
    assert fired.returncode == 0, fired.stderr
    assert "home-agent-testagent-action-" in fired.stderr
    assert [m.payload for m in probe.matching(AVAILABILITY)] == [b"online"]
    assert daemon.log_text().count("connected to MQTT broker") == 1
    assert daemon.terminate(10) == 0
