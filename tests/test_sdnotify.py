"""sd_notify over a datagram socket the test binds, the watchdog cadence, and the health registry."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import sdnotify
from agent.health import HealthRegistry
from agent.sdnotify import ServiceNotifier, notify, watchdog_interval


class NotifySocket:
    """A bound AF_UNIX datagram socket standing in for systemd's notification socket."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address  # as it goes into $NOTIFY_SOCKET

        self.received: list[str] = []

    def drain(self, timeout: float = 0.0) -> None:
        """Read what is queued (the kernel queues only ~10 datagrams before the sender blocks)."""
        self.sock.settimeout(timeout if timeout > 0 else 0.001)
        while True:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, BlockingIOError):
                return
            self.received.append(data.decode())
            self.sock.settimeout(0.001)

    def messages(self, timeout: float = 0.0) -> list[str]:
        """Every datagram received so far (waiting up to ``timeout`` for the first one)."""
        self.drain(timeout if not self.received else 0.0)
        return list(self.received)

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address, **extra}


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        yield NotifySocket(sock, str(path))


@pytest.fixture
def abstract_socket() -> Iterator[NotifySocket]:
    name = f"home-agent-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield NotifySocket(sock, "@" + name)


def test_notify_sends_one_datagram(notify_socket: NotifySocket) -> None:
    assert notify("READY=1\nSTATUS=listening", notify_socket.env()) is True
    assert notify_socket.messages(timeout=1) == ["READY=1\nSTATUS=listening"]


def test_notify_abstract_namespace(abstract_socket: NotifySocket) -> None:
    assert notify("WATCHDOG=1", abstract_socket.env()) is True
    assert abstract_socket.messages(timeout=1) == ["WATCHDOG=1"]


def test_notify_is_a_noop_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    assert sdnotify.ready("x") is False
    assert sdnotify.watchdog() is False
    assert notify("READY=1", {}) is False


def test_notify_failure_is_reported_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")}) is False
    assert "sd_notify" in caplog.text
    assert notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"}) is False


def test_module_helpers_use_the_environment(notify_socket: NotifySocket,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.address)
    assert sdnotify.ready("connected to 127.0.0.1:1883; listening")
    assert sdnotify.status("broker unreachable,\nretrying")
    assert sdnotify.watchdog()
    assert sdnotify.stopping()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    messages = notify_socket.messages(timeout=1)
    assert messages[:4] == [
        "READY=1\nSTATUS=connected to 127.0.0.1:1883; listening",
        "STATUS=broker unreachable, retrying",  # a newline would start a new assignment
        "WATCHDOG=1",
        "STOPPING=1",
    ]
    reload_lines = messages[4].split("\n")
    assert reload_lines[0] == "RELOADING=1"
    key, _, usec = reload_lines[1].partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= after


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000"}, 0.5),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected


def test_notifier_sends_ready_once_and_status_on_change(notify_socket: NotifySocket) -> None:
    notifier = ServiceNotifier(environ=notify_socket.env())
    assert notifier.ready("connected to 127.0.0.1:1883; 3 streams; listening")
    assert not notifier.status("connected to 127.0.0.1:1883; 3 streams; listening")  # unchanged
    assert notifier.status("broker unreachable, retrying")
    assert notifier.ready("connected again")  # only a STATUS= now
    assert notify_socket.messages(timeout=1) == [
        "READY=1\nSTATUS=connected to 127.0.0.1:1883; 3 streams; listening",
        "STATUS=broker unreachable, retrying",
        "STATUS=connected again",
    ]


def test_notifier_outside_systemd_sends_nothing() -> None:
    notifier = ServiceNotifier(environ={})
    assert not notifier.enabled
    assert notifier.ping_interval is None
    assert not notifier.ready("x")
    assert not notifier.tick(100.0)


def test_watchdog_cadence_is_half_the_timeout(notify_socket: NotifySocket) -> None:
    health = HealthRegistry()
    notifier = ServiceNotifier(health.describe, environ=notify_socket.env(WATCHDOG_USEC="2000000"))
    assert notifier.watchdog_timeout == 2.0 and notifier.ping_interval == 1.0
    # The main loop turns every 0.1 s for 10 s of fake time.
    sent_at = []
    for step in range(200):
        if notifier.tick(step / 10):
            sent_at.append(step / 10)
        notify_socket.drain()
    assert sent_at == [float(s) for s in range(20)]
    assert notify_socket.messages() == ["WATCHDOG=1"] * 20


