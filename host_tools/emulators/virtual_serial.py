"""A virtual serial line: two linked pseudo-terminals joined by socat.

Why socat rather than one os.openpty() pair: both ends get a path, so the emulator opens one
end and the firmware opens the other exactly as it would open /dev/ttyUSB0 — nothing in the
driver knows it is on a bench. What a pty pair cannot model (baud timing, RS-485 half duplex,
the driver-enable pin) belongs to the real bench.

Frame trace: with ``trace_path=`` socat also writes every chunk it moves, in hex with its
direction and a timestamp (``socat -x``), to that file; :meth:`VirtualSerialLine.trace_records`
parses it and :meth:`VirtualSerialLine.read_trace` formats it (the HIL rig attaches it to each
test's report). A chunk is what one read() on a pty returned, not necessarily one frame.
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class VirtualSerialError(RuntimeError):
    pass


TO_EMULATOR = "dgc>dev"  # written at the device end (by the firmware), read at the emulator end
TO_DEVICE = "dev>dgc"  # written at the emulator end, read by the firmware
# socat -x: "< 2026/11/21 06:26:57.000732623  length=8 from=0 to=7", then the bytes in hex on
# the next line. '<' is data from socat's second address (the device end) to its first.
_TRACE_HEADER = re.compile(r"^([<>]) (\S+ \S+)\s+length=(\d+) from=\d+ to=\d+$")


@dataclass(frozen=True)
class TraceRecord:
    """One chunk socat moved: ``direction`` is TO_EMULATOR or TO_DEVICE, ``at`` socat's
    timestamp as printed (local time), ``data`` the bytes."""

    direction: str
    at: str
    data: bytes

    @property
    def time_of_day(self) -> str:
        """HH:MM:SS.ffffff. socat 1.7.x prints microseconds zero-padded to 9 digits
        ("06:26:57.000732623" is 0.732623 s past the second): shown as 6 digits here."""
        clock = self.at.split(" ")[-1]
        head, _, fraction = clock.partition(".")
        if len(fraction) == 9 and fraction.startswith("000") and _socat_prints_usec():
            return f"{head}.{fraction[3:]}"
        return clock

    def describe(self, text: bool = False, max_data: int = 256) -> str:
        """One line: time, direction, length, the bytes in hex (at most ``max_data`` of them)."""
        shown = self.data[:max_data]
        line = f"{self.time_of_day} {self.direction} {len(self.data):4d} B: {shown.hex(' ')}"
        if len(shown) < len(self.data):
            line += f" ... (+{len(self.data) - len(shown)} B)"
        if text:
            line += "  |" + "".join(chr(b) if 32 <= b < 127 else "." for b in shown) + "|"
        return line


_SOCAT_USEC: bool | None = None


def _socat_prints_usec() -> bool:
    global _SOCAT_USEC
    if _SOCAT_USEC is None:
        socat = shutil.which("socat")
        try:
            out = subprocess.run([socat, "-V"], capture_output=True, text=True, timeout=5).stdout if socat else ""
        except (OSError, subprocess.SubprocessError):
            out = ""
        _SOCAT_USEC = bool(re.search(r"socat version 1\.7\.", out))
    return _SOCAT_USEC


def parse_socat_trace(text: str) -> list[TraceRecord]:
    """The records of a ``socat -x`` trace; a record cut short (socat still writing, or the file
    read from the middle) is left out, and socat's own messages are skipped."""
    records: list[TraceRecord] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = _TRACE_HEADER.match(line)
        if match is None or i + 1 >= len(lines):
            continue
        try:
            data = bytes.fromhex(lines[i + 1])
        except ValueError:
            continue
        if len(data) != int(match.group(3)):
            continue
        records.append(TraceRecord(TO_EMULATOR if match.group(1) == "<" else TO_DEVICE, match.group(2), data))
    return records


class VirtualSerialLine:
    """``device_end`` is where the firmware connects; ``emulator_end`` is where an emulator serves.

    Use as a context manager; the socat process is stopped and both links removed on exit.
    ``trace_path``: also record every byte on the line there (see the module docstring); the
    file is kept after :meth:`stop` and appended to if the line is started again.
    """

    def __init__(self, device_end: Path | str, emulator_end: Path | str | None = None, *, start_timeout_s: float = 5.0,
                 trace_path: Path | str | None = None):
        self.device_end = Path(device_end)
        self.emulator_end = Path(emulator_end) if emulator_end else self.device_end.with_name(self.device_end.name + ".emu")
        self.trace_path = Path(trace_path) if trace_path else None
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
        trace = None
        if self.trace_path is not None:
            self.trace_path.parent.mkdir(parents=True, exist_ok=True)
            trace = open(self.trace_path, "ab")  # socat's stderr; socat writes it unbuffered
        try:
            self._process = subprocess.Popen(
                [
                    socat,
                    "-d",
                    *(["-x"] if trace is not None else []),
                    f"pty,raw,echo=0,link={self.emulator_end}",
                    f"pty,raw,echo=0,link={self.device_end}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=trace if trace is not None else subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C meant for the caller must not kill the line first
            )
        finally:
            if trace is not None:
                trace.close()  # socat holds its own copy
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

    def trace_records(self, max_bytes: int | None = None) -> list[TraceRecord]:
        """What went over the line so far (all of it, or what the last ``max_bytes`` of the
        trace file hold); [] without ``trace_path``."""
        if self.trace_path is None or not self.trace_path.exists():
            return []
        with open(self.trace_path, "rb") as fh:
            if max_bytes is not None:
                fh.seek(0, 2)
                fh.seek(max(0, fh.tell() - max_bytes))
            text = fh.read().decode("ascii", "replace")
        return parse_socat_trace(text)

    def read_trace(self, max_chars: int = 8192, *, text: bool = False) -> str:
        """The line's trace, one chunk per line (time, direction, length, hex; with ``text`` an
        ASCII rendering too), keeping the newest chunks within ``max_chars``."""
        records = self.trace_records(max_bytes=max(64 * 1024, 8 * max_chars))
        lines: list[str] = []
        size = 0
        for kept, record in enumerate(reversed(records)):
            line = record.describe(text)
            if not lines and len(line) >= max_chars:
                line = line[:max(0, max_chars - 5)] + " ..."
            if size + len(line) + 1 > max_chars:
                lines.append(f"... {len(records) - kept} earlier chunk(s) left out")
                break
            lines.append(line)
            size += len(line) + 1
        return "\n".join(reversed(lines))
