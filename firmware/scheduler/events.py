"""One status line per event on stdout: what an engineer watches on a bench or in journalctl.

Format: ``<UTC ISO time> <board> <event> key=value ...`` — greppable, one line, no secrets
(callers pass ids and integers only).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class EventLog:
    def __init__(self, board_name: str, stream: TextIO | None = None):
        self._board = board_name
        self._stream = stream or sys.stdout
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def emit(self, event: str, **fields: object) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
        parts = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
        line = f"{stamp} {self._board} {event}" + (f" {parts}" if parts else "")
        with self._lock:
            self.counts[event] = self.counts.get(event, 0) + 1
            self._stream.write(line + "\n")
            self._stream.flush()


def _fmt(value: object) -> str:
    text = str(value)
    return f'"{text}"' if (" " in text or not text) else text
