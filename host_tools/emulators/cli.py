"""`dgc-host bench`: run bench emulators for a board config."""

from __future__ import annotations

import argparse
import sys


def cmd_house(args: argparse.Namespace) -> int:
    from firmware.config import ConfigError

    from .bench_house import serve_forever

    try:
        return serve_forever(args.config)
    except ConfigError as exc:
        print(f"dgc-host bench: {exc}", file=sys.stderr)
        return 2


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    bench_sub = parser.add_subparsers(dest="bench_command", metavar="ACTION", required=True)
    p = bench_sub.add_parser(
        "house",
        help="emulate a whole house for a board config: meters (Modbus RTU) and DGR on virtual serial lines "
        "linked at the config's ports, fed by a load/PV/battery model from its [sim] table; runs until Ctrl-C",
    )
    p.add_argument("config", metavar="FILE", help="board config (TOML), e.g. board_configs/sim.toml")
    p.set_defaults(func=cmd_house)
