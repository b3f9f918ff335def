"""What every `dgc-host` command shares: its exit statuses and an argument parser that reports a
bad argument as one line (what was wrong, what was expected) instead of argparse's usage dump.

One definition, imported by the command modules (it was copied into each of them)."""

from __future__ import annotations

import argparse
from typing import NoReturn

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit status 2 (EXIT_BAD_INPUT)."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message} (see --help)\n")
