"""The real daemon under a stand-in for systemd: a datagram socket the test binds as $NOTIFY_SOCKET, a
$WATCHDOG_USEC, and a real mosquitto. READY=1 only after the broker answered (or service.ready_grace),
readable STATUS=, WATCHDOG=1 at half the interval and none while a stage is wedged, STOPPING=1 then
``offline`` and exit 0 within 5 s on SIGTERM, RELOADING=1 / READY=1 around SIGHUP."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, Daemon, Mosquitto, MqttProbe, base_config, wait_until

BASE = "home-agent/testagent"
AVAILABILITY = f"{BASE}/availability"
MUTE_SET = f"{BASE}/mute/set"
MUTE_STATE = f"{BASE}/mute/state"
WATCHDOG_USEC = 2_000_000  # the daemon pings every second
SO_TIMESTAMPNS = 35  # Linux; the kernel stamps each datagram when the sender queues it


@dataclass(frozen=True)
class Notification:
    at: float  # time.monotonic() when the daemon sent it (kernel time stamp)
    text: str

    @property
    def fields(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.text.split("\n") if "=" in line)


class NotifyListener:
    """systemd's side of sd_notify: a bound AF_UNIX datagram socket, read on a thread, time-stamped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self._sock.bind(str(path))
        self._sock.settimeout(0.05)
        self._lock = threading.Lock()
        self._received: list[Notification] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-listener", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data, ancillary, _flags, _address = self._sock.recvmsg(65536, 64)
            except TimeoutError:
                continue
            # When it was sent, not when this thread got to it: ordering against MQTT messages is exact.
            # CLOCK_REALTIME from the kernel, moved onto the monotonic clock the MQTT probe uses.
            at = time.monotonic()
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    seconds, nanoseconds = struct.unpack("qq", payload[:16])
                    at = seconds + nanoseconds / 1e9 - (time.time() - time.monotonic())
            with self._lock:
                self._received.append(Notification(at, data.decode()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()

    @property
    def received(self) -> list[Notification]:
        with self._lock:
            return list(self._received)

    def with_field(self, key: str, value: str | None = None, since: float = 0.0) -> list[Notification]:
        return [n for n in self.received if n.at >= since and key in n.fields
                and (value is None or n.fields[key] == value)]

    def wait_for(self, key: str, value: str | None = None, timeout: float = 10.0, since: float = 0.0,
                 daemon: Daemon | None = None) -> Notification:
        found: list[Notification] = wait_until(lambda: self.with_field(key, value, since), timeout)
        if not found:
            log = daemon.log_text() if daemon is not None else ""
            raise AssertionError(f"no {key}={value or '*'} within {timeout} s; got "
                                 f"{[n.text for n in self.received][-8:]}\n{log}")
        return found[0]

    def statuses(self, since: float = 0.0) -> list[str]:
        return [n.fields["STATUS"] for n in self.with_field("STATUS", since=since)]

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}


@pytest.fixture
def notify_listener(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


def start(daemon_factory: Callable[..., Daemon], config: Path, listener: NotifyListener,
          **kwargs: Any) -> Daemon:
    return daemon_factory(config, env=listener.env(), **kwargs)


def test_ready_status_watchdog_then_stopping_offline_exit_0(
        mosquitto: Mosquitto, write_config: Callable[..., Path], daemon_factory: Callable[..., Daemon],
        mqtt_client: Callable[..., MqttProbe], notify_listener: NotifyListener) -> None:
    probe = mqtt_client().subscribe(AVAILABILITY)
    daemon = start(daemon_factory, write_config(mosquitto), notify_listener)

    ready = notify_listener.wait_for("READY", "1", daemon=daemon)
    # READY=1 only once the broker answered: its STATUS= was computed from the live connection (and the
    # broker-down test below shows READY=1 waiting for the grace period).
    assert ready.fields["STATUS"] == f"connected to 127.0.0.1:{mosquitto.port}; 1 stream"
    probe.wait_for(AVAILABILITY, b"online", timeout=5)
    assert len(notify_listener.with_field("READY")) == 1

    # WATCHDOG=1 at half of WATCHDOG_USEC (every 1 s): never a gap anywhere near the 2 s timeout.
    time.sleep(4.5)
    pings = [n.at for n in notify_listener.with_field("WATCHDOG", "1", since=ready.at)]
    assert 3 <= len(pings) <= 6, pings
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < 1.6, gaps

    t0 = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(5) == 0
    assert time.monotonic() - t0 < 5.0
    stopping = notify_listener.wait_for("STOPPING", "1", timeout=1)
    offline = probe.wait_for(AVAILABILITY, b"offline", timeout=1)
    assert stopping.at <= offline.at  # sent (kernel time) before the probe even received offline
    assert not notify_listener.with_field("WATCHDOG", since=stopping.at + 0.05)


def test_ready_after_the_grace_period_when_the_broker_is_down(
        mosquitto_factory: Callable[..., Mosquitto], write_config: Callable[..., Path],
        daemon_factory: Callable[..., Daemon], notify_listener: NotifyListener) -> None:
    broker = mosquitto_factory(start=False)
    config = write_config(broker, **{"service.ready_grace": 2.0})
    daemon = start(daemon_factory, config, notify_listener)
    ready = notify_listener.wait_for("READY", "1", timeout=10, daemon=daemon)
    assert ready.at - daemon.started_at >= 2.0
    assert ready.fields["STATUS"] == f"broker 127.0.0.1:{broker.port} unreachable, retrying; 1 stream"
    assert "reporting ready anyway" in daemon.log_text()
    # Watchdog pings go on without a broker: an unreachable broker is not a wedged agent.
    assert wait_until(lambda: len(notify_listener.with_field("WATCHDOG", since=ready.at)) >= 2, 4)

    broker.start()
    connected = f"connected to 127.0.0.1:{broker.port}; 1 stream"
    notify_listener.wait_for("STATUS", connected, timeout=5, daemon=daemon)
    assert len(notify_listener.with_field("READY")) == 1
    assert daemon.terminate(5) == 0


def test_sighup_reloading_then_ready_and_invalid_config_keeps_the_old_one(
        mosquitto: Mosquitto, write_config: Callable[..., Path], daemon_factory: Callable[..., Daemon],
        mqtt_client: Callable[..., MqttProbe], notify_listener: NotifyListener) -> None:
    config = write_config(mosquitto)
    good_text = config.read_text()
    probe = mqtt_client().subscribe(AVAILABILITY, MUTE_STATE)
    daemon = start(daemon_factory, config, notify_listener)
    notify_listener.wait_for("READY", "1", daemon=daemon)

    # Invalid: RELOADING=1 (with MONOTONIC_USEC on the shared clock), then READY=1 with the old config.
    config.write_text(good_text.replace("keepalive = 5", 'keepalive = "abc"'))
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    t0 = time.monotonic()
    daemon.signal(signal.SIGHUP)
    reloading = notify_listener.wait_for("RELOADING", "1", since=t0, daemon=daemon)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert before <= int(reloading.fields["MONOTONIC_USEC"]) <= after
    reloaded = notify_listener.wait_for("READY", "1", since=reloading.at, daemon=daemon)
    assert "new config rejected, old one running" in reloaded.fields["STATUS"]
    assert "mqtt.keepalive" in daemon.log_text()
    probe.publish(MUTE_SET, b"ON")
    probe.wait_for(MUTE_STATE, b"ON", timeout=2)  # still serving
    assert daemon.alive()

    # Valid, applied in place: the note goes away.
    new = base_config(mosquitto, config.parent / "state")
    new["telemetry"].append({"topic": "tele/plug/SENSOR", "field": "ENERGY.Power", "sensor": "plug_power"})
    write_config(data=new)
    t1 = time.monotonic()
    daemon.signal(signal.SIGHUP)
    reloaded = notify_listener.wait_for("READY", "1", since=t1, daemon=daemon)
    assert notify_listener.with_field("RELOADING", "1", since=t1)
    assert reloaded.fields["STATUS"] == f"connected to 127.0.0.1:{mosquitto.port}; 2 streams"

    # Valid, but [mqtt] changed: a new connection. RELOADING=1 ... READY=1 again, never STOPPING=1, same pid.
    new["mqtt"]["keepalive"] = 7
    write_config(data=new)
    online_before = len(probe.matching(AVAILABILITY, b"online"))
    t2 = time.monotonic()
    daemon.signal(signal.SIGHUP)
    reloading = notify_listener.wait_for("RELOADING", "1", since=t2, daemon=daemon)
    reloaded = notify_listener.wait_for("READY", "1", since=reloading.at, daemon=daemon)
    probe.wait_for(AVAILABILITY, b"online", timeout=5, count=online_before + 1)
    assert not notify_listener.with_field("STOPPING", since=t2)
    assert daemon.alive()
    assert wait_until(lambda: len(notify_listener.with_field("WATCHDOG", since=reloaded.at)) >= 2, 4)

    t3 = time.monotonic()
    assert daemon.terminate(5) == 0
    assert time.monotonic() - t3 < 5.0
    assert notify_listener.with_field("STOPPING", "1", since=t3)


class StdinDaemon:
    """The daemon with ``--audio stdin`` fed from the test: raw 16 kHz S16_LE silence at real-time pace,
    which the test can pause (the pipe stays open: a hung ``arecord``)."""

    CHUNK_SECONDS = 0.1

    def __init__(self, config: Path, env: dict[str, str], log_path: Path) -> None:
        environment = {k: v for k, v in os.environ.items() if k not in {"STATE_DIRECTORY", "NOTIFY_SOCKET"}}
        environment.update(env, PYTHONUNBUFFERED="1")
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent", "--log-level", "DEBUG", "run", "--config", str(config),
             "--audio", "stdin"],
            cwd=REPO_ROOT, env=environment, stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT)
        self.feeding = threading.Event()
        self.feeding.set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._feed, name="audio-feeder", daemon=True)
        self._thread.start()

    def _feed(self) -> None:
        assert self.process.stdin is not None
        chunk = bytes(2 * int(16000 * self.CHUNK_SECONDS))
        next_at = time.monotonic()
        while not self._stop.is_set():
            if self.feeding.is_set():
                try:
                    self.process.stdin.write(chunk)
                    self.process.stdin.flush()
                except (BrokenPipeError, ValueError):
                    return
            next_at += self.CHUNK_SECONDS
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(5)
        if self.process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):  # the daemon has exited; buffered bytes are moot
                self.process.stdin.close()
        self._log.close()


