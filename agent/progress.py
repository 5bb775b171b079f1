"""Progress of long work (training stages, synthesis, many files): a tqdm bar with rate and time estimate
when stderr is a terminal, nothing at all otherwise, so logs, pipes, CI and the journal stay clean.

tqdm comes with ai-edge-litert (one of its requirements), so the runtime needs nothing extra for it.
While a bar is shown, log records and :func:`echo` lines are written above it instead of through it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

T = TypeVar("T")


def shown(stream: TextIO | None = None) -> bool:
    """Whether progress goes to ``stream`` (default stderr): only when it is a terminal."""
    target = stream if stream is not None else sys.stderr
    isatty = getattr(target, "isatty", None)
    return bool(isatty is not None and isatty())


def progress(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it",
             stream: TextIO | None = None) -> Iterator[T]:
    """``items``, drawing a bar with the time estimate on ``stream`` (default stderr) when it is a terminal.
    ``total`` defaults to ``len(items)`` when it has one."""
    target = stream if stream is not None else sys.stderr
    if not shown(target):
        yield from items
        return
    bar = tqdm(items, total=total, desc=desc, unit=unit, file=target, leave=False, dynamic_ncols=True)
    with logging_redirect_tqdm(tqdm_class=tqdm), bar:
        yield from bar


def echo(line: str, stream: TextIO | None = None) -> None:
    """Write one line to ``stream`` (default stdout) without tearing a progress bar that is being drawn."""
    target = stream if stream is not None else sys.stdout
    tqdm.write(line, file=target)
    target.flush()
