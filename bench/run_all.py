"""``make bench``: run every ``bench/*_bench.py`` module's ``main()`` in turn; each writes its JSON into
``bench/results/``. Exit status 1 when any of them failed (the others still run)."""

from __future__ import annotations

import importlib
import logging
import sys
import time
import traceback
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
# The full one-hour soak is `make soak`; `make bench` keeps to a quick soak so the whole run stays short.
DEFAULT_ARGS: dict[str, list[str]] = {"bench.soak_bench": ["--minutes", "2"]}


def bench_modules() -> list[str]:
    return sorted(f"bench.{path.stem}" for path in BENCH_DIR.glob("*_bench.py"))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    selected = set(argv if argv is not None else sys.argv[1:])  # optional: names to run, e.g. voice_bench
    failed: list[str] = []
    for name in bench_modules():
        if selected and name.split(".")[-1] not in selected:
            continue
        print(f"== {name}", flush=True)
        started = time.monotonic()
        try:
            module = importlib.import_module(name)
            status = module.main(list(DEFAULT_ARGS.get(name, [])))
        except Exception:  # noqa: BLE001 - one broken bench must not hide the others' numbers (traceback shown)
            traceback.print_exc()
            status = 1
        verdict = "ok" if not status else f"FAILED ({status})"
        print(f"== {name}: {verdict} in {time.monotonic() - started:.0f} s", flush=True)
        if status:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
