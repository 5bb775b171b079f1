"""A private MQTT broker for one bench run: mosquitto on a free 127.0.0.1 port (the machine's own broker
on 1883 is never touched), or the embedded mini broker (scripts/mini_broker.py) where mosquitto is missing
and the bench can do with it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 5.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None)


class BenchBroker:
    """``BenchBroker(workdir)`` starts the broker and returns once it accepts connections; ``stop()`` ends it.
    ``process`` is mosquitto's (None for the embedded broker), ``kind`` says which one runs. ``embedded``:
    the embedded broker even where mosquitto is installed (``scripts/demo.py --embedded-broker``)."""

    def __init__(self, workdir: Path, *, allow_embedded: bool = True, embedded: bool = False) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self._mini: Any = None
        mosquitto = None if embedded else find_mosquitto()
        if mosquitto is None:
            if not (allow_embedded or embedded):
                raise RuntimeError("mosquitto is not installed (make setup installs it where it can)")
            sys.path.insert(0, str(REPO_ROOT / "scripts"))
            from mini_broker import MiniBroker

            self._mini = MiniBroker(port=0)
            self._mini.start()
            self.port: int = self._mini.port
            self.kind = "embedded mini broker"
            return
        self.port = free_port()
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        + ("user root\n" if os.geteuid() == 0 else ""), encoding="utf-8")
        self.process = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        self.kind = "mosquitto"
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:  # a bad config or a taken port: no use waiting
                raise RuntimeError(f"mosquitto exited with status {self.process.returncode} before accepting "
                                   f"connections on port {self.port}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not accept connections on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(5)
        if self._mini is not None:
            self._mini.stop()
