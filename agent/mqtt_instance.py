"""One agent per agent id: before its first connection an agent makes sure no other live agent uses its
id on the broker, and it answers agents that start later with the same id (its retained claim).

Uses paho on a connection of its own (the agent-id check); ``agent.mqtt_link`` runs the agent's own.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import Config
from agent.errors import AgentIdClashError
from agent.mqtt_tls import TlsContext
from agent.topics import Topics

log = logging.getLogger(__name__)

ONLINE = b"online"
CONNECT_TIMEOUT = 5.0
# One agent per agent id: this process's claim. The same across the Apps a reload builds in one process.
PROCESS_NONCE = uuid.uuid4().hex
INSTANCE_SETTLE = 0.3  # after SUBACK: time for the retained availability and claim to arrive
INSTANCE_REPLY_WAIT = 2.0  # how long a live claimant gets to answer a ping


def instance_claim() -> bytes:
    return json.dumps({"nonce": PROCESS_NONCE, "host": socket.gethostname(), "pid": os.getpid(),
                       "started": round(time.time())}, separators=(",", ":")).encode()


def _parse_claim(payload: bytes) -> dict[str, object] | None:
    try:
        claim = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return claim if isinstance(claim, dict) and isinstance(claim.get("nonce"), str) else None


def check_instance(config: Config, *, client_id: str, password: str | None,  # noqa: C901 - paho closures count
                   tls_context: TlsContext | None) -> bool | AgentIdClashError:
    """Before the first connection: look for another live agent with our agent id, on a connection of
    its own (its own client id, no last will: it must not disturb the other agent). The retained
    availability says whether the claimant (the retained claim's nonce) went away; when it says
    "online", a ping tells a live claimant from one that vanished without its will being sent yet.
    Returns True when no other agent runs, AgentIdClashError when one answers, False when the broker
    refused the connection (the agent's own connection reports why). Raises OSError when the broker
    cannot be reached."""
    topics = Topics.from_config(config)
    mqtt = config.mqtt
    lock = threading.Lock()
    seen: dict[str, bytes] = {}
    answer: list[dict[str, object]] = []
    connected, subscribed, answered = threading.Event(), threading.Event(), threading.Event()
    refused: list[ReasonCode] = []
    closed: list[ReasonCode] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{client_id}-check-{os.getpid()}",
                         clean_session=True, protocol=paho.MQTTv311, reconnect_on_failure=False)
    client.connect_timeout = CONNECT_TIMEOUT
    if mqtt.username is not None:
        client.username_pw_set(mqtt.username, password)
    if tls_context is not None:
        client.tls_set_context(tls_context)

    def on_connect(_c: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        if reason.is_failure:
            refused.append(reason)
        connected.set()

    def on_subscribe(_c: paho.Client, _u: Any, _mid: int, _r: list[ReasonCode], _p: Any) -> None:
        subscribed.set()

    def on_disconnect(_c: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        closed.append(reason)
        connected.set()
        subscribed.set()

    def on_message(_c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        with lock:
            if message.retain:
                seen[message.topic] = bytes(message.payload)
                return
        claim = _parse_claim(bytes(message.payload)) if message.topic == topics.instance else None
        if claim is not None and claim["nonce"] != PROCESS_NONCE:
            with lock:
                answer.append(claim)
            answered.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_disconnect = on_disconnect
    client.on_message = on_message
    try:
        client.connect(mqtt.host, mqtt.port, mqtt.keepalive)
    except (OSError, ValueError):
        if tls_context is not None:
            tls_context.close_failed_socket()
        raise
    client.loop_start()
    try:
        if not connected.wait(CONNECT_TIMEOUT) or closed:
            why = closed[0] if closed else "timeout"
            raise OSError(f"no answer to the agent-id check's connection ({why})")
        if refused:
            return False  # the agent's own connection reports the refusal (credentials)
        client.subscribe([(topics.availability, 1), (topics.instance, 1)])
        if not subscribed.wait(CONNECT_TIMEOUT) or closed:
            raise OSError("the broker did not answer the agent-id check's subscription")
        time.sleep(INSTANCE_SETTLE)
        with lock:
            availability = seen.get(topics.availability)
            claim = _parse_claim(seen.get(topics.instance, b""))
        if availability != ONLINE or claim is None or claim["nonce"] == PROCESS_NONCE:
            return True
        client.publish(topics.instance_ping, PROCESS_NONCE, qos=1)
        if not answered.wait(INSTANCE_REPLY_WAIT):
            log.info("agent id %r: the last agent with it did not answer; it is gone",
                     config.agent.id)
            return True
        with lock:
            other = answer[0]
        return AgentIdClashError(
            f"agent.id: another home-agent is already running with agent id {config.agent.id!r} "
            f"on this broker (host {other.get('host')}, pid {other.get('pid')}); give each agent its own "
            "[agent] id, or stop the other one. Not starting.")
    finally:
        client.disconnect()
        client.loop_stop()