@pytest.mark.slow
def test_no_watchdog_while_audio_frames_stop(
        mosquitto: Mosquitto, write_config: Callable[..., Path], notify_listener: NotifyListener,
        tmp_path: Path) -> None:
    if not (REPO_ROOT / "models" / "kws.tflite").is_file():
        pytest.skip("models/kws.tflite is not built")
    config = write_config(mosquitto, **{"voice.enabled": True})
    daemon = StdinDaemon(config, notify_listener.env(), tmp_path / "daemon.log")
    try:
        ready = notify_listener.wait_for("READY", "1", timeout=20)
        assert ready.fields["STATUS"].endswith("; listening"), ready.fields
        assert wait_until(lambda: "voice: listening to raw" in daemon.log_text(), 10), daemon.log_text()
        time.sleep(2.0)
        assert notify_listener.with_field("WATCHDOG", "1", since=time.monotonic() - 1.5)

        # The audio stops arriving (pipe open, nothing written): the watchdog is withheld.
        daemon.feeding.clear()
        stalled = time.monotonic()
        wedged = notify_listener.wait_for("STATUS", since=stalled, timeout=5)
        assert wedged.fields["STATUS"].startswith("unhealthy, watchdog withheld: audio: silent for"), wedged
        time.sleep(3.0)
        late_pings = notify_listener.with_field("WATCHDOG", since=wedged.at)
        assert late_pings == [], [n.at - stalled for n in late_pings]
        assert "pipeline wedged (audio: silent for" in daemon.log_text()
        assert daemon.process.poll() is None  # systemd, not the agent, restarts it after WatchdogSec

        # Audio flows again: pings resume and the status line is back.
        daemon.feeding.set()
        resumed = time.monotonic()
        notify_listener.wait_for("WATCHDOG", "1", since=resumed, timeout=4)
        assert any(s.endswith("; listening") for s in notify_listener.statuses(since=resumed))

        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(5) == 0
        assert notify_listener.with_field("STOPPING", "1", since=resumed)
    finally:
        daemon.close()


