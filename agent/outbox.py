"""The outbox: must-deliver messages (anomaly events) survive broker outages, restarts and power cuts.

A message is written to a small SQLite database (WAL mode, ``synchronous = FULL``: the commit is on disk
when ``publish`` returns) BEFORE it is handed to the MQTT link, and deleted only when the broker
acknowledged it (PUBACK, via the link's ``on_delivered``). Whatever is still in the database when the
daemon starts is sent again, oldest first. Delivery is at-least-once: every message carries a unique
``"id"`` (``<agent id>-<database epoch>-<sequence>``) in its JSON object, so consumers can drop duplicates.

Order: at most ``window`` messages are handed to the link at a time, in sequence order; the next one goes
when one is acknowledged. The link may still drop a handed message when its own bounded queue overflows
(a long outage under a telemetry flood): the link tells us (``on_dropped``), and once connected again we
re-send from the oldest dropped message onwards, including the ones handed after it, so the last message
per (retained) topic is always the newest even though some arrive twice.

Bounded: beyond ``max_messages`` rows the OLDEST are deleted and counted (``outbox_dropped``). A corrupt
database is moved aside (``outbox.sqlite3.corrupt-<time>``, logged) and a fresh one started. If a write
fails at run time (disk full), the message still goes to the link without the durability guarantee, and
the failure is counted (``outbox_write_errors``).

Voice actions never come here: a stale command is worse than none, so they expire (TTL) instead.

Threads: ``publish`` runs on the caller's thread; delivery/drop notices arrive on the link's thread and are
only recorded there; one ``outbox`` worker thread deletes acknowledged rows in batches and hands out the
next messages.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from agent.counts import Counts
from agent.errors import StateError
from agent.logutil import LogThrottle, suppressed_note

log = logging.getLogger(__name__)

FILE_NAME = "outbox.sqlite3"
SCHEMA_VERSION = 1
DEFAULT_WINDOW = 16  # messages handed to the link at once; more wait in the database
DELETE_BATCH = 500
# Safety net: a message handed to a connected link and not acknowledged for this long is sent again
# (normally the link re-queues whatever a lost connection left unacknowledged, so this never fires).
UNACKED_RESEND_AFTER = 120.0
# The worker sleeps until there is work (a message stored, acknowledged, dropped or refused, a reconnect,
# stop) or the next unacknowledged message is due for that safety net; at the latest after this long, so
# ``healthy`` (which allows HEALTHY_BEAT_LIMIT between turns) sees it turn: no database query every second.
IDLE_WAIT = 20.0
RETRY_AFTER_ERROR = 1.0
HEALTHY_BEAT_LIMIT = 60.0
_SIDE_FILES = ("-wal", "-shm", "-journal")
# SQLite errors that mean "cannot use the file now" (another process, permissions, I/O), not corruption:
# those must never make us move a good database aside.
_NOT_CORRUPTION = ("locked", "busy", "readonly", "read-only", "unable to open", "disk i/o", "permission",
                   "out of memory", "disk is full", "database or disk is full")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class OutboxLink(Protocol):
    """What the outbox needs from ``agent.mqtt_link.MqttLink``."""

    @property
    def connected(self) -> bool: ...

    def add_connect_listener(self, listener: Callable[[], None]) -> None: ...

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 0, retain: bool = False,
                expires_mono: float | None = None, on_delivered: Callable[[], None] | None = None,
                on_dropped: Callable[[], None] | None = None,
                on_refused: Callable[[], None] | None = None) -> bool: ...


class _CorruptDatabaseError(Exception):
    """The database file is not a usable outbox (internal: triggers moving it aside)."""


def _is_corruption(err: sqlite3.DatabaseError) -> bool:
    text = str(err).lower()
    return not any(marker in text for marker in _NOT_CORRUPTION)


def encode_message(data: Mapping[str, Any] | bytes | str, message_id: str) -> bytes:
    """The JSON object ``data`` with ``"id"`` set: compact UTF-8, no NaN/inf (consumers' JSON parsers
    reject them). Raises ValueError for anything that is not a JSON object or already has an ``"id"``."""
    if isinstance(data, (bytes, str)):
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"outbox messages are JSON objects: {err}") from err
    else:
        document = dict(data)
    if not isinstance(document, dict):
        raise ValueError(f"outbox messages are JSON objects, not a JSON {type(document).__name__}")
    if "id" in document:
        raise ValueError('outbox messages get their "id" from the outbox; the payload already has one')
    document["id"] = message_id
    return json.dumps(document, separators=(",", ":"), allow_nan=False).encode("utf-8")


class Outbox:
    """A durable, bounded, ordered queue of must-deliver MQTT messages in front of the MQTT link.

    ``Outbox(path, ...)`` opens (or creates) the database; ``attach(link)`` then ``start()`` begin
    delivery (without a link it only stores, e.g. for tests and tools); ``close()`` after the link has
    stopped keeps whatever is undelivered for the next start.
    """

    name = "outbox"

    def __init__(self, path: Path, *, max_messages: int, agent_id: str, window: int = DEFAULT_WINDOW) -> None:
        if max_messages < 1 or window < 1:
            raise ValueError("max_messages and window must be positive")
        self.path = path
        self.max_messages = max_messages
        self.agent_id = agent_id
        self.window = window
        self._lock = threading.Lock()
        self._throttle = LogThrottle()
        self._counts = Counts("outbox_written", "outbox_delivered", "outbox_dropped", "outbox_resent",
                              "outbox_write_errors", "outbox_corrupt", "outbox_volatile", "outbox_refused",
                              "outbox_worker_errors")
        # Filled on the link's thread without our lock (appends are atomic); drained by the worker.
        self._acked: collections.deque[int] = collections.deque()
        self._lost: collections.deque[int] = collections.deque()
        self._refused: collections.deque[int] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._link: OutboxLink | None = None
        self._handed: dict[int, float] = {}  # seq -> monotonic time handed to the link
        self._cursor = 0  # highest seq handed out since the last (re)start of delivery
        self._connected_at = 0.0  # monotonic time of the link's latest (re)connect
        self._closed = False
        self._beat = time.monotonic()
        self._volatile_prefix = f"{agent_id}-{uuid.uuid4().hex[:8]}-v"  # this process's non-stored ids
        self._volatile_seq = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StateError(f"cannot create the outbox directory {path.parent}: {err.strerror}") from err
        self._conn = self._open()
        self._epoch = self._meta_epoch()
        self._next_seq = self._max_seq() + 1
        self._depth = int(self._conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        if self._depth:
            log.info("outbox %s holds %d undelivered message(s); they are sent first", path, self._depth)

    # ----------------------------------------------------------------- opening

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect_checked()
        except _CorruptDatabaseError as err:
            self._move_aside(str(err))
            try:
                return self._connect_checked()
            except _CorruptDatabaseError as again:
                raise StateError(f"cannot create a fresh outbox {self.path}: {again}") from again

    def _connect_checked(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as err:
            raise StateError(f"cannot open the outbox {self.path}: {err}") from err
        try:
            self._prepare(conn)
        except sqlite3.DatabaseError as err:
            conn.close()
            if _is_corruption(err):
                raise _CorruptDatabaseError(str(err)) from err
            raise StateError(f"cannot use the outbox {self.path}: {err}") from err
        except _CorruptDatabaseError:
            conn.close()
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            log.warning("outbox %s: SQLite refused WAL mode (%s); using it anyway", self.path, mode)
        conn.execute("PRAGMA synchronous=FULL")  # the commit is on disk before publish() returns
        check = conn.execute("PRAGMA quick_check").fetchall()
        if check != [("ok",)]:
            problems = "; ".join(str(row[0]) for row in check[:3])
            raise _CorruptDatabaseError(f"integrity check failed: {problems}")
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version == 0 and not tables & {"outbox", "meta"}:
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        elif version != SCHEMA_VERSION:
            raise _CorruptDatabaseError(f"unknown schema version {version} (expected {SCHEMA_VERSION})")
        # Every column we use must be there (a file from something else with the same name is "corrupt").
        conn.execute("SELECT seq, topic, payload, qos, retain, created FROM outbox LIMIT 1").fetchall()
        conn.execute("SELECT key, value FROM meta LIMIT 1").fetchall()

    def _move_aside(self, reason: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{os.getpid()}")
        try:
            os.replace(self.path, aside)
            for suffix in _SIDE_FILES:
                side = self.path.with_name(self.path.name + suffix)
                if side.exists():
                    os.replace(side, aside.with_name(aside.name + suffix))
        except OSError as err:
            raise StateError(f"outbox {self.path} is corrupt ({reason}) and cannot be moved aside: "
                             f"{err.strerror}") from err
        self._counts.add("outbox_corrupt")
        log.error("outbox %s is corrupt (%s); moved it to %s and starting an empty outbox (messages in it "
                  "are not sent)", self.path, reason, aside)

    def _meta_epoch(self) -> str:
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        if row is not None:
            return str(row[0])
        # A fresh database (or one moved aside) restarts the sequence: the epoch keeps ids unique.
        epoch = uuid.uuid4().hex[:8]
        self._conn.execute("INSERT INTO meta (key, value) VALUES ('epoch', ?)", (epoch,))
        return epoch

    def _max_seq(self) -> int:
        row = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        highest = self._conn.execute("SELECT MAX(seq) FROM outbox").fetchone()[0]
        return max(int(row[0]) if row else 0, int(highest or 0))

    # ----------------------------------------------------------------- public API

    @property
    def depth(self) -> int:
        """Messages not yet acknowledged by the broker."""
        with self._lock:
            return self._depth

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self._counts.snapshot(), "outbox_depth": self._depth}

    def attach(self, link: OutboxLink) -> None:
        """Deliver through ``link``; call before ``start``."""
        self._link = link
        link.add_connect_listener(self._on_connected)

    def publish(self, topic: str, payload: Mapping[str, Any] | bytes | str, *, qos: int = 1,
                retain: bool = False) -> str:
        """Store a JSON-object message durably, then send it (in order). Returns its id, which is also
        in the payload as ``"id"``. When this returns, the message survives a crash or power cut.

        Raises ValueError for a payload that is not a JSON object; never raises for storage trouble
        (logged and counted; the message is then sent without the durability guarantee)."""
        if qos not in (1, 2):
            raise ValueError("outbox messages need QoS 1 or 2 (delivery is confirmed by the broker)")
        with self._lock:
            seq = self._next_seq
            message_id = f"{self.agent_id}-{self._epoch}-{seq}"
            data = encode_message(payload, message_id)
            self._next_seq += 1
            try:
                self._insert_locked(seq, topic, data, qos, retain)
            except sqlite3.Error as err:
                self._counts.add("outbox_write_errors")
                log.error("outbox: cannot store the message to %s (%s); sending it without the "
                          "durability guarantee", topic, err)
                self._send_volatile(topic, data, qos, retain)
                return message_id
            self._counts.add("outbox_written")
            self._pump_locked()
        return message_id

    def publish_volatile(self, topic: str, payload: Mapping[str, Any] | bytes | str, *, qos: int = 1,
                         retain: bool = False) -> str:
        """Send a JSON-object message with a unique ``"id"`` like ``publish``, but without storing it: for
        refreshes of a value whose next refresh supersedes it (best effort, the link's queue bound and drop
        policy apply). Returns its id."""
        with self._lock:
            self._volatile_seq += 1
            message_id = f"{self._volatile_prefix}{self._volatile_seq}"
            self._counts.add("outbox_volatile")
        data = encode_message(payload, message_id)
        if self._link is not None:
            self._link.publish(topic, data, qos=qos, retain=retain)
        return message_id

    def start(self) -> None:
        """Start the worker: sends stored messages (oldest first) as the link connects."""
        if self._thread is not None:
            raise RuntimeError("outbox already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()
        self._wake.set()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the worker (acknowledgements arriving later are still recorded by ``close``)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def close(self) -> None:
        """Stop, delete what the broker acknowledged, close the database. Call after the link stopped."""
        self.stop()
        with self._lock:
            if self._closed:
                return
            try:
                self._delete_acked_locked()
            except sqlite3.Error as err:
                log.error("outbox: cannot record the last deliveries (%s); they will be sent again", err)
            self._closed = True
            self._conn.close()

    def healthy(self, now: float) -> bool:
        return self._thread is not None and self._thread.is_alive() and now - self._beat < HEALTHY_BEAT_LIMIT

    def pending(self) -> list[tuple[int, str, bytes]]:
        """(seq, topic, payload) of every undelivered message, oldest first (for tests and tools)."""
        with self._lock:
            rows = self._conn.execute("SELECT seq, topic, payload FROM outbox ORDER BY seq").fetchall()
        return [(int(seq), str(topic), bytes(payload)) for seq, topic, payload in rows]

    # ----------------------------------------------------------------- internals

    def _insert_locked(self, seq: int, topic: str, data: bytes, qos: int, retain: bool) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("INSERT INTO outbox (seq, topic, payload, qos, retain, created) "
                         "VALUES (?, ?, ?, ?, ?, ?)", (seq, topic, data, qos, int(retain), time.time()))
            excess = self._depth + 1 - self.max_messages
            dropped = 0
            if excess > 0:
                dropped = conn.execute(
                    "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)", (excess,)
                ).rowcount
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._depth += 1 - dropped
        if dropped:
            self._counts.add("outbox_dropped", dropped)
            suppressed = self._throttle.ready("dropped")
            if suppressed is not None:
                log.warning("outbox full (%d messages): dropped the %d oldest undelivered message(s)%s",
                            self.max_messages, dropped, suppressed_note(suppressed))

    def _send_volatile(self, topic: str, data: bytes, qos: int, retain: bool) -> None:
        if self._link is not None:
            self._link.publish(topic, data, qos=qos, retain=retain)

    def _on_connected(self) -> None:  # link thread: record only
        self._connected_at = time.monotonic()
        self._wake.set()

    def _on_delivered(self, seq: int) -> None:  # link thread: record only
        self._acked.append(seq)
        self._wake.set()

    def _on_dropped(self, seq: int) -> None:  # link thread, under the link's lock: record only
        self._lost.append(seq)
        self._wake.set()

    def _on_refused(self, seq: int) -> None:  # link thread: record only
        self._refused.append(seq)
        self._wake.set()

    def _pump_locked(self) -> None:
        """Hand the next stored messages to the link, in order, while the window has room."""
        link = self._link
        if link is None or self._closed:
            return
        room = self.window - len(self._handed)
        if room <= 0:
            return
        rows = self._conn.execute(
            "SELECT seq, topic, payload, qos, retain FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (self._cursor, room),
        ).fetchall()
        now = time.monotonic()
        for row_seq, topic, payload, qos, retain in rows:
            seq = int(row_seq)
            queued = link.publish(str(topic), bytes(payload), qos=int(qos), retain=bool(retain),
                                  on_delivered=functools.partial(self._on_delivered, seq),
                                  on_dropped=functools.partial(self._on_dropped, seq),
                                  on_refused=functools.partial(self._on_refused, seq))
            if not queued:
                return  # the link has stopped; the message stays stored for the next start
            self._handed[seq] = now
            self._cursor = seq

    def _delete_acked_locked(self) -> None:
        self._delete_rows_locked(self._acked, "outbox_delivered")

    def _delete_refused_locked(self) -> None:
        """The MQTT client refused these messages for good: sending them again would never succeed."""
        if not self._refused:
            return
        deleted = self._delete_rows_locked(self._refused, "outbox_refused")
        log.error("outbox: removed %d message(s) the MQTT client cannot send", deleted)

    def _delete_rows_locked(self, pending: collections.deque[int], counter: str) -> int:
        """Delete the rows ``pending`` names (drained, in transactions of DELETE_BATCH), count them under
        ``counter``; a failed transaction puts its rows back in ``pending`` and raises. Returns the rows
        deleted."""
        total = 0
        while pending:
            batch: list[int] = []
            while pending and len(batch) < DELETE_BATCH:
                batch.append(pending.popleft())
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                deleted = sum(conn.execute("DELETE FROM outbox WHERE seq = ?", (seq,)).rowcount
                              for seq in batch)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                pending.extendleft(reversed(batch))
                raise
            self._depth -= deleted
            self._counts.add(counter, deleted)
            for seq in batch:
                self._handed.pop(seq, None)
            total += deleted
        return total

    def _rewind_locked(self, lost: Iterable[int]) -> None:
        """The link dropped handed messages: send again from the oldest of them (see the module doc)."""
        oldest = min(lost)
        resend = [seq for seq in self._handed if seq >= oldest]
        for seq in resend:
            del self._handed[seq]
        self._counts.add("outbox_resent", len(resend))
        self._cursor = min(self._cursor, oldest - 1)
        suppressed = self._throttle.ready("resend")
        if suppressed is not None:
            log.warning("outbox: %d message(s) handed to the MQTT link were dropped by its full queue or "
                        "never acknowledged; sending them again in order%s", len(resend),
                        suppressed_note(suppressed))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._beat = time.monotonic()
            self._wake.wait(self._idle_wait(self._beat))
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._step()
            except sqlite3.Error as err:
                self._counts.add("outbox_write_errors")
                suppressed = self._throttle.ready("worker")
                if suppressed is not None:
                    log.error("outbox: database error (%s); retrying%s", err, suppressed_note(suppressed))
                self._retry_soon()
            except Exception:  # a bug must not end delivery silently: log, count, keep the worker alive
                self._counts.add("outbox_worker_errors")
                log.exception("outbox worker: unexpected error; retrying")
                self._retry_soon()

    def _idle_wait(self, now: float) -> float:
        """How long the worker may sleep when nothing wakes it: while connected, until the oldest handed
        message is due for the unacknowledged-resend safety net (``_step`` checks it only then; a reconnect
        wakes the worker), at most IDLE_WAIT."""
        link = self._link
        with self._lock:
            oldest = min(self._handed.values(), default=None)
        if oldest is None or link is None or not link.connected:
            return IDLE_WAIT
        due = max(oldest, self._connected_at) + UNACKED_RESEND_AFTER
        return min(IDLE_WAIT, max(0.0, due - now))

    def _retry_soon(self) -> None:
        """After a failed step: pause, then step again (the failure may have left work undone)."""
        self._stop.wait(RETRY_AFTER_ERROR)
        self._wake.set()

    def _step(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._delete_acked_locked()
            self._delete_refused_locked()
            link = self._link
            if link is not None and link.connected:
                # Re-sending while disconnected would only be dropped again by the overflowing queue.
                lost: list[int] = []
                while self._lost:
                    lost.append(self._lost.popleft())
                cutoff = time.monotonic() - UNACKED_RESEND_AFTER
                lost += [seq for seq, handed in self._handed.items()
                         if max(handed, self._connected_at) < cutoff]
                if lost:
                    self._rewind_locked(lost)
            self._pump_locked()
