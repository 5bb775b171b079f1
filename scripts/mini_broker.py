"""A tiny MQTT 3.1.1 broker for ``make demo`` on machines without mosquitto. Not for production.

Enough of the protocol for the agent and a watching client: CONNECT (with last will), PUBLISH at QoS 0/1
(QoS 2 from clients is acknowledged and delivered at QoS 1), SUBSCRIBE with ``+``/``#`` filters (granted at
most QoS 1), retained messages, UNSUBSCRIBE, PINGREQ, DISCONNECT. No authentication, no persistence, no
keep-alive enforcement, no in-flight retries.

    broker = MiniBroker(port=0); broker.start(); ...; broker.stop()    # port 0: pick a free one
    python scripts/mini_broker.py --port 1884                            # standalone
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import struct
import threading
from dataclasses import dataclass, field

log = logging.getLogger("mini_broker")

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14
MAX_PACKET = 1 << 20


class ProtocolError(Exception):
    """The client sent something this broker does not accept; its connection is closed."""


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (``+`` one level, ``#`` the rest; wildcards never match ``$`` topics)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels):
            return False
        if level not in ("+", topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)


def encode_length(length: int) -> bytes:
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def encode_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("!H", len(data)) + data


def packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([(kind << 4) | flags]) + encode_length(len(body)) + body


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, count: int) -> bytes:
        if self.pos + count > len(self.data):
            raise ProtocolError("packet too short")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def u16(self) -> int:
        value: int = struct.unpack("!H", self.take(2))[0]
        return value

    def string(self) -> str:
        try:
            return self.take(self.u16()).decode("utf-8")
        except UnicodeDecodeError as err:
            raise ProtocolError("invalid UTF-8") from err

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)


@dataclass(eq=False)
class Session:
    client_id: str
    writer: asyncio.StreamWriter
    subscriptions: dict[str, int] = field(default_factory=dict)
    will: tuple[str, bytes, int, bool] | None = None
    next_id: int = 0

    def packet_id(self) -> int:
        self.next_id = self.next_id % 65535 + 1
        return self.next_id


class MiniBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self.sessions: dict[str, Session] = {}
        self.retained: dict[str, tuple[bytes, int]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._anonymous = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Serve on a background thread; returns once listening (``self.port`` is then the real port)."""
        self._thread = threading.Thread(target=self._run, name="mini-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("mini broker did not start")

    def stop(self) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._server = loop.run_until_complete(asyncio.start_server(self._serve, self.host, self.port))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            for session in list(self.sessions.values()):
                session.writer.close()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    async def serve_forever(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("mini broker listening on %s:%d", self.host, self.port)
        async with self._server:
            await self._server.serve_forever()

    # ------------------------------------------------------------------ connections

    async def _read_packet(self, reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
        header = (await reader.readexactly(1))[0]
        length, multiplier = 0, 1
        for _ in range(4):
            byte = (await reader.readexactly(1))[0]
            length += (byte & 0x7F) * multiplier
            if not byte & 0x80:
                break
            multiplier *= 128
        else:
            raise ProtocolError("malformed remaining length")
        if length > MAX_PACKET:
            raise ProtocolError(f"packet of {length} bytes is too large")
        return header >> 4, header & 0x0F, await reader.readexactly(length)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session: Session | None = None
        clean = False
        try:
            kind, _flags, body = await self._read_packet(reader)
            if kind != CONNECT:
                raise ProtocolError("the first packet must be CONNECT")
            session = self._connect(Reader(body), writer)
            writer.write(packet(CONNACK, 0, b"\x00\x00"))
            await writer.drain()
            while True:
                kind, flags, body = await self._read_packet(reader)
                if kind == DISCONNECT:
                    clean = True
                    break
                self._handle(session, kind, flags, Reader(body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away; its will (if any) is published below
        except ProtocolError as err:
            log.warning("closing a connection: %s", err)
        finally:
            if session is not None and self.sessions.get(session.client_id) is session:
                del self.sessions[session.client_id]
                if not clean and session.will is not None:
                    self._publish(*session.will)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _connect(self, body: Reader, writer: asyncio.StreamWriter) -> Session:
        protocol = body.string()
        level = body.take(1)[0]
        if protocol not in ("MQTT", "MQIsdp") or level not in (3, 4):
            raise ProtocolError(f"unsupported protocol {protocol!r} level {level}")
        flags = body.take(1)[0]
        body.u16()  # keep-alive: not enforced
        client_id = body.string()
        if not client_id:
            self._anonymous += 1
            client_id = f"anonymous-{self._anonymous}"
        will = None
        if flags & 0x04:
            will_topic = body.string()
            will_payload = body.take(body.u16())
            will = (will_topic, will_payload, min((flags >> 3) & 0x03, 1), bool(flags & 0x20))
        old = self.sessions.get(client_id)
        if old is not None:
            old.writer.close()  # MQTT: a second connection with the same id takes over
        session = Session(client_id, writer, will=will)
        self.sessions[client_id] = session
        return session

    def _handle(self, session: Session, kind: int, flags: int, body: Reader) -> None:
        writer = session.writer
        if kind == PUBLISH:
            qos = (flags >> 1) & 0x03
            topic = body.string()
            if not topic or "+" in topic or "#" in topic:
                raise ProtocolError(f"invalid topic to publish to: {topic!r}")
            packet_id = body.u16() if qos else 0
            payload = body.rest()
            if qos == 1:
                writer.write(packet(PUBACK, 0, struct.pack("!H", packet_id)))
            elif qos == 2:
                writer.write(packet(PUBREC, 0, struct.pack("!H", packet_id)))
            self._publish(topic, payload, min(qos, 1), bool(flags & 0x01))
        elif kind == PUBREL:
            writer.write(packet(PUBCOMP, 0, struct.pack("!H", body.u16())))
        elif kind in (PUBACK, PUBREC, PUBCOMP):
            pass  # acknowledgements of our deliveries: nothing is retried, nothing to do
        elif kind == SUBSCRIBE:
            packet_id = body.u16()
            granted = []
            new_filters = []
            while body.pos < len(body.data):
                topic_filter = body.string()
                qos = min(body.take(1)[0] & 0x03, 1)
                session.subscriptions[topic_filter] = qos
                granted.append(qos)
                new_filters.append((topic_filter, qos))
            writer.write(packet(SUBACK, 0, struct.pack("!H", packet_id) + bytes(granted)))
            for topic, (payload, qos) in list(self.retained.items()):
                for topic_filter, sub_qos in new_filters:
                    if topic_matches(topic_filter, topic):
                        self._deliver(session, topic, payload, min(qos, sub_qos), retain=True)
                        break
        elif kind == UNSUBSCRIBE:
            packet_id = body.u16()
            while body.pos < len(body.data):
                session.subscriptions.pop(body.string(), None)
            writer.write(packet(UNSUBACK, 0, struct.pack("!H", packet_id)))
        elif kind == PINGREQ:
            writer.write(packet(PINGRESP, 0, b""))
        else:
            raise ProtocolError(f"unexpected packet type {kind}")

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if retain:
            if payload:
                self.retained[topic] = (payload, qos)
            else:
                self.retained.pop(topic, None)
        for session in list(self.sessions.values()):
            matched = [q for f, q in session.subscriptions.items() if topic_matches(f, topic)]
            if matched:
                self._deliver(session, topic, payload, min(qos, max(matched)), retain=False)

    def _deliver(self, session: Session, topic: str, payload: bytes, qos: int, *, retain: bool) -> None:
        body = encode_string(topic) + (struct.pack("!H", session.packet_id()) if qos else b"") + payload
        session.writer.write(packet(PUBLISH, (qos << 1) | int(retain), body))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(MiniBroker(args.host, args.port).serve_forever())


if __name__ == "__main__":
    main()
