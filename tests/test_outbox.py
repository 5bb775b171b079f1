"""The outbox (agent/outbox.py) with the real MQTT link and a real mosquitto: written before publish,
deleted on PUBACK, replayed in order after an outage and after a restart (also of the real daemon),
bounded, unique ids, a corrupt database moved aside, and ``kill -9`` of a writer losing nothing it had
acknowledged."""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, Daemon, Mosquitto, MqttProbe, base_config, set_dotted, wait_until

from agent.config import Config, parse_config
from agent.mqtt_link import MqttLink
from agent.outbox import FILE_NAME, Outbox

TOPIC = "home-agent/testagent/anomaly/living_room_temperature"
OTHER = "home-agent/testagent/anomaly/other"


def make_config(broker: Mosquitto | None, tmp_path: Path, **dotted: Any) -> Config:
    data = base_config(broker, tmp_path / "state")
    for key, value in dotted.items():
        set_dotted(data, key, value)
    return parse_config(data, source="test.toml")


@pytest.fixture
def boxes(tmp_path: Path) -> Iterator[Callable[..., Outbox]]:
    """``boxes(link=None, **kwargs)``: an Outbox on tmp_path/state/outbox.sqlite3; closed at the end."""
    made: list[Outbox] = []

    def make(link: MqttLink | None = None, path: Path | None = None, **kwargs: Any) -> Outbox:
        kwargs.setdefault("max_messages", 1000)
        kwargs.setdefault("agent_id", "testagent")
        box = Outbox(path or tmp_path / "state" / FILE_NAME, **kwargs)
        made.append(box)
        if link is not None:
            box.attach(link)
            box.start()
        return box

    yield make
    for box in made:
        box.close()


@pytest.fixture
def links() -> Iterator[Callable[..., MqttLink]]:
    made: list[MqttLink] = []

    def make(config: Config, start: bool = True) -> MqttLink:
        link = MqttLink(config)
        made.append(link)
        if start:
            link.start()
        return link

    yield make
    for link in made:
        link.stop(1.0)


def ids_of(messages: list[Any]) -> list[str]:
    return [json.loads(m.payload)["id"] for m in messages]


# ------------------------------------------------------------------------------------ storage alone


def test_ids_are_unique_and_survive_a_reopen(boxes: Callable[..., Outbox], tmp_path: Path) -> None:
    box = boxes()
    first = [box.publish(TOPIC, {"n": n}) for n in range(5)]
    box.close()
    again = boxes()
    stored = again.pending()
    assert [json.loads(payload)["id"] for _seq, _topic, payload in stored] == first
    assert [json.loads(payload)["n"] for _seq, _topic, payload in stored] == list(range(5))
    later = again.publish(TOPIC, b'{"n": 5}')
    assert later not in first
    assert len(set(first)) == 5
    assert all(message_id.startswith("testagent-") for message_id in [*first, later])
    assert again.depth == 6


def test_a_fresh_database_gets_new_ids_even_when_the_sequence_restarts(boxes: Callable[..., Outbox],
                                                                       tmp_path: Path) -> None:
    path = tmp_path / "state" / FILE_NAME
    box = boxes()
    before = box.publish(TOPIC, {"n": 0})
    box.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    assert boxes().publish(TOPIC, {"n": 0}) != before  # same sequence number 1, new epoch


@pytest.mark.parametrize("payload", [b"[1, 2]", b"not json", b"\xff\xfe", b'{"score": NaN}', "42",
                                     {"score": float("nan")}, {"id": "mine"}])
def test_only_json_objects_without_an_id_are_accepted(boxes: Callable[..., Outbox], payload: Any) -> None:
    box = boxes()
    with pytest.raises(ValueError):
        box.publish(TOPIC, payload)
    assert box.depth == 0


def test_qos_0_is_refused(boxes: Callable[..., Outbox]) -> None:
    with pytest.raises(ValueError, match="QoS"):
        boxes().publish(TOPIC, {}, qos=0)


