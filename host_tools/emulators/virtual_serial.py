"""A virtual serial line: two linked pseudo-terminals joined by socat.

Why socat rather than one os.openpty() pair: both ends get a path, so the emulator opens one
end and the firmware opens the other exactly as it would open /dev/ttyUSB0 — nothing in the
driver knows it is on a bench. What a pty pair cannot model (baud timing, RS-485 half duplex,
the driver-enable pin) belongs to the real bench.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)


class VirtualSerialError(RuntimeError):
    pass


class VirtualSerialLine:
    """``device_end`` is where the firmware connects; ``emulator_end`` is where an emulator serves.

    Use as a context manager; the socat process is stopped and both links removed on exit.
    """

    def __init__(self, device_end: Path | str, emulator_end: Path | str | None = None, *, start_timeout_s: float = 5.0):
        self.device_end = Path(device_end)
        self.emulator_end = Path(emulator_end) if emulator_end else self.device_end.with_name(self.device_end.name + ".emu")
        self._start_timeout_s = start_timeout_s
        self._process: subprocess.Popen | None = None

    def start(self) -> "VirtualSerialLine":
        socat = shutil.which("socat")
        if socat is None:
            raise VirtualSerialError("socat not found: install it (Debian package 'socat'; `make test` does this)")
        for path in (self.device_end, self.emulator_end):
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink() or path.exists():
                path.unlink()
        self._process = subprocess.Popen(
            [
                socat,
                "-d",
                f"pty,raw,echo=0,link={self.emulator_end}",
                f"pty,raw,echo=0,link={self.device_end}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C meant for the caller must not kill the line first
        )
        deadline = time.monotonic() + self._start_timeout_s
        while not (self.device_end.exists() and self.emulator_end.exists()):
            if self._process.poll() is not None:
                raise VirtualSerialError(f"socat exited with status {self._process.returncode} before linking {self.device_end}")
            if time.monotonic() > deadline:
                self.stop()
                raise VirtualSerialError(f"socat did not create {self.device_end} within {self._start_timeout_s} s")
            time.sleep(0.01)
        log.debug("virtual serial line %s <-> %s", self.device_end, self.emulator_end)
        return self

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        for path in (self.device_end, self.emulator_end):
            if path.is_symlink():
                path.unlink(missing_ok=True)

    def __enter__(self) -> "VirtualSerialLine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None
