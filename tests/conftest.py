"""Shared fixtures: a real mosquitto on an ephemeral 127.0.0.1 port, an MQTT test client, config files in
tmp_path and the real daemon as a subprocess.

- ``mosquitto``: a started broker (``.host``, ``.port``, ``.stop()``, ``.start()``, ``.kill()``,
  ``.restart()``); ``mosquitto_factory(**options)`` for brokers with other settings (persistence,
  password_file, extra config lines). Restarts reuse the same port.
- ``mqtt_client``: ``MqttProbe`` factory (paho, used directly): collect messages, wait for them, publish.
- ``write_config``: writes ``config.toml`` into tmp_path (state_dir in tmp_path) from a base that points
  at the broker, with dotted-key overrides.
- ``daemon_factory``: runs ``python -m agent run --config ...``; stops everything it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bench.broker import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def wait_until(predicate: Callable[..., Any], timeout: float, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; returns it, or the last falsy value."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(interval)


# --------------------------------------------------------------------------------------- mosquitto


class Mosquitto:
    """A mosquitto process on 127.0.0.1:<port> with its own config file; restartable on the same port."""

    def __init__(self, workdir: Path, *, persistence: bool = False, password_file: Path | None = None,
                 extra_lines: tuple[str, ...] = ()) -> None:
        if not Path(MOSQUITTO).exists():
            pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
        self.host = "127.0.0.1"
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "mosquitto.log"
        self.conf_path = workdir / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'false' if password_file else 'true'}",
            f"persistence {'true' if persistence else 'false'}",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
        ]
        if os.geteuid() == 0:
            # Running as root mosquitto would switch to the "mosquitto" user, which cannot write the log
            # and persistence files into pytest's private tmp dirs.
            lines.append("user root")
        if persistence:
            lines += [f"persistence_location {workdir}/", "autosave_interval 1"]
        if password_file is not None:
            lines.append(f"password_file {password_file}")
        lines += list(extra_lines)
        self.conf_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 5.0) -> None:
        if self.running:
            return
        self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.conf_path)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.process.returncode}; see {self.log_path}")
            with socket.socket() as sock:
                sock.settimeout(0.2)
                if sock.connect_ex((self.host, self.port)) == 0:
                    return
            time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout} s")

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its persistence file) and wait."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def kill(self) -> None:
        """SIGKILL: a broker crash (nothing saved)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    brokers: list[Mosquitto] = []

    def make(*, start: bool = True, **options: Any) -> Mosquitto:
        broker = Mosquitto(tmp_path / f"broker{len(brokers)}", **options)
        brokers.append(broker)
        if start:
            broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.kill()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    return mosquitto_factory()


def make_password_file(path: Path, username: str, password: str) -> Path:
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), username, password], check=True,
                   capture_output=True)
    return path


# --------------------------------------------------------------------------------------- MQTT probe


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retained: bool
    qos: int
    at: float  # time.monotonic()


