"""What the repository ships carries no machine's absolute paths: bench results are written relative to it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import REPO_ROOT

from bench.results_file import repo_relative, write_results


def strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for item in value.values() for s in strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    return [value] if isinstance(value, str) else []


def test_absolute_paths_become_repository_relative(tmp_path: Path) -> None:
    results = {"data_dir": str(REPO_ROOT.parent / "shared" / "data" / "speech"),
               "model": REPO_ROOT / "models" / "kws.tflite",
               "runs": [{"audio": f"{REPO_ROOT}/examples/demo_commands.wav", "unit": "CPU s/s"}],
               "relative": "models/kws.tflite", "count": 3}
    assert repo_relative(results) == {
        "data_dir": "../shared/data/speech", "model": "models/kws.tflite",
        "runs": [{"audio": "examples/demo_commands.wav", "unit": "CPU s/s"}],
        "relative": "models/kws.tflite", "count": 3}
    out = tmp_path / "results" / "x.json"
    write_results(out, results)
    assert json.loads(out.read_text())["data_dir"] == "../shared/data/speech"


def test_committed_bench_results_hold_no_absolute_paths() -> None:
    files = sorted((REPO_ROOT / "bench" / "results").glob("*.json"))
    assert files
    for path in files:
        absolute = [s for s in strings(json.loads(path.read_text())) if s.startswith("/")]
        assert absolute == [], f"{path.name}: {absolute}"
