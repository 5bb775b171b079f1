"""Progress bars: drawn with a time estimate on a terminal, silent in logs and CI (stderr not a TTY)."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import TextIO

import pytest

from agent.progress import echo, progress, shown

REPO_ROOT = Path(__file__).resolve().parent.parent
BAR = re.compile(r"work: +\d+%\|.*\| *\d+/5 \[\d\d:\d\d<\d\d:\d\d")  # tqdm: elapsed<remaining (the ETA)


def open_terminal() -> tuple[int, TextIO]:
    """A pseudo-terminal 100 columns wide (a fresh one has no size): (controller fd, terminal stream)."""
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    return controller, os.fdopen(terminal, "w", buffering=1, encoding="utf-8")


def read_all(fd: int) -> str:
    chunks = []
    while select.select([fd], [], [], 0.2)[0]:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the terminal's other side is closed and everything was read
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode("utf-8", "replace")


def test_silent_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    assert not shown(stream)
    assert list(progress(range(5), desc="work", stream=stream)) == [0, 1, 2, 3, 4]
    assert stream.getvalue() == ""
    assert list(progress(iter("abc"), desc="work")) == ["a", "b", "c"]  # the default: sys.stderr, captured
    assert capsys.readouterr().err == ""


def test_bar_with_time_estimate_on_a_terminal() -> None:
    controller, stream = open_terminal()
    try:
        assert shown(stream)
        seen = []
        for item in progress(range(5), desc="work", unit="file", stream=stream):
            time.sleep(0.15)  # past tqdm's redraw interval, so it estimates the time left
            seen.append(item)
        assert seen == [0, 1, 2, 3, 4]
        stream.flush()
        drawn = read_all(controller)
    finally:
        stream.close()
        os.close(controller)
    assert BAR.search(drawn), drawn
    assert "file/s" in drawn or "s/file" in drawn


def test_log_records_and_lines_are_not_torn_by_the_bar(capsys: pytest.CaptureFixture[str]) -> None:
    echo("one line")
    assert capsys.readouterr().out == "one line\n"
    # On a terminal, log records during the bar go through tqdm.write above it and still reach the handler.
    controller, stream = open_terminal()
    logger = logging.getLogger("test_progress")
    root = logging.getLogger()
    handler = logging.StreamHandler(stream)
    root.addHandler(handler)
    try:
        for item in progress(range(3), desc="work", stream=stream):
            logger.warning("item %d", item)
        drawn = read_all(controller)
    finally:
        root.removeHandler(handler)
        stream.close()
        os.close(controller)
    assert all(f"item {i}" in drawn for i in range(3)), drawn


def test_cli_over_many_files_is_quiet_in_logs(tmp_path: Path) -> None:
    """anomaly-score over several files with stderr captured (as in CI): its summary, and no bar."""
    for name in ("a.csv", "b.csv", "c.csv"):
        (tmp_path / name).write_text("timestamp,value\n" + "".join(
            f"{1700000000 + 60 * i},{i % 7}\n" for i in range(50)), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "agent", "--log-level", "WARNING", "anomaly-score",
                             "--input", str(tmp_path), "--output", str(tmp_path / "out")], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "scored 150 rows in 3 files" in result.stderr
    assert "\r" not in result.stderr
    assert "%|" not in result.stderr
