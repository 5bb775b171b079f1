"""The one atomic writer: the target is replaced whole or not at all, and no temporary file is left."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.atomic_file import replace_atomically


def test_a_clean_exit_replaces_the_file_with_mode_0600(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    with replace_atomically(target, "w", encoding="utf-8") as handle:
        handle.write("new")
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_an_error_while_writing_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), replace_atomically(target) as handle:
        handle.write(b"half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_missing_folder_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError), replace_atomically(tmp_path / "gone" / "x"):
        pass
