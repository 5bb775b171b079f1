"""``home-agent action NAME``: publish one configured action once and wait for the broker's acknowledgement.

A process of its own next to the daemon: its own client id and no availability, so a running daemon is
untouched.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from agent.actions import ActionTable
from agent.config import load_config
from agent.errors import MqttError
from agent.messages import InboundMessage
from agent.mqtt_link import MqttLink, own_client_id

EXIT_OK = 0
EXIT_USAGE = 2
FIRE_STATE_WAIT = 1.5  # wait this long for retained device state (current setpoint)


def fire_action(args: argparse.Namespace) -> int:
    """``home-agent action NAME``: publish one configured action once (QoS >= 1), wait for the broker's
    acknowledgement, exit. Uses its own client id and no availability, so a running daemon is untouched."""
    config = load_config(Path(args.config))
    name: str = args.name
    if name not in config.actions:
        known = ", ".join(sorted(config.actions)) or "none configured"
        print(f"home-agent: unknown action {name!r} (configured actions: {known})", file=sys.stderr)
        return EXIT_USAGE
    actions = ActionTable(dict(config.actions))
    link = MqttLink(config, actions.allowed_topics, availability=False,
                    client_id=own_client_id(config, "action"))
    observed: set[str] = set()
    lock = threading.Lock()

    def on_state(message: InboundMessage) -> None:
        with lock:
            actions.observe_state(message.topic, message.payload)
            observed.add(message.topic)

    state_topics = actions.state_topics() if actions.needs_current_setpoint(name) else []
    for topic in state_topics:
        link.subscribe(topic, on_state)
    timeout = float(getattr(args, "timeout", 10.0))
    link.start()
    try:
        if not link.wait_connected(timeout):
            if link.fatal_error is not None:
                raise link.fatal_error
            raise MqttError(f"cannot connect to the MQTT broker {config.mqtt.host}:{config.mqtt.port} "
                            f"within {timeout:g} s")
        deadline = time.monotonic() + FIRE_STATE_WAIT
        while state_topics and time.monotonic() < deadline:
            with lock:
                if observed >= set(state_topics):
                    break
            time.sleep(0.05)
        with lock:
            commands = actions.render(name, time.monotonic())
        delivered = threading.Semaphore(0)
        for command in commands:
            link.publish(command.topic, command.payload, qos=max(1, command.qos), retain=False,
                         on_delivered=delivered.release)
        deadline = time.monotonic() + timeout
        for command in commands:
            if not delivered.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise MqttError(f"the broker did not acknowledge the message to {command.topic} in time")
            print(f"{command.topic} {command.payload.decode('utf-8', 'replace')}")
    finally:
        link.stop(2.0)
    return EXIT_OK
