"""What a user installs is what is tested: the wheel, built once, installed with NO extras into fresh venvs on
Python 3.11 (Raspberry Pi OS bookworm) and 3.13 (trixie), run from outside the checkout against a real
mosquitto; and scripts/install.sh round-tripped into a temporary root.

The venvs live in .cache/release (git-ignored) and are rebuilt on every run (tests/release_build.py, started
in the background when collection is done); pip's cache keeps that to about 20 s per interpreter.
Interpreters come from pyenv (PYENV_ROOT, default ~/.pyenv) or PATH; where one is missing the tests for it
skip with the reason, except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import release_build
from conftest import REPO_ROOT, Daemon, Mosquitto, MqttProbe, base_config, require_python, toml_dumps
from release_build import PYTHONS, copy_checkout, run
from test_voice_e2e import THERMOSTAT_STATE, voice_config

pytestmark = [pytest.mark.release, pytest.mark.slow]

EXAMPLES = REPO_ROOT / "examples"
# Never importable from the installed package: training code, and what only the training/dev extras bring.
FORBIDDEN_MODULES = ("training", "scipy", "python_speech_features", "tensorflow", "tf_keras")


@pytest.fixture(scope="session")
def wheel() -> Path:
    """The wheel of this checkout, built once per session."""
    error = release_build.wait_wheel()
    assert error is None, error
    return release_build.wheel_path()


@dataclass(frozen=True)
class Installed:
    version: str
    venv: Path

    @property
    def home_agent(self) -> Path:
        return self.venv / "bin" / "home-agent"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


@pytest.fixture(scope="module", params=PYTHONS, ids=[f"py{v}" for v in PYTHONS])
def installed(request: pytest.FixtureRequest, wheel: Path) -> Installed:
    """A fresh venv with the wheel and nothing else: what `pip install home-agent` gives a user."""
    version: str = request.param
    require_python(version)
    error = release_build.wait_venv(version)
    assert error is None, error
    return Installed(version, release_build.venv_dir(version))


def test_every_runtime_module_imports_without_extras(installed: Installed, tmp_path: Path) -> None:
    """Every module of the installed package imports (so every subcommand's imports are satisfied), from the
    venv and not from the checkout, and none of them pulls in training code or the training extras."""
    probe = (
        "import importlib, json, pkgutil, sys, agent\n"
        "names = [m.name for m in pkgutil.walk_packages(agent.__path__, 'agent.')\n"
        "         if m.name != 'agent.__main__']\n"
        "for name in names: importlib.import_module(name)\n"
        "print(json.dumps({'file': agent.__file__, 'modules': names, 'loaded': sorted(sys.modules)}))\n"
    )
    result = run(installed.python, "-c", probe, cwd=tmp_path)
    assert result.returncode == 0, f"Python {installed.version}: {result.stderr[-3000:]}"
    report = json.loads(result.stdout)
    assert report["file"].startswith(str(installed.venv)), report["file"]
    assert {"agent.app", "agent.voice", "agent.features", "agent.anomaly_score", "agent.transcribe",
            "agent.audio"} <= set(report["modules"])
    leaked = [m for m in report["loaded"] if m.split(".")[0] in FORBIDDEN_MODULES]
    assert leaked == [], f"the runtime imports {leaked}"
    checked = run(installed.python, "-m", "pip", "check", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout


def test_a_spoken_command_becomes_its_mqtt_action(installed: Installed, tmp_path: Path,
                                                  mosquitto: Mosquitto) -> None:
    probe = MqttProbe(mosquitto).subscribe("#")
    probe.publish("zigbee2mqtt/thermostat", THERMOSTAT_STATE, retain=True)
    config = tmp_path / "config.toml"
    config.write_text(toml_dumps(voice_config(mosquitto, tmp_path / "state")), encoding="utf-8")
    try:
        checked = run(installed.home_agent, "check-config", "--config", config, cwd=tmp_path)
        assert checked.returncode == 0, checked.stderr
        result = run(installed.home_agent, "run", "--config", config, "--audio",
                     f"file:{EXAMPLES / 'computer_heat_up.wav'}", "--exit-at-end", cwd=tmp_path, timeout=120)
        assert result.returncode == 0, f"Python {installed.version}:\n{result.stderr[-3000:]}"
        command = probe.wait_for("zigbee2mqtt/thermostat/set", timeout=5)
        assert command.payload == b'{"current_heating_setpoint": 21.5}'
        intent = json.loads(probe.wait_for("home-agent/voicetest/intent", timeout=5).payload)
        assert intent["intent"] == "heating_up"

        fired = run(installed.home_agent, "action", "light_on", "--config", config, cwd=tmp_path)
        assert fired.returncode == 0, fired.stderr
        assert probe.wait_for("cmnd/livingroom_lamp/POWER", timeout=5).payload == b"ON"

        heard = run(installed.home_agent, "transcribe", "--json", "--config", config,
                    EXAMPLES / "computer_light_on.wav", cwd=tmp_path)
        assert heard.returncode == 0, heard.stderr
        assert [i["action"] for i in json.loads(heard.stdout)["intents"]] == ["light_on"]
    finally:
        probe.close()
    devices = run(installed.home_agent, "devices", cwd=tmp_path)
    assert devices.returncode == 0, devices.stderr  # lists microphones, or says there are none


def test_a_household_enrols_a_voice_the_shipped_model_misses(installed: Installed, tmp_path: Path) -> None:
    """`home-agent enroll` works from the installed package: it needs the negative bank beside the model
    (models/kws.bank.npz, shipped with the wheel's data files; a wheel without it refused every enrolment),
    and `transcribe --config` then hears the enrolled voice that `transcribe` alone misses."""
    from test_enroll import WAKE_SOURCES, child_voice

    config = tmp_path / "config.toml"
    config.write_text(f'[agent]\nid = "release"\nstate_dir = "{tmp_path / "state"}"\n[mqtt]\n',
                      encoding="utf-8")
    takes = [child_voice(name, factor, tmp_path) for name in WAKE_SOURCES[:2] for factor in (1.3, 1.4)]
    takes.append(child_voice(WAKE_SOURCES[2], 1.3, tmp_path))
    test = child_voice(WAKE_SOURCES[0], 1.35, tmp_path)
    enrolled = run(installed.home_agent, "enroll", "--config", config, "--word", "computer", *takes,
                   cwd=tmp_path, timeout=120)
    assert enrolled.returncode == 0, f"Python {installed.version}:\n{enrolled.stderr[-3000:]}"
    assert "templates of your recordings" in enrolled.stdout
    words: dict[str, list[str]] = {}
    for name, args in (("shipped", ()), ("adapted", ("--config", config))):
        heard = run(installed.home_agent, "transcribe", "--json", *args, test, cwd=tmp_path)
        assert heard.returncode == 0, heard.stderr
        words[name] = [d["word"] for d in json.loads(heard.stdout)["detections"]]
    assert "computer" not in words["shipped"] and "computer" in words["adapted"], words


def test_anomaly_score_scores_a_csv(installed: Installed, tmp_path: Path) -> None:
    readings = tmp_path / "readings.csv"
    rows = [(f"2024-01-01T{i // 60:02d}:{i % 60:02d}:00", 20 + 2 * math.sin(i / 30)) for i in range(600)]
    rows[500] = (rows[500][0], 45.0)  # a spike
    with readings.open("w", newline="") as handle:
        csv.writer(handle).writerows([("timestamp", "value"), *rows])
    scored = tmp_path / "scored.csv"
    result = run(installed.home_agent, "anomaly-score", "--input", readings, "--output", scored, cwd=tmp_path)
    assert result.returncode == 0, f"Python {installed.version}:\n{result.stderr[-3000:]}"
    with scored.open(newline="") as handle:
        out = list(csv.reader(handle))
    assert out[0] == ["timestamp", "value", "anomaly_score", "alert"]
    assert len(out) == 1 + len(rows)
    scores = [float(row[2]) for row in out[1:]]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores[500] == max(scores) and scores[500] > 0.5, scores[495:505]
    assert [index for index, row in enumerate(out[1:]) if row[3] == "1"] == [500]  # one alert: the spike


def test_help_shows_an_example_for_every_subcommand(installed: Installed, tmp_path: Path) -> None:
    result = run(installed.home_agent, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("run", "check-config", "action", "devices", "transcribe", "anomaly-score"):
        assert f"home-agent {command}" in result.stdout, f"no example for {command}:\n{result.stdout}"
    assert "argument parsing only" not in result.stdout


# ------------------------------------------------------------------------------------------- install.sh


def install_sh(checkout: Path, root: Path, python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """What `sudo make install` runs, from a clean copy of the checkout, below ``root``."""
    return run("bash", checkout / "scripts" / "install.sh", "--root", root, "--no-apt", "--no-systemctl",
               "--python", python, *args, cwd=checkout, timeout=900)


def files_below(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.fixture
def scratch_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "root"
    root.mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_install_sh_round_trip_into_a_temporary_root(tmp_path: Path, scratch_root: Path, wheel: Path,
                                                     mosquitto: Mosquitto) -> None:
    """Install from the checkout (Python 3.11, as on bookworm), start the daemon exactly as the installed unit
    says, stop it, upgrade from the built wheel (the config is kept), uninstall (config kept), purge: nothing
    of ours is left."""
    python = require_python("3.11")
    root = scratch_root
    checkout = copy_checkout(tmp_path / "src")
    venv, etc = root / "opt/home-agent/venv", root / "etc/home-agent"
    unit, config = root / "etc/systemd/system/home-agent.service", etc / "config.toml"

    first = install_sh(checkout, root, python)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "nothing started" in first.stdout  # no systemctl: it says what to do instead
    placed = files_below(root)
    assert {"etc/systemd/system/home-agent.service", "etc/home-agent/config.toml",
            "etc/home-agent/config.toml.example", "opt/home-agent/venv/bin/home-agent"} <= placed
    assert any(p.startswith("opt/home-agent/venv/share/home-agent/models/kws.tflite") for p in placed)
    assert config.read_text() == (REPO_ROOT / "config.toml").read_text()
    assert (etc / "config.toml.example").read_text() == config.read_text()
    unit_text = unit.read_text()  # the shipped unit with the paths below root, nothing else changed
    assert unit_text.replace(f"{venv}/", "/opt/home-agent/venv/").replace(
        f"--config {config}", "--config /etc/home-agent/config.toml") == \
        (REPO_ROOT / "systemd" / "home-agent.service").read_text()
    exec_start = next(line.removeprefix("ExecStart=") for line in unit.read_text().splitlines()
                      if line.startswith("ExecStart="))
    assert exec_start == f"{venv}/bin/home-agent run --config {config}"
    # systemctl reload checks the same file first, so a bad config fails the reload with the key named.
    assert f"ExecReload={venv}/bin/home-agent check-config --config {config}" in unit.read_text()

    # The daemon as systemd would start it (minus the sandbox), with a config for the test broker.
    data = base_config(mosquitto, root / "var/lib/home-agent", agent_id="installed")
    config.write_text(toml_dumps(data), encoding="utf-8")
    program, _run, _flag, config_arg = exec_start.split()
    probe = MqttProbe(mosquitto).subscribe("home-agent/installed/availability")
    daemon = Daemon(Path(config_arg), program=(program,), cwd=root, env={"PYTHONPATH": ""})
    try:
        probe.wait_for("home-agent/installed/availability", b"online", timeout=30)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(15) == 0, daemon.log_text()[-3000:]
        probe.wait_for("home-agent/installed/availability", b"offline", timeout=5)
    finally:
        daemon.close()
        probe.close()

    config.write_text(config.read_text() + "\n# edited by hand\n", encoding="utf-8")
    second = install_sh(checkout, root, python, "--wheel", str(wheel))
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"installing home-agent from {wheel}" in second.stdout
    assert "keeping your" in second.stdout and config.read_text().endswith("# edited by hand\n")

    removed = install_sh(checkout, root, python, "--uninstall")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert not unit.exists() and not venv.exists() and not (root / "opt/home-agent").exists()
    assert config.is_file()  # kept without --purge

    purged = install_sh(checkout, root, python, "--uninstall", "--purge")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert files_below(root) == set(), files_below(root)
    assert not etc.exists() and not (root / "var/lib/home-agent").exists()
