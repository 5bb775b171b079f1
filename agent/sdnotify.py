"""systemd's service notification protocol (sd_notify) in a few lines, without libsystemd.

systemd passes ``$NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for the abstract namespace) to a
``Type=notify`` service; the service sends newline-separated ``KEY=VALUE`` assignments there as one
datagram. Outside systemd the variable is absent and every function here is a no-op returning False.

``ServiceNotifier`` holds the little state the supervisor needs on top: READY=1 only once, STATUS= only
when the text changes, and WATCHDOG=1 at half of ``$WATCHDOG_USEC`` only while the health check passes,
so a wedged pipeline stops petting the watchdog and systemd restarts it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"

# systemd truncates STATUS= for display anyway; a datagram must stay well below the socket's limit.
_MAX_STATUS_CHARS = 400
_SEND_TIMEOUT = 1.0  # seconds

# (healthy, wedged stages) at a monotonic time; an entry may add a reason after the name: "audio: silent".
HealthCheck = Callable[[float], tuple[bool, list[str]]]


def _socket_address(path: str) -> str | None:
    if path.startswith("@"):
        return "\0" + path[1:]  # abstract namespace
    if path.startswith("/"):
        return path
    # vsock:CID:PORT (VM guests) and anything else are not used on a Raspberry Pi.
    log.debug("unsupported NOTIFY_SOCKET %r; notifications disabled", path)
    return None


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send one notification (e.g. ``"READY=1\\nSTATUS=listening"``) to systemd.

    Returns True when the datagram was sent, False outside systemd or when sending failed (logged: a
    lost notification must never take the daemon down)."""
    env = os.environ if environ is None else environ
    path = env.get(NOTIFY_SOCKET_ENV)
    if not path:
        return False
    address = _socket_address(path)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # A datagram to a reader that stopped reading blocks once its queue is full; the main loop
            # must not hang on that.
            sock.settimeout(_SEND_TIMEOUT)
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as err:
        log.warning("sd_notify to %s failed: %s", path, err)
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout systemd enforces (``WatchdogSec=``), in seconds; None when it is off.

    Like ``sd_watchdog_enabled()``: honours ``$WATCHDOG_PID`` (the watchdog belongs to that process only)
    and treats malformed values as "off". Send ``WATCHDOG=1`` at half this interval."""
    env = os.environ if environ is None else environ
    usec_text = env.get(WATCHDOG_USEC_ENV)
    if not usec_text:
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        log.warning("ignoring malformed %s=%r", WATCHDOG_USEC_ENV, usec_text)
        return None
    if usec <= 0:
        return None
    pid_text = env.get(WATCHDOG_PID_ENV)
    if pid_text:
        try:
            if int(pid_text) != os.getpid():
                return None
        except ValueError:
            log.warning("ignoring malformed %s=%r", WATCHDOG_PID_ENV, pid_text)
            return None
    return usec / 1_000_000


def _clean_status(text: str) -> str:
    # One line: a newline would start a new KEY=VALUE assignment.
    return " ".join(text.split())[:_MAX_STATUS_CHARS]


def ready(status_text: str | None = None) -> bool:
    """``READY=1``: start-up is complete (systemctl start returns, dependants start)."""
    message = "READY=1"
    if status_text:
        message += f"\nSTATUS={_clean_status(status_text)}"
    return notify(message)


def status(text: str) -> bool:
    """``STATUS=``: one line a person reads in ``systemctl status``."""
    return notify(f"STATUS={_clean_status(text)}")


def watchdog() -> bool:
    """``WATCHDOG=1``: the service is alive; systemd restarts it when this stops for ``WatchdogSec=``."""
    return notify("WATCHDOG=1")


def stopping(status_text: str | None = None) -> bool:
    """``STOPPING=1``: shutdown has begun."""
    message = "STOPPING=1"
    if status_text:
        message += f"\nSTATUS={_clean_status(status_text)}"
    return notify(message)


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares ``MONOTONIC_USEC=`` against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def reloading(status_text: str | None = None) -> bool:
    """``RELOADING=1`` with ``MONOTONIC_USEC=`` (systemd >= 253 requires it with Type=notify-reload and
    older versions ignore it). Send ``READY=1`` (``ready()``) once the reload is done, valid or not."""
    message = f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}"
    if status_text:
        message += f"\nSTATUS={_clean_status(status_text)}"
    return notify(message)


# syslog priorities journald reads from a "<N>" line prefix (SyslogLevelPrefix=yes, the default).
_JOURNAL_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


class JournalFormatter(logging.Formatter):
    """Log lines for journald: its own time stamps, the level as a priority (``journalctl -p warning``)."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in _JOURNAL_PRIORITIES if record.levelno >= level), 7)
        return f"<{priority}>{super().format(record)}"