class MqttProbe:
    """A plain paho client for tests: subscribe, collect, wait, publish."""

    def __init__(self, broker: Mosquitto, client_id: str = "", username: str | None = None,
                 password: str | None = None, clean_session: bool = True, *,
                 tls_ca: Path | None = None) -> None:
        self.broker = broker
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        # clean_session=False (with a client_id and a persistent broker): messages published while the
        # broker was restarted or the probe was away are queued for it.
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=clean_session)
        self.client.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]  # floats work; stubs say int
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls_ca is not None:  # a TLS listener: verify it with this CA (and its hostname)
            self.client.tls_set(ca_certs=str(tls_ca))
        self.client.on_message = self._on_message
        self._connected = threading.Event()
        self.client.on_connect = lambda *_args: self._connected.set()
        self.client.connect(broker.host, broker.port, 30)
        self.client.loop_start()
        if not self._connected.wait(5):
            raise RuntimeError("test MQTT client could not connect")

    def _on_message(self, _client: Any, _userdata: Any, message: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Received(message.topic, bytes(message.payload), bool(message.retain),
                                          message.qos, time.monotonic()))
            self._cond.notify_all()

    def subscribe(self, *topic_filters: str, qos: int = 1) -> MqttProbe:
        for topic_filter in topic_filters:
            result, _mid = self.client.subscribe(topic_filter, qos)
            assert result == paho.MQTT_ERR_SUCCESS
        time.sleep(0.05)  # SUBACK; retained messages follow
        return self

    def clear(self) -> None:
        with self._cond:
            self.messages.clear()

    def matching(self, topic_filter: str, payload: bytes | None = None) -> list[Received]:
        with self._cond:
            return [m for m in self.messages if paho.topic_matches_sub(topic_filter, m.topic)
                    and (payload is None or m.payload == payload)]

    def wait_for(self, topic_filter: str, payload: bytes | None = None, timeout: float = 5.0,
                 retained: bool | None = None, count: int = 1) -> Received:
        """The first message (of ``count``) on a topic matching the filter (and payload/retained)."""
        deadline = time.monotonic() + timeout

        def found() -> list[Received]:
            return [m for m in self.matching(topic_filter, payload)
                    if retained is None or m.retained == retained]

        with self._cond:
            while len(found()) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [(m.topic, m.payload[:80]) for m in self.messages[-10:]]
                    raise AssertionError(f"no {payload!r} on {topic_filter} within {timeout} s; "
                                         f"last seen {seen}")
                self._cond.wait(remaining)
            return found()[count - 1]

    def last(self, topic: str) -> bytes | None:
        msgs = self.matching(topic)
        return msgs[-1].payload if msgs else None

    def last_json(self, topic: str) -> dict[str, Any]:
        """The newest JSON object on ``topic``, or {} before the first one (so a ``wait_until`` predicate
        keeps polling while a message such as the diagnostics is still on its way)."""
        payload = self.last(topic)
        return {} if payload is None else dict(json.loads(payload))

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0:
            info.wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained_messages(broker: Mosquitto, topic_filter: str, settle: float = 0.3) -> dict[str, bytes]:
    """Everything retained under ``topic_filter`` right now (a fresh subscription gets only those)."""
    probe = MqttProbe(broker)
    try:
        probe.subscribe(topic_filter)
        time.sleep(settle)
        return {m.topic: m.payload for m in probe.matching("#") if m.retained}
    finally:
        probe.close()


@pytest.fixture
def mqtt_client(request: pytest.FixtureRequest) -> Iterator[Callable[..., MqttProbe]]:
    """``mqtt_client(broker=None, **kwargs)``: a connected MqttProbe (default broker: ``mosquitto``)."""
    probes: list[MqttProbe] = []

    def make(broker: Mosquitto | None = None, **kwargs: Any) -> MqttProbe:
        probe = MqttProbe(broker or request.getfixturevalue("mosquitto"), **kwargs)
        probes.append(probe)
        return probe

    yield make
    for probe in probes:
        with contextlib.suppress(Exception):
            probe.close()


# --------------------------------------------------------------------------------------- config files


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def toml_dumps(data: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for test configs: scalars, inline lists, tables, arrays of tables."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for key, value in data.items():
        is_table_array = isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
        if isinstance(value, dict) or is_table_array:
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, value in tables:
        name = f"{prefix}{key}"
        if isinstance(value, list):
            for item in value:
                out += f"\n[[{name}]]\n" + toml_dumps(item, prefix=f"{name}.")
        else:
            out += f"\n[{name}]\n" + toml_dumps(value, prefix=f"{name}.")
    return out


def base_config(broker: Mosquitto | None, state_dir: Path, agent_id: str = "testagent") -> dict[str, Any]:
    """A small valid config with fast timings: one telemetry stream, one template action, one voice
    command with voice switched off (backbone tests need no microphone or model; set
    ``voice.enabled = True`` for the voice stage and the intent event entity)."""
    return {
        "agent": {"id": agent_id, "name": "Test agent", "state_dir": str(state_dir)},
        "mqtt": {
            "host": broker.host if broker else "127.0.0.1",
            "port": broker.port if broker else 1,
            "keepalive": 5,
            "reconnect_min_delay": 0.1,
            "reconnect_max_delay": 0.5,
        },
        "homeassistant": {"discovery_prefix": "homeassistant", "announce_jitter": 0.2,
                          "diagnostics_interval": 1.0},
        "telemetry": [
            {"topic": "zigbee2mqtt/living_room_sensor", "field": "temperature",
             "sensor": "living_room_temperature", "unit": "°C", "device_class": "temperature",
             "min": -40.0, "max": 80.0},
        ],
        "actions": {
            "lamp_on": {"topic": "test/lamp/set", "payload": '{"state": "ON"}', "min_interval": 0.0},
        },
        "voice": {"enabled": False, "commands": [{"say": "light on", "action": "lamp_on"}]},
    }


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_dotted(cfg, "mqtt.port", 1)``; a value of ``DELETE`` removes the key."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    if value is DELETE:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value


DELETE = object()


@pytest.fixture
def write_config(tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]) -> Callable[..., Path]:
    """``write_config(broker, **{"mqtt.keepalive": 10})`` -> path of a config.toml in tmp_path.
    Pass ``data=`` to write a complete dict instead of the base config; ``name=`` for another file."""

    def write(broker: Mosquitto | None = None, *, data: dict[str, Any] | None = None,
              name: str = "config.toml", overrides: dict[str, Any] | None = None, **dotted: Any) -> Path:
        config = data if data is not None else base_config(broker, tmp_path / "state")
        for key, value in {**(overrides or {}), **dotted}.items():
            set_dotted(config, key, value)
        path = tmp_path / name
        path.write_text(toml_dumps(config), encoding="utf-8")
        return path

    return write