def test_bounded_the_oldest_are_dropped_and_counted(boxes: Callable[..., Outbox],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    box = boxes(max_messages=10)
    ids = [box.publish(TOPIC, {"n": n}) for n in range(25)]
    kept = [json.loads(payload)["id"] for _seq, _topic, payload in box.pending()]
    assert kept == ids[-10:]
    assert box.stats()["outbox_dropped"] == 15
    assert box.stats()["outbox_depth"] == 10
    assert "outbox full" in caplog.text


@pytest.mark.parametrize("content", [
    b"this is not a database at all" * 100,
    b"SQLite format 3\x00" + b"\xa5" * 4000,  # a valid header, then garbage
    b"",  # zero-length: SQLite treats it as empty; must simply work
])
def test_a_corrupt_database_is_moved_aside_not_fatal(
        boxes: Callable[..., Outbox], tmp_path: Path, content: bytes,
        caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state" / FILE_NAME
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="agent.outbox"):
        box = boxes()
    message_id = box.publish(TOPIC, {"n": 1})
    assert [json.loads(p)["id"] for _s, _t, p in box.pending()] == [message_id]
    aside = list(path.parent.glob(f"{FILE_NAME}.corrupt-*"))
    if content:
        assert len(aside) == 1 and aside[0].read_bytes() == content
        assert "is corrupt" in caplog.text and str(aside[0]) in caplog.text
        assert box.stats()["outbox_corrupt"] == 1
    else:
        assert aside == []


def test_a_database_of_something_else_is_moved_aside(boxes: Callable[..., Outbox], tmp_path: Path) -> None:
    path = tmp_path / "state" / FILE_NAME
    path.parent.mkdir(parents=True)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE outbox (x INTEGER)")
    conn.commit()
    conn.close()
    box = boxes()
    box.publish(TOPIC, {"n": 1})
    assert box.depth == 1
    assert len(list(path.parent.glob(f"{FILE_NAME}.corrupt-*"))) == 1


def test_a_damaged_page_is_detected(boxes: Callable[..., Outbox], tmp_path: Path) -> None:
    box = boxes()
    for n in range(300):
        box.publish(TOPIC, {"n": n, "pad": "x" * 200})
    box.close()
    path = tmp_path / "state" / FILE_NAME
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 4 * page
    data[2 * page + 8: 3 * page - 8] = b"\x13" * (page - 16)  # scribble over one b-tree page
    path.write_bytes(bytes(data))
    fresh = boxes()
    assert fresh.depth == 0
    assert len(list(path.parent.glob(f"{FILE_NAME}.corrupt-*"))) == 1


# ------------------------------------------------------------------------------------ with a broker


def test_delivered_messages_are_deleted_on_puback_in_order(
        mosquitto: Mosquitto, tmp_path: Path, mqtt_client: Callable[..., MqttProbe],
        boxes: Callable[..., Outbox], links: Callable[..., MqttLink]) -> None:
    probe = mqtt_client().subscribe("home-agent/testagent/anomaly/#")
    link = links(make_config(mosquitto, tmp_path))
    box = boxes(link)
    assert link.wait_connected(5)
    sent = [box.publish(TOPIC if n % 2 else OTHER, {"n": n}, retain=True) for n in range(100)]
    probe.wait_for("home-agent/testagent/anomaly/#", count=100, timeout=10)
    assert ids_of(probe.matching("#")) == sent
    assert wait_until(lambda: box.depth == 0, 5)
    stats = box.stats()
    assert stats["outbox_written"] == 100 and stats["outbox_delivered"] == 100
    assert all(m.qos == 1 for m in probe.matching("#"))


def test_stored_while_the_broker_is_down_then_sent_in_order_by_the_next_process(
        mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path, mqtt_client: Callable[..., MqttProbe],
        boxes: Callable[..., Outbox], links: Callable[..., MqttLink]) -> None:
    broker = mosquitto_factory(start=False)
    config = make_config(broker, tmp_path)
    first_link = links(config)
    box = boxes(first_link)
    sent = [box.publish(TOPIC, {"n": n}, retain=True) for n in range(30)]
    time.sleep(0.3)
    first_link.stop(0.5)
    box.close()
    broker.start()
    probe = mqtt_client(broker).subscribe("home-agent/testagent/anomaly/#")
    assert probe.matching("#") == []
    box = boxes(links(config))  # "after a restart": a new link and outbox on the same file
    probe.wait_for(TOPIC, count=30, timeout=10)
    assert ids_of(probe.matching("#")) == sent
    assert wait_until(lambda: box.depth == 0, 5)
    assert json.loads(probe.messages[-1].payload)["n"] == 29


def test_messages_the_full_link_queue_dropped_are_sent_again_in_order(
        mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path, mqtt_client: Callable[..., MqttProbe],
        boxes: Callable[..., Outbox], links: Callable[..., MqttLink]) -> None:
    broker = mosquitto_factory(start=False)
    link = links(make_config(broker, tmp_path, **{"mqtt.max_queued_messages": 10}))
    box = boxes(link, window=4)
    sent = [box.publish(TOPIC, {"n": n}, retain=True) for n in range(8)]
    for n in range(40):  # a telemetry flood while the broker is away pushes ours out of the link's queue
        link.publish("home-agent/testagent/sensor/x/state", str(n).encode())
    assert link.stats.dropped >= 30
    assert box.depth == 8
    broker.start()
    probe = mqtt_client(broker).subscribe(TOPIC)
    assert wait_until(lambda: box.depth == 0, 10), box.stats()
    received = ids_of(probe.matching(TOPIC))
    assert set(received) == set(sent)
    assert box.stats()["outbox_resent"] >= 4
    # Order: after de-duplication by id, first arrivals are in publish order...
    first_seen = list(dict.fromkeys(received))
    assert first_seen == sent
    # ...and the broker keeps the newest as the retained value.
    retained = mqtt_client(broker).subscribe(TOPIC).wait_for(TOPIC, retained=True)
    assert json.loads(retained.payload)["id"] == sent[-1]


def test_the_daemon_sends_what_a_previous_run_left_in_the_outbox(  # noqa: PLR0917 - fixtures
        mosquitto: Mosquitto, write_config: Callable[..., Path], daemon_factory: Callable[..., Daemon],
        mqtt_client: Callable[..., MqttProbe], boxes: Callable[..., Outbox], tmp_path: Path) -> None:
    config = write_config(mosquitto)
    left = boxes()  # what a previous run stored and never got acknowledged (e.g. power cut mid-outage)
    sent = [left.publish(TOPIC, {"score": 0.999, "active": n % 2 == 0, "n": n}, retain=True)
            for n in range(12)]
    left.close()
    probe = mqtt_client().subscribe(TOPIC)
    daemon = daemon_factory(config)
    try:
        probe.wait_for(TOPIC, count=12, timeout=10)
    except AssertionError:
        raise AssertionError(daemon.log_text()) from None
    assert ids_of(probe.matching(TOPIC)) == sent
    daemon.terminate()
    assert daemon.wait(10) == 0
    after = boxes()
    assert after.depth == 0, daemon.log_text()


def test_the_daemon_starts_with_a_corrupt_outbox_moved_aside(
        mosquitto: Mosquitto, write_config: Callable[..., Path], daemon_factory: Callable[..., Daemon],
        mqtt_client: Callable[..., MqttProbe], tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / FILE_NAME).write_bytes(b"\x00garbage after a power cut\xff" * 200)
    probe = mqtt_client().subscribe("home-agent/testagent/availability")
    daemon = daemon_factory(write_config(mosquitto))
    probe.wait_for("home-agent/testagent/availability", b"online", timeout=10)
    assert daemon.terminate() == 0
    log_text = daemon.log_text()
    aside = list(state.glob(f"{FILE_NAME}.corrupt-*"))
    assert len(aside) == 1, log_text
    assert f"outbox {state / FILE_NAME} is corrupt" in log_text and str(aside[0]) in log_text
    assert "Traceback" not in log_text


# ------------------------------------------------------------------------------------ process faults

WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from agent.outbox import Outbox

    box = Outbox(Path(sys.argv[1]), max_messages=1_000_000, agent_id="writer")
    n = 0
    while True:
        message_id = box.publish("home-agent/writer/anomaly/s%d" % (n % 7), {"n": n, "pad": "x" * (n % 300)},
                                 retain=True)
        sys.stdout.write(message_id + "\\n")  # "acknowledged to the caller"
        sys.stdout.flush()
        n += 1
""")


def test_kill_9_during_writes_loses_nothing_acknowledged(tmp_path: Path,
                                                          boxes: Callable[..., Outbox]) -> None:
    path = tmp_path / "state" / FILE_NAME
    acknowledged: list[str] = []
    for _round in range(3):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=REPO_ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert writer.stdout is not None
        read: list[str] = []
        deadline = time.monotonic() + 20
        while len(read) < 150 and time.monotonic() < deadline:
            line = writer.stdout.readline().decode().strip()
            if line:
                read.append(line)
        writer.send_signal(signal.SIGKILL)  # in the middle of a write, most likely
        out, err = writer.communicate(timeout=10)
        assert writer.returncode == -signal.SIGKILL, err.decode()
        assert len(read) == 150, err.decode()
        acknowledged += read + [line for line in out.decode().split("\n") if line]
    box = boxes(path=path, max_messages=1_000_000)
    stored = {json.loads(payload)["id"] for _seq, _topic, payload in box.pending()}
    assert not list(path.parent.glob("*.corrupt-*"))
    assert box.depth >= 450
    assert set(acknowledged) <= stored
    # Sequence numbers continue across the kills: no id was handed out twice.
    seqs = [seq for seq, _topic, _payload in box.pending()]
    assert seqs == sorted(set(seqs))


# ------------------------------------------------------------------------------------ the app's use


def test_alert_changes_are_stored_score_refreshes_are_not(
        mosquitto: Mosquitto, tmp_path: Path, mqtt_client: Callable[..., MqttProbe]) -> None:
    """AnomalyPublisher.publish_anomaly: a stream's first event and every start/end of an alert go through
    the outbox; score refreshes in between do not (the next one supersedes them). All carry unique ids."""
    from agent.messages import AnomalyEvent
    from agent.wiring import build

    probe = mqtt_client().subscribe(TOPIC)
    daemon = build(make_config(mosquitto, tmp_path))
    app = daemon.app
    thread = threading.Thread(target=app.run, daemon=True)
    thread.start()
    try:
        assert app.link.wait_connected(5)
        states = [False, False, False, True, True, False, False]
        publish = daemon.anomaly_events.publish_anomaly
        ids = [publish(AnomalyEvent("living_room_temperature", 0.1 * n, 20.0, "spike", active, time.time()))
               for n, active in enumerate(states)]
        probe.wait_for(TOPIC, count=len(states))
        assert ids_of(probe.matching(TOPIC)) == ids
        assert len(set(ids)) == len(ids)
        stats = app.outbox.stats()
        assert stats["outbox_written"] == 3  # the first event, the start, the end
        assert stats["outbox_volatile"] == 4
        assert [json.loads(m.payload)["active"] for m in probe.matching(TOPIC)] == states
    finally:
        app.request_stop()
        thread.join(10)


# ------------------------------------------------------------------------------------ defects (issue 17)


def test_a_message_the_client_refuses_is_not_sent_again_forever(
        mosquitto: Mosquitto, tmp_path: Path, mqtt_client: Callable[..., MqttProbe],
        boxes: Callable[..., Outbox], links: Callable[..., MqttLink]) -> None:
    """paho refuses a topic over 65535 bytes: the row is removed and counted, not re-sent every 120 s;
    the messages around it are delivered."""
    probe = mqtt_client().subscribe(TOPIC)
    link = links(make_config(mosquitto, tmp_path))
    box = boxes(link)
    assert link.wait_connected(5)
    first = box.publish(TOPIC, {"n": 0})
    box.publish(f"{TOPIC}/{'x' * 70_000}", {"n": 1})
    last = box.publish(TOPIC, {"n": 2})
    probe.wait_for(TOPIC, count=2, timeout=5)
    assert ids_of(probe.matching(TOPIC)) == [first, last]
    assert wait_until(lambda: box.depth == 0, 5), box.pending()[:1]
    assert box.stats()["outbox_refused"] == 1
    assert link.stats.dropped == 1


def test_an_idle_worker_sleeps_until_there_is_work(  # noqa: PLR0917 - fixtures
        mosquitto: Mosquitto, tmp_path: Path, boxes: Callable[..., Outbox], links: Callable[..., MqttLink],
        mqtt_client: Callable[[], MqttProbe], monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing stored, nothing handed out: the worker does not turn (no database query) until a message
    comes, which it then delivers at once; it stays healthy while asleep."""
    probe = mqtt_client().subscribe(TOPIC)
    link = links(make_config(mosquitto, tmp_path))
    box = boxes(link)
    assert link.wait_connected(5)
    time.sleep(1.0)  # the turns of the start and of the connection are over
    steps: list[float] = []
    step = box._step

    def counted_step() -> None:
        steps.append(time.monotonic())
        step()

    monkeypatch.setattr(box, "_step", counted_step)
    time.sleep(2.5)  # the worker used to step (and query the database) every second
    assert steps == []
    assert box.healthy(time.monotonic())
    message_id = box.publish(TOPIC, {"n": 1})
    probe.wait_for(TOPIC, timeout=5)
    assert ids_of(probe.matching(TOPIC)) == [message_id]
    assert wait_until(lambda: box.depth == 0, 5)  # the acknowledgement woke the worker to delete it
    assert steps


def test_the_worker_survives_an_unexpected_error_and_counts_it(
        tmp_path: Path, boxes: Callable[..., Outbox], links: Callable[..., MqttLink],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    link = links(make_config(None, tmp_path), start=False)
    box = boxes(link)
    failures = iter([RuntimeError("boom")])

    def step_that_fails_once() -> None:
        error = next(failures, None)
        if error is not None:
            raise error

    monkeypatch.setattr(box, "_step", step_that_fails_once)
    box._wake.set()
    assert wait_until(lambda: box.stats()["outbox_worker_errors"] == 1, 5)
    box._wake.set()
    time.sleep(0.2)
    assert box.healthy(time.monotonic())
    assert "outbox worker" in caplog.text


def test_the_supervisor_reports_a_dead_outbox_worker(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """The watchdog withholds WATCHDOG=1 when the outbox worker is gone."""
    from agent.wiring import build

    app = build(make_config(mosquitto, tmp_path)).app
    thread = threading.Thread(target=app.run, daemon=True)
    thread.start()
    try:
        assert app.link.wait_connected(5)
        assert app.healthy(time.monotonic())[0]
        app.outbox.stop()
        assert wait_until(lambda: not app.healthy(time.monotonic())[0], 5), app.healthy(time.monotonic())
        assert "outbox" in app.healthy(time.monotonic())[1]
    finally:
        app.request_stop()
        thread.join(10)