def syscall_groups(analyze: str) -> dict[str, list[str]]:
    """``systemd-analyze syscall-filter``: every @group and its members (names or nested @groups)."""
    listing = subprocess.run([analyze, "syscall-filter"], capture_output=True, text=True, timeout=60,
                             check=True).stdout
    groups: dict[str, list[str]] = {}
    current = ""
    for line in listing.splitlines():
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        if line.startswith("@"):
            current = item
            groups[current] = []
        elif current:
            groups[current].append(item)
    return groups


def unit_allowed_syscalls(analyze: str) -> set[str]:
    """What the unit's SystemCallFilter= lines allow: the first is an allow list, "~" lines deny."""
    groups = syscall_groups(analyze)

    def expand(name: str) -> set[str]:
        if not name.startswith("@"):
            return {name}
        return set().union(*(expand(member) for member in groups[name]))

    allowed: set[str] = set()
    unit = (REPO_ROOT / "systemd/home-agent.service").read_text()
    for line in unit.splitlines():
        if not line.startswith("SystemCallFilter="):
            continue
        value = line.split("=", 1)[1]
        deny = value.startswith("~")
        names = set().union(*(expand(name) for name in value.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    return allowed


# System calls outside the filter that the daemon makes and that are fine to refuse (EPERM):
HARMLESS_REFUSALS = {
    "mbind",  # LiteRT/XNNPACK: a NUMA placement hint for its buffers
    "fchown",  # SQLite (outbox) when running as root only: hands its journal files to the db owner
}


@pytest.mark.slow
def test_daemon_works_when_every_system_call_outside_the_unit_filter_fails(
        mosquitto: Mosquitto, write_config: Callable[..., Path], tmp_path: Path) -> None:
    """SystemCallFilter= with SystemCallErrorNumber=EPERM, emulated by strace: every system call the
    unit does not allow fails with EPERM. The daemon must still connect, load the model and run it."""
    strace, analyze = shutil.which("strace"), shutil.which("systemd-analyze")
    if strace is None or analyze is None:
        pytest.skip("needs strace and systemd-analyze")
    if not (REPO_ROOT / "models" / "kws.tflite").is_file():
        pytest.skip("models/kws.tflite is not built")
    allowed = unit_allowed_syscalls(analyze)
    assert {"read", "openat", "connect", "futex", "mmap"} <= allowed
    config = write_config(mosquitto, **{"voice.enabled": True, "audio.realtime": False})
    trace = tmp_path / "strace.txt"
    # "?name": names this architecture does not have are ignored; "!": inject into everything else.
    refuse = "!" + ",".join(f"?{name}" for name in sorted(allowed))
    environment = {k: v for k, v in os.environ.items() if k not in {"STATE_DIRECTORY", "NOTIFY_SOCKET"}}
    result = subprocess.run(
        [strace, "-f", "-qq", "-o", str(trace), "-e", f"inject={refuse}:error=EPERM",
         sys.executable, "-m", "agent", "run", "--config", str(config),
         "--audio", f"file:{REPO_ROOT / 'examples/computer_light_on.wav'}", "--exit-at-end"],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=180, check=False)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    # Connected, the keyword model ran over the whole file (what it heard is the model's business).
    assert "online after" in log and "voice: end of file" in log, log[-3000:]
    assert "'invocations': 0" not in log
    # "PID name(args) = -1 EPERM (INJECTED)", or "PID <... name resumed>...": split by another thread.
    call = re.compile(r"^\d+\s+(?:<\.\.\. )?(\w+)")
    refused = {match.group(1) for line in trace.read_text().splitlines()
               if "(INJECTED)" in line and (match := call.match(line))}
    assert refused <= HARMLESS_REFUSALS, f"new system calls outside the unit's filter: {refused}"