def find_python(version: str) -> Path | None:
    """A CPython ``version`` ("3.13") interpreter: pyenv's newest of that minor version (PYENV_ROOT, default
    ~/.pyenv), else ``pythonX.Y`` on PATH."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = sorted(pyenv.glob(f"{version}.*/bin/python{version}"),
                        key=lambda p: [int(x) for x in p.parts[-3].split(".") if x.isdigit()])
    if candidates:
        return candidates[-1]
    found = shutil.which(f"python{version}")
    return Path(found) if found else None


def require_python(version: str) -> Path:
    """``find_python`` or skip with the reason; in CI (CI=true) a missing interpreter fails instead."""
    python = find_python(version)
    if python is None:
        message = f"no Python {version} interpreter (pyenv install {version}, or put python{version} on PATH)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: CI must test every supported Python")
        pytest.skip(message)
    return python


# --------------------------------------------------------------------------------------- daemon


class Daemon:
    """``python -m agent run --config PATH`` as a subprocess, logging to a file. ``program`` and ``cwd``
    run another installation instead (e.g. ``("/venv/bin/home-agent",)`` outside the checkout)."""

    def __init__(self, config_path: Path, *, env: dict[str, str] | None = None, log_level: str = "DEBUG",
                 extra_args: tuple[str, ...] = (), program: tuple[str, ...] = (sys.executable, "-m", "agent"),
                 cwd: Path = REPO_ROOT) -> None:
        self.config_path = config_path
        self.log_path = config_path.with_suffix(f".{int(time.monotonic() * 1000)}.log")
        environment = {k: v for k, v in os.environ.items()
                       if k not in {"HOME_AGENT_MQTT_PASSWORD", "STATE_DIRECTORY", "NOTIFY_SOCKET"}}
        environment.update(env or {})
        environment["PYTHONUNBUFFERED"] = "1"
        self._log_file = self.log_path.open("wb")
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            [*program, "--log-level", log_level, "run", "--config", str(config_path), *extra_args],
            cwd=cwd, env=environment, stdout=self._log_file, stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def terminate(self, timeout: float = 10.0) -> int:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait(5)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log_file.flush()

    def log_text(self) -> str:
        self._log_file.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def close(self) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait(5)
        self._log_file.close()


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., Daemon]]:
    daemons: list[Daemon] = []

    def start(config_path: Path, **kwargs: Any) -> Daemon:
        daemon = Daemon(config_path, **kwargs)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.close()


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """``python -m agent ARGS`` to completion."""
    environment = {k: v for k, v in os.environ.items()
                   if k not in {"HOME_AGENT_MQTT_PASSWORD", "STATE_DIRECTORY"}}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=REPO_ROOT, env=environment,
                          capture_output=True, text=True, timeout=timeout, check=False)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the slow preparation the selected tests need in the background: the wheel and the venvs of the
    release tests, the Home Assistant venvs of the acceptance tests."""
    import release_build
    from ha_install import start_installs

    def params(name: str) -> set[Any]:
        return {item.callspec.params[name] for item in session.items
                if hasattr(item, "callspec") and name in item.callspec.params}

    # In the order the tests need them (test_ha_acceptance runs before test_release).
    start_installs(sorted(params("home_assistant"), key=lambda release: release.version))
    needs_wheel = any("wheel" in getattr(item, "fixturenames", ()) for item in session.items)
    release_build.start_builds(needs_wheel, sorted(params("installed")))
