"""Draw the README's pictures (docs/img/) from examples/, through the commands a user runs.

    .venv/bin/python scripts/render_plots.py      # needs the plot extra: pip install -e '.[plot]'

1. ``examples/sensor_living_room.csv``: three days of a living-room temperature every 5 minutes, made here
   (seeded, no recorded data): a daily cycle, sensor noise, and on the third afternoon a heater stuck on for
   two hours. ``examples/sensor_living_room_windows.json`` labels that fault in the NAB layout. Then
   ``home-agent anomaly-score ... --plot docs/img --labels ...`` draws it.
2. ``home-agent transcribe examples/demo_commands.wav --config config.toml --plot docs/img/transcribe.png``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"
IMAGES = REPO_ROOT / "docs" / "img"
SENSOR = EXAMPLES / "sensor_living_room.csv"
WINDOWS = EXAMPLES / "sensor_living_room_windows.json"
START = dt.datetime(2024, 1, 15)
STEP = dt.timedelta(minutes=5)
DAYS = 3
FAULT_START = dt.datetime(2024, 1, 17, 14, 0)
FAULT_HOURS = 2.0
FAULT_RISE = 6.0  # degrees above the normal curve at the end of the fault
MAX_PNG_BYTES = 150_000


def living_room(seed: int = 19) -> list[tuple[str, float]]:
    """(timestamp, °C): 20.5 °C with a 1.5 °C daily swing peaking mid-afternoon, 0.08 °C noise, the fault."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(DAYS * 24 * 12):
        when = START + index * STEP
        hour = when.hour + when.minute / 60
        value = 20.5 + 1.5 * math.sin(2 * math.pi * (hour - 9) / 24) + rng.normal(0, 0.08)
        into_fault = (when - FAULT_START).total_seconds() / 3600
        if 0 <= into_fault < FAULT_HOURS:
            value += FAULT_RISE * into_fault / FAULT_HOURS
        elif FAULT_HOURS <= into_fault < FAULT_HOURS + 1:  # the heater is off again: it cools back
            value += FAULT_RISE * (FAULT_HOURS + 1 - into_fault)
        rows.append((when.strftime("%Y-%m-%d %H:%M:%S"), round(value, 2)))
    return rows


def home_agent(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "agent", "--log-level", "WARNING", *args], cwd=REPO_ROOT,
                   check=True)


def main() -> int:
    rows = living_room()
    SENSOR.write_text("timestamp,value\n" + "".join(f"{t},{v}\n" for t, v in rows), encoding="utf-8")
    end = FAULT_START + dt.timedelta(hours=FAULT_HOURS + 1)
    WINDOWS.write_text(json.dumps({SENSOR.name: [[f"{FAULT_START:%Y-%m-%d %H:%M:%S}.000000",
                                                  f"{end:%Y-%m-%d %H:%M:%S}.000000"]]}, indent=1) + "\n",
                       encoding="utf-8")
    with tempfile.TemporaryDirectory() as scratch:
        home_agent("anomaly-score", "--input", str(SENSOR), "--output", str(Path(scratch) / SENSOR.name),
                   "--plot", str(IMAGES), "--labels", str(WINDOWS))
    home_agent("transcribe", "--config", "config.toml", "--plot", str(IMAGES / "transcribe.png"),
               str(EXAMPLES / "demo_commands.wav"))
    for image in (IMAGES / f"{SENSOR.stem}.png", IMAGES / "transcribe.png"):
        size = image.stat().st_size
        print(f"{image.relative_to(REPO_ROOT)}: {size:,} bytes")
        if size > MAX_PNG_BYTES:
            print(f"{image}: larger than {MAX_PNG_BYTES:,} bytes", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
