"""The systemd unit: it verifies clean, its sandbox scores <= 2.0, and scripts/install.sh installs it.

`systemd-analyze` works on unit files without systemd running as PID 1, so these run in CI too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "home-agent.service"
INSTALL_SH = REPO / "scripts" / "install.sh"
EXPOSURE_TARGET = 2.0
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")


def unit_settings(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order; systemd allows repeated keys."""
    section = ""
    settings: list[tuple[str, str, str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        settings.append((section, key.strip(), value.strip()))
    return settings


def setting(key: str, section: str = "Service") -> list[str]:
    return [value for sec, k, value in unit_settings(UNIT.read_text()) if sec == section and k == key]


def unit_with_existing_binary(tmp_path: Path) -> Path:
    """A copy of the unit whose home-agent binary (ExecStart, ExecReload) exists here (verify checks it is
    executable); every other line is unchanged. The real path, /opt/home-agent/venv/bin/home-agent, is
    what install.sh makes."""
    binary = tmp_path / "home-agent"
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    text = UNIT.read_text()
    assert "ExecStart=/opt/home-agent/venv/bin/home-agent " in text
    copy = tmp_path / "home-agent.service"
    copy.write_text(text.replace("=/opt/home-agent/venv/bin/home-agent ", f"={binary} "))
    return copy


def test_unit_declares_the_service_contract() -> None:
    assert setting("Type") == ["notify"]
    assert setting("NotifyAccess") == ["main"]
    assert setting("ExecStart") == [
        "/opt/home-agent/venv/bin/home-agent run --config /etc/home-agent/config.toml"]
    # check-config first: a config it rejects fails `systemctl reload` and is never sent to the agent.
    assert setting("ExecReload") == [
        "/opt/home-agent/venv/bin/home-agent check-config --config /etc/home-agent/config.toml",
        "/bin/kill -HUP $MAINPID"]
    assert setting("WatchdogSec") == ["30"]
    assert setting("Restart") == ["on-failure"]
    assert setting("DynamicUser") == ["yes"]
    assert setting("SupplementaryGroups") == ["audio"]
    assert setting("DeviceAllow") == ["char-alsa rw"]
    assert setting("DevicePolicy") == ["closed"]
    assert setting("CapabilityBoundingSet") == [""]
    assert setting("StateDirectory") == ["home-agent"]
    assert setting("ConfigurationDirectory") == ["home-agent"]
    # PrivateDevices= would hide /dev/snd: the microphone needs DevicePolicy=closed + DeviceAllow instead.
    assert setting("PrivateDevices") == []
    # The broker is on the LAN, at an address the unit cannot know: no IP allow-list.
    assert setting("IPAddressDeny") == []
    assert "AF_INET" in setting("RestrictAddressFamilies")[0].split()
    # The agent must get its stop_timeout (4 s by default) plus margin before SIGKILL.
    assert float(setting("TimeoutStopSec")[0]) > 5
    assert setting("StartLimitBurst", "Unit") and setting("StartLimitIntervalSec", "Unit")


@needs_analyze
def test_unit_verifies_clean(tmp_path: Path) -> None:
    unit = unit_with_existing_binary(tmp_path)
    result = subprocess.run([str(SYSTEMD_ANALYZE), "verify", str(unit)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@needs_analyze
def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The verify test can fail: a misspelt directive is reported."""
    unit = unit_with_existing_binary(tmp_path)
    unit.write_text(unit.read_text().replace("WatchdogSec=", "WatchdogSecs="))
    result = subprocess.run([str(SYSTEMD_ANALYZE), "verify", str(unit)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert "WatchdogSecs" in result.stderr


def exposure(unit: Path) -> tuple[float, str]:
    result = subprocess.run([str(SYSTEMD_ANALYZE), "security", "--offline=true", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1)), result.stdout


@needs_analyze
def test_exposure_score_meets_target() -> None:
    score, report = exposure(UNIT)
    failing = [line for line in report.splitlines() if line.startswith("✗")]
    assert score <= EXPOSURE_TARGET, f"exposure {score} > {EXPOSURE_TARGET}:\n" + "\n".join(failing)


@needs_analyze
def test_exposure_check_can_fail(tmp_path: Path) -> None:
    """Without the sandbox the same check reports a high exposure."""
    bare = tmp_path / "home-agent.service"
    keep = ("Type", "NotifyAccess", "ExecStart", "ExecReload", "WatchdogSec", "Restart", "RestartSec",
            "Description")
    lines = [line for line in UNIT.read_text().splitlines()
             if line.startswith("[") or line.split("=", 1)[0] in keep]
    bare.write_text("\n".join(lines) + "\n")
    score, _ = exposure(bare)
    assert score > 8.0


# Runs the shipped models and builds sounddevice's PortAudio callback exactly as sounddevice does
# (``_ffi.callback('PaStreamCallback', ...)``), under the kernel's W^X lock (prctl PR_SET_MDWE, Linux >= 6.3):
# the same rule MemoryDenyWriteExecute=yes enforces with seccomp.
_W_XOR_X_PROBE = r"""
import ctypes, json, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    print(json.dumps({"unsupported": True})); sys.exit(0)
import numpy as np
from agent.paths import shipped_models_dir
result = {"unsupported": False, "models": []}
for path in sorted(shipped_models_dir().glob("*.tflite")):
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    for detail in interpreter.get_input_details():
        interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
    interpreter.invoke()
    result["models"].append(path.name)
try:
    import sounddevice as sd
except OSError as err:  # no libportaudio2
    result["sounddevice"] = f"unavailable: {err}"
else:
    try:
        sd._ffi.callback("PaStreamCallback", error=sd._lib.paAbort)(lambda *args: 0)
        result["sounddevice"] = "callback ok"
    except MemoryError:
        result["sounddevice"] = "callback refused"
print(json.dumps(result))
"""


def test_memory_deny_write_execute_stays_off_for_the_microphone() -> None:
    """MemoryDenyWriteExecute=yes would stop the microphone: sounddevice's stream callback is a cffi
    callback in W+X memory. The models themselves run fine under W^X. When this test fails because the
    callback works, cffi/sounddevice no longer need W+X: turn MemoryDenyWriteExecute=yes on."""
    assert setting("MemoryDenyWriteExecute") == ["no"]
    probe = subprocess.run([sys.executable, "-c", _W_XOR_X_PROBE], cwd=REPO, capture_output=True, text=True,
                           timeout=120, check=False)
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    if result["unsupported"]:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert "kws.tflite" in result["models"] or not (REPO / "models/kws.tflite").exists()
    if result["sounddevice"].startswith("unavailable"):
        pytest.skip(result["sounddevice"])
    assert result["sounddevice"] == "callback refused", (
        "sounddevice's callback now works under W^X: set MemoryDenyWriteExecute=yes in the unit")


_XNNPACK_PROBE = r"""
import numpy as np
from ai_edge_litert.interpreter import Interpreter
from agent.paths import shipped_models_dir
interpreter = Interpreter(model_path=str(shipped_models_dir() / "kws.tflite"))
interpreter.allocate_tensors()
detail = interpreter.get_input_details()[0]
interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
interpreter.invoke()
print("invoked")
"""


def test_proc_subset_stays_off_for_xnnpack() -> None:
    """ProcSubset=pid hides /proc/cpuinfo; LiteRT then runs without its XNNPACK delegate (measured ~100x
    slower per keyword-model inference here). Checked in a private mount namespace with a procfs
    mounted like systemd would. When XNNPACK starts without /proc/cpuinfo, ProcSubset=pid can go on."""
    assert setting("ProcSubset") == []
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to mount a procfs with subset=pid")
    if not (REPO / "models/kws.tflite").is_file():
        pytest.skip("models/kws.tflite is not built")
    script = (f"mount -t proc -o subset=pid proc /proc || exit 97\n"
              f"exec {sys.executable} -c '{_XNNPACK_PROBE}'")
    hidden = subprocess.run([unshare, "--mount", "--propagation", "private", "sh", "-c", script], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)
    if hidden.returncode == 97 or "unshare failed" in hidden.stderr:
        pytest.skip(f"cannot mount a private procfs here: {hidden.stderr.strip()[:200]}")
    visible = subprocess.run([sys.executable, "-c", _XNNPACK_PROBE], cwd=REPO, capture_output=True, text=True,
                             timeout=120, check=False)
    assert "invoked" in visible.stdout and "invoked" in hidden.stdout, hidden.stderr + visible.stderr
    assert "XNNPACK delegate" in visible.stderr
    assert "XNNPACK delegate" not in hidden.stderr, (
        "XNNPACK now starts without /proc/cpuinfo: ProcSubset=pid can be set in the unit")


def run_install(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(env["SRC"] + "/scripts/install.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def copy_checkout(dest: Path) -> None:
    """The files a fresh clone has (tracked plus new, not ignored), not the dev venv or caches."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    for name in listed.stdout.decode().split("\0"):
        if not name:
            continue
        source = REPO / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


@pytest.mark.slow
def test_install_upgrade_uninstall_into_a_scratch_prefix(tmp_path: Path) -> None:
    """install.sh for real (venv, pip install of the package, unit, config), into temporary paths."""
    src = tmp_path / "src"
    copy_checkout(src)
    root = tmp_path / "root"
    env = {
        **os.environ,
        "SRC": str(src),
        "PREFIX": str(root / "opt/home-agent"),
        "ETC_DIR": str(root / "etc/home-agent"),
        "UNIT_DIR": str(root / "etc/systemd/system"),
        "STATE_DIR": str(root / "var/lib/home-agent"),
        "PYTHON": sys.executable,
        "SKIP_APT": "1",
        "SYSTEMCTL": "",
    }
    venv = root / "opt/home-agent/venv"
    unit = root / "etc/systemd/system/home-agent.service"
    config = root / "etc/home-agent/config.toml"

    first = run_install(env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "nothing started" in first.stdout  # no systemctl here: it says what to do instead
    unit_text = unit.read_text()
    assert f"ExecStart={venv}/bin/home-agent run --config {config}" in unit_text
    assert f"ExecReload={venv}/bin/home-agent check-config --config {config}" in unit_text  # the same file
    assert unit_text.replace(str(venv) + "/", "/opt/home-agent/venv/").replace(
        f"--config {config}", "--config /etc/home-agent/config.toml") == UNIT.read_text()
    version = subprocess.run([str(venv / "bin/home-agent"), "--version"], capture_output=True, text=True,
                             timeout=60, check=True)
    assert version.stdout.startswith("home-agent ")
    # Installed, not editable: the package and the models come from the venv, not from the checkout.
    probe = subprocess.run(
        [str(venv / "bin/python"), "-c",
         "import agent, agent.paths; print(agent.__file__); print(agent.paths.shipped_models_dir())"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True)
    package_file, models_dir = probe.stdout.split()
    assert package_file.startswith(str(venv))
    assert Path(models_dir) == venv / "share/home-agent/models"
    for model in sorted((REPO / "models").glob("*.tflite")):
        assert (Path(models_dir) / model.name).is_file(), f"{model.name} not shipped in the wheel"
    if (REPO / "config.toml").is_file():
        assert config.read_text() == (REPO / "config.toml").read_text()
        checked = subprocess.run([str(venv / "bin/home-agent"), "check-config", "--config", str(config)],
                                 capture_output=True, text=True, timeout=60, check=False)
        assert checked.returncode == 0, checked.stderr
        # An upgrade keeps the person's config.
        config.write_text(config.read_text() + "\n# edited by hand\n")
        second = run_install(env)
        assert second.returncode == 0, second.stdout + second.stderr
        assert config.read_text().endswith("# edited by hand\n")
        assert "keeping your" in second.stdout

    removed = run_install(env, "--uninstall")
    assert removed.returncode == 0, removed.stderr
    assert not unit.exists() and not venv.exists()
    assert (root / "etc/home-agent").is_dir()  # kept without --purge

    purged = run_install(env, "--uninstall", "--purge")
    assert purged.returncode == 0, purged.stderr
    assert not (root / "etc/home-agent").exists()


def test_install_refuses_dangerous_paths(tmp_path: Path) -> None:
    env = {**os.environ, "SRC": str(REPO), "PREFIX": "/", "ETC_DIR": str(tmp_path / "etc/home-agent"),
           "UNIT_DIR": str(tmp_path / "units"), "STATE_DIR": str(tmp_path / "state/home-agent"),
           "SKIP_APT": "1", "SYSTEMCTL": ""}
    result = run_install(env, "--uninstall", "--purge")
    assert result.returncode != 0
    assert "PREFIX must not be '/'" in result.stderr
