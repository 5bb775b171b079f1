"""The MQTT link: the only module that imports paho.

Threads: one ``mqtt-link`` thread of ours connects (capped exponential backoff with jitter), resubscribes,
announces availability and feeds the outgoing queue to paho; paho's own network thread (one per
connection) reads the socket and runs the inbound handlers. A fresh paho client is used for every
connection, so paho never re-sends a message on its own: undelivered messages come back into our queue,
where their time-to-live is checked again before they are sent (a voice command is never sent late).

Outgoing queue: bounded by ``mqtt.max_queued_messages``; when full the OLDEST queued message is dropped
and counted in ``stats.dropped``. Messages wait there while the broker is unreachable. Delivery is
at-least-once for QoS 1 and 2 (a message in flight when the connection drops is sent again).
"""

from __future__ import annotations

import collections
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import Config
from agent.counts import Counts
from agent.errors import (
    ActionError,
    AgentIdClashError,
    HomeAgentError,
    MqttAuthError,
    PayloadError,
)
from agent.logutil import LogThrottle, suppressed_note
from agent.messages import InboundMessage
from agent.mqtt_instance import CONNECT_TIMEOUT, ONLINE, PROCESS_NONCE, check_instance, instance_claim
from agent.mqtt_tls import build_tls_context
from agent.ports import Handler
from agent.read_pacing import ReadPacer
from agent.topics import Topics, topic_filter_problem, topic_matches

log = logging.getLogger(__name__)

OFFLINE = b"offline"
# Messages handed to paho but not yet confirmed; beyond this they wait in our queue (where TTLs apply).
INFLIGHT_WINDOW = 20
ROUTES_MAX = 4096  # topics whose matching subscriptions the link remembers
# CONNACK reason codes after which retrying cannot help: bad user name or password, not authorized,
# bad authentication method (MQTT 3.1.1 return codes 4 and 5 arrive as 134 and 135).
AUTH_FAILURE_CODES = frozenset({134, 135, 140})

Listener = Callable[[], None]


class LinkStats(Counts):
    """The link's counters (and of bad payloads seen by any stage): agent.counts.Counts with their names."""

    NAMES = ("messages_in", "messages_out", "dropped", "expired", "bad_payloads", "handler_errors",
             "connects", "connect_failures")

    def __init__(self) -> None:
        super().__init__(*self.NAMES)

    def count_bad_payload(self) -> None:
        self.add("bad_payloads")

    def get(self, name: str) -> int:
        return self.snapshot()[name]

    @property
    def messages_out(self) -> int:
        return self.get("messages_out")

    @property
    def dropped(self) -> int:
        return self.get("dropped")


@dataclass(slots=True)
class _Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    expires_mono: float | None
    on_delivered: Callable[[], None] | None
    requeue: bool = True  # False for availability messages: every connection sends its own
    # Called (under the link's lock: record and return, never publish) when the full queue drops it.
    on_dropped: Callable[[], None] | None = None
    # Called (on the link's thread) when the client refuses it for good (e.g. a topic over 65535 bytes).
    on_refused: Callable[[], None] | None = None


@dataclass(frozen=True, slots=True, eq=False)
class Subscription:
    """Handle returned by ``MqttLink.subscribe``; pass it to ``resubscribe`` to replace or drop it."""

    topic_filter: str
    handler: Handler
    qos: int


@dataclass(eq=False)
class _Session:
    """One paho client and the state of its single connection."""

    client: paho.Client
    connack: bool = False  # CONNACK accepted (set on paho's thread)
    ready: bool = False  # online published, subscriptions sent, listeners called (link thread)
    ended: bool = False  # the connection is gone
    inflight: dict[int, _Outgoing] = field(default_factory=dict)
    delivered: list[int] = field(default_factory=list)  # mids confirmed by paho, processed by the link
    subscribed: dict[str, int] = field(default_factory=dict)
    # the subscriptions last found all subscribed (the link thread checks on every turn: compare only anew)
    synced_for: tuple[Subscription, ...] | None = None


def default_client_id(config: Config) -> str:
    """The daemon's client id: ``mqtt.client_id`` or home-agent-<agent id>."""
    return config.mqtt.client_id or f"home-agent-{config.agent.id}"


