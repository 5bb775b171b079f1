"""The Home Assistant venvs of tests/test_ha_acceptance.py: which releases, where, and their installation.

Installing one takes 100-170 s of mostly pip download and unpacking. conftest starts the installs the
session will need in background threads as soon as collection is done, so they overlap the tests that run
before the acceptance tests instead of adding to the suite's time; the fixture then waits for its release.
A venv counts as installed once the harness finished successfully (a stamp file), so an interrupted install
is redone rather than half used.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO_ROOT, find_python

SHARED_DIR = Path(os.environ.get("SHARED_DIR", REPO_ROOT.parent / "shared"))
HARNESS = SHARED_DIR / "tools" / "ha" / "ha_harness.sh"
INSTALL_TIMEOUT = 1200.0


@dataclass(frozen=True)
class HaRelease:
    """One Home Assistant release the harness can install: its venv here, its Python, its lock file."""

    version: str
    python: str
    venv: Path
    lock: Path | None  # None: the harness's default (its 2024.3.3 lock)

    @property
    def stamp(self) -> Path:
        return self.venv / ".home-agent-installed"

    def env(self, python: Path, run_dir: Path) -> dict[str, str]:
        # Not our PYTHONPATH: HA's venv must not see this checkout (pip check would judge home-agent's needs).
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(HA_VENV=str(self.venv), HA_RUN_DIR=str(run_dir), HA_PYTHON=str(python))
        if self.lock is not None:
            env["HA_LOCK"] = str(self.lock)
        return env


HA_RELEASES = (
    HaRelease("2024.3.3", "3.11", REPO_ROOT / ".cache" / "ha-venv", None),
    HaRelease("2025.4.4", "3.13", REPO_ROOT / ".cache" / "ha2025-venv",
              HARNESS.parent / "ha2025" / "requirements-ha-2025.4.4.lock.txt"),
)


class _Install(threading.Thread):
    def __init__(self, release: HaRelease, python: Path) -> None:
        super().__init__(name=f"install HA {release.version}", daemon=True)
        self.release, self.python = release, python
        self.error: str | None = None

    def run(self) -> None:
        run_dir = REPO_ROOT / ".cache" / "ha-run" / f"install-{os.getpid()}"
        try:
            done = subprocess.run([str(HARNESS), "install"], env=self.release.env(self.python, run_dir),
                                  capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            self.error = f"no result after {INSTALL_TIMEOUT:.0f} s"
            return
        if done.returncode != 0:
            lines = [line for line in (done.stdout + done.stderr).splitlines()
                     if not line.startswith("WARNING: Location")]  # pip's noise about the extra indexes
            self.error = f"exit status {done.returncode}:\n" + "\n".join(lines)[-3000:]
            return
        self.release.stamp.touch()


_installs: dict[str, _Install] = {}
_lock = threading.Lock()


def start_installs(releases: Iterable[HaRelease]) -> None:
    """Start installing each release that is not installed yet (and has its Python here)."""
    if not HARNESS.exists():
        return
    with _lock:
        for release in releases:
            python = find_python(release.python)
            if release.stamp.exists() or python is None or release.version in _installs:
                continue
            _installs[release.version] = install = _Install(release, python)
            install.start()


def wait_installed(release: HaRelease, python: Path) -> str | None:
    """Install ``release`` (or wait for its background install); None when ready, else the error."""
    if release.stamp.exists():
        return None
    with _lock:
        install = _installs.get(release.version)
        if install is None:
            _installs[release.version] = install = _Install(release, python)
            install.start()
    install.join(INSTALL_TIMEOUT + 60)
    if install.is_alive():
        return "the install is still running"
    return install.error
