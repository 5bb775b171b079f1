"""Atomic file replacement: the one way the agent writes a file that must never be seen half written.

The content goes to a temporary file in the target's folder (created mode 0600 by ``mkstemp``), is flushed
and fsync'ed, and is renamed over the target. A crash or an error leaves the old file (or none) and no
temporary file behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def replace_atomically(path: Path, mode: str = "wb", **open_args: Any) -> Iterator[IO[Any]]:
    """Yield a handle on a temporary file beside ``path``; on a clean exit it replaces ``path``.

    ``open_args`` go to ``open`` (encoding, newline). Raises OSError; callers turn it into their own error.
    """
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_args) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
