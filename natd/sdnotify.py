"""sd_notify(3) in pure Python: tell systemd natd is ready, reloading, stopping, alive.

natd runs as a Type=notify service (systemd/natd.service), so systemd considers it started only once the
XDP program is attached (READY=1), can show what it is doing (STATUS=), restarts it when the main loop
stops pinging (WATCHDOG=1 within WatchdogSec=) and knows a SIGHUP reload is in progress (RELOADING=1).

The protocol is one AF_UNIX datagram of newline-separated KEY=VALUE lines sent to $NOTIFY_SOCKET (a
path, or '@name' for the abstract namespace), so a socket call replaces libsystemd and its C binding.
Outside systemd ($NOTIFY_SOCKET unset) every call is a cheap no-op. Sending never raises: a vanished
socket (systemd re-executing, a test harness gone) must not take the NAT gateway down with it; the first
failure is logged as a warning, repeats only at debug level until a send works again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

__all__ = ["Notifier"]

log = logging.getLogger("natd.sdnotify")


def _field_value(value: object) -> str:
    """One line per field: a newline inside a value would start a bogus field, so it becomes a space."""
    if isinstance(value, bool):
        value = int(value)
    return str(value).replace("\r", " ").replace("\n", " ")


class Notifier:
    """A client of systemd's notification socket. Thread-safe; methods return True when a datagram was
    sent, False when notifications are disabled or sending failed."""

    def __init__(self, socket_path: str | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        """``socket_path`` defaults to $NOTIFY_SOCKET; '@name' is an abstract socket. ``clock`` must be
        CLOCK_MONOTONIC in seconds (it stamps RELOADING=1 with MONOTONIC_USEC)."""
        path = os.environ.get("NOTIFY_SOCKET") if socket_path is None else socket_path
        self._clock = clock
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._failing = False
        self._address: str | None = None
        if path:
            if path.startswith("@"):
                self._address = "\0" + path[1:]
            elif path.startswith("/"):
                self._address = path
            else:  # e.g. systemd >= 254's "vsock:CID:PORT", meant for VMs, not for natd
                log.warning("NOTIFY_SOCKET=%s is neither a path nor an abstract socket name; "
                            "systemd notifications are off", path)
        self.socket_path = path or None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    # -- the protocol -----------------------------------------------------------------------------
    def send(self, text: str) -> bool:
        """Send ``text`` as is (one datagram). False if disabled or the send failed."""
        if self._address is None:
            return False
        data = text.encode("utf-8", "replace")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, self._address)
            except OSError as exc:
                level = logging.DEBUG if self._failing else logging.WARNING
                log.log(level, "cannot notify systemd at %s: %s (natd keeps running; further failures "
                        "are logged at debug level)", self.socket_path, exc.strerror or exc)
                self._failing = True
                return False
            if self._failing:
                log.info("systemd notifications to %s work again", self.socket_path)
                self._failing = False
        return True

    def notify(self, **fields: object) -> bool:
        """Send KEY=VALUE fields, in the order given, as one datagram: notify(READY=1, STATUS="up")."""
        return self.send("\n".join(f"{key}={_field_value(value)}" for key, value in fields.items()))

    # -- what natd says ---------------------------------------------------------------------------
    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def reloading(self) -> bool:
        """A reload began; send ready() when it is over. MONOTONIC_USEC goes with RELOADING=1 in the same
        datagram, as Type=notify-reload requires (systemd uses it to tell this reload from older ones)."""
        return self.notify(RELOADING=1, MONOTONIC_USEC=int(self._clock() * 1_000_000))

    def stopping(self) -> bool:
        return self.notify(STOPPING=1)

    def status(self, text: str) -> bool:
        """Free-form status line shown by systemctl status."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """Keep-alive; due at least every WatchdogSec (natd pings every watchdog_interval())."""
        return self.notify(WATCHDOG=1)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the start/stop timeout fires (a slow compile, say)."""
        return self.notify(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000))

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog() pings: half of $WATCHDOG_USEC, as sd_watchdog_enabled(3) advises.
        None when there is no watchdog, or $WATCHDOG_PID names another process (it was meant for a
        parent, say a wrapper script)."""
        pid = os.environ.get("WATCHDOG_PID")
        if pid:
            try:
                if int(pid) != os.getpid():
                    return None
            except ValueError:
                log.warning("ignoring WATCHDOG_PID=%r: not a process id", pid)
                return None
        usec = os.environ.get("WATCHDOG_USEC")
        if not usec:
            return None
        try:
            value = int(usec)
        except ValueError:
            log.warning("ignoring WATCHDOG_USEC=%r: not a number of microseconds", usec)
            return None
        if value <= 0:
            return None
        return value / 2 / 1_000_000

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