def own_client_id(config: Config, role: str) -> str:
    """A client id for a second process next to the daemon (``action``, ``run --audio``): the broker
    disconnects an older client when a newer one connects with its id, so sharing it makes both flap."""
    return f"{default_client_id(config)}-{role}-{os.getpid()}"


class MqttLink:
    """Owns the broker connection: availability, subscriptions, a bounded outgoing queue."""

    def __init__(
        self,
        config: Config,
        extra_allowed_topics: Iterable[str] = (),
        *,
        availability: bool = True,
        client_id: str | None = None,
    ) -> None:
        self._config = config
        self._mqtt = config.mqtt
        self._topics = Topics.from_config(config)
        self._availability = availability
        self._client_id = client_id or default_client_id(config)
        self._password = config.mqtt.password()  # raises ConfigError when password_file is unreadable
        self._tls_context = build_tls_context(config)
        if config.mqtt.tls is not None and config.mqtt.tls.insecure_skip_hostname_check:
            log.warning("mqtt.tls.insecure_skip_hostname_check is set: the broker's hostname is NOT verified")
        self._allowed = frozenset(extra_allowed_topics)
        self.stats = LinkStats()
        self._throttle = LogThrottle()

        self._cond = threading.Condition()
        self._queue: collections.deque[_Outgoing] = collections.deque()
        self._subscriptions: tuple[Subscription, ...] = ()
        # topic -> its subscriptions, for the subscriptions it was built from (matching every filter per
        # message was the largest cost of the reading path); bounded: cleared when it holds ROUTES_MAX topics
        self._routes: dict[str, tuple[Subscription, ...]] = {}
        self._routes_for: tuple[Subscription, ...] = ()
        self._connect_listeners: list[Listener] = []
        self._session: _Session | None = None
        self._connected = threading.Event()
        self._pacer = ReadPacer()  # batches paho's reads under a flood
        self._stop_event = threading.Event()
        self._stop_deadline = 0.0
        self._finished = threading.Event()
        self._fatal_error: HomeAgentError | None = None
        self._thread: threading.Thread | None = None
        # An agent (availability on) makes sure no other live agent has its id before it connects, and
        # answers agents that start later with the same id.
        self._instance_checked = not availability
        if availability:
            self.subscribe(self._topics.instance_ping, self._on_instance_ping, qos=1)

    # ----------------------------------------------------------------- public API

    @property
    def topics(self) -> Topics:
        return self._topics

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def fatal_error(self) -> HomeAgentError | None:
        """Set when the broker refused our credentials (MqttAuthError) or another live agent has our agent
        id (AgentIdClashError); the link has stopped retrying."""
        return self._fatal_error

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def wait_connected(self, timeout: float) -> bool:
        """Wait until connected (online published, subscriptions sent). False on timeout or fatal error."""
        deadline = time.monotonic() + timeout
        while not self._connected.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._fatal_error is not None or self._finished.is_set():
                return False
            self._connected.wait(min(remaining, 0.1))
        return True

    def set_extra_allowed_topics(self, topics: Iterable[str]) -> None:
        self._allowed = frozenset(topics)

    def is_allowed(self, topic: str) -> bool:
        return topic in self._allowed or self._topics.is_own(topic)

    def add_connect_listener(self, listener: Listener) -> None:
        """``listener()`` runs on the link thread after every (re)connect; it may publish, must be quick."""
        with self._cond:
            self._connect_listeners.append(listener)

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 0) -> Subscription:
        """Register a handler; it is (re)subscribed on every connect. Handlers run on paho's thread."""
        [subscription] = self.resubscribe((), [topic_filter], handler, qos)
        return subscription

    def resubscribe(self, previous: Iterable[Subscription], topic_filters: Iterable[str], handler: Handler,
                    qos: int = 0) -> list[Subscription]:
        """Replace ``previous`` by subscriptions of ``handler`` to ``topic_filters`` in one step (a reload's
        new set): a filter both sets hold is never unsubscribed at the broker, which would send its retained
        message again. ValueError for an invalid filter or QoS, and then nothing changes."""
        new = [Subscription(topic_filter, handler, qos) for topic_filter in topic_filters]
        for subscription in new:
            problem = topic_filter_problem(subscription.topic_filter)
            if problem is not None:
                raise ValueError(f"invalid MQTT topic filter {subscription.topic_filter!r}: {problem}")
        if qos not in (0, 1, 2):
            raise ValueError(f"invalid QoS {qos}")
        replaced = set(previous)  # by identity: a Subscription is its own handle
        with self._cond:
            self._subscriptions = (*(s for s in self._subscriptions if s not in replaced), *new)
            self._cond.notify_all()
        return new

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 0,
        retain: bool = False,
        expires_mono: float | None = None,
        on_delivered: Callable[[], None] | None = None,
        on_dropped: Callable[[], None] | None = None,
        on_refused: Callable[[], None] | None = None,
    ) -> bool:
        """Queue a message. Raises ActionError for a topic outside the allow-list.

        ``on_delivered()`` runs on the link thread once the broker acknowledged the message (QoS 1/2);
        ``on_dropped()`` runs, under the link's lock, if the bounded queue drops it (the outbox re-sends);
        ``on_refused()`` runs on the link thread if the MQTT client refuses it (it can never be sent).

        Returns False when the message was not queued (already expired, or the link has stopped).
        """
        if not self.is_allowed(topic) or "+" in topic or "#" in topic:
            raise ActionError(f"publishing to {topic!r} is not allowed (not a configured action topic)")
        if qos not in (0, 1, 2):
            raise ValueError(f"invalid QoS {qos}")
        data = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
        if expires_mono is not None and time.monotonic() >= expires_mono:
            self._count_expired(topic)
            return False
        message = _Outgoing(topic, data, qos, retain, expires_mono, on_delivered, on_dropped=on_dropped,
                            on_refused=on_refused)
        with self._cond:
            if self._finished.is_set():
                log.debug("link stopped; not publishing to %s", topic)
                return False
            self._queue.append(message)
            self._enforce_bound_locked()
            self._cond.notify_all()
        return True

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("MqttLink already started")
        self._thread = threading.Thread(target=self._main, name="mqtt-link", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 4.0) -> None:
        """Flush what can be sent, publish ``offline`` (retained) and disconnect, within ``timeout``."""
        with self._cond:
            self._stop_deadline = time.monotonic() + timeout
            self._stop_event.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout + 1.0)
            if self._thread.is_alive():
                log.warning("MQTT link did not stop within %.1f s", timeout)
        self._finished.set()

    # ----------------------------------------------------------------- internals

    def _enforce_bound_locked(self) -> None:
        while len(self._queue) > self._mqtt.max_queued_messages:
            dropped = self._queue.popleft()
            self.stats.add("dropped")
            if dropped.on_dropped is not None:
                dropped.on_dropped()
            suppressed = self._throttle.ready("dropped")
            if suppressed is not None:
                log.warning("outgoing MQTT queue full (%d messages): dropped the oldest, to %s%s",
                            self._mqtt.max_queued_messages, dropped.topic, suppressed_note(suppressed))

    def _count_expired(self, topic: str) -> None:
        self.stats.add("expired")
        suppressed = self._throttle.ready("expired")
        if suppressed is not None:
            log.warning("dropped an expired message to %s: its time-to-live passed before it could be sent%s",
                        topic, suppressed_note(suppressed))

    def _new_client(self) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            clean_session=True,
            protocol=paho.MQTTv311,
            reconnect_on_failure=False,
        )
        client.connect_timeout = CONNECT_TIMEOUT
        client.max_inflight_messages_set(INFLIGHT_WINDOW)
        client.max_queued_messages_set(0)  # bounded by our own queue and INFLIGHT_WINDOW
        if self._mqtt.username is not None:
            client.username_pw_set(self._mqtt.username, self._password)
        if self._tls_context is not None:
            client.tls_set_context(self._tls_context)
        if self._availability:
            client.will_set(self._topics.availability, OFFLINE, qos=1, retain=True)
        return client

    def _bind(self, session: _Session) -> None:
        client = session.client

        def on_connect(_c: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
            if reason.is_failure:
                if reason.value in AUTH_FAILURE_CODES:
                    self._fatal_error = MqttAuthError(
                        f"MQTT broker {self._mqtt.host}:{self._mqtt.port} refused the connection: {reason} "
                        f"(user {self._mqtt.username!r}); check mqtt.username and the password "
                        f"(mqtt.password_file or $HOME_AGENT_MQTT_PASSWORD). Not retrying."
                    )
                else:
                    log.warning("MQTT broker refused the connection: %s", reason)
                return
            with self._cond:
                session.connack = True
                self._cond.notify_all()

        def on_disconnect(_c: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
            with self._cond:
                was_connected = session.connack
                session.ended = True
                self._connected.clear()
                self._cond.notify_all()
            if was_connected and not self._stop_event.is_set():
                log.warning("lost the MQTT connection: %s", reason)

        def on_publish(_c: paho.Client, _u: Any, mid: int, _r: Any, _p: Any) -> None:
            with self._cond:
                session.delivered.append(mid)
                self._cond.notify_all()

        def on_subscribe(_c: paho.Client, _u: Any, _mid: int, reasons: list[ReasonCode], _p: Any) -> None:
            for reason in reasons:
                if reason.is_failure:
                    log.error("the broker refused a subscription: %s", reason)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish
        client.on_subscribe = on_subscribe
        client.on_message = self._on_message

    def _on_message(self, client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        received = time.monotonic()
        try:
            self._handle_message(message, received)
        finally:
            self._pacer.after_message(client.socket(), received)

    def _handle_message(self, message: paho.MQTTMessage, received: float) -> None:
        self.stats.add("messages_in")
        payload = message.payload
        try:
            topic = message.topic
        except UnicodeDecodeError:
            self._bad_payload("<undecodable topic>", "topic is not valid UTF-8")
            return
        if len(payload) > self._mqtt.max_payload_bytes:
            self._bad_payload(topic, f"payload of {len(payload)} bytes exceeds mqtt.max_payload_bytes "
                                     f"({self._mqtt.max_payload_bytes})")
            return
        inbound = InboundMessage(topic, bytes(payload), bool(message.retain), message.qos, received)
        for subscription in self._routes_of(topic):
            try:
                subscription.handler(inbound)
            except PayloadError as err:
                self._bad_payload(topic, str(err))
            except Exception:
                self.stats.add("handler_errors")
                suppressed = self._throttle.ready(f"handler:{subscription.topic_filter}")
                if suppressed is not None:
                    log.exception("handler for %s failed on a message to %s%s", subscription.topic_filter,
                                  topic, suppressed_note(suppressed))

    def _routes_of(self, topic: str) -> tuple[Subscription, ...]:
        """The subscriptions matching ``topic`` (paho's thread; a subscribe or resubscribe starts afresh)."""
        subscriptions = self._subscriptions
        if self._routes_for is not subscriptions or len(self._routes) >= ROUTES_MAX:
            self._routes, self._routes_for = {}, subscriptions
        routes = self._routes.get(topic)
        if routes is None:
            routes = self._routes[topic] = tuple(
                s for s in subscriptions if topic_matches(s.topic_filter, topic))
        return routes

    def _on_instance_ping(self, message: InboundMessage) -> None:
        """Another process with our agent id is starting: show it that we are alive (it will refuse)."""
        if message.payload.decode("utf-8", "replace") == PROCESS_NONCE:
            return
        log.warning("another home-agent process is starting with agent id %r (told it that this one runs)",
                    self._config.agent.id)
        self.publish(self._topics.instance, instance_claim(), qos=1, retain=True)

    def _check_instance(self) -> None:
        """Before the first connection: is another live agent using our agent id? (``check_instance``)"""
        outcome = check_instance(self._config, client_id=self._client_id, password=self._password,
                                 tls_context=self._tls_context)
        if isinstance(outcome, AgentIdClashError):
            self._fatal_error = outcome
        elif outcome:
            self._instance_checked = True

    def _bad_payload(self, topic: str, reason: str) -> None:
        self.stats.count_bad_payload()
        suppressed = self._throttle.ready("bad_payload")
        if suppressed is not None:
            log.warning("rejected a message on %s: %s%s", topic, reason, suppressed_note(suppressed))

    def _main(self) -> None:
        failures = 0
        try:
            while not self._stop_event.is_set():
                if not self._instance_checked:
                    try:
                        self._check_instance()
                    except (OSError, ValueError) as err:  # broker unreachable: as a failed connect
                        self.stats.add("connect_failures")
                        failures += 1
                        self._log_connect_failure(str(err), failures)
                        self._backoff(failures)
                        continue
                    if self._fatal_error is not None:
                        log.error("%s", self._fatal_error)
                        return
                session = _Session(self._new_client())
                self._bind(session)
                with self._cond:
                    self._session = session
                try:
                    session.client.connect(self._mqtt.host, self._mqtt.port, self._mqtt.keepalive)
                except (OSError, ValueError) as err:  # refused, unreachable, DNS, TLS handshake/verification
                    if self._tls_context is not None:
                        self._tls_context.close_failed_socket()
                    self.stats.add("connect_failures")
                    failures += 1
                    self._log_connect_failure(str(err), failures)
                    self._backoff(failures)
                    continue
                session.client.loop_start()
                try:
                    self._serve(session)
                except Exception:  # a bug must not kill the only thread that talks to the broker
                    self.stats.add("handler_errors")
                    log.exception("MQTT link failure; reconnecting")
                finally:
                    if not session.ended:
                        session.client.disconnect()
                    session.client.loop_stop()
                    self._end_session(session)
                if self._fatal_error is not None:
                    log.error("%s", self._fatal_error)
                    return
                if session.ready:
                    failures = 0
                else:
                    self.stats.add("connect_failures")
                failures += 1
                if not self._stop_event.is_set():
                    self._backoff(failures)
        finally:
            self._connected.clear()
            self._finished.set()

    def _log_connect_failure(self, reason: str, failures: int) -> None:
        level = logging.WARNING if failures in (1, 2) or failures % 20 == 0 else logging.DEBUG
        log.log(level, "cannot connect to MQTT broker %s:%d: %s (attempt %d, retrying)",
                self._mqtt.host, self._mqtt.port, reason, failures)

    def _backoff(self, failures: int) -> None:
        exponent = min(failures - 1, 30)
        base = min(self._mqtt.reconnect_max_delay, self._mqtt.reconnect_min_delay * 2**exponent)
        delay = random.uniform(base / 2, base)  # jitter: many agents must not reconnect in lockstep
        self._stop_event.wait(delay)

    def _end_session(self, session: _Session) -> None:
        """Return undelivered messages to the front of the queue (in order); their TTL is checked again."""
        with self._cond:
            # PUBACKs that arrived just before the connection ended: those messages were delivered.
            callbacks = self._process_delivered_locked(session)
            undelivered = [m for m in session.inflight.values() if m.requeue]
            session.inflight.clear()
            self._queue.extendleft(reversed(undelivered))
            self._enforce_bound_locked()
            self._connected.clear()
            self._session = None
        for callback in callbacks:
            self._run_callback(callback, "delivery callback")

    def _process_delivered_locked(self, session: _Session) -> list[Callable[[], None]]:
        callbacks: list[Callable[[], None]] = []
        for mid in session.delivered:
            message = session.inflight.pop(mid, None)
            if message is None:
                continue
            self.stats.add("messages_out")
            if message.on_delivered is not None:
                callbacks.append(message.on_delivered)
        session.delivered.clear()
        return callbacks

    def _send(self, session: _Session, message: _Outgoing) -> bool:
        """Hand one message to paho. False when the connection is going away (message kept for later)."""
        try:
            info = session.client.publish(
                message.topic, message.payload, qos=message.qos, retain=message.retain
            )
        except ValueError as err:  # paho's own checks (e.g. payload too large for MQTT): cannot ever be sent
            self.stats.add("dropped")
            log.error("dropped a message to %s that MQTT cannot carry: %s", message.topic[:200], err)
            if message.on_refused is not None:
                self._run_callback(message.on_refused, "refusal callback")
            return True
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            if message.requeue:
                with self._cond:
                    self._queue.appendleft(message)
                    self._enforce_bound_locked()
            return False
        if message.expires_mono is not None:
            self._pacer.wake()  # time-critical: paho's thread sends it now, not after its read pause
        with self._cond:
            session.inflight[info.mid] = message
        return True

    def _on_connected(self, session: _Session) -> None:
        log.info("connected to MQTT broker %s:%d as %s", self._mqtt.host, self._mqtt.port, self._client_id)
        self.stats.add("connects")
        # Subscribe first: the broker handles one connection's packets in order, so whoever sees "online"
        # and publishes to a subscribed topic right away is heard.
        self._sync_subscriptions(session)
        if self._availability:
            self._send(session, _Outgoing(self._topics.availability, ONLINE, 1, True, None, None, False))
            claim = _Outgoing(self._topics.instance, instance_claim(), 1, True, None, None, False)
            self._send(session, claim)
        session.ready = True
        self._connected.set()
        with self._cond:
            listeners = list(self._connect_listeners)
        for listener in listeners:
            self._run_callback(listener, "connect listener")

    def _run_callback(self, callback: Callable[[], None], what: str) -> None:
        try:
            callback()
        except Exception:
            self.stats.add("handler_errors")
            log.exception("%s failed", what)

    def _sync_subscriptions(self, session: _Session) -> None:
        desired: dict[str, int] = {}
        for subscription in self._subscriptions:
            current = desired.get(subscription.topic_filter, 0)
            desired[subscription.topic_filter] = max(subscription.qos, current)
        for topic_filter, qos in desired.items():
            if session.subscribed.get(topic_filter) != qos:
                result, _mid = session.client.subscribe(topic_filter, qos)
                if result == MQTTErrorCode.MQTT_ERR_SUCCESS:
                    session.subscribed[topic_filter] = qos
        for topic_filter in [f for f in session.subscribed if f not in desired]:
            result, _mid = session.client.unsubscribe(topic_filter)
            if result == MQTTErrorCode.MQTT_ERR_SUCCESS:
                del session.subscribed[topic_filter]

    def _serve(self, session: _Session) -> None:  # noqa: C901 - one loop over a connection's events
        """Run one connection on the link thread until it ends or the stop sequence completed."""
        connack_deadline = time.monotonic() + CONNECT_TIMEOUT + self._mqtt.keepalive
        offline_sent = False
        flush_until: float | None = None
        while True:
            message: _Outgoing | None = None
            with self._cond:
                if session.ended:
                    break  # _end_session handles the last acknowledgements and runs their callbacks
                callbacks = self._process_delivered_locked(session)
                stopping = self._stop_event.is_set()
                need_connect = session.connack and not session.ready
                subscriptions_dirty = session.ready and self._subscriptions_changed(session)
                window_open = len(session.inflight) < INFLIGHT_WINDOW
                if session.ready and window_open and self._queue and not offline_sent:
                    message = self._queue.popleft()
                idle = not (callbacks or need_connect or subscriptions_dirty or message)
                if idle and not stopping:
                    if session.connack:
                        # Every change this loop serves notifies the condition (paho's callbacks, publish,
                        # (un)subscribe, stop): sleep until one does rather than polling.
                        self._cond.wait()
                        continue
                    remaining = connack_deadline - time.monotonic()
                    if remaining < 0:
                        log.warning("no CONNACK from the broker in time; reconnecting")
                        break
                    self._cond.wait(remaining)
                    continue
            for callback in callbacks:
                self._run_callback(callback, "delivery callback")
            if need_connect:
                self._on_connected(session)
            if subscriptions_dirty:
                self._sync_subscriptions(session)
            if message is not None:
                if message.expires_mono is not None and time.monotonic() >= message.expires_mono:
                    self._count_expired(message.topic)
                elif not self._send(session, message):
                    with self._cond:  # the connection is going away; on_disconnect will end the session
                        if not session.ended:
                            self._cond.wait(0.05)
                    continue
            if stopping and not message:
                if not session.ready:
                    break  # never connected: nothing to announce
                now = time.monotonic()
                if flush_until is None:
                    # Spend at most 3/4 of the stop time flushing; the rest is for "offline".
                    flush_until = now + max(0.0, self._stop_deadline - now) * 0.75
                with self._cond:
                    flushed = not self._queue and not session.inflight
                if not offline_sent and (flushed or now >= flush_until):
                    if self._availability:
                        self._send(session, _Outgoing(self._topics.availability, OFFLINE, 1, True,
                                                      None, None, False))
                    offline_sent = True
                with self._cond:
                    done = offline_sent and not session.inflight
                    if done or now >= self._stop_deadline:
                        break
                    if not session.delivered and not session.ended:
                        self._cond.wait(0.05)
        if self._stop_event.is_set() and not session.ended:
            session.client.disconnect()

    def _subscriptions_changed(self, session: _Session) -> bool:
        subscriptions = self._subscriptions
        if session.synced_for is subscriptions:
            return False
        desired = {s.topic_filter for s in subscriptions}
        changed = desired != set(session.subscribed) or any(
            session.subscribed.get(s.topic_filter, -1) < s.qos for s in subscriptions
        )
        if not changed:
            session.synced_for = subscriptions
        return changed
