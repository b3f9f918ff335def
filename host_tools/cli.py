"""`dgc-host`: the engineer's tools around the board (bench ledger, bench emulators, demo).

Each tool group lives in its own module and adds its own sub-commands; this file only
assembles them, so a group's heavy imports (FastAPI, pymodbus server) load only when used.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from firmware.logsetup import configure_logging

# (sub-command, module providing add_parser(subparsers), one-line help)
GROUPS = (
    ("ledger", "host_tools.bench_ledger.cli", "bench ledger: serve it, register devices, place signed orders, show books"),
    ("bench", "host_tools.emulators.cli", "bench house emulators: meters (Modbus RTU) and DGR on virtual serial lines"),
    ("demo", "host_tools.demo", "run a simulated neighbourhood end to end and print a summary"),
    ("provision", "host_tools.provision", "give a board its identity: key made on the board, proof of possession, registered, config written"),
    ("flash", "host_tools.flash", "build signed release bundles; install one on a board with atomic switch, health check, rollback"),
    ("sim", "host_tools.sim.cli", "deterministic simulation: the real firmware against simulated houses, faults and kills, invariants checked"),
    ("console", "host_tools.console", "the board's serial console: show its lines with host timestamps, send commands, or script one exchange"),
    ("relay", "host_tools.relay.cli", "EVM relay: take boards' signed messages over HTTP and submit them to the market contract"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgc-host", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="group", metavar="GROUP", required=True)
    for name, module_name, help_text in GROUPS:
        module = importlib.import_module(module_name)
        module.add_parser(sub, name, help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
