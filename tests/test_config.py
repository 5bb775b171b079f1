"""Configuration errors through the real CLI: exit status 2, the key path and the file named."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DELETE, Mosquitto, run_cli

from agent.config import PASSWORD_ENV, Config, MqttSection, parse_config
from agent.errors import ConfigError


def test_bad_type_exits_2_naming_key_and_file(write_config: Callable[..., Path]) -> None:
    config = write_config(None, **{"mqtt.port": "abc"})
    for command in ("check-config", "run"):
        result = run_cli(command, "--config", str(config))
        assert result.returncode == 2, (command, result.stderr)
        assert 'mqtt.port: Input should be a valid integer, got "abc" (config.toml)' in result.stderr


def test_unknown_key_is_rejected(write_config: Callable[..., Path]) -> None:
    result = run_cli("check-config", "--config", str(write_config(None, **{"mqtt.hostname": "broker"})))
    assert result.returncode == 2
    assert "mqtt.hostname: Extra inputs are not permitted" in result.stderr


def test_password_in_the_file_is_rejected(write_config: Callable[..., Path]) -> None:
    result = run_cli("check-config", "--config", str(write_config(None, **{"mqtt.password": "hunter2"})))
    assert result.returncode == 2
    assert "mqtt.password:" in result.stderr


def test_missing_agent_section(write_config: Callable[..., Path]) -> None:
    result = run_cli("check-config", "--config", str(write_config(None, agent=DELETE)))
    assert result.returncode == 2
    assert "agent: Field required (config.toml)" in result.stderr


def test_several_errors_reported_at_once(write_config: Callable[..., Path]) -> None:
    config = write_config(None, **{"mqtt.keepalive": 1, "agent.id": "Kitchen Agent"})
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 2
    assert "mqtt.keepalive:" in result.stderr and "agent.id:" in result.stderr


def test_missing_file_and_invalid_toml(tmp_path: Path) -> None:
    result = run_cli("check-config", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2 and "config file not found" in result.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[agent\nid = 1\n", encoding="utf-8")
    result = run_cli("run", "--config", str(broken))
    assert result.returncode == 2 and "invalid TOML" in result.stderr and "broken.toml" in result.stderr


def test_valid_config_passes_check(write_config: Callable[..., Path]) -> None:
    result = run_cli("check-config", "--config", str(write_config(None)))
    assert result.returncode == 0, result.stderr
    assert "ok (agent 'testagent'" in result.stdout


def test_unusable_state_dir_is_a_clear_startup_error(write_config: Callable[..., Path],
                                                     mosquitto: Mosquitto) -> None:
    config = write_config(mosquitto, **{"agent.state_dir": "/proc/home-agent-cannot-exist"})
    result = run_cli("run", "--config", str(config), timeout=15)
    assert result.returncode == 1
    assert "cannot create the state directory /proc/home-agent-cannot-exist" in result.stderr


def test_minimal_config_gets_defaults() -> None:
    config = parse_config({"agent": {"id": "kitchen"}, "mqtt": {}})
    assert isinstance(config, Config)
    assert config.agent.display_name == "kitchen"
    assert (config.mqtt.host, config.mqtt.port) == ("127.0.0.1", 1883)
    assert config.homeassistant.discovery_prefix == "homeassistant"
    assert config.telemetry == [] and config.actions == {}
    assert not config.voice_active


def test_password_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    assert MqttSection().password() is None
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    assert MqttSection().password() == "from-env"
    secret = tmp_path / "secret"
    secret.write_text("from-file\n", encoding="utf-8")
    assert MqttSection(password_file=secret).password() == "from-file"  # the file wins, newline stripped
    with pytest.raises(ConfigError, match=r"mqtt\.password_file"):
        MqttSection(password_file=tmp_path / "missing").password()


def test_deprecated_anomaly_model_is_ignored_with_one_warning(write_config: Callable[..., Path],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    from agent import config as config_module

    config_module._warned_deprecated.discard("model")
    data = {"agent": {"id": "kitchen"}, "mqtt": {}, "anomaly": {"model": "models/anomaly.tflite",
                                                                 "threshold": 0.95}}
    with caplog.at_level("WARNING", logger="agent.config"):
        first, second = parse_config(data), parse_config(data)
    assert first.anomaly.threshold == second.anomaly.threshold == 0.95
    warnings = [r.getMessage() for r in caplog.records if "anomaly.model" in r.getMessage()]
    assert warnings == ["config: anomaly.model is deprecated and ignored (the anomaly detector no longer "
                        "uses a model file); remove it from the file"]
    # through the real CLI: an old user config still passes, and says why the key is ignored
    result = run_cli("check-config", "--config",
                     str(write_config(None, **{"anomaly.model": "/etc/home-agent/anomaly.tflite"})))
    assert result.returncode == 0, result.stderr
    assert "anomaly.model is deprecated and ignored" in result.stderr
    # other unknown keys of the section are still errors
    result = run_cli("check-config", "--config", str(write_config(None, **{"anomaly.modle": "x"})))
    assert result.returncode == 2 and "anomaly.modle: Extra inputs are not permitted" in result.stderr
