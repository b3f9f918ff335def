"""The serial console: the daemon's status lines streamed to a tty, and a few commands typed there.

Why: a board in a house cupboard has no screen and may have no network when it matters; an
engineer with a USB-serial adapter on the Pi's UART pins sees what the daemon does and can ask
``status``, ``orders``, ``trades``, ``deliveries``, ``meters``, commands ``safe`` and ``resume``, or change the
log level with ``log <level>`` (``help`` lists them). The answers come from the same
:class:`~firmware.scheduler.status.StatusService` as the control socket and `dgc status`.

Robustness rules, because this runs beside trading:

- The console is one thread with its own serial port; the event log only appends to a bounded
  queue (:class:`ConsoleTee`), so a slow, absent or blocked tty can never delay a job.
- A missing or vanished tty logs ONE warning and is retried every ``retry_s`` seconds; it never
  stops the daemon. Lines emitted while nobody is connected are kept up to the queue's bound.
- Hostile bytes are ignored: only printable ASCII builds a command line (backspace edits,
  Ctrl-C/Ctrl-U clear), overlong lines are refused, and an unknown command gets one error line.
- No echo (use the terminal's local echo, or `dgc-host console`, which shows what you type).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any, Callable, TextIO

log = logging.getLogger(__name__)

MAX_LINE_CHARS = 200
QUEUE_LINES = 500
READ_TIMEOUT_S = 0.1
WRITE_TIMEOUT_S = 2.0
LIST_COMMANDS = ("orders", "trades", "deliveries")
HELP = [
    "commands:",
    "  status              board, health, trading, meters, deliveries",
    "  orders [N]          open orders (at most N)",
    "  trades [N]          most recent trades",
    "  deliveries [N]      most recent deliveries",
    "  meters              last reading of each meter",
    "  safe                command the DGR to its safe state now (stops every transfer)",
    "  resume              lift the operator's safe state (it holds across restarts until this)",
    "  log <level>         set the log level: debug, info, warning, error, critical",
    "  help                this list",
]


class ConsoleTee:
    """A text stream for the EventLog: writes through to ``stream`` and queues whole lines for the console.

    Never blocks on the console: the queue is bounded, the oldest lines go first when it is full.
    """

    def __init__(self, stream: TextIO, maxlen: int = QUEUE_LINES):
        self._stream = stream
        self._lock = threading.Lock()
        self._partial = ""
        self.lines: deque[str] = deque(maxlen=maxlen)
        self.enabled = False

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        if self.enabled:
            with self._lock:
                self._partial += text
                *complete, self._partial = self._partial.split("\n")
                self.lines.extend(complete)
        return written

    def flush(self) -> None:
        self._stream.flush()

    def take(self) -> list[str]:
        with self._lock:
            lines = list(self.lines)
            self.lines.clear()
        return lines


class LineEditor:
    """Bytes from the wire -> command lines; everything that is not printable ASCII is dropped."""

    def __init__(self, max_chars: int = MAX_LINE_CHARS):
        self.max_chars = max_chars
        self._chars: list[str] = []
        self._overflow = False
        self.ignored_bytes = 0

    def feed(self, data: bytes) -> list[str | None]:
        """Complete lines; None stands for a line refused as too long."""
        out: list[str | None] = []
        for byte in data:
            if byte in (0x0D, 0x0A):
                if self._overflow:
                    out.append(None)
                elif self._chars:
                    out.append("".join(self._chars))
                self._chars, self._overflow = [], False
            elif byte in (0x08, 0x7F):
                if self._chars:
                    self._chars.pop()
            elif byte in (0x03, 0x15):  # Ctrl-C, Ctrl-U: forget the line
                self._chars, self._overflow = [], False
            elif 0x20 <= byte <= 0x7E:
                if len(self._chars) >= self.max_chars:
                    self._overflow = True
                else:
                    self._chars.append(chr(byte))
            else:
                self.ignored_bytes += 1
        return out


def run_command(line: str, handle: Callable[[dict], dict]) -> list[str]:
    """One typed line -> the lines to answer with (never raises for bad input)."""
    from .scheduler.status import format_answer

    words = line.split()
    if not words:
        return []
    cmd, args = words[0].lower(), words[1:]
    if cmd == "help" or cmd == "?":
        return list(HELP)
    if cmd in ("status", "meters", "safe", "resume") and not args:
        return format_answer(handle({"cmd": cmd}))
    if cmd in LIST_COMMANDS and len(args) <= 1:
        request: dict[str, Any] = {"cmd": cmd}
        if args:
            if not args[0].isdigit():
                return [f"error: {cmd} {args[0][:20]}: expected a number of rows, e.g. '{cmd} 50'"]
            request["limit"] = int(args[0])
        return format_answer(handle(request))
    if cmd == "log" and len(args) == 1:
        return format_answer(handle({"cmd": "log_level", "level": args[0]}))
    shown = line.strip()[:40]
    return [f"error: unknown command {shown!r}: expected status, orders [N], trades [N], deliveries [N], meters, "
            "safe, resume, log <level> or help"]


class SerialConsole:
    """The console thread. ``handle`` answers a control request dict (StatusService.handle)."""

    def __init__(self, tty: str, baudrate: int, handle: Callable[[dict], dict], tee: ConsoleTee, *,
                 board_name: str = "", retry_s: float = 5.0):
        self.tty = tty
        self.baudrate = baudrate
        self.handle = handle
        self.tee = tee
        self.board_name = board_name
        self.retry_s = retry_s
        self.connected = False
        self.commands = 0
        self.dropped_writes = 0
        self.editor = LineEditor()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._port = None

    def state(self) -> dict:
        return {"tty": self.tty, "connected": self.connected, "commands": self.commands,
                "ignored_bytes": self.editor.ignored_bytes, "dropped_writes": self.dropped_writes}

    def start(self) -> "SerialConsole":
        self.tee.enabled = True
        self._thread = threading.Thread(target=self._run, name="serial-console", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 3.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        warned = False
        while not self._stop.is_set():
            try:
                self._open()
            except Exception as exc:  # SerialException, OSError, ValueError: all mean "not now"
                if not warned:
                    log.warning("serial console %s unavailable (%s); retrying every %.0f s", self.tty, exc, self.retry_s)
                    warned = True
                self._stop.wait(self.retry_s)
                continue
            if warned:
                log.info("serial console %s connected", self.tty)
                warned = False
            try:
                self._serve()
            except Exception as exc:  # the tty went away (adapter unplugged, pty closed): retry later
                log.warning("serial console %s lost (%s); retrying every %.0f s", self.tty, exc, self.retry_s)
                warned = True
            finally:
                self._close()
            if not self._stop.is_set():
                self._stop.wait(self.retry_s)
        self._close()

    def _open(self) -> None:
        import serial  # pyserial; imported here so a board without a console never loads it

        self._port = serial.Serial(self.tty, self.baudrate, timeout=READ_TIMEOUT_S, write_timeout=WRITE_TIMEOUT_S,
                                   exclusive=True)
        self.connected = True

    def _close(self) -> None:
        self.connected = False
        port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except Exception:
                pass

    def _serve(self) -> None:
        self._write_lines([f"dgc console {self.board_name}: type help for commands"])
        while not self._stop.is_set():
            data = self._port.read(256)
            if data:
                for line in self.editor.feed(data):
                    self.commands += 1
                    if line is None:
                        answer = [f"error: line longer than {MAX_LINE_CHARS} characters: expected a command (type help)"]
                    else:
                        answer = run_command(line, self.handle)
                    self._write_lines(answer)
            self._write_lines(self.tee.take())
        self._write_lines(self.tee.take())  # the last lines (stopping, stopped) before the port closes

    def _write_lines(self, lines: list[str]) -> None:
        if not lines:
            return
        import serial

        data = "".join(line + "\r\n" for line in lines).encode("ascii", errors="replace")
        try:
            self._port.write(data)
        except serial.SerialTimeoutException:
            # Nobody drains the line (a pty with no reader, flow control held): drop, never block.
            self.dropped_writes += 1
            try:
                self._port.reset_output_buffer()
            except Exception:
                pass
