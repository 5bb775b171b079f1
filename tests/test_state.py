"""The persistent key/value store: round trip, atomic replace, corrupt files moved aside, unusable dirs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from agent.errors import StateError
from agent.state import StateStore


def test_round_trip_and_survives_reopen(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    assert store.get("muted", False) is False
    store.set("muted", True)
    store.set("nested", {"a": [1, 2]})
    value = store.get("nested")
    value["a"].append(3)  # a copy: the store is not changed behind its back
    reopened = StateStore(tmp_path / "state")
    assert reopened.get("muted") is True
    assert reopened.get("nested") == {"a": [1, 2]}
    written = json.loads((tmp_path / "state" / "state.json").read_text())
    assert written == {"muted": True, "nested": {"a": [1, 2]}}
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["state.json"]  # no temp files left


@pytest.mark.parametrize("content", [b'{"muted": tru', b"[1, 2]", b"\xff\xfe not utf-8", b""])
def test_corrupt_file_is_moved_aside(tmp_path: Path, content: bytes,
                                     caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "state.json").write_bytes(content)
    with caplog.at_level(logging.ERROR):
        store = StateStore(tmp_path)
    assert store.snapshot() == {}
    aside = list(tmp_path.glob("state.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert "corrupt" in caplog.text and str(aside[0]) in caplog.text
    store.set("muted", False)
    assert json.loads((tmp_path / "state.json").read_text()) == {"muted": False}


def test_unusable_directory_is_a_state_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StateError, match="cannot create the state directory"):
        StateStore(blocker / "state")


def test_write_failure_raises_but_keeps_value_in_memory(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    (tmp_path / "state").rename(tmp_path / "gone")  # the folder disappears under the running daemon
    with pytest.raises(StateError, match="cannot write state"):
        store.set("muted", True)
    assert store.get("muted") is True
