"""One validation path: `check-config` and `run` give the same verdict on bad configs, exit 2 and name the
same key, never with a traceback (the real CLI, as subprocesses)."""

from __future__ import annotations

import concurrent.futures
import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, base_config, run_cli, set_dotted, toml_dumps

from agent.config import parse_config
from agent.errors import ConfigError
from agent.validate import validate

EXAMPLE_WAV = REPO_ROOT / "examples" / "computer_light_on.wav"
MISSING = "/nonexistent/home-agent-test"

Setup = Callable[[dict[str, Any], Path], None]


def voice_on(data: dict[str, Any], _tmp: Path) -> None:
    data["voice"]["enabled"] = True
    data["audio"] = {"source": f"file:{EXAMPLE_WAV}", "realtime": False}


def with_voice(**dotted: Any) -> Setup:
    def setup(data: dict[str, Any], tmp: Path) -> None:
        voice_on(data, tmp)
        for key, value in dotted.items():
            set_dotted(data, key, value)
    return setup


def dotted(**values: Any) -> Setup:
    def setup(data: dict[str, Any], _tmp: Path) -> None:
        for key, value in values.items():
            set_dotted(data, key, value)
    return setup


def file_in_tmp(name: str, text: str, key: str, extra: dict[str, Any] | None = None) -> Setup:
    def setup(data: dict[str, Any], tmp: Path) -> None:
        path = tmp / name
        path.write_text(text)
        set_dotted(data, key, str(path))
        for other, value in (extra or {}).items():
            set_dotted(data, other, value)
    return setup


def state_dir_under_a_file(data: dict[str, Any], tmp: Path) -> None:
    blocker = tmp / "blocker"
    blocker.write_text("a file, not a directory")
    data["agent"]["state_dir"] = str(blocker / "state")


def state_dir_is_a_file(data: dict[str, Any], tmp: Path) -> None:
    blocker = tmp / "state-file"
    blocker.write_text("x")
    data["agent"]["state_dir"] = str(blocker)


def two_commands(first: str, second: str) -> Setup:
    def setup(data: dict[str, Any], tmp: Path) -> None:
        voice_on(data, tmp)
        data["voice"]["commands"] = [{"say": say, "action": "lamp_on"} for say in (first, second)]
    return setup


def say(phrase: str) -> Setup:
    return with_voice(**{"voice.commands": [{"say": phrase, "action": "lamp_on"}]})


def anomaly_stream(**extra: Any) -> Setup:
    def setup(data: dict[str, Any], _tmp: Path) -> None:
        data["telemetry"][0].update({"anomaly": True, **extra})  # extra may override anomaly
    return setup


def audio_file_that_is_text(data: dict[str, Any], tmp: Path) -> None:
    voice_on(data, tmp)
    (tmp / "x.wav").write_text("text, not audio")
    data["audio"]["source"] = f"file:{tmp / 'x.wav'}"


# (id, setup, the key the error must name). At least 20, per the issue.
BAD_CONFIGS: list[tuple[str, Setup, str]] = [
    ("word the model does not know", say("fan blast"), "voice.commands.0.say"),
    ("wake word inside a phrase", say("computer off"), "voice.commands.0.say"),
    ("duplicate phrase", two_commands("light off", "light off"), "voice.commands.1.say"),
    ("duplicate phrase after whitespace", two_commands("light on", "light  on"), "voice.commands.1.say"),
    ("wake word the model does not know", with_voice(**{"voice.wake_word": "jarvis"}), "voice.wake_word"),
    ("threshold for an unknown word", with_voice(**{"voice.thresholds": {"blast": 0.5}}), "voice.thresholds"),
    ("missing keyword model", with_voice(**{"voice.model": MISSING + ".tflite"}), "voice.model"),
    ("missing password_file", dotted(**{"mqtt.username": "u", "mqtt.password_file": MISSING}),
     "mqtt.password_file"),
    ("missing TLS ca_file", dotted(**{"mqtt.tls": {"ca_file": MISSING + "-ca.pem"}}), "mqtt.tls.ca_file"),
    ("TLS ca_file that is no certificate", file_in_tmp("ca.pem", "not a certificate\n", "mqtt.tls.ca_file"),
     "mqtt.tls.ca_file"),
    ("missing TLS cert_file", dotted(**{"mqtt.tls": {"cert_file": MISSING + "-cert.pem"}}),
     "mqtt.tls.cert_file"),
    ("missing TLS key_file", file_in_tmp("cert.pem", "x", "mqtt.tls.cert_file",
                                         {"mqtt.tls.key_file": MISSING + "-key.pem"}), "mqtt.tls.key_file"),
    ("TLS key_file without cert_file", dotted(**{"mqtt.tls": {"key_file": MISSING}}), "mqtt.tls"),
    ("port as a string", dotted(**{"mqtt.port": "18841"}), "mqtt.port"),
    ("keepalive as text", dotted(**{"mqtt.keepalive": "abc"}), "mqtt.keepalive"),
    ("anomaly as a string", anomaly_stream(anomaly="yes"), "telemetry.0.anomaly"),
    ("unknown audio source", with_voice(**{"audio.source": "microphone"}), "audio.source"),
    ("missing audio file", with_voice(**{"audio.source": f"file:{MISSING}.wav"}), "audio.source"),
    ("audio file that is not audio", audio_file_that_is_text, "audio.source"),
    ("state_dir under a file", state_dir_under_a_file, "agent.state_dir"),
    ("state_dir is a file", state_dir_is_a_file, "agent.state_dir"),
    ("anomaly threshold above 1", dotted(**{"anomaly.threshold": 1.5}), "anomaly.threshold"),
    ("on_anomaly names no action", anomaly_stream(on_anomaly="siren"), "telemetry.0.on_anomaly"),
]