def stderr_is_journal(environ: Mapping[str, str] | None = None) -> bool:
    """True when systemd connected stderr to the journal (``$JOURNAL_STREAM`` names its device:inode)."""
    env = os.environ if environ is None else environ
    stream = env.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        info = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


class ServiceNotifier:
    """The supervisor's link to systemd: call ``tick(now)`` from the main loop, as often as it turns.

    - ``ready()`` sends READY=1 once (later calls only update STATUS=);
    - ``status()`` sends STATUS= only when the text changed;
    - ``tick()`` sends WATCHDOG=1 every half watchdog interval while ``health_check(now)`` passes. When
      it fails the ping is withheld (systemd will restart us after ``WatchdogSec=``), the wedged stages
      are logged once and shown in STATUS=.
    """

    def __init__(self, health_check: HealthCheck | None = None, environ: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        env = os.environ if environ is None else environ
        self._env: Mapping[str, str] = env
        self._health_check = health_check
        self._clock = clock
        self.enabled = bool(env.get(NOTIFY_SOCKET_ENV))
        timeout = watchdog_interval(env)
        self.watchdog_timeout = timeout
        self.ping_interval = timeout / 2 if timeout is not None else None
        self.is_ready = False
        self.watchdog_pings = 0
        self.watchdog_withheld = 0
        self._last_status: str | None = None
        self._next_ping: float | None = None
        self._wedged: tuple[str, ...] = ()
        self._status_before_wedge: str | None = None

    def _send(self, message: str) -> bool:
        return notify(message, self._env) if self.enabled else False

    def set_health_check(self, health_check: HealthCheck | None) -> None:
        self._health_check = health_check

    def ready(self, status_text: str | None = None) -> bool:
        """READY=1 once; afterwards the same as ``status()``."""
        if self.is_ready:
            return self.status(status_text) if status_text else False
        self.is_ready = True
        message = "READY=1"
        if status_text:
            self._last_status = _clean_status(status_text)
            message += f"\nSTATUS={self._last_status}"
        log.debug("sd_notify: %s", message.replace("\n", "; "))
        return self._send(message)

    def status(self, text: str) -> bool:
        clean = _clean_status(text)
        if self._wedged:
            self._status_before_wedge = clean  # shown again once the pipeline recovers
            return False
        if clean == self._last_status:
            return False
        self._last_status = clean
        return self._send(f"STATUS={clean}")

    def stopping(self, status_text: str = "stopping") -> bool:
        clean = _clean_status(status_text)
        self._last_status = clean
        return self._send(f"STOPPING=1\nSTATUS={clean}")

    def reloading(self, status_text: str = "reloading configuration") -> bool:
        clean = _clean_status(status_text)
        self._last_status = clean
        return self._send(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}\nSTATUS={clean}")

    def reloaded(self, status_text: str) -> bool:
        """READY=1 after a reload (whether the new config was taken or rejected)."""
        clean = _clean_status(status_text)
        self._last_status = clean
        return self._send(f"READY=1\nSTATUS={clean}")

    def tick(self, now: float | None = None) -> bool:
        """Pet the watchdog when it is due and the pipeline is healthy. Returns True when a ping was sent."""
        if self.ping_interval is None:
            return False
        now = self._clock() if now is None else now
        # A tick that comes a little early (timer jitter) still pings; otherwise one would be skipped.
        if self._next_ping is not None and now < self._next_ping - 0.05 * self.ping_interval:
            return False
        ok, wedged = self._health_check(now) if self._health_check is not None else (True, [])
        if not ok:
            self._next_ping = now + min(self.ping_interval, 1.0)  # re-check soon: recovery resumes pings
            self.watchdog_withheld += 1
            # Log once per set of wedged stages, not every time the reasons' "for N s" changes.
            stages = tuple(item.split(":", 1)[0] for item in wedged)
            if stages != self._wedged:
                self._wedged = stages
                self._status_before_wedge = self._last_status
                text = _clean_status("unhealthy, watchdog withheld: " + ", ".join(wedged))
                log.error("pipeline wedged (%s); not petting the systemd watchdog, a restart will follow",
                          ", ".join(wedged))
                self._last_status = text
                self._send(f"STATUS={text}")
            return False
        if self._wedged:
            log.warning("pipeline healthy again (%s recovered)", ", ".join(self._wedged))
            self._wedged = ()
            if self._status_before_wedge is not None:
                self._last_status = None
                self.status(self._status_before_wedge)
        # On schedule (no drift from early or late ticks), unless a ping is overdue by a whole interval.
        interval = self.ping_interval
        due = self._next_ping
        self._next_ping = (due if due is not None and now - due < interval else now) + interval
        self.watchdog_pings += 1
        return self._send("WATCHDOG=1")
