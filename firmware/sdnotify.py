"""sd_notify(3) without libsystemd: one AF_UNIX datagram per message to ``$NOTIFY_SOCKET``.

Why our own few lines: the protocol is one datagram of newline-separated ``KEY=VALUE`` lines,
and the binding packages need libsystemd headers to build on the Pi for nothing we would use.
Without ``NOTIFY_SOCKET`` (a shell, a test, the bench) every call is a no-op that returns False,
so the daemon runs the same everywhere. A failed send is logged once and never raised: telling
systemd how we are must never be the reason the daemon stops.

Watchdog: systemd passes ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, the pid meant) when the unit
has ``WatchdogSec=``; :attr:`Notifier.watchdog_interval_s` is half of it, the interval sd_watchdog_enabled(3)
recommends for ``WATCHDOG=1``. Whether to send it is the caller's decision (the daemon sends it
only while its health check passes, so a hung or sick daemon is restarted).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Mapping

log = logging.getLogger(__name__)


def _socket_address(value: str) -> str | bytes | None:
    """A filesystem path, or an abstract-namespace name written with a leading '@'."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode("utf-8")
    return None


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(raw) if raw else None
        if raw and self._address is None:
            log.warning("NOTIFY_SOCKET=%r ignored: expected an absolute path or '@' and an abstract socket name", raw)
        self._watchdog_usec: int | None = None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self._watchdog_usec = int(usec)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._failing = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Half of systemd's WatchdogSec=, or None when no watchdog is configured for this process."""
        return self._watchdog_usec / 2_000_000 if self._watchdog_usec else None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; True if it was sent."""
        if self._address is None or not assignments:
            return False
        data = "\n".join(assignments).encode("utf-8", errors="replace")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, self._address)
            except OSError as exc:
                if not self._failing:
                    log.warning("sd_notify to %s failed (%s); systemd will not see this status", self._printable(), exc)
                self._failing = True
                return False
            if self._failing:
                log.info("sd_notify to %s works again", self._printable())
            self._failing = False
            return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([_status(status)] if status else []))

    def watchdog(self, status: str | None = None) -> bool:
        return self.notify("WATCHDOG=1", *([_status(status)] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(_status(text))

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([_status(status)] if status else []))

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _printable(self) -> str:
        address = self._address
        return "@" + address[1:].decode("utf-8", "replace") if isinstance(address, bytes) else str(address)


def _status(text: str) -> str:
    """STATUS= is one line: newlines would start a new (bogus) assignment."""
    return "STATUS=" + " ".join(text.split())
