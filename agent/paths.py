"""Where shipped files (models) live, wherever the package is installed."""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent


def shipped_models_dir() -> Path:
    """``models/`` of a source checkout, else ``<prefix>/share/home-agent/models`` of an installed wheel."""
    checkout = REPO_ROOT / "models"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "home-agent" / "models"


def resolve_data_path(path: Path, config_dir: Path | None = None) -> Path:
    """Resolve a configured path: absolute as is; else relative to the config file's folder, the current
    folder, or (for ``models/...``) the shipped models.

    Returns the first candidate that exists, else the first guess (so the error names a sensible path)."""
    if path.is_absolute():
        return path
    candidates: list[Path] = []
    if config_dir is not None:
        candidates.append(config_dir / path)
    candidates.append(Path.cwd() / path)
    candidates.append(REPO_ROOT / path)
    candidates.append(shipped_models_dir() / path.name)
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return candidates[0]
