"""The artifacts tests/test_release*.py test: the wheel of this checkout and fresh venvs with only that wheel
installed (no extras), one per supported Python, in .cache/release (git-ignored), rebuilt once per session.
conftest starts the builds the session needs in the background (tests/background.py)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import background
from conftest import REPO_ROOT, find_python

CACHE = REPO_ROOT / ".cache" / "release"
DIST = CACHE / "dist"
PYTHONS = ("3.11", "3.13")  # Raspberry Pi OS bookworm and trixie
TIMEOUT = 900.0
_HIDDEN_ENV = {"PYTHONPATH", "VIRTUAL_ENV", "HOME_AGENT_MQTT_PASSWORD", "STATE_DIRECTORY", "NOTIFY_SOCKET"}


def run(*args: str | Path, cwd: Path, timeout: float = 300.0,
        prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """A command with none of the checkout's environment (PYTHONPATH, a venv, the agent's variables)."""
    env = {k: v for k, v in os.environ.items() if k not in _HIDDEN_ENV}
    result = subprocess.run([*prefix, *(str(a) for a in args)], cwd=cwd, env=env, capture_output=True,
                            timeout=timeout, check=False)
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(errors="replace"),
                                       result.stderr.decode(errors="replace"))


def copy_checkout(dest: Path) -> Path:
    """The files a fresh clone has (tracked plus new, not ignored): no venv, caches or build leftovers."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO_ROOT,
                            capture_output=True, check=True)
    for name in listed.stdout.decode().split("\0"):
        source = REPO_ROOT / name
        if name and source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def venv_dir(version: str) -> Path:
    return CACHE / f"venv-py{version}"


def wheel_path() -> Path:
    (path,) = DIST.glob("home_agent-*.whl")
    return path


def _build_wheel() -> str | None:
    """pip's PEP 517 build, as a user's `pip install .` does it, of a clean copy of the checkout (a build/
    folder left in the checkout could carry stale modules into the wheel)."""
    source = CACHE / "src"
    shutil.rmtree(DIST, ignore_errors=True)
    shutil.rmtree(source, ignore_errors=True)
    copy_checkout(source)
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", DIST, source,
                cwd=source, prefix=background.LOW_PRIORITY)
    return None if built.returncode == 0 else f"building the wheel failed:\n{built.stderr[-3000:]}"


def _build_venv(version: str) -> str | None:
    error = wait_wheel()  # queued before every venv job (start_builds, wait_venv): already done here
    if error is not None:
        return error
    python = find_python(version)
    if python is None:
        return f"no Python {version}"
    venv = venv_dir(version)
    shutil.rmtree(venv, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    created = run(python, "-m", "venv", venv, cwd=CACHE, prefix=background.LOW_PRIORITY)
    if created.returncode != 0:
        return f"python{version} -m venv failed:\n{created.stderr[-3000:]}"
    pip = run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel_path(), cwd=CACHE,
              timeout=TIMEOUT, prefix=background.LOW_PRIORITY)
    if pip.returncode != 0:
        return f"pip install {wheel_path().name} on Python {version} failed:\n{pip.stderr[-3000:]}"
    return None


def start_builds(wheel: bool, versions: Iterable[str]) -> None:
    versions = list(versions)
    if wheel or versions:
        background.start("release wheel", _build_wheel)
    for version in versions:
        if find_python(version) is not None:
            background.start(f"release venv {version}", functools.partial(_build_venv, version))


def wait_wheel() -> str | None:
    return background.wait("release wheel", _build_wheel, TIMEOUT)


def wait_venv(version: str) -> str | None:
    error = wait_wheel()
    if error is not None:
        return error
    return background.wait(f"release venv {version}", lambda: _build_venv(version), TIMEOUT * 2)