def test_no_watchdog_while_a_stage_is_wedged(notify_socket: NotifySocket) -> None:
    health = HealthRegistry()
    health.register("audio", max_silence=2.0, now=0.0)
    health.register("mqtt", max_silence=5.0, now=0.0)
    notifier = ServiceNotifier(health.describe, environ=notify_socket.env(WATCHDOG_USEC="2000000"))
    notifier.ready("listening")
    pings = []
    for step in range(0, 200):  # 20 s, main loop every 0.1 s
        now = step / 10
        health.beat("mqtt", now=now)
        if now < 5.0 or now >= 12.0:
            health.beat("audio", now=now)  # audio frames stop between 5 s and 12 s
        if notifier.tick(now):
            pings.append(now)
        notify_socket.drain()
    # Pinged until the audio stage went silent for > 2 s (at 7 s), then nothing until audio came back.
    assert pings[:6] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert 6.0 in pings
    assert not [t for t in pings if 7.1 <= t < 12.0]
    assert pings[-1] >= 19.0 and 12.0 in pings
    messages = notify_socket.messages(timeout=1)
    wedged = [m for m in messages if m.startswith("STATUS=unhealthy")]
    assert len(wedged) == 1 and "audio: silent for" in wedged[0] and "mqtt" not in wedged[0]
    assert messages[-1] == "WATCHDOG=1"
    assert "STATUS=listening" in messages[messages.index(wedged[0]):]  # the old status is back
    assert notifier.watchdog_withheld > 0


def test_registry_names_silent_stages() -> None:
    health = HealthRegistry()
    health.register("audio", max_silence=2.0, now=0.0)
    health.register("mqtt", max_silence=10.0, now=0.0)
    health.register("actions")  # no limit: never wedged by silence
    assert health.healthy(1.9) == (True, [])
    assert health.healthy(2.5) == (False, ["audio"])
    ok, reasons = health.describe(2.5)
    assert not ok and reasons == ["audio: no heartbeat yet for 2.5 s (limit 2 s)"]
    health.beat("audio", now=2.6)
    assert health.healthy(4.0) == (True, [])
    assert health.healthy(11.0) == (False, ["audio", "mqtt"])


def test_registry_suspend_and_resume() -> None:
    health = HealthRegistry()
    health.register("audio", max_silence=2.0, now=0.0)
    health.suspend("audio")  # microphone closed on purpose (muted)
    assert health.healthy(100.0) == (True, [])
    health.resume("audio", now=100.0)
    assert health.healthy(101.0) == (True, [])
    assert health.healthy(102.5) == (False, ["audio"])


def test_registry_flags_a_queue_stuck_at_capacity() -> None:
    health = HealthRegistry()
    health.register("kws", max_silence=None, max_full=3.0, now=0.0)
    health.beat("kws", now=1.0, queue_depth=8, queue_capacity=8)  # full, but may drain soon
    assert health.healthy(3.9) == (True, [])
    health.report_queue("kws", 8, now=4.0)
    ok, reasons = health.describe(4.5)
    assert not ok and reasons == ["kws: queue full (8/8) for 3.5 s (limit 3 s)"]
    health.report_queue("kws", 7, now=5.0)  # draining again
    assert health.healthy(100.0) == (True, [])


def test_registry_is_thread_safe() -> None:
    import threading

    health = HealthRegistry()
    names = [f"stage{i}" for i in range(8)]
    for name in names:
        health.register(name, max_silence=60.0)

    def hammer(name: str) -> None:
        for i in range(2000):
            health.beat(name, queue_depth=i % 5, queue_capacity=5)

    threads = [threading.Thread(target=hammer, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for _ in range(200):
        health.healthy()
    for thread in threads:
        thread.join()
    assert health.healthy() == (True, [])
    assert health.stage_names() == names


def test_registry_rejects_nonsense_limits() -> None:
    health = HealthRegistry()
    with pytest.raises(ValueError, match="max_silence"):
        health.register("x", max_silence=0)
    with pytest.raises(ValueError, match="max_full"):
        health.register("x", max_full=-1)


def test_journal_log_lines_carry_priorities(tmp_path: Path) -> None:
    """Under systemd (stderr is the journal, $JOURNAL_STREAM names it) log lines get "<N>" priorities and no
    time stamp of their own; anywhere else the usual format."""
    import subprocess
    import sys

    code = ("import logging; from agent.cli import configure_logging; configure_logging('INFO'); "
            "log = logging.getLogger('agent.x'); log.warning('broker %s unreachable', 'b'); log.error('bad')")
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("wb") as stderr:
        info = os.fstat(stderr.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        subprocess.run([sys.executable, "-c", code], stderr=stderr, env=env, check=True, timeout=60)
    assert stderr_path.read_text().splitlines() == ["<4>agent.x: broker b unreachable", "<3>agent.x: bad"]
    with stderr_path.open("wb") as stderr:
        env = {**os.environ, "JOURNAL_STREAM": "1:2"}  # someone else's journal stream: not ours
        subprocess.run([sys.executable, "-c", code], stderr=stderr, env=env, check=True, timeout=60)
    lines = stderr_path.read_text().splitlines()
    assert lines[0].endswith(" WARNING agent.x: broker b unreachable") and not lines[0].startswith("<")
