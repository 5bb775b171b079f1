"""The Home Assistant venvs of tests/test_ha_acceptance.py: which releases, where, and their installation.

Installing one takes 100-170 s of mostly pip download and unpacking; conftest starts the installs the
session needs in the background (tests/background.py). A venv counts as installed once the harness finished
successfully (a stamp file), so an interrupted install is redone rather than half used.
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import background
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


def _install(release: HaRelease, python: Path) -> str | None:
    if release.stamp.exists():
        return None
    run_dir = REPO_ROOT / ".cache" / "ha-run" / f"install-{os.getpid()}"
    try:
        done = subprocess.run([*background.LOW_PRIORITY, str(HARNESS), "install"],
                              env=release.env(python, run_dir),
                              capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return f"no result after {INSTALL_TIMEOUT:.0f} s"
    if done.returncode != 0:
        lines = [line for line in (done.stdout + done.stderr).splitlines()
                 if not line.startswith("WARNING: Location")]  # pip's noise about the extra indexes
        return f"exit status {done.returncode}:\n" + "\n".join(lines)[-3000:]
    release.stamp.touch()
    return None


def start_installs(releases: Iterable[HaRelease]) -> None:
    """Start installing each release that is not installed yet (and has its Python here)."""
    if not HARNESS.exists():
        return
    for release in releases:
        python = find_python(release.python)
        if python is not None and not release.stamp.exists():
            background.start(f"install HA {release.version}", functools.partial(_install, release, python))


def wait_installed(release: HaRelease, python: Path) -> str | None:
    """Install ``release`` (or wait for its background install); None when ready, else the error."""
    return background.wait(f"install HA {release.version}", lambda: _install(release, python),
                           INSTALL_TIMEOUT + 60)
