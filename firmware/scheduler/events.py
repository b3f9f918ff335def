"""One status line per event on stdout: what an engineer watches on a bench or in journalctl.

Format: ``<UTC ISO time> <board> <event> key=value ...`` — greppable, one line, no secrets
(callers pass ids and integers only).

Values are text from outside the board too (a ledger's ``detail``, a router's reason), so every
value is escaped: one that is not plain printable ASCII without spaces or quotes is written as
a JSON string (``detail="bad order\\n2026-..."``), which keeps the line one line and printable —
a newline from the ledger cannot forge a second event line, and a terminal escape cannot reach
the console (issue 7 k). Event names and keys come from code, but are reduced to a safe
alphabet all the same. :func:`parse_line` reads a line back.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from typing import TextIO

# A value written as-is: printable ASCII without space, quote or backslash (and not empty).
_PLAIN = re.compile(r"[!#-\[\]-~]+")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


class EventLog:
    def __init__(self, board_name: str, stream: TextIO | None = None):
        self._board = _name(board_name)
        self._stream = stream or sys.stdout
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def emit(self, event: str, **fields: object) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
        event = _name(event)
        parts = " ".join(f"{_name(k)}={_fmt(v)}" for k, v in fields.items())
        line = f"{stamp} {self._board} {event}" + (f" {parts}" if parts else "")
        with self._lock:
            self.counts[event] = self.counts.get(event, 0) + 1
            self._stream.write(line + "\n")
            self._stream.flush()


def _name(text: str) -> str:
    return _NAME_UNSAFE.sub("_", str(text)) or "_"


def _fmt(value: object) -> str:
    text = str(value)
    return text if _PLAIN.fullmatch(text) else json.dumps(text, ensure_ascii=True)


_FIELD = re.compile(r'([A-Za-z0-9_.\-]+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_line(line: str) -> dict:
    """``{"time", "board", "event", "fields": {key: text}}`` of one event line (the inverse of emit)."""
    stamp, board, event, *rest = line.rstrip("\n").split(" ", 3)
    fields = {}
    for key, raw in _FIELD.findall(rest[0] if rest else ""):
        fields[key] = json.loads(raw) if raw.startswith('"') else raw
    return {"time": stamp, "board": board, "event": event, "fields": fields}
