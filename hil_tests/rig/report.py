"""What a test's report carries from the rig: bounded text (the newest 8 KiB), and log records
captured while the test runs (the emulators' console, the DGR driver's frames on a real bench)."""

from __future__ import annotations

import collections
import logging

from .rigfile import REPORT_CHARS

def tail(text: str, max_chars: int = REPORT_CHARS) -> str:
    """The newest ``max_chars`` of ``text``, cut at a line start, saying what was left out."""
    if len(text) <= max_chars:
        return text
    cut = text[len(text) - max_chars:]
    newline = cut.find("\n")
    if 0 <= newline < len(cut) - 1:
        cut = cut[newline + 1:]
    return f"... {len(text) - len(cut)} earlier characters left out\n{cut}"


class _LogLines(logging.Handler):
    """Collects formatted log records (bounded) while a test runs."""

    def __init__(self, prefix: str = ""):
        super().__init__(logging.DEBUG)
        self.prefix = prefix
        self.lines: collections.deque[str] = collections.deque(maxlen=4000)
        self.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.prefix + self.format(record))
        except Exception:  # noqa: BLE001 - logging must never fail a test
            pass


class _Forward(logging.Handler):
    def __init__(self, level: int, target: logging.Handler):
        super().__init__(level)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


class _LoggerTap:
    """Records of one logger at ``level`` and above go to ``target`` while a test runs; the
    logger's own level is lowered for the test if it would drop them, and restored after."""

    def __init__(self, name: str, level: int, target: logging.Handler):
        self.logger = logging.getLogger(name)
        self._previous = self.logger.level
        if self.logger.getEffectiveLevel() > level:
            self.logger.setLevel(level)
        self.handler = _Forward(level, target)
        self.logger.addHandler(self.handler)

    def remove(self) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self._previous)


