"""`dgc-host console`: the engineer's end of the board's serial console (pyserial).

Interactive (the default): every line from the board is shown with the host's timestamp (the
board's own lines carry the board's UTC time, so a clock problem is visible at a glance), and
every line typed is sent to the board. Non-interactive, for scripts and tests::

    dgc-host console --port /dev/ttyUSB0 --send status --expect "^health: ok" --timeout 10

sends the line(s), prints every line received with its timestamp, and exits 0 as soon as a line
matches the regular expression, 1 if none did within the timeout. ``--log FILE`` appends
everything received (and sent, marked ``>>``) to a file in both modes.

Exit status: 0 ok / matched; 1 the port could not be used or nothing matched; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import TextIO

from .cli_support import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK

BAUDRATES = (9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)


def _stamp() -> str:
    return datetime.now().strftime("%H:%M:%S.%f")[:-3]


class Transcript:
    """Lines from the board -> stdout (and the log file), with host timestamps."""

    def __init__(self, out: TextIO, log_path: Path | None):
        self.out = out
        self.log = open(log_path, "a", encoding="utf-8") if log_path else None
        self.lock = threading.Lock()

    def received(self, line: str) -> None:
        self._write(f"{_stamp()} {line}")

    def sent(self, line: str) -> None:
        self._write(f"{_stamp()} >> {line}", to_stdout=False)

    def _write(self, text: str, to_stdout: bool = True) -> None:
        with self.lock:
            if to_stdout:
                self.out.write(text + "\n")
                self.out.flush()
            if self.log:
                self.log.write(text + "\n")
                self.log.flush()

    def close(self) -> None:
        if self.log:
            self.log.close()


class LineReader:
    """Bytes from the port -> decoded lines (CR, LF or CRLF end a line; undecodable bytes shown as U+FFFD)."""

    def __init__(self):
        self._buffer = b""

    def feed(self, data: bytes) -> list[str]:
        self._buffer += data
        parts = re.split(rb"\r\n|\r|\n", self._buffer)
        self._buffer = parts.pop()
        return [p.decode("utf-8", errors="replace") for p in parts if p]


def _open(port: str, baud: int):
    import serial

    return serial.Serial(port, baud, timeout=0.1, write_timeout=2.0)


def run_script(port, sends: list[str], expect: re.Pattern | None, timeout_s: float, transcript: Transcript) -> int:
    port.reset_input_buffer()  # only what answers our lines counts, not what waited in the buffer
    for line in sends:
        port.write(line.encode("ascii", errors="replace") + b"\r\n")
        transcript.sent(line)
    reader = LineReader()
    seen = 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in reader.feed(port.read(512)):
            seen += 1
            transcript.received(line)
            if expect is not None and expect.search(line):
                return EXIT_OK
    if expect is None:
        return EXIT_OK
    print(f"dgc-host console: no line matched {expect.pattern!r} within {timeout_s:g} s ({seen} lines seen above)",
          file=sys.stderr)
    return EXIT_FAILED


def run_interactive(port, transcript: Transcript, stdin: TextIO) -> int:
    stop = threading.Event()
    failure: list[str] = []

    def pump() -> None:
        reader = LineReader()
        while not stop.is_set():
            try:
                data = port.read(512)
            except Exception as exc:  # adapter unplugged
                failure.append(str(exc))
                stop.set()
                return
            for line in reader.feed(data):
                transcript.received(line)

    thread = threading.Thread(target=pump, name="console-reader", daemon=True)
    thread.start()
    print(f"connected to {port.port} at {port.baudrate} baud; type a command (help), Ctrl-D to quit", file=sys.stderr)
    try:
        for line in stdin:
            if stop.is_set():
                break
            text = line.rstrip("\r\n")
            port.write(text.encode("ascii", errors="replace") + b"\r\n")
            transcript.sent(text)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        thread.join(timeout=1)
    if failure:
        print(f"dgc-host console: {port.port} failed: {failure[0]}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_console(args: argparse.Namespace) -> int:
    if args.baud not in BAUDRATES:
        print(f"dgc-host console: --baud {args.baud}: expected one of {', '.join(map(str, BAUDRATES))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.timeout <= 0:
        print(f"dgc-host console: --timeout {args.timeout}: expected a positive number of seconds", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        expect = re.compile(args.expect) if args.expect is not None else None
    except re.error as exc:
        print(f"dgc-host console: --expect {args.expect!r}: expected a regular expression ({exc})", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        port = _open(args.port, args.baud)
    except Exception as exc:  # serial.SerialException, OSError
        print(f"dgc-host console: cannot open {args.port}: {exc} (expected a serial device, e.g. "
              "/dev/serial/by-id/usb-FTDI_...; is the adapter plugged in and are you in group dialout?)", file=sys.stderr)
        return EXIT_FAILED
    transcript = Transcript(sys.stdout, args.log)
    try:
        if args.send or expect is not None:
            return run_script(port, args.send, expect, args.timeout, transcript)
        return run_interactive(port, transcript, sys.stdin)
    finally:
        port.close()
        transcript.close()


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text, description=__doc__.split("\n", 2)[2],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", required=True, help="serial device, e.g. /dev/ttyUSB0 or /dev/serial/by-id/...")
    parser.add_argument("--baud", type=int, default=115200, help="baud rate (default 115200, the board's [console] baudrate)")
    parser.add_argument("--log", type=Path, help="append everything received and sent to this file")
    parser.add_argument("--send", action="append", default=[], metavar="LINE",
                        help="send this line (repeatable) and run non-interactively")
    parser.add_argument("--expect", metavar="REGEX", help="exit 0 when a received line matches, 1 if none does in time")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for --expect (default 10)")
    parser.set_defaults(func=cmd_console)