def _write(tmp: Path, setup: Setup, name: str) -> Path:
    folder = tmp / name.replace(" ", "_")
    folder.mkdir()
    data = copy.deepcopy(base_config(None, folder / "state"))
    setup(data, folder)
    path = folder / "config.toml"
    path.write_text(toml_dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize(("name", "setup", "key"), BAD_CONFIGS, ids=[case[0] for case in BAD_CONFIGS])
def test_check_config_and_startup_agree(name: str, setup: Setup, key: str, tmp_path: Path) -> None:
    """Same verdict (exit 2), same key named, no traceback; `run` never gets as far as connecting."""
    config = _write(tmp_path, setup, name)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        check_future = pool.submit(run_cli, "check-config", "--config", str(config))
        run_future = pool.submit(run_cli, "run", "--config", str(config), timeout=60)
        checked, started = check_future.result(), run_future.result()
    for what, result in (("check-config", checked), ("run", started)):
        assert result.returncode == 2, f"{what}: {result.returncode}\n{result.stderr[-2000:]}"
        assert "Traceback" not in result.stderr, f"{what}:\n{result.stderr[-3000:]}"
        assert "configuration error" in result.stderr, f"{what}:\n{result.stderr[-2000:]}"
        problem_lines = [line for line in result.stderr.splitlines() if line.startswith(key)]
        assert problem_lines, f"{what} does not name {key}:\n{result.stderr[-2000:]}"
    assert _problems(checked.stderr) == _problems(started.stderr)


def _problems(stderr: str) -> list[str]:
    lines = stderr.split("configuration error:\n", 1)[1].splitlines()
    return [line for line in lines if " INFO " not in line and not line.startswith("INFO:")]


def test_the_table_is_long_enough() -> None:
    assert len(BAD_CONFIGS) >= 20


@pytest.mark.parametrize(("audio", "why"), [("bogus", "unknown audio source"),
                                            (f"file:{MISSING}.wav", "not found")])
def test_run_audio_override_problems_exit_2_naming_the_option(audio: str, why: str, tmp_path: Path) -> None:
    config = _write(tmp_path, dotted(), "plain")
    result = run_cli("run", "--config", str(config), "--audio", audio, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert any(line.startswith("--audio: ") and why in line for line in lines), result.stderr


def test_a_good_config_passes_with_voice_and_anomaly_on(tmp_path: Path) -> None:
    data = base_config(None, tmp_path / "state")
    voice_on(data, tmp_path)
    data["telemetry"][0]["anomaly"] = True
    data["voice"]["commands"].append({"say": "light off", "action": "lamp_on"})
    path = tmp_path / "config.toml"
    path.write_text(toml_dumps(data), encoding="utf-8")
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert ": ok (agent 'testagent'" in result.stdout


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    data = base_config(None, tmp_path / "state")
    data["mqtt"].update(username="u", password_file=MISSING)
    data["mqtt"]["tls"] = {"ca_file": MISSING + "-ca"}
    state_dir_is_a_file(data, tmp_path)
    config = parse_config(data, "config.toml", tmp_path / "config.toml")
    with pytest.raises(ConfigError) as caught:
        validate(config)
    keys = [line.split(":", 1)[0] for line in str(caught.value).splitlines()]
    assert keys == ["mqtt.password_file", "mqtt.tls.ca_file", "agent.state_dir"]
    assert all(line.endswith("(config.toml)") for line in str(caught.value).splitlines())
    assert f"{MISSING}-ca" in str(caught.value)  # the TLS error names the file


def test_state_directory_environment_is_named_when_it_is_the_problem(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    monkeypatch.setenv("STATE_DIRECTORY", str(blocker / "state"))
    config = parse_config(base_config(None, tmp_path / "state"), "config.toml")
    with pytest.raises(ConfigError, match=r"^\$STATE_DIRECTORY: .*blocker is not a directory"):
        validate(config)
