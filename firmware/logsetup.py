"""Logging set-up shared by `dgc` and `dgc-host`: one format, and the libraries' noise tamed."""

from __future__ import annotations

import logging


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        # pymodbus logs every bus timeout as an ERROR with frame dumps; our drivers turn those
        # into MeterReadError and the caller reports them once, in words.
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        logging.getLogger("apscheduler").setLevel(logging.WARNING)  # one line per job run is noise
