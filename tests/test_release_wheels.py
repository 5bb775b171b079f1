"""Raspberry Pi wheels: every runtime dependency resolves to a binary wheel for 64-bit Raspberry Pi OS, i.e.
Linux aarch64 with CPython 3.11 (bookworm, glibc 2.36) and CPython 3.13 (trixie, glibc 2.41). A Pi has no
compiler toolchain to speak of, and an sdist that builds for minutes (or needs scipy) is what this guards
against. The dependencies are read from the built wheel's metadata: what pip on the Pi would ask for.

Needs PyPI: skipped offline.
"""

from __future__ import annotations

import socket
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from release_build import run
from test_release import wheel  # noqa: F401 - wheel is a fixture

pytestmark = [pytest.mark.network, pytest.mark.release, pytest.mark.slow]

# (Python, newest glibc of the Raspberry Pi OS release that ships it)
TARGETS = {"3.11": (2, 36), "3.13": (2, 41)}


def pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError:
        return False
    return True


def manylinux_platforms(glibc: tuple[int, int]) -> list[str]:
    """Every manylinux tag a glibc of that version accepts on aarch64 (2_17 is the oldest aarch64 has)."""
    tags = [f"manylinux_2_{minor}_aarch64" for minor in range(17, glibc[1] + 1)]
    return ["manylinux2014_aarch64", *tags]


def runtime_requirements(wheel_path: Path) -> list[str]:
    with zipfile.ZipFile(wheel_path) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(name).decode())
    requirements = metadata.get_all("Requires-Dist") or []
    return [r for r in requirements if "extra ==" not in r]


def test_the_runtime_requirements_are_what_pyproject_lists(wheel: Path) -> None:  # noqa: F811
    names = {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
             for r in runtime_requirements(wheel)}
    assert {"numpy", "ai-edge-litert", "paho-mqtt", "pydantic"} <= names
    assert not names & {"scipy", "python-speech-features", "python_speech_features", "tensorflow"}


@pytest.mark.parametrize("python", sorted(TARGETS))
def test_every_runtime_dependency_has_an_aarch64_wheel(python: str, wheel: Path,  # noqa: F811
                                                       tmp_path: Path) -> None:
    if not pypi_reachable():
        pytest.skip("offline: pypi.org:443 is not reachable, cannot resolve aarch64 wheels")
    platforms = manylinux_platforms(TARGETS[python])
    assert "manylinux_2_27_aarch64" in platforms  # the only tag ai-edge-litert 2.x publishes
    # Markers are evaluated for this machine (x86_64); ai-edge-litert's marker accepts aarch64 alike.
    args: list[str | Path] = [sys.executable, "-m", "pip", "download", "--only-binary=:all:",
                              "--python-version", python, "--implementation", "cp", "--dest", tmp_path]
    for platform in platforms:
        args += ["--platform", platform]
    result = run(*args, *runtime_requirements(wheel), cwd=tmp_path, timeout=600)
    assert result.returncode == 0, f"cp{python} aarch64:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
    files = sorted(p.name for p in tmp_path.iterdir())
    assert all(name.endswith(".whl") for name in files), files
    tag = f"cp{python.replace('.', '')}"
    litert = [f for f in files if f.startswith("ai_edge_litert-")]
    assert litert and tag in litert[0] and "aarch64" in litert[0], files
    for name in files:  # each wheel is pure Python, or built for aarch64
        assert name.endswith(("-none-any.whl", "_aarch64.whl")), name
