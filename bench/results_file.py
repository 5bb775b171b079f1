"""Writing ``bench/results/*.json``: paths in the results are made relative to the repository, so the
committed figures carry no machine's folder names (``/work/shared/data/speech`` -> ``../shared/data/speech``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def repo_relative(value: Any) -> Any:
    """``value`` with every absolute path (a ``Path``, or a string starting with "/") rewritten relative to
    the repository, inside dicts, lists and tuples too."""
    if isinstance(value, dict):
        return {key: repo_relative(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [repo_relative(item) for item in value]
    if isinstance(value, Path) or (isinstance(value, str) and value.startswith("/")):
        path = Path(value)
        return os.path.relpath(path, REPO_ROOT) if path.is_absolute() else str(path)
    return value


def write_results(path: Path, results: dict[str, Any], indent: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(repo_relative(results), indent=indent) + "\n", encoding="utf-8")
